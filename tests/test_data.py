"""Dataset loaders on the real files in $L2L_ZOO_DATA; missing, mistyped and damaged data (files
written by the tests into tmp_path, never into the repository); downloads that fail cleanly."""
import gzip
import os
import pickle
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from l2l_zoo.tasks import DataNotFoundError, load_dataset, make_task
from l2l_zoo.tasks import data as data_mod
from l2l_zoo.tasks.data import DataFormatError, load_cifar10, load_mnist, stratified_split


def test_stratified_split_is_disjoint_balanced_and_deterministic():
    y = torch.arange(10).repeat_interleave(torch.tensor([98, 113, 103, 101, 98, 89, 95, 102, 97, 104]))
    a = stratified_split(y, [600, 100, 300], seed=0)
    b = stratified_split(y, [600, 100, 300], seed=0)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert [len(t) for t in a] == [600, 100, 300]
    assert len(torch.unique(torch.cat(a))) == 1000
    props = torch.bincount(y[a[0]], minlength=10).float() / 600
    full = torch.bincount(y, minlength=10).float() / len(y)
    assert (props - full).abs().max() < 0.01
    c = stratified_split(y, [600, 100, 300], seed=1)
    assert not torch.equal(a[0], c[0])
    with pytest.raises(ValueError, match="sum to at most"):
        stratified_split(y, [900, 200], seed=0)


def test_mnist_from_the_test_set_only(data_dir):
    d = load_dataset("mnist", data_dir)
    assert (len(d.y_train), len(d.y_val), len(d.y_test)) == (6000, 1000, 3000)
    assert d.x_train.shape[1:] == (1, 28, 28) and d.x_train.dtype == torch.float32
    assert "only the MNIST test set is available" in d.note and "stratified" in d.note
    # the official test-set class counts: the carve keeps their proportions
    assert torch.bincount(d.y_train, minlength=10).tolist()[1] == round(6000 * 1135 / 10000)
    ids = lambda x: {hash(r.numpy().tobytes()) for r in x}  # noqa: E731
    assert not ids(d.x_train) & ids(d.x_test), "train and test overlap"
    u = load_dataset("mnist", data_dir, normalize="unit", n_train=7000, n_val=700)
    assert u.x_train.min() >= 0 and u.x_train.max() <= 1 and len(u.y_test) == 2300


def test_cifar10_from_the_jpeg_test_set(data_dir):
    d = load_dataset("cifar10", data_dir)
    assert d.x_train.shape[1:] == (3, 32, 32) and len(d.y_train) == 6000
    assert abs(float(d.x_train.mean())) < 0.2
    assert "CIFAR-10 test set" in d.note


def test_missing_data_names_files_and_places(tmp_path, monkeypatch):
    monkeypatch.delenv("L2L_ZOO_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataNotFoundError, match=r"MNIST not found: need t10k-images.*looked in \[.*empty.*"
                                                r"not downloaded \(download=False\); pass data_dir= or set L2L_ZOO_DATA$"):
        load_dataset("mnist", tmp_path / "empty", download=False)
    with pytest.raises(DataNotFoundError, match="CIFAR-10 not found.*pass data_dir= or set L2L_ZOO_DATA$") as e:
        load_dataset("cifar10", tmp_path / "empty", download=False)
    assert "--data-dir" not in str(e.value), "library messages name parameters, not flags"
    with pytest.raises(DataNotFoundError, match=r"looked in no folder \(no data_dir given, L2L_ZOO_DATA not set"):
        load_dataset("mnist", download=False)
    with pytest.raises(KeyError, match="unknown dataset 'svhn'"):
        load_dataset("svhn")


def test_an_explicit_folder_that_does_not_exist_is_an_error(data_dir, tmp_path, monkeypatch):
    """Before: a mistyped data_dir was skipped and the data read from $L2L_ZOO_DATA, while the
    config recorded the typo."""
    monkeypatch.setenv("L2L_ZOO_DATA", data_dir)
    typo = tmp_path / "mnsit"
    with pytest.raises(DataNotFoundError, match=f"MNIST not found: data_dir '{typo}' does not exist$"):
        load_dataset("mnist", typo)
    with pytest.raises(DataNotFoundError, match=f"CIFAR-10 not found: data_dir '{typo}' does not exist$"):
        load_dataset("cifar10", typo)
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataNotFoundError, match="data_dir .* is not a folder"):
        load_dataset("mnist", tmp_path / "file")
    assert not typo.exists(), "nothing may be created for a mistyped folder"
    # a set but mistyped $L2L_ZOO_DATA is an error too (even when data_dir is good): deterministic
    monkeypatch.setenv("L2L_ZOO_DATA", str(typo))
    with pytest.raises(DataNotFoundError, match=f"MNIST not found: L2L_ZOO_DATA '{typo}' does not exist$"):
        load_dataset("mnist")
    with pytest.raises(DataNotFoundError, match="L2L_ZOO_DATA .* does not exist"):
        load_dataset("mnist", data_dir)
    monkeypatch.setenv("L2L_ZOO_DATA", "")  # empty means unset
    assert len(load_dataset("mnist", data_dir).y_train) == 6000


# -------------------------------------------------------------------------------------- downloads

@pytest.fixture
def offline_env(tmp_path, monkeypatch):
    """No $L2L_ZOO_DATA, the current folder an empty tmp_path, and a process-wide socket timeout
    that the loader must leave as it is."""
    monkeypatch.delenv("L2L_ZOO_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(data_mod, "_urls", lambda dataset: ["https://mirror.invalid/x/"])
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(7.0)
    yield tmp_path
    socket.setdefaulttimeout(old)


def _tree(root):
    return sorted(str(p.relative_to(root)) for p in Path(root).rglob("*"))


def test_unreachable_network_reports_why_and_leaves_nothing_behind(offline_env, monkeypatch):
    def probe(url, timeout=5.0):
        assert socket.getdefaulttimeout() == 7.0, "the global socket timeout was changed"
        raise OSError("simulated: network is unreachable")
    monkeypatch.setattr(data_mod, "_probe", probe)
    for load in (load_mnist, load_cifar10):
        with pytest.raises(DataNotFoundError, match=r"download failed: cannot reach mirror.invalid: "
                                                    r"OSError: simulated: network is unreachable; pass data_dir="):
            load()
        assert _tree(offline_env) == [], "the failed download left folders behind (./data)"
    assert socket.getdefaulttimeout() == 7.0


def test_a_download_failing_halfway_removes_only_what_it_created(offline_env, monkeypatch):
    monkeypatch.setattr(data_mod, "_probe", lambda url, timeout=5.0: None)

    def fetch(dataset, root):  # torchvision writing part of a file, then the mirror dies
        raw = root / "MNIST" / "raw"
        raw.mkdir(parents=True)
        (raw / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b half a file")
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nmirror down")
    monkeypatch.setattr(data_mod, "_fetch", fetch)
    with pytest.raises(DataNotFoundError, match="download failed: RuntimeError: Error downloading "
                                                "train-images-idx3-ubyte.gz:; pass data_dir") as e:
        load_mnist()  # into ./data, which does not exist yet
    assert "\n" not in str(e.value)
    assert _tree(offline_env) == []
    # into an existing folder with the user's own files: those stay, nothing else does
    mine = offline_env / "mine"
    (mine / "MNIST").mkdir(parents=True)
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(DataNotFoundError, match="download failed: RuntimeError"):
        load_mnist(mine)
    assert _tree(offline_env) == ["mine", "mine/MNIST", "mine/notes.txt"]


def test_a_successful_download_is_moved_into_place(data_dir, offline_env, monkeypatch):
    monkeypatch.setattr(data_mod, "_probe", lambda url, timeout=5.0: None)

    def fetch(dataset, root):  # what torchvision leaves: MNIST/raw/<files>
        raw = root / "MNIST" / "raw"
        raw.mkdir(parents=True)
        for kind in ("images-idx3", "labels-idx1"):
            shutil.copy(os.path.join(data_dir, "mnist", f"t10k-{kind}-ubyte.gz"), raw)
    monkeypatch.setattr(data_mod, "_fetch", fetch)
    d = load_mnist(n_train=100, n_val=100, n_test=100)
    assert len(d.y_train) == 100 and d.source == os.path.join("data", "MNIST", "raw")
    assert _tree(offline_env) == ["data", "data/MNIST", "data/MNIST/raw", "data/MNIST/raw/t10k-images-idx3-ubyte.gz",
                                  "data/MNIST/raw/t10k-labels-idx1-ubyte.gz"], "staging folder left behind"


# ----------------------------------------------------------------------------------- damaged files

def _mnist_copy(data_dir, folder, images=None, labels=None, images_name="t10k-images-idx3-ubyte.gz",
                labels_name="t10k-labels-idx1-ubyte.gz"):
    """The real MNIST test files copied into ``folder``, with ``images``/``labels`` bytes (already
    compressed or not, as the name says) replacing either."""
    folder.mkdir(exist_ok=True)
    for kind, blob, name in (("images-idx3", images, images_name), ("labels-idx1", labels, labels_name)):
        if blob is None:
            shutil.copy(os.path.join(data_dir, "mnist", f"t10k-{kind}-ubyte.gz"), folder / name)
        else:
            (folder / name).write_bytes(blob)
    return folder


def _real(data_dir, kind):
    with open(os.path.join(data_dir, "mnist", f"t10k-{kind}-ubyte.gz"), "rb") as f:
        return f.read()


def _idx(array, dims):
    a = np.asarray(array, np.uint8)
    return bytes([0, 0, 8, dims]) + b"".join(int(n).to_bytes(4, "big") for n in a.shape) + a.tobytes()


@pytest.mark.parametrize("case,message", [
    ("truncated_gz", r"t10k-images-idx3-ubyte.gz: corrupt or truncated gzip file \(EOFError: Compressed file ended"),
    ("not_gzip", r"t10k-images-idx3-ubyte.gz: corrupt or truncated gzip file \(BadGzipFile"),
    ("truncated_idx", r"t10k-images-idx3-ubyte: truncated IDX file \(3919992 values for shape \(10000, 28, 28\), "
                      r"expected 7840000\)"),
    ("tiny", r"t10k-images-idx3-ubyte: too short for an IDX file \(2 bytes\)"),
    ("labels_as_images", "t10k-images-idx3-ubyte.gz: expected a 3-dimensional IDX array, got 1 dimensions"),
    ("not_idx", "t10k-images-idx3-ubyte: not an unsigned-byte IDX file"),
    ("count_mismatch", "t10k-images-idx3-ubyte.gz has 10000 images but .*t10k-labels-idx1-ubyte has 9999 labels"),
    ("bad_labels", r"t10k-labels-idx1-ubyte: labels must be 0..9, found 12"),
])
def test_damaged_mnist_files_give_one_line_naming_the_file(data_dir, tmp_path, case, message):
    img, lab = _real(data_dir, "images-idx3"), _real(data_dir, "labels-idx1")
    raw_img = gzip.decompress(img)
    folder = tmp_path / "d"
    if case == "truncated_gz":
        _mnist_copy(data_dir, folder, images=img[:len(img) // 2])
    elif case == "not_gzip":
        _mnist_copy(data_dir, folder, images=b"this is not gzip data at all")
    elif case == "truncated_idx":
        _mnist_copy(data_dir, folder, images=raw_img[:len(raw_img) // 2], images_name="t10k-images-idx3-ubyte")
    elif case == "tiny":
        _mnist_copy(data_dir, folder, images=b"\x00\x00", images_name="t10k-images-idx3-ubyte")
    elif case == "labels_as_images":
        _mnist_copy(data_dir, folder, images=lab)
    elif case == "not_idx":
        _mnist_copy(data_dir, folder, images=b"P5\n28 28\n255\n" + bytes(784), images_name="t10k-images-idx3-ubyte")
    elif case == "count_mismatch":
        labels = np.frombuffer(gzip.decompress(lab), np.uint8, offset=8)[:9999]
        _mnist_copy(data_dir, folder, labels=_idx(labels, 1), labels_name="t10k-labels-idx1-ubyte")
    elif case == "bad_labels":
        labels = np.frombuffer(gzip.decompress(lab), np.uint8, offset=8).copy()
        labels[5] = 12
        _mnist_copy(data_dir, folder, labels=_idx(labels, 1), labels_name="t10k-labels-idx1-ubyte")
    with pytest.raises(DataFormatError, match=message) as e:
        load_mnist(folder, download=False)
    assert "\n" not in str(e.value) and str(folder) in str(e.value)


def _cifar_batches(folder, n=20, seed=0):
    """Small fake CIFAR-10 python batches (the real format: dict of a uint8 (N, 3072) array and a
    label list), written by pickle at protocol 2 as the originals."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        d = {"batch_label": name, "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
             "labels": [int(v) for v in np.arange(n) % 10], "filenames": [f"{i}.png" for i in range(n)]}
        with open(folder / name, "wb") as f:
            pickle.dump(d, f, protocol=2)
    return folder


class _Marker:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_cifar_pickles_standard_split_and_sizes(tmp_path):
    pk = _cifar_batches(tmp_path / "cifar-10-batches-py")
    d = load_cifar10(tmp_path, n_val=20, download=False)
    assert (len(d.y_train), len(d.y_val), len(d.y_test)) == (80, 20, 20) and d.x_train.shape[1:] == (3, 32, 32)
    assert d.note.startswith("cifar10 standard split")
    batch = pickle.loads((pk / "test_batch").read_bytes())
    batch["labels"] = [np.int64(v) for v in batch["labels"]]  # numpy scalars unpickle too
    (pk / "test_batch").write_bytes(pickle.dumps(batch, protocol=2))
    assert torch.equal(load_cifar10(tmp_path, n_val=20, download=False).y_test.sort().values, d.y_test.sort().values)
    with pytest.raises(ValueError, match=r"n_test = 21 exceeds the 20 cifar10 test images: n_test must be at most 20"):
        load_cifar10(tmp_path, n_val=20, n_test=21, download=False)
    with pytest.raises(ValueError, match=r"n_val = 5000 leaves no images for the default n_train out of the 100 "
                                         r"cifar10 training images: n_val must be at most 99"):
        load_cifar10(tmp_path, download=False)  # the default n_val is 5000
    with pytest.raises(ValueError, match=r"n_train \+ n_val = 101 exceeds the 100 cifar10 training images"):
        load_cifar10(tmp_path, n_train=81, n_val=20, download=False)
    assert pk.is_dir()


@pytest.mark.parametrize("case,message", [
    ("truncated", r"data_batch_3: not a readable CIFAR-10 batch \("),
    ("code", r"data_batch_3: not a readable CIFAR-10 batch \(UnpicklingError: refused to load global"),
    ("not_a_dict", r"data_batch_3: expected a dict with 'data' and 'labels', got list"),
    ("bad_shape", r"data_batch_3: 'data' must be uint8 of shape \(N, 3072\), got uint8 \(20, 1000\)"),
    ("bad_labels", r"data_batch_3: labels must be integers 0..9"),
])
def test_damaged_cifar_pickles_give_one_line_and_never_run_code(tmp_path, case, message):
    pk = _cifar_batches(tmp_path / "cifar-10-batches-py")
    target, marker = pk / "data_batch_3", tmp_path / "marker"
    blob = target.read_bytes()
    if case == "truncated":
        target.write_bytes(blob[:len(blob) // 2])
    else:
        obj = {"code": {"data": _Marker(marker), "labels": [0]},
               "not_a_dict": [1, 2], "bad_shape": {"data": np.zeros((20, 1000), np.uint8), "labels": [0] * 20},
               "bad_labels": {"data": np.zeros((20, 3072), np.uint8), "labels": [11] * 20}}[case]
        target.write_bytes(pickle.dumps(obj, protocol=2))
    with pytest.raises(DataFormatError, match=message) as e:
        load_cifar10(tmp_path, n_val=20, download=False)
    assert "\n" not in str(e.value) and str(target) in str(e.value)
    assert not marker.exists(), "unpickling ran code from the data file"


@pytest.mark.parametrize("case,message", [
    ("truncated", r"cifar10_test_jpeg.npz: not a readable .npz file \(BadZipFile"),
    ("missing", r"cifar10_test_jpeg.npz: missing array\(s\) \['y'\]; found \['x'\]"),
    ("bad_shape", r"cifar10_test_jpeg.npz: 'x' must be uint8 of shape \(N, 32, 32, 3\), got uint8 \(10, 3, 32, 32\)"),
    ("mismatch", r"cifar10_test_jpeg.npz: 10 images but 'y' has shape \(9,\)"),
])
def test_damaged_cifar_npz_gives_one_line(data_dir, tmp_path, case, message):
    folder = tmp_path / "cifar10"
    folder.mkdir()
    target = folder / "cifar10_test_jpeg.npz"
    if case == "truncated":
        blob = Path(data_dir, "cifar10", "cifar10_test_jpeg.npz").read_bytes()
        target.write_bytes(blob[:len(blob) // 2])
    else:
        x = np.zeros((10, 32, 32, 3), np.uint8)
        arrays = {"missing": {"x": x}, "bad_shape": {"x": np.zeros((10, 3, 32, 32), np.uint8), "y": np.zeros(10)},
                  "mismatch": {"x": x, "y": np.zeros(9, np.int64)}}[case]
        with open(target, "wb") as f:
            np.savez(f, **arrays)
    with pytest.raises(DataFormatError, match=message) as e:
        load_cifar10(tmp_path, download=False)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------- sizes

def test_asking_for_more_images_than_exist_is_an_error(data_dir, tmp_path):
    with pytest.raises(ValueError, match=r"n_train \+ n_val \+ n_test = 10001 exceeds the 10000 images available "
                                         r"\(only the MNIST test set is available\): .* at most 10000"):
        load_dataset("mnist", data_dir, n_train=8000, n_val=1000, n_test=1001)
    with pytest.raises(ValueError, match=r"n_train \+ n_val = 10000 leaves no images for the default n_test .* "
                                         r"at most 9999, got n_train=9000, n_val=1000"):
        load_dataset("mnist", data_dir, n_train=9000, n_val=1000)
    with pytest.raises(ValueError, match=r"n_train \+ n_val \+ n_test = 10500 exceeds the 10000 images available "
                                         r"\(only the CIFAR-10 test set"):
        load_dataset("cifar10", data_dir, n_train=9000, n_test=500)
    for bad in (0, -5, 2.5, True):
        with pytest.raises(ValueError, match=f"n_val must be an integer >= 1, got {bad!r}"):
            load_dataset("mnist", data_dir, n_val=bad)
    # standard split (train-* files present): a test set larger than the official one used to be
    # clamped silently to the whole test set
    for kind in ("images-idx3", "labels-idx1"):
        for split in ("t10k", "train"):
            shutil.copy(os.path.join(data_dir, "mnist", f"t10k-{kind}-ubyte.gz"), tmp_path / f"{split}-{kind}-ubyte.gz")
    with pytest.raises(ValueError, match="n_test = 10001 exceeds the 10000 mnist test images: n_test must be at most 10000"):
        load_dataset("mnist", tmp_path, n_val=1000, n_test=10001)
    with pytest.raises(ValueError, match=r"n_train \+ n_val = 10001 exceeds the 10000 mnist training images"):
        load_dataset("mnist", tmp_path, n_train=9001, n_val=1000)
    assert len(load_dataset("mnist", tmp_path, n_val=1000, n_test=10000).y_test) == 10000


@pytest.mark.parametrize("name,num_params", [("mlp", 397_510), ("lenet", 61_706), ("cifar_conv", 24_522),
                                             ("deep_mlp", 6_578_010), ("mlp20", 15_910)])
def test_named_tasks(data_dir, name, num_params):
    task = make_task(name, data_dir=data_dir, batch_size=32)
    assert task.num_params == num_params
    model = task.build_model(seed=3)
    x, y = task.sample_batch(torch.Generator().manual_seed(0))
    assert model(x).shape == (32, 10) and y.shape == (32,)
    loss, acc = task.evaluate(model, "val")
    assert 1.5 < loss < 3.5 and 0.0 <= acc <= 0.3  # an untrained 10-class model
    a = task.init_params(5)
    b = task.init_params(5)
    c = task.init_params(6)
    assert all(torch.equal(u, v) for u, v in zip(a, b)), "same seed, same initialisation"
    assert not torch.equal(a[0], c[0]), "two seeds gave the same initialisation"
    assert [t.shape for t in a] == [p.shape for p in model.parameters()]


def test_standard_files_give_the_standard_split(data_dir, tmp_path):
    """With train-* files present the loader uses them (here the test files stand in for a full
    training set, in a temporary folder) and carves validation out of the training set."""
    import os
    import shutil
    for kind in ("images-idx3", "labels-idx1"):
        src = os.path.join(data_dir, "mnist", f"t10k-{kind}-ubyte.gz")
        shutil.copy(src, tmp_path / f"t10k-{kind}-ubyte.gz")
        shutil.copy(src, tmp_path / f"train-{kind}-ubyte.gz")
    d = load_dataset("mnist", tmp_path, n_val=1000, n_test=2000)
    assert (len(d.y_train), len(d.y_val), len(d.y_test)) == (9000, 1000, 2000)
    assert d.note.startswith("mnist standard split") and "carved from the training set" in d.note
