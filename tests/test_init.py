import random
import subprocess
import sys

import numpy as np
import pytest
import torch

import kaviz


def test_seed_everything_seeds_all_generators_and_threads():
    g = kaviz.seed_everything(3, threads=1)
    a = (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=g).item())
    g = kaviz.seed_everything(3, threads=1)
    b = (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=g).item())
    assert a == b and torch.get_num_threads() == 1
    with pytest.raises(ValueError, match="seed"):
        kaviz.seed_everything(-1)
    with pytest.raises(ValueError, match="threads"):
        kaviz.seed_everything(0, threads=0)


def test_import_is_light_and_submodules_are_lazy():
    code = ("import json, sys, kaviz; heavy = lambda: [m for m in ('torch', 'sklearn', 'umap', 'plotly', 'openTSNE') "
            "if m in sys.modules]; before = heavy(); kaviz.metrics; print(json.dumps([before, heavy()]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    before, after = __import__("json").loads(out)
    assert before == [], f"import kaviz pulled in {before}"
    assert "torch" in after and "umap" not in after
    with pytest.raises(AttributeError, match="no attribute"):
        _ = kaviz.not_a_module


def test_every_public_module_is_an_attribute_of_kaviz():
    # a notebook writes `kaviz.compare.random_like(...)` after `import kaviz`: every public module of the package
    # must be reachable that way, not only after an explicit `import kaviz.compare` (a notebook once failed on it)
    import pathlib

    root = pathlib.Path(kaviz.__file__).parent
    public = sorted({p.stem for p in root.glob("*.py") if not p.stem.startswith("_")}
                    | {p.name for p in root.iterdir() if (p / "__init__.py").exists() and not p.name.startswith("_")})
    missing = [m for m in public if m not in kaviz._SUBMODULES]
    assert not missing, f"kaviz.__getattr__ does not know {missing}: add them to kaviz._SUBMODULES"
    assert kaviz.compare.random_like.__module__ == "kaviz.compare"


def test_notebook_setup_returns_device_and_sets_renderer():
    import plotly.io as pio

    dev = kaviz.notebook.setup(seed=1, threads=1, device="cpu", renderer="json")
    assert dev == torch.device("cpu") and pio.renderers.default == "json"
    assert kaviz.default_device("auto").type in ("cpu", "cuda")
