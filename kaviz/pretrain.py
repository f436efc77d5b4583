"""Building the zoo's entries (:mod:`kaviz.models.zoo` reads and loads them): train one of kaviz's small
architectures on the synthetic pretraining world by a recipe, with early stopping, and write its weights and
manifest entry. It sits above the training loop and the dense methods (docs/decisions.md, Layering), which
is why it is not part of :mod:`kaviz.models`. ``scripts/build_zoo.py`` and ``make zoo`` call it.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from .models.zoo import MANIFEST, ZooError, entry_name, file_sha256, full_kwargs, manifest

__all__ = ["default_recipe", "build_entry", "fp_path"]



def _is_dense(arch: str) -> bool:
    from .models import family

    return family(arch) == "segnet"


def default_recipe(arch: str) -> dict:
    """The recipe every shipped entry of ``arch`` was built with (scripts/build_zoo.py's default)."""
    common = dict(optimizer="adam", weight_decay=5e-4, seed=0, threads=1, patience=2, min_delta=0.002)
    if _is_dense(arch):
        return dict(data="kaviz.data.synthetic.pretraining_scenes", task="segmentation", n_train=2000, n_val=400,
                    data_seed=9001, size=48, max_objects=4, epochs=40, batch_size=32, lr=2e-3, monitor="val/mIoU",
                    **common)
    return dict(data="kaviz.data.synthetic.pretraining", task="classification", n_train=12000, n_val=2000,
                data_seed=9001, size=32, epochs=15, batch_size=128, lr=2e-3, monitor="val/accuracy", **common)


def _data(recipe: dict):
    from .data import synthetic

    fn = getattr(synthetic, recipe["data"].rsplit(".", 1)[-1])
    extra = {"max_objects": recipe["max_objects"]} if "max_objects" in recipe else {}
    train = fn(recipe["n_train"], seed=recipe["data_seed"], size=recipe["size"], **extra)
    val = fn(recipe["n_val"], seed=recipe["data_seed"] + 1, size=recipe["size"], **extra)
    return train, val


def fp_path() -> dict:
    """The floating-point path of this process: torch version, CPU capability, the pins, the thread count."""
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "ATEN_CPU_CAPABILITY": os.environ.get("ATEN_CPU_CAPABILITY"),
            "ONEDNN_MAX_CPU_ISA": os.environ.get("ONEDNN_MAX_CPU_ISA"), "MKL_CBWR": os.environ.get("MKL_CBWR"),
            "threads": torch.get_num_threads()}


def build_entry(arch: str, kwargs: dict | None = None, recipe: dict | None = None, *, out_dir,
                progress: bool = False) -> dict:
    """Train ``arch(**kwargs)`` by ``recipe`` (default :func:`default_recipe`) and write its weights and
    manifest entry into ``out_dir`` (the manifest there is updated atomically). Returns the entry."""
    from .models import build, param_count, weights_hash
    from .train import Supervised, fit

    kwargs = dict(kwargs or {})
    recipe = dict(default_recipe(arch) if recipe is None else recipe)
    missing = set(default_recipe(arch)) - set(recipe)
    if missing:
        raise ZooError(f"recipe lacks {sorted(missing)}; start from kaviz.pretrain.default_recipe({arch!r})")
    name = entry_name(arch, kwargs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(int(recipe["threads"]))
    t0 = time.perf_counter()
    try:
        train, val = _data(recipe)
        k = (len(train.classes) + 1) if recipe["task"] == "segmentation" else len(train.classes)
        torch.manual_seed(recipe["seed"])
        model = build(arch, k, **kwargs)
        if recipe["task"] == "segmentation":
            from .methods.dense import DenseSupervised

            method = DenseSupervised(model, task="segmentation")
        else:
            method = Supervised(model)
        monitor = recipe["monitor"]
        hist = fit(method, train, val, epochs=recipe["epochs"], batch_size=recipe["batch_size"], lr=recipe["lr"],
                   optimizer=recipe["optimizer"], weight_decay=recipe["weight_decay"], seed=recipe["seed"],
                   monitor=monitor, patience=recipe["patience"], min_delta=recipe["min_delta"], progress=progress)
        fp = fp_path()
    finally:
        torch.set_num_threads(threads)
    seconds = time.perf_counter() - t0
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    path = out_dir / f"{name}.pt"
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    best = int(hist.attrs["best_epoch"])
    entry = {
        "arch": arch, "kwargs": full_kwargs(arch, kwargs), "num_classes": k, "classes": list(train.classes),
        "file": path.name, "sha256": file_sha256(path), "bytes": path.stat().st_size,
        "weights_sha256": weights_hash(model),
        "parameters": param_count(model),
        "recipe": recipe,
        "result": {"monitor": monitor, "best_epoch": best, "val_accuracy": float(hist.attrs["best_value"]),
                   "epochs_run": len(hist), "stopped_epoch": hist.attrs.get("stopped_epoch"),
                   "seconds": round(seconds, 1),
                   "val_curve": [round(float(v), 4) for v in hist[monitor]]},
        "built": {**fp, "date": time.strftime("%Y-%m-%d")},
    }
    _update_manifest(out_dir, name, entry)
    return entry


def _update_manifest(out_dir: Path, name: str, entry: dict) -> None:
    man = manifest(out_dir)
    man["entries"][name] = entry
    man["entries"] = dict(sorted(man["entries"].items()))
    path = out_dir / MANIFEST
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(man, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)
