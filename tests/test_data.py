"""Dataset loaders on the real files in $L2L_ZOO_DATA, and the missing-data message."""
import pytest
import torch

from l2l_zoo.tasks import TASKS, DataNotFoundError, load_dataset, make_task
from l2l_zoo.tasks.data import stratified_split


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
    with pytest.raises(DataNotFoundError, match=r"MNIST not found: need t10k-images.*looked in \[.*empty"):
        load_dataset("mnist", tmp_path / "empty", download=False)
    with pytest.raises(DataNotFoundError, match="CIFAR-10 not found"):
        load_dataset("cifar10", tmp_path / "empty", download=False)
    with pytest.raises(KeyError, match="unknown dataset 'svhn'"):
        load_dataset("svhn")


@pytest.mark.parametrize("name,num_params", [("mlp", 397_510), ("lenet", 61_706), ("cifar_conv", 24_522),
                                             ("deep_mlp", 6_578_010), ("mlp20", 15_910)])
def test_named_tasks(data_dir, name, num_params):
    task = make_task(name, data_dir=data_dir)
    assert task.num_params == num_params
    model = task.build_model(seed=3)
    loss, acc = task.evaluate(model, "val")
    assert 1.5 < loss < 3.5 and 0.0 <= acc <= 0.3  # an untrained 10-class model
    a = task.init_params(5)
    b = task.init_params(5)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert set(TASKS) >= {name}


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
