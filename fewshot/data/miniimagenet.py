"""miniImageNet (Vinyals et al. 2016) with the split of Ravi & Larochelle (2017): 100
ImageNet classes × 600 images, 84×84 RGB, 64 / 16 / 20 classes for train / val / test. Three layouts
researchers have on disk are read:

* ``pkl``: ``mini-imagenet-cache-{train,validation,test}.pkl`` (also ``-val.pkl``), each a dict with
  ``image_data`` uint8 (N, 84, 84, 3) and ``class_dict`` {wnid: [indices into image_data]}; keys may
  be bytes (``b'image_data'``) in copies converted from Python 2;
* ``hdf5`` (torchmeta): ``{train,val,test}_data.hdf5`` with one uint8 (600, 84, 84, 3) dataset per
  class under ``datasets/<wnid>``, and ``{split}_labels.json`` listing the wnids; needs h5py, an
  optional extra (``pip install -e '.[fewshot]'``);
* ``csv`` (Ravi & Larochelle's release): ``{train,val,test}.csv`` (``filename,label``) beside an
  ``images/`` folder of JPEGs (``images/<filename>`` or ``images/<label>/<filename>``), resized to
  84×84 (Lanczos) when they are another size. When the CSVs are not beside ``images/``, those of
  ``fewshot_splits/miniimagenet/`` in a data folder are used.

They are looked for in each data folder's ``miniimagenet/`` (and ``mini-imagenet/``, ``mini_imagenet/``)
sub-folder, then the folder itself. Every layout gives the same splits: classes in sorted wnid order
(labels 0..C−1), a class's images in file order, uint8 (M, 3, 84, 84), normalised with the training
split's per-channel mean/std.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch

from .episodes import FewShotDataError, FewShotSplit
from .registry import (SPLITS, as_str, decode_image, find_layout, hdf5_classes, make_splits, pick,
                       read_pickle)

__all__ = ["load_miniimagenet", "LAYOUTS"]

SUBDIRS = ("miniimagenet", "mini-imagenet", "mini_imagenet", "miniImageNet")
_PKL = "mini-imagenet-cache-{}.pkl"
LAYOUTS = {
    "pkl": [(_PKL.format("train"),), (_PKL.format("validation"), _PKL.format("val")), (_PKL.format("test"),)],
    "hdf5": [(f"{s}_{kind}",) for s in SPLITS for kind in ("data.hdf5", "labels.json")],
    "csv": [("images",)],
}
_DESCRIBE = {
    "pkl": "mini-imagenet-cache-{train,validation|val,test}.pkl (dict: image_data uint8 (N,84,84,3), "
           "class_dict {wnid: [indices]})",
    "hdf5": "{train,val,test}_data.hdf5 (datasets/<wnid>: uint8 (600,84,84,3)) + {split}_labels.json",
    "csv": "images/*.jpg with {train,val,test}.csv (filename,label) beside it or in fewshot_splits/miniimagenet/",
}
SIZE = 84


def load_miniimagenet(data_dir=None, *, layout: str = "auto") -> dict[str, FewShotSplit]:
    """``{"train", "val", "test"}`` miniImageNet splits (module docstring) from the first data folder
    that holds a complete layout; ``layout`` ("pkl", "hdf5", "csv") reads only that one."""
    kind, folder, files, dirs = find_layout("miniImageNet", data_dir, SUBDIRS, LAYOUTS, _DESCRIBE, layout)
    if kind == "pkl":
        parts = {s: _read_cache_pkl(p) for s, p in zip(SPLITS, files)}
    elif kind == "hdf5":
        parts = {s: _read_hdf5(files[2 * i], files[2 * i + 1]) for i, s in enumerate(SPLITS)}
    else:
        csvs = _find_csvs(folder, dirs)
        parts = {s: _read_csv(csvs[s], folder / "images") for s in SPLITS}
    return make_splits("miniImageNet", parts)


def _fill(groups: list[tuple], where: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """[(class name, image shape (n, H, W, 3), read() -> uint8 (n, H, W, 3))] → images uint8
    (M, 3, H, W), labels, names; one class is read at a time into the preallocated output."""
    shapes = {tuple(shape[1:]) for _, shape, _ in groups}
    if len(shapes) != 1:
        raise FewShotDataError(f"{where}: classes have different image shapes {sorted(shapes)}")
    M = sum(shape[0] for _, shape, _ in groups)
    H, W, C = shapes.pop()
    out = torch.empty((M, C, H, W), dtype=torch.uint8)
    view, pos, labels = out.numpy(), 0, []
    for c, (name, shape, read) in enumerate(groups):
        a = read()
        if a.shape != tuple(shape):
            raise FewShotDataError(f"{where}: class {name!r} read as {a.shape}, expected {tuple(shape)}")
        view[pos:pos + len(a)] = a.transpose(0, 3, 1, 2)
        pos += len(a)
        labels += [c] * len(a)
    return out, torch.tensor(labels, dtype=torch.long), [n for n, _, _ in groups]


def _note(path: Path, names, n: int) -> str:
    return f"miniImageNet {path.name}: {len(names)} classes, {n} images (from {path.parent})"


def _check_array(a, where: str, what: str) -> np.ndarray:
    if not isinstance(a, np.ndarray) or a.dtype != np.uint8 or a.ndim != 4 or a.shape[-1] != 3:
        got = f"{a.dtype} {a.shape}" if isinstance(a, np.ndarray) else type(a).__name__
        raise FewShotDataError(f"{where}: {what} must be uint8 of shape (N, H, W, 3), got {got}")
    return a


def _read_cache_pkl(path: Path):
    expected = _DESCRIBE["pkl"]
    d = read_pickle(path, expected)
    images = _check_array(pick(d, "image_data", path, expected), str(path), "image_data")
    class_dict = pick(d, "class_dict", path, expected)
    if not isinstance(class_dict, dict) or not class_dict:
        raise FewShotDataError(f"{path}: class_dict must be a non-empty dict {{wnid: [indices]}}, got "
                               f"{type(class_dict).__name__}")
    groups = []
    for wnid, ix in sorted((as_str(k), v) for k, v in class_dict.items()):
        ix = np.asarray(ix)
        in_range = ix.size == 0 or (ix.min() >= 0 and ix.max() < len(images))
        if ix.ndim != 1 or not np.issubdtype(ix.dtype, np.integer) or not in_range:
            raise FewShotDataError(f"{path}: class_dict[{wnid!r}] must list indices in 0..{len(images) - 1}, got "
                                   f"{ix.dtype} {ix.shape}")
        groups.append((wnid, (len(ix), *images.shape[1:]), lambda ix=ix: images[ix]))
    x, y, names = _fill(groups, str(path))
    return x, y, names, _note(path, names, len(x))


def _read_hdf5(data_path: Path, labels_path: Path):
    with hdf5_classes(data_path, labels_path, _DESCRIBE["hdf5"], "wnids") as (names, g):
        groups = []
        for n in sorted(names):
            ds = g[n]
            if ds.ndim != 4:
                hint = " (one encoded image per entry: that is tieredImageNet's layout)" if ds.ndim == 1 else ""
                raise FewShotDataError(f"{data_path}: datasets/{n} must be uint8 (N, H, W, 3), got shape "
                                       f"{ds.shape}{hint}")
            if ds.dtype != np.uint8 or ds.shape[-1] != 3:
                raise FewShotDataError(f"{data_path}: datasets/{n} must be uint8 (N, H, W, 3), got {ds.dtype} "
                                       f"{ds.shape}")
            groups.append((n, ds.shape, lambda ds=ds: ds[()]))
        x, y, names = _fill(groups, str(data_path))
    return x, y, names, _note(data_path, names, len(x))


def _find_csvs(folder: Path, dirs: list[Path]) -> dict[str, Path]:
    for base in [folder, *(d / "fewshot_splits" / "miniimagenet" for d in dirs)]:
        if all((base / f"{s}.csv").is_file() for s in SPLITS):
            return {s: base / f"{s}.csv" for s in SPLITS}
    raise FewShotDataError(f"miniImageNet: found {folder / 'images'} but not train.csv, val.csv, test.csv "
                           f"(filename,label) beside it or in {[str(d / 'fewshot_splits' / 'miniimagenet') for d in dirs]}")


def _read_csv(csv_path: Path, images: Path):
    try:
        with open(csv_path, newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise FewShotDataError(f"{csv_path}: not a readable CSV file ({type(e).__name__}: {e})") from None
    if not rows or [c.strip() for c in rows[0]] != ["filename", "label"]:
        got = ",".join(rows[0]) if rows else "an empty file"
        raise FewShotDataError(f"{csv_path}: expected the header 'filename,label', got {got!r}")
    rows = [r for r in rows[1:] if r]
    bad = [i + 2 for i, r in enumerate(rows) if len(r) != 2]
    if bad:
        raise FewShotDataError(f"{csv_path}: line {bad[0]} does not have two fields filename,label")
    by_class: dict[str, list[Path]] = {}
    missing = []
    for name, label in rows:
        p = images / name
        if not p.is_file():
            p = images / label / name
        if not p.is_file():
            missing.append(name)
        by_class.setdefault(label, []).append(p)
    if missing:
        raise FewShotDataError(f"{csv_path}: {len(missing)} of the {len(rows)} images it lists are not in {images} "
                               f"(e.g. {missing[0]!r}; looked for images/<filename> and images/<label>/<filename>)")
    M = len(rows)
    out = torch.empty((M, 3, SIZE, SIZE), dtype=torch.uint8)
    view, pos, labels, names = out.numpy(), 0, [], sorted(by_class)
    for c, label in enumerate(names):
        for p in by_class[label]:
            view[pos] = decode_image(p.read_bytes(), str(p), mode="RGB", size=SIZE).transpose(2, 0, 1)
            pos += 1
        labels += [c] * len(by_class[label])
    return out, torch.tensor(labels, dtype=torch.long), names, \
        f"miniImageNet {csv_path.name}: {len(names)} classes, {M} images (from {images})"
