"""Results a reader can trust: seed statistics, expectations with tolerance, verdicts, generated prose.

A notebook's regression test compares *conclusions*, not bits (DESIGN.md §4, docs/regression.md):

- ``expect(name, value, stored, tol)`` checks a trained number against the value the stored run
  gave, within a band measured across seeds and floating-point paths. It prints one line that is
  the same on every machine (the stored value, the band and ``ok``) and raises
  :class:`ExpectationError` with both numbers when a re-run leaves the band.
- ``compare(claim, a, b, relation=">")`` states a conclusion that rests on a comparison over seeds
  (difference, margin in units of the seeds' pooled sample std, verdict); ``expect=`` checks the
  verdict the stored run reached.
- ``measured(df)`` and ``prose(text)`` show trained numbers to the reader as HTML / Markdown; their
  plain-text form is a constant, so nbval never byte-compares them, and they can quote any number
  of the run they belong to.
- ``seed_stats`` / ``seed_table``: the one mean ± sample-std (ddof = 1) convention.

Strict or not: under a regression run (``CI`` set, as ``make test``, ``make demo``, nbval and the browser
test set it, or ``KAVIZ_EXPECT=strict``) a failed check raises. In a reader's own kernel
(``make lab``, ``jupyter lab``) it warns instead — an :class:`ExpectationWarning` and a line saying
what moved — so that *Run All* on another machine shows every result instead of stopping at the first
number that left its band (measured on this repository's machine: with nothing pinned, 7 of 194 cells
left their bands; docs/regression.md).

Recording mode, for measuring bands: with ``KAVIZ_EXPECT=record`` nothing raises, and every
expectation and comparison is appended as one JSON line to ``$KAVIZ_EXPECT_LOG``
(``scripts/measure_spread.py`` runs notebooks this way under several floating-point paths and
suggests bands).
"""
from __future__ import annotations

import html
import json
import math
import os
from dataclasses import dataclass
from typing import Iterable, Sequence

from .stats import SeedStats, seed_stats, seed_table  # noqa: F401 (re-exported: they live low, in kaviz.stats)

__all__ = [
    "ExpectationError",
    "ExpectationWarning",
    "strict",
    "SeedStats",
    "seed_stats",
    "seed_table",
    "expect",
    "Comparison",
    "compare",
    "expect_verdict",
    "measured",
    "prose",
    "claims",
    "read_claims",
    "VERDICTS",
]

VERDICTS = ("reproduced", "not reproduced", "cannot tell")
RELATIONS = (">", "<", "≈")


class ExpectationError(AssertionError):
    """A re-run left the band its stored run set (the message holds both numbers and the band)."""


class ExpectationWarning(UserWarning):
    """:class:`ExpectationError`'s message, in a reader's kernel (not a regression run)."""


def _recording() -> bool:
    return os.environ.get("KAVIZ_EXPECT", "").strip().lower() == "record"


def strict() -> bool:
    """Whether a failed expectation raises: ``KAVIZ_EXPECT=strict``, or ``CI`` set (a regression run:
    make test, make demo, nbval); ``KAVIZ_EXPECT=warn`` forces warnings."""
    mode = os.environ.get("KAVIZ_EXPECT", "").strip().lower()
    if mode in ("strict", "warn"):
        return mode == "strict"
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _fail(message: str, line: str) -> None:
    """Raise (regression run) or warn and print ``line`` (a reader's kernel)."""
    if strict():
        raise ExpectationError(message)
    import warnings

    warnings.warn(message, ExpectationWarning, stacklevel=3)
    print(line)


def _record(entry: dict) -> None:
    path = os.environ.get("KAVIZ_EXPECT_LOG")
    if not path:
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry, default=float) + "\n")


def _fmt(x: float) -> str:
    return f"{x:g}"


def expect(name: str, value, stored: float | None = None, tol: float | None = None, *,
           at_least: float | None = None, at_most: float | None = None, why: str = "") -> float:
    """Check a measured ``value`` against the stored run: ``|value − stored| ≤ tol`` and/or
    ``at_least ≤ value ≤ at_most``. Prints one machine-independent line (the expectation and ``ok``,
    never the measured value) and returns ``value``; raises :class:`ExpectationError` naming both
    numbers when the check fails. ``why`` says where the band comes from (shown on failure)."""
    if not isinstance(name, str) or not name:
        raise TypeError("expect: name must be a non-empty string saying what is checked")
    if (stored is None) != (tol is None):
        raise TypeError(f"expect({name!r}): give stored and tol together (the stored run's value and its band)")
    if stored is None and at_least is None and at_most is None:
        raise TypeError(f"expect({name!r}): nothing to check: give stored and tol, at_least or at_most")
    if tol is not None and not (tol >= 0):
        raise ValueError(f"expect({name!r}): tol must be >= 0, got {tol}")
    try:
        v = float(value)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"expect({name!r}): value must be a number, got {value!r}") from exc
    parts, ok = [], not math.isnan(v)
    if stored is not None:
        parts.append(f"{_fmt(stored)} ± {_fmt(tol)}")
        ok = ok and abs(v - stored) <= tol + 1e-12
    if at_least is not None:
        parts.append(f"≥ {_fmt(at_least)}")
        ok = ok and v >= at_least
    if at_most is not None:
        parts.append(f"≤ {_fmt(at_most)}")
        ok = ok and v <= at_most
    expectation = ", ".join(parts)
    _record(dict(kind="expect", name=name, value=v, stored=stored, tol=tol, at_least=at_least,
                 at_most=at_most, ok=bool(ok)))
    if not ok and not _recording():
        where = f" The band comes from {why}." if why else ""
        _fail(f"{name}: measured {v:.6g}, expected {expectation}.{where} A re-run on this machine left the band "
              "the stored run set: if the code or settings changed on purpose, re-measure the band "
              "(scripts/measure_spread.py) and store fresh outputs (make execute); otherwise this is a regression.",
              f"⚠ {name}: measured {v:.4g}, outside the stored run's {expectation} (another machine or "
              "settings; the notebook goes on — docs/regression.md)")
        return v
    print(f"{'✓' if ok else '✗ (recording)'} {name}: {expectation}")
    return v


# ------------------------------------------------------------------------------------- comparisons
#: Relative size below which a difference between two spread-free quantities counts as float rounding.
ROUNDING = 1e-6


def verdict(margin_std: float, threshold: float = 2.0) -> str:
    """``reproduced`` when the claim holds by at least ``threshold`` std, ``not reproduced`` when its
    opposite does, ``cannot tell`` in between (or with too few seeds)."""
    if math.isnan(margin_std):
        return "cannot tell"
    if margin_std >= threshold:
        return "reproduced"
    if margin_std <= -threshold:
        return "not reproduced"
    return "cannot tell"


@dataclass(frozen=True)
class Comparison:
    """A claim about two quantities measured over seeds.

    ``margin_std``: for ``>``, (mean_a − mean_b) / pooled std; for ``<`` the negative of that; for
    ``≈`` (a matches b within ``band``), (band − |mean_a − mean_b|) / pooled std. The pooled std is
    sqrt((s_a² + s_b²) / 2) with sample stds; a quantity measured once (no std) counts as exact.
    When the pooled std is 0 the margin is ±∞, unless the gap is within float rounding (``ROUNDING``
    relative), which gives no margin (``cannot tell``).
    """

    claim: str
    a_name: str
    b_name: str
    a: SeedStats
    b: SeedStats
    relation: str
    band: float | None
    margin_std: float
    verdict: str

    @property
    def difference(self) -> float:
        return self.a.mean - self.b.mean

    def sentence(self, digits: int = 3) -> str:
        """The conclusion in words, with the numbers of this run (for :func:`prose`)."""
        rel = {">": "above", "<": "below"}.get(self.relation, "within ± %g of" % (self.band or 0))
        m = "n/a" if math.isnan(
            self.margin_std) else ("∞" if math.isinf(self.margin_std) else f"{self.margin_std:+.1f}")
        return (f"**{self.claim}** — {self.verdict}: {self.a_name} {self.a.format(digits)} vs {self.b_name} "
                f"{self.b.format(digits)} (difference {self.difference:+.{digits}f}; the claim is that "
                f"{self.a_name} is {rel} {self.b_name}; margin {m} std)")

    def as_dict(self) -> dict:
        return dict(claim=self.claim, a=self.a_name, b=self.b_name, a_mean=self.a.mean, a_std=self.a.std,
                    b_mean=self.b.mean, b_std=self.b.std, seeds=min(self.a.n, self.b.n), relation=self.relation,
                    margin_std=self.margin_std, verdict=self.verdict)


def compare(claim: str, a, b, *, a_name: str = "A", b_name: str = "B", relation: str = ">",
            band: float | None = None, threshold: float = 2.0, expect: str | Iterable[str] | None = None) -> Comparison:
    """Evaluate ``claim`` ("a > b", "a < b" or "a ≈ b within band") from per-seed values.

    ``a`` and ``b`` are sequences of per-seed values (or single numbers, e.g. a teacher's accuracy).
    With ``expect`` (a verdict, or a set of verdicts the measured spread allows), the verdict is
    checked like :func:`expect`: one machine-independent line, an error when it differs."""
    if relation not in RELATIONS:
        raise ValueError(f"compare({claim!r}): relation must be one of {RELATIONS}, got {relation!r}")
    if relation == "≈" and (band is None or not band >= 0):
        raise ValueError(f"compare({claim!r}): relation '≈' needs band >= 0 (how close counts as a match)")
    sa, sb = seed_stats(a), seed_stats(b)
    va = 0.0 if sa.n < 2 else sa.std ** 2
    vb = 0.0 if sb.n < 2 else sb.std ** 2
    if sa.n < 2 and sb.n < 2:
        pooled = float("nan")  # nothing measured over seeds: no spread to weigh the difference by
    else:
        pooled = math.sqrt((va + vb) / ((sa.n >= 2) + (sb.n >= 2)))
    diff = sa.mean - sb.mean
    gap = {">": diff, "<": -diff}.get(relation, None)
    if gap is None:
        gap = band - abs(diff)
    # with no spread at all, a gap at the level of float rounding (a float32 and a float64 computation of the
    # same number) is no evidence either way
    negligible = abs(gap) <= ROUNDING * max(1.0, abs(sa.mean), abs(sb.mean))
    if math.isnan(pooled):
        margin = float("nan")
    elif pooled == 0:
        margin = math.copysign(math.inf, gap) if not negligible else float("nan")
    else:
        margin = gap / pooled
    c = Comparison(claim, a_name, b_name, sa, sb, relation, band, margin, verdict(margin, threshold))
    if expect is not None:
        expect_verdict(c, expect)
    return c


def expect_verdict(comparison: Comparison, expected: str | Iterable[str]) -> Comparison:
    """Check that the re-run reaches the stored verdict (or one of a set the measured spread allows)."""
    allowed = {expected} if isinstance(expected, str) else set(expected)
    bad = allowed - set(VERDICTS)
    if bad or not allowed:
        raise ValueError(f"expect_verdict: verdicts must be among {VERDICTS}, got {sorted(bad) or 'nothing'}")
    ok = comparison.verdict in allowed
    shown = " or ".join(v for v in VERDICTS if v in allowed)
    _record(dict(kind="verdict", name=comparison.claim, value=comparison.margin_std, verdict=comparison.verdict,
                 expected=sorted(allowed), ok=bool(ok)))
    if not ok and not _recording():
        _fail(f"{comparison.claim}: the re-run's verdict is '{comparison.verdict}' "
              f"({comparison.sentence()}), the stored run's was {shown}. A conclusion moved: re-measure the "
              "spread (scripts/measure_spread.py) before storing a new one.",
              f"⚠ {comparison.claim}: this run's verdict is '{comparison.verdict}', the stored run's was {shown} "
              "(another machine or settings; the notebook goes on — docs/regression.md)")
        return comparison
    print(f"{'✓' if ok else '✗ (recording)'} {comparison.claim}: {shown}")
    return comparison


# ------------------------------------------------------------------------------- what readers see
class _Shown:
    """Rich output (HTML / Markdown) with a constant plain-text form: numbers a reader sees but nbval
    never byte-compares (its plain text is what nbval compares)."""

    def __init__(self, html_text: str | None, markdown: str | None, plain: str):
        self._html, self._markdown, self._plain = html_text, markdown, plain

    def _repr_mimebundle_(self, include=None, exclude=None):
        bundle = {"text/plain": self._plain}
        if self._html is not None:
            bundle["text/html"] = self._html
        if self._markdown is not None:
            bundle["text/markdown"] = self._markdown
        return bundle

    def __repr__(self) -> str:
        return self._plain


def measured(obj, caption: str | None = None, digits: int = 3):
    """Show a table (DataFrame / Series / dict) or text of trained numbers: rendered as HTML for the
    reader, constant in plain text (``<measured: …>``), so the byte comparison skips it while
    ``expect`` and ``compare`` check what it shows."""
    import pandas as pd

    if isinstance(obj, dict):
        obj = pd.Series(obj)
    if isinstance(obj, pd.Series):
        obj = obj.to_frame(obj.name if obj.name is not None else "value")
    if isinstance(obj, pd.DataFrame):
        table = obj.round(digits) if digits is not None else obj
        body = table.to_html(float_format=lambda x: f"{x:.{digits}f}", na_rep="—")
        shape = f"{table.shape[0]} × {table.shape[1]} table"
    else:
        text = str(obj)
        body = f"<pre>{html.escape(text)}</pre>"
        shape = "text"
    cap = f"<p><em>{html.escape(caption)}</em></p>" if caption else ""
    plain = f"<measured {shape}{': ' + caption if caption else ''} — shown as HTML, checked by expect()>"
    return _Shown(cap + body, None, plain)


def prose(text: str):
    """Markdown generated from the run (conclusions quoting its numbers); constant plain text.
    JupyterLab, nbconvert's HTML and GitHub render the Markdown."""
    if not isinstance(text, str):
        raise TypeError(f"prose: text must be a str, got {type(text).__name__}")
    return _Shown(None, text, "<generated text — see the rendered Markdown>")


# ------------------------------------------------------------------------------------------ claims
def claims(comparisons: Sequence[Comparison], *, headline: Iterable[str] = (), paper_values: dict | None = None,
           caption: str = "claims"):
    """The claims table a paper notebook ends with (DESIGN.md §4): one row per claim — headline or not,
    a number reported elsewhere (``paper_values``: a string that names its source — "the paper: …",
    "reference code run: …" — shown as "reported (source)", so a rerun of the authors' code is never
    called the paper's), this run's means ± sample std, the margin in std and the
    verdict — shown as a measured table, and printed as one line ``CLAIMS <json>`` (a list of objects
    with ``claim``, ``headline``, ``verdict``, ``margin_std``) for tools. notebooks/sanitize.cfg masks
    the JSON for nbval: the verdicts are checked by ``compare(..., expect=...)``, not by bytes."""
    import pandas as pd

    headline = set(headline)
    unknown = headline - {c.claim for c in comparisons}
    if unknown:
        raise ValueError(f"claims: headline claim(s) {sorted(unknown)} are not among the comparisons")
    paper_values = paper_values or {}
    rows, line = [], []
    for c in comparisons:
        rows.append({"claim": c.claim, "headline": c.claim in headline,
                     "reported (source)": paper_values.get(c.claim, "—"),
                     "this run (a)": f"{c.a_name}: {c.a.format()}",
                     "this run (b)": f"{c.b_name}: {c.b.format()}", "margin (std)": c.margin_std,
                     "verdict": c.verdict})
        m = c.margin_std
        line.append({"claim": c.claim, "headline": c.claim in headline, "verdict": c.verdict,
                     "margin_std": None if math.isnan(m) else (m if math.isfinite(m) else math.copysign(1e9, m))})
    print("CLAIMS " + json.dumps(line, ensure_ascii=False))
    return measured(pd.DataFrame(rows).set_index("claim"), caption=caption, digits=2)


def read_claims(notebook) -> list[dict]:
    """The claims an executed notebook printed (its ``CLAIMS <json>`` lines, in the order printed), each
    with the notebook's file name added under ``notebook``. ``notebook``: a path to an ``.ipynb`` (the
    stored outputs, or an executed copy from ``python -m kaviz run --out``). A notebook that printed no
    claims (never executed, or it stopped before its claims cell) gives an empty list; a line that is not
    valid JSON raises ValueError naming the notebook."""
    from pathlib import Path

    path = Path(notebook)
    try:
        nb = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not a notebook (invalid JSON: {exc})") from exc
    found = []
    for cell in nb.get("cells", []):
        for out in cell.get("outputs", []) if cell.get("cell_type") == "code" else []:
            text = out.get("text", "")
            text = "".join(text) if isinstance(text, list) else text
            for line in text.splitlines():
                if not line.startswith("CLAIMS "):
                    continue
                try:
                    rows = json.loads(line[len("CLAIMS "):])
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}: a CLAIMS line that is not JSON ({exc}): {line[:120]}") from exc
                found += [{"notebook": path.name, **row} for row in rows]
    return found
