"""Measuring smoothness (smoothness paper Fig. 2, appendix D / Fig. 7): the input-noise wrapper, the
R_ε measurement, the response curve, the adapter's state accessor and train_optimizee's probe hook,
and benchmarks/smoothness_probe.py end to end on the zoo's optimizers."""
import importlib.util
import json
import math
import os
import sys

import pytest
import torch
from torch import nn

import l2l_zoo
from l2l_zoo.base import LearnedOptimizer, OptState
from l2l_zoo.evaluation import train_optimizee
from l2l_zoo.regularizers import PerturbedInput, input_noise_seed, measure_smoothness, response_curve
from l2l_zoo.tasks import make_task

from conftest import LOPT_OPTIONS
from test_smoothness import _CoupledOptimizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALL = l2l_zoo.available()
# every registered optimizer whose step is the contract's features-then-network (not MLR-SNet)
STEPPED = [n for n in ALL if l2l_zoo.REGISTRY[n].step is LearnedOptimizer.step]


def _make(name):
    torch.manual_seed(0)
    return l2l_zoo.create(name, **LOPT_OPTIONS.get(name, {})).double()


def _inputs(lopt, n=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    kw = {}
    if lopt.needs_loss:
        kw["loss"] = torch.tensor(2.3, dtype=torch.float64)
    if lopt.needs_params:
        kw["params"] = torch.randn(n, generator=g, dtype=torch.float64)
    return 0.01 * torch.randn(n, generator=g, dtype=torch.float64), kw


class _Linear(LearnedOptimizer):
    """u_i = a · s_i (one feature: the gradient): R_ε = (a ε)² exactly, response a·δ."""

    name = "linear_probe_test"  # not registered

    def __init__(self, a=-0.3):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a, dtype=torch.float64))

    def init_state(self, n, *, device=None, dtype=None):
        return OptState(0, (), ())

    def features(self, grads, state, *, params=None, loss=None):
        return grads.reshape(-1, 1), ()

    def network(self, feats, hidden):
        return self.a * feats[:, 0], hidden


@pytest.mark.parametrize("name", STEPPED)
def test_zero_noise_is_the_optimizer_itself(name):
    """PerturbedInput(std=0) steps exactly as the optimizer it wraps (for every registered
    optimizer whose step is features-then-network)."""
    lopt = _make(name)
    noisy = PerturbedInput(lopt, std=0.0, seed=3)
    grads, kw = _inputs(lopt)
    s1, s2 = lopt.init_state(50, dtype=torch.float64), noisy.init_state(50, dtype=torch.float64)
    for _ in range(3):
        u1, s1 = lopt.update(grads, s1, **kw)
        u2, s2 = noisy.update(grads, s2, **kw)
        assert torch.equal(u1, u2)


@pytest.mark.parametrize("name", STEPPED)
def test_noise_is_std_times_a_normal_draw_seeded_by_seed_and_step(name):
    lopt = _make(name)
    grads, kw = _inputs(lopt)
    st = lopt.init_state(50, dtype=torch.float64)._replace(step=7)
    clean, _ = lopt.features(grads, st, **kw)
    for relative in (False, True):
        noisy = PerturbedInput(lopt, std=0.5, relative=relative, seed=11)
        f, _ = noisy.features(grads, st, **kw)
        draw = torch.randn(clean.shape, generator=torch.Generator().manual_seed(input_noise_seed(11, 7)),
                           dtype=clean.dtype)
        scale = 0.5 * (clean.pow(2).mean().sqrt() if relative else 1.0)
        torch.testing.assert_close(f, clean + scale * draw, rtol=0, atol=1e-15)
        f_again, _ = PerturbedInput(lopt, std=0.5, relative=relative, seed=11).features(grads, st, **kw)
        assert torch.equal(f, f_again)
        other, _ = noisy.features(grads, st._replace(step=8), **kw)
        assert not torch.equal(f, other), "the noise must change from step to step"


def test_perturbed_input_refuses_what_it_cannot_wrap():
    with pytest.raises(ValueError, match="overrides step"):
        PerturbedInput(l2l_zoo.create("mlrsnet", **LOPT_OPTIONS["mlrsnet"]), std=1.0)
    with pytest.raises(ValueError, match="std must be a finite number >= 0, got -1"):
        PerturbedInput(l2l_zoo.create("simple"), std=-1)
    with pytest.raises(TypeError, match="wraps a LearnedOptimizer"):
        PerturbedInput(torch.nn.Linear(2, 2), std=1.0)


def test_a_perturbed_run_resumes_exactly_through_the_adapter():
    """The noise depends only on (seed, step) and the step is in the adapter's state, so an adapter
    restored from a state_dict continues as the uninterrupted one."""
    torch.manual_seed(0)
    noisy = PerturbedInput(l2l_zoo.create("simple"), std=2.0, relative=True, seed=4)
    x = torch.randn(16, 5, generator=torch.Generator().manual_seed(1))

    def fresh(lopt):
        torch.manual_seed(1)
        model = nn.Linear(5, 3)
        return model, l2l_zoo.LearnedOptimizerAdapter(model.parameters(), lopt)

    def train(model, opt, k):
        for _ in range(k):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    full = train(*fresh(noisy), 6)
    model, opt = fresh(noisy)
    train(model, opt, 3)
    sd, msd = opt.state_dict(), model.state_dict()
    model, opt = fresh(noisy)
    model.load_state_dict(msd)
    opt.load_state_dict(sd)
    assert torch.equal(train(model, opt, 3), full)
    assert not torch.equal(train(*fresh(noisy.inner), 6), full), "the noise did not reach the trajectory"


def test_measure_smoothness_of_a_linear_optimizer_is_exact():
    lopt = _Linear(-0.3)
    s = 0.01 * torch.randn(40, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for eps in (1e-3, 0.1):
        m = measure_smoothness(lopt, s, (), eps, steps=12, generator=torch.Generator().manual_seed(1))
        assert m["R"] == pytest.approx((0.3 * eps) ** 2, rel=1e-12)
        u_rms = float((0.3 * s).pow(2).mean().sqrt())
        assert m["u_rms"] == pytest.approx(u_rms, rel=1e-12)
        assert m["rel"] == pytest.approx(0.3 * eps / u_rms, rel=1e-12)
    # too few PGD steps to reach the corner from the start: a strictly smaller value (a lower bound)
    few = measure_smoothness(lopt, s, (), 0.1, steps=1, noise=1e-4, starts=("noise",),
                             generator=torch.Generator().manual_seed(1))
    assert few["R"] < (0.3 * 0.1) ** 2


def test_measure_smoothness_finds_the_coupled_worst_case_that_the_random_start_misses():
    lopt = _CoupledOptimizer()  # u_i = 0.02 s_i - 0.15 mean(s)
    # the regularizer's start noise 0.05 >> eps gives a random corner; with many coordinates its mean
    # is ~eps/sqrt(n), so each coordinate's own term decides its sign step and PGD stays there
    s = 0.002 * torch.randn(20000, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    eps = 1e-3
    m = measure_smoothness(lopt, s, (), eps, generator=torch.Generator().manual_seed(1))
    assert m["R"] == pytest.approx(((0.02 - 0.15) * eps) ** 2, rel=1e-12)
    assert m["R_noise"] < 0.05 * m["R"]
    only = measure_smoothness(lopt, s, (), eps, starts=("noise",), generator=torch.Generator().manual_seed(1))
    assert only["R"] == m["R_noise"]
    with pytest.raises(ValueError, match="starts must be a non-empty selection of"):
        measure_smoothness(lopt, s, (), eps, starts=("zero",))


def test_measure_smoothness_uses_no_meta_gradient_and_leaves_the_optimizer_alone():
    lopt = _make("simple")
    grads, _ = _inputs(lopt, n=200)
    st = lopt.init_state(200, dtype=torch.float64)
    feats, _ = lopt.features(grads, st)
    before = {k: v.clone() for k, v in lopt.state_dict().items()}
    m = measure_smoothness(lopt, feats, st.hidden, 0.01, generator=torch.Generator().manual_seed(0))
    assert all(p.grad is None for p in lopt.parameters())
    assert all(torch.equal(before[k], v) for k, v in lopt.state_dict().items())
    assert m["R"] > 0 and math.isfinite(m["rel"])


def test_response_curve_of_a_linear_optimizer_and_of_simple():
    s = 0.01 * torch.randn(30, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    deltas = [-0.2, 0.0, 0.05]
    curve = response_curve(_Linear(-0.3), s, (), [2, 5, 7], deltas)
    torch.testing.assert_close(curve, -0.3 * torch.tensor(deltas, dtype=torch.float64)[:, None].expand(3, 3),
                               rtol=0, atol=1e-15)
    lopt = _make("simple")  # with the mean embedding: checked against a direct evaluation
    st = lopt.init_state(30, dtype=torch.float64)
    h = (st.hidden[0] + 0.2,)
    curve = response_curve(lopt, s, h, [4, 9], [0.3])
    moved = s.clone()
    moved[[4, 9]] += 0.3
    direct = lopt.network(moved, h)[0][[4, 9]] - lopt.network(s, h)[0][[4, 9]]
    torch.testing.assert_close(curve[0], direct.detach(), rtol=0, atol=1e-15)


def test_adapter_opt_state_is_the_state_its_next_step_reads():
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    lopt = l2l_zoo.create("simple")
    opt = l2l_zoo.LearnedOptimizerAdapter(model.parameters(), lopt)
    assert opt.opt_state.step == 0 and opt.opt_state.hidden[0].abs().sum() == 0
    x = torch.randn(8, 4)
    for _ in range(3):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    st = opt.opt_state
    assert st.step == 3
    opt.zero_grad()
    model(x).pow(2).mean().backward()
    grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    expected, _ = opt.lopt.update(grads, st)
    before = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
    opt.step()
    after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(after - before, expected, rtol=0, atol=1e-7)


def test_train_optimizee_probe_is_recorded_and_changes_nothing(data_dir):
    task = make_task("mlp20", data_dir=data_dir)
    lopt = l2l_zoo.zoo.load("dm/mnist-mlp20")
    calls = []

    def probe(model, opt):
        calls.append(opt.opt_state.step)
        return {"probe_step": float(opt.opt_state.step)}

    def go(**kw):
        return train_optimizee(task, lambda ps: l2l_zoo.LearnedOptimizerAdapter(ps, lopt), steps=12, seed=0,
                               eval_every=5, progress=False, eval_splits=("train",), **kw)
    plain, probed = go(), go(probe=probe)
    assert calls == [0, 5, 10, 12] and probed["eval"]["probe_step"] == [0.0, 5.0, 10.0, 12.0]
    assert probed["step_log"]["loss"] == plain["step_log"]["loss"]
    assert probed["eval"]["train_loss"] == plain["eval"]["train_loss"]


def _script(name):
    spec = importlib.util.spec_from_file_location(f"_t_{name}", os.path.join(ROOT, *name.split("/")) + ".py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_smoothness_probe_end_to_end_and_its_figure(data_dir, tmp_path):
    """A CI-sized run on the zoo's two SimpleOptimizers (30 steps): every section is filled, the
    smoothed optimizer is the smoother one at ε = 0.1 (its training radius), a rerun with --resume
    takes everything from the cache and gives the same file, and the paper figure is drawn."""
    bench = _script("benchmarks/smoothness_probe")
    out = tmp_path / "o"
    args = ["--steps", "30", "--eval-every", "15", "--seeds", "1", "--sigmas", "1", "--eps", "0.1",
            "--pgd-steps", "5", "--sweep-step", "10", "--sweep-coords", "2", "--no-progress",
            "--data-dir", data_dir, "--out", str(out)]
    assert bench.main(args) == 0
    res = json.loads((out / "results.json").read_text())
    names = ["simple/mnist-mlp", "simple-smooth/mnist-mlp"]
    assert set(res["runs"]) == {*names, *(f"{n} σ=1" for n in names)}
    for n in names:
        (rec,) = res["runs"][n]
        assert rec["eval"]["step"] == [0, 15, 30] and all(v > 0 for v in rec["eval"]["R_eps0.1"])
        assert res["diff"][n]["1"]["step"] == [0, 15, 30] and res["diff"][n]["1"]["train_loss"][0] == 0.0
        assert len(res["response"][n]["response"]) == 2 and len(res["response"][n]["deltas"]) == bench.SWEEP_POINTS
    assert res["smoothness"][names[1]]["R_eps0.1"] < res["smoothness"][names[0]]["R_eps0.1"]
    assert (out / "curves.png").stat().st_size > 0
    assert bench.main(args + ["--resume"]) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["runs"] == res["runs"] and again["response"] == res["response"]
    fig = _script("paper_figs/fig_smoothness")
    assert fig.main([str(out / "results.json"), "--out", str(tmp_path / "fig.png")]) == 0
    assert (tmp_path / "fig.png").stat().st_size > 0
