"""The set-up cell every notebook runs: seeds, threads, quiet warnings, figure rendering.

``kaviz.notebook.setup(seed=0, threads=2)`` is all a notebook needs. It returns the device to use.
"""
from __future__ import annotations

import os
import warnings

__all__ = ["setup", "show_table", "configure_plotly", "DEFAULT_RENDERER"]


def setup(seed: int = 0, threads: int | None = 2, device: str | None = "auto", renderer: str | None = None):
    """Seed everything, fix the thread count (results are bit-identical for a given seed and thread
    count), silence known-noisy warnings, and pick a plotly renderer that works offline in JupyterLab
    (``$KAVIZ_PLOTLY_RENDERER`` or ``renderer`` overrides it; see :func:`configure_plotly`)."""
    from . import default_device, seed_everything

    # KAVIZ_THREADS overrides the notebook's thread count: scripts/measure_spread.py uses it to run a
    # notebook on another floating-point path (sums split over other threads), as another machine would.
    if os.environ.get("KAVIZ_THREADS"):
        threads = int(os.environ["KAVIZ_THREADS"])
    seed_everything(seed, threads=threads)
    for pattern in (
        ".*n_jobs value.*overridden.*",      # umap with a random_state
        ".*is deprecated.*",                 # third-party deprecations unrelated to the results
        ".*TypedStorage is deprecated.*",
    ):
        warnings.filterwarnings("ignore", message=pattern)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        import pandas as pd

        pd.set_option("display.precision", 3)
        pd.set_option("display.max_columns", 30)
        pd.set_option("display.width", 160)
    except ImportError:  # pragma: no cover
        pass
    try:
        configure_plotly(renderer)
    except ImportError:  # pragma: no cover
        pass
    return default_device(device)


#: The default plotly renderer: the figure's JSON only, drawn by JupyterLab's plotly extension with the
#: plotly.js of the installed ``plotly`` package (offline; no CDN, and no 4 MB copy of plotly.js stored in
#: every notebook). ``make demo`` / ``kaviz run`` reports use ``plotly_mimetype+notebook`` instead, which
#: embeds plotly.js once per HTML report so that the report opens offline in any browser.
DEFAULT_RENDERER = "plotly_mimetype"


def configure_plotly(renderer: str | None = None) -> str:
    """Set plotly's default renderer (``renderer``, else ``$KAVIZ_PLOTLY_RENDERER``, else
    :data:`DEFAULT_RENDERER`) and give every part of it :data:`kaviz.plots.PLOTLY_CONFIG` (no
    "share chart" upload button, no logo). Returns the renderer string. Renderers that load plotly.js
    from a CDN (``notebook_connected``, ``*_connected``) are refused: kaviz works offline."""
    import plotly.io as pio

    from .plots import PLOTLY_CONFIG

    name = renderer or os.environ.get("KAVIZ_PLOTLY_RENDERER") or DEFAULT_RENDERER
    parts = name.split("+")
    unknown = [p for p in parts if p not in pio.renderers]
    if unknown:
        raise ValueError(f"unknown plotly renderer(s) {unknown} in {name!r} (from the renderer argument "
                         f"or $KAVIZ_PLOTLY_RENDERER); e.g. {DEFAULT_RENDERER!r} or 'plotly_mimetype+notebook'")
    cdn = [p for p in parts if "connected" in p or getattr(pio.renderers[p], "connected", False)]
    if cdn:
        raise ValueError(f"plotly renderer(s) {cdn} load plotly.js from a CDN; kaviz works offline: use "
                         f"{DEFAULT_RENDERER!r} (JupyterLab) or 'plotly_mimetype+notebook' (HTML reports)")
    for p in parts:
        r = pio.renderers[p]
        if hasattr(r, "config"):
            r.config = {**(r.config or {}), **PLOTLY_CONFIG}
    pio.renderers.default = name
    return name


def show_table(df, decimals: int = 3):
    """A results table rounded for display and for nbval's comparison (numbers printed this way are
    what the stored notebook and a fresh run are compared on)."""
    return df.round(decimals)
