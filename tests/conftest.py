"""Shared fixtures. Real data is read from $L2L_ZOO_DATA (CI: ../shared/data)."""
import os

import pytest
import torch

import fewshot.metalstm  # noqa: F401  registers "metalstm": every registered optimizer gets the generic tests

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


# Construction options a registered learned optimizer needs for the generic adapter tests
# (tests/test_adapter.py iterates l2l_zoo.available(); an optimizer not listed here is built with {}).
# MLR-SNet: a fixed gamma (else it is computed from the first loss) and the number of classes;
# momentum gives it a per-coordinate state (the momentum buffer) beside its global LSTM state.
LOPT_OPTIONS = {"mlrsnet": dict(gamma=0.1, num_classes=10, momentum=0.9)}


@pytest.fixture
def make_lopt():
    """``make_lopt(name, **overrides)``: the registered optimizer ``name`` with the options of
    ``LOPT_OPTIONS`` (seeded, so every call gives the same meta-parameters)."""
    import l2l_zoo

    def make(name, **overrides):
        torch.manual_seed(0)
        return l2l_zoo.create(name, **{**LOPT_OPTIONS.get(name, {}), **overrides})
    return make


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """Every test leaves torch's thread count as it found it (a test that sets 1 thread once changed
    the rounding of every later test in the process)."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def killed_at(call: int, fn):
    """``fn`` wrapped to raise KeyboardInterrupt on its ``call``-th call (1-based), as a killed run
    would stop: for the bit-exact resume tests."""
    calls = {"n": 0}

    def wrapped(*args):
        calls["n"] += 1
        if calls["n"] == call:
            raise KeyboardInterrupt
        return fn(*args)
    return wrapped


def _data_dir():
    d = os.environ.get("L2L_ZOO_DATA")
    # absolute: CI passes ../shared/data, and some tests change the working directory
    return os.path.abspath(d) if d and os.path.isdir(d) else None


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
