"""Smoothness regularizer (smoothness paper eqs. 3-7): R → 0 as ε → 0, perturbed states stay in the
ball, PGD reaches the exact maximiser where it is known (a network linear in the state), and it
composes with every registered optimizer without changes to them."""
import math

import pytest
import torch
from torch import nn

import l2l_zoo
from l2l_zoo.base import LearnedOptimizer, OptState
from l2l_zoo.regularizers import SmoothnessConfig, SmoothnessRegularizer, parse_smooth

# Construction options an optimizer needs for these tests (everything else: its defaults).
from conftest import LOPT_OPTIONS as OPTIONS  # one table of construction options
# Coordinate-wise optimizers whose network still couples coordinates (so PGD does not decouple).
COUPLED = {"simple": "the mean embedding couples coordinates"}
ALL = l2l_zoo.available()


def setup(name, n=64, seed=0):
    """A float64 optimizer with a non-trivial state: its input state ``feats`` and hidden state."""
    torch.manual_seed(seed)
    lopt = l2l_zoo.create(name, **OPTIONS.get(name, {})).double()
    st = lopt.init_state(n, dtype=torch.float64)
    st = OptState(3, tuple(t + 0.01 * torch.rand_like(t) for t in st.stats),
                  tuple(t + 0.3 * torch.randn_like(t) if t.dim() == 2 else t for t in st.hidden))
    kw = {}
    if lopt.needs_loss:
        kw["loss"] = torch.tensor(2.3, dtype=torch.float64)
    if lopt.needs_params:
        kw["params"] = torch.randn(n, dtype=torch.float64)
    feats, _ = lopt.features(torch.randn(n, dtype=torch.float64) * 0.05, st, **kw)
    return lopt, feats, st.hidden


@pytest.mark.parametrize("name", ALL)
def test_penalty_vanishes_as_eps_goes_to_zero(name):
    lopt, feats, hidden = setup(name)
    vals = [float(SmoothnessRegularizer(eps=e, subsample=0)(lopt, feats, hidden, torch.Generator()).detach())
            for e in (1e-2, 1e-4, 1e-8)]
    assert vals[0] > vals[1] > vals[2] >= 0
    assert vals[2] < 1e-14


@pytest.mark.parametrize("name", ALL)
def test_pgd_stays_in_the_ball(name):
    eps = 0.2
    lopt, feats, hidden = setup(name)
    reg = SmoothnessRegularizer(eps=eps, steps=10, subsample=0)
    u = lopt.network(feats, hidden)[0]
    adv = reg.perturb(lopt, feats, hidden, u, torch.Generator().manual_seed(0))
    assert adv.shape == feats.shape and not adv.requires_grad
    assert (adv - feats).abs().max() <= eps + 1e-12, "perturbed state left the L-inf ball"
    assert not torch.equal(adv, feats), "PGD did not move"


class _LinearOptimizer(LearnedOptimizer):
    """u = feats @ w: max_{s' in B∞(s, ε)} |u(s) - u(s')|² = (ε ‖w‖₁)², at s' = s ± ε sign(w)."""

    name = "linear_test"  # not registered

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([0.7, -1.3, 0.4], dtype=torch.float64))

    def network(self, feats, hidden):
        return feats @ self.w, hidden


def test_pgd_reaches_the_exact_maximum_of_a_linear_network():
    """Each sign step moves every coordinate η towards the maximising corner (|δ| grows, so the
    direction never flips); from a start within the ball K ≥ 2ε/η steps reach it exactly."""
    lopt = _LinearOptimizer()
    eps, eta = 0.2, 0.05
    steps = math.ceil(2 * eps / eta) + 1
    feats = torch.randn(7, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    reg = SmoothnessRegularizer(eps=eps, steps=steps, step_size=eta, noise=0.05, subsample=0)
    best = (eps * lopt.w.detach().abs().sum()).item() ** 2
    u = lopt.network(feats, ())[0]
    adv = reg.perturb(lopt, feats, (), u, torch.Generator().manual_seed(1))
    per_coord = (lopt.network(adv, ())[0] - u).pow(2).detach()
    torch.testing.assert_close(per_coord, torch.full_like(per_coord, best), rtol=0, atol=1e-12)
    r = reg(lopt, feats, (), torch.Generator().manual_seed(2))
    assert abs(float(r.detach()) - best) <= 1e-12
    # the maximiser is a corner: every feature at distance exactly ε
    torch.testing.assert_close((adv - feats).abs(), torch.full_like(adv, eps), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ALL)
def test_noise_start_is_projected_into_the_ball(name):
    lopt, feats, hidden = setup(name)
    reg = SmoothnessRegularizer(eps=1e-3, noise=10.0, steps=0, subsample=0)  # noqa: the start alone
    adv = reg.perturb(lopt, feats, hidden, lopt.network(feats, hidden)[0], torch.Generator().manual_seed(0))
    assert (adv - feats).abs().max() <= 1e-3 + 1e-15


@pytest.mark.parametrize("name", ALL)
def test_penalty_is_differentiable_in_meta_parameters_only(name):
    lopt, feats, hidden = setup(name)
    feats = feats.clone().requires_grad_(True)
    r = SmoothnessRegularizer(eps=0.1, subsample=16)(lopt, feats, hidden, torch.Generator().manual_seed(0))
    r.backward()
    assert feats.grad is None, "the state enters as data"
    assert sum(float(p.grad.abs().sum()) for p in lopt.parameters() if p.grad is not None) > 0


@pytest.mark.parametrize("name", [n for n in ALL if l2l_zoo.REGISTRY[n].coordinatewise])
def test_pgd_decouples_by_coordinate_so_subsampling_is_unbiased(name):
    """For coordinate-wise networks the maximisation splits by coordinate: PGD on a subset of
    coordinates gives exactly the full PGD's result on that subset, so R (a mean over coordinates)
    is estimated without bias by a uniform subsample."""
    if name in COUPLED:
        pytest.skip(f"{name}: {COUPLED[name]}; the subsample is an approximation there")
    lopt, feats, hidden = setup(name, n=60)
    reg = SmoothnessRegularizer(eps=0.1, steps=5, subsample=0)
    start = feats + 0.05 * torch.randn(feats.shape, generator=torch.Generator().manual_seed(0), dtype=feats.dtype)
    u = lopt.network(feats, hidden)[0]
    adv = reg.perturb(lopt, feats, hidden, u, start=start)
    idx = torch.randperm(60, generator=torch.Generator().manual_seed(1))[:17]
    sub = reg.perturb(lopt, feats[idx], tuple(h[idx] for h in hidden), u[idx], start=start[idx])
    torch.testing.assert_close(sub, adv[idx], rtol=0, atol=1e-12)
    assert not torch.allclose(adv, start), "PGD did not move"
    assert SmoothnessRegularizer(eps=0.1, subsample=20).select(lopt, feats, hidden, torch.Generator())[0].shape[0] == 20


def test_zero_noise_with_steps_is_rejected():
    with pytest.raises(ValueError, match="noise must be > 0 when steps > 0"):
        SmoothnessConfig(eps=0.1, noise=0.0)


def test_parse_smooth():
    c = parse_smooth("eps=0.1")
    assert (c.eps, c.lam, c.steps, c.eta, c.noise) == (0.1, 1.0, 10, pytest.approx(0.02), 0.05)
    c = parse_smooth("eps=0.5,lam=10,steps=3,step_size=0.1,subsample=0")
    assert (c.lam, c.steps, c.eta, c.subsample) == (10.0, 3, 0.1, 0)
    c = parse_smooth("eps=0.1,corners=1")
    assert c.corners == 1 and c.to_dict()["corners"] == 1 and "corners" not in parse_smooth("eps=0.1").to_dict()
    for bad, msg in [("eps=abc", "eps must be a number, got 'abc'"), ("eps=-1", "--smooth: eps must be > 0, got -1.0"),
                     ("eps=0.1,corners=2", "--smooth: corners must be 0 or 1, got 2"),
                     ("eps=0.1,foo=2", "unknown key 'foo'"), ("lam=1", "eps is required"),
                     ("eps=0.1,steps=2.5", "steps must be an integer"), ("eps=nan", "eps must be > 0"),
                     ("eps=0.1,eps=0.2", "--smooth: key 'eps' given more than once in 'eps=0.1,eps=0.2'"),
                     ("eps=0.1,lam=1,lam=2", "key 'lam' given more than once"),
                     ("eps=inf", "--smooth: eps must be finite, got inf"),
                     ("eps=0.1,noise=0", "--smooth: noise must be > 0 when steps > 0"),
                     ("eps=0.1,steps=inf", "steps must be an integer, got 'inf'")]:
        with pytest.raises(ValueError, match=msg) as e:
            parse_smooth(bad)
        assert str(e.value).startswith("--smooth: ") and "\n" not in str(e.value)
    with pytest.raises(ValueError, match="lam must be >= 0"):
        SmoothnessConfig(eps=0.1, lam=-1)


@pytest.mark.parametrize("kwargs,msg", [
    ({"steps": 2.5}, "steps must be an integer >= 0, got 2.5"), ({"subsample": True}, "subsample must be an integer"),
    ({"lam": float("inf")}, "lam must be finite, got inf"), ({"step_size": 0.0}, "step_size must be > 0, got 0.0"),
    ({"noise": float("nan")}, "noise must be >= 0, got nan"), ({"eps": "0.1"}, "eps must be > 0, got '0.1'"),
])
def test_config_rejects_nonsense(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        SmoothnessConfig(**kwargs)


class _CoupledOptimizer(LearnedOptimizer):
    """u_i = a·s_i + b·mean(s): the worst case moves every input the same way, (a + b)²ε²."""

    name = "coupled_test"  # not registered

    def __init__(self, a=0.02, b=-0.15):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a, dtype=torch.float64))
        self.b = nn.Parameter(torch.tensor(b, dtype=torch.float64))

    def network(self, feats, hidden):
        return self.a * feats[:, 0] + self.b * feats[:, 0].mean(), hidden


def test_corner_starts_find_the_coupled_worst_case_that_the_random_start_misses():
    """corners=1: PGD also from s ± ε reaches (a + b)²ε² exactly; the paper's random start alone
    (noise 0.05 >> ε) stays at a random corner, far below, for many coordinates."""
    lopt = _CoupledOptimizer()
    s = 0.002 * torch.randn(20000, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    eps = 1e-3
    r0 = SmoothnessRegularizer(eps=eps, subsample=0)(lopt, s, (), torch.Generator().manual_seed(1))
    r1 = SmoothnessRegularizer(eps=eps, subsample=0, corners=1)(lopt, s, (), torch.Generator().manual_seed(1))
    assert float(r1.detach()) == pytest.approx(((0.02 - 0.15) * eps) ** 2, rel=1e-12)
    assert float(r0.detach()) < 0.05 * float(r1.detach())
    r1.backward()  # differentiable through the corner that won
    assert lopt.a.grad is not None and float(lopt.b.grad) != 0.0


def test_sample_without_replacement_is_uniform_and_distinct():
    """The PGD's coordinate subsample: k distinct indices, each index and each pair of indices as
    often as under a uniform k-subset (inclusion k/n and k(k-1)/(n(n-1))), on the fast branch
    (k <= n/8) and the randperm one."""
    from l2l_zoo.regularizers.smoothness import sample_without_replacement
    g = torch.Generator().manual_seed(0)
    for n, k in [(64, 8), (40, 20)]:
        reps = 20000
        counts = torch.zeros(n)
        pair = torch.zeros(n, n)
        for _ in range(reps):
            idx = sample_without_replacement(n, k, g)
            assert idx.numel() == k and idx.unique().numel() == k and 0 <= int(idx.min()) and int(idx.max()) < n
            m = torch.zeros(n)
            m[idx] = 1
            counts += m
            pair += torch.outer(m, m)
        p = k / n
        assert float((counts / reps - p).abs().max()) < 5 * (p * (1 - p) / reps) ** 0.5
        q = k * (k - 1) / (n * (n - 1))
        off = pair[~torch.eye(n, dtype=torch.bool)] / reps
        assert float((off - q).abs().max()) < 5 * (q * (1 - q) / reps) ** 0.5
    # the first index drawn is uniform too (the order is random, not sorted)
    first = torch.bincount(torch.stack([sample_without_replacement(64, 8, g)[0] for _ in range(20000)]), minlength=64)
    assert float((first / 20000 - 1 / 64).abs().max()) < 5 * ((1 / 64) * (63 / 64) / 20000) ** 0.5
