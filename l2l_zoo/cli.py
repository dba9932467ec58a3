"""Command-line helpers shared by the benchmark and figure scripts: one-line errors, flag parsing,
device selection, atomic JSON output and learning-curve plots."""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
from typing import Any, Callable

import torch

__all__ = ["ArgumentParser", "RunCache", "UsageError", "parse_seeds", "parse_floats", "parse_kv", "resolve_device",
           "write_json", "read_json", "environment", "run_main", "plot_curves"]


class UsageError(ValueError):
    """A user mistake on the command line: reported as one line, exit status 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump) and defaults shown in ``--help``."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
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
        out[k] = _auto(v)
    return out


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    if name not in ("cpu", "cuda"):
        raise UsageError(f"--device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


def environment() -> dict:
    """What produced a result: versions and hardware."""
    return {"python": platform.python_version(), "torch": torch.__version__,
            "platform": platform.platform(), "cpu_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "argv": sys.argv}


def _clean(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _clean(obj.tolist())
    return obj


def write_json(path: str | os.PathLike, obj) -> None:
    """Atomic JSON write (NaN/inf become null, which strict JSON readers accept). The temporary
    file is per process, so that two runs sharing an output folder never move each other's."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{os.fspath(path)}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(_clean(obj), f, indent=1)
    os.replace(tmp, path)


def read_json(path):
    with open(path) as f:
        return json.load(f)


class RunCache:
    """One JSON per finished run, keyed by a label and tagged with the run's configuration
    ``signature``; with ``enabled`` (--resume) a cached run with the same signature is reused."""

    def __init__(self, folder: str, signature: dict, enabled: bool):
        self.folder, self.signature, self.enabled = folder, signature, enabled
        os.makedirs(folder, exist_ok=True)

    def _path(self, key):
        return os.path.join(self.folder, key.replace("/", "_") + ".json")

    def get(self, key):
        p = self._path(key)
        if self.enabled and os.path.exists(p):
            d = read_json(p)
            if d.get("signature") == self.signature:
                return d["run"]
        return None

    def put(self, key, run):
        write_json(self._path(key), {"signature": self.signature, "run": run})


def run_main(main: Callable[[], int | None]) -> None:
    """Run a script's ``main`` turning user mistakes into one-line errors with non-zero exits."""
    from .meta.trainer import MetaTrainingDiverged
    from .tasks.data import DataNotFoundError

    prog = os.path.basename(sys.argv[0])
    try:
        code = main()
    except UsageError as e:
        sys.stderr.write(f"{prog}: error: {e}\n")
        sys.exit(2)
    except DataNotFoundError as e:
        sys.stderr.write(f"{prog}: error: {e}\n")
        sys.exit(3)
    except MetaTrainingDiverged as e:
        sys.stderr.write(f"{prog}: error: {e}\n")
        sys.exit(4)
    except KeyboardInterrupt:
        sys.stderr.write(f"{prog}: interrupted; rerun with --resume to continue\n")
        sys.exit(130)
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
