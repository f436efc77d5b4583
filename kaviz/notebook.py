"""The set-up cell every notebook runs: seeds, threads, quiet warnings, figure rendering.

``kaviz.notebook.setup(seed=0, threads=2)`` is all a notebook needs. It returns the device to use.
"""
from __future__ import annotations

import os
import warnings

__all__ = ["setup", "show_table"]


def setup(seed: int = 0, threads: int | None = 2, device: str | None = "auto", renderer: str | None = None):
    """Seed everything, fix the thread count (results are bit-identical for a given seed and thread
    count), silence known-noisy warnings, and pick a plotly renderer that works in JupyterLab and in
    exported HTML (``$KAVIZ_PLOTLY_RENDERER`` or ``renderer`` overrides it)."""
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
        import plotly.io as pio

        pio.renderers.default = renderer or os.environ.get("KAVIZ_PLOTLY_RENDERER",
                                                           "plotly_mimetype+notebook_connected")
    except ImportError:  # pragma: no cover
        pass
    return default_device(device)


def show_table(df, decimals: int = 3):
    """A results table rounded for display and for nbval's comparison (numbers printed this way are
    what the stored notebook and a fresh run are compared on)."""
    return df.round(decimals)
