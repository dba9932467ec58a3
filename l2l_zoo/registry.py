"""Build learned optimizers by name, and save/load them with their full configuration."""
from __future__ import annotations

import errno
import inspect
import numbers
import os
import re

import torch

from . import runs
from .base import LearnedOptimizer
from .optimizers import REGISTRY

__all__ = ["create", "save", "load", "from_parts", "available", "LearnedOptimizerFileError"]

_FORMAT = "l2l_zoo.learned_optimizer"
_VERSION = 1
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's (zip) archive format; save() always writes it


class LearnedOptimizerFileError(ValueError):
    """A file given to :func:`load` is not a usable l2l_zoo learned-optimizer file. The message is
    one line naming the file and what was found in it."""


def available() -> list[str]:
    """Names accepted by :func:`create`."""
    return sorted(REGISTRY)


def create(name: str, **options) -> LearnedOptimizer:
    """Build a learned optimizer by registry name with keyword options.

    >>> create("simple", bias=True).num_meta_parameters()
    143
    Unknown names raise ``KeyError``, unknown options ``TypeError``, listing what is allowed; an
    option whose value has the wrong kind for its default (a string for a number, a number for a
    flag) raises ``TypeError`` before anything is built (so a typo such as ``output_scale="abc"``
    cannot surface later, in the middle of training).
    """
    if name not in REGISTRY:
        raise KeyError(f"unknown optimizer {name!r}; choose from {available()}")
    cls = REGISTRY[name]
    allowed = cls.option_names()
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(f"unknown option(s) {unknown} for optimizer {name!r}; allowed: {allowed}")
    defaults = {k: v.default for k, v in inspect.signature(cls.__init__).parameters.items() if k in allowed}
    for key, value in options.items():
        _check_kind(name, key, value, defaults.get(key, inspect.Parameter.empty))
    return cls(**options)


def _check_kind(name: str, key: str, value, default) -> None:
    """``value`` must be of the kind of ``default`` (bool, integer, real number, string, sequence);
    options whose default is None or absent are checked by the constructor itself."""
    def real(v):
        return isinstance(v, numbers.Real) and not isinstance(v, bool)

    kinds = ((bool, lambda v: isinstance(v, bool), "true or false"),
             (int, lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool), "an integer"),
             (float, real, "a number"),
             (str, lambda v: isinstance(v, str), "a string"),
             ((tuple, list), lambda v: isinstance(v, (tuple, list)), "a sequence"))
    for kind, ok, what in kinds:
        if isinstance(default, kind):
            if not ok(value):
                raise TypeError(f"option {key!r} of optimizer {name!r} must be {what}, got {value!r}")
            return


# ------------------------------------------------------------------------------------------ save

_PLAIN = (str, int, float, bool, type(None))


def _check_plain(obj, where: str) -> None:
    """``extra`` must be what ``torch.load(weights_only=True)`` reads back: nested dicts (str keys),
    lists and tuples of str/int/float/bool/None and tensors. Anything else would save fine and then
    make the file unreadable, so it is refused at save time."""
    if type(obj) in _PLAIN or isinstance(obj, torch.Tensor):  # exact types: np.float64 is a float
        return
    if type(obj) is dict:
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(f"save: extra keys must be strings, got {k!r} at {where}")
            _check_plain(v, f"{where}[{k!r}]")
        return
    if type(obj) in (list, tuple):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
        return
    raise TypeError(f"save: extra must hold only dicts, lists, tuples, str, int, float, bool, None and "
                    f"tensors, got {type(obj).__name__} at {where}")


def save(lopt: LearnedOptimizer, path: str | os.PathLike, **extra) -> None:
    """Write name, configuration and meta-parameters (plus JSON-like ``extra``, e.g. the training
    config) so that :func:`load` rebuilds an identical optimizer. Written atomically."""
    if not isinstance(lopt, LearnedOptimizer):
        raise TypeError(f"save: lopt must be a LearnedOptimizer, got {type(lopt).__name__}")
    _check_plain(extra, "extra")
    payload = {"format": _FORMAT, "version": _VERSION, "name": lopt.name, "config": lopt.config,
               "state_dict": {k: v.detach().cpu() for k, v in lopt.state_dict().items()},
               "extra": extra}
    runs.save_torch(path, payload)


# ------------------------------------------------------------------------------------------ load

def _describe(obj) -> str:
    """What a torch file holds, in a few words (for error messages)."""
    if isinstance(obj, dict):
        keys = sorted(map(str, obj))
        shown = keys[:6] + (["..."] if len(keys) > 6 else [])
        hint = ""
        if keys and all(isinstance(v, torch.Tensor) for v in obj.values()):
            hint = " (a plain state dict?)"
        elif set(keys) == {"state", "param_groups"}:
            hint = " (a torch.optim state dict?)"
        return f"a dict with keys {shown}{hint}"
    if isinstance(obj, torch.Tensor):
        return f"a tensor of shape {tuple(obj.shape)}"
    return f"a {type(obj).__name__}"


def _sniff(head: bytes) -> str:
    """What a file that is not a torch archive looks like, from its first bytes."""
    if not head:
        return "an empty file"
    if head[:1] == b"\x80":
        return "a plain pickle, not a torch.save archive (not unpickled)"
    text = None
    for cut in range(4):  # the 64-byte head may end inside a multi-byte character
        try:
            text = head[:len(head) - cut].decode("utf-8")
            break
        except UnicodeDecodeError:
            pass
    if text is not None and all(c.isprintable() or c in "\t\r\n" for c in text):
        first = text.strip().splitlines()[0][:40] if text.strip() else ""
        return f"a text file starting {first!r}"
    return f"binary data starting {head[:8].hex(' ')}"


def _torch_reason(e: Exception) -> str:
    """torch.load's failure in one line, without its advice to retry with ``weights_only=False``."""
    msg = str(e)
    m = re.search(r"WeightsUnpickler error: ([^\n]*?)(?: was not an allowed global|\.? Please|\n|$)", msg)
    if m:
        return f"pickled objects that are not tensors or plain data (refused, not executed: {m.group(1)})"
    if "Weights only load failed" in msg:
        return "pickled objects that are not tensors or plain data (refused, not executed)"
    first = msg.strip().split("\n")[0].split(". ")[0].strip()
    return f"a damaged or truncated torch archive ({type(e).__name__}{': ' + first if first else ''})"


def from_parts(name, config: dict, state: dict, bad=None) -> LearnedOptimizer:
    """The learned optimizer ``name`` with options ``config`` and meta-parameters ``state`` (a dict
    of tensors), after checking them: a registered name, known options, meta-parameter names and
    shapes matching that configuration, finite values; built in the floating dtype of ``state``
    (float64 stays float64). ``bad(what) -> Exception`` makes the error
    for a failed check (default: ``LearnedOptimizerFileError(what)``); :func:`load` and the zoo's
    weight files build through it."""
    bad = bad or LearnedOptimizerFileError
    if name not in REGISTRY:
        raise bad(f"optimizer {name!r} is not registered; registered: {available()}")
    allowed = REGISTRY[name].option_names()
    unknown = sorted(set(config) - set(allowed))
    if unknown:
        raise bad(f"unknown option(s) {unknown} for optimizer {name!r}; allowed: {allowed}")
    try:
        lopt = create(name, **config)
    except (TypeError, ValueError) as e:
        raise bad(f"invalid config for optimizer {name!r}: {e}") from None
    expected = lopt.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise bad(f"meta-parameters do not match optimizer {name!r} with its config: missing {missing}, "
                  f"unexpected {unexpected}")
    for k, ref in expected.items():
        v = state[k]
        if not isinstance(v, torch.Tensor):
            raise bad(f"meta-parameter {k!r} should be a tensor, found {_describe(v)}")
        if v.shape != ref.shape:
            raise bad(f"meta-parameter {k!r} has shape {tuple(v.shape)}, optimizer {name!r} with its "
                      f"config needs {tuple(ref.shape)}")
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            n_bad = int((~torch.isfinite(v)).sum())
            raise bad(f"meta-parameter {k!r} has {n_bad} non-finite (NaN/inf) value(s) of {v.numel()}")
    dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
    if len(dtypes) == 1:  # the precision it was saved in (load_state_dict alone would cast to float32)
        lopt = lopt.to(dtypes.pop())
    lopt.load_state_dict(state)
    return lopt


def load(path: str | os.PathLike, map_location="cpu", *, with_extra: bool = False):
    """Restore a learned optimizer written by :func:`save` (``with_extra`` also returns ``extra``),
    on the device ``map_location`` (a device or its name; the file is read on the CPU, so a CUDA
    device that is missing is reported by ``.to``, not mistaken for a damaged file).

    The file is read with ``torch.load(weights_only=True)`` (pickled code is refused, never run)
    and checked before anything is built: a registered optimizer name, known options, meta-parameter
    names and shapes matching that configuration, finite values. A missing path raises
    ``FileNotFoundError``; anything else that is not a usable file raises
    :class:`LearnedOptimizerFileError` (a ``ValueError``) with a one-line message naming the file.
    """
    p = os.fspath(path)
    if not os.path.exists(p):
        raise FileNotFoundError(errno.ENOENT, "no such learned-optimizer file", p)

    def bad(what: str):
        return LearnedOptimizerFileError(f"{p!r} is not a usable l2l_zoo learned-optimizer file: {what}")

    if os.path.isdir(p):
        raise bad("it is a directory")
    with open(p, "rb") as f:
        head = f.read(64)
    if head[:4] != _ZIP_MAGIC:
        raise bad(f"found {_sniff(head)}")
    try:
        payload = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged archive: RuntimeError, EOFError, OSError(EINVAL), KeyError, ...
        raise bad(f"found {_torch_reason(e)}") from None
    if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
        raise bad(f"found {_describe(payload)}")
    version = payload.get("version")
    if version != _VERSION:
        raise bad(f"format version {version!r}, this l2l_zoo reads version {_VERSION}")
    payload = {"extra": {}, **payload}
    for key, kind in (("name", str), ("config", dict), ("state_dict", dict), ("extra", dict)):
        if not isinstance(payload.get(key), kind):
            raise bad(f"entry {key!r} should be a {kind.__name__}, found {_describe(payload.get(key))}")
    lopt = from_parts(payload["name"], payload["config"], payload["state_dict"], bad)
    if map_location is not None:
        lopt = lopt.to(map_location)
    return (lopt, payload["extra"]) if with_extra else lopt
