"""nbval settings for the notebooks (DESIGN.md §4).

Compared: rounded tables, printed summaries and invariants (text/plain and stdout).
Not compared: figures and widget views (plotly JSON, HTML, images, widget models), and stderr
(progress bars, warnings): their bytes change from run to run without the results changing.
"""
import nbval.plugin

NOT_COMPARED = (
    "application/vnd.plotly.v1+json",
    "application/vnd.jupyter.widget-state+json",
    "text/html",
    "image/png",
    "image/jpeg",
    "image/svg+xml",
    "application/javascript",
    "stderr",
)

_init = nbval.plugin.IPyNbFile.__init__


def _init_with_skips(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    self.skip_compare = tuple(self.skip_compare) + NOT_COMPARED


nbval.plugin.IPyNbFile.__init__ = _init_with_skips
