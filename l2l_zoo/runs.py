"""The one protocol layer every benchmark is built on: atomic writes, a lock on an output folder, a
run cache keyed by the full configuration, tuning on a validation split, one checkpointing training
loop, and one results schema.

    lock = runs.OutputLock.for_folder(out)                      # refuses a folder another run uses
    cache = runs.RunCache(os.path.join(out, "runs"), enabled=resume)
    record = cache.run({"method": "sgd", "lr": 0.1, "seed": 0, **setup}, lambda: runs.train(...))
    best = runs.tune([1, 0.1, 0.01], lambda lr: train_sgd(lr), criterion="val_loss")   # never test
    results = runs.new_results("mnist_mlp", config)               # config, environment, runs, summary
    runs.write_json(os.path.join(out, "results.json"), results)

Why one layer: scripts that each wrote their own loop, cache and writer drifted apart, and the drift
produced silent wrong results (caches that ignored part of the configuration) and corrupted outputs
(writers sharing one temporary name). Everything here is written once and tested once.

* **Atomic writes** (:func:`atomic_write`, :func:`write_json`, :func:`save_torch`): a uniquely named
  temporary file in the destination folder (process id and a random suffix, so concurrent writers
  never touch each other's temporary), flushed and fsynced, then ``os.replace``: a reader sees the old
  file or the new one, never half of one.
* **Loading** (:func:`load_torch`, :func:`read_json`): ``torch.load(weights_only=True)`` always, so a
  crafted checkpoint cannot run code; every failure (missing, truncated, foreign, not JSON) is one
  :class:`RunsError` naming the file and what was expected.
* **Output lock** (:class:`OutputLock`): a lock file created with ``O_EXCL`` recording the owner's
  pid and host; a second run on the same output is refused with a message naming the owner; a lock
  left by a dead process on this host is taken over.
* **Run cache** (:class:`RunCache`): one JSON per finished unit of work, named by a hash of its full
  canonical configuration (:func:`config_hash`), storing the configuration itself; a lookup returns a
  record only when the stored configuration equals the requested one, so a cache never hands back
  results computed under other settings.
* **Tuning** (:func:`tune`): a grid, a run function and an explicit criterion that must be a
  validation metric (``val_*``); diverged runs are never selected; the cost (runs, seconds) is kept.
* **Training loop** (:func:`train` with :class:`OptimizerStepper` / :class:`ControllerStepper`): any
  ``torch.optim`` optimizer (a learned one through the adapter), learning-rate scheduler or
  hypergradient controller; periodic evaluation; divergence detection (non-finite or too large
  loss, non-finite gradient); checkpoints every ``checkpoint_every`` steps with every random state, so
  a killed run resumes bit-for-bit.
* **Results schema** (:func:`new_results`, :func:`validate_results`, :func:`read_results`,
  :func:`summarize`, :func:`mean_curve`): one layout that every benchmark writes and every figure
  script and leaderboard reads (see :data:`SCHEMA`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import hashlib
import io
import json
import math
import os
import pickle
import platform
import socket
import subprocess
import sys
import tempfile
import time
import uuid
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

__all__ = [
    "RunsError", "OutputBusyError", "CheckpointError", "ResultsFormatError",
    "atomic_write", "write_json", "read_json", "save_torch", "load_torch", "check_writable",
    "OutputLock", "canonical", "config_hash", "file_digest", "RunCache",
    "TuneResult", "tune", "OptimizerStepper", "ControllerStepper", "train",
    "SCHEMA", "environment", "new_results", "validate_results", "read_results", "summarize",
    "mean_curve", "new_record", "log_step", "log_eval",
]


# ============================================================================ errors

class RunsError(ValueError):
    """A problem with a file or folder the protocol layer reads or writes (scripts report it as one
    line). Subclasses say which kind."""


class OutputBusyError(RunsError):
    """The output folder or file is locked by another run."""


class CheckpointError(RunsError):
    """A checkpoint cannot be used: missing, corrupt, not a checkpoint, or written by another setup."""


class ResultsFormatError(RunsError):
    """A results or run-cache file is not valid JSON or does not follow the results schema."""


# ============================================================================ atomic writes

def atomic_write(path: str | os.PathLike, write: Callable[[io.BufferedWriter], None]) -> None:
    """Write ``path`` atomically: ``write(f)`` fills a uniquely named temporary file in the same folder
    (created with its parents if needed), which is flushed, fsynced and renamed over ``path``. On any
    error the temporary is removed and ``path`` is untouched."""
    path = Path(path)
    if path.is_dir():
        raise RunsError(f"cannot write {str(path)!r}: it is a folder, expected a file path")
    path.parent.mkdir(parents=True, exist_ok=True)
    # pid + random suffix: unique per process and per call; "xb" creates it exclusively with the
    # usual umask permissions (mkstemp would make every results file 0600)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise


def _clean_json(obj):
    """JSON-able copy: NaN/inf become None (strict JSON has no NaN), tensors become lists, tuples
    lists, keys strings."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): _clean_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean_json(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _clean_json(obj.detach().cpu().tolist())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _clean_json(dataclasses.asdict(obj))
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path: str | os.PathLike, obj) -> None:
    """Atomic JSON write (NaN/inf stored as null)."""
    data = json.dumps(_clean_json(obj), indent=1, allow_nan=False).encode()
    atomic_write(path, lambda f: f.write(data))


def read_json(path: str | os.PathLike, *, what: str = "JSON file"):
    """Parse a JSON file; a missing or unreadable file or invalid JSON is a :class:`ResultsFormatError`
    naming the file."""
    try:
        with open(path, "rb") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        raise ResultsFormatError(f"{what} {os.fspath(path)!r} does not exist") from None
    except IsADirectoryError:
        raise ResultsFormatError(f"{what} {os.fspath(path)!r} is a folder, expected a JSON file") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ResultsFormatError(f"{what} {os.fspath(path)!r} is not valid JSON ({e})") from None


def save_torch(path: str | os.PathLike, payload) -> None:
    """Atomic ``torch.save``. Store only tensors and plain containers (dict, list, tuple, str, numbers,
    None), so that :func:`load_torch` can read it with ``weights_only=True``."""
    atomic_write(path, lambda f: torch.save(payload, f))


def load_torch(path: str | os.PathLike, *, map_location="cpu", what: str = "checkpoint"):
    """``torch.load(path, weights_only=True)``: nothing in the file can execute code. Raises
    :class:`CheckpointError` (one line, naming the file) when it is missing, truncated, not a torch
    file, or holds objects other than tensors and plain containers."""
    p = os.fspath(path)
    if not os.path.exists(p):
        raise CheckpointError(f"{what} {p!r} does not exist")
    if os.path.isdir(p):
        raise CheckpointError(f"{what} {p!r} is a folder, expected a file")
    try:
        return torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise CheckpointError(f"{what} {p!r} holds objects other than tensors and plain containers; "
                                  "refusing to unpickle it (it could run code)") from None
        raise CheckpointError(f"{what} {p!r} is not a readable torch file ({first})") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, KeyError, AttributeError,
            UnicodeDecodeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{what} {p!r} is not a readable torch file (truncated or corrupt: {first})") from None


def check_writable(path: str | os.PathLike, *, kind: str) -> Path:
    """Validate an output location *before* any work: ``kind="folder"`` (created if missing; must not
    be a file) or ``kind="file"`` (must not be a folder; its folder is created if missing). The folder
    must be writable. Returns the path. Raises :class:`RunsError`."""
    p = Path(path)
    if kind not in ("folder", "file"):
        raise ValueError(f"kind must be 'folder' or 'file', got {kind!r}")
    if kind == "folder" and p.exists() and not p.is_dir():
        raise RunsError(f"output folder {str(p)!r} is an existing file")
    if kind == "file" and p.is_dir():
        raise RunsError(f"output file {str(p)!r} is an existing folder; give a file path")
    folder = p if kind == "folder" else p.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".write-test.")
        os.close(fd)
        os.remove(tmp)
    except OSError as e:
        raise RunsError(f"cannot write to {str(folder)!r}: {e.strerror or e}") from None
    return p


# ============================================================================ output lock

def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OutputLock:
    """An exclusive lock on an output location, held by one run at a time.

    ``OutputLock.for_folder(out)`` locks a results folder (lock file ``out/.l2l_zoo.lock``);
    ``OutputLock.for_file(path)`` locks a single output file (``path.lock`` beside it). Use as a context
    manager or call :meth:`acquire` / :meth:`release`. A second acquisition while the owner lives raises
    :class:`OutputBusyError`; a lock whose owner process is dead (same host) is taken over.
    """

    def __init__(self, lock_path: str | os.PathLike, target: str | os.PathLike):
        self.lock_path, self.target = Path(lock_path), Path(target)
        self.held = False

    @classmethod
    def for_folder(cls, folder: str | os.PathLike) -> "OutputLock":
        return cls(Path(folder) / ".l2l_zoo.lock", folder)

    @classmethod
    def for_file(cls, path: str | os.PathLike) -> "OutputLock":
        p = Path(path)
        return cls(p.with_name(p.name + ".lock"), p)

    def _owner(self) -> dict:
        try:
            return json.loads(self.lock_path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def acquire(self) -> "OutputLock":
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": _now(), "argv": sys.argv}
        for _ in range(3):
            try:
                fd = os.open(self.lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                pid, host = owner.get("pid"), owner.get("host")
                if isinstance(pid, int) and host == me["host"] and not _pid_alive(pid):
                    try:  # stale: its owner died without releasing it
                        os.remove(self.lock_path)
                    except FileNotFoundError:
                        pass
                    continue
                if not owner:  # being written right now by its creator, or garbage: retry once
                    time.sleep(0.05)
                    owner = self._owner()
                    if not owner:
                        raise OutputBusyError(
                            f"{str(self.target)!r} is locked by {str(self.lock_path)!r} (owner unknown); "
                            "if no run is using it, delete the lock file") from None
                raise OutputBusyError(
                    f"{str(self.target)!r} is in use by another run (pid {pid} on {host}, started "
                    f"{owner.get('started')}); choose another output location or wait for it to "
                    "finish") from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise OutputBusyError(f"could not lock {str(self.target)!r} ({str(self.lock_path)!r} keeps reappearing)")

    def release(self) -> None:
        if self.held:
            if self._owner().get("pid") == os.getpid():
                try:
                    os.remove(self.lock_path)
                except FileNotFoundError:
                    pass
            self.held = False

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ============================================================================ configurations and the cache

def canonical(obj):
    """A JSON value that identifies ``obj`` as a configuration: dataclasses become dicts, tuples and
    sets lists (sets sorted), paths and dtypes strings, non-finite floats the strings "nan"/"inf"/
    "-inf" (so that they still distinguish configurations). Raises ``TypeError`` for anything else
    (a configuration must not silently depend on an object's ``repr``)."""
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else repr(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return canonical(dataclasses.asdict(obj))
    if isinstance(obj, Mapping):
        return {str(k): canonical(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [canonical(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted(canonical(v) for v in obj)
    if isinstance(obj, (Path, torch.dtype, torch.device)):
        return str(obj)
    raise TypeError(f"configuration values must be JSON-like (dict, list, str, number, bool, None), got "
                    f"{type(obj).__name__}: {obj!r}")


#: Config fields added after runs were cached, with their defaults. A field at its default is left
#: out of a run's identity (:func:`without_later_defaults`), so runs cached before the field existed
#: still hold, while any other value gives a new identity (a field a script does not have is simply
#: not there). Scripts with later fields of their own pass this mapping extended by them.
LATER_DEFAULTS = {"autocast": None, "meta_batch": 1, "sib_dni_init": "random"}


def without_later_defaults(fields: Mapping, later_defaults: Mapping = LATER_DEFAULTS) -> dict:
    """``fields`` without the entries that sit at their later default (see :data:`LATER_DEFAULTS`)."""
    return {k: v for k, v in fields.items() if not (k in later_defaults and v == later_defaults[k])}


def config_hash(config) -> str:
    """16 hex digits of the SHA-256 of the canonical JSON of ``config`` (keys sorted)."""
    text = json.dumps(canonical(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (for configurations that depend on an input file, e.g. a loaded
    optimizer: its content, not its name, decides the results)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _safe_name(name: str) -> str:
    out = "".join(c if c.isalnum() or c in "-_.=+" else "_" for c in name)
    return out[:80] or "run"


class RunCache:
    """Finished units of work, one JSON per configuration, in ``folder``.

    A file is named ``<name>-<hash>.json`` (``name`` only helps a human find it) and stores the
    canonical ``config`` beside the ``record``. :meth:`get` returns the record only if the file's
    configuration equals the requested one; with ``enabled=False`` (no ``--resume``) nothing is read
    but finished work is still stored, so a later resumed run can reuse it.

    ``config`` must hold *everything* the result depends on (the whole setup, the seed, the
    method's hyperparameters, the content hash of any input file): the cache cannot know what was left
    out. ``hits`` and ``misses`` count lookups.
    """

    def __init__(self, folder: str | os.PathLike, *, enabled: bool):
        self.folder, self.enabled = Path(folder), bool(enabled)
        self.hits = self.misses = 0

    def path(self, config, name: str = "run") -> Path:
        return self.folder / f"{_safe_name(name)}-{config_hash(config)}.json"

    def get(self, config, name: str = "run"):
        if not self.enabled:
            return None
        p = self.path(config, name)
        if not p.exists():
            self.misses += 1
            return None
        d = read_json(p, what="run-cache file")
        if not isinstance(d, dict) or "config" not in d or "record" not in d:
            raise ResultsFormatError(f"run-cache file {str(p)!r} is not a run-cache entry (keys "
                                     f"{sorted(d) if isinstance(d, dict) else type(d).__name__}); delete it")
        if d["config"] != canonical(config):
            self.misses += 1  # a hash collision or a hand-edited file: never reuse it
            return None
        self.hits += 1
        return d["record"]

    def put(self, config, record, name: str = "run") -> None:
        write_json(self.path(config, name), {"config": canonical(config), "record": record})

    def run(self, config, fn: Callable[[], Any], name: str = "run"):
        """The cached record for ``config``, or ``fn()`` computed now and stored."""
        rec = self.get(config, name)
        if rec is None:
            rec = fn()
            self.put(config, rec, name)
        return rec


# ============================================================================ tuning

_MAXIMISE = ("acc", "accuracy")
_MINIMISE = ("loss", "ppl", "perplexity", "error", "gap")


def _score(record, criterion: str):
    final = record.get("final") if isinstance(record, Mapping) else None
    v = final.get(criterion) if isinstance(final, Mapping) else None
    if v is None and isinstance(record, Mapping):
        v = record.get(criterion)
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


@dataclasses.dataclass
class TuneResult:
    """Outcome of :func:`tune`: ``best`` grid value (None if every run failed), the ``criterion`` and
    ``mode``, ``scores`` by grid value (None: diverged or non-finite), and the cost: ``runs`` and
    ``wall_s`` spent tuning. ``records`` holds the runs themselves (not written by :meth:`to_dict`)."""

    best: Any
    criterion: str
    mode: str
    scores: dict
    runs: int
    wall_s: float
    grid: list
    records: list = dataclasses.field(default_factory=list, repr=False)
    note: str = ""

    def to_dict(self) -> dict:
        return {"best": self.best, "criterion": self.criterion, "mode": self.mode, "split": "val",
                "grid": list(self.grid), "scores": dict(self.scores), "runs": self.runs,
                "wall_s": self.wall_s, "note": self.note}


def tune(grid: Sequence, run: Callable[[Any], Mapping], criterion: str, *, mode: str | None = None,
         note: str = "") -> TuneResult:
    """Run ``run(value)`` for every grid value and pick the best by ``criterion``.

    ``criterion`` names a metric of the run's ``record["final"]`` and must be a validation metric
    (``"val_..."``): selecting on test data is never allowed. ``mode`` is ``"min"`` or ``"max"``
    (default: ``max`` for accuracies, ``min`` for losses, perplexities, errors and gaps). Runs whose
    score is missing or non-finite (diverged) are never selected; ties go to the earlier grid value.
    """
    if not isinstance(criterion, str) or not criterion.startswith("val_"):
        raise ValueError(f"tune: criterion must name a validation metric ('val_...'), got {criterion!r}; "
                         "tuning on training or test data is not allowed")
    if mode is None:
        if criterion.endswith(_MAXIMISE):
            mode = "max"
        elif criterion.endswith(_MINIMISE):
            mode = "min"
        else:
            raise ValueError(f"tune: cannot tell whether {criterion!r} is to be minimised or maximised; "
                             "pass mode='min' or mode='max'")
    if mode not in ("min", "max"):
        raise ValueError(f"tune: mode must be 'min' or 'max', got {mode!r}")
    grid = list(grid)
    if not grid:
        raise ValueError("tune: the grid is empty")
    t0 = time.perf_counter()
    scores, records, best, best_score = {}, [], None, None
    for value in grid:
        rec = run(value)
        records.append(rec)
        s = _score(rec, criterion)
        scores[_key(value)] = s
        if s is not None and (best_score is None or (s < best_score if mode == "min" else s > best_score)):
            best, best_score = value, s
    return TuneResult(best=best, criterion=criterion, mode=mode, scores=scores, runs=len(grid),
                      wall_s=time.perf_counter() - t0, grid=grid, records=records,
                      note=note or ("" if best is not None else "every run of the grid diverged"))


def _key(value) -> str:
    return format(value, "g") if isinstance(value, float) else str(value)


# ============================================================================ the training loop

def _split(out):
    """A loss function returns the loss or ``(loss, aux)``."""
    return (out[0], out[1]) if isinstance(out, tuple) else (out, None)


def _grads_finite(params) -> bool:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return True
    return bool(torch.isfinite(torch.stack([g.detach().abs().amax().float() for g in grads
                                            if g.numel()] or [torch.zeros(())])).all())


def _autocast(model: torch.nn.Module, dtype: str | None):
    """``torch.autocast`` on the device of ``model``'s parameters (see
    :func:`l2l_zoo.meta.unroll.autocast`), or a no-op for None."""
    from .meta.unroll import autocast

    if dtype is None:
        return contextlib.nullcontext()
    p = next(iter(model.parameters()), None)
    return autocast("cpu" if p is None else p.device, dtype)


class OptimizerStepper:
    """One training step with any ``torch.optim.Optimizer`` (a learned optimizer through
    :class:`~l2l_zoo.LearnedOptimizerAdapter` included): forward, backward, optional gradient-norm
    clipping, a check that the gradient is finite (a non-finite gradient stops the run before it
    reaches the weights), ``optimizer.step()``, then ``scheduler.step()`` if given (any object with
    ``step()``, ``state_dict()``, ``load_state_dict()``, e.g. a ``torch.optim.lr_scheduler``).

    ``loss_fn(model, batch)`` returns the mean loss or ``(loss, aux)``; ``aux`` (e.g. a language
    model's carried state) is handed to the next ``next_batch`` call of :func:`train`.
    ``autocast``: ``"bfloat16"`` runs ``loss_fn`` under ``torch.autocast`` (mixed precision for the
    model; parameters, gradients and the optimizer stay in their own dtype); None: off.

    ``distributed=True``, under ``torch.distributed``: data-parallel, as ``DistributedDataParallel``
    with equal shares would be: every process passes its own share of the batch, the loss that is
    reported (and checked for divergence) and the gradients (before clipping) are means over the
    processes, so every process takes the same step and they agree on when to stop. Without
    torch.distributed (or with one process) exactly as ``distributed=False``.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Callable, *,
                 scheduler=None, grad_clip: float | None = None, autocast: str | None = None,
                 distributed: bool = False):
        if grad_clip is not None and not (math.isfinite(grad_clip) and grad_clip > 0):
            raise ValueError(f"grad_clip must be a finite number > 0 or None, got {grad_clip!r}")
        _autocast(model, autocast)  # validates the name
        self.autocast = autocast
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.scheduler, self.grad_clip = scheduler, grad_clip
        self._pass_loss = bool(getattr(getattr(optimizer, "lopt", None), "needs_loss", False))
        self._params = [p for g in optimizer.param_groups for p in g["params"]]
        from .baselines import has_eval_point
        self._eval_point = has_eval_point(optimizer)
        from .meta.distributed import dist_world  # (here: l2l_zoo.meta imports this module)
        self.distributed = bool(distributed) and dist_world()[0] > 1
        self.t = 0  # steps taken

    @contextlib.contextmanager
    def evaluating(self):
        """Evaluation context of :func:`train`. A schedule-free optimizer (``train()``/``eval()``
        methods) is switched to its evaluation point for the evaluation, and the training point is
        then restored bit for bit (not by the optimizer's inverse interpolation, whose rounding would
        make the training trajectory depend on how often it is evaluated)."""
        if not self._eval_point:
            yield
            return
        with torch.no_grad():
            saved = [p.detach().clone() for p in self._params]
        self.optimizer.eval()
        try:
            yield
        finally:
            self.optimizer.train()
            with torch.no_grad():
                for p, v in zip(self._params, saved):
                    p.copy_(v)

    def step(self, batch) -> dict:
        self.model.train()
        if self._eval_point:
            self.optimizer.train()
        self.optimizer.zero_grad(set_to_none=True)
        with _autocast(self.model, self.autocast):
            loss, aux = _split(self.loss_fn(self.model, batch))
        value = float(loss.detach())
        if self.distributed:  # the whole batch's loss: every process agrees (a non-finite share included)
            from .meta.distributed import all_mean, mean_over_processes
            value = mean_over_processes(value, loss.device)
        lr = self.optimizer.param_groups[0].get("lr")
        lr = float(lr) if lr is not None else None
        if not math.isfinite(value):
            return {"loss": value, "lr": lr, "aux": aux}
        loss.backward()
        if self.distributed:  # DDP's gradient averaging, one flat all-reduce per dtype
            for p in self._params:
                if p.grad is None:  # unused here: a zero share (every process must reduce the same tensors)
                    p.grad = torch.zeros_like(p)
            all_mean([p.grad for p in self._params])
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self._params, self.grad_clip)
        if not _grads_finite(self._params):
            return {"loss": value, "lr": lr, "aux": aux, "error": "non-finite gradient"}
        if self._pass_loss:
            self.optimizer.step(loss=loss.detach())
        else:
            self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.t += 1
        out = {"loss": value, "lr": lr, "aux": aux}
        d = self.optimizer.param_groups[0].get("d")
        if isinstance(d, (int, float)) and not isinstance(d, bool):  # Prodigy's step-size estimate (lr × d)
            out["d"] = float(d)
        return out

    def state_dict(self) -> dict:
        return {"t": self.t, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": None if self.scheduler is None else self.scheduler.state_dict()}

    def load_state_dict(self, sd: dict) -> None:
        self.t = int(sd["t"])
        self.model.load_state_dict(sd["model"])
        self.optimizer.load_state_dict(sd["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(sd["scheduler"])


class ControllerStepper:
    """One training step driven by a learning-rate controller (HD, RTHO, MARTHE, MLR-SNet's
    Algorithm 2): forward, then ``controller.step(loss)``, which does the backward pass, sets the rate
    and steps the optimizer. The controller's per-step scalars (``controller.last``: rate used,
    hypergradient, μ, β, ...) are logged. A controller that raises ``ScheduleDiverged`` ends the run
    as diverged."""

    def __init__(self, model: torch.nn.Module, controller, loss_fn: Callable, *, autocast: str | None = None):
        _autocast(model, autocast)  # validates the name
        self.model, self.controller, self.loss_fn, self.autocast = model, controller, loss_fn, autocast

    @property
    def t(self) -> int:
        """Steps taken (the controller's count)."""
        return self.controller.t

    def step(self, batch) -> dict:
        from .schedules.controller import ScheduleDiverged

        self.model.train()
        with _autocast(self.model, self.autocast):
            loss, aux = _split(self.loss_fn(self.model, batch))
        value = float(loss.detach())
        if not math.isfinite(value):
            return {"loss": value, "lr": float(self.controller.lr), "aux": aux}
        try:
            self.controller.step(loss)
        except ScheduleDiverged as e:
            return {"loss": value, "lr": float(self.controller.lr), "aux": aux, "error": str(e)}
        out = {k: v for k, v in self.controller.last.items()
               if v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))}
        out["loss"], out["aux"] = value, aux
        return out

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.controller.optimizer.state_dict(),
                "controller": self.controller.state_dict()}

    def load_state_dict(self, sd: dict) -> None:
        self.model.load_state_dict(sd["model"])
        self.controller.optimizer.load_state_dict(sd["optimizer"])
        self.controller.load_state_dict(sd["controller"])


def new_record(steps: int, **extra) -> dict:
    """An empty run record of the results schema (see :data:`SCHEMA`)."""
    return {"steps": steps, "step_log": {}, "eval": {"step": []}, "final": None, "diverged_at": None,
            "error": None, "wall_s": 0.0, **extra}


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def log_step(rec: dict, t: int, out: dict) -> None:
    """Append step ``t``'s numeric scalars of ``out`` to ``rec["step_log"]`` (columns; None where
    missing or non-finite)."""
    log = rec["step_log"]
    for k, v in out.items():
        if k in ("aux", "error") or not (v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))):
            continue
        col = log.setdefault(k, [None] * t)   # a key first seen at step t: earlier steps had none
        col.append(float(v) if _finite(v) else None)
    for k, col in log.items():   # a key missing this step
        if len(col) < t + 1:
            col.append(None)


def log_eval(rec: dict, step: int, metrics: Mapping) -> None:
    """Append an evaluation at ``step`` to ``rec["eval"]`` (columns; None where missing or non-finite)."""
    ev = rec["eval"]
    n = len(ev["step"])
    ev["step"].append(step)
    for k, v in metrics.items():
        col = ev.setdefault(k, [None] * n)
        col.append(float(v) if _finite(v) else None)
    for k, col in ev.items():
        if len(col) < n + 1:
            col.append(None)


def _eval_diverged(metrics: Mapping) -> str | None:
    bad = [k for k, v in metrics.items() if k.endswith("loss") and not _finite(v)]
    return f"non-finite {', '.join(bad)} at evaluation" if bad else None


def _rng_state(device: torch.device):
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def train(stepper, next_batch: Callable[[Any], Any], *, steps: int,
          evaluate: Callable[[], Mapping] | None = None, eval_every: int = 0,
          final: Callable[[], Mapping] | None = None,
          checkpoint: str | os.PathLike | None = None, checkpoint_every: int = 0, identity=None,
          generators: Mapping[str, torch.Generator] | None = None, resume: bool = False,
          divergence_loss: float = math.inf, keep_final: bool = False, progress: bool = True,
          desc: str = "", log: Callable[[str], None] | None = None) -> dict:
    """Train for ``steps`` steps: ``stepper.step(next_batch(aux))`` each step (``aux``: what the
    previous step's loss function returned beside the loss, None at first). Returns a run record
    (:func:`new_record`):

    * ``step_log``: per-step columns of the stepper's scalars (``loss``, ``lr``, and e.g. the
      hypergradient), index i = step i+1, None where non-finite;
    * ``eval``: columns ``step`` and every metric of ``evaluate()``, called at step 0, every
      ``eval_every`` steps and after the last step;
    * ``final``: the last evaluation's metrics plus ``final()``'s (e.g. test metrics computed once at
      the end), or None for a diverged run;
    * ``diverged_at``/``error``: the first step whose loss was non-finite or above
      ``divergence_loss``, whose gradient was non-finite, or after which an evaluated loss was
      non-finite; training stops there (a diverged run is reported, never trained through);
    * ``wall_s``: training time (evaluation included, checkpoints excluded).

    With ``checkpoint`` (a path), the stepper's state, the record so far, the ``generators``' states,
    torch's global RNG (dropout) and the carried ``aux`` are saved atomically every
    ``checkpoint_every`` steps; with ``resume`` an existing checkpoint continues the run exactly. The
    checkpoint must carry the same ``identity`` (any JSON-like description of the run; the caller
    makes it complete) or :class:`CheckpointError` is raised. The checkpoint is removed when the run
    is complete (the caller caches the record), unless ``keep_final``: then the final state is
    checkpointed too, and resuming a finished run restores it without training (for callers that
    need the trained stepper itself, e.g. meta-learned schedule snapshots).

    ``stepper`` is any object with ``step(batch) -> dict`` (``loss``, optional ``aux``, ``error``
    and scalars to log), ``state_dict()``, ``load_state_dict()`` and a ``model`` attribute, e.g.
    :class:`OptimizerStepper`, :class:`ControllerStepper` or
    :class:`~l2l_zoo.meta.MLRSNetMetaTrainer`; if it has an ``evaluating()`` context manager,
    ``evaluate`` and ``final`` run inside it (:meth:`OptimizerStepper.evaluating`: a schedule-free
    optimizer is evaluated at its evaluation point).

    Under ``torch.distributed`` every process runs this loop in step (a data-parallel stepper such
    as :class:`~l2l_zoo.meta.MLRSNetMetaTrainer` returns the same loss on every process, and
    ``evaluate`` must too), every process reads a checkpoint to resume, and only rank 0 writes or
    removes it.
    """
    from tqdm.auto import tqdm

    from .meta.distributed import dist_world
    writer = dist_world()[1] == 0

    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    if checkpoint is not None and checkpoint_every < 0:
        raise ValueError(f"checkpoint_every must be >= 0, got {checkpoint_every!r}")
    generators = dict(generators or {})
    log = log or tqdm.write
    device = next(stepper.model.parameters()).device
    ident = canonical(identity)
    rec, aux, start = None, None, 0
    if checkpoint is not None and resume and os.path.exists(checkpoint):
        ck = load_torch(checkpoint, what="training checkpoint")
        if not isinstance(ck, dict) or ck.get("format") != "l2l_zoo.train_checkpoint":
            raise CheckpointError(f"{os.fspath(checkpoint)!r} is not an l2l_zoo training checkpoint")
        if ck["identity"] != ident:
            raise CheckpointError(f"checkpoint {os.fspath(checkpoint)!r} was written by a different setup "
                                  f"({config_hash(ck['identity'])} vs {config_hash(ident)}); delete it or "
                                  "run without resume")
        try:
            stepper.load_state_dict(ck["stepper"])
            for k, g in generators.items():
                g.set_state(ck["generators"][k])
        except (KeyError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"checkpoint {os.fspath(checkpoint)!r} does not fit this run ({e})") from None
        torch.set_rng_state(ck["rng"]["torch"])
        if device.type == "cuda" and ck["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(ck["rng"]["cuda"], device)
        rec, aux, start = ck["record"], _to_device(ck["aux"], device), int(ck["step"])
        log(f"[{desc or 'train'}] resumed from {os.fspath(checkpoint)} at step {start}")
    if rec is None:
        rec = new_record(steps)

    def save(t):
        if not writer:
            return
        save_torch(checkpoint, {"format": "l2l_zoo.train_checkpoint", "version": 1, "identity": ident,
                                "step": t, "stepper": stepper.state_dict(), "record": rec,
                                "generators": {k: g.get_state() for k, g in generators.items()},
                                "rng": _rng_state(device), "aux": aux})

    evaluating = getattr(stepper, "evaluating", None) or contextlib.nullcontext

    def run_eval(t) -> bool:
        with evaluating():
            m = dict(evaluate())
        log_eval(rec, t, m)
        why = _eval_diverged(m)
        if why:
            rec["diverged_at"], rec["error"] = t, why
            log(f"[{desc or 'train'}] diverged: {why} (step {t}); run stopped")
            return False
        return True

    t0 = time.perf_counter()
    ok = rec["diverged_at"] is None
    if ok and evaluate is not None and start == 0 and not rec["eval"]["step"]:
        ok = run_eval(0)
    bar = tqdm(total=steps, initial=start, desc=desc, disable=not progress, dynamic_ncols=True, leave=False)
    t = start
    try:
        while ok and t < steps:
            out = stepper.step(next_batch(aux))
            aux = out.get("aux")
            log_step(rec, t, out)
            value = out["loss"]
            t += 1
            why = out.get("error")
            if why is None and (not math.isfinite(value) or value > divergence_loss):
                why = f"minibatch loss {value:.4g}" + ("" if not math.isfinite(value) else
                                                       f" > divergence threshold {divergence_loss:g}")
            if why is not None:
                rec["diverged_at"], rec["error"] = t, why
                log(f"[{desc or 'train'}] diverged at step {t}: {why}; run stopped")
                ok = False
                break
            if evaluate is not None and eval_every and (t % eval_every == 0 or t == steps):
                ok = run_eval(t)
                if not ok:
                    break
            bar.update(1)
            if t % 25 == 0:
                bar.set_postfix(loss=f"{value:.4g}")
            if checkpoint is not None and checkpoint_every and t % checkpoint_every == 0 and t < steps:
                rec["wall_s"] += time.perf_counter() - t0
                save(t)
                t0 = time.perf_counter()
    finally:
        bar.close()
        rec["wall_s"] += time.perf_counter() - t0
    if ok and evaluate is not None and rec["eval"]["step"][-1:] != [t]:
        ok = run_eval(t)
    if ok:
        last = {k: v[-1] for k, v in rec["eval"].items() if k != "step"} if rec["eval"]["step"] else {}
        if final is not None:
            with evaluating():
                last.update(final())
        rec["final"] = last
    if checkpoint is not None:
        if keep_final:
            save(t)
        elif writer and os.path.exists(checkpoint):
            os.remove(checkpoint)
    return rec


def _to_device(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, Mapping):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


# ============================================================================ results schema

SCHEMA = "l2l_zoo.results"
SCHEMA_VERSION = 1
"""Every results file is one JSON object:

* ``schema`` = ``"l2l_zoo.results"``, ``version`` = 1, ``benchmark`` (the script's name),
  ``created`` (UTC, ISO 8601);
* ``config``: the script's full configuration; ``environment``: :func:`environment`;
  ``data``: provenance of the data (loader notes, split sizes);
* ``runs``: ``{label: [run record, ...]}`` (one record per seed; a record is :func:`new_record`'s
  layout: ``seed``, ``steps``, ``step_log``, ``eval`` columns, ``final`` metrics, ``diverged_at``,
  ``error``, ``wall_s``, and method-specific keys);
* ``summary``: ``{label: summarize(runs)}``: ``n_seeds``, ``diverged`` and mean/std of every final
  metric over the seeds that did not diverge;
* ``tuning``: ``{label: TuneResult.to_dict()}``: how each tuned method's hyperparameter was chosen
  (criterion on the validation split, scores, cost);
* ``notes``: human-readable remarks; ``wall_s``: the script's total time.

Benchmarks may add top-level keys of their own (e.g. ``meta_training``)."""

_REQUIRED = ("schema", "version", "benchmark", "created", "config", "environment", "runs", "summary", "tuning")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _git_commit() -> str | None:
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> dict:
    """What produced a result: versions, hardware, the command line and the git commit."""
    from . import __version__

    return {"l2l_zoo": __version__, "git_commit": _git_commit(), "python": platform.python_version(),
            "torch": torch.__version__, "platform": platform.platform(),
            "cpu_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "argv": sys.argv}


def new_results(benchmark: str, config, *, data=None) -> dict:
    """An empty results object (see :data:`SCHEMA`) for ``benchmark`` with its full ``config``."""
    return {"schema": SCHEMA, "version": SCHEMA_VERSION, "benchmark": benchmark, "created": _now(),
            "config": _clean_json(config), "environment": environment(), "data": data or {},
            "runs": {}, "summary": {}, "tuning": {}, "notes": [], "wall_s": None}


def validate_results(results, *, benchmark: str | Iterable[str] | None = None, source: str = "results") -> dict:
    """Check the schema; returns ``results``. Raises :class:`ResultsFormatError` naming ``source`` and
    the first problem."""
    if not isinstance(results, dict):
        raise ResultsFormatError(f"{source}: expected a JSON object, got {type(results).__name__}")
    if results.get("schema") != SCHEMA:
        raise ResultsFormatError(f"{source}: not an l2l_zoo results file (schema {results.get('schema')!r}, "
                                 f"expected {SCHEMA!r})")
    if results.get("version") != SCHEMA_VERSION:
        raise ResultsFormatError(f"{source}: results schema version {results.get('version')!r}, this "
                                 f"l2l_zoo reads version {SCHEMA_VERSION}")
    missing = [k for k in _REQUIRED if k not in results]
    if missing:
        raise ResultsFormatError(f"{source}: missing keys {missing}")
    if benchmark is not None:
        allowed = [benchmark] if isinstance(benchmark, str) else list(benchmark)
        if results["benchmark"] not in allowed:
            raise ResultsFormatError(f"{source}: written by benchmark {results['benchmark']!r}, expected "
                                     f"{' or '.join(map(repr, allowed))}")
    if not isinstance(results["runs"], dict) or not all(isinstance(v, list) for v in results["runs"].values()):
        raise ResultsFormatError(f"{source}: 'runs' must map labels to lists of run records")
    for label, recs in results["runs"].items():
        for r in recs:
            if not isinstance(r, dict) or not {"eval", "final", "diverged_at"} <= set(r):
                raise ResultsFormatError(f"{source}: run {label!r} has a record without 'eval', 'final' and "
                                         "'diverged_at'")
    return results


def read_results(path: str | os.PathLike, *, benchmark: str | Iterable[str] | None = None) -> dict:
    """Read and validate a results file (see :func:`validate_results`)."""
    return validate_results(read_json(path, what="results file"), benchmark=benchmark,
                            source=repr(os.fspath(path)))


def summarize(records: Sequence[Mapping], metrics: Iterable[str] | None = None) -> dict:
    """``n_seeds``, ``diverged``, and for every final metric (all of them by default) its mean and
    population std (``<m>_std``) over the records that did not diverge (None if all did), plus
    ``wall_s_mean``."""
    import numpy as np

    ok = [r for r in records if r.get("diverged_at") is None and r.get("final")]
    if metrics is None:
        metrics = list(dict.fromkeys(k for r in ok for k in r["final"]))
    out = {"n_seeds": len(records), "diverged": len(records) - len(ok)}
    for m in metrics:
        vals = [r["final"][m] for r in ok if _finite(r["final"].get(m))]
        out[m] = float(np.mean(vals)) if vals else None
        out[f"{m}_std"] = float(np.std(vals)) if vals else None
    walls = [r["wall_s"] for r in records if _finite(r.get("wall_s"))]
    out["wall_s_mean"] = float(np.mean(walls)) if walls else None
    return out


def mean_curve(records: Sequence[Mapping], metric: str, *, include_diverged: bool = False):
    """``(steps, mean, std)`` of an evaluated ``metric`` over records (non-diverged ones unless there
    are none or ``include_diverged``), truncated to the shortest; None entries are ignored."""
    import numpy as np

    ok = [r for r in records if include_diverged or r.get("diverged_at") is None] or list(records)
    ok = [r for r in ok if metric in r.get("eval", {})]
    if not ok:
        return [], [], []
    n = min(len(r["eval"]["step"]) for r in ok)
    arr = np.array([[np.nan if v is None else v for v in r["eval"][metric][:n]] for r in ok], dtype=float)
    with np.errstate(all="ignore"):
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            mean, std = np.nanmean(arr, 0), np.nanstd(arr, 0)
    return (list(ok[0]["eval"]["step"][:n]), [None if np.isnan(v) else float(v) for v in mean],
            [0.0 if np.isnan(v) else float(v) for v in std])
