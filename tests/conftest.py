"""Shared fixtures. Real data is read from $L2L_ZOO_DATA (CI: ../shared/data)."""
import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def _data_dir():
    d = os.environ.get("L2L_ZOO_DATA")
    return d if d and os.path.isdir(d) else None


@pytest.fixture(scope="session")
def data_dir():
    d = _data_dir()
    if d is None:
        pytest.skip("real data not available: set L2L_ZOO_DATA (CI uses ../shared/data)")
    return d


@pytest.fixture(scope="session")
def mnist_small(data_dir):
    """Real MNIST: 2000/500/1000 stratified images carved from the test set."""
    from l2l_zoo.tasks import load_dataset
    return load_dataset("mnist", data_dir, n_train=2000, n_val=500, n_test=1000, seed=0)
