"""MLR-SNet (Shu et al. 2022): exact size, γ, the authors' checkpoints in both gate layouts, state
carrying against a slow reference, the LearnedOptimizer contract (registry, adapter, smoothness),
equivalence of its update with torch.optim, the virtual-step meta-gradient against float64 finite
differences, Algorithm 1 end to end on real MNIST, resume, NaN handling and Algorithm 2 switching."""
import copy
import math
import os

import pytest
import torch
import torch.nn.functional as F

import l2l_zoo
from l2l_zoo import MLRSNet
from l2l_zoo.base import OptState
from l2l_zoo.optimizers.mlrsnet import MLRSNetController, mlrsnet_gamma
from l2l_zoo.regularizers import SmoothnessRegularizer
from l2l_zoo.schedules.mlrsnet_train import (MetaUpdateFailed, MLRSNetMetaTrainer, MLRSNetTrainConfig,
                                             ScheduledStepper, hand_designed_scheduler, meta_gradient,
                                             resumable_train_loop, select_snapshots, train_loop,
                                             virtual_step_loss)
from l2l_zoo.tasks import MLP


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


def test_gamma_matches_the_formula():
    L0, C = math.log(10), 10
    assert mlrsnet_gamma(L0, C) == pytest.approx(abs(math.sqrt(L0) * math.log(L0 * C) / C ** 0.25) / 4, rel=1e-15)
    assert mlrsnet_gamma(L0, C) == pytest.approx(0.669128, abs=1e-6)  # by hand: 1.517427·3.136616/1.778279/4
    assert mlrsnet_gamma(0.05, 10) == pytest.approx(abs(math.sqrt(0.05) * math.log(0.5) / 10 ** 0.25) / 4)
    lm = MLRSNet(objective="language_model", num_classes=10000)
    assert lm.gamma_for(math.log(150.0)) == pytest.approx(mlrsnet_gamma(150.0, 10000), rel=1e-12)
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
        ref.zero_grad()
        loss2 = F.cross_entropy(m2(x[i]), y[i])
        loss2.backward()
        ctl.step(loss2)
        ref.step()
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


@pytest.mark.parametrize("base", ["sgdm", "adam"])
def test_virtual_step_equals_the_real_step_with_the_same_rate(base):
    """ŵ(φ) built by higher carries the momentum buffer / Adam moments of the real optimizer."""
    model, tr, va = toy_problem()
    opt = (torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3) if base == "sgdm"
           else torch.optim.Adam(model.parameters(), lr=0.01))
    for _ in range(3):  # build up buffers
        opt.zero_grad()
        ce(model, tr).backward()
        opt.step()
    torch.manual_seed(0)
    net = MLRSNet().double()
    hidden = net.init_hidden()[:2]
    x = net.loss_input(ce(model, tr))
    vl, lr = virtual_step_loss(net, hidden, x, 0.8, model, opt, tr, va, ce)
    m2, o2 = copy.deepcopy(model), None
    o2 = type(opt)(m2.parameters(), **{k: v for k, v in opt.defaults.items()
                                       if k in ("lr", "momentum", "weight_decay", "betas", "eps")})
    o2.load_state_dict(opt.state_dict())
    for gr in o2.param_groups:
        gr["lr"] = lr.item()
    o2.zero_grad()
    ce(m2, tr).backward()
    o2.step()
    # Adam: higher 0.2.1 uses the old eps placement and float32 bias corrections (measured 1e-5).
    tol = 1e-12 if base == "sgdm" else 1e-4
    assert vl.item() == pytest.approx(ce(m2, va).item(), rel=tol)


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
    state = copy.deepcopy(opt.state_dict())
    virtual_step_loss(net, *args)
    assert str(opt.state_dict()) == str(state)  # the real optimizer is untouched


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
    h = train_loop(tr, batch, steps=steps, progress=False)
    with torch.no_grad():
        val = F.cross_entropy(model(mnist.x_test), mnist.y_test).item()
    return val, h, tr


def test_meta_training_on_real_data_beats_the_frozen_schedule(mnist_small):
    base, _, _ = run_meta(mnist_small, meta=False)
    val, h, tr = run_meta(mnist_small, meta=True)
    assert len(h["meta"]) == 48 and all(m["val_loss"] is not None for m in h["meta"])
    assert h["lr"][-1] < 0.5 * h["lr"][0], "meta-training should learn to lower a too large rate"
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
        return trainer, batch, gen, (lambda: {"val": ce(model, va).item()})

    def loop(trainer, batch, gen, ev, path):
        return resumable_train_loop(trainer, batch, path=path, identity={"run": "toy"}, generators={"data": gen},
                                    resume=True, checkpoint_every=4, steps=12, evaluate=ev, eval_every=3,
                                    progress=False)
    a = make()
    ha = loop(*a, tmp_path / "a.pt")
    b = make()
    calls = {"n": 0}

    def dying(aux, inner=b[1]):
        calls["n"] += 1
        if calls["n"] == 10:  # killed after the checkpoint at step 8
            raise KeyboardInterrupt
        return inner(aux)
    with pytest.raises(KeyboardInterrupt):
        loop(b[0], dying, b[2], b[3], tmp_path / "b.pt")
    c = make()
    hc = loop(*c, tmp_path / "b.pt")
    assert hc["loss"] == ha["loss"] and hc["lr"] == ha["lr"] and hc["meta"] == ha["meta"]
    assert [e["step"] for e in hc["eval"]] == [0, 3, 6, 9, 12] and hc["eval"] == ha["eval"]
    for p, q in zip(a[0].model.parameters(), c[0].model.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="written by a different run"):
        resumable_train_loop(make()[0], make()[1], path=tmp_path / "b.pt", identity={"run": "other"}, resume=True,
                             steps=12, progress=False)


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


def test_train_loop_stops_on_divergence():
    model, tr, va = toy_problem()
    opt = torch.optim.SGD(model.parameters(), lr=1e6)
    h = train_loop(ScheduledStepper(model, opt, loss_fn=ce), lambda aux: tr, steps=50, progress=False)
    assert h["diverged_at"] is not None and len(h["loss"]) == h["diverged_at"] < 50


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
    lrs = [ctl.step(torch.tensor(v)) for v in losses]
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
        sch = hand_designed_scheduler(name, opt, 200)
        seq = []
        for _ in range(200):
            seq.append(opt.param_groups[0]["lr"])
            opt.step()
            if sch is not None:
                sch.step()
        lrs[name] = seq
    assert set(lrs["fixed"]) == {0.1}
    assert lrs["multistep"][59] == pytest.approx(0.1) and lrs["multistep"][60] == pytest.approx(0.01)
    assert lrs["multistep"][180] == pytest.approx(1e-4)
    assert lrs["exponential"][199] == pytest.approx(0.1 * 0.95 ** 199)
    assert lrs["sgdr"][10] == pytest.approx(0.1) and lrs["sgdr"][30] == pytest.approx(0.1)  # restarts
    with pytest.raises(ValueError, match="unknown schedule 'cosine'"):
        hand_designed_scheduler("cosine", opt, 10)
