"""Few-shot datasets by name, and the file-reading rules every reader shares.

* :func:`load_fewshot` ``(name, data_dir, **options)`` → ``{"train", "val", "test"}``
  :class:`~fewshot.data.episodes.FewShotSplit` for each name of :data:`DATASETS`; an unknown name is a
  ``KeyError`` listing the names.
* Where a dataset is looked for (:func:`find_layout`): the folders of
  :func:`l2l_zoo.tasks.data.resolve_data_dirs` (``data_dir``, ``$L2L_ZOO_DATA``, ``./data``), each one's
  usual sub-folders for the dataset first, then the folder itself. The first folder holding every file
  of one of the dataset's layouts is read; when none does, one :class:`FewShotDataError` line names the
  layouts, every folder searched and the first incomplete layout it saw (which file is missing).
* How files are read: pickles by :func:`read_pickle`, an unpickler that builds only numpy arrays,
  dicts, lists, tuples, bytes, strings and numbers and refuses every other global, so a tampered file
  cannot run code; a file that starts with ``<`` is an HTML page saved under a data file's name (the
  usual broken download, "invalid load key '<'") and is reported as such. Nothing is ever downloaded.
* Images stay ``uint8`` (M, C, H, W): readers fill one preallocated tensor class by class (no float
  copy of a split, and no second full copy where the file allows streaming); :func:`channel_stats`
  computes the per-channel mean/std of the training split exactly in integer arithmetic.
"""
from __future__ import annotations

import collections
import contextlib
import importlib
import io
import json
import pickle
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from l2l_zoo.tasks.data import DataNotFoundError, resolve_data_dirs

from .episodes import FewShotDataError, FewShotSplit

__all__ = ["DATASETS", "load_fewshot", "find_layout", "read_pickle", "read_json", "open_hdf5", "decode_image",
           "channel_stats", "make_splits", "pick", "as_str", "check_not_html", "one_line", "SPLITS"]

SPLITS = ("train", "val", "test")

# name -> (module of this package, loader); loaders are imported on first use
_LOADERS = {
    "omniglot-small": ("omniglot", "load_omniglot_small"),
    "omniglot": ("omniglot", "load_omniglot"),
    "miniimagenet": ("miniimagenet", "load_miniimagenet"),
    "tieredimagenet": ("tieredimagenet", "load_tieredimagenet"),
    "cifarfs": ("cifarfs", "load_cifarfs"),
}
DATASETS = tuple(_LOADERS)

HINT = "pass data_dir= or set L2L_ZOO_DATA"


def load_fewshot(name: str, data_dir=None, **options) -> dict[str, FewShotSplit]:
    """The ``{"train", "val", "test"}`` splits of dataset ``name`` (one of :data:`DATASETS`);
    ``options`` go to its reader (e.g. ``layout="pkl"``)."""
    if name not in _LOADERS:
        raise KeyError(f"unknown few-shot dataset {name!r}; choose from {list(DATASETS)}")
    module, fn = _LOADERS[name]
    loader = getattr(importlib.import_module(f"{__package__}.{module}"), fn)
    return loader(data_dir, **options)


# ---------------------------------------------------------------------------------- locating files

def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def find_layout(dataset: str, data_dir, subdirs: Sequence[str], layouts: dict[str, list[tuple[str, ...]]],
                describe: dict[str, str], layout: str = "auto") -> tuple[str, Path, list[Path], list[Path]]:
    """``(layout name, folder, files, data folders)`` of the first folder that holds every file of a
    layout. ``layouts`` maps a layout name to its files, each a tuple of accepted spellings (relative
    paths; a folder counts when it exists); ``describe`` gives each layout's one-line description;
    ``layout`` restricts the search to one layout."""
    if layout != "auto" and layout not in layouts:
        raise ValueError(f"layout must be 'auto' or one of {list(layouts)}, got {layout!r}")
    try:
        dirs = resolve_data_dirs(data_dir)
    except DataNotFoundError as e:
        raise FewShotDataError(f"{dataset} not found: {e}") from None
    folders = [p for d in dirs for p in [*(d / s for s in subdirs), d] if p.is_dir()]
    wanted = list(layouts) if layout == "auto" else [layout]
    incomplete = None
    for folder in folders:
        for name in wanted:
            found = [next((folder / n for n in alts if (folder / n).exists()), None) for alts in layouts[name]]
            if all(found):
                return name, folder, found, dirs
            if any(found) and incomplete is None:
                missing = [" or ".join(alts) for alts, f in zip(layouts[name], found) if f is None]
                incomplete = f"{folder} has part of the {name} layout but not {', '.join(missing)}"
    where = (f"looked in {[str(d) for d in dirs]} and their sub-folders {list(subdirs)}" if dirs
             else "no data folder to look in (data_dir not given, L2L_ZOO_DATA not set, no ./data)")
    need = "; or ".join(f"({n}) {describe[n]}" for n in wanted)
    raise FewShotDataError(f"{dataset} not found: need {need}; {where}"
                           + (f"; incomplete: {incomplete}" if incomplete else "") + f"; {HINT}")


def check_not_html(path: Path, expected: str) -> None:
    try:
        with open(path, "rb") as f:
            head = f.read(256).lstrip()
    except OSError as e:
        raise FewShotDataError(f"{path}: cannot be read ({one_line(e)}); expected {expected}") from None
    if head.startswith(b"<"):
        raise FewShotDataError(f"{path} looks like an HTML page, not {expected} (a broken download: fetch the "
                               "file again)")


# ------------------------------------------------------------------------------ reading pickles

def _np_globals() -> dict[str, object]:
    # numpy's own reconstructors, taken from objects rather than by module path (numpy 1 pickles name
    # numpy.core.*, numpy 2 pickles numpy._core.*; both resolve to these)
    return {"_reconstruct": np.ndarray.__reduce__(np.zeros(0))[0],
            "scalar": np.int64(0).__reduce__()[0],
            "_frombuffer": np.zeros(1).__reduce_ex__(5)[0]}


class _Refused(pickle.UnpicklingError):
    pass


class _SafeUnpickler(pickle.Unpickler):
    """Builds numpy arrays (and numpy scalars and dtypes), dicts, lists, tuples, bytes, strings and
    numbers; every other global is refused before anything is called."""

    _NUMPY = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
              ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
              ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer")}

    def find_class(self, module, name):
        if (module, name) in self._NUMPY:
            return _np_globals()[name]
        if (module, name) in (("numpy", "ndarray"), ("numpy", "dtype")):
            return getattr(np, name)
        if (module, name) == ("_codecs", "encode"):  # how Python 3 pickles bytes at protocol 2
            return _latin1_encode
        if (module, name) in (("collections", "OrderedDict"), ("builtins", "bytearray"),
                              ("__builtin__", "bytearray")):
            return collections.OrderedDict if name == "OrderedDict" else bytearray
        raise _Refused(f"{module}.{name}")


def _latin1_encode(text, encoding="latin1"):
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _Refused(f"_codecs.encode({type(text).__name__}, {encoding!r})")
    return text.encode("latin1")


def read_pickle(path: Path, expected: str, *, encoding: str = "latin1"):
    """The object in pickle ``path`` (``encoding`` decodes Python 2 strings: ``"bytes"`` keeps them
    as bytes); :class:`FewShotDataError` naming the file and ``expected`` when it is an HTML page,
    not a pickle, truncated, or asks for anything but numpy arrays and builtin containers."""
    check_not_html(path, expected)
    try:
        with open(path, "rb") as f:
            return _SafeUnpickler(f, encoding=encoding).load()
    except _Refused as e:
        raise FewShotDataError(f"{path}: refused to unpickle {e} (only numpy arrays, dicts, lists, bytes, strings "
                               f"and numbers are read, so the file cannot run code); expected {expected}") from None
    except Exception as e:  # truncated / corrupt / not a pickle: many exception types
        raise FewShotDataError(f"{path}: not a readable pickle ({one_line(e)}); expected {expected}") from None


def read_json(path: Path, expected: str):
    check_not_html(path, expected)
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FewShotDataError(f"{path}: not a readable JSON file ({one_line(e)}); expected {expected}") from None


def open_hdf5(path: Path, expected: str):
    """``h5py.File(path, "r")``; h5py is imported here, so it is needed only for these layouts."""
    try:
        import h5py
    except ImportError:
        raise FewShotDataError(f"reading {path} needs h5py, an optional extra: pip install -e '.[fewshot]' "
                               "(or pip install h5py)") from None
    check_not_html(path, expected)
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise FewShotDataError(f"{path}: not a readable HDF5 file ({one_line(e)}); expected {expected}") from None




@contextlib.contextmanager
def hdf5_classes(data_path: Path, labels_path: Path, expected: str, what: str):
    """The torchmeta hdf5 layout: ``labels_path`` is a JSON list of the split's class names, each a
    dataset under ``datasets/`` of ``data_path``. Yields ``(names, datasets_group)`` with the file open,
    after checking both; a malformed file is a one-line :class:`FewShotDataError`."""
    names = read_json(labels_path, f"a JSON list of the split's {what}")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise FewShotDataError(f"{labels_path}: expected a non-empty JSON list of {what}, got {type(names).__name__}")
    with open_hdf5(data_path, expected) as f:
        if "datasets" not in f:
            raise FewShotDataError(f"{data_path}: no 'datasets' group; found {sorted(f.keys())}; expected {expected}")
        g = f["datasets"]
        missing = [n for n in names if n not in g]
        if missing:
            raise FewShotDataError(f"{data_path}: {len(missing)} classes of {labels_path.name} are not in datasets/ "
                                   f"(e.g. {missing[0]!r})")
        yield names, g

def as_str(x) -> str:
    """A name read from a file: ``str``, or bytes / a numpy string decoded as UTF-8 (Latin-1 if not)."""
    if isinstance(x, (bytes, bytearray, np.bytes_)):
        try:
            return bytes(x).decode("utf-8")
        except UnicodeDecodeError:
            return bytes(x).decode("latin1")
    return str(x)


def pick(d, key: str, path: Path, expected: str):
    """``d[key]``, accepting the bytes spelling ``d[b"key"]`` of Python 2 pickles."""
    if not isinstance(d, dict):
        raise FewShotDataError(f"{path}: expected a dict ({expected}), got {type(d).__name__}")
    for k in (key, key.encode()):
        if k in d:
            return d[k]
    raise FewShotDataError(f"{path}: no key {key!r}; found keys {sorted(as_str(k) for k in d)}; expected {expected}")


# --------------------------------------------------------------------------------------- images

def decode_image(data: bytes, where: str, *, mode: str = "RGB", size: int | None = None) -> np.ndarray:
    """An encoded image (PNG, JPEG, ...) → uint8 (H, W, C) in ``mode``, resized to ``size``×``size``
    (Lanczos) when it is another size and ``size`` is given."""
    from PIL import Image
    try:
        with Image.open(io.BytesIO(bytes(data))) as im:
            im = im.convert(mode)
            if size is not None and im.size != (size, size):
                im = im.resize((size, size), Image.LANCZOS)
            a = np.asarray(im, dtype=np.uint8)
    except Exception as e:  # noqa: BLE001 - any decoder failure is a malformed file
        raise FewShotDataError(f"{where}: not a readable image ({one_line(e)})") from None
    return a[:, :, None] if a.ndim == 2 else a


def channel_stats(images: torch.Tensor, chunk: int = 256) -> tuple[list[float], list[float]]:
    """Per-channel mean and (population) std of uint8 images (M, C, H, W) as floats in [0, 1],
    exact: sums of pixels and of their squares in integers, a chunk of images at a time."""
    if len(images) == 0:
        raise ValueError("channel_stats needs at least one image")
    C = images.shape[1]
    s = torch.zeros(C, dtype=torch.int64)
    q = torch.zeros(C, dtype=torch.int64)
    for x in images.split(chunk):
        x = x.to(torch.int64)
        s += x.sum(dim=(0, 2, 3))
        q += (x * x).sum(dim=(0, 2, 3))
    n = images.shape[0] * images.shape[2] * images.shape[3]
    mean = [si / n / 255.0 for si in s.tolist()]
    std = [((qi * n - si * si) / (n * n)) ** 0.5 / 255.0 for si, qi in zip(s.tolist(), q.tolist())]
    return mean, std


def make_splits(dataset: str, parts: dict[str, tuple]) -> dict[str, FewShotSplit]:
    """``{split: (images uint8 (M, C, H, W), labels (M,), class names, note)}`` → FewShotSplits, every
    one normalised with the training split's per-channel mean/std; a class named in two splits (a
    split file given twice) is an error."""
    seen: dict[str, str] = {}
    for split, (_, _, names, _) in parts.items():
        for n in names:
            if n in seen:
                raise FewShotDataError(f"{dataset}: class {n!r} is in both the {seen[n]} and the {split} split; the "
                                       "splits must be class-disjoint (is one split file a copy of another?)")
            seen[n] = split
    shapes = {s: tuple(p[0].shape[1:]) for s, p in parts.items()}
    if len(set(shapes.values())) > 1:
        raise FewShotDataError(f"{dataset}: the splits have different image shapes {shapes}")
    mean, std = channel_stats(parts["train"][0])
    return {s: FewShotSplit(s, x, y, names, mean=mean, std=std, note=note) for s, (x, y, names, note) in parts.items()}
