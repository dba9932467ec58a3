"""The results layer (l2l_zoo.runs): atomic writes under concurrency, loads that cannot run code, the
output lock, a run cache that never returns results of other settings, tuning on validation data
only, the training loop (divergence handling, bit-exact resume), and the results schema."""
import json
import math
import multiprocessing as mp
import os
import pickle

import pytest
import torch
import torch.nn.functional as F

from l2l_zoo import runs
from l2l_zoo.tasks import MLP
from conftest import killed_at


# ----------------------------------------------------------------------------- atomic writes

def _hammer(path, tag, n):
    for i in range(n):
        runs.write_json(path, {"writer": tag, "i": i, "pad": "x" * 20_000})
        runs.save_torch(path + ".pt", {"writer": tag, "t": torch.full((2000,), float(i))})


def test_concurrent_writers_never_collide_or_leave_half_files(tmp_path):
    """Two processes writing the same files 60 times each: no failed rename, every read sees a
    complete file, no temporary file is left behind (a fixed '<path>.tmp' failed 24-30 of 100)."""
    path = str(tmp_path / "r.json")
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_hammer, args=(path, tag, 60)) for tag in ("a", "b")]
    for p in procs:
        p.start()
    seen = 0
    while any(p.is_alive() for p in procs):
        if os.path.exists(path):
            d = runs.read_json(path)  # must always parse: never a half-written file
            assert d["writer"] in ("a", "b") and len(d["pad"]) == 20_000
            seen += 1
    for p in procs:
        p.join()
        assert p.exitcode == 0
    assert runs.load_torch(path + ".pt")["t"].shape == (2000,)
    assert sorted(os.listdir(tmp_path)) == ["r.json", "r.json.pt"], "temporary files left behind"


def test_json_write_maps_non_finite_to_null_and_rejects_folders(tmp_path):
    runs.write_json(tmp_path / "a.json", {"x": float("nan"), "y": (1, float("inf")), "t": torch.tensor([1.5])})
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": None, "y": [1, None], "t": [1.5]}
    (tmp_path / "d").mkdir()
    with pytest.raises(runs.RunsError, match="is a folder"):
        runs.write_json(tmp_path / "d", {})
    with pytest.raises(runs.ResultsFormatError, match="is not valid JSON"):
        (tmp_path / "bad.json").write_text('{"a": 1')
        runs.read_json(tmp_path / "bad.json")


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_load_torch_never_runs_code_and_names_bad_files(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"x": _Evil(str(marker))}, tmp_path / "evil.pt")
    with pytest.raises(runs.CheckpointError, match="refusing to unpickle"):
        runs.load_torch(tmp_path / "evil.pt")
    assert not marker.exists(), "loading a checkpoint executed code"
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(runs.CheckpointError, match="not a readable torch file"):
        runs.load_torch(tmp_path / "text.pt")
    torch.save({"w": torch.randn(1000)}, tmp_path / "full.pt")
    data = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(runs.CheckpointError, match="truncated or corrupt"):
        runs.load_torch(tmp_path / "trunc.pt")
    with pytest.raises(runs.CheckpointError, match="does not exist"):
        runs.load_torch(tmp_path / "missing.pt")
    (tmp_path / "pickle.pt").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(runs.CheckpointError):
        runs.load_torch(tmp_path / "pickle.pt")


def test_check_writable(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(runs.RunsError, match="is an existing file"):
        runs.check_writable(tmp_path / "f", kind="folder")
    with pytest.raises(runs.RunsError, match="is an existing folder"):
        runs.check_writable(tmp_path, kind="file")
    with pytest.raises(runs.RunsError, match="cannot write"):
        runs.check_writable(tmp_path / "f" / "sub", kind="folder")  # a file in the way
    assert runs.check_writable(tmp_path / "new" / "deeper", kind="folder").is_dir()


# ----------------------------------------------------------------------------- the lock

def test_output_lock_refuses_a_second_run_and_takes_over_a_dead_owner(tmp_path):
    out = tmp_path / "out"
    with runs.OutputLock.for_folder(out):
        with pytest.raises(runs.OutputBusyError, match=rf"in use by another run \(pid {os.getpid()}"):
            runs.OutputLock.for_folder(out).acquire()
    assert not (out / ".l2l_zoo.lock").exists(), "lock not released"
    # a lock left by a process that no longer exists (same host) is stale
    ctx = mp.get_context("fork")
    p = ctx.Process(target=lambda: None)
    p.start()
    p.join()
    import socket
    (out / ".l2l_zoo.lock").write_text(json.dumps({"pid": p.pid, "host": socket.gethostname()}))
    with runs.OutputLock.for_folder(out) as lock:
        assert lock.held
    file_lock = runs.OutputLock.for_file(tmp_path / "res.json")
    with file_lock:
        assert (tmp_path / "res.json.lock").exists()
        with pytest.raises(runs.OutputBusyError):
            runs.OutputLock.for_file(tmp_path / "res.json").acquire()


# ----------------------------------------------------------------------------- configurations and the cache

def test_config_hash_distinguishes_every_value():
    base = {"opt": "simple", "lr": 0.1, "grid": [1, 2], "smooth": None}
    h = runs.config_hash(base)
    assert runs.config_hash(dict(reversed(list(base.items())))) == h  # key order does not matter
    assert runs.config_hash({**base, "grid": (1, 2)}) == h            # tuples are lists in JSON
    for change in ({"opt": "dm"}, {"lr": 0.10000001}, {"grid": [2, 1]}, {"smooth": "eps=0.1"},
                   {"lr": float("nan")}, {"extra": 0}):
        assert runs.config_hash({**base, **change}) != h, change
    assert runs.config_hash({"x": float("nan")}) != runs.config_hash({"x": None})
    with pytest.raises(TypeError, match="JSON-like"):
        runs.config_hash({"f": lambda: 0})


def test_later_fields_are_absent_from_identities_only_at_their_defaults():
    old = {"opt": "simple", "lr": 0.1}
    assert runs.without_later_defaults({**old, "autocast": None}) == old  # old caches still hold
    assert runs.without_later_defaults({**old, "autocast": "bfloat16"}) == {**old, "autocast": "bfloat16"}
    assert runs.without_later_defaults({**old, "meta_batch": 1, "autocast": None}) == old
    assert runs.without_later_defaults({**old, "meta_batch": 2}) == {**old, "meta_batch": 2}
    later = {**runs.LATER_DEFAULTS, "fast": True}  # a script's own later field
    assert runs.without_later_defaults({**old, "fast": True}, later) == old
    assert runs.without_later_defaults({**old, "fast": False}, later) == {**old, "fast": False}
    assert runs.config_hash(runs.without_later_defaults({**old, "autocast": None})) == runs.config_hash(old)


def test_run_cache_returns_only_results_of_the_same_settings(tmp_path):
    """The probe's worst finding: caches keyed on a label reused old numbers under a new config."""
    calls = []

    def compute(cfg):
        calls.append(cfg)
        return {"value": cfg["opt"]}

    writer = runs.RunCache(tmp_path, enabled=False)     # a first run without --resume still stores
    writer.run({"opt": "simple", "steps": 5}, lambda: compute({"opt": "simple"}), name="seed0")
    cache = runs.RunCache(tmp_path, enabled=True)
    assert cache.run({"opt": "simple", "steps": 5}, lambda: compute({"opt": "x"}), name="seed0") == {"value": "simple"}
    assert cache.run({"opt": "dm", "steps": 5}, lambda: compute({"opt": "dm"}), name="seed0") == {"value": "dm"}
    assert cache.run({"opt": "simple", "steps": 6}, lambda: compute({"opt": "s6"}), name="seed0") == {"value": "s6"}
    assert len(calls) == 3 and cache.hits == 1
    # a hand-edited entry (its config no longer matches its name) is never reused
    p = cache.path({"opt": "dm", "steps": 5}, "seed0")
    d = json.loads(p.read_text())
    d["config"]["steps"] = 99
    p.write_text(json.dumps(d))
    assert cache.get({"opt": "dm", "steps": 5}, "seed0") is None
    p.write_text("{ not json")
    with pytest.raises(runs.ResultsFormatError, match="run-cache file .* is not valid JSON"):
        cache.get({"opt": "dm", "steps": 5}, "seed0")
    assert runs.RunCache(tmp_path, enabled=False).get({"opt": "simple", "steps": 5}, "seed0") is None


# ----------------------------------------------------------------------------- tuning

def test_tune_selects_on_validation_only_skips_diverged_and_records_cost():
    finals = {1.0: {"val_loss": None}, 0.1: {"val_loss": 0.3}, 0.01: {"val_loss": 0.3}, 0.001: {"val_loss": 0.5}}
    seen = []

    def run(lr):
        seen.append(lr)
        return {"final": finals[lr]}
    t = runs.tune([1.0, 0.1, 0.01, 0.001], run, criterion="val_loss")
    assert t.best == 0.1, "ties go to the earlier grid value; a diverged run is never chosen"
    assert seen == [1.0, 0.1, 0.01, 0.001] and t.runs == 4 and t.wall_s >= 0
    assert t.to_dict()["scores"] == {"1": None, "0.1": 0.3, "0.01": 0.3, "0.001": 0.5}
    assert t.to_dict()["split"] == "val" and t.mode == "min"
    acc = runs.tune([1, 2], lambda v: {"final": {"val_acc": 0.1 * v}}, criterion="val_acc")
    assert acc.best == 2 and acc.mode == "max"
    for bad in ("test_loss", "train_loss", "loss"):
        with pytest.raises(ValueError, match="validation metric"):
            runs.tune([1], run, criterion=bad)
    with pytest.raises(ValueError, match="pass mode="):
        runs.tune([1], run, criterion="val_score")
    none = runs.tune([1.0], run, criterion="val_loss")
    assert none.best is None and "diverged" in none.note


# ----------------------------------------------------------------------------- the training loop

def toy(seed=0, lr=0.1, momentum=0.9):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 6, generator=g)
    y = (x[:, 0] - x[:, 1] > 0).long()
    torch.manual_seed(seed)
    model = MLP(6, (8,), 2)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.5)
    stepper = runs.OptimizerStepper(model, opt, lambda m, b: F.cross_entropy(m(b[0]), b[1]), scheduler=sched)
    gen = torch.Generator().manual_seed(seed + 1)

    def batch(aux):
        i = torch.randint(0, 256, (32,), generator=gen)
        return x[i], y[i]

    def evaluate():
        with torch.no_grad():
            return {"val_loss": float(F.cross_entropy(model(x), y)),
                    "val_acc": float((model(x).argmax(1) == y).float().mean())}
    return stepper, batch, gen, evaluate


def test_train_records_curves_and_final_metrics():
    stepper, batch, gen, ev = toy()
    rec = runs.train(stepper, batch, steps=20, evaluate=ev, eval_every=5, final=lambda: {"test_x": 1.0},
                     generators={"data": gen}, progress=False)
    assert rec["eval"]["step"] == [0, 5, 10, 15, 20] and len(rec["step_log"]["loss"]) == 20
    assert rec["step_log"]["lr"][:7] == [0.1] * 7 and rec["step_log"]["lr"][7] == 0.05   # scheduler stepped
    assert rec["final"] == {"val_loss": rec["eval"]["val_loss"][-1], "val_acc": rec["eval"]["val_acc"][-1],
                            "test_x": 1.0}
    assert rec["eval"]["val_loss"][-1] < rec["eval"]["val_loss"][0] and rec["diverged_at"] is None


def test_train_stops_on_non_finite_loss_and_on_non_finite_gradient_before_the_weights_move():
    stepper, batch, gen, ev = toy(lr=1e6, momentum=0.0)
    rec = runs.train(stepper, batch, steps=200, evaluate=ev, eval_every=50, divergence_loss=1e3, progress=False)
    assert rec["diverged_at"] is not None and rec["final"] is None and len(rec["step_log"]["loss"]) == rec["diverged_at"]

    stepper, batch, gen, ev = toy()
    calls = {"n": 0}

    def poisoned(m, b):
        calls["n"] += 1
        loss = F.cross_entropy(m(b[0]), b[1])
        if calls["n"] == 3:  # finite loss, NaN gradient
            m.layers[0].weight.register_hook(lambda g: torch.full_like(g, float("nan")))
        return loss
    stepper.loss_fn = poisoned
    before = None

    def snap(aux):
        nonlocal before
        before = [p.detach().clone() for p in stepper.model.parameters()]
        return batch(aux)
    rec = runs.train(stepper, snap, steps=10, progress=False)
    assert rec["diverged_at"] == 3 and rec["error"] == "non-finite gradient"
    for p, q in zip(stepper.model.parameters(), before):
        assert torch.equal(p, q), "a non-finite gradient reached the weights"


def test_killed_run_resumes_bit_for_bit(tmp_path):
    ident = {"run": "toy", "lr": 0.1}
    ref_stepper, ref_batch, ref_gen, ref_ev = toy()
    ref = runs.train(ref_stepper, ref_batch, steps=23, evaluate=ref_ev, eval_every=4,
                     generators={"data": ref_gen}, progress=False)

    stepper, batch, gen, ev = toy()
    ck = tmp_path / "ck.pt"
    dying = killed_at(18, batch)  # after the checkpoint at step 15
    with pytest.raises(KeyboardInterrupt):
        runs.train(stepper, dying, steps=23, evaluate=ev, eval_every=4, checkpoint=ck, checkpoint_every=5,
                   identity=ident, generators={"data": gen}, progress=False)
    assert ck.exists()
    stepper2, batch2, gen2, ev2 = toy(seed=0)
    with torch.no_grad():  # a fresh process: different weights until the checkpoint is loaded
        for p in stepper2.model.parameters():
            p.add_(1.0)
    with pytest.raises(runs.CheckpointError, match="different setup"):
        runs.train(stepper2, batch2, steps=23, checkpoint=ck, identity={"run": "other"}, resume=True,
                   generators={"data": gen2}, progress=False)
    rec = runs.train(stepper2, batch2, steps=23, evaluate=ev2, eval_every=4, checkpoint=ck, checkpoint_every=5,
                     identity=ident, generators={"data": gen2}, resume=True, progress=False)
    assert rec["step_log"] == ref["step_log"] and rec["eval"] == ref["eval"] and rec["final"] == ref["final"]
    for p, q in zip(ref_stepper.model.parameters(), stepper2.model.parameters()):
        assert torch.equal(p, q)
    assert not ck.exists(), "a finished run's checkpoint is removed (its record is cached instead)"
    torch.save({"format": "something else"}, ck)
    with pytest.raises(runs.CheckpointError, match="not an l2l_zoo training checkpoint"):
        runs.train(stepper2, batch2, steps=23, checkpoint=ck, identity=ident, resume=True, progress=False)


def test_controller_stepper_logs_the_controllers_scalars_and_reports_divergence():
    from l2l_zoo.schedules import HD
    stepper, batch, gen, ev = toy(momentum=0.0)
    model = stepper.model
    ctrl = HD(stepper.optimizer, lambda: F.cross_entropy(model(batch(None)[0]), batch(None)[1]), beta=1e-3)
    cs = runs.ControllerStepper(model, ctrl, stepper.loss_fn)
    rec = runs.train(cs, batch, steps=6, progress=False)
    assert len(rec["step_log"]["hypergradient"]) == 6 and rec["step_log"]["lr"][0] == 0.1
    assert rec["step_log"]["lr"][1] != 0.1, "the controller changed the rate"


# ----------------------------------------------------------------------------- schema

def test_results_schema_round_trip_and_validation(tmp_path):
    res = runs.new_results("demo", {"a": 1, "t": (1, 2)})
    rec = runs.new_record(5, seed=0)
    rec["final"] = {"val_loss": 0.5, "test_acc": 0.9}
    bad = runs.new_record(5, seed=1)
    bad["diverged_at"] = 3
    good2 = runs.new_record(5, seed=2)
    good2["final"] = {"val_loss": 0.7, "test_acc": 0.8}
    res["runs"]["m"] = [rec, bad, good2]
    res["summary"]["m"] = runs.summarize(res["runs"]["m"])
    s = res["summary"]["m"]
    assert s["n_seeds"] == 3 and s["diverged"] == 1
    assert s["val_loss"] == pytest.approx(0.6) and s["val_loss_std"] == pytest.approx(0.1)
    runs.write_json(tmp_path / "r.json", res)
    back = runs.read_results(tmp_path / "r.json", benchmark="demo")
    assert back["config"] == {"a": 1, "t": [1, 2]} and back["environment"]["torch"] == torch.__version__
    with pytest.raises(runs.ResultsFormatError, match="written by benchmark 'demo', expected 'other'"):
        runs.read_results(tmp_path / "r.json", benchmark="other")
    for broken, msg in (({"runs": {}}, "not an l2l_zoo results file"),
                        ({**res, "version": 99}, "version 99"),
                        ({k: v for k, v in res.items() if k != "summary"}, r"missing keys \['summary'\]"),
                        ({**res, "runs": {"m": [{"x": 1}]}}, "record without")):
        runs.write_json(tmp_path / "b.json", broken)
        with pytest.raises(runs.ResultsFormatError, match=msg):
            runs.read_results(tmp_path / "b.json")


def test_mean_curve_ignores_diverged_runs():
    a, b, c = (runs.new_record(2) for _ in range(3))
    a["eval"] = {"step": [0, 1, 2], "val_loss": [1.0, 0.5, 0.25]}
    b["eval"] = {"step": [0, 1, 2], "val_loss": [1.0, 0.7, 0.45]}
    c["eval"] = {"step": [0, 1], "val_loss": [1.0, None]}
    c["diverged_at"] = 1
    x, mean, std = runs.mean_curve([a, b, c], "val_loss")
    assert x == [0, 1, 2] and mean == pytest.approx([1.0, 0.6, 0.35]) and std == pytest.approx([0, 0.1, 0.1])
    assert runs.mean_curve([c], "val_loss")[0] == [0, 1]  # only diverged runs: drawn as they are
    assert math.isnan(float("nan"))
