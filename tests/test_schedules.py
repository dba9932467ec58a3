"""Tests of the hypergradient schedules (HD, RTHO, MARTHE, LRS-OPT) and the baselines.

Truth tests, each against an independent reference (all in float64, seeds fixed):
* the dynamics equal torch.optim (SGD, momentum, Nesterov, Adam, AdamW) to 1e-12;
* HD's update is the autograd derivative of the one-step-ahead objective (rel. 1e-9);
* MARTHE with μ = 0 reproduces HD and with μ = 1 RTHO; RTHO and MARTHE with adaptive μ and β
  reproduce a dense reference implementation of Algorithm 1 with explicit Hessians (rel. 1e-9);
* RTHO's tangent equals forward-mode dw_t/dη (torch.func.jvp through the unroll) (rel. 1e-9);
* LRS-OPT's hypergradient equals float64 central differences (rel. 1e-6) and the μ-discounted sum
  of its entries equals MARTHE's Δη_T (rel. 1e-9);
* gradient-norm clipping: inactive, bit-identical to none; active, the update equals
  torch.nn.utils.clip_grad_norm_ + torch.optim (rel. 1e-12), its tangent equals forward mode (jvp)
  through the clip (rel. 1e-9 / 1e-12), and MARTHE's Δη_T equals the discounted sum of LRS-OPT's
  clipped reverse-mode hypergradient (rel. 1e-8);
* rates and β stay finite and >= 0: non-finite or overflowing updates are skipped, counted and
  reported once; a non-finite loss or gradient raises before anything changes; a linear training
  loss (H = 0) works;
* the controllers satisfy LRController, and load_state_dict rejects other models and classes;
* a step's matrix-product FLOPs (torch's counter) equal the analytic gradient + R-op count.
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from l2l_zoo.schedules import (HD, MARTHE, RTHO, BASELINES, HypergradientWarning, LRController, LRSOpt,
                               ScheduleDiverged, baseline_lrs, beta_update, clip_by_global_norm,
                               clip_tangent, dynamics_from_optimizer, lr_update, make_baseline,
                               mu_heuristic, schedule_hypergradient, unroll)
from l2l_zoo.tasks import MLP

DT = torch.float64
# the *-nowd kinds have no weight decay: the controllers then never read the flat weights
KINDS = ("sgd", "sgdm", "nesterov", "adam", "adamw", "sgdm-nowd", "adam-nowd")


@pytest.fixture(autouse=True)
def _one_thread():
    """The problems here have at most 43 parameters: extra threads only add synchronisation (which
    is very costly on a shared machine), so run each test on one thread and restore the setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_opt(kind, params, lr):
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if kind == "sgdm":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, dampening=0.1, weight_decay=1e-2)
    if kind == "nesterov":
        return torch.optim.SGD(params, lr=lr, momentum=0.8, nesterov=True, weight_decay=1e-2)
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr, betas=(0.8, 0.9), weight_decay=1e-2)
    if kind == "sgdm-nowd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    if kind == "adam-nowd":
        return torch.optim.Adam(params, lr=lr, betas=(0.8, 0.9))
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=(0.8, 0.9), weight_decay=1e-1)
    raise AssertionError(kind)


# ----------------------------------------------------------------------------- problems

class TinyMLP(nn.Module):
    """4 → 5 → 3 tanh MLP (43 parameters): smooth, so Hessians and finite differences are clean."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)

    def forward(self, x):
        return self.net(x)


def mlp_functional(w, x):
    """The same network written by hand on a flat vector (order W1, b1, W2, b2)."""
    w1, b1, w2, b2 = w[:20].view(5, 4), w[20:25], w[25:40].view(3, 5), w[40:43]
    return torch.tanh(x @ w1.T + b1) @ w2.T + b2


def mlp_data(seed=0, steps=20, batch=8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 4, generator=g, dtype=DT)
    y = torch.randint(0, 3, (64,), generator=g)
    xv = torch.randn(32, 4, generator=g, dtype=DT)
    yv = torch.randint(0, 3, (32,), generator=g)
    idx = [torch.randperm(64, generator=g)[:batch] for _ in range(steps)]
    return [(x[i], y[i]) for i in idx], (xv, yv)


def ce(out, y):
    return nn.functional.cross_entropy(out, y)


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


class Quad(nn.Module):
    """Two parameter tensors (shapes (3,) and (2, 2)), flat n = 7."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.a = nn.Parameter(torch.randn(3, generator=g, dtype=DT))
        self.b = nn.Parameter(torch.randn(2, 2, generator=g, dtype=DT))


def quad_batches(seed=0, steps=8, n=7):
    """Minibatch quadratics L_t(w) = ½ (w − c_t)ᵀ Q_t (w − c_t) with random SPD Q_t."""
    g = torch.Generator().manual_seed(seed + 1)
    out = []
    for _ in range(steps):
        m = torch.randn(n, n, generator=g, dtype=DT)
        out.append((m @ m.T / n + 0.1 * torch.eye(n, dtype=DT), torch.randn(n, generator=g, dtype=DT)))
    return out


def quad_loss(w, batch):
    q, c = batch
    r = w - c
    return 0.5 * r @ q @ r


QUAD_VAL = torch.linspace(-1, 1, 7, dtype=DT)


def quad_val(w):
    return 0.5 * ((w - QUAD_VAL) ** 2).sum() + 0.1 * (w ** 4).sum()


# ----------------------------------------------------------------------------- dynamics

@pytest.mark.parametrize("kind", KINDS)
def test_dynamics_match_torch_optim(kind):
    """Our functional Φ (used by every controller and by LRS-OPT) reproduces torch.optim's steps."""
    model = Quad()
    w0 = flat(model)
    batches = quad_batches(steps=6)
    opt = make_opt(kind, model.parameters(), lr=0.05)
    for b in batches:
        opt.zero_grad()
        quad_loss(torch.cat([model.a.reshape(-1), model.b.reshape(-1)]), b).backward()
        opt.step()
    ours = unroll(w0, torch.full((6,), 0.05, dtype=DT), batches, quad_loss, dynamics_from_optimizer(opt),
                  create_graph=False)
    torch.testing.assert_close(ours, flat(model), rtol=0, atol=1e-12)


def run_controller(ctrl_cls, kind, steps, *, lr=0.1, data_seed=0, **kw):
    model = TinyMLP()
    batches, (xv, yv) = mlp_data(data_seed, steps)
    opt = make_opt(kind, model.parameters(), lr)
    ctrl = ctrl_cls(opt, lambda: ce(model(xv), yv), **kw)
    lrs = []
    for x, y in batches:
        lrs.append(ctrl.lr)
        ctrl.step(ce(model(x), y))
    lrs.append(ctrl.lr)
    return torch.tensor(lrs, dtype=DT), flat(model), ctrl


# ----------------------------------------------------------------------------- HD

def one_step_reference(kind, opt, w, g, lr):
    """w_{t+1}(η) for a differentiable η, written from torch's documented update rules, with the
    optimizer's state read directly from torch's ``optimizer.state``."""
    group = opt.param_groups[0]
    params = group["params"]
    st = [opt.state.get(p, {}) for p in params]
    cat = (lambda key: torch.cat([s[key].reshape(-1) for s in st])) if st[0] else None
    wd = group["weight_decay"]
    if kind == "sgd":
        return w - lr * g
    if kind in ("sgdm", "nesterov"):
        gg = g + wd * w
        m, damp = group["momentum"], group["dampening"]
        buf = gg if not st[0] else m * cat("momentum_buffer") + (1 - damp) * gg
        return w - lr * (gg + m * buf if group["nesterov"] else buf)
    b1, b2 = group["betas"]
    gg = g if kind == "adamw" else g + wd * w
    k = int(st[0]["step"]) + 1 if st[0] else 1
    m = b1 * (cat("exp_avg") if st[0] else 0) + (1 - b1) * gg
    v = b2 * (cat("exp_avg_sq") if st[0] else 0) + (1 - b2) * gg * gg
    u = (m / (1 - b1 ** k)) / (v.sqrt() / math.sqrt(1 - b2 ** k) + group["eps"])
    return w - lr * (u + wd * w if kind == "adamw" else u)


@pytest.mark.parametrize("grad_clip", [None, 0.5])  # 0.5: active at some of the steps
@pytest.mark.parametrize("kind", ["sgd", "sgdm", "adam", "adamw"])
def test_hd_update_is_derivative_of_one_step_ahead_loss(kind, grad_clip):
    """Δ^HD η_{t+1} = ∂E(w_{t+1}(η))/∂η at η = η_t (eq. 6), E = validation loss; η_{t+1} = η_t − β·Δ.
    With clipping, the optimizer is fed g·min(1, c/‖g‖)."""
    model = TinyMLP()
    batches, (xv, yv) = mlp_data(1, 6)
    opt = make_opt(kind, model.parameters(), 0.1)
    beta = 1e-3
    ctrl = HD(opt, lambda: ce(model(xv), yv), beta=beta, grad_clip=grad_clip)
    active = []
    for x, y in batches:
        w = flat(model).requires_grad_(False)
        g = torch.autograd.grad(ce(mlp_functional(w.requires_grad_(True), x), y), w)[0].detach()
        if grad_clip is not None:
            active.append(float(g.norm()) > grad_clip)
            g = g * min(1.0, grad_clip / float(g.norm()))
        eta = torch.tensor(ctrl.lr, dtype=DT, requires_grad=True)
        e_next = ce(mlp_functional(one_step_reference(kind, opt, w.detach(), g, eta), xv), yv)
        (expected,) = torch.autograd.grad(e_next, eta)
        lr_before = ctrl.lr
        ctrl.step(ce(model(x), y))
        assert ctrl.last["hypergradient"] == pytest.approx(float(expected), rel=1e-9, abs=1e-15)
        assert ctrl.lr == pytest.approx(max(lr_before - beta * float(expected), 0.0), rel=1e-12)
    assert grad_clip is None or (any(active) and not all(active))


@pytest.mark.parametrize("grad_clip", [None, 0.62])  # 0.62: active at some of the steps
def test_hd_training_objective_matches_baydin(grad_clip):
    """val_loss_fn=None (Baydin et al.): the update applied at step t+1 is
    Δη = ∂[L_{t+1} + wd/2·|w|²](w_{t+1}(η))/∂η at η = η_t, with w_{t+1}(η) = w_t − η·buf_{t+1}.
    With clipping the step (torch's buffer) is built from the clipped gradient, the objective L is not
    clipped: Δη is still its exact derivative."""
    model = TinyMLP()
    batches, _ = mlp_data(2, 5)
    opt = make_opt("sgdm", model.parameters(), 0.1)  # momentum 0.9, dampening 0.1, weight decay 1e-2
    ctrl = HD(opt, None, beta=1e-3, grad_clip=grad_clip)
    expected = None
    active = []
    for i, (x, y) in enumerate(batches):
        lr_before, w = ctrl.lr, flat(model)
        ctrl.step(ce(model(x), y))
        active.append(grad_clip is not None and ctrl.last["grad_norm"] > grad_clip)
        if expected is not None:
            assert ctrl.last["hypergradient"] == pytest.approx(expected, rel=1e-9)
            assert ctrl.last["lr"] == pytest.approx(lr_before - 1e-3 * expected, rel=1e-12)
        if i + 1 < len(batches):
            buf = torch.cat([opt.state[p]["momentum_buffer"].reshape(-1) for p in model.parameters()])
            eta = torch.tensor(ctrl.last["lr"], dtype=DT, requires_grad=True)
            w_next = w - eta * buf
            xn, yn = batches[i + 1]
            obj = ce(mlp_functional(w_next, xn), yn) + 0.5 * 1e-2 * (w_next ** 2).sum()
            expected = float(torch.autograd.grad(obj, eta)[0])
    assert grad_clip is None or (any(active) and not all(active))


# ----------------------------------------------------------------------------- MARTHE / RTHO

@pytest.mark.parametrize("kind", ["sgdm", "adam"])
def test_marthe_mu0_equals_hd(kind):
    lrs_m, w_m, _ = run_controller(MARTHE, kind, 15, beta=1e-2, mu=0.0)
    lrs_h, w_h, _ = run_controller(HD, kind, 15, beta=1e-2)
    assert (lrs_h[1:] != lrs_h[0]).any(), "the rate must move for the comparison to mean anything"
    torch.testing.assert_close(lrs_m, lrs_h, rtol=1e-12, atol=0)
    torch.testing.assert_close(w_m, w_h, rtol=1e-12, atol=1e-14)


def dense_marthe_reference(steps, *, lr, beta, mu, beta_lr=None):
    """Algorithm 1 for plain SGD, written independently with explicit Hessian matrices:
    Z ← μ(I − ηH)Z − g; w ← w − ηg; Δ = Z·∇E; g1 = −g·∇E; μ ← h_μ; β ← β + α·Δ·Δ_prev; η ← max(η − βΔ, 0)."""
    w = flat(TinyMLP())
    batches, (xv, yv) = mlp_data(0, steps)
    z = torch.zeros_like(w)
    adaptive = mu == "adaptive"
    m, c, prev, lrs = (0.0 if adaptive else mu), 0.0, 0.0, [lr]
    for x, y in batches:
        loss = lambda v: ce(mlp_functional(v, x), y)  # noqa: E731
        h = torch.func.hessian(loss)(w)
        g = torch.func.grad(loss)(w)
        z = m * (z - lr * h @ z) - g
        w = w - lr * g
        ge = torch.func.grad(lambda v: ce(mlp_functional(v, xv), yv))(w)
        d_eta, g1 = float(z @ ge), float(-g @ ge)
        if adaptive:
            q = min(max(d_eta * g1 / g1 ** 2, 0.0), 1.0)
            m, c = q ** (1 / (c + 1)), m * (1 + c)
        if beta_lr is not None:
            beta = max(beta + beta_lr * d_eta * prev, 0.0)
        prev = d_eta
        lr = max(lr - beta * d_eta, 0.0)
        lrs.append(lr)
    return torch.tensor(lrs, dtype=DT)


@pytest.mark.parametrize("cls,kw,mac_per_layer", [
    (HD, {}, lambda first: 4 if first else 6),                   # training + validation gradient
    (RTHO, {}, lambda first: 6 if first else 12),                # ... + Hessian product (R-op)
    (MARTHE, {"mu": 0.5}, lambda first: 6 if first else 12),
])
def test_step_does_no_more_matmul_work_than_the_r_op_count(cls, kw, mac_per_layer):
    """Matrix-product FLOPs of one step, counted by torch, equal the analytic count for an MLP with
    per-layer products m = batch·in·out: a gradient costs m (forward) + m (weight gradient) + m (input
    gradient, none for the first layer); Pearlmutter's Hessian product 2m forward tangent + 2m
    weight-gradient tangent + 2m input-gradient tangent (first layer: m + m + 0). So no redundant
    product hides in the double backward, and the Hessian product is skipped when μ·Z = 0."""
    torch.manual_seed(0)
    sizes, batch = [20, 16, 12, 5], 8
    model = MLP(sizes[0], tuple(sizes[1:-1]), sizes[-1])
    x, y = torch.randn(batch, sizes[0]), torch.randint(0, sizes[-1], (batch,))
    ctrl = cls(torch.optim.SGD(model.parameters(), lr=0.1), lambda: ce(model(x), y), beta=1e-3, **kw)
    with FlopCounterMode(display=False) as first_step:  # Z_0 = 0: no Hessian product on step 1
        ctrl.step(ce(model(x), y))
    with FlopCounterMode(display=False) as later:
        ctrl.step(ce(model(x), y))
    ms = [batch * i * o for i, o in zip(sizes[:-1], sizes[1:])]
    assert later.get_total_flops() == 2 * sum(mac_per_layer(l == 0) * m for l, m in enumerate(ms))
    assert first_step.get_total_flops() == 2 * sum((4 if l == 0 else 6) * m for l, m in enumerate(ms))


def test_rtho_equals_marthe_mu1_and_dense_reference():
    ref = dense_marthe_reference(12, lr=0.1, beta=1e-2, mu=1.0)
    lrs_r, w_r, _ = run_controller(RTHO, "sgd", 12, beta=1e-2)
    lrs_m, w_m, _ = run_controller(MARTHE, "sgd", 12, beta=1e-2, mu=1.0)
    assert (ref[1:] - ref[0]).abs().max() > 1e-3
    torch.testing.assert_close(lrs_r, ref, rtol=1e-9, atol=0)
    torch.testing.assert_close(lrs_m, lrs_r, rtol=0, atol=0)
    # and RTHO is not HD here: the accumulated tangent changes the schedule
    lrs_h, _, _ = run_controller(HD, "sgd", 12, beta=1e-2)
    assert (lrs_h - lrs_r).abs().max() > 1e-4


def test_marthe_adaptive_mu_and_beta_equal_dense_reference():
    ref = dense_marthe_reference(12, lr=0.1, beta=0.0, mu="adaptive", beta_lr=1.0)
    lrs, _, ctrl = run_controller(MARTHE, "sgd", 12, beta=0.0, mu="adaptive", beta_lr=1.0)
    assert (ref[1:] - ref[0]).abs().max() > 1e-4 and ctrl.beta > 0
    torch.testing.assert_close(lrs, ref, rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("grad_clip", [None, 6.0])  # 6: active at some of the steps
@pytest.mark.parametrize("kind", KINDS)
def test_rtho_tangent_is_forward_mode_total_derivative(kind, grad_clip):
    """Z_t = dw_t/dη: the jvp of the unroll w.r.t. a common shift δ of every past rate, at the
    schedule RTHO actually produced (β > 0, so the rates change and the tangent must use them).
    With clipping the reference unroll clips by g·clamp(c/‖g‖, max=1), differentiated by jvp."""
    model = Quad()
    w0 = flat(model)
    batches = quad_batches(steps=7)
    opt = make_opt(kind, model.parameters(), 0.05)
    ctrl = RTHO(opt, lambda: quad_val(torch.cat([model.a.reshape(-1), model.b.reshape(-1)])),
                beta=1e-3, grad_clip=grad_clip)
    dyn = dynamics_from_optimizer(opt)
    used, active = [], []
    for t, b in enumerate(batches):
        used.append(ctrl.lr)
        ctrl.step(quad_loss(torch.cat([model.a.reshape(-1), model.b.reshape(-1)]), b))
        active.append(grad_clip is not None and ctrl.last["grad_norm"] > grad_clip)
        sched = torch.tensor(used, dtype=DT)

        def w_of(delta):
            w, state = w0, dyn.init_state(w0)
            for s in range(t + 1):
                g = torch.func.grad(quad_loss)(w, batches[s])
                if grad_clip is not None:
                    g = g * torch.clamp(grad_clip / torch.linalg.vector_norm(g), max=1.0)
                d, state = dyn.direction(g, w, state, s)
                w = w - (sched[s] + delta) * d
            return w

        w_t, dw = torch.func.jvp(w_of, (torch.zeros((), dtype=DT),), (torch.ones((), dtype=DT),))
        torch.testing.assert_close(w_t, flat(model), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ctrl.tangent[0], dw, rtol=1e-9, atol=1e-12)
    assert len(set(used)) > 3
    assert grad_clip is None or (any(active) and not all(active))


# ----------------------------------------------------------------------------- LRS-OPT

def _mlp_problem(steps):
    batches, (xv, yv) = mlp_data(3, steps)
    return (flat(TinyMLP()), batches, lambda w, b: ce(mlp_functional(w, b[0]), b[1]),
            lambda w: ce(mlp_functional(w, xv), yv))


@pytest.mark.parametrize("kind", ["sgd", "sgdm", "adam"])
def test_lrs_opt_hypergradient_matches_central_differences(kind):
    w0, batches, loss_fn, val_fn = _mlp_problem(6)
    dyn = dynamics_from_optimizer(make_opt(kind, [nn.Parameter(torch.zeros(1, dtype=DT))], 0.1))
    lrs = torch.tensor([0.1, 0.2, 0.05, 0.15, 0.1, 0.3], dtype=DT)
    if kind == "adam":
        lrs = lrs / 10
    value, h = schedule_hypergradient(w0, lrs, batches, loss_fn, val_fn, dyn)
    eps = 1e-6
    fd = []
    for t in range(len(lrs)):
        e = torch.zeros_like(lrs)
        e[t] = eps
        plus = val_fn(unroll(w0, lrs + e, batches, loss_fn, dyn, create_graph=False))
        minus = val_fn(unroll(w0, lrs - e, batches, loss_fn, dyn, create_graph=False))
        fd.append(float(plus - minus) / (2 * eps))
    assert value == pytest.approx(float(val_fn(unroll(w0, lrs, batches, loss_fn, dyn, create_graph=False))))
    torch.testing.assert_close(h, torch.tensor(fd, dtype=DT), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("mu", [0.0, 0.5, 1.0])
def test_marthe_is_discounted_sum_of_exact_hypergradient(mu):
    """With a fixed schedule (β = 0), Δη_T = Σ_t μ^{T−1−t}·∂f_T/∂η_t (eq. 9/11 vs eq. 4)."""
    steps = 8
    w0, batches, loss_fn, val_fn = _mlp_problem(steps)
    model = TinyMLP()
    _, (xv, yv) = mlp_data(3, steps)
    opt = make_opt("sgdm", model.parameters(), 0.1)
    ctrl = MARTHE(opt, lambda: ce(model(xv), yv), beta=0.0, mu=mu)
    for x, y in batches:
        ctrl.step(ce(model(x), y))
    _, h = schedule_hypergradient(w0, torch.full((steps,), 0.1, dtype=DT), batches, loss_fn, val_fn,
                                  dynamics_from_optimizer(opt))
    weights = torch.tensor([mu ** (steps - 1 - t) for t in range(steps)], dtype=DT)
    assert ctrl.last["hypergradient"] == pytest.approx(float(weights @ h), rel=1e-9)
    assert ctrl.last["hd_hypergradient"] == pytest.approx(float(h[-1]), rel=1e-9)


def test_lrs_opt_projection_and_errors():
    opt = LRSOpt(torch.tensor([0.01, 0.02], dtype=DT), outer_lr=0.1, outer="sgd")
    opt.update(torch.tensor([1.0, -1.0], dtype=DT))
    assert opt.lrs.tolist() == pytest.approx([0.0, 0.12])
    with pytest.raises(FloatingPointError):
        opt.update(torch.tensor([math.nan, 0.0], dtype=DT))
    with pytest.raises(ValueError, match="outer must be"):
        LRSOpt(torch.ones(2), outer_lr=0.1, outer="lbfgs")
    with pytest.raises(ValueError, match=">= 0"):
        LRSOpt(torch.tensor([-1.0]), outer_lr=0.1)


def test_lrs_opt_improves_the_objective():
    w0, batches, loss_fn, val_fn = _mlp_problem(10)
    dyn = dynamics_from_optimizer(make_opt("sgd", [nn.Parameter(torch.zeros(1, dtype=DT))], 0.1))
    opt = LRSOpt(torch.full((10,), 0.05, dtype=DT), outer_lr=0.02)
    first = None
    for _ in range(15):
        value, _ = opt.step(w0, batches, loss_fn, val_fn, dyn)
        first = value if first is None else first
    final = float(val_fn(unroll(w0, opt.lrs, batches, loss_fn, dyn, create_graph=False)))
    assert final < first - 1e-3


# ----------------------------------------------------------------------------- scalar rules

def test_mu_heuristic_appendix_b():
    assert mu_heuristic(q=4.0, g1=2.0, mu=0.0, c=0.0) == (1.0, 0.0)       # μ_t = 0 ⇒ q = g1² ⇒ μ = 1
    assert mu_heuristic(q=-1.0, g1=1.0, mu=1.0, c=0.0) == (0.0, 1.0)      # no descent: forget
    mu, c = mu_heuristic(q=0.25, g1=1.0, mu=0.8, c=1.0)
    assert mu == pytest.approx(0.5) and c == pytest.approx(1.6)          # 0.25^(1/2), 0.8·(1+1)
    assert mu_heuristic(q=0.0, g1=0.0, mu=1.0, c=3.0) == (0.0, 4.0)


def test_beta_update_descent_rule_is_gradient_step_on_beta():
    """Adaptive β with μ = 0: β_{t+1} − β_t = −α·∂E(w_{t+1})/∂β_t, where η_t = η_{t−1} − β_t·Δη_t."""
    model = TinyMLP()
    batches, (xv, yv) = mlp_data(4, 6)
    opt = make_opt("sgd", model.parameters(), 0.1)
    alpha = 0.5
    ctrl = MARTHE(opt, lambda: ce(model(xv), yv), beta=1e-3, mu=0.0, beta_lr=alpha)
    prev = None
    for x, y in batches:
        w = flat(model).requires_grad_(True)
        g = torch.autograd.grad(ce(mlp_functional(w, x), y), w)[0].detach()
        beta_t, lr_t = ctrl.beta, ctrl.lr
        ctrl.step(ce(model(x), y))
        if prev is not None:
            lr_prev, d_prev = prev
            b = torch.tensor(beta_t, dtype=DT, requires_grad=True)
            eta = lr_prev - b * d_prev
            assert float(eta.detach()) == pytest.approx(lr_t, rel=1e-12)
            e = ce(mlp_functional(w.detach() - eta * g, xv), yv)
            (db,) = torch.autograd.grad(e, b)
            assert ctrl.beta == pytest.approx(max(beta_t - alpha * float(db), 0.0), rel=1e-9)
        prev = (ctrl.last["lr"], ctrl.last["hypergradient"])
    assert beta_update(1.0, 0.5, 2.0, 3.0, 0.1, "as-printed") == 0.0
    assert beta_update(1.0, 0.1, 2.0, 3.0, 0.1, "descent") == pytest.approx(1.6)
    assert beta_update(1.0, 0.1, 2.0, 3.0, 0.5, "public-code") == pytest.approx(1.1)
    with pytest.raises(ValueError, match="beta_rule"):
        beta_update(1.0, 0.1, 2.0, 3.0, 0.5, "sign")


# ----------------------------------------------------------------------------- safety

class Holder(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=DT))


@pytest.mark.parametrize("cls,kw", [(HD, {}), (RTHO, {}), (MARTHE, {"mu": "adaptive", "beta_lr": 1.0})])
def test_lr_stays_nonnegative(cls, kw):
    """E(w) = −½|w|² rewards large weights, so every hypergradient is > 0 and a huge β would drive
    the rate negative without the max of eq. (5)."""
    m = Holder()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    ctrl = cls(opt, lambda: -0.5 * (m.w ** 2).sum(), beta=1e3, **kw)
    seen = []
    for _ in range(6):
        ctrl.step(0.5 * (m.w ** 2).sum())
        seen.append(ctrl.lr)
        assert opt.param_groups[0]["lr"] == ctrl.lr
        assert ctrl.last["hypergradient"] > 0
    assert min(seen) >= 0.0 and seen[-1] == 0.0


@pytest.mark.parametrize("cls,kw", [(HD, {}), (MARTHE, {"mu": "adaptive"}), (RTHO, {})])
def test_nonfinite_hypergradient_is_skipped_and_reported_once(cls, kw):
    model = TinyMLP()
    batches, (xv, yv) = mlp_data(5, 8)
    calls = {"n": 0}

    def val():
        calls["n"] += 1
        out = ce(model(xv), yv)
        return out * math.nan if calls["n"] in (3, 5, 6) else out

    opt = make_opt("sgdm", model.parameters(), 0.1)
    ctrl = cls(opt, val, beta=1e-2, **kw)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for i, (x, y) in enumerate(batches):
            before = ctrl.lr
            ctrl.step(ce(model(x), y))
            if i + 1 in (3, 5, 6):
                assert ctrl.lr == before
            else:
                assert math.isfinite(ctrl.lr)
    ours = [r for r in rec if issubclass(r.category, HypergradientWarning)]
    assert len(ours) == 1 and "skipped" in str(ours[0].message)
    assert ctrl.n_skipped == 3 and ctrl.t == 8
    assert torch.isfinite(flat(model)).all()


def test_divergence_raises_with_step_and_leaves_weights():
    model = TinyMLP()
    batches, (xv, yv) = mlp_data(6, 3)
    opt = make_opt("sgd", model.parameters(), 0.1)
    ctrl = MARTHE(opt, lambda: ce(model(xv), yv), beta=1e-2)
    x, y = batches[0]
    ctrl.step(ce(model(x), y))
    w = flat(model)
    with pytest.raises(ScheduleDiverged, match="step 1") as info:
        ctrl.step(ce(model(x), y) * math.inf)
    assert info.value.step == 1 and info.value.loss == math.inf
    torch.testing.assert_close(flat(model), w, rtol=0, atol=0)


def test_invalid_arguments_are_rejected():
    m = Holder()
    sgd = torch.optim.SGD(m.parameters(), lr=0.1)
    val = lambda: (m.w ** 2).sum()  # noqa: E731
    with pytest.raises(ValueError, match="beta must be"):
        MARTHE(sgd, val, beta=-1.0)
    with pytest.raises(ValueError, match="mu must be"):
        MARTHE(sgd, val, beta=0.1, mu=1.5)
    with pytest.raises(ValueError, match="beta_lr"):
        MARTHE(sgd, val, beta=0.1, beta_lr=-1.0)
    with pytest.raises(TypeError, match="val_loss_fn"):
        MARTHE(sgd, None, beta=0.1)
    with pytest.raises(TypeError, match="RMSprop"):
        HD(torch.optim.RMSprop(m.parameters(), lr=0.1), val, beta=0.1)
    with pytest.raises(ValueError, match="amsgrad"):
        HD(torch.optim.Adam(m.parameters(), lr=0.1, amsgrad=True), val, beta=0.1)
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="share 'lr'"):
        HD(torch.optim.SGD([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.2}]), val, beta=0.1)
    with pytest.raises(TypeError, match="scalar"):
        HD(sgd, val, beta=0.1).step(torch.ones(2))


@pytest.mark.parametrize("kind", ["sgd", "sgdm"])  # plain SGD keeps −Z internally, momentum Z
def test_state_dict_round_trip_continues_identically(kind):
    model = TinyMLP()
    batches, (xv, yv) = mlp_data(7, 8)
    opt = make_opt(kind, model.parameters(), 0.1)
    ctrl = MARTHE(opt, lambda: ce(model(xv), yv), beta=1e-2, beta_lr=1.0)
    for x, y in batches[:4]:
        ctrl.step(ce(model(x), y))
    saved = (ctrl.state_dict(), {k: v.clone() for k, v in model.state_dict().items()},
             __import__("copy").deepcopy(opt.state_dict()))
    torch.testing.assert_close(saved[0]["_z_w"], ctrl.tangent[0], rtol=0, atol=0)  # Z itself, either way
    z_saved = saved[0]["_z_w"].clone()
    for x, y in batches[4:]:
        ctrl.step(ce(model(x), y))
    expected = (ctrl.lr, ctrl.tangent[0])
    model2 = TinyMLP()
    model2.load_state_dict(saved[1])
    opt2 = make_opt(kind, model2.parameters(), 0.1)
    opt2.load_state_dict(saved[2])
    ctrl2 = MARTHE(opt2, lambda: ce(model2(xv), yv), beta=1e-2, beta_lr=1.0)
    ctrl2.load_state_dict(saved[0])
    for x, y in batches[4:]:
        ctrl2.step(ce(model2(x), y))
    assert ctrl2.lr == expected[0]
    torch.testing.assert_close(ctrl2.tangent[0], expected[1], rtol=0, atol=0)
    torch.testing.assert_close(saved[0]["_z_w"], z_saved, rtol=0, atol=0)  # in-place updates act on copies


# ----------------------------------------------------------------------------- gradient clipping

def hd_baydin(opt, val_loss_fn, **kw):
    """HD on the training objective (Baydin et al.): the validation function is not used."""
    return HD(opt, None, **kw)


CONTROLLERS = [(HD, {}), (hd_baydin, {}), (RTHO, {}), (MARTHE, {"mu": "adaptive", "beta_lr": 1.0})]


def test_clip_defaults_and_validation():
    """HD, RTHO and MARTHE clip at 100 by default (the authors' public code); LRS-OPT does not."""
    m = Holder()
    val = lambda: (m.w ** 2).sum()  # noqa: E731
    for cls in (HD, RTHO, MARTHE):
        assert cls(torch.optim.SGD(m.parameters(), lr=0.1), val, beta=0.1).grad_clip == 100.0
        assert cls(torch.optim.SGD(m.parameters(), lr=0.1), val, beta=0.1, grad_clip=None).grad_clip is None
        for bad in (0.0, -1.0, math.inf, math.nan, True, "100"):
            with pytest.raises(ValueError, match="grad_clip must be None or a finite number > 0"):
                cls(torch.optim.SGD(m.parameters(), lr=0.1), val, beta=0.1, grad_clip=bad)
    assert LRSOpt(torch.ones(2), outer_lr=0.1).grad_clip is None
    with pytest.raises(ValueError, match="grad_clip"):
        unroll(torch.zeros(7, dtype=DT), torch.ones(1, dtype=DT), quad_batches(steps=1), quad_loss,
               dynamics_from_optimizer(torch.optim.SGD(m.parameters(), lr=0.1)), grad_clip=0.0)
    opt = LRSOpt(torch.ones(2), outer_lr=0.1, grad_clip=5.0)
    with pytest.raises(ValueError, match="grad_clip=5.0"):
        LRSOpt(torch.ones(2), outer_lr=0.1).load_state_dict(opt.state_dict())


def test_clip_and_its_tangent_are_exact():
    """clip(g) = g·min(1, c/‖g‖) over all tensors; its tangent equals forward mode (jvp) through
    an independent formulation (rel. 1e-12); inactive, both hand back their input itself."""
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(9, generator=gen, dtype=DT) * 3
    v = torch.randn(9, generator=gen, dtype=DT)
    c = 0.5 * float(g.norm())

    def ref_clip(x):
        return x * torch.clamp(c / torch.linalg.vector_norm(x), max=1.0)

    clipped, norm = clip_by_global_norm(g, c)
    assert norm == pytest.approx(float(g.norm()), rel=1e-15)
    torch.testing.assert_close(clipped, ref_clip(g), rtol=1e-15, atol=0)
    assert float(clipped.norm()) == pytest.approx(c, rel=1e-15)
    _, expected = torch.func.jvp(ref_clip, (g,), (v,))
    torch.testing.assert_close(clip_tangent(g, v, norm, c), expected, rtol=1e-12, atol=1e-15)
    # the same on a list of tensors (per-parameter form), split 4 + 5
    parts, vparts = list(g.split([4, 5])), list(v.split([4, 5]))
    lc, ln = clip_by_global_norm(parts, c)
    assert ln == pytest.approx(norm, rel=1e-15)
    torch.testing.assert_close(torch.cat(lc), clipped, rtol=1e-15, atol=0)
    torch.testing.assert_close(torch.cat(clip_tangent(parts, vparts, ln, c)), expected, rtol=1e-12, atol=1e-15)
    # inactive (or disabled): the very same objects, no copy
    for max_norm in (2 * norm, None):
        out, _ = clip_by_global_norm(parts, max_norm)
        assert out is parts and clip_tangent(parts, vparts, norm, max_norm) is vparts


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("cls,kw", CONTROLLERS)
def test_inactive_clip_is_bit_identical_to_no_clip(cls, kw, kind):
    """Gradient norms here are < 1, so a clip at 10 never acts: rates, weights and tangents are
    bit-identical to grad_clip=None."""
    lrs_off, w_off, c_off = run_controller(cls, kind, 8, beta=1e-2, grad_clip=None, **kw)
    lrs_on, w_on, c_on = run_controller(cls, kind, 8, beta=1e-2, grad_clip=10.0, **kw)
    assert c_on.last["grad_norm"] < 10.0
    assert (lrs_off[1:] != lrs_off[0]).any()
    assert torch.equal(lrs_on, lrs_off) and torch.equal(w_on, w_off)
    for k, v in c_off.state_dict().items():
        other = c_on.state_dict()[k]
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, other), k
        elif isinstance(v, tuple):
            assert all(torch.equal(a, b) for a, b in zip(v, other)), k
        else:
            assert v == other, k


def test_lrs_opt_inactive_clip_is_bit_identical():
    w0, batches, loss_fn, val_fn = _mlp_problem(6)
    dyn = dynamics_from_optimizer(make_opt("sgdm", [nn.Parameter(torch.zeros(1, dtype=DT))], 0.1))
    lrs = torch.full((6,), 0.1, dtype=DT)
    v0, h0 = schedule_hypergradient(w0, lrs, batches, loss_fn, val_fn, dyn)
    v1, h1 = schedule_hypergradient(w0, lrs, batches, loss_fn, val_fn, dyn, grad_clip=10.0)
    assert v0 == v1 and torch.equal(h0, h1)
    assert torch.equal(unroll(w0, lrs, batches, loss_fn, dyn, create_graph=False),
                       unroll(w0, lrs, batches, loss_fn, dyn, create_graph=False, grad_clip=10.0))


@pytest.mark.parametrize("kind", ["sgd", "sgdm", "adam"])
@pytest.mark.parametrize("mu", [0.0, 0.5, 1.0])
def test_marthe_with_active_clip_is_discounted_sum_of_clipped_exact_hypergradient(mu, kind):
    """With the clip active at some steps, β = 0: Δη_T = Σ_t μ^{T−1−t}·∂f_T/∂η_t where f_T is
    LRS-OPT's unroll with the same clipping (eq. 9/11 vs eq. 4 for the clipped dynamics), rel. 1e-8;
    for μ = 0 HD gives the last entry. ("sgd" runs MARTHE's plain-SGD fast path.)"""
    steps, clip = 8, 0.55
    lr = 0.01 if kind == "adam" else 0.1
    w0, batches, loss_fn, val_fn = _mlp_problem(steps)
    _, (xv, yv) = mlp_data(3, steps)
    model = TinyMLP()
    opt = make_opt(kind, model.parameters(), lr)
    ctrl = MARTHE(opt, lambda: ce(model(xv), yv), beta=0.0, mu=mu, grad_clip=clip)
    norms = []
    for x, y in batches:
        ctrl.step(ce(model(x), y))
        norms.append(ctrl.last["grad_norm"])
    assert any(n > clip for n in norms) and any(n <= clip for n in norms)
    dyn = dynamics_from_optimizer(opt)
    sched = torch.full((steps,), lr, dtype=DT)
    _, h = schedule_hypergradient(w0, sched, batches, loss_fn, val_fn, dyn, grad_clip=clip)
    weights = torch.tensor([mu ** (steps - 1 - t) for t in range(steps)], dtype=DT)
    assert ctrl.last["hypergradient"] == pytest.approx(float(weights @ h), rel=1e-8)
    assert ctrl.last["hd_hypergradient"] == pytest.approx(float(h[-1]), rel=1e-8)
    _, h_unclipped = schedule_hypergradient(w0, sched, batches, loss_fn, val_fn, dyn)
    assert abs(float(weights @ h_unclipped) - float(weights @ h)) > 1e-3 * abs(float(weights @ h))
    if mu == 0.0:
        model = TinyMLP()
        hd = HD(make_opt(kind, model.parameters(), lr), lambda: ce(model(xv), yv), beta=0.0, grad_clip=clip)
        for x, y in batches:
            hd.step(ce(model(x), y))
        assert hd.last["hypergradient"] == pytest.approx(float(h[-1]), rel=1e-8)


SCALE = 1e7  # ‖g‖ ~ 1e7: clip_grad_norm_'s c/(‖g‖ + 1e-6) is then c/‖g‖ to rel. 1e-13


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("cls,kw", [(HD, {}), (hd_baydin, {}), (MARTHE, {"mu": 0.5})])
def test_clipped_step_equals_clip_grad_norm_and_torch_optim(cls, kw, kind):
    """The controller's step with the clip equals ``loss.backward(); clip_grad_norm_(params, c);
    optimizer.step()`` with the rate the controller used (weights, which are O(1) as are the steps,
    to rel. 1e-12 / abs. 1e-13: rounding, and c/(‖g‖ + 1e-6) vs c/‖g‖), and its
    ``last["grad_norm"]`` is the norm clip_grad_norm_ returns (rel. 1e-14). ("sgd" with MARTHE runs
    the plain-SGD fast path.)"""
    batches = quad_batches(steps=7)
    clip = 6.0 * SCALE
    lr = 0.05 if kind.startswith("adam") else 1e-8
    model, ref = Quad(), Quad()
    cat = lambda m: torch.cat([m.a.reshape(-1), m.b.reshape(-1)])  # noqa: E731
    opt, ref_opt = make_opt(kind, model.parameters(), lr), make_opt(kind, ref.parameters(), lr)
    ctrl = cls(opt, lambda: SCALE * quad_val(cat(model)), beta=0.0, grad_clip=clip, **kw)
    active = []
    for b in batches:
        ref_opt.zero_grad()
        (SCALE * quad_loss(cat(ref), b)).backward()
        total = float(torch.nn.utils.clip_grad_norm_(ref.parameters(), clip))
        for group in ref_opt.param_groups:
            group["lr"] = ctrl.lr
        ref_opt.step()
        ctrl.step(SCALE * quad_loss(cat(model), b))
        assert ctrl.last["grad_norm"] == pytest.approx(total, rel=1e-14)
        active.append(total > clip)
        torch.testing.assert_close(flat(model), flat(ref), rtol=1e-12, atol=1e-13)
    assert any(active) and not all(active)


# ----------------------------------------------------------------------------- robustness

def test_update_rules_never_return_non_finite_values():
    """0·inf, a non-finite hypergradient or an overflowing product leaves the value unchanged and is
    reported; a non-finite or negative rate, β or β step size is a ValueError."""
    seen = []
    assert lr_update(0.1, math.inf, 0.0, on_skip=seen.append) == 0.1          # 0·inf
    assert lr_update(0.1, math.nan, 1.0, on_skip=seen.append) == 0.1
    assert lr_update(0.1, -1e300, 1e300, on_skip=seen.append) == 0.1           # overflow to +inf
    assert beta_update(1.0, 0.5, math.inf, 0.0, 0.1, on_skip=seen.append) == 1.0
    assert beta_update(1.0, 1e300, 1e300, 1e300, 0.1, "as-printed", on_skip=seen.append) == 1.0
    assert len(seen) == 5 and all("non-finite" in m for m in seen)
    assert lr_update(0.1, 2.0, 0.01, on_skip=seen.append) == pytest.approx(0.08) and len(seen) == 5
    with pytest.warns(HypergradientWarning, match="skipped"):
        assert lr_update(0.1, math.inf, 0.0) == 0.1
    with pytest.raises(ValueError, match="beta must be a finite number >= 0, got inf"):
        lr_update(0.1, 0.0, math.inf)
    with pytest.raises(ValueError, match="lr must be a finite number >= 0, got nan"):
        lr_update(math.nan, 1.0, 0.1)
    with pytest.raises(ValueError, match="lr must be"):
        lr_update(-0.1, 1.0, 0.1)
    with pytest.raises(ValueError, match="beta_lr must be"):
        beta_update(1.0, -0.5, 1.0, 1.0, 0.1)
    with pytest.raises(ValueError, match="beta must be"):
        beta_update(math.inf, 0.5, 1.0, 1.0, 0.1)
    with pytest.raises(ValueError, match="lr must be"):
        beta_update(1.0, 0.5, 1.0, 1.0, math.nan, "public-code")
    # μ stays in [0, 1] when q and g'_1² overflow (their ratio would be inf/inf = nan)
    mu, c = mu_heuristic(q=math.inf, g1=1e200, mu=0.5, c=1.0)
    assert mu == 0.0 and c == 1.0   # c_{t+1} = μ_t·(1 + c_t)


@pytest.mark.parametrize("cls,kw", [(HD, {"beta": 1e308}), (MARTHE, {"beta": 1e308, "mu": 0.5}),
                                    (MARTHE, {"beta": 0.0, "beta_lr": 1e308, "mu": 0.0})])
def test_overflowing_rate_or_beta_update_is_skipped_and_counted(cls, kw):
    """E = L = ½|w|²: every hypergradient is < 0, so β·Δη (or α·Δη_{t+1}·Δη_t) overflows to inf and
    would send η (or β) to +inf; the update is skipped instead, counted, and warned about once."""
    m = Holder()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    ctrl = cls(opt, lambda: 0.5 * (m.w ** 2).sum(), **kw)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for _ in range(5):
            ctrl.step(0.5 * (m.w ** 2).sum())
            assert ctrl.last["hypergradient"] < 0
            assert ctrl.lr == 0.1 and math.isfinite(ctrl.beta) and opt.param_groups[0]["lr"] == 0.1
    ours = [r for r in rec if issubclass(r.category, HypergradientWarning)]
    assert len(ours) == 1 and "skipped" in str(ours[0].message)
    # the first β update multiplies by Δη_0 = 0 (finite), so the β rule skips from step 2 on
    assert ctrl.n_skipped == (4 if "beta_lr" in kw else 5)
    assert torch.isfinite(m.w).all() and ctrl.t == 5


def _same(a, b) -> bool:
    """Exact equality of nested dicts / lists / tuples of tensors and scalars."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("kind", ["sgd", "sgdm", "adam"])
@pytest.mark.parametrize("cls,kw", CONTROLLERS)
def test_nonfinite_gradient_with_finite_loss_raises_before_anything_changes(cls, kw, kind):
    """A NaN gradient with a finite loss raises ScheduleDiverged (step, lr, loss) and leaves weights,
    optimizer state, controller state (tangent, rate, β, μ) untouched: the run then continues exactly
    as one that never saw the bad step."""
    import copy

    batches, (xv, yv) = mlp_data(8, 6)

    def start():
        model = TinyMLP()
        opt = make_opt(kind, model.parameters(), 0.01 if kind == "adam" else 0.1)
        ctrl = cls(opt, lambda: ce(model(xv), yv), beta=1e-2, **kw)
        for x, y in batches[:3]:
            ctrl.step(ce(model(x), y))
        return model, opt, ctrl

    model, opt, ctrl = start()
    before = (flat(model), copy.deepcopy(opt.state_dict()), ctrl.state_dict(), ctrl.lr, ctrl.t, dict(ctrl.last))
    x, y = batches[3]
    out = model(x)
    out.register_hook(lambda grad: grad * math.nan)
    loss = ce(out, y)
    with pytest.raises(ScheduleDiverged, match="gradient is not finite") as info:
        ctrl.step(loss)
    assert info.value.step == 3 and info.value.lr == before[3] and info.value.loss == float(loss)
    after = (flat(model), opt.state_dict(), ctrl.state_dict(), ctrl.lr, ctrl.t, ctrl.last)
    assert all(_same(a, b) for a, b in zip(before, after))
    twin_model, _, twin = start()
    for x, y in batches[3:]:
        ctrl.step(ce(model(x), y))
        twin.step(ce(twin_model(x), y))
        assert ctrl.lr == twin.lr
    assert torch.equal(flat(model), flat(twin_model))


def linear_batches(steps=6, n=7):
    g = torch.Generator().manual_seed(11)
    return [torch.randn(n, generator=g, dtype=DT) for _ in range(steps)]


def linear_loss(w, c):
    return c @ w


@pytest.mark.parametrize("kind", ["sgd", "sgdm", "adam"])
@pytest.mark.parametrize("cls,kw", [(RTHO, {}), (MARTHE, {"mu": 0.5})])
def test_linear_training_loss_has_zero_hessian(cls, kw, kind):
    """L_t(w) = c_tᵀw: no gradient carries a graph, H_t = 0. RTHO / MARTHE run (the Hessian-vector
    product is 0) and, with β = 0, Δη_T equals the discounted sum of LRS-OPT's exact hypergradient
    (rel. 1e-9; E nonlinear, so the tangent of the dynamics' own state and weight decay matters)."""
    steps, mu = 6, kw.get("mu", 1.0)
    model = Quad()
    w0 = flat(model)
    cat = lambda: torch.cat([model.a.reshape(-1), model.b.reshape(-1)])  # noqa: E731
    batches = linear_batches(steps)
    opt = make_opt(kind, model.parameters(), 0.05)
    ctrl = cls(opt, lambda: quad_val(cat()), beta=0.0, **kw)
    for c in batches:
        ctrl.step(linear_loss(cat(), c))
    _, h = schedule_hypergradient(w0, torch.full((steps,), 0.05, dtype=DT), batches, linear_loss, quad_val,
                                  dynamics_from_optimizer(opt))
    weights = torch.tensor([mu ** (steps - 1 - t) for t in range(steps)], dtype=DT)
    assert ctrl.last["hypergradient"] == pytest.approx(float(weights @ h), rel=1e-9)
    assert abs(float(weights @ h) - float(h[-1])) > 1e-3 * abs(float(h[-1]))  # not just HD


# ----------------------------------------------------------------------------- protocol, state

def test_controllers_satisfy_the_lr_controller_protocol():
    """HD (both objectives), RTHO and MARTHE are LRControllers: step(loss) trains and returns the
    loss value; lr is the next rate (in the optimizer; for Baydin's HD the last one, its next rate
    needs the next gradient), t counts steps, last has loss and lr used."""
    for cls, kw in CONTROLLERS:
        model = TinyMLP()
        batches, (xv, yv) = mlp_data(9, 2)
        opt = make_opt("sgdm", model.parameters(), 0.1)
        ctrl = cls(opt, lambda: ce(model(xv), yv), beta=1e-2, **kw)
        assert isinstance(ctrl, LRController) and ctrl.optimizer is opt
        for i, (x, y) in enumerate(batches):
            lr_before = ctrl.lr
            loss = ce(model(x), y)
            assert ctrl.step(loss) == float(loss)
            assert ctrl.t == i + 1 and ctrl.last["loss"] == float(loss)
            if cls is hd_baydin:  # its next rate needs the next gradient: lr is the rate just used
                assert ctrl.lr == ctrl.last["lr"] and (i == 0) == (ctrl.last["lr"] == lr_before)
            else:
                assert ctrl.last["lr"] == lr_before and ctrl.lr != lr_before
            assert opt.param_groups[0]["lr"] == ctrl.lr
        assert isinstance(ctrl.state_dict(), dict)

    class NoStep:  # everything but step()
        optimizer, lr, t, last = None, 0.0, 0, {}

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    assert not isinstance(NoStep(), LRController)


def test_load_state_dict_validates_before_loading():
    """A state dict of another controller class, of another model (tangent size), of other
    dynamics (number of state tangents), or with a non-finite rate is rejected with ValueError and
    leaves the controller as it was; float32 tensors are cast to the parameters' dtype."""
    model = TinyMLP()
    batches, (xv, yv) = mlp_data(10, 3)
    val = lambda: ce(model(xv), yv)  # noqa: E731

    def trained(cls, kind="sgdm", **kw):
        ctrl = cls(make_opt(kind, model.parameters(), 0.1), val, beta=1e-2, **kw)
        for x, y in batches:
            ctrl.step(ce(model(x), y))
        return ctrl

    marthe_sd = trained(MARTHE, mu=0.5).state_dict()
    assert marthe_sd["controller"] == "MARTHE" and marthe_sd["_z_w"].shape == (43,)
    target = trained(MARTHE, mu=0.5)
    reference = target.state_dict()
    with pytest.raises(ValueError, match="'HD' controller"):
        target.load_state_dict(trained(HD).state_dict())
    with pytest.raises(ValueError, match="'MARTHE' controller, cannot load it into a 'RTHO'"):
        trained(RTHO).load_state_dict(marthe_sd)
    bad = dict(marthe_sd, _z_w=torch.zeros(7, dtype=DT))
    with pytest.raises(ValueError, match=r"state\['_z_w'\] has shape \(7,\).*expected shape \(43,\)"):
        target.load_state_dict(bad)
    with pytest.raises(ValueError, match=r"_z_s"):
        trained(MARTHE, kind="adam", mu=0.5).load_state_dict(marthe_sd)   # Adam has 2 state tangents
    with pytest.raises(ValueError, match=r"state\['lr'\] must be a finite number >= 0, got nan"):
        target.load_state_dict(dict(marthe_sd, lr=math.nan))
    with pytest.raises(ValueError, match=r"state\['t'\]"):
        target.load_state_dict(dict(marthe_sd, t=-1))
    hd_sd = trained(hd_baydin).state_dict()
    with pytest.raises(ValueError, match=r"_prev_direction"):
        trained(hd_baydin).load_state_dict(dict(hd_sd, _prev_direction=torch.zeros(42, dtype=DT)))
    with pytest.raises(KeyError, match="mu"):
        target.load_state_dict({k: v for k, v in marthe_sd.items() if k != "mu"})
    assert _same(target.state_dict(), reference)  # nothing was loaded by the failed attempts
    as_float32 = dict(marthe_sd, _z_w=marthe_sd["_z_w"].float(), _z_s=tuple(x.float() for x in marthe_sd["_z_s"]))
    target.load_state_dict(as_float32)
    assert target.tangent[0].dtype == DT and target.tangent[1][0].dtype == DT
    torch.testing.assert_close(target.tangent[0], marthe_sd["_z_w"].float().double(), rtol=0, atol=0)


# ----------------------------------------------------------------------------- baselines

def test_baselines_follow_the_paper_shapes():
    t = 100
    assert baseline_lrs("fixed", 0.1, t) == [0.1] * t
    ms = baseline_lrs("multistep", 0.1, t)
    assert ms[29] == pytest.approx(0.1) and ms[30] == pytest.approx(0.01) and ms[90] == pytest.approx(1e-4)
    ex = baseline_lrs("exponential", 0.1, t)
    assert ex[-1] == pytest.approx(0.1 * 0.99 ** (200 / t * (t - 1)))
    sg = baseline_lrs("sgdr", 0.1, t)  # T_0 = 5, T_mult = 2: restarts at 5, 15, 35, 75
    assert [sg[i] for i in (0, 5, 15, 35, 75)] == pytest.approx([0.1] * 5)
    assert sg[4] < 0.02 and sg[14] < 0.01
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(KeyError, match="unknown baseline"):
        make_baseline("cosine", opt, total_steps=10)
    with pytest.raises(ValueError, match="total_steps"):
        make_baseline("fixed", opt, total_steps=0)
    assert set(BASELINES) == {"fixed", "multistep", "exponential", "sgdr"}
