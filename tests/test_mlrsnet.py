"""MLR-SNet (Shu et al. 2022): exact size, γ, the authors' checkpoints in both gate layouts, state
carrying against a slow reference, the LearnedOptimizer contract (registry, adapter, smoothness),
equivalence of its update with torch.optim, the functional virtual step against real torch.optim
steps (float64, 1e-10) and its meta-gradient against float64 finite differences, Algorithm 1 end to
end on real MNIST, resume, NaN handling, the Algorithm 2 controller (protocol, switching) and the
hand-designed baselines' presets."""
import copy
import math
import os

import pytest
import torch
import torch.nn.functional as F

import l2l_zoo
from l2l_zoo import MLRSNet, runs
from l2l_zoo.meta.mlrsnet import (MetaUpdateFailed, MLRSNetMetaTrainer, MLRSNetTrainConfig, meta_gradient,
                                  select_snapshots, virtual_step_loss)
from l2l_zoo.optimizers.mlrsnet import mlrsnet_gamma
from l2l_zoo.regularizers import SmoothnessRegularizer
from l2l_zoo.schedules import LRController, ScheduleDiverged
from l2l_zoo.schedules.baselines import PRESETS, baseline_lrs, make_baseline
from l2l_zoo.schedules.mlrsnet import MLRSNetController
from l2l_zoo.tasks import MLP
from conftest import killed_at


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tests run many tiny ops: one thread is faster and robust to a shared, busy CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def official_dir():
    d = os.environ.get("L2L_ZOO_DATA")
    p = os.path.join(d, "mlr_snet_official") if d else None
    if p is None or not os.path.isfile(os.path.join(p, "mlr_snet_1.pth")):
        pytest.skip("official MLR-SNet checkpoints not available: set L2L_ZOO_DATA to a folder with "
                    "mlr_snet_official/mlr_snet_{1,100,200}.pth (CI: ../shared/data)")
    return p


# ----------------------------------------------------------------------------- size and γ

def test_exact_meta_parameter_count():
    # fc_i2h 1·25+25 + 25·200+200, fc_h2h 50·25+25 + 25·200+200, layer3 50+1
    assert MLRSNet().num_meta_parameters() == 50 + 5200 + 1275 + 5200 + 51 == 11776
    assert l2l_zoo.create("mlrsnet", hidden_size=20, mlp_size=10).num_meta_parameters() == \
        (10 + 10) + (10 * 80 + 80) + (20 * 10 + 10) + (10 * 80 + 80) + 21


def test_gamma_values_limits_and_language_model_conversion():
    # ln 10 = 2.302585: √L0 = 1.517427, ln(L0·C) = ln 23.02585 = 3.136616, C^¼ = 1.778279
    assert mlrsnet_gamma(math.log(10), 10) == pytest.approx(0.669128, abs=1e-6)
    # L0·C < 1 makes the logarithm negative: the absolute value (authors' meta-test code) keeps γ > 0;
    # L0 = 0.05, C = 10: √0.05 = 0.223607, |ln 0.5| = 0.693147 -> 0.223607·0.693147/1.778279/4
    assert mlrsnet_gamma(0.05, 10) == pytest.approx(0.0217897, abs=1e-7)
    assert mlrsnet_gamma(0.1, 10) == 0.0  # L0·C = 1: ln 1 = 0
    assert mlrsnet_gamma(1e-12, 10) < 1e-5 and mlrsnet_gamma(1e4, 10) > 10  # γ -> 0 and grows with L0
    # language models: γ from the perplexity exp(loss) and C = vocabulary size
    lm = MLRSNet(objective="language_model", num_classes=10000)
    # perplexity 150: √150 = 12.247449, ln(1.5e6) = 14.220976, 10000^¼ = 10
    assert lm.gamma_for(math.log(150.0)) == pytest.approx(12.247449 * 14.220976 / 10 / 4, rel=1e-6)
    assert lm.loss_input(math.log(10000.0)).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="L0 must be a finite loss > 0, got -1.0"):
        mlrsnet_gamma(-1.0, 10)
    with pytest.raises(ValueError, match="num_classes must be an integer >= 2, got 1"):
        mlrsnet_gamma(1.0, 1)
    with pytest.raises(ValueError, match="needs num_classes"):
        MLRSNet().gamma_for(2.3)
    with pytest.raises(ValueError, match="layout must be one of .*got 'metatest'"):
        MLRSNet(layout="metatest")
    with pytest.raises(ValueError, match="language_model' needs num_classes"):
        MLRSNet(objective="language_model")


# ----------------------------------------------------------------------------- official checkpoints

def reference_trace(sd, losses, layout):
    """Slow float64 step-by-step LSTM from the raw state dict, gates written out one by one."""
    W = {k: v.double() for k, v in sd.items()}
    H = W["layer3.weight"].shape[1]
    h, c = torch.zeros(H, dtype=torch.float64), torch.zeros(H, dtype=torch.float64)
    out = []
    for x in losses:
        a = W["layer1.fc_i2h.2.weight"] @ torch.relu(W["layer1.fc_i2h.0.weight"][:, 0] * x
                                                     + W["layer1.fc_i2h.0.bias"]) + W["layer1.fc_i2h.2.bias"]
        b = W["layer1.fc_h2h.2.weight"] @ torch.relu(W["layer1.fc_h2h.0.weight"] @ h + W["layer1.fc_h2h.0.bias"]) \
            + W["layer1.fc_h2h.2.bias"]
        z = [(a + b)[k * H:(k + 1) * H] for k in range(4)]
        if layout == "meta-test":  # i, f, c~, o
            i, f, g, o = torch.sigmoid(z[0]), torch.sigmoid(z[1]), torch.tanh(z[2]), torch.sigmoid(z[3])
        else:  # i, f (bias -1), o, c~
            i, f, o, g = torch.sigmoid(z[0]), torch.sigmoid(z[1] - 1), torch.sigmoid(z[2]), torch.tanh(z[3])
        c = f * c + i * g
        h = o * torch.tanh(c)
        out.append(torch.sigmoid(W["layer3.weight"][0] @ h + W["layer3.bias"][0]))
    return torch.stack(out)


LOSSES = [2.3, 2.1, 1.7, 1.2, 0.9, 0.6, 0.4, 0.3, 0.2, 0.1]


@pytest.mark.parametrize("layout", ["meta-test", "meta-train"])
def test_official_checkpoints_load_and_differ(layout):
    d = official_dir()
    traces = []
    for epoch in (1, 100, 200):
        path = os.path.join(d, f"mlr_snet_{epoch}.pth")
        net = MLRSNet.from_official_checkpoint(path, layout=layout)
        assert net.config["layout"] == layout and net.num_meta_parameters() == 11776
        with torch.no_grad():
            p = net.trace(LOSSES)
        assert p.shape == (len(LOSSES),) and torch.isfinite(p).all() and ((p > 0) & (p < 1)).all()
        sd = torch.load(path, map_location="cpu", weights_only=True)
        torch.testing.assert_close(p.double(), reference_trace(sd, LOSSES, layout), rtol=1e-5, atol=1e-6)
        traces.append(p)
    for a, b in ((0, 1), (0, 2), (1, 2)):
        assert (traces[a] - traces[b]).abs().max() > 1e-3, f"nets {a} and {b} give the same outputs"


def test_layouts_give_different_outputs_and_bad_files_are_rejected(tmp_path):
    d = official_dir()
    path = os.path.join(d, "mlr_snet_200.pth")
    with torch.no_grad():
        a = MLRSNet.from_official_checkpoint(path, layout="meta-test").trace(LOSSES)
        b = MLRSNet.from_official_checkpoint(path, layout="meta-train").trace(LOSSES)
    assert (a - b).abs().max() > 1e-2
    sd = torch.load(path, map_location="cpu", weights_only=True)
    del sd["layer3.bias"]
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"missing keys \['layer3.bias'\]"):
        MLRSNet.from_official_checkpoint(tmp_path / "bad.pth")


def test_trace_carries_the_lstm_state():
    torch.manual_seed(0)
    for layout in ("meta-test", "meta-train"):
        net = MLRSNet(layout=layout, init="official")
        with torch.no_grad():
            p = net.trace(LOSSES)
            fresh = torch.cat([net.trace([x]) for x in LOSSES])
        torch.testing.assert_close(p.double(), reference_trace(net.state_dict(), LOSSES, layout),
                                   rtol=1e-5, atol=1e-6)
        assert torch.equal(p[:1], fresh[:1]) and (p[1:] - fresh[1:]).abs().max() > 1e-4


# ----------------------------------------------------------------------------- the contract

def test_registry_save_load_roundtrip(tmp_path):
    torch.manual_seed(1)
    lopt = l2l_zoo.create("mlrsnet", base="adam", betas=(0.8, 0.99), weight_decay=1e-4,
                          objective="language_model", num_classes=1000, gamma=2.5, layout="meta-test")
    l2l_zoo.save(lopt, tmp_path / "m.pt")
    back = l2l_zoo.load(tmp_path / "m.pt")
    assert isinstance(back, MLRSNet) and back.config == lopt.config
    g, p = torch.randn(30), torch.randn(30)
    s1, s2 = lopt.init_state(30), back.init_state(30)
    for _ in range(3):
        u1, s1 = lopt.update(g, s1, params=p, loss=torch.tensor(5.0))
        u2, s2 = back.update(g, s2, params=p, loss=torch.tensor(5.0))
        assert torch.equal(u1, u2)


def test_contract_shapes_purity_and_gamma_from_first_loss():
    torch.manual_seed(0)
    net = MLRSNet(num_classes=10, momentum=0.9)
    state = net.init_state(12)
    assert torch.isnan(state.hidden[2]).all()
    g = torch.randn(12)
    feats, stats = net.features(g, state, loss=torch.tensor(2.3))
    assert feats.shape == (1, 1) and stats[0].shape == (12,)
    lr, hidden = net.network(feats, state.hidden[:2] + (torch.ones(1),))
    assert lr.shape == (1,) and 0 < lr.item() < 1
    u, new = net.update(g, state, loss=torch.tensor(2.3))
    assert u.shape == (12,) and new.step == 1 and torch.isnan(state.hidden[2]).all()  # state not mutated
    assert new.hidden[2].item() == pytest.approx(mlrsnet_gamma(2.3, 10), rel=1e-6)
    with pytest.raises(ValueError, match="needs the minibatch loss"):
        net.update(g, state)


@pytest.mark.parametrize("base,options,torch_cls,torch_opts", [
    ("sgd", {}, torch.optim.SGD, {}),
    ("sgd", {"momentum": 0.9, "weight_decay": 1e-3}, torch.optim.SGD, {"momentum": 0.9, "weight_decay": 1e-3}),
    ("sgd", {"momentum": 0.9, "nesterov": True}, torch.optim.SGD, {"momentum": 0.9, "nesterov": True}),
    ("adam", {"betas": (0.8, 0.99), "weight_decay": 1e-3}, torch.optim.Adam,
     {"betas": (0.8, 0.99), "weight_decay": 1e-3}),
])
def test_adapter_update_equals_torch_optim_with_mlrsnet_rate(base, options, torch_cls, torch_opts):
    """Truth test: the adapter (pure update) = torch.optim with lr set to MLR-SNet's rate each step."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, generator=gen, dtype=torch.float64)
    y = (x[:, 0] - x[:, 2] > 0).long()
    torch.manual_seed(0)
    m1 = MLP(6, (8,), 2).double()
    m2 = copy.deepcopy(m1)
    net = MLRSNet(base=base, gamma=0.5, **options).double()
    ada = l2l_zoo.LearnedOptimizerAdapter(m1.parameters(), net)
    ref = torch_cls(m2.parameters(), lr=1.0, **torch_opts)
    ctl = MLRSNetController(ref, net, gamma=0.5)
    for step in range(5):
        i = torch.randint(0, 64, (16,), generator=gen)
        ada.zero_grad()
        loss1 = F.cross_entropy(m1(x[i]), y[i])
        loss1.backward()
        ada.step(loss=loss1)
        loss2 = F.cross_entropy(m2(x[i]), y[i])
        assert ctl.step(loss2) == loss2.item()  # backward, rate from this loss, ref.step()
        assert ctl.last["lr"] == ctl.lr == ref.param_groups[0]["lr"]
        assert loss1.item() == pytest.approx(loss2.item(), rel=1e-9, abs=1e-12)
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


def test_adapter_drives_a_model_on_real_data(mnist_small):
    torch.manual_seed(0)
    model = MLP(784, (32,), 10)
    opt = l2l_zoo.LearnedOptimizerAdapter(model.parameters(), MLRSNet(num_classes=10))
    gen = torch.Generator().manual_seed(0)
    x, y = mnist_small.x_train, mnist_small.y_train
    with torch.no_grad():
        before = F.cross_entropy(model(mnist_small.x_val), mnist_small.y_val).item()
    for _ in range(100):
        i = torch.randint(0, len(y), (64,), generator=gen)

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(x[i]), y[i])
            loss.backward()
            return loss
        opt.step(closure)
    with torch.no_grad():
        after = F.cross_entropy(model(mnist_small.x_val), mnist_small.y_val).item()
    assert after < 0.5 * before, f"validation loss {before:.3f} -> {after:.3f}"
    sd = opt.state_dict()  # hidden state (h, c, γ) round-trips through the adapter's state dict
    opt2 = l2l_zoo.LearnedOptimizerAdapter(model.parameters(), MLRSNet(num_classes=10))
    opt2.load_state_dict(sd)
    for a, b in zip(opt._flat.hidden + opt._flat.stats, opt2._flat.hidden + opt2._flat.stats):
        assert torch.equal(a, b)


def test_smoothness_regularizer_applies_unchanged():
    torch.manual_seed(0)
    net = MLRSNet(gamma=0.7)
    state = net.init_state(5)
    feats, _ = net.features(torch.randn(5), state, loss=torch.tensor(1.5))
    hidden = tuple(t.clone() for t in state.hidden)
    reg = SmoothnessRegularizer(eps=0.5, lam=1.0, steps=5)
    R = reg(net, feats, state.hidden, torch.Generator().manual_seed(0))
    assert R.shape == () and torch.isfinite(R) and R.item() > 0
    grads = torch.autograd.grad(R, list(net.parameters()), allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(torch.equal(a, b) for a, b in zip(hidden, state.hidden))


# ----------------------------------------------------------------------------- Algorithm 1

def toy_problem(seed=0):
    """Synthetic float64 problem for exact-math checks (quality claims use real data below)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(96, 5, generator=g, dtype=torch.float64)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    torch.manual_seed(seed)
    model = MLP(5, (6,), 2).double()
    return model, (x[:32], y[:32]), (x[32:], y[32:])


def ce(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


class BNNet(torch.nn.Module):
    """MLP with BatchNorm (running statistics to leave untouched) and a head used only by batches
    that ask for it (a parameter without a training gradient: torch.optim skips it)."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.BatchNorm1d(6), torch.nn.Tanh(),
                                        torch.nn.Linear(6, 2))
        self.extra = torch.nn.Linear(5, 2)

    def forward(self, x, use_extra=False):
        out = self.body(x)
        return out + self.extra(x) if use_extra else out


def bn_problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(96, 5, generator=g, dtype=torch.float64)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    torch.manual_seed(seed)
    return BNNet().double(), (x[:32], y[:32]), (x[32:], y[32:], True)


def ce_extra(model, batch):
    """Cross-entropy; a third batch entry True routes through ``model.extra`` too."""
    return F.cross_entropy(model(batch[0], use_extra=len(batch) > 2), batch[1])


OPTIMIZERS = {
    "sgd": (torch.optim.SGD, {"lr": 0.1}),
    "sgd_momentum_wd": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3}),
    "nesterov": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3}),
    "adam": (torch.optim.Adam, {"lr": 0.01, "betas": (0.8, 0.99), "weight_decay": 1e-3}),
    "adamw": (torch.optim.AdamW, {"lr": 0.01, "weight_decay": 1e-2}),
}


def assert_same_state(a, b, where="state"):
    """Nested dicts / lists of tensors and plain values are identical (tensors by torch.equal)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            assert_same_state(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for k, (u, v) in enumerate(zip(a, b)):
            assert_same_state(u, v, f"{where}[{k}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.mark.parametrize("clip", [None, 0.05])
@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_virtual_step_equals_the_real_step_with_the_same_rate(kind, clip):
    """Truth test: the validation loss at ŵ(φ) (eq. 11) equals that after a real torch.optim step
    with the same rate, from the same momentum buffer / Adam moments (float64, 1e-10 relative);
    the model (parameters, BatchNorm buffers) and the optimizer are left exactly as they were."""
    model, tr, va = bn_problem()
    cls, options = OPTIMIZERS[kind]
    opt = cls(model.parameters(), **options)
    for _ in range(3):  # build up buffers
        opt.zero_grad()
        ce_extra(model, tr).backward()
        opt.step()
    torch.manual_seed(0)
    net = MLRSNet().double()
    hidden = net.init_hidden()[:2]
    x = net.loss_input(ce_extra(model, tr))
    model_before, opt_before = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    vl, lr = virtual_step_loss(net, hidden, x, 0.8, model, opt, tr, va, ce_extra, grad_clip=clip)
    assert_same_state(model.state_dict(), model_before, "model")
    assert_same_state(opt.state_dict(), opt_before, "optimizer")
    m2 = copy.deepcopy(model)
    o2 = cls(m2.parameters(), **options)
    o2.load_state_dict(opt.state_dict())
    for gr in o2.param_groups:
        gr["lr"] = lr.item()
    o2.zero_grad(set_to_none=True)
    ce_extra(m2, tr).backward()
    assert m2.extra.weight.grad is None  # the real step skips the head, so must the virtual one
    if clip is not None:
        total = torch.nn.utils.clip_grad_norm_(m2.parameters(), clip)
        assert total > 2 * clip  # the clipping acts
    o2.step()
    assert vl.item() == pytest.approx(ce_extra(m2, va).item(), rel=1e-10, abs=0)
    assert vl.requires_grad and 0.0 < lr.item() < 0.8


class TiedLM(torch.nn.Module):
    """The PTB model's structure (benchmarks/mlrsnet_ptb.py): embedding, 2-layer LSTM, decoder tied
    to the embedding, carried state."""

    def __init__(self, vocab=20, hidden=8):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, hidden)
        self.lstm = torch.nn.LSTM(hidden, hidden, 2)
        self.dec = torch.nn.Linear(hidden, vocab)
        self.dec.weight = self.emb.weight

    def forward(self, x, state):
        out, state = self.lstm(self.emb(x), state)
        return self.dec(out).view(-1, self.dec.out_features), state


def lm_loss(model, batch):
    x, y, state = batch
    logits, state = model(x, state)
    return F.cross_entropy(logits, y.reshape(-1)), tuple(t.detach() for t in state)


def test_virtual_step_of_a_tied_lstm_language_model_with_clipping():
    """The language-model path (§4.1.2): LSTM weights, a tied decoder, ``(loss, state)`` from the
    loss function and gradient clipping (binding): virtual = real step to 1e-10 (float64)."""
    torch.manual_seed(0)
    model = TiedLM().double()
    data = torch.randint(0, 20, (11, 4), generator=torch.Generator().manual_seed(0))
    state = tuple(torch.zeros(2, 4, 8, dtype=torch.float64) for _ in range(2))
    tr, va = (data[:5], data[1:6], state), (data[5:10], data[6:11], state)
    options = {"lr": 0.5, "momentum": 0.9, "weight_decay": 1e-4}
    opt = torch.optim.SGD(model.parameters(), **options)
    for _ in range(2):
        opt.zero_grad()
        lm_loss(model, tr)[0].backward()
        opt.step()
    net = MLRSNet(objective="language_model", num_classes=20).double()
    x = net.loss_input(lm_loss(model, tr)[0])
    vl, lr = virtual_step_loss(net, net.init_hidden()[:2], x, 0.7, model, opt, tr, va, lm_loss, grad_clip=0.05)
    m2 = copy.deepcopy(model)
    o2 = torch.optim.SGD(m2.parameters(), **options)
    o2.load_state_dict(opt.state_dict())
    for gr in o2.param_groups:
        gr["lr"] = lr.item()
    o2.zero_grad()
    lm_loss(m2, tr)[0].backward()
    assert torch.nn.utils.clip_grad_norm_(m2.parameters(), 0.05) > 0.1
    o2.step()
    assert vl.item() == pytest.approx(lm_loss(m2, va)[0].item(), rel=1e-10, abs=0)
    grads = torch.autograd.grad(vl, list(net.parameters()), allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_virtual_step_does_not_use_higher(monkeypatch):
    """The virtual step is functional (torch.func); ``higher`` is not imported on this path."""
    import sys
    monkeypatch.setitem(sys.modules, "higher", None)  # `import higher` now raises ImportError
    model, tr, va = toy_problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    net = MLRSNet().double()
    vl, lr = virtual_step_loss(net, net.init_hidden()[:2], net.loss_input(ce(model, tr)), 0.5, model, opt,
                               tr, va, ce)
    assert torch.isfinite(vl) and vl.requires_grad


def test_virtual_step_meta_gradient_matches_finite_differences():
    model, tr, va = toy_problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    for _ in range(2):
        opt.zero_grad()
        ce(model, tr).backward()
        opt.step()
    torch.manual_seed(3)
    net = MLRSNet(init="official").double()
    with torch.no_grad():
        hidden = tuple(0.3 * torch.randn(1, 50, dtype=torch.float64) for _ in range(2))
    x = net.loss_input(ce(model, tr))
    args = (hidden, x, 1.5, model, opt, tr, va, ce)
    val, grads = meta_gradient(net, *args)
    g = torch.cat([t.reshape(-1) for t in grads])
    assert g.norm() > 0
    theta = torch.nn.utils.parameters_to_vector(net.parameters()).detach()
    gen = torch.Generator().manual_seed(0)

    def f(th):
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(th, net.parameters())
            return virtual_step_loss(net, *args)[0].item()  # works under no_grad too
    for _ in range(3):
        v = torch.randn(theta.shape, generator=gen, dtype=torch.float64)
        v /= v.norm()
        eps = 1e-5
        fd = (f(theta + eps * v) - f(theta - eps * v)) / (2 * eps)
        an = torch.dot(g, v).item()
        assert abs(fd - an) <= 1e-6 * max(1e-3, abs(an)) + 1e-10, f"FD {fd:.10g} vs autograd {an:.10g}"
    torch.nn.utils.vector_to_parameters(theta, net.parameters())
    state, weights = copy.deepcopy(opt.state_dict()), copy.deepcopy(model.state_dict())
    virtual_step_loss(net, *args)
    assert_same_state(opt.state_dict(), state, "optimizer")  # the real optimizer is untouched
    assert_same_state(model.state_dict(), weights, "model")


def run_meta(mnist, meta: bool, steps=240, gamma=2.0):
    """Algorithm 1 on real MNIST (2000 training images) with a deliberately too large initial rate
    (γ = 2: α_0 ≈ 0.8 for a 784-64-10 MLP), against the same run with φ frozen at φ_0."""
    torch.manual_seed(0)
    net = MLRSNet(num_classes=10)
    model = MLP(784, (64,), 10)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    g, gv = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)

    def batch(aux):
        i = torch.randint(0, len(mnist.y_train), (64,), generator=g)
        return mnist.x_train[i], mnist.y_train[i]

    def val_batch():
        i = torch.randint(0, len(mnist.y_val), (100,), generator=gv)
        return mnist.x_val[i], mnist.y_val[i]
    # meta_lr 1e-2 (paper 1e-3) so that 48 meta-updates suffice for a 5-second test
    cfg = MLRSNetTrainConfig(t_val=5 if meta else 10 ** 9, meta_lr=1e-2, snapshot_every=80)
    tr = MLRSNetMetaTrainer(net, model, opt, loss_fn=ce, val_batch_fn=val_batch, config=cfg, gamma=gamma)
    h = runs.train(tr, batch, steps=steps, progress=False)
    with torch.no_grad():
        val = F.cross_entropy(model(mnist.x_test), mnist.y_test).item()
    return val, h, tr


def test_meta_training_on_real_data_beats_the_frozen_schedule(mnist_small):
    base, _, _ = run_meta(mnist_small, meta=False)
    val, h, tr = run_meta(mnist_small, meta=True)
    meta = [v for v in h["step_log"]["meta_loss"] if v is not None]
    assert len(meta) == 48, "one finite meta-loss every t_val = 5 steps"
    lr = h["step_log"]["lr"]
    assert lr[-1] < 0.5 * lr[0], "meta-training should learn to lower a too large rate"
    assert val < 0.8 * base, f"test loss {val:.4f} (meta-trained) vs {base:.4f} (frozen φ0)"
    assert [t for t, _ in tr.snapshots] == [80, 160, 240]
    nets = tr.snapshot_nets(select_snapshots(len(tr.snapshots), 3))
    assert len(nets) == 3 and not torch.equal(nets[0].layer3.weight, nets[2].layer3.weight)


def test_meta_trainer_resume_is_exact():
    def make():
        model, tr, va = toy_problem()
        torch.manual_seed(0)
        net = MLRSNet().double()
        opt = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9)
        return MLRSNetMetaTrainer(net, model, opt, loss_fn=ce, val_batch_fn=lambda: va,
                                  config=MLRSNetTrainConfig(t_val=3, snapshot_every=4), gamma=0.5), tr
    a, batch = make()
    for _ in range(10):
        a.step(batch)
    b, _ = make()
    for _ in range(6):
        b.step(batch)
    c, _ = make()
    c.load_state_dict(copy.deepcopy(b.state_dict()))
    for _ in range(4):
        c.step(batch)
    for p, q in zip(a.model.parameters(), c.model.parameters()):
        assert torch.equal(p, q)
    for p, q in zip(a.net.parameters(), c.net.parameters()):
        assert torch.equal(p, q)
    assert len(c.snapshots) == 2 and len(c.meta_history) == 4


@pytest.mark.parametrize("mode", ["paper", "authors-code"])
def test_lstm_state_on_meta_update_steps(mode):
    """paper: the real rate of a meta-update step uses θ_t; authors-code: the state their virtual
    rate already advanced with φ_t."""
    model, tr, va = toy_problem()
    torch.manual_seed(0)
    net = MLRSNet().double()
    phi0 = copy.deepcopy(net)
    t = MLRSNetMetaTrainer(net, model, torch.optim.SGD(model.parameters(), lr=1.0), loss_fn=ce,
                           val_batch_fn=lambda: va, gamma=0.5, config=MLRSNetTrainConfig(t_val=1, lstm_state=mode))
    x = net.loss_input(ce(model, tr))
    t.step(tr)
    one = torch.ones(1, dtype=torch.float64)
    with torch.no_grad():
        h = phi0.init_hidden()[:2]
        if mode == "authors-code":
            h = phi0.network(x, (*h, one))[1][:2]
        expect = net.network(x, (*h, one))[1][0]  # φ_1 = the updated net
    torch.testing.assert_close(t.hidden[0], expect, rtol=1e-12, atol=1e-14)


def test_killed_run_resumes_from_its_checkpoint_exactly(tmp_path):
    """Algorithm 1 through the library's one training loop (l2l_zoo.runs.train): killed after a
    checkpoint, a fresh trainer resumes bit-for-bit (model, net, Adam state, snapshots, RNG)."""
    def make():
        model, tr, va = toy_problem()
        torch.manual_seed(0)
        opt = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9)
        trainer = MLRSNetMetaTrainer(MLRSNet().double(), model, opt,
                                     loss_fn=ce, val_batch_fn=lambda: va, gamma=0.5,
                                     config=MLRSNetTrainConfig(t_val=3, snapshot_every=5))
        gen = torch.Generator().manual_seed(5)

        def batch(aux):
            i = torch.randint(0, 32, (8,), generator=gen)
            return tr[0][i], tr[1][i]
        return trainer, batch, gen, (lambda: {"val_loss": ce(model, va).item()})

    def loop(trainer, batch, gen, ev, path, identity=None):
        return runs.train(trainer, batch, steps=12, evaluate=ev, eval_every=3, checkpoint=path, checkpoint_every=4,
                          identity=identity or {"run": "toy"}, generators={"data": gen}, resume=True,
                          progress=False)
    a = make()
    ha = loop(*a, tmp_path / "a.pt")
    b = make()
    dying = killed_at(10, b[1])  # killed after the checkpoint at step 8
    with pytest.raises(KeyboardInterrupt):
        loop(b[0], dying, b[2], b[3], tmp_path / "b.pt")
    with pytest.raises(runs.CheckpointError, match="different setup"):
        loop(*make(), tmp_path / "b.pt", identity={"run": "other"})
    c = make()
    hc = loop(*c, tmp_path / "b.pt")
    assert hc["step_log"] == ha["step_log"] and hc["eval"] == ha["eval"]
    assert hc["eval"]["step"] == [0, 3, 6, 9, 12]
    assert sum(v is not None for v in hc["step_log"]["meta_loss"]) == 4  # steps 0, 3, 6, 9
    for p, q in zip(a[0].model.parameters(), c[0].model.parameters()):
        assert torch.equal(p, q)
    for p, q in zip(a[0].net.parameters(), c[0].net.parameters()):
        assert torch.equal(p, q)
    assert [t for t, _ in c[0].snapshots] == [5, 10]


def test_scheduler_state_resumes_through_weights_only_checkpoints(tmp_path):
    """A MultiStepLR policy (its Counter of milestones) survives a weights_only checkpoint; with
    keep_final a finished run is restored without training."""
    def make():
        model, tr, _ = toy_problem()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        return runs.OptimizerStepper(model, opt, ce, scheduler=make_baseline("multistep", opt, total_steps=8)), tr
    path = tmp_path / "run.pt"
    stepper, tr = make()
    h = runs.train(stepper, lambda aux: tr, steps=8, checkpoint=path, checkpoint_every=3, identity={"run": "toy"},
                   keep_final=True, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.pt"]
    again, _ = make()
    h2 = runs.train(again, lambda aux: tr, steps=8, checkpoint=path, checkpoint_every=3, identity={"run": "toy"},
                    resume=True, keep_final=True, progress=False)
    assert h2["step_log"] == h["step_log"] and again.t == 8 and again.scheduler.last_epoch == 8
    for p, q in zip(stepper.model.parameters(), again.model.parameters()):
        assert torch.equal(p, q)


def test_non_finite_meta_updates_are_skipped_then_abort():
    model, tr, va = toy_problem()
    bad = (va[0] * float("nan"), va[1])
    net = MLRSNet().double()
    before = copy.deepcopy(net.state_dict())
    logs = []
    t = MLRSNetMetaTrainer(net, model, torch.optim.SGD(model.parameters(), lr=1.0), loss_fn=ce,
                           val_batch_fn=lambda: bad, gamma=0.5,
                           config=MLRSNetTrainConfig(t_val=1, max_meta_failures=3), log=logs.append)
    t.step(tr)
    t.step(tr)
    assert t.total_failures == 2 and len(logs) == 1 and "meta-update skipped" in logs[0]
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert t.t == 2  # the model still trains
    with pytest.raises(MetaUpdateFailed, match="3 consecutive non-finite meta-updates"):
        t.step(tr)


def test_controller_run_stops_on_divergence():
    model, tr, va = toy_problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    ctl = MLRSNetController(opt, MLRSNet().double(), gamma=1e6)
    h = runs.train(runs.ControllerStepper(model, ctl, ce), lambda aux: tr, steps=50, divergence_loss=1e3,
                   progress=False)
    assert h["diverged_at"] is not None and len(h["step_log"]["loss"]) == h["diverged_at"] < 50


# ----------------------------------------------------------------------------- Algorithm 2

def test_controller_switches_nets_and_recomputes_gamma():
    torch.manual_seed(0)
    nets = [MLRSNet(num_classes=10, init="official") for _ in range(3)]
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    ref_losses = iter([2.0, 1.0, 0.5])
    ctl = MLRSNetController(opt, nets, total_steps=9, train_loss_fn=lambda: next(ref_losses))
    assert ctl.switch_steps == [3, 6]
    losses = [2.2, 2.0, 1.9, 1.5, 1.2, 1.0, 0.8, 0.6, 0.5]
    lrs = [ctl.rate(torch.tensor(v)) for v in losses]
    assert [g for _, g in ctl.gammas] == pytest.approx([mlrsnet_gamma(L, 10) for L in (2.0, 1.0, 0.5)])
    assert [s for s, _ in ctl.gammas] == [0, 3, 6]
    # reference: net k on its third, LSTM state carried across the switches
    h = nets[0].init_hidden(gamma=1.0)[:2]
    expect = []
    with torch.no_grad():
        for t, v in enumerate(losses):
            k = t // 3
            p, (hh, cc, _) = nets[k].network(torch.tensor([[v]]), (*h, torch.ones(1)))
            h = (hh, cc)
            expect.append(mlrsnet_gamma((2.0, 1.0, 0.5)[k], 10) * p.item())
    assert lrs == pytest.approx(expect, rel=1e-6)
    assert opt.param_groups[0]["lr"] == pytest.approx(expect[-1], rel=1e-6)


def test_select_snapshots_and_hand_designed_schedules():
    assert select_snapshots(200, 3) == [66, 133, 199]  # epochs ⌈200/3⌉=67, 134, 200
    assert select_snapshots(2, 3) == [0, 1, 1]
    p = torch.nn.Parameter(torch.zeros(1))
    lrs = {}
    for name in ("fixed", "multistep", "exponential", "sgdr"):
        opt = torch.optim.SGD([p], lr=0.1)
        sch = make_baseline(name, opt, total_steps=200, preset="mlrsnet")
        assert isinstance(sch, torch.optim.lr_scheduler.LRScheduler)  # "fixed" too: always a scheduler
        seq = []
        for _ in range(200):
            seq.append(opt.param_groups[0]["lr"])
            opt.step()
            sch.step()
        lrs[name] = seq
    assert set(lrs["fixed"]) == {0.1}
    assert lrs["multistep"][59] == pytest.approx(0.1) and lrs["multistep"][60] == pytest.approx(0.01)
    assert lrs["multistep"][180] == pytest.approx(1e-4)
    assert lrs["exponential"][199] == pytest.approx(0.1 * 0.95 ** 199)
    assert lrs["sgdr"][10] == pytest.approx(0.1) and lrs["sgdr"][30] == pytest.approx(0.1)  # restarts
    with pytest.raises(KeyError, match="unknown baseline 'cosine'"):
        make_baseline("cosine", opt, total_steps=10, preset="mlrsnet")


def test_baseline_presets_follow_the_papers():
    """make_baseline's presets: the MLR-SNet paper §4.1.1 (exponential 0.95 per epoch, SGDR α_min
    1e-5) and the MARTHE paper §6 (0.99 per epoch, SGDR floor 0), both over 200 epochs: MultiStep
    ×0.1 at epochs 60/120/180, SGDR E_0 = 10, T_mult = 2 (restarts at epochs 10, 30, 70, 150)."""
    T = 200  # one step per "epoch"
    m = baseline_lrs("exponential", 0.1, T, preset="mlrsnet")
    assert m[1] == pytest.approx(0.095, rel=1e-12) and m[199] == pytest.approx(0.1 * 0.95 ** 199, rel=1e-9)
    k = baseline_lrs("exponential", 0.1, T, preset="marthe")
    assert k[1] == pytest.approx(0.099, rel=1e-12) and k[199] == pytest.approx(0.1 * 0.99 ** 199, rel=1e-9)
    assert baseline_lrs("exponential", 0.1, T) == k  # the default preset is the MARTHE paper's
    for preset, floor in (("mlrsnet", 1e-5), ("marthe", 0.0)):
        sg = baseline_lrs("sgdr", 0.1, T, preset=preset)
        assert [sg[i] for i in (0, 10, 30, 70, 150)] == pytest.approx([0.1] * 5, rel=1e-12)
        # last step of the first period: α_min + (α_max − α_min)(1 + cos(9π/10))/2
        assert sg[9] == pytest.approx(floor + (0.1 - floor) * (1 + math.cos(0.9 * math.pi)) / 2, rel=1e-9)
        ms = baseline_lrs("multistep", 0.1, T, preset=preset)
        assert [ms[i] for i in (59, 60, 119, 120, 179, 180)] == pytest.approx([0.1, 0.01, 0.01, 1e-3, 1e-3, 1e-4])
        assert baseline_lrs("fixed", 0.1, T, preset=preset) == [0.1] * T
    # another horizon: the same shape, 0.95 per 1/200 of training
    long = baseline_lrs("exponential", 0.1, 1000, preset="mlrsnet")
    assert long[500] == pytest.approx(0.1 * 0.95 ** 100, rel=1e-9)
    # explicit options override the preset
    assert baseline_lrs("exponential", 0.1, 10, preset="mlrsnet", gamma=0.5)[3] == pytest.approx(0.0125)
    sg = baseline_lrs("sgdr", 0.1, 100, preset="mlrsnet", t_0=4, t_mult=1, eta_min=0.05)
    assert [sg[i] for i in (0, 4, 8)] == pytest.approx([0.1] * 3) and sg[2] == pytest.approx(0.075)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    assert isinstance(make_baseline("fixed", opt, total_steps=5, preset="mlrsnet"),
                      torch.optim.lr_scheduler.LambdaLR)
    with pytest.raises(ValueError, match=r"preset must be one of \['marthe', 'mlrsnet'\], got 'adam'"):
        make_baseline("sgdr", opt, total_steps=10, preset="adam")
    assert set(PRESETS) == {"marthe", "mlrsnet"}


def test_controller_step_is_one_training_step_and_resumes_exactly(tmp_path):
    """ctl.step(loss) = zero_grad, backward, clip_grad_norm_, rate(loss), optimizer.step(); its
    state dict (tensors and plain containers) round-trips through weights_only=True."""
    torch.manual_seed(0)
    nets = [MLRSNet(num_classes=2, init="official").double() for _ in range(2)]
    model, tr, _ = toy_problem()
    m2 = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
    o2 = torch.optim.SGD(m2.parameters(), lr=0.0, momentum=0.9)
    ctl = MLRSNetController(opt, nets, total_steps=6, grad_clip=0.05)
    ref = MLRSNetController(o2, nets, total_steps=6)
    assert isinstance(ctl, LRController) and ctl.lr == 0.0 and ctl.t == 0 and ctl.last == {}
    for t in range(3):
        loss = ce(model, tr)
        assert ctl.step(loss) == loss.item()
        loss2 = ce(m2, tr)
        o2.zero_grad()
        loss2.backward()
        assert torch.nn.utils.clip_grad_norm_(m2.parameters(), 0.05) > 0.1  # clipping acts
        lr = ref.rate(loss2)
        o2.step()
        assert ctl.last["loss"] == loss.item() and ctl.last["lr"] == ctl.lr == lr and ctl.t == t + 1
        assert ctl.last["grad_norm"] > 0.1
    for p, q in zip(model.parameters(), m2.parameters()):
        assert torch.equal(p, q)
    torch.save({"ctl": ctl.state_dict(), "opt": opt.state_dict(), "model": model.state_dict()}, tmp_path / "c.pt")
    expect = [ctl.step(ce(model, tr)) for _ in range(3)]
    ck = torch.load(tmp_path / "c.pt", weights_only=True)
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["opt"])
    ctl2 = MLRSNetController(opt, nets, total_steps=6, grad_clip=0.05)
    ctl2.load_state_dict(ck["ctl"])
    assert ctl2.t == 3 and ctl2.lr == opt.param_groups[0]["lr"] and ctl2.net_index() == 1
    assert [ctl2.step(ce(model, tr)) for _ in range(3)] == expect
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ScheduleDiverged, match="minibatch loss nan"):
        ctl2.step(ce(model, tr) * float("nan"))
    assert ctl2.t == 6 and all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    with pytest.raises(TypeError, match="scalar training-loss tensor"):
        ctl2.step(1.0)
    with pytest.raises(ValueError, match="grad_clip must be None or a finite number > 0, got -1"):
        MLRSNetController(opt, nets[0], grad_clip=-1)
    big = MLRSNetController(opt, nets[0], divergence_loss=0.1)
    with pytest.raises(ScheduleDiverged, match=r"minibatch loss 0\.71744"):
        big.step(ce(model, tr))
    inf = MLRSNetController(opt, nets[0], grad_clip=1.0)
    with pytest.raises(ScheduleDiverged, match="gradient norm inf with a finite loss"):
        w = next(model.parameters())
        inf.step(ce(model, tr) + torch.sqrt(w - w.detach()).sum())  # value + 0, gradient 1/(2·√0) = inf
    assert inf.t == 0 and all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_controller_old_import_path_still_works():
    from l2l_zoo.optimizers.mlrsnet import MLRSNetController as Old  # kept for one release
    assert Old is MLRSNetController
