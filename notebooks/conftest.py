"""nbval settings for the notebooks (DESIGN.md §4, docs/regression.md).

Compared exactly: stdout and ``text/plain`` — what is the same on every machine (dataset sizes, shapes,
parameter counts, layer tables, exactness checks) and the lines printed by ``kaviz.expect`` /
``kaviz.report.compare`` (the stored value, its band and the verdict — never the measured value).
Trained numbers are shown through ``kaviz.report.measured`` / ``kaviz.report.prose``, whose plain text
is constant, and checked by those expectations.

Not compared: figures and widget views (plotly JSON, HTML, Markdown, images, widget models), stderr
(progress bars, warnings), and whole outputs that are widget views — a progress bar or an explorer
saved from JupyterLab is a widget output with a ``text/plain`` fallback (``HBox(children=…)``); it is
dropped on both sides, so a notebook saved from JupyterLab after "Run All" compares like one stored by
``make execute`` (where ``CI`` turns progress bars off).
"""
import nbval.plugin

NOT_COMPARED = (
    "application/vnd.plotly.v1+json",
    "application/vnd.jupyter.widget-state+json",
    "text/html",
    "text/markdown",
    "image/png",
    "image/jpeg",
    "image/svg+xml",
    "application/javascript",
    "stderr",
)
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"

_init = nbval.plugin.IPyNbFile.__init__


def _init_with_skips(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    self.skip_compare = tuple(self.skip_compare) + NOT_COMPARED


def without_widget_views(outputs):
    """Outputs minus widget views (their text fallback differs between JupyterLab and headless runs)."""
    return [o for o in outputs if WIDGET_VIEW not in (o.get("data") or {})]


_compare = nbval.plugin.IPyNbCell.compare_outputs


def _compare_without_widgets(self, test, ref, skip_compare=None):
    return _compare(self, without_widget_views(test), without_widget_views(ref), skip_compare)


nbval.plugin.IPyNbFile.__init__ = _init_with_skips
nbval.plugin.IPyNbCell.compare_outputs = _compare_without_widgets


# Each notebook's wall time under nbval (all its cells, the kernel start included), printed at the end of the
# run: on an empty cache it is the notebook's cold time, the figure the README's per-notebook table quotes.
_seconds: dict[str, float] = {}


def pytest_runtest_logreport(report):
    path = report.nodeid.split("::")[0]
    if path.endswith(".ipynb"):
        _seconds[path] = _seconds.get(path, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter):
    if _seconds:
        terminalreporter.write_sep("-", "wall time per notebook (every cell, kernel start included)")
        for path, seconds in _seconds.items():
            terminalreporter.write_line(f"{seconds:8.1f} s  {path}")
        terminalreporter.write_line(f"{sum(_seconds.values()):8.1f} s  in all")
