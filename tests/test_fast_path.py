"""The fast meta-training path (``MetaTrainConfig(fast=True)``, the default) against the per-step eager
reference path (``fast=False``): the same meta-loss and meta-gradient in float64 to 1e-10 relative,
for every registered optimizer, with the smoothness regularizer (whose PGD the fast path runs once per
truncation for all steps together), with and without a meta-batch; the regularizer's batched
penalties equal its per-step calls, and consume the same random numbers."""
import pytest
import torch

import l2l_zoo
from l2l_zoo.meta import MetaTrainConfig, MetaTrainer
from l2l_zoo.regularizers import SmoothnessConfig, SmoothnessRegularizer

from conftest import LOPT_OPTIONS
from test_meta_batch import flat, toy_task

ALL = l2l_zoo.available()
SMOOTH = SmoothnessConfig(eps=0.1, lam=1.0, steps=3, subsample=7)


def trainer(name, fast, B=1, smooth=SMOOTH, unroll=5):
    torch.manual_seed(0)
    lopt = l2l_zoo.create(name, **LOPT_OPTIONS.get(name, {})).to(torch.float64)
    cfg = MetaTrainConfig(unroll=unroll, horizon=10, seed=0, meta_batch=B, smooth=smooth, fast=fast)
    return MetaTrainer(lopt, toy_task(), cfg, log=lambda s: None)


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("name", ALL)
def test_fast_meta_gradient_equals_the_eager_reference(name):
    ref_tr, fast_tr = trainer(name, False), trainer(name, True)
    ml_ref, g_ref = ref_tr.meta_gradient()
    ml, g = fast_tr.meta_gradient()
    torch.testing.assert_close(ml, ml_ref, rtol=1e-10, atol=0)
    assert flat(g_ref).norm() > 0
    assert rel(flat(g), flat(g_ref)) < 1e-10
    # the regularizer contributes (the comparison is not of two unregularized runs)
    plain = trainer(name, True, smooth=None).meta_gradient()[1]
    assert rel(flat(plain), flat(g_ref)) > 1e-8
    # the random streams advanced identically
    for k in ref_tr.gens:
        assert torch.equal(ref_tr.gens[k].get_state(), fast_tr.gens[k].get_state()), k


@pytest.mark.parametrize("name", [n for n in ALL if type(l2l_zoo.create(n, **LOPT_OPTIONS.get(n, {}))).vmappable])
def test_fast_meta_batch_equals_the_eager_reference(name):
    ml_ref, g_ref = trainer(name, False, B=3).meta_gradient()
    ml, g = trainer(name, True, B=3).meta_gradient()
    torch.testing.assert_close(ml, ml_ref, rtol=1e-10, atol=0)
    assert rel(flat(g), flat(g_ref)) < 1e-10


@pytest.mark.parametrize("name", ALL)
def test_batched_penalties_equal_per_step_calls(name):
    torch.manual_seed(1)
    lopt = l2l_zoo.create(name, **LOPT_OPTIONS.get(name, {})).to(torch.float64)
    reg = SmoothnessRegularizer(SmoothnessConfig(eps=0.2, steps=4, subsample=9))
    n, T = 23, 4
    steps = []
    state = lopt.init_state(n, dtype=torch.float64)
    for t in range(T):  # a short trajectory: hidden states that differ per step
        g = torch.randn(n, dtype=torch.float64)
        kw = {}
        if lopt.needs_params:
            kw["params"] = torch.randn(n, dtype=torch.float64)
        if lopt.needs_loss:
            kw["loss"] = torch.tensor(1.0 + t, dtype=torch.float64)
        s = lopt.step(g, state, **kw)
        steps.append((s.feats.detach(), tuple(h.detach() for h in s.hidden)))
        state = s.state
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    one = torch.stack([reg(lopt, f, h, g1) for f, h in steps])
    batched = reg.penalties(lopt, [reg.prepare(lopt, f, h, g2) for f, h in steps])
    assert batched.shape == (T,)
    torch.testing.assert_close(batched, one, rtol=1e-10, atol=1e-14)
    assert torch.equal(g1.get_state(), g2.get_state())
    params = [p for p in lopt.parameters() if p.requires_grad]
    ga = torch.autograd.grad(one.sum(), params, allow_unused=True)
    gb = torch.autograd.grad(batched.sum(), params, allow_unused=True)
    for a, b in zip(ga, gb):
        if a is None:
            assert b is None or float(b.abs().max()) == 0
        else:
            torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-14)


def test_fast_is_not_part_of_a_runs_identity():
    assert "fast" not in MetaTrainConfig().to_dict()
    assert MetaTrainConfig(fast=False).to_dict()["fast"] is False


@pytest.mark.parametrize("aggregation", [True, False])
@pytest.mark.parametrize("layout", ["column", "row"])
def test_fused_simple_cell_equals_the_autograd_formulas(aggregation, layout):
    """SimpleOptimizer's fused cell (chunked forward, hand-written backward) against its plain
    autograd formulas in float64: outputs and the gradients of a loss that uses every output (the
    update, the new hidden state) w.r.t. the input state, the hidden state and every meta-parameter;
    chunks that do not divide n; hidden state in either memory layout."""
    torch.manual_seed(0)
    lopt = l2l_zoo.create("simple", aggregation=aggregation).to(torch.float64)
    n, H = 53, lopt.config["hidden_size"]
    g0 = torch.randn(n, 1, dtype=torch.float64)
    h0 = torch.randn(n, H, dtype=torch.float64) if layout == "row" else torch.randn(H, n, dtype=torch.float64).t()
    wu, wh = torch.randn(n, dtype=torch.float64), torch.randn(n, H, dtype=torch.float64)

    def run(fused):
        lopt.fused, lopt.fused_min, lopt.fused_chunk = fused, 0, 8
        g, h = g0.clone().requires_grad_(True), h0.clone().requires_grad_(True)
        u, (h1,) = lopt.network(g, (h,))
        u2, (h2,) = lopt.network(g * 0.5, (h1,))  # two steps: the hidden state's gradient flows back
        loss = (u * wu).sum() + (u2 * u2).sum() + (h2 * wh).sum()
        params = [g, h] + list(lopt.parameters())
        return (u, h1, u2, h2), torch.autograd.grad(loss, params)

    try:
        out_f, grad_f = run(True)
        out_r, grad_r = run(False)
    finally:
        lopt.fused, lopt.fused_min, lopt.fused_chunk = (type(lopt).fused, type(lopt).fused_min,
                                                         type(lopt).fused_chunk)
    for a, b in zip(out_f, out_r):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    for a, b in zip(grad_f, grad_r):
        assert float(b.abs().max()) > 0
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def test_reference_kernels_turn_the_fused_cell_off(monkeypatch):
    from l2l_zoo.base import reference_kernels
    from l2l_zoo.optimizers import simple

    calls = []
    real = simple._FusedCell.apply
    monkeypatch.setattr(simple._FusedCell, "apply", lambda *a: calls.append(1) or real(*a))
    lopt = l2l_zoo.create("simple")
    lopt.fused_min = 0
    g = torch.randn(40, 1, requires_grad=True)
    (h,) = lopt.init_state(40).hidden
    lopt.network(g, (h,))
    assert calls == [1]
    with reference_kernels():
        lopt.network(g, (h,))
    assert calls == [1]


def test_fused_flagship_truncation_matches_the_reference_in_float32():
    """At the flagship's size (397,510 coordinates, where the fused cell is used) the fast and the
    reference paths give the same float32 meta-gradient up to rounding."""
    pytest.importorskip("torchvision")
    from l2l_zoo.tasks import make_task

    try:
        task = make_task("mlp", batch_size=32)
    except Exception as e:  # no MNIST here
        pytest.skip(f"MNIST not available: {e}")
    grads = []
    for fast in (True, False):
        torch.manual_seed(0)
        lopt = l2l_zoo.create("simple")
        cfg = MetaTrainConfig(unroll=3, seed=0, fast=fast, smooth=SmoothnessConfig(eps=0.1, steps=2))
        grads.append(flat(MetaTrainer(lopt, task, cfg, log=lambda s: None).meta_gradient()[1]))
    assert rel(grads[0], grads[1]) < 1e-4


@pytest.mark.slow
def test_flagship_meta_parameters_after_20_meta_steps_match_the_reference_in_float32(data_dir):
    """The speed issue's float32 criterion: the flagship (SimpleOptimizer, MNIST MLP, batch 128,
    truncation 20, ``--smooth eps=0.1``) meta-trained 20 meta-steps on the fast path ends within
    1e-4 relative of the eager reference path's meta-parameters (about a minute on 2 cores)."""
    from l2l_zoo.regularizers import parse_smooth
    from l2l_zoo.tasks import make_task

    task = make_task("mlp", data_dir=data_dir, batch_size=128)
    final = []
    for fast in (True, False):
        torch.manual_seed(0)
        lopt = l2l_zoo.create("simple")
        cfg = MetaTrainConfig(meta_steps=20, unroll=20, horizon=200, seed=0, fast=fast, smooth=parse_smooth("eps=0.1"))
        MetaTrainer(lopt, task, cfg, log=lambda s: None).train(progress=False)
        final.append(torch.cat([p.detach().reshape(-1) for p in lopt.parameters()]))
    assert rel(final[0], final[1]) < 1e-4, rel(final[0], final[1])


@pytest.mark.parametrize("name", ["simple", "dm"])
def test_meta_batch_per_instance_steps_equal_the_vmapped_reference(name, monkeypatch):
    """Large instances (n >= LOOP_MIN_COORDINATES) take one ordinary optimizer step per instance
    instead of a vmapped one: the same meta-gradient (forced here at toy size)."""
    from l2l_zoo.meta import trainer as trainer_mod

    ml_ref, g_ref = trainer(name, False, B=3).meta_gradient()
    monkeypatch.setattr(trainer_mod, "LOOP_MIN_COORDINATES", 0)
    tr = trainer(name, True, B=3)
    if name == "dm":  # separable: the stacked step takes precedence; force the loop to test it too
        monkeypatch.setattr(type(tr.lopt), "separable", False)
    ml, g = tr.meta_gradient()
    torch.testing.assert_close(ml, ml_ref, rtol=1e-10, atol=0)
    assert rel(flat(g), flat(g_ref)) < 1e-10


@pytest.mark.parametrize("name", ALL)
def test_corner_starts_fast_equals_reference_and_never_lower(name):
    """SmoothnessConfig(corners=1) (PGD also from s ± eps, the largest penalty kept): the fast path
    equals the eager reference in float64 to 1e-10; the penalty of each step is at least the
    random start's, and the random numbers drawn are the same as without corners."""
    corners = SmoothnessConfig(eps=0.1, lam=1.0, steps=3, subsample=7, corners=1)
    ref_tr, fast_tr = trainer(name, False, smooth=corners), trainer(name, True, smooth=corners)
    ml_ref, g_ref = ref_tr.meta_gradient()
    ml, g = fast_tr.meta_gradient()
    torch.testing.assert_close(ml, ml_ref, rtol=1e-10, atol=0)
    assert rel(flat(g), flat(g_ref)) < 1e-10
    plain = trainer(name, True)
    plain.meta_gradient()
    for k in plain.gens:
        assert torch.equal(plain.gens[k].get_state(), fast_tr.gens[k].get_state()), k
    torch.manual_seed(2)
    lopt = l2l_zoo.create(name, **LOPT_OPTIONS.get(name, {})).to(torch.float64)
    st = lopt.init_state(30, dtype=torch.float64)
    kw = {"params": torch.randn(30, dtype=torch.float64)} if lopt.needs_params else {}
    if lopt.needs_loss:
        kw["loss"] = torch.tensor(2.0, dtype=torch.float64)
    s = lopt.step(0.05 * torch.randn(30, dtype=torch.float64), st, **kw)
    f, h = s.feats.detach(), tuple(x.detach() for x in s.hidden)
    r0 = SmoothnessRegularizer(SmoothnessConfig(eps=0.1, subsample=0))(lopt, f, h, torch.Generator().manual_seed(3))
    r1 = SmoothnessRegularizer(SmoothnessConfig(eps=0.1, subsample=0, corners=1))(lopt, f, h,
                                                                                  torch.Generator().manual_seed(3))
    assert float(r1.detach()) >= float(r0.detach())
