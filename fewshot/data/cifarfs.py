"""CIFAR-FS (Bertinetto et al. 2019): the 100 CIFAR-100 classes × 600 images (its train and test
sets together), 32×32 RGB, 64 / 16 / 20 classes for train / val / test. Two layouts are read:

* ``pickle``: CIFAR-100's python release ``cifar-100-python/{train,test,meta}`` (dicts with ``data``
  uint8 (N, 3072) as R, G, B planes of 32×32, ``fine_labels``, ``coarse_labels``; ``meta`` has
  ``fine_label_names``; keys may be bytes) with the class split ``{train,val,test}.json``, lists of
  ``[superclass, class]`` pairs, from ``split_dir`` or ``fewshot_splits/cifar_fs/`` of a data folder;
* ``png`` (Bertinetto et al.'s release): ``data/<class>/*.png`` with the split in
  ``splits/bertinetto/{train,val,test}.txt`` (one class name per line).

They are looked for in each data folder's ``cifar100/`` (and ``cifar-fs/``, ``cifar_fs/``, ``cifarfs/``,
``CIFAR-FS/``) sub-folder, then the folder itself. Classes are in the split file's order (labels
0..C−1), a class's images in file order (CIFAR-100 train before test; PNG files sorted by name),
uint8 (M, 3, 32, 32), normalised with the training split's per-channel mean/std.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .episodes import FewShotDataError, FewShotSplit
from .registry import SPLITS, as_str, decode_image, find_layout, make_splits, pick, read_json, read_pickle

__all__ = ["load_cifarfs", "LAYOUTS"]

SUBDIRS = ("cifar100", "cifar-fs", "cifar_fs", "cifarfs", "CIFAR-FS")
LAYOUTS = {
    "pickle": [(f"cifar-100-python/{n}",) for n in ("train", "test", "meta")],
    "png": [("data",), *((f"splits/bertinetto/{s}.txt",) for s in SPLITS)],
}
_BATCH = "a dict with data uint8 (N, 3072), fine_labels (N,)"
_DESCRIBE = {
    "pickle": "cifar-100-python/{train,test,meta} (" + _BATCH + "; meta: fine_label_names) and the split "
              "{train,val,test}.json ([superclass, class] pairs) in split_dir or fewshot_splits/cifar_fs/",
    "png": "data/<class>/*.png with splits/bertinetto/{train,val,test}.txt (class names)",
}


def load_cifarfs(data_dir=None, *, layout: str = "auto", split_dir=None) -> dict[str, FewShotSplit]:
    """``{"train", "val", "test"}`` CIFAR-FS splits (module docstring) from the first data folder that
    holds a complete layout; ``layout`` ("pickle", "png") reads only that one; ``split_dir`` holds the
    ``{train,val,test}.json`` class split for the pickle layout."""
    kind, folder, files, dirs = find_layout("CIFAR-FS", data_dir, SUBDIRS, LAYOUTS, _DESCRIBE, layout)
    if kind == "pickle":
        parts = _read_pickles(*files, _split_files(split_dir, dirs))
    else:
        parts = {s: _read_png_split(files[0], p) for s, p in zip(SPLITS, files[1:])}
    return make_splits("CIFAR-FS", parts)


def _split_files(split_dir, dirs: list[Path]) -> dict[str, Path]:
    bases = [Path(split_dir)] if split_dir is not None else [d / "fewshot_splits" / "cifar_fs" for d in dirs]
    for base in bases:
        if all((base / f"{s}.json").is_file() for s in SPLITS):
            return {s: base / f"{s}.json" for s in SPLITS}
    raise FewShotDataError(f"CIFAR-FS: the class split train.json, val.json, test.json ([superclass, class] pairs) "
                           f"was not found in {[str(b) for b in bases]}; pass split_dir=")


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    d = read_pickle(path, _BATCH)
    x = np.asarray(pick(d, "data", path, _BATCH))
    y = np.asarray(pick(d, "fine_labels", path, _BATCH))
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3 * 32 * 32:
        raise FewShotDataError(f"{path}: 'data' must be uint8 of shape (N, 3072), got {x.dtype} {x.shape}")
    if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
        raise FewShotDataError(f"{path}: {len(x)} images but 'fine_labels' is {y.dtype} {y.shape}")
    return x.reshape(-1, 3, 32, 32), y.astype(np.int64)


def _read_pickles(train: Path, test: Path, meta: Path, split_files: dict[str, Path]):
    expected = "a dict with fine_label_names (100 names)"
    names = [as_str(n) for n in pick(read_pickle(meta, expected), "fine_label_names", meta, expected)]
    index = {n: i for i, n in enumerate(names)}
    x_tr, y_tr = _read_batch(train)
    x_te, y_te = _read_batch(test)
    for p, y in ((train, y_tr), (test, y_te)):
        if y.size and (y.min() < 0 or y.max() >= len(names)):
            raise FewShotDataError(f"{p}: fine_labels must lie in 0..{len(names) - 1} (one per fine_label_names of "
                                   f"{meta.name}), got {y.min()}..{y.max()}")
    parts = {}
    for s, path in split_files.items():
        spec = read_json(path, "a JSON list of [superclass, class] pairs")
        if not isinstance(spec, list) or not spec or not all(
                isinstance(e, list) and len(e) == 2 and all(isinstance(v, str) for v in e) for e in spec):
            raise FewShotDataError(f"{path}: expected a non-empty JSON list of [superclass, class] pairs")
        classes = [c for _, c in spec]
        unknown = [c for c in classes if c not in index]
        if unknown:
            raise FewShotDataError(f"{path}: {len(unknown)} classes are not CIFAR-100 fine labels of {meta} "
                                   f"(e.g. {unknown[0]!r})")
        sel = [(np.flatnonzero(y_tr == index[c]), np.flatnonzero(y_te == index[c])) for c in classes]
        M = sum(len(a) + len(b) for a, b in sel)
        out = torch.empty((M, 3, 32, 32), dtype=torch.uint8)
        view, pos, labels = out.numpy(), 0, []
        for c, (a, b) in enumerate(sel):
            view[pos:pos + len(a)] = x_tr[a]
            view[pos + len(a):pos + len(a) + len(b)] = x_te[b]
            pos += len(a) + len(b)
            labels += [c] * (len(a) + len(b))
        parts[s] = (out, torch.tensor(labels, dtype=torch.long), classes,
                    f"CIFAR-FS {s}: {len(classes)} classes, {M} images (CIFAR-100 train + test of {train.parent}, "
                    f"split {path})")
    return parts


def _read_png_split(data: Path, split_file: Path):
    try:
        classes = [ln.strip() for ln in split_file.read_text().splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise FewShotDataError(f"{split_file}: not a readable class list ({type(e).__name__}: {e})") from None
    if not classes:
        raise FewShotDataError(f"{split_file}: lists no classes (expected one class name per line)")
    files = []
    for c in classes:
        folder = data / c
        pngs = sorted(folder.glob("*.png")) if folder.is_dir() else []
        if not pngs:
            raise FewShotDataError(f"{split_file}: class {c!r} has no images {folder}/*.png")
        files.append(pngs)
    M = sum(len(f) for f in files)
    out, view, shape, labels = None, None, None, []
    pos = 0
    for c, pngs in enumerate(files):
        for p in pngs:
            a = decode_image(p.read_bytes(), str(p), mode="RGB")
            if out is None:
                shape = a.shape
                out = torch.empty((M, 3, shape[0], shape[1]), dtype=torch.uint8)
                view = out.numpy()
            elif a.shape != shape:
                raise FewShotDataError(f"{p}: {a.shape[1]}×{a.shape[0]} pixels, the other images are "
                                       f"{shape[1]}×{shape[0]}")
            view[pos] = a.transpose(2, 0, 1)
            pos += 1
        labels += [c] * len(pngs)
    return out, torch.tensor(labels, dtype=torch.long), classes, \
        f"CIFAR-FS {split_file.stem}: {len(classes)} classes, {M} images (from {data})"
