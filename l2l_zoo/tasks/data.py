"""Dataset loading for the optimizee tasks: MNIST and CIFAR-10.

Where data is looked for, in order: the ``data_dir`` argument, then ``$L2L_ZOO_DATA``, then
``./data``. Inside that folder a dataset may sit in its own sub-folder (``mnist/``, ``MNIST/raw/``,
``cifar10/``, ``cifar-10-batches-py/``) or at the top level.

* MNIST: IDX files ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``.
* CIFAR-10: the standard python pickles (``cifar-10-batches-py/data_batch_1..5``, ``test_batch``)
  or ``cifar10_test_jpeg.npz`` (arrays ``x`` (N,32,32,3) uint8, ``y`` (N,)).

With the full standard files the standard train/test split is used and the validation set is carved
out of the training set. When only a test set is present (as in ``../shared/data``), train, validation
and test subsets are carved out of it, deterministically and stratified by class; the returned
:class:`DataSplits` says so in ``note`` and scripts print it.

Everything is returned as in-memory tensors (these datasets fit easily), so minibatch sampling is a
cheap index operation and fully reproducible from a ``torch.Generator``.
"""
from __future__ import annotations

import gzip
import os
import pickle
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "DataSplits",
    "DataNotFoundError",
    "resolve_data_dirs",
    "load_mnist",
    "load_cifar10",
    "load_dataset",
    "stratified_split",
    "DATASETS",
]

DATASETS = ("mnist", "cifar10")

# Normalisation constants (standard values of the full training sets).
_MNIST_MEAN, _MNIST_STD = 0.1307, 0.3081
_CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
_CIFAR_STD = (0.2470, 0.2435, 0.2616)


class DataNotFoundError(FileNotFoundError):
    """Raised when a dataset is not on disk and cannot be downloaded; the message names the files
    that are missing and every folder that was searched."""


@dataclass
class DataSplits:
    """Train/validation/test tensors of one dataset. ``x_*`` are float32, ``y_*`` int64."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    source: str
    note: str = ""
    meta: dict = field(default_factory=dict)

    def to(self, device) -> "DataSplits":
        moved = {k: getattr(self, k).to(device) for k in
                 ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")}
        return DataSplits(name=self.name, num_classes=self.num_classes, source=self.source,
                          note=self.note, meta=dict(self.meta), **moved)

    def summary(self) -> dict:
        return {"dataset": self.name, "source": self.source, "note": self.note,
                "n_train": len(self.y_train), "n_val": len(self.y_val), "n_test": len(self.y_test),
                **self.meta}


def resolve_data_dirs(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """The folders searched for data, most specific first (duplicates removed)."""
    cands = []
    if data_dir is not None:
        cands.append(Path(data_dir))
    env = os.environ.get("L2L_ZOO_DATA")
    if env:
        cands.append(Path(env))
    cands.append(Path("data"))
    out, seen = [], set()
    for c in cands:
        key = str(c.expanduser().resolve()) if c.exists() else str(c)
        if key not in seen:
            seen.add(key)
            out.append(c.expanduser())
    return out


def stratified_split(labels: torch.Tensor, sizes: list[int], seed: int) -> list[torch.Tensor]:
    """Split indices of ``labels`` into disjoint, class-stratified subsets of the given sizes.

    Each subset gets (as nearly as integer rounding allows) the class proportions of the whole.
    Deterministic in ``seed``. Returns one index tensor per size, each sorted by a seeded shuffle.
    """
    labels = torch.as_tensor(labels).long().cpu()
    n = len(labels)
    if any(s < 0 for s in sizes) or sum(sizes) > n:
        raise ValueError(f"stratified_split: sizes {sizes} must be >= 0 and sum to at most {n}")
    gen = torch.Generator().manual_seed(seed)
    classes = torch.unique(labels)
    per_class = {int(c): (labels == c).nonzero().flatten() for c in classes}
    per_class = {c: idx[torch.randperm(len(idx), generator=gen)] for c, idx in per_class.items()}
    offsets = {c: 0 for c in per_class}
    out = []
    for size in sizes:
        # Largest-remainder allocation of `size` proportional to what is left of each class (so a
        # final split that takes everything that remains is always feasible).
        rem = {c: len(idx) - offsets[c] for c, idx in per_class.items()}
        total = sum(rem.values())
        quotas = {c: size * r / total for c, r in rem.items()}
        alloc = {c: min(rem[c], int(np.floor(q))) for c, q in quotas.items()}
        short = size - sum(alloc.values())
        order = sorted(quotas, key=lambda c: (alloc[c] - quotas[c], c))
        while short > 0:
            for c in order:
                if short > 0 and alloc[c] < rem[c]:
                    alloc[c] += 1
                    short -= 1
        chosen = []
        for c, k in alloc.items():
            chosen.append(per_class[c][offsets[c]:offsets[c] + k])
            offsets[c] += k
        idx = torch.cat(chosen)
        out.append(idx[torch.randperm(len(idx), generator=gen)])
    return out


# ----------------------------------------------------------------------------------------- MNIST

def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    shape = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"{path}: truncated IDX file ({arr.size} values for shape {shape})")
    return arr.reshape(shape)


def _find(dirs: list[Path], subdirs: tuple[str, ...], names: tuple[str, ...]) -> Path | None:
    for d in dirs:
        for sub in subdirs:
            for name in names:
                p = d / sub / name if sub else d / name
                if p.is_file():
                    return p
    return None


_MNIST_SUBDIRS = ("mnist", "MNIST/raw", "", "MNIST")


def _mnist_file(dirs, split: str, kind: str) -> Path | None:
    stem = f"{split}-{'images-idx3' if kind == 'images' else 'labels-idx1'}-ubyte"
    return _find(dirs, _MNIST_SUBDIRS, (stem + ".gz", stem))


def _try_download(dataset: str, root: Path) -> bool:
    """Download with torchvision into ``root`` when the network allows; False when it does not."""
    import socket
    try:
        socket.setdefaulttimeout(10)
        import torchvision
        root.mkdir(parents=True, exist_ok=True)
        if dataset == "mnist":
            torchvision.datasets.MNIST(str(root), train=True, download=True)
            torchvision.datasets.MNIST(str(root), train=False, download=True)
        else:
            torchvision.datasets.CIFAR10(str(root), train=True, download=True)
        return True
    except Exception:  # no network, mirror down, disk full: the caller reports what is missing
        return False
    finally:
        socket.setdefaulttimeout(None)


def _standard(name, x_tr, y_tr, x_te, y_te, source, n_train, n_val, n_test, seed):
    """The standard train/test split, with a stratified validation set carved from the training set
    (default 5000) and, if ``n_test`` is smaller than the test set, a stratified test subsample."""
    n_val = 5000 if n_val is None else n_val
    n_train = len(y_tr) - n_val if n_train is None else n_train
    i_tr, i_va = stratified_split(y_tr, [n_train, n_val], seed)
    if n_test is not None and n_test < len(y_te):
        (i_te,) = stratified_split(y_te, [n_test], seed + 1)
        x_te, y_te = x_te[i_te], y_te[i_te]
    return DataSplits(name, x_tr[i_tr], y_tr[i_tr], x_tr[i_va], y_tr[i_va], x_te, y_te, 10, source,
                      f"{name} standard split: train={n_train} / val={n_val} (carved from the training "
                      f"set, seed={seed}) / test={len(y_te)}")


def _carve(name, x, y, num_classes, source, n_train, n_val, n_test, seed, note_prefix):
    idx_tr, idx_va, idx_te = stratified_split(y, [n_train, n_val, n_test], seed)
    note = (f"{note_prefix}: carved seeded (seed={seed}), class-stratified subsets "
            f"train={n_train} / val={n_val} / test={n_test} out of {len(y)} images")
    return DataSplits(name, x[idx_tr], y[idx_tr], x[idx_va], y[idx_va], x[idx_te], y[idx_te],
                      num_classes, source, note)


def load_mnist(data_dir=None, *, n_train: int | None = None, n_val: int | None = None,
               n_test: int | None = None, seed: int = 0, normalize: str = "standard",
               download: bool = True) -> DataSplits:
    """MNIST as flat-able tensors of shape (N, 1, 28, 28).

    ``normalize``: ``"standard"`` (subtract 0.1307, divide by 0.3081) or ``"unit"`` (pixels in
    [0, 1], as the MARTHE paper's TensorFlow code). With only the 10,000-image test set on disk the
    default carve is 6000/1000/3000 (train/val/test); sizes can be set explicitly.
    With the full training set, ``n_train``/``n_val`` subsample it (stratified) and ``n_test``
    subsamples the official test set.
    """
    if normalize not in ("standard", "unit"):
        raise ValueError(f"normalize must be 'standard' or 'unit', got {normalize!r}")
    dirs = resolve_data_dirs(data_dir)
    files = {(s, k): _mnist_file(dirs, s, k) for s in ("train", "t10k") for k in ("images", "labels")}
    if files[("t10k", "images")] is None and download and _try_download("mnist", dirs[0]):
        files = {(s, k): _mnist_file(dirs, s, k) for s in ("train", "t10k") for k in ("images", "labels")}
    if files[("t10k", "images")] is None or files[("t10k", "labels")] is None:
        raise DataNotFoundError(
            "MNIST not found: need t10k-images-idx3-ubyte[.gz] and t10k-labels-idx1-ubyte[.gz] "
            f"(optionally train-*), looked in {[str(d) for d in dirs]} and their mnist/, MNIST/raw/ "
            "sub-folders; set --data-dir or L2L_ZOO_DATA")

    def load(split):
        x = torch.from_numpy(_read_idx(files[(split, "images")]).copy()).float().div_(255.0)
        y = torch.from_numpy(_read_idx(files[(split, "labels")]).copy()).long()
        if normalize == "standard":
            x = (x - _MNIST_MEAN) / _MNIST_STD
        return x.unsqueeze(1), y

    x_te, y_te = load("t10k")
    source = str(files[("t10k", "images")].parent)
    if files[("train", "images")] is not None and files[("train", "labels")] is not None:
        x_tr, y_tr = load("train")
        return _standard("mnist", x_tr, y_tr, x_te, y_te, source, n_train, n_val, n_test, seed)
    n_train = 6000 if n_train is None else n_train
    n_val = 1000 if n_val is None else n_val
    n_test = len(y_te) - n_train - n_val if n_test is None else n_test
    return _carve("mnist", x_te, y_te, 10, source, n_train, n_val, n_test, seed,
                  "only the MNIST test set is available")


# -------------------------------------------------------------------------------------- CIFAR-10

def load_cifar10(data_dir=None, *, n_train: int | None = None, n_val: int | None = None,
                 n_test: int | None = None, seed: int = 0, download: bool = True) -> DataSplits:
    """CIFAR-10 as tensors of shape (N, 3, 32, 32), channel-standardised.

    Standard pickles (``cifar-10-batches-py``) give the standard split (validation carved from the
    50,000 training images). With only ``cifar10_test_jpeg.npz`` the default carve is
    6000/1000/3000.
    """
    dirs = resolve_data_dirs(data_dir)

    def find_pickles():
        for d in dirs:
            for sub in ("cifar-10-batches-py", "cifar10/cifar-10-batches-py", "cifar10", ""):
                base = d / sub if sub else d
                if (base / "data_batch_1").is_file() and (base / "test_batch").is_file():
                    return base
        return None

    def find_npz():
        return _find(dirs, ("cifar10", ""), ("cifar10_test_jpeg.npz",))

    pk, npz = find_pickles(), find_npz()
    if pk is None and npz is None and download and _try_download("cifar10", dirs[0]):
        pk, npz = find_pickles(), find_npz()
    mean = torch.tensor(_CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(_CIFAR_STD).view(1, 3, 1, 1)

    def to_tensor(x_uint8_nhwc):
        x = torch.from_numpy(np.ascontiguousarray(x_uint8_nhwc)).permute(0, 3, 1, 2).float() / 255.0
        return (x - mean) / std

    if pk is not None:
        def read(name):
            with open(pk / name, "rb") as f:
                d = pickle.load(f, encoding="latin1")
            return np.asarray(d["data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), \
                np.asarray(d["labels"])
        parts = [read(f"data_batch_{i}") for i in range(1, 6)]
        x_tr = to_tensor(np.concatenate([p[0] for p in parts]))
        y_tr = torch.from_numpy(np.concatenate([p[1] for p in parts])).long()
        xt, yt = read("test_batch")
        x_te, y_te = to_tensor(xt), torch.from_numpy(yt).long()
        return _standard("cifar10", x_tr, y_tr, x_te, y_te, str(pk), n_train, n_val, n_test, seed)
    if npz is None:
        raise DataNotFoundError(
            "CIFAR-10 not found: need cifar-10-batches-py/{data_batch_1..5,test_batch} or "
            f"cifar10/cifar10_test_jpeg.npz, looked in {[str(d) for d in dirs]}; "
            "set --data-dir or L2L_ZOO_DATA")
    with np.load(npz) as z:
        x, y = to_tensor(z["x"]), torch.from_numpy(z["y"].astype(np.int64))
    n_train = 6000 if n_train is None else n_train
    n_val = 1000 if n_val is None else n_val
    n_test = len(y) - n_train - n_val if n_test is None else n_test
    return _carve("cifar10", x, y, 10, str(npz.parent), n_train, n_val, n_test, seed,
                  "only the CIFAR-10 test set (JPEG-decoded copy) is available")


def load_dataset(name: str, data_dir=None, **kwargs) -> DataSplits:
    """Load ``"mnist"`` or ``"cifar10"`` (see :func:`load_mnist`, :func:`load_cifar10`)."""
    if name == "mnist":
        return load_mnist(data_dir, **kwargs)
    if name == "cifar10":
        return load_cifar10(data_dir, **kwargs)
    raise KeyError(f"unknown dataset {name!r}; choose from {list(DATASETS)}")
