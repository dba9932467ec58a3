"""The baseline optimizers (l2l_zoo.baselines): names, identities, the one-line error for a missing
package, and the schedule-free protocol of the training loop (train at y, evaluate at x, resume)."""
import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from l2l_zoo import baselines, runs
from l2l_zoo.tasks import MLP
from conftest import killed_at

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_names_identities_and_misuse():
    assert baselines.identity("sgdm", 0.01) == {"hand": "sgdm", "lr": 0.01}  # as cached before this module
    ident = baselines.identity("sf-adamw")
    assert ident["lr_free"] == "sf-adamw" and ident["settings"]["lr"] == 0.0025
    assert ident["package"].startswith("schedulefree==")
    assert baselines.identity("prodigy")["settings"]["lr"] == 1.0
    with pytest.raises(ValueError, match="unknown baseline optimizer 'lion'"):
        baselines.make("lion")
    with pytest.raises(ValueError, match="needs a learning rate"):
        baselines.make("adam")
    with pytest.raises(ValueError, match="learning-rate-free"):
        baselines.make("prodigy", 0.1)
    p = torch.nn.Parameter(torch.ones(3))
    opt = baselines.make("prodigy")([p])
    assert opt.param_groups[0]["d_coef"] == 1.0 and opt.param_groups[0]["lr"] == 1.0
    assert not baselines.has_eval_point(opt) and baselines.has_eval_point(baselines.make("sf-adamw")([p]))


def toy(opt_name, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 6, generator=g)
    y = (x[:, 0] - x[:, 1] > 0).long()
    torch.manual_seed(seed)
    model = MLP(6, (8,), 2)
    opt = baselines.make(opt_name)(model.parameters())
    stepper = runs.OptimizerStepper(model, opt, lambda m, b: F.cross_entropy(m(b[0]), b[1]))
    gen = torch.Generator().manual_seed(seed + 1)

    def batch(aux):
        i = torch.randint(0, 256, (32,), generator=gen)
        return x[i], y[i]

    seen = []

    def evaluate():
        seen.append([p.detach().clone() for p in model.parameters()])
        with torch.no_grad():
            return {"val_loss": float(F.cross_entropy(model(x), y))}
    return stepper, batch, gen, evaluate, seen


def test_schedule_free_is_evaluated_at_x_and_trains_on_from_the_exact_y():
    stepper, batch, gen, ev, seen = toy("sf-adamw")
    rec = runs.train(stepper, batch, steps=12, evaluate=ev, eval_every=4, progress=False)
    assert rec["eval"]["val_loss"][-1] < rec["eval"]["val_loss"][0]
    opt, params = stepper.optimizer, list(stepper.model.parameters())
    y = [p.detach().clone() for p in params]
    x_ref = copy.deepcopy(opt)  # the package's own eval() on a copy: x = y + (1 - 1/β1)(z - y)
    ref_params = [q for g in x_ref.param_groups for q in g["params"]]
    x_ref.eval()
    for p_eval, q in zip(seen[-1], ref_params):
        assert torch.equal(p_eval, q), "the last evaluation did not see the schedule-free x"
    assert not all(torch.equal(a, b) for a, b in zip(seen[-1], y)), "x and y coincide: the test cannot tell"
    for p, q in zip(params, y):  # after the evaluation the training point is back, bit for bit
        assert torch.equal(p, q)
    assert opt.param_groups[0]["train_mode"]

    # so the trajectory does not depend on how often it is evaluated
    a = runs.train(*toy("sf-adamw")[:2], steps=30, evaluate=toy("sf-adamw")[3], eval_every=1, progress=False)
    s2, b2, _, e2, _ = toy("sf-adamw")
    b = runs.train(s2, b2, steps=30, evaluate=e2, eval_every=30, progress=False)
    assert a["step_log"]["loss"] == b["step_log"]["loss"]


def test_prodigys_distance_estimate_is_logged_every_step():
    s, b, g, e, _ = toy("prodigy")
    rec = runs.train(s, b, steps=15, progress=False)
    d = rec["step_log"]["d"]
    assert len(d) == 15 and d[-1] == s.optimizer.param_groups[0]["d"] and d[-1] > d[0] >= 1e-6
    assert "d" not in runs.train(*toy("sf-adamw")[:2], steps=3, progress=False)["step_log"]


@pytest.mark.parametrize("name", ["prodigy", "sf-adamw"])
def test_lr_free_run_resumes_bit_for_bit(name, tmp_path):
    ident = {"run": name}
    s0, b0, g0, e0, _ = toy(name)
    ref = runs.train(s0, b0, steps=23, evaluate=e0, eval_every=4, generators={"data": g0}, progress=False)
    s, b, g, e, _ = toy(name)
    ck, dying = tmp_path / "ck.pt", killed_at(18, b)  # after the checkpoint at step 15
    with pytest.raises(KeyboardInterrupt):
        runs.train(s, dying, steps=23, evaluate=e, eval_every=4, checkpoint=ck, checkpoint_every=5,
                   identity=ident, generators={"data": g}, progress=False)
    s2, b2, g2, e2, _ = toy(name, seed=0)
    rec = runs.train(s2, b2, steps=23, evaluate=e2, eval_every=4, checkpoint=ck, checkpoint_every=5,
                     identity=ident, generators={"data": g2}, resume=True, progress=False)
    assert rec["step_log"] == ref["step_log"] and rec["eval"] == ref["eval"]
    for p, q in zip(s0.model.parameters(), s2.model.parameters()):
        assert torch.equal(p, q)


def test_a_missing_package_is_one_line_before_any_work(tmp_path):
    fake = tmp_path / "site"
    (fake / "prodigyopt").mkdir(parents=True)
    (fake / "prodigyopt" / "__init__.py").write_text("raise ImportError('not installed')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "mnist_mlp.py"), "--opt", "simple",
                        "--baselines", "sgd,prodigy", "--data-dir", str(tmp_path / "nothing_read"),
                        "--out", str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "'prodigyopt'" in lines[0] and "pip install -e '.[lrfree]'" in lines[0], r.stderr
    assert not (tmp_path / "out").exists()
