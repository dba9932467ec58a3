"""l2l_zoo.save / l2l_zoo.load: atomic, concurrency-safe writes, and one-line refusals of every kind
of file that is not a usable learned-optimizer file (pickled code is refused, never run)."""
import os
import pickle
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from torch import nn

import l2l_zoo
from l2l_zoo.registry import LearnedOptimizerFileError, _FORMAT, _VERSION


def _one_line_naming(e, path):
    msg = str(e.value)
    assert "\n" not in msg, msg
    assert str(path) in msg, msg
    return msg


# ------------------------------------------------------------------------------------------ save

_WRITER = textwrap.dedent("""
    import os, sys, time, torch, l2l_zoo
    path, seed, ready, go, n = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
    torch.manual_seed(seed)
    lopt = l2l_zoo.create("simple")
    open(ready, "w").close()
    while not os.path.exists(go):
        time.sleep(0.005)
    for i in range(n):
        l2l_zoo.save(lopt, path, writer=seed, i=i)
""")


def test_two_processes_saving_to_one_path_never_collide(tmp_path):
    """The old fixed ``<path>.tmp`` made one writer's os.replace fail on the other's (24-30 times in
    100 saves); per-call temporary names make every save succeed."""
    path, go = tmp_path / "o.pt", tmp_path / "go"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(path), str(s), str(tmp_path / f"ready{s}"),
                               str(go), "100"], stderr=subprocess.PIPE, text=True, env=env) for s in (0, 1)]
    try:
        deadline = time.monotonic() + 60
        while not all((tmp_path / f"ready{s}").exists() for s in (0, 1)):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
                [p.stderr.read() for p in procs if p.poll() is not None]
            time.sleep(0.01)
        go.touch()  # both start saving at the same moment
        errs = [p.communicate(timeout=60)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], errs
    back, extra = l2l_zoo.load(path, with_extra=True)
    assert extra["i"] == 99 and extra["writer"] in (0, 1)
    torch.manual_seed(extra["writer"])
    ref = l2l_zoo.create("simple")
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), ref.state_dict().values()))
    assert sorted(os.listdir(tmp_path)) == ["go", "o.pt", "ready0", "ready1"], "temporary files left behind"


def test_failed_save_removes_its_temporary_and_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "o.pt"
    l2l_zoo.save(l2l_zoo.create("simple"), path, version="old")

    def broken(obj, f, *a, **k):
        f.write(b"PK\x03\x04 half")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        l2l_zoo.save(l2l_zoo.create("dm"), path)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["o.pt"]
    assert l2l_zoo.load(path, with_extra=True)[1] == {"version": "old"}


def test_save_refuses_extra_that_load_could_not_read(tmp_path):
    """A numpy scalar saves fine with torch.save but makes a weights_only load fail later."""
    with pytest.raises(TypeError, match=r"extra must hold only .*got float64 at extra\['cfg'\]\['lr'\]"):
        l2l_zoo.save(l2l_zoo.create("simple"), tmp_path / "o.pt", cfg={"lr": np.float64(0.1)})
    assert not os.listdir(tmp_path)


# ------------------------------------------------------------------------------------------ load

def test_missing_file_is_file_not_found_with_the_path(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        l2l_zoo.load(tmp_path / "nope.pt")
    _one_line_naming(e, tmp_path / "nope.pt")


class _Marker:
    """Unpickling this would create the marker file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _write_text(p):
    p.write_text("hello world\n")


def _write_random(p):
    p.write_bytes(np.random.default_rng(0).bytes(4096))


def _write_truncated(p):
    l2l_zoo.save(l2l_zoo.create("dm"), p)
    data = p.read_bytes()
    p.write_bytes(data[:len(data) // 2])


def _write_empty(p):
    p.write_bytes(b"")


def _write_state_dict(p):
    torch.save(nn.Linear(3, 2).state_dict(), p)


def _write_sgd_state(p):
    w = nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=0.1, momentum=0.9)
    w.sum().backward()
    opt.step()
    torch.save(opt.state_dict(), p)


def _write_list(p):
    torch.save([1, 2, 3], p)


@pytest.mark.parametrize("write,found", [
    (_write_text, "found a text file starting 'hello world'"),
    (_write_random, "found binary data starting"),
    (_write_truncated, "found a damaged or truncated torch archive"),
    (_write_empty, "found an empty file"),
    (_write_state_dict, r"found a dict with keys \['bias', 'weight'\] \(a plain state dict\?\)"),
    (_write_sgd_state, r"found a dict with keys \['param_groups', 'state'\] \(a torch.optim state dict\?\)"),
    (_write_list, "found a list"),
])
def test_files_that_are_not_learned_optimizers_are_named_as_such(tmp_path, write, found):
    p = tmp_path / "f.pt"
    write(p)
    with pytest.raises(LearnedOptimizerFileError, match="is not a usable l2l_zoo learned-optimizer file: " + found) as e:
        l2l_zoo.load(p)
    msg = _one_line_naming(e, p)
    assert "weights_only" not in msg


@pytest.mark.parametrize("fmt", ["pickle", "torch"])
def test_pickled_code_is_refused_never_executed(tmp_path, fmt):
    marker, p = tmp_path / "marker", tmp_path / "evil.pt"
    payload = {"format": _FORMAT, "version": _VERSION, "name": "simple", "config": {},
               "state_dict": {}, "extra": {"x": _Marker(marker)}}
    if fmt == "pickle":
        with open(p, "wb") as f:
            pickle.dump(payload, f)
    else:
        torch.save(payload, p)
    assert not marker.exists()
    with pytest.raises(LearnedOptimizerFileError, match="plain pickle|refused, not executed") as e:
        l2l_zoo.load(p)
    msg = _one_line_naming(e, p)
    assert "weights_only" not in msg
    assert not marker.exists(), "the pickle's code ran"


def _payload(**over):
    lopt = l2l_zoo.create("simple")
    d = {"format": _FORMAT, "version": _VERSION, "name": "simple", "config": lopt.config,
         "state_dict": dict(lopt.state_dict()), "extra": {}}
    d.update(over)
    return d


def _nan_state():
    sd = dict(l2l_zoo.create("simple").state_dict())
    sd["weight_hh"] = sd["weight_hh"].clone()
    sd["weight_hh"][0, 0] = float("nan")
    sd["weight_hh"][1, 1] = float("inf")
    return sd


@pytest.mark.parametrize("over,found", [
    ({"state_dict": _nan_state()}, r"meta-parameter 'weight_hh' has 2 non-finite \(NaN/inf\) value\(s\) of 100"),
    ({"name": "adamw"}, r"optimizer 'adamw' is not registered; registered: \['dm', .*'simple'\]"),
    ({"config": {"hidden_size": 10, "hiden": 3}}, r"unknown option\(s\) \['hiden'\] for optimizer 'simple'"),
    ({"config": {"input_norm": "l2"}}, "invalid config for optimizer 'simple': input_norm must be one of"),
    ({"config": {"hidden_size": 5}}, r"meta-parameter 'weight_ih' has shape \(10, 1\), optimizer 'simple' "
                                     r"with its config needs \(5, 1\)"),
    ({"config": {"aggregation": False}}, r"missing \[\], unexpected \['alpha', 'beta'\]"),
    ({"version": 2}, "format version 2, this l2l_zoo reads version 1"),
    ({"config": [1]}, "entry 'config' should be a dict, found a list"),
])
def test_learned_optimizer_files_with_bad_contents_are_refused(tmp_path, over, found):
    p = tmp_path / "o.pt"
    torch.save(_payload(**over), p)
    with pytest.raises(LearnedOptimizerFileError, match=found) as e:
        l2l_zoo.load(p)
    _one_line_naming(e, p)


def test_nan_meta_parameters_written_by_save_are_refused_on_load(tmp_path):
    """Accepted nonsense before: a ``--load`` file with NaN meta-parameters."""
    lopt = l2l_zoo.create("dm")
    with torch.no_grad():
        next(lopt.parameters()).fill_(float("nan"))
    l2l_zoo.save(lopt, tmp_path / "o.pt")
    with pytest.raises(LearnedOptimizerFileError, match="non-finite"):
        l2l_zoo.load(tmp_path / "o.pt")


def test_the_error_is_a_value_error():
    assert issubclass(LearnedOptimizerFileError, ValueError)
    assert "LearnedOptimizerFileError" in l2l_zoo.registry.__all__


def test_map_location_is_the_device_of_the_returned_optimizer(tmp_path):
    l2l_zoo.save(l2l_zoo.create("dm"), tmp_path / "o.pt")
    assert {p.device.type for p in l2l_zoo.load(tmp_path / "o.pt").parameters()} == {"cpu"}
    back = l2l_zoo.load(tmp_path / "o.pt", map_location="meta")
    assert {p.device.type for p in back.parameters()} == {"meta"}
    if torch.cuda.is_available():
        assert {p.device.type for p in l2l_zoo.load(tmp_path / "o.pt", map_location="cuda").parameters()} == {"cuda"}
