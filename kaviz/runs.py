"""A registry of trained networks: save a student or teacher once, load it by name anywhere.

``register("cfl-student-seed0", model, arch="cifar_resnet14", num_classes=10, paper="cfl",
method="CFL", seed=0)`` writes the model's state dict (atomically, ``torch.save`` of tensors only) and a
JSON record under ``kaviz.train.cache_dir("runs")``; ``list()`` shows every run as a DataFrame and
``load(name)`` rebuilds the architecture with :func:`kaviz.models.build` and loads the weights with
``torch.load(weights_only=True)`` — no pickled objects are ever read. torchvision models register the
same way (``arch="resnet18"``), and a checkpoint file of your own through :func:`register_checkpoint`.

Layout: ``<cache>/runs/<name>/weights.pt`` and ``<cache>/runs/<name>/run.json``; the record holds the
weights' SHA-1 (:func:`kaviz.models.weights_hash`), checked on every load.

:func:`ensure` obtains a run by name, training it through the library only when it is absent or was
made by other settings or on another floating-point path (its record keeps a key of the recipe, the
data and :func:`kaviz.cache.environment_key`, like the teacher cache), so a notebook can ask for
another notebook's student and get the very network that notebook trained, or train it on the spot.

Students whose head was changed by a method — an LSHFM student after
:func:`kaviz.methods.lshfm.adapt` (``kaviz_spec["adaptation"]``) — register like any other: the record
keeps the change and :func:`load` re-applies it to the rebuilt architecture before loading the weights.
The registry sits beside :mod:`kaviz.analysis` in the layering (it may import a method's module lazily,
only to re-apply such a change).
"""
from __future__ import annotations

import builtins
import datetime
import difflib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

__all__ = ["register", "register_checkpoint", "ensure", "run_key", "build_from_record", "list", "load", "info",
           "remove", "exists", "RunNotFoundError", "ADAPTERS", "BUILDERS"]

WEIGHTS = "weights.pt"
RECORD = "run.json"
FORMAT = "kaviz-run-2"  # 2: weights_sha256 (1 held a SHA-1)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")
COLUMNS = ["name", "paper", "method", "arch", "seed", "data", "metrics"]



def _lshfm_adaptation(model: nn.Module, value) -> None:
    from .methods.lshfm import adapt  # lazily: only a run that records this change needs the method

    classifier, feature_dim = value
    adapt(model, int(feature_dim), classifier=classifier)


#: Changes a method makes to a built architecture, re-applied by :func:`load`: the key in the model's
#: ``kaviz_spec`` → ``function(model, value)`` (the value as stored in the spec).
ADAPTERS = {"adaptation": _lshfm_adaptation}


def _multihead(arch: str, num_classes: int, arch_kwargs: Mapping) -> nn.Module:
    from .methods.customize import MultiHead  # lazily: only a run of this kind needs the method

    kw = dict(arch_kwargs)
    heads, n_way = kw.pop("heads"), kw.pop("n_way", num_classes)
    return MultiHead(arch.partition(":")[2], heads, n_way=n_way, **kw)


#: Networks a method builds around a kaviz architecture (their ``kaviz_spec`` name is ``"<kind>:<arch>"``),
#: rebuilt by :func:`load`: ``kind`` → ``function(arch, num_classes, arch_kwargs)`` (e.g. the multi-head
#: networks of :mod:`kaviz.methods.customize`, ``"multihead:resnet18"``).
BUILDERS = {"multihead": _multihead}


class RunNotFoundError(KeyError, FileNotFoundError):
    """No run of that name is registered (the message suggests close names)."""

    def __str__(self):
        return str(self.args[0]) if self.args else ""


def _root() -> Path:
    from .train import cache_dir

    return cache_dir("runs")


def _check_name(name) -> str:
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise ValueError(
            f"run name {name!r} is not allowed: use 1-128 letters, digits, '.', '_', '+' or '-', starting with a "
            "letter or digit and without '..' (it names a folder under kaviz.train.cache_dir('runs')), "
            "e.g. 'cfl-student-seed0'")
    return name


def _folder(name: str) -> Path:
    return _root() / _check_name(name)


def _names() -> builtins.list[str]:
    root = _root()
    return sorted(p.name for p in root.iterdir() if p.is_dir() and (p / RECORD).exists() and _NAME.match(p.name))


def _missing(name: str) -> RunNotFoundError:
    names = _names()
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    listing = f"kaviz.runs.list() shows all {len(names)}" if names else "the registry is empty"
    return RunNotFoundError(f"no run named {name!r} in {_root()}.{hint} ({listing}; kaviz.runs.register(name, model, "
                            "...) adds one.)")


def _jsonable(value, what: str):
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as e:
        raise TypeError(f"{what} must be JSON-serialisable (numbers, strings, lists, dicts): {e}") from None


def _data_label(data):
    if data is None or isinstance(data, str):
        return data
    fp = getattr(data, "fingerprint", None)
    name = getattr(data, "name", None) or type(data).__name__
    if isinstance(fp, str):
        return f"{name} ({fp})" if name and name not in fp else fp
    raise TypeError(f"data must be a short description (a string) or a dataset with a .fingerprint, "
                    f"got {type(data).__name__}")


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _adapt(model: nn.Module, adaptations: Mapping) -> nn.Module:
    for kind, value in adaptations.items():
        if kind not in ADAPTERS:
            raise ValueError(f"the run records a change {kind!r} to its architecture that kaviz does not know how to "
                             f"re-apply (known: {sorted(ADAPTERS)}); add it to kaviz.runs.ADAPTERS")
        ADAPTERS[kind](model, value)
    return model


def _build(arch: str, num_classes: int, arch_kwargs: Mapping, adaptations: Mapping) -> nn.Module:
    from .models import build

    kind, sep, _ = arch.partition(":")
    if sep and kind in BUILDERS:
        return _adapt(BUILDERS[kind](arch, num_classes, arch_kwargs), adaptations)
    return _adapt(build(arch, num_classes, **arch_kwargs), adaptations)


def build_from_record(record: Mapping) -> nn.Module:
    """The architecture a run record describes (``arch``, ``num_classes``, ``arch_kwargs``,
    ``adaptations``), freshly initialised (seed first for reproducible weights): e.g. the random-init
    control of a registered network."""
    return _build(record["arch"], record["num_classes"], record.get("arch_kwargs", {}), record.get("adaptations", {}))


def exists(name: str) -> bool:
    """Is a run of this name registered?"""
    return (_folder(name) / RECORD).exists()


def register(name: str, model: nn.Module, *, arch: str | None = None, arch_kwargs: Mapping | None = None,
             num_classes: int | None = None, paper: str = "", method: str = "", seed: int | None = None,
             data=None, metrics: Mapping | None = None, notes: str = "", overwrite: bool = True,
             key: str | None = None) -> dict:
    """Save ``model``'s weights and a record under ``name``; returns the record.

    ``arch``/``num_classes``/``arch_kwargs`` say how :func:`kaviz.models.build` rebuilds it (default:
    the model's own ``kaviz_spec`` when it was built by kaviz); they are checked now, by building the
    architecture and loading the state dict into it, so a run that cannot be loaded is never written.
    ``data`` is a description or a dataset (its fingerprint is kept); ``metrics`` a dict of numbers.
    The weights are written first and the record last, both atomically, so an interrupted register
    leaves no half run. An existing run of that name is replaced (``overwrite=False`` refuses).
    A change a method made to the architecture (a key of :data:`ADAPTERS` in the model's
    ``kaviz_spec``, e.g. LSHFM's adaptation layer) is recorded and re-applied on load. ``key``: what
    :func:`ensure` compares to decide whether the run is current.
    """
    from .models import PROVENANCE_KEYS, load_state, spec, weights_hash

    folder = _folder(name)
    if not isinstance(model, nn.Module):
        raise TypeError(f"register() takes an nn.Module, got {type(model).__name__}; for a checkpoint file use "
                        "kaviz.runs.register_checkpoint(name, path, arch=...)")
    own = spec(model)
    built_by = own.get("name", "").partition(":")[0] if ":" in str(own.get("name", "")) else None
    if built_by in BUILDERS and "num_classes" not in own:  # a method's network: its outputs per head
        own = {**own, "num_classes": int(own.get("n_way", 0))}
    if arch is None:
        if "num_classes" not in own:
            raise ValueError(f"register({name!r}): say which architecture this {type(model).__name__} is, e.g. "
                             "arch='resnet18', num_classes=10 (kaviz.models.available() lists the names; "
                             "@kaviz.models.register adds your own)")
        arch = own["name"]
        if arch_kwargs is None:
            arch_kwargs = {k: v for k, v in own.items()
                           if k not in PROVENANCE_KEYS and k not in ADAPTERS}
    adaptations = _jsonable({k: own[k] for k in ADAPTERS if k in own}, "the model's adaptations")
    if num_classes is None:
        if "num_classes" not in own:
            raise ValueError(f"register({name!r}): pass num_classes= (the size of the model's output)")
        num_classes = own["num_classes"]
    arch_kwargs = _jsonable(dict(arch_kwargs or {}), "arch_kwargs")
    metrics = _jsonable(dict(metrics or {}), "metrics")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"seed must be an int or None, got {seed!r}")
    if not overwrite and exists(name):
        raise FileExistsError(f"a run named {name!r} already exists ({folder}); pass overwrite=True to replace it, "
                              "or kaviz.runs.remove(name)")
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    # prove now that load() will work: build the architecture and load the weights into it
    probe = _build(arch, num_classes, arch_kwargs, adaptations)
    load_state(probe, state, source=f"the weights of run {name!r}")
    record = {
        "format": FORMAT,
        "name": name,
        "paper": str(paper),
        "method": str(method),
        "arch": arch,
        "arch_kwargs": arch_kwargs,
        "adaptations": adaptations,
        "num_classes": int(num_classes),
        "seed": seed,
        "data": _data_label(data),
        "metrics": metrics,
        "notes": str(notes),
        "key": key,
        "weights_sha256": weights_hash(probe),
        "params": sum(int(v.numel()) for v in state.values()),
        "registered": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__.split("+")[0],
    }
    from .train import save_atomic

    folder.mkdir(parents=True, exist_ok=True)
    if (folder / RECORD).exists():
        (folder / RECORD).unlink()  # the folder is a complete run only once the new record is written
    save_atomic(state, folder / WEIGHTS)
    _write_json(folder / RECORD, record)
    return record


def register_checkpoint(name: str, path, arch: str, *, num_classes: int, arch_kwargs: Mapping | None = None,
                        **fields) -> dict:
    """Register a weights file of your own: a state dict (or a kaviz checkpoint, whose ``"model"`` entry
    is used) read with ``torch.load(weights_only=True)``, for the architecture ``arch`` (any name of
    :func:`kaviz.models.available`). The other keywords are those of :func:`register`."""
    from .models import build, load_weights

    _check_name(name)
    model = build(arch, num_classes, **dict(arch_kwargs or {}))
    load_weights(model, path)
    return register(name, model, arch=arch, arch_kwargs=arch_kwargs, num_classes=num_classes, **fields)


def info(name: str) -> dict:
    """The JSON record of a run."""
    file = _folder(name) / RECORD
    if not file.exists():
        raise _missing(name)
    return json.loads(file.read_text())


def load(name: str, *, device=None, eval: bool = True) -> nn.Module:
    """Rebuild the run's architecture (:func:`kaviz.models.build`) and load its weights
    (``weights_only=True``), checking them against the SHA-256 in the record. The model comes back in
    eval mode (``eval=False``: as built) on ``device`` (default CPU), with the record in ``model.kaviz_run``."""
    from .models import load_state, weights_hash
    from .train import load_checkpoint

    record = info(name)
    folder = _folder(name)
    if not (folder / WEIGHTS).exists():
        raise FileNotFoundError(f"run {name!r} has a record but no weights file {folder / WEIGHTS}; register it again")
    model = build_from_record(record)
    load_state(model, load_checkpoint(folder / WEIGHTS), source=f"run {name!r} ({folder / WEIGHTS})")
    if "weights_sha256" not in record:
        raise ValueError(f"run {name!r} ({folder}) was registered by an older kaviz (its record holds a SHA-1, not the "
                         "SHA-256 kaviz now checks weights against); register the run again")
    if weights_hash(model) != record["weights_sha256"]:
        raise ValueError(f"the weights of run {name!r} ({folder / WEIGHTS}) do not match its record (the file was "
                         "changed after registering); register the run again")
    model.kaviz_run = record
    if device is not None:
        from . import default_device

        model.to(default_device(device))
    if eval:
        model.eval()
    return model


def run_key(name: str, recipe=None, *, device=None) -> str:
    """The key :func:`ensure` stores for run ``name`` made by ``recipe`` (anything JSON-able that
    determines the weights) on this floating-point path (:func:`kaviz.cache.environment_key` of
    ``device``): register a network trained elsewhere with ``key=run_key(name, recipe)`` and
    ``ensure(name, ..., key=recipe)`` loads it instead of training it."""
    from .cache import key as cache_key

    return cache_key("run", device=device, name=_check_name(name), recipe=recipe)


def ensure(name: str, train_fn, *, key=None, device=None, **fields) -> nn.Module:
    """The run ``name``, trained first when needed: returns :func:`load` ``(name)``.

    When the run is absent, or its record's key differs from this call's, ``train_fn()`` is called —
    it returns the trained model, or ``(model, metrics)`` with a dict of numbers — and the result is
    registered under ``name`` with ``fields`` (``paper=``, ``method=``, ``seed=``, ``data=``,
    ``arch=``, ... as for :func:`register`). ``key``: anything JSON-able that determines the
    weights (the recipe's settings, the data's fingerprint); the stored key also holds
    :func:`kaviz.cache.environment_key`, so a run made on another floating-point path or with another
    thread count is retrained rather than reused (as the teacher cache does). ``train_fn`` should
    train through the library (its trainers cache teachers), so a second ``ensure`` with an empty
    registry but a warm teacher cache is fast.
    """
    _check_name(name)
    if not callable(train_fn):
        raise TypeError(f"ensure({name!r}, train_fn): train_fn must be a function that trains and returns the model "
                        f"(or (model, metrics)), got {type(train_fn).__name__}")
    full = run_key(name, key, device=device)
    if exists(name) and info(name).get("key") == full:
        try:
            return load(name, device=device)
        except (ValueError, FileNotFoundError, RuntimeError) as e:  # a damaged run: train it again
            import warnings

            warnings.warn(f"run {name!r} could not be loaded ({e}); training it again", stacklevel=2)
    out = train_fn()
    model, metrics = (out if isinstance(out, tuple) else (out, fields.pop("metrics", None)))
    if not isinstance(model, nn.Module):
        raise TypeError(f"ensure({name!r}): train_fn returned {type(model).__name__}, not an nn.Module (or a tuple "
                        "(model, metrics))")
    if isinstance(metrics, Mapping):
        fields["metrics"] = {k: float(v) for k, v in metrics.items()}
    register(name, model, key=full, **fields)
    return load(name, device=device)


def remove(name: str) -> None:
    """Delete a run (its record first, so a half-deleted run is never listed)."""
    folder = _folder(name)
    if not (folder / RECORD).exists():
        raise _missing(name)
    (folder / RECORD).unlink()
    shutil.rmtree(folder)


def list(paper: str | None = None, method: str | None = None, *,  # noqa: A001 (kaviz.runs.list() is the API)
         names=None):
    """Every registered run as a DataFrame: name, paper, method, arch, seed, data, metrics (a dict),
    when it was registered and its number of parameters (``params``); ``paper=`` / ``method=`` /
    ``names=`` (a list of run names) filter."""
    import pandas as pd

    rows = []
    wanted = None if names is None else {_check_name(n) for n in names}
    for n in _names():
        if wanted is not None and n not in wanted:
            continue
        try:
            r = info(n)
        except (json.JSONDecodeError, OSError):
            continue  # a record being replaced right now
        if paper is not None and r.get("paper") != paper:
            continue
        if method is not None and r.get("method") != method:
            continue
        rows.append({**{c: r.get(c) for c in COLUMNS}, "registered": r.get("registered"), "params": r.get("params")})
    return pd.DataFrame(rows, columns=COLUMNS + ["registered", "params"])
