"""SIB (Hu et al. 2020) and its backbones: the synthetic gradient step against an explicit Jacobian
contraction, the meta-gradient through the K steps against float64 finite differences, θ⁰ from
normalised class means, NCM = SIB with K = 0, the synthetic-gradient network's size, the smoothed
penalty (differentiable, → 0 as ε → 0), feature-cache episodes = pixel episodes of the same
(seed, index), bit-exact resume of pretraining and meta-training through ``runs.train``, the WRN
checkpoint loader, and a tiny end-to-end run on omniglot-small."""
import math

import pytest
import torch
import torch.nn.functional as F

from l2l_zoo import runs
from l2l_zoo.regularizers import SmoothnessConfig, SmoothnessRegularizer

from fewshot.backbones import (FeatureSplit, WideResNet, cache_features, conv4_64, embed_episode,
                               load_official_wrn, ncm_validation, pretrain, wrn28_10)
from fewshot.data import Episode, EpisodeSampler, FewShotSplit, mean_ci
from fewshot.sib import SIB, SIBStepper, evaluate, evaluate_ncm, nearest_class_mean
from conftest import killed_at

F64 = torch.float64


def feature_episode(seed=0, ways=5, shots=2, queries=6, dim=16, dtype=F64, spread=0.7):
    """A feature episode with class structure: class centres plus noise (support shuffled, so no
    class-major order is assumed)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(ways, dim, generator=g, dtype=dtype)
    sy = torch.arange(ways).repeat_interleave(shots)[torch.randperm(ways * shots, generator=g)]
    qy = torch.arange(ways).repeat_interleave(queries)
    sx = centres[sy] + spread * torch.randn(len(sy), dim, generator=g, dtype=dtype)
    qx = centres[qy] + spread * torch.randn(len(qy), dim, generator=g, dtype=dtype)
    return Episode(sx, sy, qx, qy, tuple(range(ways)))


def make_sib(ways=5, dim=16, seed=0, **kw):
    torch.manual_seed(seed)
    return SIB(ways, dim, **kw).double()


# ============================================================================ the model

def test_synthetic_gradient_network_size_for_five_ways():
    sib = SIB(5, 64)
    counts = [sum(p.numel() for p in layer.parameters()) for layer in (sib.dni.layer1[0], sib.dni.layer1[2],
                                                                       sib.dni.layer2[0], sib.dni.layer2[2],
                                                                       sib.dni.layer3)]
    # Linear(5→40), BN(40), Linear(40→40), BN(40), Linear(40→5)
    assert counts == [5 * 40 + 40, 80, 40 * 40 + 40, 80, 40 * 5 + 5]
    assert sum(p.numel() for p in sib.dni.parameters()) == 2245
    assert sum(p.numel() for p in sib.parameters()) == 2245 + 64 + 2   # + diagonal, scale, bias
    assert float(sib.scale) == 10.0 and float(sib.bias) == 0.0 and torch.equal(sib.init_diag.weight, torch.ones(64))
    assert not any(isinstance(b, torch.Tensor) and b.numel() for b in sib.buffers()), \
        "BatchNorm keeps no running statistics (it always normalises over the query set)"


def test_initial_params_are_the_normalised_support_class_means():
    ep = feature_episode(shots=3)
    sib = make_sib()
    expect = torch.stack([torch.stack([x / x.norm() for x, y in zip(ep.support_x, ep.support_y) if y == c]).mean(0)
                          for c in range(5)])
    assert torch.allclose(sib.initial_params(ep.support_x, ep.support_y), expect, atol=1e-14, rtol=0)
    # the diagonal multiplies each feature; positive rescaling of a support vector changes nothing
    with torch.no_grad():
        sib.init_diag.weight.copy_(torch.linspace(0.5, 2.0, 16, dtype=F64))
    scaled = ep.support_x * torch.rand(len(ep.support_y), 1, dtype=F64).add(0.1).mul(7)
    assert torch.allclose(sib.initial_params(scaled, ep.support_y), expect * sib.init_diag.weight,
                          atol=1e-14, rtol=0)


def _logits_by_hand(sib, q, p):
    qn = q / q.norm(dim=1, keepdim=True)
    pn = p / p.norm(dim=1, keepdim=True)
    return sib.scale * (sib.bias + torch.einsum("qd,nd->qn", qn, pn))


def test_inner_step_is_an_explicit_step_along_the_synthetic_gradient():
    ep = feature_episode()
    sib = make_sib(inner_lr=0.3)
    p = sib.initial_params(ep.support_x, ep.support_y).detach()
    for _ in range(2):
        logits = _logits_by_hand(sib, ep.query_x, p)
        g = sib.dni(logits).detach()                                          # ξ(logits), (Q, N)
        J = torch.autograd.functional.jacobian(lambda w: _logits_by_hand(sib, ep.query_x, w), p)  # (Q, N, N, D)
        expect = p - 0.3 * torch.einsum("qn,qnkd->kd", g, J)
        new, got_logits, got_g = sib.inner_step(p, ep.query_x)
        assert torch.allclose(got_logits, logits, atol=1e-13, rtol=0)
        assert torch.allclose(got_g, g, atol=1e-13, rtol=0)
        assert torch.allclose(new, expect, atol=1e-13, rtol=0)
        assert (new - p).abs().max() > 1e-3, "the step must move θ for this check to mean anything"
        p = new.detach()
    two = sib.adapt(ep.support_x, ep.support_y, ep.query_x, steps=2)
    assert torch.allclose(two.params, p, atol=1e-13, rtol=0)
    assert torch.allclose(two.logits, _logits_by_hand(sib, ep.query_x, p), atol=1e-12, rtol=0)


def test_meta_gradient_through_the_inner_steps_matches_finite_differences():
    ep = feature_episode(seed=1)
    sib = make_sib(inner_lr=0.5, steps=3)
    with torch.no_grad():  # leave the symmetric initialisation so every coordinate matters
        sib.bias.fill_(0.1)
        sib.init_diag.weight.copy_(torch.linspace(0.8, 1.2, 16, dtype=F64))

    def loss():
        return F.cross_entropy(sib(ep.support_x, ep.support_y, ep.query_x), ep.query_y)

    sib.zero_grad()
    loss().backward()
    picks = [("scale", (0,)), ("bias", (0,)), ("init_diag.weight", (3,)), ("dni.layer1.0.weight", (7, 2)),
             ("dni.layer2.2.weight", (5,)), ("dni.layer3.weight", (1, 11)), ("dni.layer3.bias", (4,))]
    named = dict(sib.named_parameters())
    h = 1e-6
    for name, ix in picks:
        p = named[name]
        analytic = float(p.grad[ix])
        with torch.no_grad():
            p[ix] += h
            up = float(loss())
            p[ix] -= 2 * h
            down = float(loss())
            p[ix] += h
        fd = (up - down) / (2 * h)
        assert abs(analytic - fd) <= 1e-6 * max(1.0, abs(fd)), f"{name}{ix}: autograd {analytic}, FD {fd}"
    assert abs(float(named["dni.layer3.weight"].grad[1, 11])) > 1e-6, "ξ must receive a meta-gradient"


def test_nearest_class_mean_is_sib_with_zero_steps():
    episodes = [feature_episode(seed=s, spread=1.5) for s in range(6)]
    sib0 = make_sib(steps=0)
    for ep in episodes:
        cos = nearest_class_mean(ep.support_x, ep.support_y, ep.query_x, 5)
        assert torch.allclose(sib0(ep.support_x, ep.support_y, ep.query_x), 10.0 * cos, atol=1e-13, rtol=0)
        means = torch.stack([ep.support_x[ep.support_y == c].div(
            ep.support_x[ep.support_y == c].norm(dim=1, keepdim=True)).mean(0) for c in range(5)])
        by_hand = torch.stack([torch.stack([torch.dot(q, m) / (q.norm() * m.norm()) for m in means])
                               for q in ep.query_x])
        assert torch.allclose(cos, by_hand, atol=1e-13, rtol=0)
    accs = evaluate_ncm(episodes)
    assert evaluate(sib0, episodes) == accs
    assert 0.3 < sum(accs) / 6 < 0.95, "episodes neither trivial nor hopeless, so the equality means something"


def test_zero_initialised_synthetic_gradient_starts_as_ncm_and_still_learns():
    """The ablation ``dni_init="zero"``: ξ ≡ 0 at first, so the K = 3 steps leave θ⁰ (SIB = NCM), while
    the meta-gradient reaches ξ's output layer, so meta-training can move it; the default differs."""
    episodes = [feature_episode(seed=s, spread=1.5) for s in range(4)]
    sib, sib0 = make_sib(dni_init="zero", inner_lr=0.3), make_sib(steps=0)
    for ep in episodes:
        assert torch.equal(sib(ep.support_x, ep.support_y, ep.query_x), sib0(ep.support_x, ep.support_y, ep.query_x))
    ep = episodes[0]
    F.cross_entropy(sib(ep.support_x, ep.support_y, ep.query_x), ep.query_y).backward()
    assert sib.dni.layer3.weight.grad.abs().max() > 1e-8
    rnd = make_sib(inner_lr=0.3)
    assert not torch.allclose(rnd(ep.support_x, ep.support_y, ep.query_x), sib0(ep.support_x, ep.support_y, ep.query_x))
    with pytest.raises(ValueError, match="dni_init must be 'random' or 'zero', got 'ones'"):
        SIB(5, 8, dni_init="ones")


def test_synthetic_gradient_is_transductive_and_mode_independent():
    ep = feature_episode()
    sib = make_sib(inner_lr=0.3)
    a = sib(ep.support_x, ep.support_y, ep.query_x)
    sib.eval()
    assert torch.equal(sib(ep.support_x, ep.support_y, ep.query_x), a), "eval() must not change SIB"
    q2 = ep.query_x.clone()
    q2[-1] += 3.0
    b = sib(ep.support_x, ep.support_y, q2)
    assert (b[0] - a[0]).abs().max() > 1e-6, "query 0's logits depend on the other queries (BN over the query set)"


def test_bad_arguments_name_the_parameter():
    for kw, word in ((dict(ways=1), "ways"), (dict(feature_dim=0), "feature_dim"), (dict(steps=-1), "steps"),
                     (dict(inner_lr=0.0), "inner_lr"), (dict(scale=float("nan")), "scale")):
        args = {"ways": 5, "feature_dim": 8, **kw}
        with pytest.raises(ValueError, match=word):
            SIB(args.pop("ways"), args.pop("feature_dim"), **args)
    sib = make_sib(dim=16)
    ep = feature_episode()
    with pytest.raises(ValueError, match=r"query_x must be features of shape \(n, 16\)"):
        sib(ep.support_x, ep.support_y, ep.query_x[:, :8])
    with pytest.raises(ValueError, match="at least 2"):
        sib(ep.support_x, ep.support_y, ep.query_x[:1])
    with pytest.raises(ValueError, match="every class needs a support example"):
        sib(ep.support_x[ep.support_y != 3], ep.support_y[ep.support_y != 3], ep.query_x)
    with pytest.raises(ValueError, match="5-way"):
        SIBStepper(sib).step(feature_episode(ways=3))
    with pytest.raises(ValueError, match="lr"):
        SIBStepper(sib, lr=-1.0)
    split = tiny_split()
    for kw, msg in ((dict(steps=-1), "steps must be"), (dict(batch_size=43), "batch_size=43 exceeds the 42 images"),
                    (dict(lr=0.0), "lr must be"), (dict(momentum=1.0), "momentum must be"),
                    (dict(milestones=[2.5]), "milestones must be")):
        with pytest.raises(ValueError, match=msg):
            pretrain(conv4_64(), split, **{"steps": 2, **kw})


def test_a_non_finite_episode_stops_meta_training_before_the_parameters_move():
    sib = make_sib()
    st = SIBStepper(sib)
    good, bad = feature_episode(seed=0), feature_episode(seed=1)
    bad.query_x[2, 3] = float("nan")
    before = {k: v.clone() for k, v in sib.state_dict().items()}
    eps = iter([bad, good])
    rec = runs.train(st, lambda aux: next(eps), steps=2, progress=False)
    assert rec["diverged_at"] == 1 and rec["final"] is None
    for k, v in sib.state_dict().items():
        assert torch.equal(v, before[k]), k


# ============================================================================ smoothed SIB

def test_smoothed_penalty_is_differentiable_and_vanishes_with_eps():
    ep = feature_episode(seed=2)
    sib = make_sib(inner_lr=0.3)
    logits = sib.logits(ep.query_x, sib.initial_params(ep.support_x, ep.support_y)).detach()

    def R(eps, seed=0):
        reg = SmoothnessRegularizer(SmoothnessConfig(eps=eps, steps=5))
        return reg(sib, logits, (), torch.Generator().manual_seed(seed))

    vals = [float(R(e).detach()) for e in (1e-1, 1e-3, 1e-5, 1e-8)]
    assert vals[0] > vals[1] > vals[2] > vals[3] >= 0
    assert vals[0] > 1e-4 and vals[3] < 1e-14
    # differentiable in ξ's weights: the autograd gradient equals float64 central differences of
    # ‖ξ(s) − ξ(s')‖² with the worst case s' held fixed (s' is data: PGD's sign steps are piecewise
    # constant in the weights, so a finite difference through them may jump)
    reg = SmoothnessRegularizer(SmoothnessConfig(eps=0.1, steps=5))
    sib.zero_grad()
    reg(sib, logits, (), torch.Generator().manual_seed(0)).backward()
    s_adv = reg.perturb(sib, logits, (), sib.network(logits)[0], torch.Generator().manual_seed(0))
    assert (s_adv - logits).abs().max() > 0.05

    def R_fixed():
        return (sib.network(logits)[0] - sib.network(s_adv)[0]).pow(2).mean()
    p = sib.dni.layer2[0].weight
    assert torch.isfinite(p.grad).all() and p.grad.abs().max() > 1e-6
    h = 1e-6
    for ix in ((0, 0), (3, 17), (20, 5)):
        with torch.no_grad():
            p[ix] += h
            up = float(R_fixed())
            p[ix] -= 2 * h
            down = float(R_fixed())
            p[ix] += h
        fd = (up - down) / (2 * h)
        assert abs(float(p.grad[ix]) - fd) <= 1e-7 * max(1.0, abs(fd)), f"{ix}: autograd {float(p.grad[ix])}, FD {fd}"


def test_smoothed_objective_adds_lambda_times_the_penalty_of_every_inner_step():
    ep = feature_episode(seed=3)
    sib = make_sib(inner_lr=0.3, steps=3)
    cfg = SmoothnessConfig(eps=0.2, lam=2.5, steps=4)
    out = sib.adapt(ep.support_x, ep.support_y, ep.query_x, regularizer=SmoothnessRegularizer(cfg),
                    generator=torch.Generator().manual_seed(0))
    assert len(out.penalties) == 3 and all(float(r) > 0 for r in out.penalties)
    # each R_k is the penalty at step k's logits (what ξ read at that step)
    p = sib.initial_params(ep.support_x, ep.support_y)
    g = torch.Generator().manual_seed(0)
    for k in range(3):
        p, logits, _ = sib.inner_step(p, ep.query_x)
        assert torch.allclose(out.penalties[k], SmoothnessRegularizer(cfg)(sib, logits, (), g), atol=1e-14, rtol=0)
    plain = make_sib(inner_lr=0.3, steps=3)
    r = SIBStepper(sib, smooth=cfg).step(ep)
    r0 = SIBStepper(plain).step(ep)
    assert r["loss"] == pytest.approx(r0["loss"], abs=1e-12), "the penalty does not change the query loss"
    assert r["penalty"] == pytest.approx(2.5 * sum(float(x) for x in out.penalties), rel=1e-12)
    assert r["meta_loss"] == pytest.approx(r["loss"] + r["penalty"], rel=1e-12)
    assert "penalty" not in r0


def test_a_meta_batch_step_follows_the_mean_of_its_episodes_objectives():
    """meta_batch = 3: one SGD step on the mean of the three episodes' smoothed objectives (each with
    the PGD noise of its own episode index), the reported numbers their means; episode indices run
    t·B + b."""
    eps = [feature_episode(seed=s) for s in (4, 5, 6)]
    cfg = SmoothnessConfig(eps=0.2, lam=2.5, steps=2)
    st = SIBStepper(make_sib(inner_lr=0.3), smooth=cfg, seed=3, lr=0.05, meta_batch=3)
    assert st.episode_indices() == [0, 1, 2]
    ref = make_sib(inner_lr=0.3)
    ref.load_state_dict(st.model.state_dict())
    losses, pens = [], []
    for i, ep in enumerate(eps):
        out = ref.adapt(ep.support_x, ep.support_y, ep.query_x, regularizer=SmoothnessRegularizer(cfg),
                        generator=st._noise(i))
        losses.append(F.cross_entropy(out.logits, ep.query_y))
        pens.append(2.5 * torch.stack(out.penalties).sum())
    objective = (torch.stack(losses) + torch.stack(pens)).mean()
    opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
    objective.backward()
    opt.step()
    r = st.step(eps)
    for (k, a), b in zip(st.model.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15, msg=k)
    assert r["loss"] == pytest.approx(float(torch.stack(losses).mean()), rel=1e-12)
    assert r["penalty"] == pytest.approx(float(torch.stack(pens).mean()), rel=1e-12)
    assert r["meta_loss"] == pytest.approx(float(objective), rel=1e-12)
    assert st.episode_indices() == [3, 4, 5]
    # each episode's noise is its own: another index, or another seed, draws other starts
    draw = lambda g: torch.randn(4, generator=g)  # noqa: E731
    assert not torch.equal(draw(st._noise(0)), draw(st._noise(1)))
    assert not torch.equal(draw(st._noise(0)), draw(SIBStepper(make_sib(), seed=4, meta_batch=2)._noise(0)))
    with pytest.raises(ValueError, match=r"takes 3 episode\(s\) per iteration \(meta_batch 3 over 1 process"):
        st.step(eps[:2])
    with pytest.raises(ValueError, match="meta_batch must be an integer >= 1, got 0"):
        SIBStepper(make_sib(), meta_batch=0)


# ============================================================================ backbones and caching

def tiny_split(classes=7, per_class=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat_interleave(per_class)[torch.randperm(classes * per_class, generator=g)]
    images = torch.randint(0, 256, (classes * per_class, 1, 28, 28), generator=g, dtype=torch.uint8)
    return FewShotSplit("tiny", images, labels, [f"c{i}" for i in range(classes)], mean=[0.5], std=[0.3])


def test_feature_cache_episodes_match_the_pixel_episodes_of_the_same_seed_and_index():
    split = tiny_split()
    torch.manual_seed(0)
    bb = conv4_64()
    with torch.no_grad():  # non-trivial running statistics, so eval mode matters
        for m in bb.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    bb.train()
    fs = cache_features(bb, split, batch_size=9)
    assert bb.training, "caching restores the backbone's mode"
    assert isinstance(fs, FeatureSplit) and fs.features.shape == (42, 64) and fs.counts() == split.counts()
    pix, feat = EpisodeSampler(split, 5, 2, 3), EpisodeSampler(fs, 5, 2, 3)
    seen = set()
    for seed, index in ((0, 0), (0, 1), (3, 7), (11, 2)):
        a, b = pix.episode(seed, index), feat.episode(seed, index)
        e = embed_episode(bb, a)
        assert b.classes == a.classes and torch.equal(b.support_y, a.support_y) and torch.equal(b.query_y, a.query_y)
        assert b.support_x.shape == (10, 64) and b.query_x.shape == (15, 64)
        assert torch.allclose(b.support_x, e.support_x, atol=1e-5, rtol=1e-5)
        assert torch.allclose(b.query_x, e.query_x, atol=1e-5, rtol=1e-5)
        seen.add(a.classes)
    assert len(seen) == 4, "different (seed, index) give different episodes"
    with pytest.raises(ValueError, match="ways=8 exceeds the 7 classes"):
        EpisodeSampler(fs, 8, 1, 1)


def test_pretraining_resumes_bit_for_bit(tmp_path):
    split = tiny_split(classes=6, per_class=8)
    kw = dict(steps=7, batch_size=8, lr=0.05, warmup_steps=3, milestones=[5], seed=1,
              transform=lambda x, g: x + 0.01 * torch.randn(x.shape, generator=g))
    torch.manual_seed(0)
    ref = conv4_64()
    rec_ref = pretrain(ref, split, **kw)

    calls = {"n": 0}

    def dying(x, g):
        calls["n"] += 1
        if calls["n"] == 6:   # after the checkpoint at step 4
            raise KeyboardInterrupt
        return kw["transform"](x, g)

    ck = tmp_path / "pre.ck"
    torch.manual_seed(0)
    bb = conv4_64()
    with pytest.raises(KeyboardInterrupt):
        pretrain(bb, split, **{**kw, "transform": dying}, checkpoint=ck, checkpoint_every=4)
    assert ck.exists()
    torch.manual_seed(5)       # a fresh process: other weights until the checkpoint is loaded
    bb2 = conv4_64()
    rec = pretrain(bb2, split, **kw, checkpoint=ck, checkpoint_every=4, resume=True)
    assert rec["step_log"] == rec_ref["step_log"]
    assert rec_ref["step_log"]["lr"][:3] == pytest.approx([0.05 / 3, 0.1 / 3, 0.05]) and \
        rec_ref["step_log"]["lr"][5] == pytest.approx(0.005), "warm-up then ×0.1 at the milestone"
    for (k, a), b in zip(ref.state_dict().items(), bb2.state_dict().values()):
        assert torch.equal(a, b), k


def test_sib_meta_training_resumes_bit_for_bit(tmp_path):
    fs = FeatureSplit("f", torch.randn(60, 16, generator=torch.Generator().manual_seed(0)),
                      torch.arange(6).repeat_interleave(10), [f"c{i}" for i in range(6)],
                      [torch.arange(10 * c, 10 * c + 10) for c in range(6)])
    sampler = EpisodeSampler(fs, 5, 1, 4)
    val = sampler.episodes(3, seed=99)
    smooth = SmoothnessConfig(eps=0.1, lam=1.0, steps=3)

    def setup():
        torch.manual_seed(0)
        st = SIBStepper(SIB(5, 16, inner_lr=0.5), lr=0.05, smooth=smooth, seed=4)
        ev = lambda: {"val_acc": sum(st.evaluate(val)) / len(val)}  # noqa: E731
        return st, (lambda aux: sampler.episode(7, st.t)), ev

    st, batch, ev = setup()
    ref = runs.train(st, batch, steps=9, evaluate=ev, eval_every=3, progress=False)
    assert ref["diverged_at"] is None and len(ref["step_log"]["penalty"]) == 9

    st1, batch1, ev1 = setup()
    dying = killed_at(7, batch1)  # after the checkpoint at step 5
    ck = tmp_path / "sib.ck"
    with pytest.raises(KeyboardInterrupt):
        runs.train(st1, dying, steps=9, evaluate=ev1, eval_every=3, checkpoint=ck, checkpoint_every=5,
                   identity={"sib": 1}, progress=False)
    st2, batch2, ev2 = setup()
    with torch.no_grad():
        for p in st2.model.parameters():
            p.add_(0.5)
    st2.generator.manual_seed(123)
    rec = runs.train(st2, batch2, steps=9, evaluate=ev2, eval_every=3, checkpoint=ck, checkpoint_every=5,
                     identity={"sib": 1}, resume=True, progress=False)
    assert rec["step_log"] == ref["step_log"] and rec["eval"] == ref["eval"]
    for (k, a), b in zip(st.model.state_dict().items(), st2.model.state_dict().values()):
        assert torch.equal(a, b), k
    assert torch.equal(st.generator.get_state(), st2.generator.get_state())


def test_wrn_28_10_size_and_the_authors_checkpoint_layouts(tmp_path):
    torch.manual_seed(0)
    net = wrn28_10()
    assert net.feature_dim == 640
    assert sum(p.numel() for p in net.parameters()) == 36_472_784   # 36,479,194 with CIFAR-10's 640→10 layer
    del net
    small = WideResNet(10, 1)
    x = torch.randn(2, 3, 16, 16)
    small.eval()
    want = small(x)
    assert want.shape == (2, 64)
    sd = small.state_dict()
    assert "block1.layer.0.convShortcut.weight" in sd and "block1.layer.0.bn1.running_mean" in sd
    torch.save(sd, tmp_path / "netFeatBest.pth")
    torch.save({"netFeat": {"module." + k: v for k, v in sd.items()}, "lr": 1e-3}, tmp_path / "netSIBBest.pth")
    for name in ("netFeatBest.pth", "netSIBBest.pth"):
        m = load_official_wrn(tmp_path / name, depth=10, widen_factor=1).eval()
        assert torch.equal(m(x), want)
    with pytest.raises(runs.CheckpointError, match="does not fit WRN-28-10"):
        load_official_wrn(tmp_path / "netFeatBest.pth")
    (tmp_path / "junk.pth").write_bytes(b"<html>not a checkpoint</html>")
    with pytest.raises(runs.CheckpointError, match="junk.pth") as e:
        load_official_wrn(tmp_path / "junk.pth")
    assert "\n" not in str(e.value)
    with pytest.raises(runs.CheckpointError, match="does not exist"):
        load_official_wrn(tmp_path / "missing.pth")


# ============================================================================ end to end

def test_tiny_end_to_end_run_on_omniglot_small_beats_chance(data_dir):
    """Pretrain Conv-4-64 briefly, cache features, meta-train SIB for 30 episodes: 5-way 1-shot test
    accuracy well above chance (0.2), and pretraining must have improved the backbone's NCM over its
    random initialisation on the same test episodes."""
    from fewshot.data import load_omniglot_small

    splits = load_omniglot_small(data_dir, rotations=False)
    tr = splits["train"]
    keep = tr.labels < 40   # meta-train on 40 of the 163 training characters (caching time)
    train40 = FewShotSplit("train40", tr.images[keep], tr.labels[keep], tr.class_names[:40],
                           mean=tr.mean.flatten().tolist(), std=tr.std.flatten().tolist())
    torch.manual_seed(0)
    bb = conv4_64()
    test_pix = EpisodeSampler(splits["test"], 5, 1, 15)
    test_eps_random = EpisodeSampler(cache_features(bb, splits["test"]), 5, 1, 15).episodes(60, seed=2)
    val_pix = EpisodeSampler(splits["val"], 5, 1, 5).episodes(10, seed=1)
    rec = pretrain(bb, tr, steps=80, batch_size=32, lr=0.1, warmup_steps=10, evaluate=ncm_validation(bb, val_pix),
                   eval_every=40)
    assert rec["diverged_at"] is None and set(rec["final"]) == {"val_acc", "val_acc_ci"}
    assert len(rec["eval"]["step"]) == 3
    test_f = cache_features(bb, splits["test"])
    torch.manual_seed(0)
    sib = SIB(5, bb.feature_dim)
    st = SIBStepper(sib)
    sampler = EpisodeSampler(cache_features(bb, train40), 5, 1, 15)
    rec = runs.train(st, lambda aux: sampler.episode(0, st.t), steps=30, progress=False)
    assert rec["diverged_at"] is None and all(math.isfinite(v) for v in rec["step_log"]["loss"])
    test_eps = EpisodeSampler(test_f, 5, 1, 15).episodes(60, seed=2)
    assert test_eps[5].classes == test_pix.episode(2, 5).classes
    acc, _ = mean_ci(evaluate(sib, test_eps))
    ncm, ci = mean_ci(evaluate_ncm(test_eps))
    ncm_random, ci_random = mean_ci(evaluate_ncm(test_eps_random))
    assert acc > 0.5 and ncm > 0.5, f"5-way 1-shot accuracy {acc:.3f} (NCM {ncm:.3f}); chance is 0.2"
    assert ncm > ncm_random + ci + ci_random, f"pretraining did not help: NCM {ncm:.3f} vs {ncm_random:.3f} at init"
