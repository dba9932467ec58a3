"""Smoothness regularizer (smoothness paper eqs. 3-7): R → 0 as ε → 0, PGD finds at least as large a
difference as random points of the ball, perturbed states stay in the ball, and it composes with every
optimizer without changes to them."""
import pytest
import torch

import l2l_zoo
from l2l_zoo.base import OptState
from l2l_zoo.regularizers import SmoothnessConfig, SmoothnessRegularizer, parse_smooth

ALL = ["simple", "dm", "rnnprop"]


def setup(name, n=64, seed=0):
    torch.manual_seed(seed)
    lopt = l2l_zoo.create(name).double()
    st = lopt.init_state(n, dtype=torch.float64)
    st = OptState(3, tuple(t + 0.01 * torch.rand_like(t) for t in st.stats),
                  tuple(0.3 * torch.randn_like(t) for t in st.hidden))
    feats, _ = lopt.features(torch.randn(n, dtype=torch.float64) * 0.05, st)
    return lopt, feats, st.hidden


@pytest.mark.parametrize("name", ALL)
def test_penalty_vanishes_as_eps_goes_to_zero(name):
    lopt, feats, hidden = setup(name)
    vals = [float(SmoothnessRegularizer(eps=e, subsample=0)(lopt, feats, hidden, torch.Generator()).detach())
            for e in (1e-2, 1e-4, 1e-8)]
    assert vals[0] > vals[1] > vals[2] >= 0
    assert vals[2] < 1e-14


@pytest.mark.parametrize("name", ALL)
def test_pgd_beats_random_points_and_stays_in_ball(name):
    eps = 0.2
    lopt, feats, hidden = setup(name)
    reg = SmoothnessRegularizer(eps=eps, steps=10, subsample=0)
    gen = torch.Generator().manual_seed(0)
    u = lopt.network(feats, hidden)[0]
    adv = reg.perturb(lopt, feats, hidden, u, gen)
    assert (adv - feats).abs().max() <= eps + 1e-12, "perturbed state left the L-inf ball"
    r_pgd = float((lopt.network(adv, hidden)[0] - u).pow(2).mean().detach())
    g2 = torch.Generator().manual_seed(1)
    for _ in range(20):
        rnd = feats + eps * (2 * torch.rand(feats.shape, generator=g2, dtype=feats.dtype) - 1)
        r_rnd = float((lopt.network(rnd, hidden)[0] - u).pow(2).mean().detach())
        assert r_pgd >= r_rnd
    if name == "simple":
        return  # the mean embedding couples coordinates: PGD is only a local maximiser there
    # per-coordinate problems: also at least as large as the two uniform corners of the ball
    for s in (1.0, -1.0):
        r_c = float((lopt.network(feats + s * eps, hidden)[0] - u).pow(2).mean().detach())
        assert r_pgd >= r_c * (1 - 1e-9)


def test_noise_start_is_projected_into_the_ball():
    lopt, feats, hidden = setup("dm")
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


@pytest.mark.parametrize("name", ["dm", "rnnprop"])
def test_pgd_decouples_by_coordinate_so_subsampling_is_unbiased(name):
    """For coordinate-wise networks the maximisation splits by coordinate: PGD on a subset of
    coordinates gives exactly the full PGD's result on that subset, so R (a mean over coordinates)
    is estimated without bias by a uniform subsample."""
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
    for bad, msg in [("eps=abc", "eps must be a number, got 'abc'"), ("eps=-1", "eps must be > 0, got -1.0"),
                     ("eps=0.1,foo=2", "unknown key 'foo'"), ("lam=1", "eps is required"),
                     ("eps=0.1,steps=2.5", "steps must be an integer"), ("eps=nan", "eps must be > 0")]:
        with pytest.raises(ValueError, match=msg):
            parse_smooth(bad)
    with pytest.raises(ValueError, match="lam must be >= 0"):
        SmoothnessConfig(eps=0.1, lam=-1)
