"""The zoo: pretrained CPU backbones, kaviz's analogue of the papers' ImageNet initialisation.

The papers' students and teachers start from ImageNet weights; nothing can be downloaded here, so
kaviz ships its own: every entry is one of kaviz's small architectures (with given arguments)
trained on the *pretraining world* of the synthetic generator
(:func:`kaviz.data.synthetic.pretraining` -- outlines disjoint from every notebook's classes -- or
:func:`kaviz.data.synthetic.pretraining_scenes` for the encoder-decoders) until its validation
accuracy stopped improving. ``kaviz.models.build(name, num_classes, pretrained=True, **kwargs)``
loads the entry of ``(name, kwargs)``; the classifier (or the 1x1 head of a dense net) is left
freshly initialised when ``num_classes`` differs, as after an ImageNet initialisation.

The weights ship as package data (``kaviz/models/pretrained/``): a state dict per entry, loaded
with ``torch.load(weights_only=True)`` after its SHA-256 is checked against ``manifest.json``,
which also holds the recipe (data, optimiser, epochs, early stopping, seed), the result (best
epoch, validation accuracy), the wall time and the floating-point path it was built on. ``sha256`` is
the file's (checked before loading: integrity); ``weights_sha256`` is
:func:`kaviz.models.weights_hash` of the weights themselves (the file's bytes also hold a random
serialization id, so two saves of the same weights differ; reproducibility compares this one).
``scripts/build_zoo.py`` (re)builds entries with :func:`kaviz.pretrain.build_entry`; the same recipe on the same
floating-point path (``make``'s pinned AVX2 path, one thread) gives the same weights
(``tests/test_zoo.py`` rebuilds the smallest entry and compares ``weights_sha256``).
"""
from __future__ import annotations

import hashlib
import inspect
import json
from pathlib import Path

import torch

__all__ = [
    "ZOO_DIR",
    "ZooError",
    "manifest",
    "entries",
    "find_entry",
    "entry_name",
    "load_pretrained",
    "full_kwargs",
    "head_name",
    "MANIFEST",
    "file_sha256",
    "key_part",
]

#: Folder of the shipped weights and their manifest (package data).
ZOO_DIR = Path(__file__).with_name("pretrained")
MANIFEST = "manifest.json"
FORMAT = 1


class ZooError(ValueError):
    """A zoo entry is missing, does not fit, or its file fails its check."""


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def manifest(zoo_dir=None) -> dict:
    """The manifest of ``zoo_dir`` (default: the shipped zoo) as a dict ``{"format", "entries"}``."""
    path = Path(zoo_dir or ZOO_DIR) / MANIFEST
    if not path.exists():
        return {"format": FORMAT, "entries": {}}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ZooError(f"the zoo manifest {path} is not valid JSON ({e}); rebuild it with "
                       "scripts/build_zoo.py") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("entries"), dict):
        raise ZooError(f"the zoo manifest {path} is not a kaviz zoo manifest of format {FORMAT}")
    return data


def entries(zoo_dir=None):
    """One row per entry: name, architecture, arguments, classes it was trained on, result, size."""
    import pandas as pd

    rows = []
    for name, e in manifest(zoo_dir)["entries"].items():
        rows.append({"entry": name, "arch": e["arch"], "kwargs": json.dumps(e["kwargs"], sort_keys=True),
                     "pretrained on": e["recipe"]["data"].rsplit(".", 1)[-1],
                     "classes": e["num_classes"], "parameters": e["parameters"],
                     "val accuracy": e["result"].get("val_accuracy"), "best epoch": e["result"].get("best_epoch"),
                     "epochs run": e["result"].get("epochs_run"), "build seconds": e["result"].get("seconds"),
                     "kB": round(e["bytes"] / 1024)})
    return pd.DataFrame(rows)


def full_kwargs(arch: str, kwargs: dict) -> dict:
    """``kwargs`` with the builder's defaults filled in, JSON-normalised (tuples become lists)."""
    from . import available, builder

    if arch not in available(torchvision=False):
        raise ZooError(f"the zoo holds kaviz's small architectures only; {arch!r} is not one "
                       f"({available(torchvision=False)}). For a torchvision network pass weights_path= to a local "
                       "state dict.")
    sig = inspect.signature(builder(arch))
    try:
        bound = sig.bind_partial(**kwargs)
    except TypeError as e:
        raise ZooError(f"{arch}: {e}") from None
    full = {}
    for p in sig.parameters.values():
        if p.name == "num_classes" or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            continue
        value = bound.arguments.get(p.name, p.default)
        if value is inspect.Parameter.empty:
            raise ZooError(f"{arch}: argument {p.name!r} has no default; pass it")
        full[p.name] = value
    return json.loads(json.dumps(full))


def entry_name(arch: str, kwargs: dict) -> str:
    """The entry name of ``(arch, kwargs)``: the architecture, then the arguments that differ from its defaults."""
    full = full_kwargs(arch, kwargs)
    default = full_kwargs(arch, {})
    parts = [arch]
    for k in sorted(full):
        if full[k] != default[k]:
            v = full[k]
            v = "x".join(str(x) for x in v) if isinstance(v, list) else str(v)
            parts.append(f"{k}={v}")
    return "-".join(parts)


def find_entry(arch: str, kwargs: dict | None = None, zoo_dir=None) -> tuple[str, dict]:
    """The entry for ``arch`` built with ``kwargs`` (defaults filled in); :class:`ZooError` naming the
    entries that exist for ``arch`` and how to build the missing one when there is none."""
    kwargs = dict(kwargs or {})
    full = full_kwargs(arch, kwargs)
    man = manifest(zoo_dir)["entries"]
    for name, e in man.items():
        if e["arch"] == arch and e["kwargs"] == full:
            return name, e
    same = [f"{n} ({json.dumps(e['kwargs'], sort_keys=True)})" for n, e in man.items() if e["arch"] == arch]
    have = "; ".join(same) if same else "none"
    raise ZooError(
        f"no pretrained {arch} with arguments {json.dumps(full, sort_keys=True)} in the zoo. "
        f"Entries for {arch}: {have}. "
        f"Build one with: python scripts/build_zoo.py --arch {arch} --kwargs '{json.dumps(kwargs, sort_keys=True)}'"
        + (" --out <folder> (then pass zoo_dir=<folder>)" if zoo_dir is None else f" --out {zoo_dir}"))


def load_pretrained(model: torch.nn.Module, arch: str, kwargs: dict | None = None, *, zoo_dir=None) -> torch.nn.Module:
    """Load the zoo entry of ``(arch, kwargs)`` into ``model`` after checking its SHA-256.

    The head is left as built when its shape differs (another number of classes); which entry was
    loaded, and whether the head was kept, is recorded in ``model.kaviz_spec["pretrained"]``.
    """
    from . import load_state, spec

    name, e = find_entry(arch, kwargs, zoo_dir)
    path = Path(zoo_dir or ZOO_DIR) / e["file"]
    if not path.exists():
        raise ZooError(f"zoo entry {name!r}: its weights file {path} is missing; reinstall kaviz or rebuild it "
                       f"with scripts/build_zoo.py")
    digest = file_sha256(path)
    if digest != e["sha256"]:
        raise ZooError(f"zoo entry {name!r}: {path} has SHA-256 {digest[:16]}..., the manifest says "
                       f"{e['sha256'][:16]}...; the file is corrupt or was replaced. Reinstall kaviz or rebuild "
                       "the entry with scripts/build_zoo.py")
    state = torch.load(path, map_location="cpu", weights_only=True)
    head = head_name(model)
    own = model.state_dict()
    reinit = [k for k in state if head and k.startswith(head + ".") and k in own and own[k].shape != state[k].shape]
    for k in reinit:  # another number of classes: keep the freshly built head, as after ImageNet weights
        state[k] = own[k]
    load_state(model, state, source=f"zoo entry {name!r}")
    model.kaviz_spec = {**spec(model), "pretrained": {"entry": name, "sha256": e["sha256"],
                                 "head": f"reinitialised (pretrained on {e['num_classes']} classes)" if reinit
                                 else "pretrained"}}
    return model


def head_name(model) -> str | None:
    """The layer whose shape depends on the number of classes: the classifier, or a dense net's 1x1 head."""
    from . import classifier_name

    if hasattr(model, "out_channels") and isinstance(getattr(model, "head", None), torch.nn.Conv2d):
        return "head"
    try:
        return classifier_name(model)
    except ValueError:
        return None


def key_part(arch: str, build_kwargs: dict) -> str | None:
    """For cache keys: the SHA-256 of the zoo entry that ``build(arch, k, **build_kwargs)`` loads (None
    without ``pretrained=True``), so that a rebuilt entry never reuses what was trained from the old one."""
    if not build_kwargs.get("pretrained"):
        return None
    kwargs = {k: v for k, v in build_kwargs.items() if k not in ("pretrained", "zoo_dir")}
    return find_entry(arch, kwargs, build_kwargs.get("zoo_dir"))[1]["sha256"]
