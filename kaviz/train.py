"""One training loop for every method.

A *method* is an ``nn.Module`` whose ``forward(batch)`` returns a dict of named loss terms
(``{"kd": ..., "mmd": ..., "recon": ...}``). :func:`fit` sums them with weights, logs every term,
evaluates on the validation split every epoch (the method's own ``evaluate(data) -> dict`` when it
has one, plus the validation loss terms), keeps the best epoch on validation, writes an atomic
checkpoint every epoch (``resume=True`` continues bit-exactly), and returns the history as a pandas
DataFrame (one row per epoch).

Teachers inside a method are wrapped with :func:`freeze`: eval mode whatever ``.train()`` is
called, no gradients, forwards under ``torch.no_grad()``, and left out of checkpoints.
"""
from __future__ import annotations

import json
import math
import os
import random
import time
import warnings
from pathlib import Path
from typing import Callable, Iterable, Mapping

import numpy as np
import torch
from torch import nn

from .cache import (
    Cache,
    cache_dir,
    clean_stale_tmp,
    data_key,
    get_or_compute,
    write_atomic,
)
from .cache import key as cache_key
from .features import amp_dtype, autocast, loader_options, to_device  # to_device: kaviz.train.to_device too

__all__ = [
    "fit",
    "freeze",
    "unfrozen",
    "Frozen",
    "Supervised",
    "train_teacher",
    "NonFiniteLossError",
    "CheckpointMismatchError",
    "CorruptCheckpointError",
    "cache_dir",
    "save_atomic",
    "load_checkpoint",
    "to_device",
    "summarize",
]

CHECKPOINT_FORMAT = "kaviz-checkpoint-1"
# Part of every cached teacher's key: bump it when a change to the loop changes what training
# produces (2: the per-epoch permutation comes from a DistributedSampler), so stale teachers are
# never reused.
LOOP_VERSION = 2


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or infinite; the message names the epoch, the step and the term."""


class CheckpointMismatchError(ValueError):
    """A checkpoint was written by a different method/architecture or different training settings."""


class CorruptCheckpointError(ValueError):
    """A checkpoint file is truncated, damaged or not a kaviz checkpoint; the message names it."""


# ------------------------------------------------------------------------------------------ frozen
class Frozen(nn.Module):
    """A frozen teacher: always in eval mode, ``requires_grad=False``, forward under ``no_grad``.

    ``.train()`` on an enclosing method does not switch it to training mode (batch-norm statistics
    and dropout stay as the teacher was trained). Its weights are not written to checkpoints.
    """

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module
        module.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True):
        return super().train(False)

    def forward(self, *args, **kwargs):
        with torch.no_grad():
            return self.module(*args, **kwargs)


def freeze(module: nn.Module) -> Frozen:
    """Wrap a teacher so that it stays frozen inside a method (see :class:`Frozen`)."""
    if isinstance(module, Frozen):
        return module
    return Frozen(module)


def unfrozen(module: nn.Module) -> nn.Module:
    """The network inside a :class:`Frozen` wrapper (hooks and layer names refer to it), or ``module`` itself."""
    return module.module if isinstance(module, Frozen) else module


def _frozen_prefixes(method: nn.Module) -> list[str]:
    return [name + "." if name else "" for name, m in method.named_modules() if isinstance(m, Frozen)]


def trainable_state(method: nn.Module) -> dict:
    """The method's state dict without the frozen teachers' tensors."""
    prefixes = _frozen_prefixes(method)
    return {k: v for k, v in method.state_dict().items() if not any(k.startswith(p) for p in prefixes)}


def load_trainable_state(method: nn.Module, state: dict, source: str = "checkpoint") -> None:
    from .models import load_state

    prefixes = _frozen_prefixes(method)
    own = {k for k in method.state_dict() if not any(k.startswith(p) for p in prefixes)}
    missing = sorted(own - set(state))
    unexpected = sorted(set(state) - own)
    if missing or unexpected:
        raise CheckpointMismatchError(
            f"{source} does not fit this {type(method).__name__}: "
            + (f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}; " if missing else "")
            + (f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}; " if unexpected else "")
            + "it was written for another method or architecture. Use another checkpoint_dir, or resume=False."
        )
    load_state(method, state, strict=False, source=source)


# ------------------------------------------------------------------------------------------- utils
def save_atomic(obj, path) -> None:
    """``torch.save`` to a unique temporary file in the same folder, then ``os.replace``
    (:func:`kaviz.cache.write_atomic`): a crash never leaves a half-written file under ``path``, and a
    full disk raises :class:`kaviz.cache.DiskFullError` naming the folder and the bytes needed."""
    write_atomic(path, lambda f: torch.save(obj, f))


def load_checkpoint(path) -> dict:
    """Read a kaviz checkpoint safely (``weights_only=True``: tensors and plain containers only).
    A truncated or damaged file raises :class:`CorruptCheckpointError` naming it."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CorruptCheckpointError(
            f"{path} is corrupt or not a kaviz checkpoint ({type(exc).__name__}: "
            f"{str(exc).strip()[:300] or 'no detail'}). "
            "Delete it to start that run over, or use another checkpoint_dir or resume=False."
        ) from exc
    if not isinstance(ck, dict):
        raise CorruptCheckpointError(f"{path} holds a {type(ck).__name__}, not a kaviz checkpoint (a dict); delete it "
                                     "or use another checkpoint_dir")
    return ck


def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------- optimisers
def _make_optimizer(kind, groups, lr, weight_decay, momentum):
    if callable(kind):
        return kind(groups)
    if kind == "adam":
        return torch.optim.Adam(groups, lr=lr, weight_decay=weight_decay)
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be 'adam', 'adamw', 'sgd' or a callable(param_groups) -> Optimizer, got {kind!r}")


def _make_schedule(kind, optimizer, epochs, steps_per_epoch):
    """Returns (scheduler or None, 'epoch' | 'step').

    ``step``: ×0.1 at half of the epochs (per epoch); ``cosine``: cosine decay to 0 per iteration;
    ``loglinear``: log-linear decay of every group's lr by 100× over the epochs (per epoch;
    Knowledge Consistency uses 1e-4 → 1e-6); or a callable(optimizer, epochs, steps_per_epoch)
    returning (scheduler, 'epoch' | 'step').
    """
    if kind is None:
        return None, "epoch"
    if callable(kind):
        sched, unit = kind(optimizer, epochs, steps_per_epoch)
        if unit not in ("epoch", "step"):
            raise ValueError("a schedule callable must return (scheduler, 'epoch' | 'step')")
        return sched, unit
    LambdaLR = torch.optim.lr_scheduler.LambdaLR
    if kind == "step":
        mid = max(1, epochs // 2)
        return LambdaLR(optimizer, lambda e: 0.1 if e >= mid else 1.0), "epoch"
    if kind == "cosine":
        total = max(1, epochs * steps_per_epoch)
        return LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total))), "step"
    if kind == "loglinear":
        span = max(1, epochs - 1)
        return LambdaLR(optimizer, lambda e: 10 ** (-2 * min(e, span) / span)), "epoch"
    raise ValueError(f"schedule must be None, 'step', 'cosine', 'loglinear' or a callable, got {kind!r}")


def _param_groups(method: nn.Module, lr: float):
    if hasattr(method, "param_groups"):
        groups = list(method.param_groups(lr))
    else:
        groups = [{"params": [p for p in method.parameters() if p.requires_grad]}]
    for g in groups:
        g["params"] = [p for p in g["params"] if p.requires_grad]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError(f"{type(method).__name__} has no trainable parameters (all frozen?)")
    return groups


# ------------------------------------------------------------------------------------------- loop
def _make_loader(data, batch_size, shuffle, generator, drop_last, opts: Mapping, collate_fn):
    """A DataLoader over ``data`` (``opts``: num_workers, pin_memory, persistent_workers); a DataLoader
    passed in is used as it is."""
    from torch.utils.data import DataLoader

    if isinstance(data, DataLoader):
        return data
    return DataLoader(data, batch_size=batch_size, shuffle=shuffle, generator=generator, drop_last=drop_last,
                      collate_fn=collate_fn, **opts)


def _distributed() -> tuple[int, int]:
    """(world size, rank) when torch.distributed is initialised (e.g. under torchrun), else (1, 0)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _train_loader(data, batch_size, world, rank, seed, drop_last, opts: Mapping, collate_fn):
    """Shuffled batches from a permutation seeded with ``seed·1000003 + epoch``. Under
    torch.distributed each rank takes every world-th sample of that same permutation, so global
    batch k (the union of the ranks' k-th batches) is exactly one process's batch k.
    A DataLoader passed by the caller is used as it is (one process only)."""
    from torch.utils.data import DataLoader, DistributedSampler

    if isinstance(data, DataLoader):
        if world > 1:
            raise ValueError("under torch.distributed, pass a Dataset (kaviz builds the distributed loader)")
        return data, None
    if batch_size % world:
        raise ValueError(f"batch_size is the global batch: {batch_size} must be divisible by the world size {world}")
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=seed * 1_000_003,
                                 drop_last=True)
    loader = DataLoader(data, batch_size=batch_size // world, sampler=sampler, drop_last=drop_last,
                        collate_fn=collate_fn, **opts)
    return loader, sampler


def _ddp_wrap(method, device):
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    # methods may leave parameters unused in a step (a term with weight 0, a frozen branch)
    return DistributedDataParallel(method, device_ids=ids, find_unused_parameters=True)


def _all_finite(loss, world) -> bool:
    ok = torch.isfinite(loss.detach()).to(torch.int32)
    if world > 1:  # one rank's NaN stops every rank (none would wait forever in the next all-reduce)
        torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
    return bool(ok)


def _reduce_sums(total_sum, count, sums):
    keys = sorted(sums)
    vec = torch.tensor([total_sum, float(count)] + [float(sums[k]) for k in keys], dtype=torch.float64)
    torch.distributed.all_reduce(vec)
    return float(vec[0]), int(vec[1]), {k: vec[2 + i] for i, k in enumerate(keys)}


def _weighted_total(terms: Mapping[str, torch.Tensor], weights: Mapping[str, float]) -> torch.Tensor:
    total = None
    for k, v in terms.items():
        w = weights.get(k, 1.0)
        if w == 0:
            continue
        total = v * w if total is None else total + v * w
    if total is None:
        raise ValueError("every loss term has weight 0: nothing to optimise")
    return total


def _check_terms(terms, epoch, step):
    if not isinstance(terms, Mapping) or not terms:
        raise TypeError("a method's forward(batch) must return a non-empty dict of named loss terms")
    for k, v in terms.items():
        if not torch.is_tensor(v) or v.dim() != 0:
            raise TypeError(f"loss term {k!r} must be a scalar tensor, got {type(v).__name__} "
                            f"{tuple(v.shape) if torch.is_tensor(v) else ''}")


def _evaluate(method, val_data, batch_size, device, weights, val_losses, collate_fn, *, loader=None,
              amp=None, channels_last: bool = False):
    """The validation row: the loss terms over ``loader`` (built once by fit; else an unshuffled loader of
    ``val_data``) and the method's ``evaluate(val_data)`` metrics, both under autocast when ``amp``."""
    from .features import eval_mode

    row = {}
    with eval_mode(method), torch.no_grad(), autocast(device, amp):
        if val_losses:
            if loader is None:
                loader = _make_loader(val_data, batch_size, False, None, False, {"num_workers": 0}, collate_fn)
            sums: dict[str, float] = {}
            count = 0
            for batch in loader:
                terms = method(to_device(batch, device, channels_last))
                b = _batch_size(batch)
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + float(v) * b
                sums["loss"] = sums.get("loss", 0.0) + float(_weighted_total(terms, weights)) * b
                count += b
            row.update({f"val/{k}": v / max(count, 1) for k, v in sums.items()})
        if hasattr(method, "evaluate"):
            metrics = method.evaluate(val_data)
            row.update({f"val/{k}": float(v) for k, v in metrics.items()})
    return row


def _batch_size(batch) -> int:
    if torch.is_tensor(batch):
        return batch.shape[0]
    if isinstance(batch, Mapping):
        return _batch_size(next(iter(batch.values())))
    if isinstance(batch, (list, tuple)):
        return _batch_size(batch[0])
    return 1


def _data_type(data) -> str | None:
    from torch.utils.data import DataLoader

    if data is None:
        return None
    return "DataLoader" if isinstance(data, DataLoader) else "Dataset"


def _data_identity(data):
    """What identifies the data of a run in its checkpoint: ``kaviz.data.fingerprint`` (of a
    DataLoader's dataset, with its batch size), else the type and length of data that has no
    fingerprint (then other data of the same type and length cannot be told apart)."""
    from torch.utils.data import DataLoader

    if data is None:
        return None
    if isinstance(data, DataLoader):
        inner = _data_identity(data.dataset)
        return f"loader(batch_size={data.batch_size}, drop_last={data.drop_last}):{inner}"
    try:
        return data_key(data)
    except TypeError:
        try:
            n = len(data)
        except TypeError:
            n = None
        return f"unfingerprinted:{type(data).__module__}.{type(data).__qualname__}(len={n})"


def _jsonable(value):
    return json.loads(json.dumps(value, sort_keys=True, default=str))


# ------------------------------------------------------------------------- the steps of fit()
def _check_fit_args(epochs, restore, train_data, val_data) -> None:
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")
    if restore not in ("best", "last"):
        raise ValueError(f"restore must be 'best' or 'last', got {restore!r}")
    if len(train_data) == 0:
        raise ValueError("the training data is empty")
    if val_data is not None and len(val_data) == 0:
        raise ValueError("val_data is empty: pass a non-empty validation split, or val_data=None to train without "
                         "validation (the monitor is then train/loss)")


def _check_early_stopping(patience, min_delta) -> None:
    """``patience``: None, or a positive int (epochs without improvement before stopping); ``min_delta``: a
    finite number >= 0, used only with a patience."""
    if patience is not None and (isinstance(patience, bool) or not isinstance(patience, (int, np.integer))
                                 or patience < 1):
        raise ValueError(f"patience must be None (train all epochs) or a positive int (stop after that many epochs "
                         f"without improvement), got {patience!r}")
    if isinstance(min_delta, bool) or not isinstance(min_delta, (int, float, np.integer, np.floating)) \
            or not math.isfinite(min_delta) or min_delta < 0:
        raise ValueError(f"min_delta must be a finite number >= 0 (the smallest change of the monitored value that "
                         f"counts as an improvement), got {min_delta!r}")
    if patience is None and min_delta != 0:
        raise ValueError(f"min_delta={min_delta!r} only applies to early stopping: pass patience=... too, or leave "
                         "min_delta at 0")


def _epochs_without_improvement(values, mode: str, min_delta: float) -> int:
    """How many of the last ``values`` (the monitored value of each epoch so far) did not improve on the
    reference by more than ``min_delta``. The reference is the first finite value, replaced by each value that
    improves on it by more than ``min_delta`` (so a slow steady improvement still resets the count once it
    adds up to more than ``min_delta``); NaN/inf never improve. A function of the history alone, so a resumed
    run counts exactly as an uninterrupted one."""
    ref, wait = None, 0
    for v in values:
        if math.isfinite(v) and (ref is None or ((v - ref) if mode == "max" else (ref - v)) > min_delta):
            ref, wait = v, 0
        else:
            wait += 1
    return wait


def _run_config(core, train_data, val_data, ckpt_dir, *, epochs, batch_size, lr, optimizer, weight_decay, schedule,
                weights, seed, n_train, grad_clip, momentum, monitor, drop_last, restore, amp=None,
                channels_last=False, patience=None, min_delta=0.0) -> dict:
    """Everything that decides the result of a run, as recorded in ``last.pt`` and compared on resume."""
    config = {
        "method": type(core).__name__, "epochs": epochs, "batch_size": batch_size, "lr": lr,
        "optimizer": optimizer if isinstance(optimizer, str) else getattr(optimizer, "__name__", "callable"),
        "weight_decay": weight_decay,
        "schedule": schedule if (schedule is None or isinstance(schedule, str)) else "callable",
        "weights": weights, "seed": seed, "n_train": n_train,
    }
    if ckpt_dir is not None:
        # what else decides the result of a resumed run (issue 14 #3); only needed with checkpoints
        config.update({
            "train_data": _data_identity(train_data), "val_data": _data_identity(val_data),
            "data_type": _data_type(train_data), "val_data_type": _data_type(val_data),
            "grad_clip": grad_clip, "momentum": momentum,
            "monitor": list(monitor) if isinstance(monitor, tuple) else monitor,
            "drop_last": drop_last, "restore": restore,
        })
    # recorded only when used, so checkpoints written before these options resume as before
    if amp is not None:
        config["amp"] = str(amp).replace("torch.", "")
    if channels_last:
        config["channels_last"] = True
    if patience is not None:  # likewise: early stopping decides the last epoch, so the weights
        config["patience"] = int(patience)
        config["min_delta"] = float(min_delta)
    return config


def _resume(ckpt_dir: Path, config: dict, schedule, core, opt, sched, scaler=None):
    """Continue from ``ckpt_dir/last.pt``: check that it was written with the same settings and data, then
    load the weights, optimiser, scheduler and RNG states; ``(history, start epoch, best)``, or None when
    there is no ``last.pt`` yet."""
    last = ckpt_dir / "last.pt"
    if not last.exists():
        return None
    ck = load_checkpoint(last)
    if ck.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointMismatchError(f"{last} is not a kaviz checkpoint (format {ck.get('format')!r})")
    missing = [k for k in ("config", "epoch", "model", "optimizer", "rng", "history", "best_epoch", "best_value")
               if k not in ck]
    if missing:
        raise CorruptCheckpointError(f"{last} is incomplete (missing {missing}); delete it to start over, "
                                     "or use another checkpoint_dir or resume=False")
    old = json.loads(ck["config"])
    # more epochs may be appended to a run whose learning rate does not depend on the total
    free = {"epochs"} if schedule is None else set()
    diff = {k: (old.get(k, "<not recorded>"), v) for k, v in config.items()
            if k not in free and old.get(k, "<not recorded>") != _jsonable(v)}
    # settings recorded only when used (amp, channels_last, patience): used by the checkpoint, not by this call
    diff.update({k: (v, "<not used>") for k, v in old.items() if k not in config and k not in free})
    if diff:
        listed = "; ".join(f"{k}: checkpoint {a!r}, this call {b!r}" for k, (a, b) in diff.items())
        raise CheckpointMismatchError(
            f"{last} was written with other settings ({listed}); resuming would "
            "not reproduce a single run. Use the same settings and data, another checkpoint_dir, or "
            "resume=False."
        )
    load_trainable_state(core, ck["model"], source=str(last))
    opt.load_state_dict(ck["optimizer"])
    if sched is not None and ck.get("scheduler") is not None:
        sched.load_state_dict(ck["scheduler"])
    if scaler is not None and ck.get("scaler") is not None:
        scaler.load_state_dict(ck["scaler"])
    _set_rng_state(ck["rng"])
    best = {"epoch": ck["best_epoch"], "value": ck["best_value"], "state": None}
    if (ckpt_dir / "best.pt").exists():
        best["state"] = load_checkpoint(ckpt_dir / "best.pt")["model"]
    return json.loads(ck["history"]), int(ck["epoch"]), best


def _non_finite_error(terms, loss, epoch: int, step: int, ckpt_dir) -> NonFiniteLossError:
    bad = [k for k, v in terms.items() if not torch.isfinite(v)] or ["loss (weighted sum)"]
    saved = f"; the last good checkpoint (epoch {epoch}) in {ckpt_dir} is intact" if (ckpt_dir and epoch > 0) else ""
    restored = (f"the model in memory was restored to its weights at the end of epoch {epoch}" if epoch > 0
                else "the model in memory was restored to its weights before training")
    return NonFiniteLossError(
        f"loss term {bad[0]!r} became {float(terms.get(bad[0], loss).detach())} at epoch {epoch + 1}, step {step} "
        f"(all terms: { {k: round(float(v.detach()), 6) for k, v in terms.items()} }){saved}; {restored}. "
        "Lower the learning rate, check the inputs for NaN, or clip gradients (grad_clip=...)."
    )


def _train_epoch(method, core, loader, sampler, epoch: int, *, device, weights, opt, sched, sched_unit, grad_clip,
                 world: int, ckpt_dir, amp=None, scaler=None, channels_last: bool = False) -> dict:
    """One pass over the training data: a step per batch; returns the epoch's row (``epoch``, the
    sample-weighted means ``train/loss`` and ``train/<term>``, ``lr``). A NaN/inf loss puts the weights back
    to those at the start of the epoch and raises :class:`NonFiniteLossError`. ``amp``: the forward pass
    (the method's loss terms) runs under autocast in that dtype; backward and the optimiser step stay in
    float32. ``scaler`` (fp16): the loss is scaled before backward and the gradients unscaled before
    clipping and the step (a step with inf/NaN gradients is skipped, the scale lowered)."""
    good = {k: v.detach().to("cpu", copy=True) for k, v in trainable_state(core).items()}
    if sampler is not None:
        sampler.set_epoch(epoch)  # permutation seeded with seed·1000003 + epoch, for any world size
    method.train()
    sums: dict[str, torch.Tensor] = {}
    total_sum = 0.0
    count = 0
    for step, batch in enumerate(loader):
        batch = to_device(batch, device, channels_last)
        with autocast(device, amp):
            terms = method(batch)
        _check_terms(terms, epoch + 1, step)
        loss = _weighted_total(terms, weights)
        if amp is not None:
            loss = loss.float()
        if not _all_finite(loss, world):
            load_trainable_state(core, good, source="the last good state")
            raise _non_finite_error(terms, loss, epoch, step, ckpt_dir)
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            if grad_clip is not None:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], grad_clip)
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            if grad_clip is not None:
                torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], grad_clip)
            opt.step()
        if sched is not None and sched_unit == "step":
            sched.step()
        b = _batch_size(batch)
        for k, v in terms.items():
            d = v.detach().float() * b
            sums[k] = sums[k] + d if k in sums else d
        total_sum += float(loss.detach()) * b
        count += b
    if world > 1:  # exact global means over all ranks' samples
        total_sum, count, sums = _reduce_sums(total_sum, count, sums)
    row = {"epoch": epoch + 1, "train/loss": total_sum / count}
    row.update({f"train/{k}": float(v) / count for k, v in sums.items()})
    row["lr"] = opt.param_groups[0]["lr"]
    if sched is not None and sched_unit == "epoch":
        sched.step()
    return row


class _Monitor:
    """The monitored column (``val/accuracy``, else ``val/loss``, else ``train/loss`` when not given), its
    direction (``min`` for losses and errors) and the epochs where it was not finite."""

    def __init__(self, monitor):
        self.name, self.mode = (monitor if isinstance(monitor, tuple) else (monitor, None))
        self.not_finite: list[int] = []  # none of these epochs can be best

    def value(self, row: dict) -> float:
        if self.name is None:
            self.name = "val/accuracy" if "val/accuracy" in row else ("val/loss" if "val/loss" in row else "train/loss")
        if self.name not in row:
            raise KeyError(f"monitor {self.name!r} is not logged; available: {sorted(k for k in row if '/' in k)}")
        if self.mode is None:
            self.mode = "min" if "loss" in self.name.split("/")[-1] or "error" in self.name else "max"
        return row[self.name]

    def improves(self, value: float, best_value) -> bool:
        return best_value is None or (value > best_value if self.mode == "max" else value < best_value)


def _end_of_epoch(core, epoch: int, row: dict, history: list, mon: _Monitor, best: dict, *, config, opt, sched,
                  ckpt_dir, rank: int, scaler=None) -> None:
    """Keep the best epoch by the monitor (its weights in memory and in ``best.pt``) and write ``last.pt``."""
    value = mon.value(row)
    if not math.isfinite(value):
        mon.not_finite.append(epoch + 1)
    if mon.improves(value, best["value"]) and math.isfinite(value):
        best["epoch"], best["value"] = epoch + 1, value
        best["state"] = {k: v.detach().cpu().clone() for k, v in trainable_state(core).items()}
        if ckpt_dir is not None and rank == 0:
            save_atomic({"format": CHECKPOINT_FORMAT, "model": best["state"], "epoch": epoch + 1}, ckpt_dir / "best.pt")
    if ckpt_dir is not None and rank == 0:
        save_atomic({
            "format": CHECKPOINT_FORMAT,
            "config": json.dumps(config, sort_keys=True, default=str),
            "epoch": epoch + 1,
            "model": trainable_state(core),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict() if sched is not None else None,
            "rng": _rng_state(),
            "history": json.dumps(history),
            "best_epoch": best["epoch"],
            "best_value": best["value"],
            **({"scaler": scaler.state_dict()} if scaler is not None else {}),
        }, ckpt_dir / "last.pt")


def _warn_not_finite(mon: _Monitor, best: dict, restore: str) -> None:
    shown = ", ".join(map(str, mon.not_finite[:10])) + (" ..." if len(mon.not_finite) > 10 else "")
    if best["state"] is None:
        what = ("no epoch is best, so the weights of the last epoch are kept (history.attrs['restored'] is "
                "'last')" if restore == "best" else "no epoch is best")
    else:
        what = f"those epochs could not be chosen; the best is epoch {best['epoch']}"
    warnings.warn(
        f"the monitored value {mon.name!r} was not finite (NaN or inf) at epoch(s) {shown}: {what}. Check the "
        "validation data and the method's evaluate() (NaN inputs, an empty class), or pick another monitor=...",
        RuntimeWarning, stacklevel=3)


def fit(method: nn.Module, train_data, val_data=None, *, epochs: int, batch_size: int = 64, lr: float = 1e-3,
        optimizer="adam", weight_decay: float = 0.0, momentum: float = 0.9, schedule=None,
        weights: Mapping[str, float] | None = None, monitor: str | tuple[str, str] | None = None,
        restore: str = "best", seed: int = 0, checkpoint_dir=None, resume: bool = False, device=None,
        progress: bool | None = None, val_losses: bool = True, drop_last: bool = True, num_workers: int = 0,
        collate_fn=None, grad_clip: float | None = None, callbacks: Iterable[Callable] = (), amp=False,
        channels_last: bool = False, pin_memory: bool | None = None, persistent_workers: bool | None = None,
        patience: int | None = None, min_delta: float = 0.0):
    """Train ``method`` (``forward(batch) -> {term: scalar}``) and return the history DataFrame.

    Loss = Σ weights[term]·term (``weights`` defaults to ``method.loss_weights`` or 1 per term).
    Parameters: ``method.param_groups(lr)`` when defined (e.g. a new head at 10× the lr), else all
    trainable ones. Shuffling uses a ``torch.Generator`` seeded with ``seed`` and the epoch.
    Each epoch: mean of every term (``train/<term>``, ``train/loss`` the weighted sum), validation
    terms (``val/<term>``) and the method's metrics (``val/<metric>``), ``lr``, ``seconds``.
    ``monitor`` (default ``val/accuracy`` when the method reports it, else ``val/loss``) picks the
    best epoch; ``restore="best"`` loads its weights at the end (``"last"`` keeps the last).
    ``checkpoint_dir``: ``last.pt`` every epoch and ``best.pt``, written atomically (temporary files
    left there by a killed run are removed); with ``resume=True`` training continues from ``last.pt``
    and ends bit-identical to an uninterrupted run. Resuming is refused, with the differences listed,
    when the data (fingerprints; Dataset vs DataLoader) or any setting that changes the result differs
    (lr, batch size, epochs with a schedule, optimiser, weights, seed, grad_clip, momentum, monitor,
    drop_last, restore). A NaN/inf loss raises :class:`NonFiniteLossError` naming the epoch, step and
    term; the checkpoints on disk stay those of the last good epoch, and the model in memory is put
    back to the weights it had at the end of that epoch. A NaN/inf monitored value cannot make an
    epoch best; a ``RuntimeWarning`` names those epochs (and says when no epoch is best at all).
    Empty ``val_data`` is refused before training.
    ``history.attrs``: ``best_epoch``, ``monitor``, ``best_value``, ``restored``, ``patience``,
    ``stopped_epoch``.

    Early stopping: with ``patience=p`` training stops after ``p`` consecutive epochs in which the
    monitored value did not improve by more than ``min_delta`` (in the monitor's direction: up for
    accuracy-like values, down for losses and errors) on the reference — the first finite value, then
    each value that improved on it by more than ``min_delta``; a NaN/inf value never improves.
    ``epochs`` is then the maximum, and still the horizon of a schedule that depends on it (``step``,
    ``cosine``, ``loglinear``, a callable): stopping early does not compress the schedule, so a run
    that stops at epoch k has the learning rates of the first k epochs of the full run.
    ``restore="best"`` still loads the best epoch (any improvement, without ``min_delta``).
    ``history.attrs["stopped_epoch"]`` is the last epoch run when training stopped before ``epochs``,
    else None. ``patience`` and ``min_delta`` are checkpoint settings (resuming with others is refused);
    the count is recomputed from the history, so a resumed run stops at the same epoch as an
    uninterrupted one (and a run that already stopped does not train further). ``patience=None``
    (default) trains every epoch exactly as before; ``min_delta`` needs a ``patience``.

    For a GPU (the defaults keep today's exact numbers): ``amp=True`` runs the forward pass under
    autocast — bf16 on CPU, fp16 on CUDA with a ``torch.amp.GradScaler`` (its state is checkpointed);
    ``amp="bf16"`` or ``"fp16"`` choose; parameters, gradients and the optimiser stay float32.
    ``channels_last=True`` puts the method's 4-d weights and every 4-d float batch tensor in the
    channels-last layout (faster convolutions on tensor cores). ``num_workers`` DataLoader workers
    read the training and validation data (``persistent_workers``, default: when there are workers,
    keeps them across epochs); ``pin_memory`` (default: the device is CUDA) pins batches so the
    host→device copies (always ``non_blocking``) overlap with compute. ``amp`` and ``channels_last``
    are part of a checkpoint's settings (resuming with others is refused). With workers, random
    augmentations draw from per-worker seeds (from the seeded torch RNG): runs stay reproducible, but
    differ from ``num_workers=0``, and a resumed run with persistent workers is not bit-identical to an
    uninterrupted one (its workers are seeded anew).
    """
    import pandas as pd
    from tqdm.auto import tqdm

    from . import default_device

    _check_fit_args(epochs, restore, train_data, val_data)
    _check_early_stopping(patience, min_delta)
    device = default_device(device)
    amp = amp_dtype(amp, device)  # a bad value fails before anything moves
    opts = loader_options(device, num_workers, pin_memory, persistent_workers)
    method.to(device)
    if channels_last:
        method.to(memory_format=torch.channels_last)
    weights = dict(weights if weights is not None else getattr(method, "loss_weights", {}) or {})
    is_loader = hasattr(train_data, "dataset") and hasattr(train_data, "batch_size")
    n_train = len(train_data.dataset) if is_loader else len(train_data)
    drop_last = drop_last and n_train > batch_size
    world, rank = _distributed()
    loader, sampler = _train_loader(train_data, batch_size, world, rank, seed, drop_last, opts, collate_fn)
    val_loader = (_make_loader(val_data, batch_size, False, None, False, opts, collate_fn)
                  if val_data is not None and val_losses else None)
    scaler = torch.amp.GradScaler(device.type) if amp == torch.float16 else None
    steps_per_epoch = len(loader)
    groups = _param_groups(method, lr)
    opt = _make_optimizer(optimizer, groups, lr, weight_decay, momentum)
    sched, sched_unit = _make_schedule(schedule, opt, epochs, steps_per_epoch)
    core = method  # the method itself; `method` becomes its DDP wrapper under torch.distributed
    if world > 1:
        method = _ddp_wrap(core, device)

    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    config = _run_config(core, train_data, val_data, ckpt_dir, epochs=epochs, batch_size=batch_size, lr=lr,
                         optimizer=optimizer, weight_decay=weight_decay, schedule=schedule, weights=weights,
                         seed=seed, n_train=n_train, grad_clip=grad_clip, momentum=momentum, monitor=monitor,
                         drop_last=drop_last, restore=restore, amp=amp, channels_last=channels_last,
                         patience=patience, min_delta=min_delta)
    if ckpt_dir is not None and rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        clean_stale_tmp(ckpt_dir)  # e.g. a full-size .last.pt.<pid>.<uuid>.tmp left by a kill
    history: list[dict] = []
    start_epoch = 0
    best = {"epoch": None, "value": None, "state": None}
    if resume:
        if ckpt_dir is None:
            raise ValueError("resume=True needs a checkpoint_dir")
        history, start_epoch, best = (_resume(ckpt_dir, config, schedule, core, opt, sched, scaler)
                                      or (history, 0, best))

    show = (progress if progress is not None else not os.environ.get("CI")) and rank == 0
    bar = tqdm(total=epochs, initial=start_epoch, desc=type(core).__name__, disable=not show, leave=False)
    mon = _Monitor(monitor)
    stopped_epoch = None
    try:
        for epoch in range(start_epoch, epochs):
            # before each epoch, so that a resumed run that had already stopped does not train further
            if patience is not None and history:
                values = [mon.value(r) for r in history]  # resolves the monitor's name and direction
                if _epochs_without_improvement(values, mon.mode, min_delta) >= patience:
                    stopped_epoch = epoch
                    break
            t0 = time.perf_counter()
            row = _train_epoch(method, core, loader, sampler, epoch, device=device, weights=weights, opt=opt,
                               sched=sched, sched_unit=sched_unit, grad_clip=grad_clip, world=world, ckpt_dir=ckpt_dir,
                               amp=amp, scaler=scaler, channels_last=channels_last)
            if val_data is not None:  # every rank evaluates all of val_data: identical decisions everywhere
                row.update(_evaluate(core, val_data, batch_size, device, weights, val_losses, collate_fn,
                                     loader=val_loader, amp=amp, channels_last=channels_last))
            row["seconds"] = time.perf_counter() - t0
            history.append(row)
            _end_of_epoch(core, epoch, row, history, mon, best, config=config, opt=opt, sched=sched,
                          ckpt_dir=ckpt_dir, rank=rank, scaler=scaler)
            bar.update(1)
            bar.set_postfix({k.split("/")[-1]: f"{v:.3g}" for k, v in row.items() if k in ("train/loss", mon.name)})
            for cb in callbacks:
                cb(epoch + 1, row, core)
            if world > 1 and ckpt_dir is not None:
                torch.distributed.barrier()  # no rank runs ahead of rank 0's checkpoint
    finally:
        bar.close()

    if mon.not_finite and rank == 0:
        _warn_not_finite(mon, best, restore)
    mon_name = mon.name
    if restore == "best" and best["state"] is not None:
        load_trainable_state(core, best["state"], source="best epoch")
    frame = pd.DataFrame(history)
    frame.attrs.update({"best_epoch": best["epoch"], "monitor": mon_name, "best_value": best["value"],
                        "restored": restore if best["state"] is not None else "last",
                        "patience": None if patience is None else int(patience),
                        "stopped_epoch": stopped_epoch})
    return frame


# ------------------------------------------------------------------------------------- supervised
class Supervised(nn.Module):
    """Plain supervised training of one model: ``{"ce": cross-entropy}`` (or ``{"bce": ...}`` for
    multi-hot targets). ``target_key`` picks a target from dict targets (e.g. ``"labels"``);
    ``evaluate`` reports ``accuracy`` (CE) or ``mAP`` (BCE) on the given data."""

    def __init__(self, model: nn.Module, loss: str = "ce", target_key: str | None = None, label_smoothing: float = 0.0):
        super().__init__()
        if loss not in ("ce", "bce"):
            raise ValueError(f"loss must be 'ce' or 'bce', got {loss!r}")
        self.model = model
        self.loss = loss
        self.target_key = target_key
        self.label_smoothing = label_smoothing

    def _target(self, y):
        if self.target_key is not None:
            if not isinstance(y, Mapping) or self.target_key not in y:
                raise KeyError(f"target_key {self.target_key!r} not in the batch targets")
            return y[self.target_key]
        if isinstance(y, Mapping):
            raise TypeError(f"targets are a dict with keys {list(y)}: pass target_key=...")
        return y

    def forward(self, batch):
        x, y = batch[0], self._target(batch[1])
        logits = self.model(x)
        if self.loss == "ce":
            return {"ce": nn.functional.cross_entropy(logits, y, label_smoothing=self.label_smoothing)}
        return {"bce": nn.functional.binary_cross_entropy_with_logits(logits, y.float())}

    def evaluate(self, data) -> dict:
        from . import metrics
        from .features import OUTPUT, extract

        store = extract(self.model, data, OUTPUT, pool="none", progress=False)
        logits = store[OUTPUT]
        targets = store.targets
        if isinstance(targets, dict):
            if self.target_key not in targets:
                return {}
            targets = targets[self.target_key]
        if self.loss == "ce":
            return {"accuracy": metrics.accuracy(logits, targets)}
        if hasattr(metrics, "multilabel_map"):
            difficult = store.targets.get("difficult") if isinstance(store.targets, dict) else None
            return {"mAP": metrics.multilabel_map(logits, targets, difficult=difficult)}
        return {}


def teacher_key(arch: str, num_classes: int, train_data, val_data, *, device=None, **settings) -> str:
    """Cache key of a teacher (:func:`kaviz.cache.key`): everything that determines its weights — the
    architecture, the number of classes, the data fingerprints, every setting, the loop version — and
    the environment: device type, CPU thread count (another count sums in another order, so the
    weights differ in their last bits) and the CPU floating-point signature."""
    return cache_key("teacher", device=device, arch=arch, num_classes=num_classes, train=data_key(train_data),
                     val=data_key(val_data), settings=settings, loop=LOOP_VERSION)


def teacher_cache_folder(cache) -> Path | None:
    """Where ``cache=`` keeps trained teachers: None for ``cache=False``, the folder for a path, else
    ``cache_dir("teachers")``."""
    if not cache:
        return None
    if isinstance(cache, (str, os.PathLike)) and not isinstance(cache, bool):
        return Path(cache)
    return cache_dir("teachers")


def cached_training(folder, name: str, key: str, build: Callable[[], nn.Module],
                    train: Callable[[], tuple[nn.Module, Mapping]], *, what: str,
                    required: tuple[str, ...] = ("history",)):
    """The teacher cache under :func:`train_teacher`, ``train_source`` and ``born_again_chain``.

    ``folder`` None: no cache, ``train()``. Else the entry ``name``/``key`` of
    :class:`kaviz.cache.Cache` ``(folder)``: when intact, a model from ``build()`` with its weights and
    the stored metadata; otherwise ``train() -> (model, metadata)`` (JSON-able, with a ``history``)
    and both are written. Returns ``(model (cpu, eval mode), metadata, cached)``.
    A damaged entry is reported by path and retrained; a second process on the same entry waits for
    the first and reuses its result."""
    from .models import load_state

    def compute():
        model, meta = train()
        model = model.cpu().eval()
        return model, model.state_dict(), meta

    if folder is None:
        model, _, meta = compute()
        return model, dict(meta), False
    entry = Cache(folder).entry(name, key)

    def use(state, meta):
        model = build()
        load_state(model, state, source=str(entry.weights))
        return model.eval()

    return get_or_compute(entry, compute, use, required=required, what=what, action="retraining")


def history_frame(meta: Mapping, cached: bool, trained=None):
    """The history DataFrame of a cache entry (``trained``: the one fit returned, when it just ran)."""
    import pandas as pd

    if not cached and trained is not None:
        trained.attrs["cached"] = False
        return trained
    history = pd.DataFrame(meta["history"])
    history.attrs.update(meta.get("attrs", {}))
    history.attrs["cached"] = cached
    return history


def history_meta(history) -> dict:
    attrs = {k: v for k, v in history.attrs.items() if isinstance(v, (int, float, str, type(None))) and k != "cached"}
    return {"history": history.to_dict(orient="records"), "attrs": attrs}


# ------------------------------------------------------------------ teacher methods in the cache key
# (added for the dense teachers of kaviz.methods.sbm; train_teacher(method=...))
def _callable_key(fn) -> str:
    """A stable name for a method factory: ``module.QualName`` plus the arguments of a partial.

    Lambdas and functions defined inside other functions have no stable name (two different ones
    would share a key), so they are refused."""
    import functools

    if isinstance(fn, functools.partial):
        args = [repr(a) for a in fn.args]
        kwargs = {k: repr(v) for k, v in sorted(fn.keywords.items())}
        return json.dumps([_callable_key(fn.func), args, kwargs])
    if not callable(fn):
        raise TypeError(f"method must be callable (model -> training method), got {type(fn).__name__}")
    name = getattr(fn, "__qualname__", None)
    module = getattr(fn, "__module__", None)
    if not name or not module or "<lambda>" in name or "<locals>" in name:
        raise ValueError(
            f"method {fn!r} has no stable name for the teacher cache key; pass a class or a module-level "
            "function (or functools.partial(DenseSupervised, task='depth') with its arguments)"
        )
    return f"{module}.{name}"


def train_teacher(arch: str, train_data, val_data=None, *, num_classes: int | None = None, epochs: int = 10,
                  lr: float = 1e-3, batch_size: int = 64, optimizer: str = "adam", weight_decay: float = 5e-4,
                  schedule: str | None = "cosine", seed: int = 0, loss: str = "ce", target_key: str | None = None,
                  arch_kwargs: Mapping | None = None, cache: bool | str | os.PathLike = True, device=None,
                  progress: bool | None = None, method: Callable[[nn.Module], nn.Module] | None = None,
                  monitor: str | tuple[str, str] | None = None, amp=False, channels_last: bool = False,
                  num_workers: int = 0, pin_memory: bool | None = None, persistent_workers: bool | None = None,
                  patience: int | None = None, min_delta: float = 0.0):
    """Train (or load from the cache) a teacher; returns ``(model, history)``; the model is in eval mode.

    The cache key covers the architecture and its arguments, the number of classes, the
    fingerprints of the training and validation data, every training setting and the seed, so a
    changed input never reuses a stale teacher, and the environment (device type, thread count, CPU
    floating-point signature; :func:`kaviz.cache.key`). Files (:class:`kaviz.cache.Entry`):
    ``<cache>/<arch>-<key>.pt`` (state dict), ``.json`` (history and the weights' SHA-256, checked on
    load: a damaged entry is reported and retrained) and ``.lock`` (a second process asking for the
    same teacher waits and reuses it).

    ``method``: how to train the model, a class or module-level function ``method(model) -> nn.Module``
    (or a ``functools.partial`` of one) used instead of ``Supervised(model, loss, target_key)`` —
    e.g. a dense task's loss (:class:`kaviz.methods.sbm.DenseSupervised`). Its qualified name and
    arguments are part of the cache key. ``monitor``: the validation value that picks the epoch kept
    (see :func:`fit`; part of the key when given). ``amp``, ``channels_last``, ``num_workers``,
    ``pin_memory``, ``persistent_workers``: passed to :func:`fit` (a GPU run); amp and channels_last
    change the weights and are part of the key when used, and so are the worker settings when
    ``num_workers > 0`` (workers draw their own augmentation seeds).
    ``patience``, ``min_delta``: early stopping (see :func:`fit`): train until the validation value has not
    improved for ``patience`` epochs, ``epochs`` at most (still the schedule's horizon); both are part of
    the key when ``patience`` is given, and the history's ``attrs["stopped_epoch"]`` says where it stopped.
    """
    from . import default_device, seed_everything
    from .models import build
    from .models.zoo import key_part as zoo_key_part

    _check_early_stopping(patience, min_delta)  # before the cache: a bad value fails even on a cache hit
    arch_kwargs = dict(arch_kwargs or {})
    if num_classes is None:
        num_classes = getattr(train_data, "num_classes", None)
        if num_classes is None:
            raise ValueError("num_classes is not given and the training data does not say (data.num_classes)")
    settings = dict(epochs=epochs, lr=lr, batch_size=batch_size, optimizer=optimizer, weight_decay=weight_decay,
                    schedule=schedule, seed=seed, loss=loss, target_key=target_key, arch_kwargs=arch_kwargs,
                    device=default_device(device).type)
    if method is not None:  # only then, so that the keys of teachers trained with Supervised stay the same
        settings["method"] = _callable_key(method)
    if monitor is not None:  # likewise
        settings["monitor"] = monitor
    zoo_sha = zoo_key_part(arch, arch_kwargs)
    if zoo_sha is not None:  # likewise; a pretrained start: the zoo entry's bits
        settings["zoo"] = zoo_sha
    if patience is not None:  # likewise: without early stopping the keys stay the same
        settings["patience"] = int(patience)
        settings["min_delta"] = float(min_delta)
    run = dict(amp=amp, channels_last=channels_last, num_workers=num_workers, pin_memory=pin_memory,
               persistent_workers=persistent_workers, patience=patience, min_delta=min_delta)
    dtype = amp_dtype(amp, default_device(device))
    if dtype is not None:  # likewise: the default keys stay the same
        settings["amp"] = str(dtype).replace("torch.", "")
    if channels_last:
        settings["channels_last"] = True
    opts = loader_options(default_device(device), num_workers, pin_memory, persistent_workers)
    if opts["num_workers"]:
        settings["workers"] = [opts["num_workers"], opts["persistent_workers"]]
    key = teacher_key(arch, num_classes, train_data, val_data, **settings)
    folder = teacher_cache_folder(cache)

    fresh = {}

    def train():
        seed_everything(seed)
        model = build(arch, num_classes, **arch_kwargs)
        trainer = Supervised(model, loss=loss, target_key=target_key) if method is None else method(model)
        history = fresh["history"] = fit(trainer, train_data, val_data, epochs=epochs, lr=lr, batch_size=batch_size,
                                         optimizer=optimizer,
                      weight_decay=weight_decay, schedule=schedule, seed=seed, device=device, progress=progress,
                      monitor=monitor, **run)
        return model, {"arch": arch, "num_classes": num_classes, "settings": settings, **history_meta(history)}

    model, meta, cached = cached_training(folder, arch, key, lambda: build(arch, num_classes, **arch_kwargs), train,
                                          what=f"teacher {arch!r}")
    return model, history_frame(meta, cached, fresh.get("history"))


def summarize(models: Mapping[str, nn.Module], histories: Mapping, test_data=None, evaluate=None):
    """One row per model: architecture, parameters, the best epoch on validation and its
    validation value, and the test metrics of the restored (best-on-validation) weights.

    ``evaluate(model, data) -> dict`` defaults to :meth:`Supervised.evaluate` (accuracy)."""
    import pandas as pd

    from .models import param_count, spec

    rows = []
    for name, model in models.items():
        h = histories.get(name) if histories is not None else None
        row = {"model": name, "architecture": spec(model).get("name"), "parameters": param_count(model)}
        if h is not None:
            row["best epoch (val)"] = h.attrs.get("best_epoch")
            row[f"{h.attrs.get('monitor', 'val')} (best)"] = h.attrs.get("best_value")
        if test_data is not None:
            res = evaluate(model, test_data) if evaluate is not None else Supervised(model).evaluate(test_data)
            row.update({f"test {k}": v for k, v in res.items()})
        rows.append(row)
    return pd.DataFrame(rows).set_index("model")
