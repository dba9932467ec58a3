"""Learned optimizers: exact parameter counts, the shared contract, and equivalence with slow
reference implementations built from plain torch modules."""
import math

import pytest
import torch
import torch.nn.functional as F

import l2l_zoo
from l2l_zoo.base import OptState
from l2l_zoo.optimizers.features import log_sign_preprocess

from conftest import LOPT_OPTIONS

ALL = l2l_zoo.available()  # every registered optimizer gets the contract test


@pytest.mark.parametrize("name,options,count", [
    ("simple", {}, 132), ("dm", {}, 5301), ("rnnprop", {}, 6801),
    ("simple", {"bias": True}, 143), ("simple", {"aggregation": False}, 120),
])
def test_exact_meta_parameter_counts(name, options, count):
    assert l2l_zoo.create(name, **options).num_meta_parameters() == count


def test_create_rejects_options_of_the_wrong_kind_before_building():
    """--opt-config output_scale=abc used to be accepted and to fail mid-training."""
    for name, kw, msg in [("dm", {"output_scale": "abc"}, "'output_scale' of optimizer 'dm' must be a number"),
                          ("dm", {"clamp": 1}, "'clamp' of optimizer 'dm' must be true or false"),
                          ("simple", {"hidden_size": 2.5}, "'hidden_size' of optimizer 'simple' must be an integer"),
                          ("rnnprop", {"step_scale": None}, "'step_scale' of optimizer 'rnnprop' must be a number")]:
        with pytest.raises(TypeError, match=msg):
            l2l_zoo.create(name, **kw)
    assert l2l_zoo.create("dm", output_scale=1).config["output_scale"] == 1  # an int is a number


def test_create_rejects_unknown_names_and_options():
    with pytest.raises(KeyError, match=r"unknown optimizer 'adamw'.*choose from \['dm', .*'simple'"):
        l2l_zoo.create("adamw")
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['hiden'\].*allowed: .*hidden_size"):
        l2l_zoo.create("dm", hiden=3)
    with pytest.raises(ValueError, match="input_norm must be one of"):
        l2l_zoo.create("simple", input_norm="l2")


@pytest.mark.parametrize("name", ALL)
def test_contract_shapes_purity_and_detach(name):
    torch.manual_seed(0)
    lopt = l2l_zoo.create(name, **LOPT_OPTIONS.get(name, {}))
    n = 37
    state = lopt.init_state(n)
    before = [t.clone() for t in (*state.stats, *state.hidden)]
    g = torch.randn(n) * 1e-2
    g_copy = g.clone()
    kw = {"loss": torch.tensor(2.0)} if lopt.needs_loss else {}
    if lopt.needs_params:
        kw["params"] = torch.randn(n)
    upd, new = lopt.update(g, state, **kw)
    assert upd.shape == (n,) and torch.isfinite(upd).all()
    assert torch.equal(g, g_copy), "update must not modify its inputs"
    assert all(torch.equal(a, b) or (a.isnan().all() and b.isnan().all())
               for a, b in zip(before, (*state.stats, *state.hidden))), "state mutated"
    assert new.step == 1
    # differentiable in the meta-parameters
    upd.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in lopt.parameters())
    det = new.detach()
    assert all(not t.requires_grad for t in (*det.stats, *det.hidden))


# Non-default options for the save/load round trip (every registered optimizer is covered).
ROUNDTRIP_OPTIONS = {"simple": {"bias": True}, "dm": {"output_scale": 0.01, "p": 5.0, "clamp": True},
                     "rnnprop": {"step_scale": 0.2}, "mlrsnet": {"gamma": 0.1, "base": "adam", "layout": "meta-test"},
                     "metalstm": {"preset": "markdtw", "grad_divisor": 25.0, "n_params": 7}}


@pytest.mark.parametrize("name", l2l_zoo.available())
def test_save_load_roundtrip_is_identical(name, tmp_path):
    torch.manual_seed(1)
    lopt = l2l_zoo.create(name, **ROUNDTRIP_OPTIONS.get(name, {}))
    l2l_zoo.save(lopt, tmp_path / "o.pt", note="x", cfg={"lr": 0.1, "sizes": (1, 2), "tag": None})
    back, extra = l2l_zoo.load(tmp_path / "o.pt", with_extra=True)
    assert type(back) is type(lopt) and back.config == lopt.config
    assert extra == {"note": "x", "cfg": {"lr": 0.1, "sizes": (1, 2), "tag": None}}
    assert all(torch.equal(a, b) for a, b in zip(lopt.state_dict().values(), back.state_dict().values()))
    g = torch.randn(50) * 1e-2
    kw = {"loss": torch.tensor(2.0)} if lopt.needs_loss else {}
    if lopt.needs_params:
        kw["params"] = torch.randn(50)
    a, _ = lopt.update(g, lopt.init_state(50), **kw)
    b, _ = back.update(g, back.init_state(50), **kw)
    assert torch.equal(a, b)


def test_log_sign_preprocess_matches_definition():
    p = 10.0
    g = torch.tensor([1.0, -0.5, 1e-6, -1e-6, 0.0, math.exp(-p)])
    out = log_sign_preprocess(g, p)
    for gi, (a, b) in zip(g.tolist(), out.tolist()):
        if abs(gi) >= math.exp(-p):
            assert a == pytest.approx(math.log(abs(gi)) / p) and b == pytest.approx(math.copysign(1, gi))
        else:
            assert a == -1.0 and b == pytest.approx(math.exp(p) * gi)
    assert log_sign_preprocess(torch.tensor([1e3]), 5.0, clamp=True).max() <= 1.0


def _reference_lstm_stack(cells, x, hidden):
    new, inp = [], x
    for i, cell in enumerate(cells):
        h, c = cell(inp, (hidden[2 * i], hidden[2 * i + 1]))
        new += [h, c]
        inp = h
    return inp, new


@pytest.mark.parametrize("grad_mode", [True, False])
def test_dm_equals_nn_lstmcell_reference(grad_mode):
    """DM's fused/chunked LSTM equals nn.LSTMCell with the same weights (both code paths)."""
    torch.manual_seed(0)
    lopt = l2l_zoo.create("dm").double()
    lopt.lstm.chunk = 64  # exercise several chunks and a ragged last chunk
    n = 300
    state = lopt.init_state(n, dtype=torch.float64)
    state = OptState(0, (), tuple(torch.randn_like(t) * 0.5 for t in state.hidden))
    g = torch.randn(n, dtype=torch.float64) * 1e-3
    with torch.set_grad_enabled(grad_mode):
        upd, new = lopt.update(g, state)
    feats = log_sign_preprocess(g, 10.0)
    h, ref_hidden = _reference_lstm_stack(lopt.lstm.cells, feats, state.hidden)
    ref = 0.1 * lopt.out(h).squeeze(1)
    torch.testing.assert_close(upd, ref, rtol=1e-10, atol=1e-12)
    for a, b in zip(new.hidden, ref_hidden):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_rnnprop_equals_reference():
    torch.manual_seed(0)
    lopt = l2l_zoo.create("rnnprop").double()
    n = 200
    state = lopt.init_state(n, dtype=torch.float64)
    m = torch.zeros(n, dtype=torch.float64)
    v = torch.zeros(n, dtype=torch.float64)
    hidden = list(state.hidden)
    for t in range(1, 4):
        g = torch.randn(n, dtype=torch.float64) * 1e-2
        upd, state = lopt.update(g, state)
        m = 0.95 * m + 0.05 * g
        v = 0.95 * v + 0.05 * g * g
        mh, vh = m / (1 - 0.95 ** t), v / (1 - 0.95 ** t)
        x = torch.stack([g / (vh.sqrt() + 1e-8), mh / (vh.sqrt() + 1e-8)], 1)
        h, hidden = _reference_lstm_stack(lopt.lstm.cells, F.elu(lopt.inp(x)), hidden)
        ref = -0.1 * torch.tanh(lopt.out(h).squeeze(1))
        torch.testing.assert_close(upd, ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("options", [{}, {"bias": True}, {"aggregation": False}, {"input_norm": "rms"}])
def test_simple_equals_reference(options):
    """SimpleOptimizer equals the textbook form: tanh RNN, concatenated [αh, β mean h], Linear."""
    torch.manual_seed(0)
    lopt = l2l_zoo.create("simple", **options).double()
    n = 120
    state = lopt.init_state(n, dtype=torch.float64)
    h = torch.zeros(n, 10, dtype=torch.float64)
    for _ in range(3):
        g = torch.randn(n, dtype=torch.float64) * 1e-2
        upd, state = lopt.update(g, state)
        x = g[:, None]
        if options.get("input_norm") == "rms":
            x = x / torch.sqrt(x.pow(2).mean() + 1e-5)
        pre = x @ lopt.weight_ih.t() + h @ lopt.weight_hh.t()
        if options.get("bias"):
            pre = pre + lopt.bias_h
        h = torch.tanh(pre)
        emb = torch.cat([lopt.alpha * h, lopt.beta * h.mean(0, keepdim=True).expand_as(h)], 1) \
            if options.get("aggregation", True) else h
        ref = lopt.out(emb).squeeze(1)
        torch.testing.assert_close(upd, ref, rtol=1e-9, atol=1e-14)
        torch.testing.assert_close(state.hidden[0], h, rtol=1e-9, atol=1e-14)


def test_simple_without_bias_gives_zero_update_at_zero_gradient():
    """Chen et al. §3.1: no bias → zero gradient and zero state produce exactly zero update."""
    torch.manual_seed(0)
    lopt = l2l_zoo.create("simple")
    upd, st = lopt.update(torch.zeros(10), lopt.init_state(10))
    assert torch.count_nonzero(upd) == 0
    biased = l2l_zoo.create("simple", bias=True)
    upd_b, _ = biased.update(torch.zeros(10), biased.init_state(10))
    assert upd_b.abs().min() > 0


def test_simple_descent_init_starts_as_descent():
    for seed in range(10):
        torch.manual_seed(seed)
        lopt = l2l_zoo.create("simple")
        g = torch.randn(1000) * 1e-3
        upd, _ = lopt.update(g, lopt.init_state(1000))
        assert torch.dot(upd, g) < 0, f"seed {seed}: initial update is not a descent direction"


@pytest.mark.parametrize("name,options", [("simple", {}), ("simple", {"bias": True}),
                                          ("simple", {"aggregation": False}), ("dm", {}), ("rnnprop", {})])
def test_fast_inference_path_equals_autograd_path(name, options):
    """Without autograd the networks run chunked, in-place kernels: same numbers as the autograd path."""
    torch.manual_seed(0)
    lopt = l2l_zoo.create(name, **options).double()
    if hasattr(lopt, "lstm"):
        lopt.lstm.chunk = 50
    n = 230
    st = lopt.init_state(n, dtype=torch.float64)
    st = OptState(2, tuple(t + 0.1 for t in st.stats), tuple(torch.randn_like(t) * 0.3 for t in st.hidden))
    g = torch.randn(n, dtype=torch.float64) * 1e-2
    a, sa = lopt.update(g, st)
    with torch.no_grad():
        b, sb = lopt.update(g, st)
    torch.testing.assert_close(a.detach(), b, rtol=1e-10, atol=1e-13)
    for x, y in zip(sa.hidden, sb.hidden):
        torch.testing.assert_close(x.detach(), y, rtol=1e-10, atol=1e-13)
