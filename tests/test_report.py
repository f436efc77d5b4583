"""kaviz.report: expectations with tolerance, seed statistics, verdicts, displays nbval skips."""
import json
import math

import pandas as pd
import pytest

import kaviz
from kaviz import report


def test_expect_passes_inside_band_and_prints_machine_independent_line(capsys):
    assert kaviz.expect("teacher accuracy", 0.8731, 0.87, 0.02) == pytest.approx(0.8731)
    out = capsys.readouterr().out
    assert out == "✓ teacher accuracy: 0.87 ± 0.02\n"
    assert "0.8731" not in out  # the measured value is not printed: the line is the same on every machine


def test_expect_fails_readably_outside_band():
    # the control: a value outside the band must fail, naming both numbers and the band
    with pytest.raises(report.ExpectationError) as err:
        kaviz.expect("teacher accuracy", 0.80, 0.87, 0.02, why="3 seeds × 2 FP paths")
    msg = str(err.value)
    assert "measured 0.8" in msg and "0.87 ± 0.02" in msg and "3 seeds × 2 FP paths" in msg


def test_expect_bounds_and_nan():
    report.expect("ratio", 0.3, at_most=0.5)
    with pytest.raises(report.ExpectationError):
        report.expect("ratio", 0.6, at_most=0.5)
    with pytest.raises(report.ExpectationError):
        report.expect("share", 0.59, at_least=0.6)
    with pytest.raises(report.ExpectationError):
        report.expect("nan is never in a band", float("nan"), 0.5, 1.0)


@pytest.mark.parametrize("kwargs", [dict(stored=1.0), dict(tol=0.1), dict()])
def test_expect_bad_arguments(kwargs):
    with pytest.raises(TypeError):
        report.expect("x", 1.0, **kwargs)


def test_expect_rejects_negative_tol_and_non_numbers():
    with pytest.raises(ValueError):
        report.expect("x", 1.0, 1.0, -0.1)
    with pytest.raises(TypeError):
        report.expect("x", "high", 1.0, 0.1)


def test_record_mode_logs_and_never_raises(tmp_path, monkeypatch, capsys):
    log = tmp_path / "log.jsonl"
    monkeypatch.setenv("KAVIZ_EXPECT", "record")
    monkeypatch.setenv("KAVIZ_EXPECT_LOG", str(log))
    report.expect("a", 0.5, 0.9, 0.01)  # outside: recorded, not raised
    report.compare("b beats c", [0.9, 0.91, 0.92], [0.5, 0.52, 0.51], expect="not reproduced")
    rows = [json.loads(l) for l in log.read_text().splitlines()]
    assert [r["kind"] for r in rows] == ["expect", "verdict"]
    assert rows[0]["value"] == 0.5 and rows[0]["ok"] is False
    assert rows[1]["verdict"] == "reproduced" and rows[1]["ok"] is False


def test_seed_stats_is_sample_std():
    s = report.seed_stats([1.0, 2.0, 3.0])
    assert s.mean == 2.0 and s.std == pytest.approx(1.0) and s.n == 3  # ddof=1 (population std: 0.816)
    one = report.seed_stats([0.7])
    assert math.isnan(one.std) and "1 seed" in str(one)
    with pytest.raises(ValueError):
        report.seed_stats([])


def test_seed_table_shape():
    df = pd.DataFrame({"method": ["KD", "KD", "CFL", "CFL"], "acc": [0.4, 0.5, 0.2, 0.2]})
    t = report.seed_table(df, "method", ["acc"])
    assert list(t.columns) == ["method", "seeds", "acc"]
    assert t.loc[0, "acc"] == "0.450 ± 0.071"
    n = report.seed_table(df, "method", ["acc"], as_text=False)
    assert n.loc[1, "acc std"] == 0.0
    with pytest.raises(KeyError, match="no column"):
        report.seed_table(df, "student", ["acc"])


def test_compare_verdicts_and_controls():
    a, b = [0.80, 0.81, 0.82], [0.70, 0.71, 0.72]
    assert report.compare("a > b", a, b).verdict == "reproduced"
    assert report.compare("b > a", b, a).verdict == "not reproduced"       # control: the opposite claim
    assert report.compare("a < b", a, b, relation="<").verdict == "not reproduced"
    noisy = report.compare("within noise", [0.80, 0.70, 0.90], [0.79, 0.69, 0.89])
    assert noisy.verdict == "cannot tell"
    assert math.isclose(noisy.margin_std, 0.01 / 0.1)
    match = report.compare("a ≈ b", [0.80, 0.81, 0.82], [0.805, 0.815, 0.825], relation="≈", band=0.05)
    assert match.verdict == "reproduced"
    far = report.compare("a ≈ b", a, b, relation="≈", band=0.02)
    assert far.verdict == "not reproduced"
    # a single measured reference (a teacher) against seeds: std from the seeds alone
    single = report.compare("student ≥ teacher", [0.9, 0.91, 0.92], 0.85)
    assert single.margin_std == pytest.approx((0.91 - 0.85) / 0.01)
    assert report.compare("one seed each", 0.9, 0.8).verdict == "cannot tell"


def test_expect_verdict_fails_when_the_conclusion_moves(capsys):
    c = report.compare("a > b", [0.8, 0.81, 0.82], [0.7, 0.71, 0.72], expect="reproduced")
    assert capsys.readouterr().out == "✓ a > b: reproduced\n"
    report.expect_verdict(c, {"reproduced", "cannot tell"})
    with pytest.raises(report.ExpectationError, match="stored run's was not reproduced"):
        report.expect_verdict(c, "not reproduced")
    with pytest.raises(ValueError):
        report.expect_verdict(c, "maybe")
    with pytest.raises(ValueError):
        report.compare("x", [1, 2], [1, 2], relation="≈")


def test_measured_and_prose_have_constant_plain_text():
    df = pd.DataFrame({"acc": [0.812345, 0.7]}, index=["KD", "CFL"])
    m1 = report.measured(df, caption="students")._repr_mimebundle_()
    m2 = report.measured(df * 0.5, caption="students")._repr_mimebundle_()
    assert m1["text/plain"] == m2["text/plain"]          # what nbval compares does not carry numbers
    assert "0.812" in m1["text/html"] and "0.406" in m2["text/html"]
    p = report.prose("KD reaches **0.81**")._repr_mimebundle_()
    assert p["text/markdown"] == "KD reaches **0.81**" and "0.81" not in p["text/plain"]
    with pytest.raises(TypeError):
        report.prose(3)
    assert "text" in repr(report.measured("free text 0.5"))


def test_claims_line_and_table(capsys):
    a = report.compare("student beats KD", [0.8, 0.81, 0.82], [0.7, 0.71, 0.72])
    b = report.compare("student ≈ teacher", [0.8, 0.81, 0.82], 0.9, relation="≈", band=0.02)
    shown = report.claims([a, b], headline={"student beats KD"}, paper_values={"student beats KD": "0.7997 vs 0.7965"})
    line = capsys.readouterr().out.strip()
    assert line.startswith("CLAIMS ")
    parsed = json.loads(line[len("CLAIMS "):])
    assert [p["claim"] for p in parsed] == ["student beats KD", "student ≈ teacher"]
    assert parsed[0] == {"claim": "student beats KD", "headline": True, "verdict": "reproduced",
                         "margin_std": pytest.approx(10.0)}
    assert parsed[1]["headline"] is False and parsed[1]["verdict"] == "not reproduced"
    table = shown._repr_mimebundle_()["text/html"]
    assert "0.7997" in table and "reported (source)" in table and ">paper<" not in table  # never called the paper's
    with pytest.raises(ValueError, match="not among"):
        report.claims([a], headline={"something else"})


def test_a_readers_kernel_warns_where_a_regression_run_raises(monkeypatch, capsys):
    # with nothing pinned, 7 of 194 notebook cells left their bands on this machine: Run All in a
    # reader's own JupyterLab must show every result, make test must still fail
    c = report.compare("a > b", [0.8, 0.81, 0.82], [0.7, 0.71, 0.72])
    monkeypatch.delenv("KAVIZ_EXPECT", raising=False)
    monkeypatch.setenv("CI", "1")
    assert report.strict()
    with pytest.raises(report.ExpectationError):           # control: a regression run raises
        report.expect("acc", 0.5, 0.7, 0.01)
    monkeypatch.delenv("CI")
    assert not report.strict()
    capsys.readouterr()
    with pytest.warns(report.ExpectationWarning, match=r"acc: measured 0.5, expected 0.7 ± 0.01"):
        assert report.expect("acc", 0.5, 0.7, 0.01) == 0.5
    assert capsys.readouterr().out.startswith("⚠ acc: measured 0.5, outside the stored run's 0.7 ± 0.01")
    with pytest.warns(report.ExpectationWarning, match="verdict is 'reproduced'"):
        assert report.expect_verdict(c, "not reproduced") is c
    assert "⚠ a > b: this run's verdict is 'reproduced'" in capsys.readouterr().out
    monkeypatch.setenv("KAVIZ_EXPECT", "strict")              # forced either way
    assert report.strict()
    monkeypatch.setenv("CI", "1")
    monkeypatch.setenv("KAVIZ_EXPECT", "warn")
    assert not report.strict()
