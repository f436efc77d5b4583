"""Every paper notebook's real-data switch, end to end (issue 17): each notebook is run headless by
``python -m kaviz run NB -p DATA=... -p <ROOT>=<fixture> -p SMOKE=True --out tmp`` on tiny copies of
the real datasets in their official formats (tests/make_fixtures.py), for every dataset its parameter
cell names, and must end OK. ``SMOKE=True`` shrinks epochs and image counts and skips the checks meant
for the embedded default, but keeps the real loaders, image sizes (or says in the parameter cell why
one is reduced) and the real-data architectures where they fit a CPU.

The smoke runs pass ``max_per_split`` to the methods' loaders (at most 4-16 images per split, 64 for
the multi-label sets; class-balanced and seeded, ``kaviz.data.limit``).

Each case prints the CPU time it used (the runner, its kernel and everything they waited for). Measured
on a shared 2-core machine: 12-20 s of CPU per case, and the three marked ``slow`` 21-33 s (CFL with
ResNets at 112 px, Knowledge Consistency on 60 images, SBM at NYUv2's 288x384; 28-45 s before
``max_per_split``); all 12 cases together about 215 s of CPU. ``-m "not slow"`` leaves the slow ones
out, ``-m "not realdata"`` all of them.
"""
from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
from make_fixtures import build

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"

# (notebook, dataset, parameters): a value "@name" is replaced by the folder of fixture `name`.
CASES = [
    ("getting_started", "cub200", {"DATA": "cub200", "DATA_ROOT": "@cub200"}),
    ("getting_started", "stanford_dogs", {"DATA": "stanford_dogs", "DATA_ROOT": "@stanford_dogs"}),
    ("common_feature_learning", "cub_dogs",
     {"DATA": "cub_dogs", "CUB_ROOT": "@cub200", "DOGS_ROOT": "@stanford_dogs"}),
    ("knowledge_consistency", "cub200", {"DATA": "cub200", "CUB_ROOT": "@cub200"}),
    ("knowledge_consistency", "cub200_15", {"DATA": "cub200", "CUB_ROOT": "@cub200_15"}),
    ("layerwise_amalgamation", "cub200", {"DATA": "cub200", "CUB_ROOT": "@cub200", "IMAGE_SIZE": 64}),
    ("feature_mimicking_lsh", "voc2007", {"DATA": "voc2007", "VOC_ROOT": "@voc2007"}),
    ("feature_mimicking_lsh", "coco2014", {"DATA": "coco2014", "COCO_ROOT": "@coco2014"}),
    ("customize_attributes", "celeba", {"DATA": "celeba", "CELEBA_ROOT": "@celeba"}),
    # NYUv2 in VainF's toolkit layout at the paper's 288x384, and in MTAN's .npy layout at a quarter of the
    # pixels (96x128: the same code path for a third of the CPU time)
    ("student_becoming_the_master", "nyuv2", {"DATA": "nyuv2", "NYU_ROOT": "@nyuv2", "IMAGE_SIZE": (288, 384)}),
    ("student_becoming_the_master", "nyuv2_mtan",
     {"DATA": "nyuv2", "NYU_ROOT": "@nyuv2_mtan", "IMAGE_SIZE": (96, 128)}),
    # CamVid at 96x128 instead of 360x480: at the real size the smoke run takes ~160 s of CPU on its own
    ("recombination", "camvid", {"DATA": "camvid", "CAMVID_ROOT": "@camvid", "IMAGE_SIZE": (96, 128)}),
]

SLOW = {("common_feature_learning", "cub_dogs"), ("student_becoming_the_master", "nyuv2"),
        ("knowledge_consistency", "cub200_15")}
# Failures inside method code (kaviz/methods/**), not fixed here: (reason, text the failure must show).
# Strict xfails: a pass fails the test (remove the entry), and so does a different failure.
XFAIL: dict[tuple[str, str], tuple[str, str]] = {}


class KnownFailure(AssertionError):
    """The failure listed in XFAIL for this case (anything else is a plain test failure)."""


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    return build(tmp_path_factory.mktemp("real_fixtures"))


def _params(case, roots) -> list[str]:
    out = []
    for k, v in {**case, "SMOKE": True}.items():
        if isinstance(v, str) and v.startswith("@"):
            v = str(roots[v[1:]])
        out += ["-p", f"{k}={v}"]
    return out


def _marks(nb, ds):
    marks = [pytest.mark.realdata]
    if (nb, ds) in SLOW:
        marks.append(pytest.mark.slow)
    if (nb, ds) in XFAIL:
        marks.append(pytest.mark.xfail(reason=XFAIL[nb, ds][0], strict=True, raises=KnownFailure))
    return marks


@pytest.mark.parametrize("nb,ds,params", [pytest.param(nb, ds, p, id=f"{nb}-{ds}", marks=_marks(nb, ds))
                                          for nb, ds, p in CASES])
def test_notebook_runs_on_real_format_data(nb, ds, params, fixtures, tmp_path):
    import nbformat

    path = NOTEBOOKS / f"{nb}.ipynb"
    # the notebook's parameter cell names this dataset (a renamed switch must fail here, not silently pass)
    cell = next(c for c in nbformat.read(path, as_version=4).cells if "parameters" in c.metadata.get("tags", []))
    assert f'"{params["DATA"]}"' in cell.source and "SMOKE = False" in cell.source
    env = {**os.environ, "CI": "1", "OMP_WAIT_POLICY": "PASSIVE",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run([sys.executable, "-m", "kaviz", "run", str(path), *_params(params, fixtures),
                           "--out", str(tmp_path), "--timeout", "600"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900, check=False)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    print(f"{nb} on {ds}: {cpu:.1f} s CPU")
    report = proc.stdout.strip().splitlines()
    ok = proc.returncode == 0 and report and report[-1].startswith("ok")
    if not ok and (nb, ds) in XFAIL and XFAIL[nb, ds][1] in proc.stdout:
        raise KnownFailure(f"{nb} on {ds}: {report[-1] if report else proc.stderr[-500:]}")
    assert ok, f"{nb} on {ds} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    assert (tmp_path / f"{nb}.ipynb").is_file() and (tmp_path / f"{nb}.html").is_file()
