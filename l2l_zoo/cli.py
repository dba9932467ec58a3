"""Command-line helpers shared by the benchmark and figure scripts: one-line errors, flag parsing,
device selection, output locations and learning-curve plots. Writing, caching, tuning and the results
schema live in :mod:`l2l_zoo.runs` (``write_json``, ``read_json`` and ``environment`` are re-exported
here for the scripts)."""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
from typing import Any, Callable

import torch

from . import runs
from .runs import environment, read_json, write_json

__all__ = ["ArgumentParser", "UsageError", "parse_seeds", "parse_floats", "parse_choices", "parse_kv", "parse_autocast",
           "resolve_device", "torchrun_world_size", "output_folder", "output_file", "write_json", "read_json",
           "environment", "run_main", "plot_curves"]


class UsageError(ValueError):
    """A user mistake on the command line: reported as one line, exit status 2."""


class _DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: X)`` to a flag's help, except where there is nothing to say: a default of
    None (the help says what happens instead) or an on/off switch."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump) and defaults shown in ``--help``."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


def parse_seeds(spec: str) -> list[int]:
    """``"3"`` → [0, 1, 2]; ``"0,5,7"`` → [0, 5, 7]."""
    try:
        if "," in spec:
            seeds = [int(s) for s in spec.split(",") if s.strip()]
        else:
            n = int(spec)
            if n < 1:
                raise ValueError
            seeds = list(range(n))
    except ValueError:
        raise UsageError(f"--seeds must be a count >= 1 or a comma list of integers, got {spec!r}") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise UsageError(f"--seeds must be distinct integers >= 0, got {spec!r}")
    return seeds


def parse_floats(spec: str, flag: str, *, positive: bool = True) -> list[float]:
    try:
        vals = [float(s) for s in spec.split(",") if s.strip()]
    except ValueError:
        raise UsageError(f"{flag} must be a comma list of numbers, got {spec!r}") from None
    if not vals or any(not math.isfinite(v) or (positive and v <= 0) for v in vals):
        raise UsageError(f"{flag} must be a non-empty list of {'positive ' if positive else ''}numbers, "
                         f"got {spec!r}")
    return vals


def parse_choices(spec: str, allowed, flag: str) -> list[str]:
    """``none`` (an empty list) or a comma list of names from ``allowed``."""
    if spec.strip() == "none":
        return []
    vals = [v.strip() for v in spec.split(",") if v.strip()]
    if not vals or any(v not in allowed for v in vals):
        raise UsageError(f"{flag} must be 'none' or a comma list from {list(allowed)}, got {spec!r}")
    return vals


def _auto(value: str):
    low = value.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def parse_kv(spec: str | None, flag: str) -> dict[str, Any]:
    """``"a=1,b=x,c=true"`` → {"a": 1, "b": "x", "c": True}."""
    out = {}
    for item in filter(None, (s.strip() for s in (spec or "").split(","))):
        if "=" not in item:
            raise UsageError(f"{flag}: expected key=value, got {item!r}")
        k, v = (s.strip() for s in item.split("=", 1))
        if k in out:
            raise UsageError(f"{flag}: key {k!r} given twice ({spec!r})")
        out[k] = _auto(v)
    return out


def parse_autocast(value: str) -> str | None:
    """``--autocast``: ``"none"`` (float32, returned as ``None``) or one of the autocast dtypes."""
    from .meta.unroll import AUTOCAST_DTYPES  # here, so that importing cli does not load l2l_zoo.meta
    if value not in ("none", *AUTOCAST_DTYPES):
        raise UsageError(f"--autocast must be one of {['none', *AUTOCAST_DTYPES]}, got {value!r}")
    return None if value == "none" else value


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    if name not in ("cpu", "cuda"):
        raise UsageError(f"--device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


def torchrun_world_size() -> int:
    """The number of processes ``torchrun`` started (``WORLD_SIZE``; 1 without torchrun), known
    before the process group exists, so that arguments can be checked before any work."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def init_distributed(device: torch.device) -> tuple[int, int]:
    """Join the process group that ``torchrun`` describes in the environment (``WORLD_SIZE`` > 1;
    gloo on CPU, NCCL on CUDA, each process on GPU ``LOCAL_RANK``) and return (world size, rank);
    (1, 0) without torchrun. Meta-training then all-reduces meta-gradients over the processes
    (:class:`l2l_zoo.meta.MetaTrainer`)."""
    if torchrun_world_size() <= 1:
        return 1, 0
    d = torch.distributed
    if not d.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        d.init_process_group("nccl" if device.type == "cuda" else "gloo")
    from .meta.distributed import dist_world
    return dist_world()


def distributed_main(device: torch.device, out: str | os.PathLike, rank0: Callable[[], int],
                     worker: Callable[[], int]) -> int:
    """A script's main under ``torchrun`` or alone: join the process group (:func:`init_distributed`),
    then rank 0 locks the output folder ``out`` (:func:`output_folder`) and runs ``rank0()`` while
    every other rank runs ``worker()`` (its share of the parallel work, writing nothing); the group
    is torn down on every way out (a normal end has done so already, before rank 0 works alone).

    Before any work the ranks agree to start: rank 0 broadcasts whether it got its output folder,
    so when it cannot (a file, unwritable, busy with another run) it prints that one-line error and
    every other rank stops with a one-line error of its own, instead of failing later in a
    collective with a traceback (or waiting for the backend's timeout)."""
    from .meta.distributed import rank0_decides
    _, rank = init_distributed(device)
    try:
        with contextlib.ExitStack() as stack:
            failure: BaseException | None = None
            if rank == 0:
                try:
                    stack.enter_context(output_folder(out))
                except Exception as e:  # noqa: BLE001 - re-raised below, after telling the others
                    failure = e
            if not rank0_decides(failure is None, device) and rank != 0:
                raise UsageError(f"rank {rank}: not started, because rank 0 could not use its "
                                 f"output folder {os.fspath(out)!r} (rank 0's error says why)")
            if failure is not None:
                raise failure
            return rank0() if rank == 0 else worker()
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():  # an error path
            torch.distributed.destroy_process_group()


def output_folder(path: str | os.PathLike) -> "runs.OutputLock":
    """Validate an output folder before any work (created if missing, writable, not a file) and lock
    it against a second concurrent run; use as ``with output_folder(cfg.out): ...``."""
    return runs.OutputLock.for_folder(runs.check_writable(path, kind="folder"))


def output_file(path: str | os.PathLike) -> "runs.OutputLock":
    """The same for a single output file (e.g. a results JSON path): not a folder, its folder
    writable, locked while the script runs."""
    return runs.OutputLock.for_file(runs.check_writable(path, kind="file"))


def run_main(main: Callable[[], int | None]) -> None:
    """Run a script's ``main``, turning user mistakes into one-line errors with non-zero exits:

    * 2: a bad flag or value (``UsageError``), a bad input or output file, a checkpoint or results
      file that cannot be used, an output folder in use by another run, or any ``ValueError`` /
      ``KeyError`` / ``TypeError`` the library raised about its arguments (their messages name the
      parameter and what is allowed);
    * 3: data not found or unreadable;
    * 4: training diverged beyond recovery (repeated non-finite meta-updates, non-finite updates);
    * 130: interrupted (a later ``--resume`` continues).

    Set ``L2L_ZOO_TRACEBACK=1`` to get the full traceback instead (for bug reports)."""
    from .meta.trainer import MetaTrainingDiverged
    from .tasks import data as _data

    data_errors = tuple(c for c in (getattr(_data, "DataNotFoundError", None),
                                    getattr(_data, "DataFormatError", None)) if isinstance(c, type))
    prog = os.path.basename(sys.argv[0])

    def fail(code: int, message: str):
        line = " ".join(str(message).split())  # one line, whatever the message held
        sys.stderr.write(f"{prog}: error: {line}\n")
        sys.exit(code)

    try:
        code = main()
    except KeyboardInterrupt:
        sys.stderr.write(f"{prog}: interrupted; rerun with --resume to continue\n")
        sys.exit(130)
    except BrokenPipeError:  # output piped into e.g. `head`, which closed it: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (Python docs' recipe)
        sys.exit(1)
    except Exception as e:  # noqa: BLE001 - sorted below; anything else is a bug and re-raised
        if os.environ.get("L2L_ZOO_TRACEBACK"):
            raise
        if isinstance(e, UsageError):
            fail(2, e)
        if data_errors and isinstance(e, data_errors):
            fail(3, e)
        if isinstance(e, (MetaTrainingDiverged, FloatingPointError)):
            fail(4, e)
        if isinstance(e, KeyError):
            fail(2, e.args[0] if e.args else e)
        if isinstance(e, (ValueError, TypeError)):
            fail(2, e)
        if isinstance(e, OSError) and e.filename is not None:
            fail(2, f"{e.strerror or e}: {e.filename!r}")
        raise
    sys.exit(code or 0)


def plot_curves(path, series: dict[str, dict], *, title: str = "", panels=None, logy: bool = True) -> None:
    """Learning-curve figure: one panel per (key, label) in ``panels``; ``series`` maps a legend
    label to ``{"x": [...], key: [...], ...}`` (mean curves) with optional ``key + "_std"``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = panels or [("train_loss", "train loss"), ("test_loss", "test loss"), ("test_acc", "test accuracy")]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8))
    axes = [axes] if len(panels) == 1 else axes
    for ax, (key, label) in zip(axes, panels):
        for name, s in series.items():
            if key not in s:
                continue
            xs, ys = s.get(f"{key}_x", s["x"]), s[key]
            pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
            if not pts:
                continue
            x, y = zip(*pts)
            line, = ax.plot(x, y, label=name)
            std = s.get(f"{key}_std")
            if std:
                lo = [a - b for a, b in zip(y, std[:len(y)])]
                hi = [a + b for a, b in zip(y, std[:len(y)])]
                ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2)
        ax.set_xlabel("optimizee step")
        ax.set_ylabel(label)
        if logy and "loss" in key:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
