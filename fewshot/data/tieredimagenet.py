"""tieredImageNet (Ren et al. 2018): 608 ImageNet classes in 34 higher-level categories, 84×84
RGB, 351 / 97 / 160 classes (20 / 6 / 8 categories) for train / val / test. Three layouts are read:

* ``pkl`` (Ren et al.'s release): ``{split}_images_png.pkl``, a list of PNG-encoded images (bytes or
  uint8 arrays; pickled by Python 2, read with ``encoding='bytes'``), and ``{split}_labels.pkl``, a
  dict with ``label_specific`` (N,) class indices, ``label_specific_str`` their names, and
  ``label_general`` / ``label_general_str`` the categories;
* ``npz``: ``{split}_images.npz`` with ``images`` uint8 (N, 84, 84, 3) in **BGR** order (written with
  OpenCV; converted to RGB here), streamed from the archive a chunk at a time, with the same
  ``{split}_labels.pkl``;
* ``hdf5`` (torchmeta): ``{split}_data.hdf5`` with ``datasets/<class name>`` holding one PNG-encoded
  image (variable-length uint8) per entry, and ``{split}_labels.json`` listing the class names; needs
  h5py, an optional extra (``pip install -e '.[fewshot]'``).

Splits are ``train``, ``val``, ``test``; looked for in each data folder's ``tieredimagenet/`` (and
``tiered-imagenet/``, ``tiered_imagenet/``) sub-folder, then the folder itself. Every layout gives the
same splits: classes in ``label_specific`` order (the order of the labels JSON in torchmeta's
layout), labels 0..C−1, class names the specific names, a class's images in file order, uint8
(M, 3, 84, 84), normalised with the training split's per-channel mean/std.
"""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch

from .episodes import FewShotDataError, FewShotSplit
from .registry import (SPLITS, check_not_html, one_line, as_str, decode_image, find_layout, hdf5_classes, make_splits,
                       pick, read_pickle)

__all__ = ["load_tieredimagenet", "LAYOUTS"]

SUBDIRS = ("tieredimagenet", "tiered-imagenet", "tiered_imagenet", "tieredImageNet")
LAYOUTS = {
    "pkl": [(f"{s}_{kind}",) for s in SPLITS for kind in ("images_png.pkl", "labels.pkl")],
    "npz": [(f"{s}_{kind}",) for s in SPLITS for kind in ("images.npz", "labels.pkl")],
    "hdf5": [(f"{s}_{kind}",) for s in SPLITS for kind in ("data.hdf5", "labels.json")],
}
_LABELS = "a dict with label_specific (N,), label_specific_str, label_general, label_general_str"
_DESCRIBE = {
    "pkl": "{train,val,test}_images_png.pkl (list of PNG bytes) + {split}_labels.pkl (" + _LABELS + ")",
    "npz": "{train,val,test}_images.npz (images: uint8 (N,84,84,3), BGR) + {split}_labels.pkl",
    "hdf5": "{train,val,test}_data.hdf5 (datasets/<class>: PNG bytes per image) + {split}_labels.json",
}
_CHUNK = 1024  # images decoded / copied at a time


def load_tieredimagenet(data_dir=None, *, layout: str = "auto") -> dict[str, FewShotSplit]:
    """``{"train", "val", "test"}`` tieredImageNet splits (module docstring) from the first data folder
    that holds a complete layout; ``layout`` ("pkl", "npz", "hdf5") reads only that one."""
    kind, folder, files, _ = find_layout("tieredImageNet", data_dir, SUBDIRS, LAYOUTS, _DESCRIBE, layout)
    read = {"pkl": _read_png_pkl, "npz": _read_npz, "hdf5": _read_hdf5}[kind]
    parts = {s: read(files[2 * i], files[2 * i + 1]) for i, s in enumerate(SPLITS)}
    return make_splits("tieredImageNet", parts)


def _read_labels(path: Path) -> tuple[np.ndarray, list[str]]:
    d = read_pickle(path, _LABELS)
    y = np.asarray(pick(d, "label_specific", path, _LABELS))
    names = pick(d, "label_specific_str", path, _LABELS)
    if not isinstance(names, (list, tuple, np.ndarray)) or len(names) == 0:
        raise FewShotDataError(f"{path}: label_specific_str must be a non-empty list of class names, got "
                               f"{type(names).__name__}")
    names = [as_str(n) for n in names]
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer) or (y.size and (y.min() < 0 or y.max() >= len(names))):
        raise FewShotDataError(f"{path}: label_specific must be integers in 0..{len(names) - 1} (one per "
                               f"label_specific_str), got {y.dtype} {y.shape}")
    return y.astype(np.int64), names


def _note(path: Path, names, n) -> str:
    return f"tieredImageNet {path.name}: {len(names)} classes, {n} images (from {path.parent})"


def _decode_all(encoded, where: str) -> torch.Tensor:
    """Encoded images → uint8 (M, 3, H, W); every image must have the first one's size."""
    out, view, shape = None, None, None
    for i, e in enumerate(encoded):
        if isinstance(e, str):  # a Python 2 str read with encoding='latin1'
            e = e.encode("latin1")
        elif isinstance(e, np.ndarray):
            e = e.tobytes()
        elif not isinstance(e, (bytes, bytearray)):
            raise FewShotDataError(f"{where}: entry {i} is a {type(e).__name__}, expected PNG bytes")
        a = decode_image(e, f"{where} (image {i})", mode="RGB")
        if out is None:
            shape = a.shape
            out = torch.empty((len(encoded), shape[2], shape[0], shape[1]), dtype=torch.uint8)
            view = out.numpy()
        elif a.shape != shape:
            raise FewShotDataError(f"{where}: image {i} is {a.shape[1]}×{a.shape[0]}, the first is "
                                   f"{shape[1]}×{shape[0]}")
        view[i] = a.transpose(2, 0, 1)
    if out is None:
        raise FewShotDataError(f"{where}: holds no images")
    return out


def _read_png_pkl(images_path: Path, labels_path: Path):
    y, names = _read_labels(labels_path)
    encoded = read_pickle(images_path, "a list of PNG-encoded images", encoding="bytes")
    if not isinstance(encoded, (list, tuple, np.ndarray)):
        raise FewShotDataError(f"{images_path}: expected a list of PNG-encoded images, got {type(encoded).__name__}")
    if len(encoded) != len(y):
        raise FewShotDataError(f"{images_path}: {len(encoded)} images but {labels_path.name} has {len(y)} labels")
    x = _decode_all(encoded, str(images_path))
    return x, torch.from_numpy(y), names, _note(images_path, names, len(x))


def _read_npz(images_path: Path, labels_path: Path):
    y, names = _read_labels(labels_path)
    x = _stream_npz_images(images_path, "images", bgr=True)
    if len(x) != len(y):
        raise FewShotDataError(f"{images_path}: {len(x)} images but {labels_path.name} has {len(y)} labels")
    return x, torch.from_numpy(y), names, _note(images_path, names, len(x))


def _stream_npz_images(path: Path, key: str, *, bgr: bool) -> torch.Tensor:
    """Array ``key`` (uint8 (N, H, W, 3)) of an ``.npz`` as uint8 (N, 3, H, W), read from the archive a
    chunk of images at a time (so the file's array and the result are never both in memory); BGR
    files are flipped to RGB. Pickled (object) arrays are refused."""
    expected = f"an .npz archive with '{key}': uint8 (N, H, W, 3)"
    check_not_html(path, expected)
    fmt = np.lib.format
    try:
        with zipfile.ZipFile(path) as z:
            member = f"{key}.npy"
            if member not in z.namelist():
                found = sorted(n[:-4] if n.endswith(".npy") else n for n in z.namelist())
                raise FewShotDataError(f"{path}: no array {key!r}; found {found}; expected {expected}")
            with z.open(member) as f:
                version = fmt.read_magic(f)
                header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
                shape, fortran, dtype = header(f)
                if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3:
                    raise FewShotDataError(f"{path}: '{key}' must be uint8 of shape (N, H, W, 3), got {dtype} {shape}")
                N, H, W, C = shape
                out = torch.empty((N, C, H, W), dtype=torch.uint8)
                view = out.numpy()
                if fortran:  # not what OpenCV/numpy write; read it whole
                    a = np.lib.format.read_array(f, allow_pickle=False)
                    view[:] = (a[..., ::-1] if bgr else a).transpose(0, 3, 1, 2)
                    return out
                per = H * W * C
                for start in range(0, N, _CHUNK):
                    n = min(_CHUNK, N - start)
                    data = f.read(n * per)
                    if len(data) != n * per:
                        raise FewShotDataError(f"{path}: '{key}' is truncated ({start + len(data) // per} of {N} "
                                               "images)")
                    a = np.frombuffer(data, dtype=np.uint8).reshape(n, H, W, C)
                    view[start:start + n] = (a[..., ::-1] if bgr else a).transpose(0, 3, 1, 2)
    except FewShotDataError:
        raise
    except Exception as e:  # BadZipFile, zlib.error, EOFError, ValueError (bad header), ...
        raise FewShotDataError(f"{path}: not a readable .npz file ({one_line(e)}); expected {expected}") from None
    return out


def _read_hdf5(data_path: Path, labels_path: Path):
    with hdf5_classes(data_path, labels_path, _DESCRIBE["hdf5"], "class names") as (names, g):
        for n in names:
            if g[n].ndim != 1:
                hint = " (decoded images: that is miniImageNet's layout)" if g[n].ndim == 4 else ""
                raise FewShotDataError(f"{data_path}: datasets/{n} must hold one PNG-encoded image per entry, got "
                                       f"shape {g[n].shape}{hint}")
        labels = np.concatenate([np.full(len(g[n]), c, dtype=np.int64) for c, n in enumerate(names)])
        x = _decode_all(_Concat([g[n] for n in names]), str(data_path))
    return x, torch.from_numpy(labels), list(names), _note(data_path, names, len(x))


class _Concat:
    """Several sequences read as one (len and iteration), without materialising them."""

    def __init__(self, parts):
        self.parts = parts

    def __len__(self):
        return sum(len(p) for p in self.parts)

    def __iter__(self):
        for p in self.parts:
            for i in range(len(p)):
                yield p[i]
