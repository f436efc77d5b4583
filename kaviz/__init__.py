"""kaviz — see what a student learned from its teachers.

Importing kaviz is cheap: torch is imported, but scikit-learn, umap, openTSNE and plotly are only
imported by the modules that need them, when they need them.
"""
from __future__ import annotations

import os
import random

__version__ = "0.1.0"
__all__ = ["seed_everything", "default_device", "expect", "__version__"]

_SUBMODULES = ("data", "models", "features", "train", "losses", "metrics", "methods", "embed", "plots",
               "widgets", "notebook", "report", "analysis", "runs", "cache", "runner", "compare", "stats", "pretrain")


def __getattr__(name):
    # `kaviz.train`, `kaviz.plots`, ... import on first use, so `import kaviz` stays cheap
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'kaviz' has no attribute {name!r}")


def seed_everything(seed: int, threads: int | None = None):
    """Seed Python, NumPy and torch (and fix torch's thread count if ``threads`` is given).

    Returns a ``torch.Generator`` seeded with ``seed``, for DataLoader shuffling. With the same seed
    and thread count, kaviz's training and extraction are bit-identical from run to run.
    """
    import numpy as np
    import torch

    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(int(threads))
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def default_device(device: str | None = None):
    """``"auto"``/None picks CUDA when available, else CPU; anything else is passed to torch.device."""
    import torch

    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def expect(name, value, stored=None, tol=None, **kwargs):
    """``kaviz.report.expect``: check a trained number against its stored run within a measured band
    (prints one machine-independent line; outside it raises ``kaviz.report.ExpectationError`` in a
    regression run, ``CI`` set, and warns in a reader's kernel: ``kaviz.report.strict``)."""
    from .report import expect as _expect

    return _expect(name, value, stored, tol, **kwargs)
