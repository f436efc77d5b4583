"""The one on-disk cache of kaviz: keys, safe names, an atomic writer, a lock per entry, hashes.

Everything that trains something expensive and keeps it (``train.train_teacher``,
``methods.customize.train_source``, ``methods.consistency.born_again_chain``) goes through here:

* :func:`key` hashes a canonical JSON of everything that determines an entry, always together with
  :func:`environment_key` (device type, torch thread count and :func:`fp_signature`, the CPU
  floating-point path), with SHA-256. Data enters a key through :func:`data_key`
  (``kaviz.data.fingerprint``); no other hash algorithm is used.
* :class:`Cache` is a folder; opening it removes temporary files left by killed writers.
  :meth:`Cache.entry` gives an :class:`Entry` whose file names cannot leave the folder, whatever
  the name (``../x``, ``a/b``, NUL).
* :meth:`Entry.save` writes the weights and then the metadata (the commit marker) with
  :func:`write_atomic`; the metadata holds the SHA-256 of the weights file. :meth:`Entry.load`
  checks it: a truncated, bit-flipped or swapped weights file, invalid JSON or missing keys are
  reported by path (:class:`CorruptCacheWarning`) and the entry is recomputed, never trusted.
* :meth:`Entry.lock` (``fcntl.flock`` on ``<entry>.lock``): two processes computing the same entry
  do not race; the second waits and then reuses the first's result (:func:`get_or_compute`).
* :func:`teacher_outputs` / :class:`TeacherOutputs`: frozen-teacher outputs computed once per process
  and shared by every method (one key, one batch format); never memoised for randomly augmented data.
* A full disk while writing raises :class:`DiskFullError` naming the folder and the bytes needed,
  and leaves no temporary file behind.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import re
import shutil
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

import torch.utils.data

try:  # POSIX; elsewhere entries are written atomically but not locked
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

__all__ = [
    "fp_signature",
    "environment_key",
    "data_key",
    "key",
    "safe_name",
    "cache_dir",
    "write_atomic",
    "clean_stale_tmp",
    "Cache",
    "Entry",
    "get_or_compute",
    "CorruptCacheWarning",
    "DiskFullError",
    "STALE_TMP_SECONDS",
    "teacher_outputs",
    "clear_teacher_outputs",
    "TeacherOutputs",
    "cached_teacher_outputs",
    "OUTPUTS_MEMO_SIZE",
]

CACHE_FORMAT = "kaviz-cache-1"
# A temporary file nobody holds a lock on is stale at once (its writer is dead: the kernel drops a
# flock when its process dies, even under SIGKILL). Where flock is unavailable, age decides.
STALE_TMP_SECONDS = 600
KEY_CHARS = 24  # of the 64 hex digits of SHA-256 in file names (96 bits); the full key is in the metadata
FP_ENV = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR")


class CorruptCacheWarning(UserWarning):
    """A cache entry or checkpoint on disk is damaged; the message names the file and what is done."""


class DiskFullError(OSError):
    """Writing a cache file or checkpoint ran out of space (errno ENOSPC/EDQUOT)."""


# ------------------------------------------------------------------------------------------ keys
def fp_signature() -> dict:
    """The CPU floating-point signature: which kernels torch uses on this machine and process.

    ``torch.backends.cpu.get_cpu_capability()`` (e.g. ``AVX2``, ``AVX512``), the settings in force
    that choose kernels (``ATEN_CPU_CAPABILITY``, ``ONEDNN_MAX_CPU_ISA``, ``MKL_CBWR``; None when
    unset) and the torch version. Two runs with another signature may differ in the last bits, and
    short trainings amplify those into whole points, so a cached teacher is never reused across it.
    """
    import torch

    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except Exception:  # pragma: no cover - very old or exotic builds
        capability = None
    sig = {"cpu_capability": capability, "torch": torch.__version__}
    sig.update({name: os.environ.get(name) for name in FP_ENV})
    return sig


def environment_key(device=None) -> dict:
    """Device type, torch thread count (another count sums in another order) and :func:`fp_signature`."""
    import torch

    from . import default_device

    return {"device": default_device(device).type, "threads": torch.get_num_threads(), "fp": fp_signature()}


def data_key(data) -> str | None:
    """The fingerprint of a dataset for a key (``kaviz.data.fingerprint``; None for no data)."""
    if data is None:
        return None
    from .data import fingerprint

    return fingerprint(data)


def _canonical(obj):
    """JSON ``default`` for keys: values whose text is stable across processes, else an error (a
    memory address in a key would make every call miss the cache without saying why)."""
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=repr)
    try:
        import numpy as np

        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
    except ImportError:  # pragma: no cover
        pass
    text = repr(obj)
    if " at 0x" in text or "<lambda>" in text:
        raise TypeError(
            f"{text} has no stable text for a cache key (it names a memory address); pass a named value "
            "(a string, a number, a module-level function's name) or turn the cache off (cache=False)"
        )
    return text


def key(kind: str, *, device=None, **parts) -> str:
    """The key of an entry: SHA-256 (hex) of a canonical JSON of ``kind``, ``parts`` (everything that
    determines the entry: architecture, settings, seed, :func:`data_key` of the data, ...) and
    :func:`environment_key` of ``device``."""
    payload = {"format": CACHE_FORMAT, "kind": kind, "environment": environment_key(device), "parts": parts}
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=_canonical, allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()


_UNSAFE = re.compile(r"[^A-Za-z0-9_.+=-]+")


def safe_name(name: str, max_len: int = 80) -> str:
    """A file-name component made from a user string: only ``A-Za-z0-9_.+=-`` (anything else, path
    separators and NUL included, becomes ``_``), no leading dot, at most ``max_len`` characters.
    It never names a parent folder or leaves the folder it is joined to. Different names may map to
    the same safe name; entries stay apart because the key covers the original name."""
    text = _UNSAFE.sub("_", str(name)).lstrip(".")
    text = text.replace("..", "_")
    return text[:max_len] or "entry"


def cache_dir(*parts: str) -> Path:
    """Where kaviz caches teachers, features and runs: ``$KAVIZ_DATA``, else the repository's
    ``data/`` folder (an editable install), else ``~/.cache/kaviz``; ``parts`` are sub-folders."""
    env = os.environ.get("KAVIZ_DATA")
    if env:
        base = Path(env)
    else:
        repo_data = Path(__file__).resolve().parents[1] / "data"
        base = repo_data if (repo_data / "README.md").exists() else Path.home() / ".cache" / "kaviz"
    path = base.joinpath(*(safe_name(p) for p in parts))
    path.mkdir(parents=True, exist_ok=True)
    return path


# --------------------------------------------------------------------------------------- writing
def _human(n: int) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)  # pragma: no cover


def _disk_full(path: Path, needed: int, exc: OSError) -> DiskFullError:
    folder = path.parent
    try:
        free = shutil.disk_usage(folder).free
        free_text = f"{_human(free)} ({free} bytes) free"
    except OSError:
        free_text = "free space unknown"
    return DiskFullError(
        exc.errno,
        f"the disk is full: writing {path.name} into {folder} needs {_human(needed)} ({needed} bytes), {free_text}. "
        "Nothing was written (no temporary file is left). Free space there, or point the cache at a larger "
        "disk (KAVIZ_DATA=/path, cache=/path or checkpoint_dir=/path).",
    )


def _tmp_name(path: Path) -> Path:
    return path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")


def _open_locked_tmp(path: Path):
    """Create a unique temporary file beside ``path`` and flock it (the lock marks it as being
    written; :func:`clean_stale_tmp` leaves locked files alone). If a cleaner removed it between
    the creation and the lock, try another name."""
    for _ in range(5):
        tmp = _tmp_name(path)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                pass  # a file system without flock: the age rule protects it
            try:
                if os.stat(tmp).st_ino != os.fstat(fd).st_ino:
                    raise FileNotFoundError
            except FileNotFoundError:
                os.close(fd)
                continue
        return tmp, fd
    raise OSError(f"could not create a temporary file beside {path}")  # pragma: no cover


def write_atomic(path, data: bytes | Callable[[io.BufferedIOBase], Any]) -> int:
    """Write ``data`` (bytes, or a function writing into a binary file) to ``path`` atomically:
    into ``<name>.<pid>.<uuid>.tmp`` in the same folder, fsync, ``os.replace``. A crash or kill never
    leaves a half-written file under ``path``; a full disk raises :class:`DiskFullError` (folder and
    bytes needed named) and removes the temporary file. Returns the number of bytes written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if callable(data):
        buf = io.BytesIO()
        data(buf)
        data = buf.getvalue()
    data = bytes(data)
    tmp = None
    try:
        tmp, fd = _open_locked_tmp(path)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
            os.replace(tmp, path)  # still under the temporary file's lock
        tmp = None
        with contextlib.suppress(OSError):  # make the rename itself durable
            dfd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        return len(data)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT) and not isinstance(exc, DiskFullError):
            raise _disk_full(path, len(data), exc) from exc
        raise
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def clean_stale_tmp(folder, max_age: float = STALE_TMP_SECONDS) -> list[Path]:
    """Remove ``*.tmp`` files in ``folder`` left by killed writers (kaviz's own and older names such
    as ``.last.pt.<pid>.tmp``). A file is stale when no process holds its lock (the writer died), or,
    on a file system without flock, when it is older than ``max_age`` seconds. Returns what was removed."""
    folder = Path(folder)
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    now = time.time()
    for e in entries:
        if not e.name.endswith(".tmp") or not e.is_file(follow_symlinks=False):
            continue
        p = Path(e.path)
        try:
            stale = _unlocked(p)
            if stale is None:
                stale = now - e.stat(follow_symlinks=False).st_mtime > max_age
            if stale:
                p.unlink()
                removed.append(p)
        except OSError:
            continue
    return removed


def _unlocked(p: Path) -> bool | None:
    """True when nobody holds a flock on ``p``, False when someone does, None when flock is unavailable."""
    if fcntl is None:
        return None
    try:
        fd = os.open(p, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError:
        return None
    finally:
        os.close(fd)  # releases our lock


# ---------------------------------------------------------------------------------------- entries
class Cache:
    """A cache folder. Opening it removes stale temporary files (see :func:`clean_stale_tmp`)."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.removed = clean_stale_tmp(self.folder)

    def entry(self, name: str, key_: str) -> "Entry":
        """The entry ``<safe name>-<key prefix>`` of this folder (``name`` is any user string)."""
        if not re.fullmatch(r"[0-9a-f]{16,64}", key_):
            raise ValueError(f"a cache key is a hex digest from kaviz.cache.key(), got {key_!r}")
        return Entry(self.folder, f"{safe_name(name)}-{key_[:KEY_CHARS]}", key_)

    def __repr__(self):
        return f"Cache({str(self.folder)!r})"


class Entry:
    """One cached result: ``<stem>.pt`` (a state dict or other tensors, read with
    ``weights_only=True``), ``<stem>.json`` (metadata with the weights' SHA-256, written last: an
    entry exists when its metadata does) and ``<stem>.lock``."""

    def __init__(self, folder: Path, stem: str, key_: str):
        self.folder, self.stem, self.key = Path(folder), stem, key_
        self.weights = self.folder / f"{stem}.pt"
        self.meta = self.folder / f"{stem}.json"
        self.lockfile = self.folder / f"{stem}.lock"
        for p in (self.weights, self.meta, self.lockfile):  # safe_name guarantees it; check anyway
            if p.resolve().parent != self.folder.resolve():
                raise ValueError(f"cache entry {stem!r} would be written outside {self.folder}")

    def __repr__(self):
        return f"Entry({str(self.folder / self.stem)!r})"

    def exists(self) -> bool:
        return self.meta.exists()

    # ------------------------------------------------------------------------------------ lock
    @contextlib.contextmanager
    def lock(self, what: str = "this entry"):
        """Hold an exclusive lock on the entry (``fcntl.flock`` on ``<stem>.lock``). A second process
        blocks here until the first one leaves (it says so once while waiting)."""
        if fcntl is None:  # pragma: no cover
            yield
            return
        try:
            fd = os.open(self.lockfile, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:  # a read-only cache: nothing will be written, nothing to lock
            yield
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print(f"kaviz: another process is computing {what} ({self.lockfile}); waiting for it to reuse its "
                      f"result",
                      flush=True)
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    # ------------------------------------------------------------------------------------ read
    def _corrupt(self, path: Path, reason: str, action: str) -> None:
        warnings.warn(f"{path} is corrupt ({reason}); {action}", CorruptCacheWarning, stacklevel=4)

    def load(self, required: tuple[str, ...] = (), action: str = "recomputing it"):
        """``(tensors, meta)`` of a complete, intact entry; None when it is absent or damaged (a
        :class:`CorruptCacheWarning` names the damaged file and says ``action``)."""
        import torch

        if not self.meta.exists():
            return None
        try:
            meta = json.loads(self.meta.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            self._corrupt(self.meta, f"invalid JSON: {exc}", action)
            return None
        if not isinstance(meta, dict):
            self._corrupt(self.meta, "not a JSON object", action)
            return None
        missing = [k for k in ("format", "key", "weights_sha256", *required) if k not in meta]
        if missing:
            self._corrupt(self.meta, f"missing keys {missing}", action)
            return None
        if meta["format"] != CACHE_FORMAT or meta["key"] != self.key:
            self._corrupt(self.meta, f"written for another key or format ({meta['format']!r})", action)
            return None
        try:
            blob = self.weights.read_bytes()
        except FileNotFoundError:
            self._corrupt(self.weights, "missing while its metadata exists", action)
            return None
        if hashlib.sha256(blob).hexdigest() != meta["weights_sha256"]:
            self._corrupt(self.weights, "sha256 mismatch", action)
            return None
        try:
            tensors = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
        except Exception as exc:  # hash matched but unreadable: written by something else
            self._corrupt(self.weights, f"unreadable: {type(exc).__name__}: {exc}", action)
            return None
        return tensors, meta

    # ----------------------------------------------------------------------------------- write
    def save(self, tensors, meta: Mapping) -> dict:
        """Write ``tensors`` (``torch.save``) and then ``meta`` plus the weights' SHA-256, each atomically."""
        import torch

        buf = io.BytesIO()
        torch.save(tensors, buf)
        blob = buf.getvalue()
        write_atomic(self.weights, blob)
        full = {**dict(meta), "format": CACHE_FORMAT, "key": self.key,
                "weights_sha256": hashlib.sha256(blob).hexdigest(),
                "weights_bytes": len(blob)}
        write_atomic(self.meta, json.dumps(full, default=str, indent=None).encode())
        return full


def get_or_compute(entry: Entry, compute: Callable[[], tuple[Any, Any, Mapping]],
                   use: Callable[[Any, dict], Any] = lambda tensors, meta: tensors, *, required: tuple[str, ...] = (),
                   what: str = "this entry", action: str = "recomputing it"):
    """``(value, meta, cached)``: ``use(tensors, meta)`` of the entry when it is intact, else
    ``compute() -> (value, tensors, meta)`` with ``tensors`` and ``meta`` saved into the entry.

    The check and the computation run under the entry's lock, so a second process on the same
    entry waits and then reuses the first one's result. ``use`` raising ``ValueError``,
    ``RuntimeError``, ``KeyError`` or ``TypeError`` (e.g. weights that do not fit the model) counts
    as a damaged entry: reported by path and recomputed."""

    def attempt(report: bool):
        with warnings.catch_warnings():
            if not report:
                warnings.simplefilter("ignore", CorruptCacheWarning)
            hit = entry.load(required, action) if entry.exists() else None
            if hit is None:
                return None
            try:
                return use(hit[0], hit[1]), hit[1]
            except (ValueError, RuntimeError, KeyError, TypeError) as exc:
                if report:
                    entry._corrupt(entry.weights, f"does not fit: {exc}", action)
                return None

    existed = entry.exists()
    got = attempt(report=True)
    if got is not None:
        return got[0], got[1], True
    with entry.lock(what):
        # another process may have finished it while we waited; a damage already reported is not repeated
        got = attempt(report=not existed)
        if got is not None:
            return got[0], got[1], True
        value, tensors, meta = compute()
        meta = entry.save(tensors, meta)
    return value, meta, False


# -------------------------------------------------------------------------------- teacher outputs
# Frozen-teacher outputs computed once per process and shared by every method (DESIGN §6): the same
# teacher weights on the same data give the same tensors whichever method asks (CFL, LSHFM, SBM, KD
# baselines, analyses). Entries are keyed like everything else here (:func:`key`: the weights hash, the
# layer, the data fingerprint, the batch size and the environment) and kept in memory for the session;
# data that applies a random transform (:func:`kaviz.data.has_random_transform`) is never memoised (its
# pixels change between reads).
OUTPUTS_MEMO_SIZE = 32  # layer entries kept (least recently used dropped first)
_outputs_memo: dict[str, Any] = {}


def teacher_outputs(teacher, data, layers, *, batch_size: int = 256, device=None) -> dict:
    """``{layer: tensor (N, ...)}``: the unpooled outputs of the frozen ``teacher`` at ``layers`` (a name or
    a list; ``kaviz.features.OUTPUT`` for its output) for every item of ``data``, in order (float32, CPU).

    Computed by one :func:`kaviz.features.extract` pass (eval mode, ``no_grad``, batches of ``batch_size``
    in dataset order) and memoised per layer under :func:`key` ``("teacher-outputs", weights, layer, data,
    batch_size)``, so that a second method, seed or analysis asking for the same teacher on the same data
    reuses it. Data with a random transform is computed afresh on every call. The tensors are shared
    between callers: do not modify them in place."""
    from .data import has_random_transform
    from .features import extract
    from .models import weights_hash
    from .train import unfrozen

    net = unfrozen(teacher)
    layers = [layers] if isinstance(layers, str) else list(dict.fromkeys(layers))
    keys: dict[str, str | None] = {layer: None for layer in layers}
    if not has_random_transform(data):
        from .data import Unlabeled

        images = data.dataset if isinstance(data, Unlabeled) else data  # the same pixels: one entry
        try:
            fp, weights = data_key(images), weights_hash(net)
        except TypeError:  # data without a fingerprint: computed, not memoised
            fp = None
        if fp is not None:
            keys = {layer: key("teacher-outputs", device=device, weights=weights, layer=layer, data=fp,
                               batch_size=int(batch_size)) for layer in layers}
    out = {layer: _outputs_memo.get(k) for layer, k in keys.items() if k is not None}
    missing = [layer for layer in layers if out.get(layer) is None]
    if missing:
        store = extract(net, data, missing, pool="none", batch_size=batch_size, device=device, progress=False,
                        clone=True)
        for layer in missing:
            out[layer] = store.tensor(layer)
            if keys[layer] is not None:
                _outputs_memo[keys[layer]] = out[layer]
    for layer in layers:  # most recently used last
        k = keys[layer]
        if k is not None:
            _outputs_memo[k] = _outputs_memo.pop(k)
    while len(_outputs_memo) > OUTPUTS_MEMO_SIZE:
        _outputs_memo.pop(next(iter(_outputs_memo)))
    return {layer: out[layer] for layer in layers}


def clear_teacher_outputs() -> None:
    """Forget every memoised teacher output (they are recomputed on the next request)."""
    _outputs_memo.clear()


def _first_target(item):
    if isinstance(item, (list, tuple)):
        return item[0], (item[1] if len(item) > 1 else None)
    return item, None


class TeacherOutputs(torch.utils.data.Dataset):
    """``data`` with its frozen teachers' outputs attached, the one batch format of cached teacher outputs:
    item i is ``(x, {**targets, "teacher_outputs": {teacher: {layer: output_i}}})``.

    ``targets`` are the item's own dict targets (only the ``keep`` keys when given), ``{"target": y}`` for a
    plain target, or nothing. Build it with :meth:`compute` (outputs through :func:`teacher_outputs`, so
    methods and seeds share them); valid only when ``data`` has no random augmentation. Image access
    (``get_image``, ``image_array``), ``classes``, ``num_classes`` and ``transform`` pass through to ``data``.
    """

    def __init__(self, data, outputs, *, keep=None, keys=None):
        n = len(data)
        self.data = data
        self.outputs = {str(t): dict(o) for t, o in outputs.items()}
        for t, o in self.outputs.items():
            for layer, v in o.items():
                if len(v) != n:
                    raise ValueError(f"teacher outputs {t!r}/{layer!r} have {len(v)} rows but the data has {n} items")
        self.keep = None if keep is None else tuple(keep)
        self._keys = keys

    @classmethod
    def compute(cls, data, teachers, layers, *, keep=None, batch_size: int = 256, device=None) -> "TeacherOutputs":
        """``teachers``: ``{name: frozen model}``; ``layers``: ``{name: layer or [layers]}``."""
        if set(layers) != set(teachers):
            raise ValueError(f"layers must name the layers of every teacher {list(teachers)}, got {list(layers)}")
        outputs = {t: teacher_outputs(m, data, layers[t], batch_size=batch_size, device=device)
                   for t, m in teachers.items()}
        from .models import weights_hash
        from .train import unfrozen

        ids = {t: [weights_hash(unfrozen(m)), layers[t], batch_size] for t, m in teachers.items()}
        return cls(data, outputs, keep=keep, keys=ids)

    def __len__(self):
        return len(self.data)

    def target(self, y, i) -> dict:
        if isinstance(y, Mapping):
            out = {k: v for k, v in y.items() if self.keep is None or k in self.keep}
        elif y is None or (self.keep is not None and "target" not in self.keep):
            out = {}
        else:
            out = {"target": y}  # class ids or multi-hot rows
        out["teacher_outputs"] = {t: {layer: v[i] for layer, v in o.items()} for t, o in self.outputs.items()}
        return out

    def __getitem__(self, i):
        x, y = _first_target(self.data[i])
        return x, self.target(y, i)

    def get_image(self, i):
        get = getattr(self.data, "get_image", None)
        return get(i) if get is not None else _first_target(self.data[i])[0]

    def image_array(self, i):
        return self.data.image_array(i)

    @property
    def dataset(self):
        return self.data

    @property
    def transform(self):
        return getattr(self.data, "transform", None)

    @property
    def classes(self):
        return getattr(self.data, "classes", None)

    @property
    def num_classes(self):
        return getattr(self.data, "num_classes", None)

    @property
    def fingerprint(self) -> str:
        from .data import digest, fingerprint

        ids = self._keys if self._keys is not None else {t: sorted(o) for t, o in self.outputs.items()}
        if self._keys is None:  # outputs given directly: their content identifies them
            return digest(("teacher-outputs", fingerprint(self.data), self.outputs, self.keep))
        return digest(("teacher-outputs", fingerprint(self.data), ids, self.keep))

    def __repr__(self):
        return f"TeacherOutputs({self.data!r}, teachers={list(self.outputs)})"


def cached_teacher_outputs(batch) -> dict | None:
    """``{teacher: {layer: tensor}}`` of a batch of :class:`TeacherOutputs`, or None for a plain batch."""
    if isinstance(batch, (list, tuple)) and len(batch) > 1 and isinstance(batch[1], Mapping):
        return batch[1].get("teacher_outputs")
    return None
