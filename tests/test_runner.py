"""python -m kaviz run: parameters injected into the tagged cell, dry runs, headless execution."""
import subprocess
import sys

import nbformat
import pytest

from kaviz import runner

PARAMS = 'DATA = "embedded"   # or "cub"\nCUB_ROOT = None\nQUICK = True\nEPOCHS = 6 if QUICK else 20\nSEEDS = [0, 1]\n'


def _nb(tmp_path, params=PARAMS, body="print(DATA, EPOCHS, SEEDS)"):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_markdown_cell("# t"),
                nbformat.v4.new_code_cell(params, metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell(body)]
    path = tmp_path / "t.ipynb"
    nbformat.write(nb, path)
    return path


def test_parse_assignments_literals_else_strings():
    got = runner.parse_assignments(["EPOCHS=3", "SMOKE=True", "ROOT=/data/CUB_200_2011", "SEEDS=[0, 1, 2]", "X=None",
                                    "NAME=cub_dogs", "W={'a': 1}"])
    assert got == {"EPOCHS": 3, "SMOKE": True, "ROOT": "/data/CUB_200_2011", "SEEDS": [0, 1, 2], "X": None,
                   "NAME": "cub_dogs", "W": {"a": 1}}
    for bad in ["EPOCHS", "=3", "2X=1"]:
        with pytest.raises(runner.ParameterError):
            runner.parse_assignments([bad])


def test_injection_follows_the_statement_and_derived_parameters_follow(tmp_path):
    nb = nbformat.read(_nb(tmp_path), as_version=4)
    values = runner.resolve_parameters(nb, {"QUICK": False, "DATA": "cub"})
    assert values["EPOCHS"] == 20 and values["DATA"] == "cub" and values["SEEDS"] == [0, 1]
    runner.inject_parameters(nb, {"QUICK": False})
    cell = nb.cells[1]
    assert "injected-parameters" in cell.metadata["tags"]
    assert cell.source.splitlines()[3] == "QUICK = False  # set by `python -m kaviz run -p`"


def test_unknown_parameter_is_refused_with_close_names(tmp_path):
    nb = nbformat.read(_nb(tmp_path), as_version=4)
    with pytest.raises(runner.ParameterError, match=r"did you mean \['EPOCHS'\]"):
        runner.inject_parameters(nb, {"EPOCH": 3})


def test_notebook_without_parameter_cell_is_refused(tmp_path):
    nb = nbformat.read(_nb(tmp_path), as_version=4)
    nb.cells[1].metadata["tags"] = []
    with pytest.raises(runner.ParameterError, match="tagged 'parameters'"):
        runner.inject_parameters(nb, {"EPOCHS": 1})


def test_dry_run_prints_parameters_and_plan(tmp_path, capsys):
    path = _nb(tmp_path)
    assert runner.main(["run", str(path), "-p", "DATA=cub", "-p", f"CUB_ROOT={tmp_path}", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "DATA = 'cub'  (set by -p)" in out and "EPOCHS = 6" in out
    assert f"CUB_ROOT = {tmp_path}: found" in out and "device: cpu" in out
    assert runner.main(["run", str(path), "-p", "DAT=cub", "--dry-run"]) == 2  # a typo: error, nothing runs
    assert "did you mean" in capsys.readouterr().err


@pytest.mark.timeout(120)
def test_headless_run_with_parameters_writes_notebook_and_html(tmp_path):
    path = _nb(tmp_path)
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "kaviz", "run", str(path), "-p", "QUICK=False", "-p", "DATA=cub",
                        "--out", str(out)], capture_output=True, text=True, timeout=110)
    assert r.returncode == 0, r.stdout + r.stderr
    executed = nbformat.read(out / "t.ipynb", as_version=4)
    assert executed.cells[2].outputs[0]["text"] == "cub 20 [0, 1]\n"
    assert (out / "t.html").stat().st_size > 1000
    assert nbformat.read(path, as_version=4).cells[1].source == PARAMS  # the source notebook is untouched
    # a failing cell makes the run fail, naming the error
    bad = _nb(tmp_path, body="raise RuntimeError('boom')")
    r = subprocess.run([sys.executable, "-m", "kaviz", "run", str(bad), "--out", str(out)], capture_output=True,
                       text=True, timeout=110)
    assert r.returncode == 1 and "FAIL" in r.stdout and "boom" in r.stdout


def _notebook_with(tmp_path, name, texts):
    import json as _json
    cells = [{"cell_type": "code", "metadata": {}, "source": "", "execution_count": 1,
              "outputs": [{"output_type": "stream", "name": "stdout", "text": t}]} for t in texts]
    path = tmp_path / name
    path.write_text(_json.dumps({"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    return path


def test_claims_command_reads_the_claims_lines(tmp_path, capsys):
    import json as _json

    from kaviz.report import read_claims
    from kaviz.runner import main
    held = [{"claim": "a beats b", "headline": True, "verdict": "reproduced", "margin_std": 3.1},
            {"claim": "c", "headline": False, "verdict": "cannot tell", "margin_std": None}]
    moved = [{"claim": "x beats y", "headline": True, "verdict": "not reproduced", "margin_std": -2.5}]
    one = _notebook_with(tmp_path, "one.ipynb", ["before\nCLAIMS " + _json.dumps(held) + "\n"])
    two = _notebook_with(tmp_path, "two.ipynb", [["CLAIMS ", _json.dumps(moved), "\n"]])  # text as a list
    assert [r["claim"] for r in read_claims(one)] == ["a beats b", "c"]
    assert read_claims(two)[0] == {"notebook": "two.ipynb", **moved[0]}
    assert main(["claims", str(one), str(two)]) == 0
    out = capsys.readouterr().out
    assert "headline claims reproduced in 1 of 2 notebooks" in out  # control: two.ipynb's headline did not hold
    assert "n/a" in out and "+3.1" in out
    assert main(["claims", "--headline", "--json", str(one), str(two)]) == 0
    assert [r["claim"] for r in _json.loads(capsys.readouterr().out)] == ["a beats b", "x beats y"]


def test_claims_command_bad_inputs(tmp_path, capsys):
    from kaviz.report import read_claims
    from kaviz.runner import main
    silent = _notebook_with(tmp_path, "silent.ipynb", ["no claims here\n"])
    assert read_claims(silent) == [] and main(["claims", str(silent)]) == 1  # nothing printed claims
    assert "printed no CLAIMS line" in capsys.readouterr().err
    one = _notebook_with(tmp_path, "one.ipynb", ['CLAIMS [{"claim": "c", "headline": true, "verdict": "reproduced", '
                                                 '"margin_std": 2.5}]\n'])
    assert main(["claims", str(silent), str(one)]) == 0  # control: one of them did
    assert "silent.ipynb printed no CLAIMS line" in capsys.readouterr().err
    assert main(["claims", str(tmp_path / "absent.ipynb")]) == 2
    broken = _notebook_with(tmp_path, "broken.ipynb", ["CLAIMS [{not json\n"])
    with pytest.raises(ValueError, match="broken.ipynb"):
        read_claims(broken)
    assert main(["claims", str(broken)]) == 2
    (tmp_path / "text.ipynb").write_text("not a notebook")
    assert main(["claims", str(tmp_path / "text.ipynb")]) == 2 and "not a notebook" in capsys.readouterr().err
