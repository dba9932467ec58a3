"""Dataset loading for the optimizee tasks: MNIST and CIFAR-10.

Where data is looked for, in order: the ``data_dir`` argument, then ``$L2L_ZOO_DATA``, then
``./data``. Every folder named explicitly (``data_dir``, and ``$L2L_ZOO_DATA`` when set and
non-empty) must exist: a typo raises :class:`DataNotFoundError` naming it rather than being skipped
(which would read the data from somewhere else while the config records the typo); ``./data`` is
searched only if it exists. Inside a folder a dataset may sit in its own sub-folder (``mnist/``,
``MNIST/raw/``, ``cifar10/``, ``cifar-10-batches-py/``) or at the top level.

* MNIST: IDX files ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``.
* CIFAR-10: the standard python pickles (``cifar-10-batches-py/data_batch_1..5``, ``test_batch``)
  or ``cifar10_test_jpeg.npz`` (arrays ``x`` (N,32,32,3) uint8, ``y`` (N,)).

With the full standard files the standard train/test split is used and the validation set is carved
out of the training set. When only a test set is present (as in ``../shared/data``), train, validation
and test subsets are carved out of it, deterministically and stratified by class; the returned
:class:`DataSplits` says so in ``note`` and scripts print it. Asking for more images than exist is
an error naming the sizes and the maximum (never a silent clamp).

When nothing is found and ``download=True``, torchvision downloads the dataset into the first
folder searched. The attempt stages everything in a temporary sub-folder and moves only complete
files into place, so a failure leaves nothing behind (it removes every folder it created) and the
reason is part of the :class:`DataNotFoundError` message. A quick connection probe (with a timeout
on its own socket; the process-wide default is left alone) avoids hanging when offline.

Files that exist but cannot be read (truncated, corrupt, of the wrong kind) raise
:class:`DataFormatError` naming the file and what is wrong. CIFAR pickles are read with an
unpickler that accepts only numpy arrays (no code runs); the ``.npz`` without pickles.

Everything is returned as in-memory tensors (these datasets fit easily), so minibatch sampling is a
cheap index operation and fully reproducible from a ``torch.Generator``.
"""
from __future__ import annotations

import gzip
import numbers
import os
import pickle
import shutil
import socket
import struct
import tempfile
import urllib.parse
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "DataSplits",
    "DataNotFoundError",
    "DataFormatError",
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
_HINT = "pass data_dir= or set L2L_ZOO_DATA"


class DataNotFoundError(FileNotFoundError):
    """Raised when a dataset is not on disk and cannot be downloaded, or a folder named explicitly
    does not exist; the message names the files that are missing and every folder searched."""


class DataFormatError(ValueError):
    """Raised when a dataset file exists but cannot be read (truncated, corrupt, wrong kind); the
    one-line message names the file and what is wrong."""


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
    """The folders searched for data, most specific first (duplicates removed): ``data_dir``,
    ``$L2L_ZOO_DATA``, ``./data``. Raises :class:`DataNotFoundError` if ``data_dir`` or a set
    ``$L2L_ZOO_DATA`` is not an existing folder; ``./data`` is listed only if it exists."""
    cands = []
    env = os.environ.get("L2L_ZOO_DATA")
    for label, d in (("data_dir", data_dir), ("L2L_ZOO_DATA", env or None)):
        if d is None:
            continue
        p = Path(d).expanduser()
        if not p.is_dir():
            what = "is not a folder" if p.exists() else "does not exist"
            raise DataNotFoundError(f"{label} {os.fspath(d)!r} {what}")
        cands.append(p)
    if Path("data").is_dir():
        cands.append(Path("data"))
    out, seen = [], set()
    for c in cands:
        key = str(c.resolve())
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


def _search_dirs(data_dir, dataset: str) -> list[Path]:
    try:
        return resolve_data_dirs(data_dir)
    except DataNotFoundError as e:
        raise DataNotFoundError(f"{dataset} not found: {e}") from None


def _download_root(data_dir) -> Path:
    """Where a download goes: the first folder named (data_dir, $L2L_ZOO_DATA), else ./data."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    env = os.environ.get("L2L_ZOO_DATA")
    return Path(env).expanduser() if env else Path("data")


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


def _is_count(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _check_sizes(available: int, what: str, rest: str | None = None, **sizes) -> None:
    """Each size an integer >= 1 and their sum at most ``available`` images (``what`` says of
    which). ``rest`` names a parameter left to its default, the images that remain, so it needs at
    least one."""
    for k, v in sizes.items():
        if not (_is_count(v) and v >= 1):
            raise ValueError(f"{k} must be an integer >= 1, got {v!r}")
    total, names = sum(sizes.values()), " + ".join(sizes)
    limit = available - 1 if rest else available
    if total > limit:
        got = ", ".join(f"{k}={v}" for k, v in sizes.items())
        why = f"leaves no images for the default {rest} out of" if rest else "exceeds"
        raise ValueError(f"{names} = {total} {why} the {available} {what}: {names} must be at most "
                         f"{limit}, got {got}")


# ------------------------------------------------------------------------------------- download

_PROBE_TIMEOUT = 5.0


def _probe(url: str, timeout: float = _PROBE_TIMEOUT) -> None:
    """Open and close a TCP connection to ``url``'s host (raises OSError when unreachable). The
    timeout is set on this socket only; the process-wide default is left alone."""
    u = urllib.parse.urlsplit(url)
    port = u.port or (443 if u.scheme == "https" else 80)
    with socket.create_connection((u.hostname, port), timeout=timeout):
        pass


def _urls(dataset: str) -> list[str]:
    import torchvision
    if dataset == "mnist":
        return list(torchvision.datasets.MNIST.mirrors)
    return [torchvision.datasets.CIFAR10.url]


def _fetch(dataset: str, root: Path) -> None:
    """torchvision's download of ``dataset`` into ``root`` (a fresh staging folder)."""
    import torchvision
    if dataset == "mnist":
        torchvision.datasets.MNIST(str(root), train=True, download=True)
        torchvision.datasets.MNIST(str(root), train=False, download=True)
    else:
        torchvision.datasets.CIFAR10(str(root), train=True, download=True)


def _one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0]}" if msg else type(e).__name__


def _try_download(dataset: str, root: Path) -> str | None:
    """Download ``dataset`` with torchvision into ``root``. Returns None on success, else why it
    failed (one line); a failure leaves nothing behind: files are fetched into a temporary
    sub-folder and moved into place only when complete, and every folder this call created is
    removed again."""
    # folders and files this attempt creates, in creation order (removed again unless it succeeds)
    created = list(reversed([p for p in (root, *root.parents) if not p.exists()]))
    staging = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        urls = _urls(dataset)
        reasons = []
        for url in urls:
            try:
                _probe(url)
                break
            except OSError as e:
                reasons.append(f"{urllib.parse.urlsplit(url).hostname}: {_one_line(e)}")
        else:
            return "cannot reach " + "; ".join(reasons)
        staging = Path(tempfile.mkdtemp(prefix=".download-", dir=root))
        _fetch(dataset, staging)
        for src in sorted(staging.rglob("*")):
            dst = root / src.relative_to(staging)
            if src.is_dir():
                if not dst.exists():
                    dst.mkdir()
                    created.append(dst)
            elif not dst.exists():
                os.replace(src, dst)
                created.append(dst)
        created = []  # success: keep everything
        return None
    except ImportError as e:
        return f"cannot import torchvision, which does the download ({_one_line(e)})"
    except Exception as e:  # network, mirror, disk: reported to the caller, which raises
        return _one_line(e)
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        for p in reversed(created):
            try:
                p.rmdir() if p.is_dir() else p.unlink()
            except OSError:
                pass


def _not_found(dataset: str, need: str, dirs: list[Path], subdirs: str, download: bool,
               reason: str | None) -> DataNotFoundError:
    dl = f"download failed: {reason}" if download else "not downloaded (download=False)"
    where = (f"looked in {[str(d) for d in dirs]}{subdirs}" if dirs else
             "looked in no folder (no data_dir given, L2L_ZOO_DATA not set, no ./data)")
    return DataNotFoundError(f"{dataset} not found: need {need}, {where}; {dl}; {_HINT}")


# ----------------------------------------------------------------------------------------- MNIST

def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """An unsigned-byte IDX array with ``ndim`` dimensions; DataFormatError on anything else."""
    with open(path, "rb") as f:
        data = f.read()
    if path.suffix == ".gz":
        try:
            data = gzip.decompress(data)
        except (EOFError, OSError, zlib.error) as e:  # truncated / not gzip / corrupt stream
            raise DataFormatError(f"{path}: corrupt or truncated gzip file ({_one_line(e)})") from None
    if len(data) < 4:
        raise DataFormatError(f"{path}: too short for an IDX file ({len(data)} bytes)")
    zero, dtype_code, nd = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise DataFormatError(f"{path}: not an unsigned-byte IDX file (header {data[:4].hex()}, "
                              f"expected 0000 08 0{ndim})")
    if nd != ndim:
        raise DataFormatError(f"{path}: expected a {ndim}-dimensional IDX array, got {nd} dimensions")
    if len(data) < 4 + 4 * nd:
        raise DataFormatError(f"{path}: truncated IDX header ({len(data)} bytes)")
    shape = struct.unpack(">" + "I" * nd, data[4:4 + 4 * nd])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * nd)
    expected = int(np.prod(shape))
    if arr.size != expected:
        what = "truncated" if arr.size < expected else "trailing bytes in"
        raise DataFormatError(f"{path}: {what} IDX file ({arr.size} values for shape {shape}, "
                              f"expected {expected})")
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


def _read_mnist(images: Path, labels: Path) -> tuple[np.ndarray, np.ndarray]:
    x, y = _read_idx(images, 3), _read_idx(labels, 1)
    if x.shape[1:] != (28, 28):
        raise DataFormatError(f"{images}: expected 28x28 images, got {x.shape[1]}x{x.shape[2]}")
    if len(x) != len(y):
        raise DataFormatError(f"{images} has {len(x)} images but {labels} has {len(y)} labels")
    if y.size and y.max() > 9:
        raise DataFormatError(f"{labels}: labels must be 0..9, found {int(y.max())}")
    return x, y


def _standard(name, x_tr, y_tr, x_te, y_te, source, n_train, n_val, n_test, seed):
    """The standard train/test split, with a stratified validation set carved from the training set
    (default 5000) and, if ``n_test`` is smaller than the test set, a stratified test subsample."""
    n_val = 5000 if n_val is None else n_val
    if n_train is None:
        _check_sizes(len(y_tr), f"{name} training images", "n_train", n_val=n_val)
        n_train = len(y_tr) - n_val
    _check_sizes(len(y_tr), f"{name} training images", n_train=n_train, n_val=n_val)
    if n_test is not None:
        _check_sizes(len(y_te), f"{name} test images", n_test=n_test)
    i_tr, i_va = stratified_split(y_tr, [n_train, n_val], seed)
    if n_test is not None and n_test < len(y_te):
        (i_te,) = stratified_split(y_te, [n_test], seed + 1)
        x_te, y_te = x_te[i_te], y_te[i_te]
    return DataSplits(name, x_tr[i_tr], y_tr[i_tr], x_tr[i_va], y_tr[i_va], x_te, y_te, 10, source,
                      f"{name} standard split: train={n_train} / val={n_val} (carved from the training "
                      f"set, seed={seed}) / test={len(y_te)}")


def _carve(name, x, y, num_classes, source, n_train, n_val, n_test, seed, note_prefix):
    """Train/val/test carved out of one set of ``len(y)`` images (defaults 6000/1000/the rest)."""
    n_train = 6000 if n_train is None else n_train
    n_val = 1000 if n_val is None else n_val
    what = f"images available ({note_prefix})"
    if n_test is None:
        _check_sizes(len(y), what, "n_test", n_train=n_train, n_val=n_val)
        n_test = len(y) - n_train - n_val
    _check_sizes(len(y), what, n_train=n_train, n_val=n_val, n_test=n_test)
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
    subsamples the official test set. Sizes beyond what exists raise ``ValueError``.
    """
    if normalize not in ("standard", "unit"):
        raise ValueError(f"normalize must be 'standard' or 'unit', got {normalize!r}")
    dirs = _search_dirs(data_dir, "MNIST")

    def find():
        return {(s, k): _mnist_file(dirs, s, k) for s in ("train", "t10k") for k in ("images", "labels")}

    files, reason = find(), None
    if files[("t10k", "images")] is None or files[("t10k", "labels")] is None:
        if download:
            root = _download_root(data_dir)
            reason = _try_download("mnist", root)
            dirs = _search_dirs(data_dir, "MNIST")
            files = find()
            reason = reason or f"downloaded into {str(root)!r} but the files are not there"
    if files[("t10k", "images")] is None or files[("t10k", "labels")] is None:
        raise _not_found("MNIST", "t10k-images-idx3-ubyte[.gz] and t10k-labels-idx1-ubyte[.gz] (optionally "
                         "train-*)", dirs, " and their mnist/, MNIST/raw/ sub-folders", download, reason)

    def load(split):
        xs, ys = _read_mnist(files[(split, "images")], files[(split, "labels")])
        x = torch.from_numpy(xs.copy()).float().div_(255.0)
        y = torch.from_numpy(ys.copy()).long()
        if normalize == "standard":
            x = (x - _MNIST_MEAN) / _MNIST_STD
        return x.unsqueeze(1), y

    x_te, y_te = load("t10k")
    source = str(files[("t10k", "images")].parent)
    if files[("train", "images")] is not None and files[("train", "labels")] is not None:
        x_tr, y_tr = load("train")
        return _standard("mnist", x_tr, y_tr, x_te, y_te, source, n_train, n_val, n_test, seed)
    return _carve("mnist", x_te, y_te, 10, source, n_train, n_val, n_test, seed,
                  "only the MNIST test set is available")


# -------------------------------------------------------------------------------------- CIFAR-10

class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts/lists of numpy arrays (what the CIFAR-10 python batches hold) and refuses
    every other global, so a tampered file cannot run code."""

    def find_class(self, module, name):
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name in ("_reconstruct", "scalar"):
            # numpy's own array / scalar reconstructors, taken from objects rather than by module path
            return (np.ndarray.__reduce__(np.zeros(0)) if name == "_reconstruct" else np.int64(0).__reduce__())[0]
        if (module, name) in (("numpy", "ndarray"), ("numpy", "dtype")):
            return getattr(np, name)
        if (module, name) == ("_codecs", "encode"):  # how Python 3 pickles bytes at protocol 2
            import codecs
            return codecs.encode
        raise pickle.UnpicklingError(f"refused to load global {module}.{name}")


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch: images (N, 32, 32, 3) uint8 and labels (N,)."""
    with open(path, "rb") as f:
        try:
            d = _ArrayUnpickler(f, encoding="latin1").load()
        except Exception as e:  # truncated / corrupt / not a pickle: many exception types
            raise DataFormatError(f"{path}: not a readable CIFAR-10 batch ({_one_line(e)})") from None
    if not isinstance(d, dict) or "data" not in d or "labels" not in d:
        keys = sorted(map(str, d)) if isinstance(d, dict) else None
        raise DataFormatError(f"{path}: expected a dict with 'data' and 'labels', got "
                              f"{'keys ' + str(keys) if keys is not None else type(d).__name__}")
    x = np.asarray(d["data"])
    y = np.asarray(d["labels"])
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3 * 32 * 32:
        raise DataFormatError(f"{path}: 'data' must be uint8 of shape (N, 3072), got {x.dtype} {x.shape}")
    if y.shape != (len(x),):
        raise DataFormatError(f"{path}: {len(x)} images but 'labels' has shape {y.shape}")
    return x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), _check_labels(path, y)


def _check_labels(path: Path, y: np.ndarray) -> np.ndarray:
    if y.size and (not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() > 9):
        raise DataFormatError(f"{path}: labels must be integers 0..9, got {y.dtype} in "
                              f"[{y.min()}, {y.max()}]")
    return y


def _read_cifar_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``x`` (N, 32, 32, 3) uint8 and ``y`` (N,) from an ``.npz`` (pickles refused)."""
    try:
        with np.load(path) as z:
            missing = [k for k in ("x", "y") if k not in z.files]
            if missing:
                raise DataFormatError(f"{path}: missing array(s) {missing}; found {sorted(z.files)}")
            x, y = z["x"], z["y"]
    except DataFormatError:
        raise
    except Exception as e:  # BadZipFile, EOFError, zlib.error, ValueError (pickled arrays), ...
        raise DataFormatError(f"{path}: not a readable .npz file ({_one_line(e)})") from None
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (32, 32, 3):
        raise DataFormatError(f"{path}: 'x' must be uint8 of shape (N, 32, 32, 3), got {x.dtype} {x.shape}")
    if y.shape != (len(x),):
        raise DataFormatError(f"{path}: {len(x)} images but 'y' has shape {y.shape}")
    return x, _check_labels(path, y)


def load_cifar10(data_dir=None, *, n_train: int | None = None, n_val: int | None = None,
                 n_test: int | None = None, seed: int = 0, download: bool = True) -> DataSplits:
    """CIFAR-10 as tensors of shape (N, 3, 32, 32), channel-standardised.

    Standard pickles (``cifar-10-batches-py``) give the standard split (validation carved from the
    50,000 training images). With only ``cifar10_test_jpeg.npz`` the default carve is
    6000/1000/3000. Sizes beyond what exists raise ``ValueError``.
    """
    dirs = _search_dirs(data_dir, "CIFAR-10")

    def find_pickles():
        for d in dirs:
            for sub in ("cifar-10-batches-py", "cifar10/cifar-10-batches-py", "cifar10", ""):
                base = d / sub if sub else d
                if (base / "data_batch_1").is_file() and (base / "test_batch").is_file():
                    return base
        return None

    def find_npz():
        return _find(dirs, ("cifar10", ""), ("cifar10_test_jpeg.npz",))

    pk, npz, reason = find_pickles(), find_npz(), None
    if pk is None and npz is None and download:
        root = _download_root(data_dir)
        reason = _try_download("cifar10", root)
        dirs = _search_dirs(data_dir, "CIFAR-10")
        pk, npz = find_pickles(), find_npz()
        reason = reason or f"downloaded into {str(root)!r} but the files are not there"
    mean = torch.tensor(_CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(_CIFAR_STD).view(1, 3, 1, 1)

    def to_tensor(x_uint8_nhwc):
        x = torch.from_numpy(np.ascontiguousarray(x_uint8_nhwc)).permute(0, 3, 1, 2).float() / 255.0
        return (x - mean) / std

    if pk is not None:
        missing = [f"data_batch_{i}" for i in range(2, 6) if not (pk / f"data_batch_{i}").is_file()]
        if missing:
            raise DataNotFoundError(f"CIFAR-10 incomplete: {str(pk)!r} has data_batch_1 and test_batch "
                                    f"but not {missing}")
        parts = [_read_cifar_batch(pk / f"data_batch_{i}") for i in range(1, 6)]
        x_tr = to_tensor(np.concatenate([p[0] for p in parts]))
        y_tr = torch.from_numpy(np.concatenate([p[1] for p in parts]).astype(np.int64))
        xt, yt = _read_cifar_batch(pk / "test_batch")
        x_te, y_te = to_tensor(xt), torch.from_numpy(yt.astype(np.int64))
        return _standard("cifar10", x_tr, y_tr, x_te, y_te, str(pk), n_train, n_val, n_test, seed)
    if npz is None:
        raise _not_found("CIFAR-10", "cifar-10-batches-py/{data_batch_1..5,test_batch} or "
                         "cifar10/cifar10_test_jpeg.npz", dirs, "", download, reason)
    xs, ys = _read_cifar_npz(npz)
    x, y = to_tensor(xs), torch.from_numpy(ys.astype(np.int64))
    return _carve("cifar10", x, y, 10, str(npz.parent), n_train, n_val, n_test, seed,
                  "only the CIFAR-10 test set (JPEG-decoded copy) is available")


def load_dataset(name: str, data_dir=None, **kwargs) -> DataSplits:
    """Load ``"mnist"`` or ``"cifar10"`` (see :func:`load_mnist`, :func:`load_cifar10`)."""
    if name == "mnist":
        return load_mnist(data_dir, **kwargs)
    if name == "cifar10":
        return load_cifar10(data_dir, **kwargs)
    raise KeyError(f"unknown dataset {name!r}; choose from {list(DATASETS)}")
