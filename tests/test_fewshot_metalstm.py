"""Meta-LSTM (Ravi & Larochelle 2017) and its baselines.

Truth tests: the update equals eq. 2 computed by hand from the weights (float64, both code paths);
the meta-gradient through the θ chain and c₀ equals float64 central finite differences on a tiny
learner; presets' initialisation ranges and the protocols of the two public codes; a save/load round
trip restores c₀; a short meta-training run on omniglot-small beats chance and the untrained
meta-learner; meta-training resumes bit-for-bit after a kill; the fine-tuning baseline equals a
hand-written torch.optim loop and is tuned on validation episodes only; pixel nearest neighbour
equals a hand-computed case.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import l2l_zoo
from l2l_zoo.base import OptState, reference_kernels
from l2l_zoo.meta import MetaTrainConfig, MetaTrainer
from l2l_zoo.regularizers import SmoothnessConfig

from fewshot.data import Episode, EpisodeSampler, FewShotSplit, mean_ci
from fewshot.finetune import (evaluate_pixel_nn, finetune_episode, pixel_nn_accuracy, pixel_nn_predict,
                              tune_finetune)
from fewshot.learners import EpisodeTask
from fewshot.metalstm import (BestOnValidation, MetaLSTM, build_metalstm, episode_family, evaluate, learner_fn,
                              meta_train, preset_config)

H = 20


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tests run many small kernels, for which a second intra-op thread is no faster and, on a
    loaded 2-core machine, up to 10x slower (measured); the previous setting is restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------- helpers
def synthetic_split(classes=10, per_class=20, size=16, seed=0, name="synthetic"):
    """Random uint8 images whose class shifts the mean brightness (so classes are learnable)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat_interleave(per_class)
    base = torch.randint(0, 256, (classes, 1, size, size), generator=g).float()
    noise = torch.randint(-60, 61, (classes * per_class, 1, size, size), generator=g).float()
    images = (base[labels] + noise).clamp(0, 255).to(torch.uint8)
    return FewShotSplit(name, images, labels, [f"c{i}" for i in range(classes)], mean=[0.5], std=[0.3])


class TinyConv(nn.Module):
    """conv3x3(2) - BatchNorm - ReLU - maxpool - Linear: a learner small enough for finite differences."""

    def __init__(self, ways=3, size=8):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.bn = nn.BatchNorm2d(2, eps=1e-3)
        self.fc = nn.Linear(2 * (size // 2) ** 2, ways)

    def forward(self, x):
        return self.fc(F.max_pool2d(F.relu(self.bn(self.conv(x))), 2).flatten(1))


def float64_episode(ways=3, shots=2, queries=2, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(ways, 1, size, size, generator=g, dtype=torch.float64)

    def draw(k):
        y = torch.arange(ways).repeat_interleave(k)
        return centres[y] + 0.7 * torch.randn(len(y), 1, size, size, generator=g, dtype=torch.float64), y
    sx, sy = draw(shots)
    qx, qy = draw(queries)
    return Episode(sx, sy, qx, qy, tuple(range(ways)))


def preprocess(x, p=10.0):
    """Andrychowicz et al.'s preprocessing, element by element in Python (the hand computation)."""
    out = []
    for v in x.tolist():
        out.append((math.log(abs(v)) / p, math.copysign(1.0, v) if v else 0.0) if abs(v) >= math.exp(-p)
                   else (-1.0, math.exp(p) * v))
    return torch.tensor(out, dtype=torch.float64)


def randomized(lopt, scale=0.3, seed=0):
    """Give every meta-parameter a generic value (so that each term of eq. 2 matters)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lopt.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return lopt


# ----------------------------------------------------------------------------- the network
def test_exact_meta_parameter_counts():
    assert l2l_zoo.create("metalstm").num_meta_parameters() == 2080 + 46
    lopt = l2l_zoo.create("metalstm", n_params=1234)
    assert sum(p.numel() for p in lopt.lstm.parameters()) == 4 * 80 + 20 * 80 + 2 * 80 == 2080
    assert sum(p.numel() for n, p in lopt.named_parameters() if not n.startswith(("lstm.", "c0"))) == 2 * (22 + 1)
    assert lopt.num_meta_parameters() == 2126 + 1234
    frozen = l2l_zoo.create("metalstm", n_params=1234, learn_init=False)
    assert frozen.num_meta_parameters() == 2126 and frozen.state_dict()["c0"].shape == (1234,)


@pytest.mark.parametrize("grad_mode", [True, False])
def test_update_equals_equation_2_computed_by_hand(grad_mode, monkeypatch):
    """θ_t = σ(f_t)⊙θ_{t−1} − σ(i_t)⊙∇_t with f_t = W_F·[h_t, θ_{t−1}, f_{t−1}] + b_F, i_t likewise,
    h_t from an nn.LSTMCell with the same weights over [preprocessed loss, preprocessed ∇_t]; ∇_t is
    the gradient divided by grad_divisor. float64, 1e-12; with and without autograd (the fast path)."""
    torch.manual_seed(0)
    lopt = randomized(MetaLSTM(grad_divisor=4.0).double())
    n = 300
    g = torch.Generator().manual_seed(1)
    grads = 1e-2 * torch.randn(n, generator=g, dtype=torch.float64)
    grads[:5] = 1e-6 * torch.randn(5, generator=g, dtype=torch.float64)  # the |∇| < e^-10 branch
    params = torch.randn(n, generator=g, dtype=torch.float64)
    loss = torch.tensor(0.7, dtype=torch.float64)
    h, c = (0.5 * torch.randn(n, H, generator=g, dtype=torch.float64) for _ in range(2))
    f_prev, i_prev = (torch.randn(n, generator=g, dtype=torch.float64) for _ in range(2))
    state = OptState(3, (), (h, c, f_prev, i_prev))
    calls = []
    fast = MetaLSTM._network_no_grad
    monkeypatch.setattr(MetaLSTM, "_network_no_grad", lambda self, *a: calls.append(1) or fast(self, *a))
    with torch.set_grad_enabled(grad_mode):
        upd, new = lopt.update(grads, state, params=params, loss=loss)
    assert len(calls) == (0 if grad_mode else 1), "the no-autograd path must be the fast one"

    grad = grads / 4.0
    x = torch.cat((preprocess(loss.reshape(1)).expand(n, 2), preprocess(grad)), 1)
    h1, c1 = lopt.lstm.cells[0](x, (h, c))
    wf, wi = lopt.weight_f[:, 0], lopt.weight_i[:, 0]
    f = h1 @ wf[:H] + wf[H] * params + wf[H + 1] * f_prev + lopt.bias_f
    i = h1 @ wi[:H] + wi[H] * params + wi[H + 1] * i_prev + lopt.bias_i
    theta_t = torch.sigmoid(f) * params - torch.sigmoid(i) * grad
    torch.testing.assert_close(params + upd, theta_t, rtol=1e-12, atol=1e-12)
    for got, want in zip(new.hidden, (h1, c1, f, i)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert new.step == 4 and new.stats == ()


def test_fast_path_equals_autograd_path_across_chunks():
    """float32, n = 20,000 (several CoordLSTM chunks and a ragged last one): the no-grad chunked path
    equals the autograd torch formulas (the same formulas) to 1e-7; the autograd path's native LSTM
    kernel (exact tanh where the torch formulas use 2σ(2x) − 1) agrees to float32 rounding."""
    torch.manual_seed(0)
    lopt = randomized(MetaLSTM())
    n = 20_000
    g = torch.Generator().manual_seed(2)
    grads, params = 1e-2 * torch.randn(n, generator=g), torch.randn(n, generator=g)
    st = lopt.init_state(n)
    st = OptState(1, (), tuple(t + 0.3 * torch.randn(t.shape, generator=g) for t in st.hidden))
    with reference_kernels():
        slow = lopt.update(grads, st, params=params, loss=torch.tensor(1.3))
    native = lopt.update(grads, st, params=params, loss=torch.tensor(1.3))
    with torch.no_grad():
        fast = lopt.update(grads, st, params=params, loss=torch.tensor(1.3))
    torch.testing.assert_close(fast[0], slow[0].detach(), rtol=1e-5, atol=1e-7)
    for a, b in zip(fast[1].hidden, slow[1].hidden):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(native[0].detach(), slow[0].detach(), rtol=1e-5, atol=1e-7)
    for a, b in zip(native[1].hidden, slow[1].hidden):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=5e-7)


def test_features_are_the_documented_input_state_and_bad_calls_raise():
    lopt = MetaLSTM(grad_divisor=2.0).double()
    grads = torch.tensor([0.2, -1e-7, 0.0], dtype=torch.float64)
    params = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    feats, stats = lopt.features(grads, lopt.init_state(3), params=params, loss=torch.tensor(2.5))
    expected = torch.cat((preprocess(torch.tensor([2.5])).expand(3, 2), preprocess(grads / 2), params[:, None],
                          (grads / 2)[:, None]), 1)
    torch.testing.assert_close(feats, expected, rtol=1e-12, atol=0)
    assert stats == ()
    with pytest.raises(ValueError, match="needs params="):
        lopt.features(grads, lopt.init_state(3), loss=torch.tensor(1.0))
    with pytest.raises(ValueError, match="needs loss="):
        lopt.features(grads, lopt.init_state(3), params=params)
    with pytest.raises(ValueError, match="params must have 3 coordinates"):
        lopt.features(grads, lopt.init_state(3), params=params[:2], loss=torch.tensor(1.0))
    for kw, msg in [({"preset": "lua"}, "preset must be one of"), ({"n_params": -1}, "n_params must be"),
                    ({"grad_divisor": 0.0}, "grad_divisor must be a finite number > 0, got 0.0")]:
        with pytest.raises(ValueError, match=msg):
            MetaLSTM(**kw)


def test_initial_params_is_c0_or_the_given_params():
    p = torch.randn(7)
    assert MetaLSTM().initial_params(p) is p
    lopt = MetaLSTM(n_params=7)
    flat = torch.arange(7.0)
    lopt.set_initial_params(flat)
    c0 = lopt.initial_params(p)
    assert torch.equal(c0, flat) and c0.requires_grad, "c0 must be the (trainable) meta-parameter"
    with pytest.raises(ValueError, match="params has 5 coordinates but this MetaLSTM's learned initialisation c0 "
                                         "has n_params=7"):
        lopt.initial_params(torch.zeros(5))
    with pytest.raises(ValueError, match="flat has 3 values, n_params is 7"):
        lopt.set_initial_params(torch.zeros(3))
    frozen = MetaLSTM(n_params=7, learn_init=False)
    frozen.set_initial_params(flat)
    assert not frozen.initial_params(p).requires_grad and "c0" not in dict(frozen.named_parameters())


def test_preset_initialisation_ranges():
    """official: every weight U(-0.01, 0.01) (b_hh = 0: the Lua LSTM's single bias is b_ih),
    b_F ~ U(4, 5), b_I ~ U(-5, -4); markdtw: PyTorch's LSTMCell init (U(±1/√20)), b_F ~ U(4, 6)."""
    bf = {"official": [], "markdtw": []}
    for seed in range(40):
        for preset in bf:
            torch.manual_seed(seed)
            lopt = MetaLSTM(preset=preset, n_params=50)
            cell = lopt.lstm.cells[0]
            layer1 = torch.cat([cell.weight_ih.flatten(), cell.weight_hh.flatten(), cell.bias_ih, cell.bias_hh])
            if preset == "official":
                assert layer1.abs().max() <= 0.01 and torch.equal(cell.bias_hh, torch.zeros(80))
                assert 4.0 <= float(lopt.bias_f) <= 5.0
            else:
                assert layer1.abs().max() <= 1 / math.sqrt(20) and layer1.abs().max() > 0.1
                assert 4.0 <= float(lopt.bias_f) <= 6.0
            assert -5.0 <= float(lopt.bias_i) <= -4.0
            for w in (lopt.weight_f, lopt.weight_i, lopt.c0):
                assert w.abs().max() <= 0.01
            bf[preset].append(float(lopt.bias_f))
    assert max(bf["markdtw"]) > 5.0, "markdtw's b_F is drawn from U(4, 6)"


def test_registry_round_trip_restores_c0(tmp_path):
    torch.manual_seed(3)
    for learn_init in (True, False):
        lopt = l2l_zoo.create("metalstm", n_params=30, preset="markdtw", grad_divisor=5.0, learn_init=learn_init)
        lopt.set_initial_params(torch.randn(30))
        l2l_zoo.save(lopt, tmp_path / "m.pt", note="c0")
        back = l2l_zoo.load(tmp_path / "m.pt")
        assert type(back) is MetaLSTM and back.config == lopt.config
        assert torch.equal(back.initial_params(torch.zeros(30)), lopt.initial_params(torch.zeros(30)))
        assert back.initial_params(torch.zeros(30)).requires_grad == learn_init
        g, p = 1e-2 * torch.randn(30), torch.randn(30)
        kw = dict(params=p, loss=torch.tensor(1.0))
        assert torch.equal(lopt.update(g, lopt.init_state(30), **kw)[0], back.update(g, back.init_state(30), **kw)[0])


# ----------------------------------------------------------------------------- protocol presets
def test_preset_configs_are_the_public_codes_protocols():
    o5, o1, m5 = preset_config("official", 5), preset_config("official", 1), preset_config("markdtw", 5)
    assert (o5.inner_steps, o5.batch_size, o5.bn_momentum, o5.episodes) == (8, 25, 0.95, 50_000)
    assert (o1.inner_steps, o1.batch_size, o1.bn_momentum, o1.episodes) == (12, 5, 0.9, 75_000)
    for c in (o5, o1, m5):
        assert (c.ways, c.queries, c.meta_lr, c.meta_clip_norm, c.first_order, c.double_division) == \
            (5, 15, 1e-3, 0.25, True, False)
        assert (c.bn_mode, c.eval_bn_mode, c.val_episodes, c.val_every, c.test_episodes) == \
            ("transductive", "running", 100, 1000, 600)
    assert m5.replace(preset="official") == o5
    with pytest.raises(ValueError, match="markdtw port ships only a 5-shot configuration, got shots=1"):
        preset_config("markdtw", 1)
    with pytest.raises(ValueError, match="official code ships 1-shot and 5-shot configurations, got shots=3"):
        preset_config("official", 3)
    for kw, msg in [({"inner_steps": 0}, "inner_steps must be an integer >= 1, got 0"),
                    ({"bn_mode": "batch"}, "bn_mode must be one of"),
                    ({"inner_batch_size": 26}, r"inner_batch_size must be None .* 1..25"),
                    ({"meta_clip_norm": -1.0}, "meta_clip_norm must be")]:
        with pytest.raises(ValueError, match=msg):
            preset_config("official", 5, **kw)


def test_meta_train_runs_the_configured_protocol():
    """One episode per meta-step, T inner updates of the whole support set, the query loss as the
    meta-loss, Adam at meta_lr, norm clip; double division sets grad_divisor to the batch size; c0
    starts at the learner's init_seed initialisation."""
    cfg = preset_config("official", 1, filters=4, inner_steps=3, double_division=True, init_seed=5)
    tr = meta_train(cfg, {"train": synthetic_split()}, episodes=2, seed=0, progress=False)
    c = tr.cfg
    assert (c.meta_steps, c.horizon, c.unroll, c.meta_loss, c.meta_lr, c.meta_clip_norm, c.second_order) == \
        (2, 3, 3, "outer", 1e-3, 0.25, False)
    assert tr.runs_started == 2 and [r["run_step"] for r in tr.history] == [3, 3]
    assert tr.lopt.config["grad_divisor"] == 5.0 and tr.lopt.config["preset"] == "official"
    assert all(r["outer_loss"] == r["meta_loss"] for r in tr.history)
    fresh = build_metalstm(cfg, tr.family.template, seed=0)
    tmpl = tr.family.template
    assert torch.equal(fresh.c0, tmpl.flatten(tmpl.init_params(5)))
    assert not torch.equal(fresh.c0, tr.lopt.c0), "c0 was not meta-trained"
    # a checkpoint's identity: the budget may change on resume, the learner may not
    sampler = EpisodeSampler(synthetic_split(), 5, 1, 15)
    name = episode_family(cfg, sampler).name
    assert episode_family(cfg.replace(episodes=10, val_every=3), sampler).name == name
    assert episode_family(cfg.replace(bn_momentum=0.5), sampler).name != name


def test_best_on_validation_keeps_the_best_meta_parameters_without_disturbing_training():
    cfg = preset_config("official", 1, filters=4, inner_steps=2, meta_lr=2e-2)
    split = {"train": synthetic_split(), "val": synthetic_split(seed=1, name="val")}
    plain = meta_train(cfg, split, episodes=4, seed=0, progress=False)
    torch.manual_seed(0)
    lopt = build_metalstm(cfg, episode_family(cfg, EpisodeSampler(split["train"], 5, 1, 15)).template, seed=0)
    sel = BestOnValidation(lopt, cfg, split["val"], episodes=3, seed=5, every=2)
    tr = meta_train(cfg, split, episodes=4, seed=0, progress=False, callback=sel, lopt=lopt)
    assert [r["meta_loss"] for r in tr.history] == [r["meta_loss"] for r in plain.history]
    assert [e["meta_step"] for e in sel.curve] == [2, 4]
    assert sel.best["val_acc"] == max(e["val_acc"] for e in sel.curve)
    again = MetaLSTM(**lopt.config)
    again.load_state_dict(sel.best_state)
    val = EpisodeSampler(split["val"], 5, 1, 15)
    assert mean_ci(evaluate(again, cfg, val, 3, seed=5))[0] == sel.best["val_acc"]
    with pytest.raises(ValueError, match="every must be an integer >= 1, got 0"):
        BestOnValidation(lopt, cfg, val, episodes=3, seed=5, every=0)


# ----------------------------------------------------------------------------- meta-gradient
def _fd_setup(second_order, theta=None):
    torch.manual_seed(0)
    task = EpisodeTask(float64_episode(), lambda: TinyConv().double(), bn_mode="transductive")
    lopt = MetaLSTM(n_params=task.num_params).double()
    lopt.set_initial_params(task.flatten(task.init_params(0)))
    with torch.no_grad():
        # The trainer feeds the loss to layer 1 detached (it is data, as in both codes). With the loss
        # columns of W_ih at zero the loss input's dependence on φ contributes w·dℓ/dφ = 0, so the
        # autograd meta-gradient is the exact total derivative there (FD directions move them too).
        lopt.lstm.cells[0].weight_ih[:, :2] = 0.0
        lopt.bias_i.fill_(-1.5)  # a rate large enough that the trajectory depends visibly on every part
    if theta is not None:
        torch.nn.utils.vector_to_parameters(theta, lopt.parameters())
    cfg = MetaTrainConfig(horizon=3, unroll=3, meta_loss="outer", second_order=second_order, seed=0)
    ml, grads = MetaTrainer(lopt, task, cfg, log=lambda s: None).meta_gradient()
    return ml, torch.cat([g.reshape(-1) for g in grads]), lopt


def test_meta_gradient_matches_float64_finite_differences():
    """Second-order (exact total derivative) meta-gradient of the query loss after 3 Meta-LSTM updates
    of a conv+BN learner from c0, vs central differences along random directions (h = 1e-6)."""
    ml, g, lopt = _fd_setup(second_order=True)
    names = [n for n, _ in lopt.named_parameters()]
    sizes = [p.numel() for p in lopt.parameters()]
    parts = dict(zip(names, g.split(sizes)))
    assert parts["c0"].abs().sum() > 0 and parts["weight_f"][H] != 0, "no gradient through c0 / the θ chain"
    theta = torch.nn.utils.parameters_to_vector(lopt.parameters()).detach()
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        v = torch.randn(theta.shape, generator=gen, dtype=torch.float64)
        v /= v.norm()
        h = 1e-6
        fd = (_fd_setup(True, theta + h * v)[0] - _fd_setup(True, theta - h * v)[0]) / (2 * h)
        an = torch.dot(g, v)
        assert abs(fd - an) <= 1e-6 * max(1.0, abs(float(an))), f"FD {float(fd):.10g} vs autograd {float(an):.10g}"


def test_first_order_meta_gradient_differs_from_exact():
    """The configured first-order meta-gradient (learner gradients detached) is an approximation:
    same meta-loss value, a different gradient."""
    ml1, g1, _ = _fd_setup(second_order=False)
    ml2, g2, _ = _fd_setup(second_order=True)
    torch.testing.assert_close(ml1, ml2, rtol=1e-12, atol=0)
    assert (g1 - g2).norm() / g2.norm() > 1e-3  # identical code paths would agree to ~1e-15


# ----------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def omniglot_small(data_dir):
    from fewshot.data import load_omniglot_small
    return load_omniglot_small(data_dir)


def test_short_meta_training_on_omniglot_small_beats_chance_and_the_untrained_meta_learner(omniglot_small):
    """5-way 1-shot, the official 1-shot protocol with an 8-filter Conv-4 and a 20x meta learning rate
    (20 meta-steps): test accuracy on 20 fixed test episodes > 45 % (chance 20 %) and > 15 points
    above the same Meta-LSTM before meta-training (measured with seeds 0-2: 57-59 % vs 30 %)."""
    cfg = preset_config("official", 1, filters=8, meta_lr=2e-2)
    test = EpisodeSampler(omniglot_small["test"], 5, 1, 15)
    tr = meta_train(cfg, omniglot_small, episodes=20, seed=0, progress=False)
    untrained = build_metalstm(cfg, tr.family.template, seed=0)
    acc, _ = mean_ci(evaluate(tr.lopt, cfg, test, 20, seed=123))
    acc0, _ = mean_ci(evaluate(untrained, cfg, test, 20, seed=123))
    assert acc > 0.45 and acc > acc0 + 0.15, (acc, acc0)


def test_meta_training_resumes_bit_for_bit_after_a_kill(tmp_path):
    """Smoothed Meta-LSTM (the PGD noise has its own generator), checkpoint every 2 meta-steps, killed
    after meta-step 3: the resumed run redoes step 3 and ends identical to an uninterrupted one."""
    cfg = preset_config("official", 1, filters=4, inner_steps=2)
    split = {"train": synthetic_split()}
    smooth = SmoothnessConfig(eps=0.1, steps=2, subsample=64)
    common = dict(smooth=smooth, episodes=5, seed=1, checkpoint_every=2, progress=False, log=lambda s: None)
    ref = meta_train(cfg, split, checkpoint_path=tmp_path / "ref.pt", **common)

    def kill(step, rec):
        if step == 3:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        meta_train(cfg, split, checkpoint_path=tmp_path / "b.pt", callback=kill, **common)
    back = meta_train(cfg, split, checkpoint_path=tmp_path / "b.pt", resume=True, **common)
    assert [r["meta_loss"] for r in back.history] == [r["meta_loss"] for r in ref.history]
    assert all(r["penalty"] > 0 for r in ref.history)
    for (n, p), q in zip(ref.lopt.named_parameters(), back.lopt.parameters()):
        assert torch.equal(p, q), n


# ----------------------------------------------------------------------------- baselines
def test_finetune_equals_a_hand_written_sgd_loop():
    """The baseline is torch.optim.SGD (momentum 0.9) on the whole support set from the given flat
    initialisation, the query classified with the running BatchNorm statistics."""
    cfg = preset_config("official", 5, filters=4)
    sampler = EpisodeSampler(synthetic_split(), 5, 5, 15)
    ep = sampler.episode(0, 0)
    model_fn = learner_fn(cfg, (1, 16, 16))
    task = EpisodeTask(ep, model_fn)
    init = task.flatten(task.init_params(3))
    rec = finetune_episode(ep, model_fn, init, lr=0.1, steps=7, momentum=0.9)

    torch.manual_seed(123)  # the baseline must not depend on the global generator
    model = model_fn()
    torch.nn.utils.vector_to_parameters(init, model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    for _ in range(7):
        opt.zero_grad()
        F.cross_entropy(model(ep.support_x), ep.support_y).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        out = model(ep.query_x)
    assert rec["final"]["query_acc"] == pytest.approx(float((out.argmax(1) == ep.query_y).float().mean()), abs=1e-12)
    assert rec["final"]["query_loss"] == pytest.approx(float(F.cross_entropy(out, ep.query_y)), rel=1e-5)
    assert rec["eval"]["step"] == [0, 7] and rec["diverged_at"] is None


def test_finetune_is_tuned_on_validation_episodes_only():
    """tune_finetune's scores are the mean query accuracies over the *validation* episodes it was
    given (recomputed here run by run), its choice is their argmax, and a diverging rate is never
    chosen."""
    cfg = preset_config("official", 1, filters=4)
    model_fn = learner_fn(cfg, (1, 16, 16))
    val = EpisodeSampler(synthetic_split(seed=1, name="val"), 5, 1, 15)
    res = tune_finetune(val, model_fn, 0, lrs=[1e20, 0.5, 0.01], steps=[2, 4], n_episodes=3, seed=7)
    assert res.criterion == "val_acc" and res.mode == "max" and len(res.grid) == 6
    eps = val.episodes(3, 7)
    expected = {}
    for lr in (0.5, 0.01):
        for s in (2, 4):
            accs = [finetune_episode(ep, model_fn, 0, lr=lr, steps=s, seed=k)["final"]["query_acc"]
                    for k, ep in enumerate(eps)]
            expected[(lr, s)] = mean_ci(accs)[0]
            assert res.scores[str((lr, s))] == pytest.approx(expected[(lr, s)], abs=1e-12)
    assert res.scores[str((1e20, 2))] is None and res.scores[str((1e20, 4))] is None, "lr 1e20 diverges"
    assert res.best == max(expected, key=expected.get)


def test_pixel_nearest_neighbour_on_a_hand_computed_episode():
    # support: class 0 = {[0,0,0,0], [4,4,4,4]}, class 1 = {[1,1,0,0]} ; images 1x2x2
    sx = torch.tensor([[0., 0, 0, 0], [4, 4, 4, 4], [1, 1, 0, 0]]).view(3, 1, 2, 2)
    sy = torch.tensor([0, 0, 1])
    qx = torch.tensor([[3., 3, 3, 3],     # nearest [4,4,4,4] (d²=4) -> 0
                       [1, 0, 0, 0],      # [0,0,0,0] d²=1, [1,1,0,0] d²=1: tie -> first -> 0
                       [1, 2, 0, 0],      # [1,1,0,0] d²=1 -> 1
                       [2, 2, 4, 4]]).view(4, 1, 2, 2)  # [4,4,4,4] d²=8, [1,1,0,0] d²=34 -> 0
    qy = torch.tensor([0, 1, 1, 1])
    ep = Episode(sx, sy, qx, qy, (0, 1))
    assert pixel_nn_predict(ep).tolist() == [0, 0, 1, 0]
    assert pixel_nn_accuracy(ep) == 0.5
    # cosine: [2,2,4,4] is closer in angle to [4,4,4,4] (0.949) than to [1,1,0,0] (0.316) -> 0;
    # [1,2,0,0] -> [1,1,0,0] (0.949 vs 0.671) -> 1; [0,0,0,0] has no direction (similarity 0)
    assert pixel_nn_predict(ep, "cosine").tolist()[2:] == [1, 0]
    assert evaluate_pixel_nn([ep, ep]) == [0.5, 0.5]
    with pytest.raises(ValueError, match="metric must be 'l2' or 'cosine', got 'l1'"):
        pixel_nn_predict(ep, "l1")


def test_a_meta_batch_of_episodes_is_the_mean_of_their_meta_gradients():
    """meta_batch=3 episodes per meta-step (looped: the learner has BatchNorm): the meta-loss and
    meta-gradient equal the mean over the same three episodes run one at a time on the plain path,
    each with its instance's generators; the episodes differ; a run with it trains."""
    import copy
    cfg = preset_config("official", 1, filters=4, inner_steps=2)
    smooth = SmoothnessConfig(eps=0.1, steps=2, subsample=64)
    tr = meta_train(cfg, {"train": synthetic_split()}, smooth=smooth, episodes=2, seed=0, progress=False,
                    meta_batch=3)
    assert tr.loop and tr.cfg.meta_batch == 3 and tr.runs_started == 6 and len(tr.history) == 2
    batch = tr._new_batch()
    assert len({tuple(r.task.episode.classes) for r in batch}) == 3, "each instance needs its own episode"
    saved = {k: g.get_state() for k, g in tr.gens.items()}
    runs = [copy.copy(r) for r in batch]
    ml, grads = tr.meta_gradient(batch)
    params = list(tr.lopt.parameters())
    mls, seq = [], []
    for b, r in enumerate(runs):
        tr.gens["data"].set_state(saved[f"data/{b}"])
        tr.gens["reg"].set_state(saved[f"reg/{b}"])
        m, *_ = tr._truncation(r, tr.cfg.unroll)
        g = torch.autograd.grad(m, params, allow_unused=True)
        mls.append(m.detach())
        seq.append(torch.cat([(torch.zeros_like(p) if x is None else x).reshape(-1) for x, p in zip(g, params)]))
    torch.testing.assert_close(ml, torch.stack(mls).mean(), rtol=1e-6, atol=0)
    ref = torch.stack(seq).mean(0)
    got = torch.cat([x.reshape(-1) for x in grads])
    assert float((got - ref).norm() / ref.norm()) < 1e-5
    assert float((seq[0] - seq[1]).norm()) > 1e-3 * float(ref.norm())


# ----------------------------------------------------------------------------- BatchNorm and failures
def test_batchnorm_starts_fresh_every_episode_and_bn_mode_picks_the_query_statistics():
    """The learner's BatchNorm running statistics start fresh at every adaptation (running the same
    episode twice on one task gives identical parameters and statistics; they moved from the fresh
    ones), and bn_mode decides what the query sees: ``running`` the statistics accumulated over the
    inner loop (meta-test), ``transductive`` the query batch's own (the official meta-training);
    both checked against a hand-run forward pass."""
    from l2l_zoo.meta.trainer import adapt
    cfg = preset_config("official", 1, filters=4, inner_steps=3)
    sampler = EpisodeSampler(synthetic_split(), 5, 1, 15)
    model_fn = learner_fn(cfg, (1, 16, 16))
    ep = sampler.episode(7, 0)
    lopt = build_metalstm(cfg, EpisodeTask(sampler.episode(0, 0), model_fn))
    out = {}
    for mode in ("running", "transductive"):
        task = EpisodeTask(ep, model_fn, bn_mode=mode)
        p1, _ = adapt(lopt, task, cfg.inner_steps, gen=torch.Generator().manual_seed(0), init_seed=cfg.init_seed)
        stats = {k: v.clone() for k, v in task.model.named_buffers()}
        p2, _ = adapt(lopt, task, cfg.inner_steps, gen=torch.Generator().manual_seed(0), init_seed=cfg.init_seed)
        assert torch.equal(p1, p2)
        for k, v in task.model.named_buffers():
            assert torch.equal(v, stats[k]), f"{k} carried over from the previous adaptation"
        fresh = dict(model_fn().named_buffers())
        assert not torch.equal(stats["features.1.running_mean"], fresh["features.1.running_mean"])
        hand = model_fn()
        torch.nn.utils.vector_to_parameters(p1, hand.parameters())
        hand.load_state_dict({**hand.state_dict(), **stats})
        hand.train(mode == "transductive")
        with torch.no_grad():
            want = float(F.cross_entropy(hand(ep.query_x), ep.query_y))
        out[mode] = task.query_accuracy(p1)[0]
        assert out[mode] == pytest.approx(want, rel=1e-6), mode
    assert out["running"] != pytest.approx(out["transductive"], rel=1e-3)


class _PoisonedSampler(EpisodeSampler):
    """Draws as EpisodeSampler, but the episodes of the listed draws get a NaN query pixel."""

    def __init__(self, *args, bad=(), **kw):
        super().__init__(*args, **kw)
        self.bad, self.calls = set(bad), 0

    def sample(self, gen):
        ep = super().sample(gen)
        self.calls += 1
        if self.calls in self.bad:
            qx = ep.query_x.clone()
            qx[0, 0, 0, 0] = float("nan")
            ep = Episode(ep.support_x, ep.support_y, qx, ep.query_y, ep.classes)
        return ep


def test_a_non_finite_episode_is_skipped_and_repeated_ones_abort_meta_training():
    """A NaN in one episode's query set makes its meta-loss non-finite: that meta-update is skipped
    (the last good meta-parameters and Adam state are restored), counted, and meta-training goes on
    with the next episode; max_failures consecutive ones abort it with a one-line reason (the core
    trainer's rule, through the few-shot task family)."""
    from l2l_zoo.meta import MetaTrainingDiverged
    cfg = preset_config("official", 1, filters=4, inner_steps=2)
    split = synthetic_split()
    before = {}

    def keep(step, rec):
        before[step] = {k: v.clone() for k, v in tr_lopt.state_dict().items()}
    tr_lopt = build_metalstm(cfg, episode_family(cfg, EpisodeSampler(split, 5, 1, 15)).template, 0)
    start = {k: v.clone() for k, v in tr_lopt.state_dict().items()}
    sampler = _PoisonedSampler(split, 5, 1, 15, bad={2})  # the episode of meta-step 2's first attempt
    logs = []
    tr = meta_train(cfg, sampler, episodes=3, seed=0, progress=False, log=logs.append, callback=keep, lopt=tr_lopt)
    assert tr.total_failures == 1 and sampler.calls == 4 and len(tr.history) == 3
    assert all(math.isfinite(r["meta_loss"]) for r in tr.history)
    assert any("non-finite meta-loss" in line and "skipped" in line for line in logs)
    assert any(not torch.equal(before[3][k], start[k]) for k in start), "meta-training did not go on"
    assert all(torch.isfinite(v).all() for v in tr.lopt.state_dict().values())
    with pytest.raises(MetaTrainingDiverged, match="5 consecutive non-finite meta-updates"):
        meta_train(cfg, _PoisonedSampler(split, 5, 1, 15, bad=range(2, 100)), episodes=10, seed=0, progress=False,
                   log=lambda s: None)
