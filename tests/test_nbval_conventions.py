"""The nbval rules of notebooks/conftest.py (docs/regression.md): widget views saved from JupyterLab and
measured displays never break nbval; printed expectations and plain facts are still compared."""
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _notebook(stored_stdout: str, stored_measured: float):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    fact = nbformat.v4.new_code_cell("print('train images: 3')", execution_count=1)
    fact.outputs = [nbformat.v4.new_output("stream", name="stdout", text=stored_stdout)]
    # what JupyterLab stores for a tqdm.auto bar: a widget view with a text fallback
    bar = nbformat.v4.new_code_cell("print('trained')", execution_count=2)
    bar.outputs = [
        nbformat.v4.new_output("display_data", data={
            "application/vnd.jupyter.widget-view+json": {"model_id": "abc123", "version_major": 2, "version_minor": 0},
            "text/plain": "  0%|          | 0/3 [00:00<?, ?it/s]"}),
        nbformat.v4.new_output("stream", name="stdout", text="trained\n"),
    ]
    shown = nbformat.v4.new_code_cell(
        "import pandas as pd\nfrom kaviz import report\nreport.measured(pd.DataFrame({'acc': [0.5]}), "
        "caption='students')",
        execution_count=3)
    shown.outputs = [nbformat.v4.new_output("execute_result", execution_count=3, data={
        "text/plain": "<measured 1 × 1 table: students — shown as HTML, checked by expect()>",
        "text/html": f"<table><td>{stored_measured}</td></table>"})]
    check = nbformat.v4.new_code_cell("import kaviz\nkaviz.expect('acc', 0.5, 0.49, 0.02)", execution_count=4)
    check.outputs = [nbformat.v4.new_output("stream", name="stdout", text="✓ acc: 0.49 ± 0.02\n"),
                     nbformat.v4.new_output("execute_result", execution_count=4, data={"text/plain": "0.5"})]
    nb.cells = [fact, bar, shown, check]
    return nb


def _nbval(tmp_path, nb) -> subprocess.CompletedProcess:
    shutil.copy(ROOT / "notebooks" / "conftest.py", tmp_path / "conftest.py")
    path = tmp_path / "conventions.ipynb"
    nbformat.write(nb, path)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval",
                           "--nbval-current-env", str(path)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.timeout(150)
def test_saved_widget_views_and_measured_numbers_do_not_break_nbval(tmp_path):
    # stored from "JupyterLab": a progress-bar widget output the headless re-run does not produce, and a
    # measured table with another number than the re-run's
    r = _nbval(tmp_path, _notebook("train images: 3\n", stored_measured=0.43))
    assert r.returncode == 0, r.stdout[-3000:]
    # the summary nbval prints at the end of a run: each notebook's wall time (the README's cold-time table)
    line = next(x for x in r.stdout.splitlines() if x.strip().endswith("conventions.ipynb"))
    assert "wall time per notebook" in r.stdout and float(line.split()[0]) > 0, r.stdout[-3000:]


@pytest.mark.timeout(150)
def test_control_a_changed_fact_still_fails(tmp_path):
    r = _nbval(tmp_path, _notebook("train images: 4\n", stored_measured=0.5))
    assert r.returncode != 0 and "train images" in r.stdout, r.stdout[-3000:]
