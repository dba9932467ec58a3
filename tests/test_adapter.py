"""The torch.optim adapter, for every registered learned optimizer.

Truth tests: the adapter equals the pure ``lopt.update`` (float32 within rounding on a real model,
float64 exactly); parameters without a gradient are treated as if they were not in the optimizer;
decoupled weight decay; dtypes. Generic torch.optim properties: state_dict round trip (also through
``torch.save``/``torch.load(weights_only=True)`` and older state dicts) with bit-identical resumed
steps, deepcopy and pickle, hooks, param groups and ``add_param_group``, tensor ``lr`` of every
one-element shape, zero gradients, non-finite gradients, error inputs.

Generic optimizer properties that do not apply here, and why:
* "the loss goes down" over a few steps: an untrained learned optimizer need not descend (DM and
  RNNProp start random); the one real-data check below uses SimpleOptimizer, whose initialisation
  is chosen to descend (``init="descent"``);
* ``maximize``, ``foreach``, ``fused``, ``capturable``, ``differentiable``: the adapter has none of
  these flags (the learned network runs once over the flat vector; no multi-tensor or fused kernels,
  no CUDA-graph capture, no differentiation through ``step``: meta-training uses the pure update);
* complex parameters and sparse gradients are rejected (tested below) instead of supported.
A new optimizer added to the registry gets all of these tests; options it needs to be built go into
``LOPT_OPTIONS`` in ``tests/conftest.py``. Every test passes the loss through a closure, which
MLR-SNet needs and the others ignore.
"""
import copy
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_pre_hook

import l2l_zoo
from l2l_zoo.tasks import MLP

ALL = l2l_zoo.available()
Adapter = l2l_zoo.LearnedOptimizerAdapter
SHAPES = [(4, 3), (3,), (2, 5), (2,)]


# ----------------------------------------------------------------------------- helpers
def loss_at(t):
    """A fixed, exactly representable loss for step t (MLR-SNet's input)."""
    return 2.0 - 0.25 * t


def make_params(dtype=torch.float32, shapes=SHAPES, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64).to(dtype)) for s in shapes]


def make_grads(t, dtype=torch.float32, shapes=SHAPES):
    gen = torch.Generator().manual_seed(100 + t)
    return [(0.1 * torch.randn(s, generator=gen, dtype=torch.float64)).to(dtype) for s in shapes]


def set_grads(params, grads, loss):
    """A closure that installs ``grads`` (None: no gradient) and returns ``loss``."""
    def closure():
        for p, g in zip(params, grads):
            p.grad = None if g is None else g.clone()
        return loss
    return closure


def pure(lopt, state, grads, t, params=None, dtype=torch.float32):
    """Reference: the pure update on the flat gradients of ``grads`` (in order)."""
    kw = {}
    if lopt.needs_loss:
        kw["loss"] = torch.tensor(loss_at(t), dtype=dtype)
    if lopt.needs_params:
        kw["params"] = torch.cat([p.detach().reshape(-1).to(dtype) for p in params])
    with torch.no_grad():
        return lopt.update(torch.cat([g.reshape(-1).to(dtype) for g in grads]), state, **kw)


def tiny_model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return MLP(6, (5,), 3).to(dtype)


def batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(n)]


def closure_for(model, opt, x, y):
    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss
    return closure


def train(model, opt, data):
    for x, y in data:
        opt.step(closure_for(model, opt, x, y))


def state_tensors(opt):
    return [t.clone() for t in (*opt._flat.stats, *opt._flat.hidden)]


def assert_all_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def per_coordinate(lopt):
    """Names of the per-coordinate state entries of ``lopt``."""
    a, b = lopt.init_state(2), lopt.init_state(3)
    return [f"{kind}_{j}" for kind in ("stats", "hidden")
            for j, (x, y) in enumerate(zip(getattr(a, kind), getattr(b, kind))) if x.shape[:1] != y.shape[:1]]


# ----------------------------------------------------------------------------- truth tests
@pytest.mark.parametrize("name", ALL)
def test_adapter_equals_pure_update(name, make_lopt):
    lopt = make_lopt(name)
    model, data = tiny_model(), batches(4)
    ref = copy.deepcopy(model)
    train(model, Adapter(model.parameters(), lopt), data)
    # functional reference: flat parameters threaded through lopt.update
    names = [n for n, _ in ref.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for p in ref.parameters()]
    state = lopt.init_state(sum(p.numel() for p in params))
    for x, y in data:
        loss = F.cross_entropy(torch.func.functional_call(ref, dict(zip(names, params)), (x,)), y)
        grads = torch.autograd.grad(loss, params)
        kw = {"loss": loss.detach()} if lopt.needs_loss else {}
        if lopt.needs_params:
            kw["params"] = torch.cat([p.detach().reshape(-1) for p in params])
        with torch.no_grad():
            upd, state = lopt.update(torch.cat([g.reshape(-1) for g in grads]), state, **kw)
        params = [(p + u.view_as(p)).detach().requires_grad_(True)
                  for p, u in zip(params, upd.split([p.numel() for p in params]))]
    for p, q in zip(model.parameters(), params):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert all(p.requires_grad for p in lopt.parameters()), "the caller's module must be left untouched"


@pytest.mark.parametrize("name", ALL)
def test_float64_compute_equals_pure_float64_update_exactly(name, make_lopt):
    lopt = make_lopt(name)
    params = make_params(torch.float64)
    ref = [p.detach().clone() for p in params]
    opt = Adapter(params, lopt, compute_dtype=torch.float64)
    lopt64 = copy.deepcopy(lopt).double()
    state = lopt64.init_state(sum(p.numel() for p in params), dtype=torch.float64)
    for t in range(3):
        grads = make_grads(t, torch.float64)
        opt.step(set_grads(params, grads, loss_at(t)))
        upd, state = pure(lopt64, state, grads, t, ref, torch.float64)
        ref = [r + u.view_as(r) for r, u in zip(ref, upd.split([r.numel() for r in ref]))]
    assert_all_equal([p.detach() for p in params], ref)
    assert_all_equal(state_tensors(opt), [*state.stats, *state.hidden])
    assert all(t.dtype == torch.float64 for t in state_tensors(opt))


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_parameter_dtypes_run_in_the_compute_dtype(name, dtype, make_lopt):
    """Default compute dtype float32 (the learned optimizer's): gradients cast to it, each update added
    in the wider dtype and rounded once to the parameter's dtype; state stays float32, also through
    a state_dict round trip (torch.optim would cast it to the parameters' dtype)."""
    lopt = make_lopt(name)
    params = make_params(dtype)
    ref = [p.detach().clone() for p in params]
    opt = Adapter(params, lopt)
    state = lopt.init_state(sum(p.numel() for p in params))
    wide = torch.promote_types(dtype, torch.float32)
    for t in range(2):
        grads = make_grads(t, dtype)
        opt.step(set_grads(params, grads, loss_at(t)))
        upd, state = pure(lopt, state, grads, t, ref)
        ref = [(r.to(wide) + u.view(r.shape).to(wide)).to(dtype)
               for r, u in zip(ref, upd.split([r.numel() for r in ref]))]
    assert_all_equal([p.detach() for p in params], ref)
    assert all(p.dtype == dtype for p in params)
    assert_all_equal(state_tensors(opt), [*state.stats, *state.hidden])
    assert all(t.dtype == torch.float32 for t in state_tensors(opt))
    opt2 = Adapter(make_params(dtype), lopt)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert_all_equal(state_tensors(opt2), state_tensors(opt))


@pytest.mark.parametrize("name", ALL)
def test_mixed_dtype_param_groups(name, make_lopt):
    lopt = make_lopt(name)
    dtypes = [torch.float64, torch.bfloat16, torch.float32, torch.float16]
    params = [make_params(d, [s])[0] for d, s in zip(dtypes, SHAPES)]
    ref = [p.detach().clone() for p in params]
    opt = Adapter([{"params": params[:2]}, {"params": params[2:]}], lopt)
    state = lopt.init_state(sum(p.numel() for p in params))
    for t in range(2):
        grads = [g.to(d) for g, d in zip(make_grads(t), dtypes)]
        opt.step(set_grads(params, grads, loss_at(t)))
        upd, state = pure(lopt, state, grads, t, ref)
        ref = [(r.to(w) + u.view(r.shape).to(w)).to(r.dtype)
               for r, u, w in zip(ref, upd.split([r.numel() for r in ref]),
                                  [torch.promote_types(d, torch.float32) for d in dtypes])]
    assert_all_equal([p.detach() for p in params], ref)


@pytest.mark.parametrize("name", ALL)
def test_weight_decay_is_decoupled(name, make_lopt):
    """p <- p - lr*weight_decay*p before the learned update (AdamW), the update computed from the
    gradients at the undecayed parameters; a group without the key has weight_decay 0."""
    lopt = make_lopt(name)
    params = make_params()
    ref = [p.detach().clone() for p in params]
    opt = Adapter([{"params": params[:2], "weight_decay": 0.1, "lr": 0.5},
                   {"params": params[2:3], "weight_decay": 0.2, "lr": torch.tensor(0.25)},
                   {"params": params[3:]}], lopt)
    assert opt.param_groups[2]["weight_decay"] == 0.0
    state = lopt.init_state(sum(p.numel() for p in params))
    factors = [(0.5, 0.1)] * 2 + [(torch.tensor(0.25), 0.2), (1.0, 0.0)]
    for t in range(2):
        grads = make_grads(t)
        opt.step(set_grads(params, grads, loss_at(t)))
        upd, state = pure(lopt, state, grads, t, ref)
        ref = [(r * (1 - lr * wd) if wd else r) + (u.view_as(r) * lr if lr != 1.0 else u.view_as(r))
               for r, u, (lr, wd) in zip(ref, upd.split([r.numel() for r in ref]), factors)]
    assert_all_equal([p.detach() for p in params], ref)


# ----------------------------------------------------------------------------- missing and zero gradients
@pytest.mark.parametrize("name", ALL)
def test_parameters_without_gradient_are_skipped(name, make_lopt):
    """At a step the learned optimizer runs on the parameters with a gradient only, as if the others
    were not in the optimizer (SimpleOptimizer's mean embedding over those coordinates); a parameter
    without a gradient and its state stay exactly as they were."""
    lopt = make_lopt(name)
    params = make_params()
    opt = Adapter(params, lopt)
    n = sum(p.numel() for p in params)
    keep = torch.ones(n, dtype=torch.bool)
    keep[12:15] = False  # the coordinates of parameter 1, which has no gradient at steps 1 and 2

    def per_coord(x):
        return x.dim() > 0 and x.shape[0] == n

    def on_state(f, *states):
        return l2l_zoo.OptState(states[-1].step, *(tuple(f(*xs) for xs in zip(*(getattr(s, kind) for s in states)))
                                                   for kind in ("stats", "hidden")))
    # step 0: every parameter has a gradient (so parameter 1's state is not trivially fresh)
    start = [p.detach().clone() for p in params]
    opt.step(set_grads(params, make_grads(0), loss_at(0)))
    full = pure(lopt, lopt.init_state(n), make_grads(0), 0, start)[1]
    frozen = params[1].detach().clone()
    frozen_state = {k: v.clone() for k, v in opt.state[params[1]].items() if k != "step"}
    for t in (1, 2):
        before = torch.cat([p.detach().reshape(-1) for p in params])
        grads = make_grads(t)
        opt.step(set_grads(params, [None if i == 1 else g for i, g in enumerate(grads)], loss_at(t)))
        # reference: the pure update over parameters 0, 2, 3 and their rows of the state
        sub = on_state(lambda x: x[keep] if per_coord(x) else x, full)
        others = [g for i, g in enumerate(grads) if i != 1]
        upd, sub = pure(lopt, sub, others, t, [before[keep]])

        def back(x, x_sub):
            if not per_coord(x):
                return x_sub
            x = x.clone()
            x[keep] = x_sub
            return x
        full = on_state(back, full, sub)
        expected = before.clone()
        expected[keep] += upd
        assert torch.equal(torch.cat([p.detach().reshape(-1) for p in params]), expected)
        assert torch.equal(params[1].detach(), frozen)
        assert all(torch.equal(opt.state[params[1]][key], v) for key, v in frozen_state.items())
    assert_all_equal(state_tensors(opt), [*full.stats, *full.hidden])


@pytest.mark.parametrize("name", ALL)
def test_skipping_equals_an_optimizer_without_those_parameters(name, make_lopt):
    """From a fresh state, [a, b, c] with b never getting a gradient == an adapter over [a, c]."""
    lopt = make_lopt(name)
    params, other = make_params(), make_params()
    opt = Adapter(params, lopt)
    opt_ac = Adapter([other[0], other[2], other[3]], lopt)
    b0 = params[1].detach().clone()
    for t in range(3):
        grads = make_grads(t)
        opt.step(set_grads(params, [grads[0], None, grads[2], grads[3]], loss_at(t)))
        opt_ac.step(set_grads([other[0], other[2], other[3]], [grads[0], grads[2], grads[3]], loss_at(t)))
    assert_all_equal([params[i].detach() for i in (0, 2, 3)], [other[i].detach() for i in (0, 2, 3)])
    assert torch.equal(params[1].detach(), b0)
    for i, j in ((0, 0), (2, 2), (3, 3)):
        st, ref = opt.state[params[i]], opt_ac.state[other[j]]
        assert st.keys() == ref.keys() and all(torch.equal(st[k], ref[k]) for k in st)
    fresh = lopt.init_state(params[1].numel())
    for k in per_coordinate(lopt):  # never stepped: still the fresh state
        kind, j = k.split("_")
        assert torch.equal(opt.state[params[1]][k], getattr(fresh, kind)[int(j)])


@pytest.mark.parametrize("name", ALL)
def test_none_grad_zero_feeds_zeros(name, make_lopt):
    """The former behaviour, as an option: a missing gradient is a zero gradient."""
    lopt = make_lopt(name)
    params = make_params()
    ref = [p.detach().clone() for p in params]
    opt = Adapter(params, lopt, none_grad="zero")
    state = lopt.init_state(sum(p.numel() for p in params))
    for t in range(2):
        grads = make_grads(t)
        grads[1] = None
        opt.step(set_grads(params, grads, loss_at(t)))
        grads[1] = torch.zeros(SHAPES[1])
        upd, state = pure(lopt, state, grads, t, ref)
        ref = [r + u.view_as(r) for r, u in zip(ref, upd.split([r.numel() for r in ref]))]
    assert_all_equal([p.detach() for p in params], ref)
    assert_all_equal(state_tensors(opt), [*state.stats, *state.hidden])


@pytest.mark.parametrize("name", ALL)
def test_explicit_zero_gradient_is_a_gradient(name, make_lopt):
    """A zero gradient is not skipped: the state advances as the pure update with zeros says."""
    lopt = make_lopt(name)
    params = make_params()
    ref = [p.detach().clone() for p in params]
    opt = Adapter(params, lopt)
    state = lopt.init_state(sum(p.numel() for p in params))
    for t in range(2):
        grads = [torch.zeros(s) for s in SHAPES]
        opt.step(set_grads(params, grads, loss_at(t)))
        upd, state = pure(lopt, state, grads, t, ref)
        ref = [r + u.view_as(r) for r, u in zip(ref, upd.split([r.numel() for r in ref]))]
    assert opt._flat.step == 2
    assert_all_equal([p.detach() for p in params], ref)
    assert_all_equal(state_tensors(opt), [*state.stats, *state.hidden])


@pytest.mark.parametrize("name", ALL)
def test_no_gradient_at_all_changes_nothing_and_full_steps_do_not_gather(name, make_lopt):
    params = make_params()
    opt = Adapter(params, make_lopt(name))
    opt.step(set_grads(params, make_grads(0), loss_at(0)))
    before, state = [p.detach().clone() for p in params], state_tensors(opt)
    opt.step(set_grads(params, [None] * 4, loss_at(1)))
    assert_all_equal([p.detach() for p in params], before)
    assert_all_equal(state_tensors(opt), state)
    assert opt._flat.step == 1

    def no_copies(*a, **k):
        raise AssertionError("a step where every parameter has a gradient must not gather sub-states")
    opt._gather = opt._scatter = no_copies
    opt.step(set_grads(params, make_grads(1), loss_at(1)))
    assert opt._flat.step == 2


# ----------------------------------------------------------------------------- non-finite gradients
@pytest.mark.parametrize("name", ALL)
def test_nonfinite_gradient_raises_and_modifies_nothing(name, make_lopt):
    params = make_params()
    opt = Adapter(params, make_lopt(name))
    opt.step(set_grads(params, make_grads(0), loss_at(0)))
    before, state = [p.detach().clone() for p in params], state_tensors(opt)
    grads = make_grads(1)
    grads[2][1, 3] = float("nan")
    with pytest.raises(FloatingPointError, match=r"non-finite gradient in parameter 2 \(shape \(2, 5\)\) at step 1"):
        opt.step(set_grads(params, grads, loss_at(1)))
    assert_all_equal([p.detach() for p in params], before)
    assert_all_equal(state_tensors(opt), state)
    assert opt._flat.step == 1


@pytest.mark.parametrize("name", ALL)
def test_nonfinite_skip_skips_the_step_counts_and_warns_once(name, make_lopt):
    params, clean = make_params(), make_params()
    opt = Adapter(params, make_lopt(name), nonfinite="skip")
    ref = Adapter(clean, make_lopt(name))
    bad = make_grads(1)
    bad[0][0, 0] = float("inf")
    opt.step(set_grads(params, make_grads(0), loss_at(0)))
    ref.step(set_grads(clean, make_grads(0), loss_at(0)))
    with pytest.warns(RuntimeWarning, match="non-finite gradient in parameter 0"):
        opt.step(set_grads(params, bad, loss_at(1)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step(set_grads(params, bad, loss_at(1)))
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)], "warn once"
    assert opt.nonfinite_skips == 2
    opt.step(set_grads(params, make_grads(1), loss_at(1)))
    ref.step(set_grads(clean, make_grads(1), loss_at(1)))
    assert_all_equal([p.detach() for p in params], [p.detach() for p in clean])
    assert_all_equal(state_tensors(opt), state_tensors(ref))


# ----------------------------------------------------------------------------- state, copies, hooks
@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("how", ["snapshot", "torch.save", "without-record", "float-step", "int-step"])
def test_state_dict_roundtrip_resumes_bit_identically(name, how, make_lopt, tmp_path):
    lopt = make_lopt(name)
    model, data = tiny_model(), batches(6)
    opt = Adapter(model.parameters(), lopt)
    train(model, opt, data[:3])
    sd = opt.state_dict()  # "snapshot": used as is, after further steps (never written in place)
    assert len(sd["state"]) == len(list(model.parameters())) and sd["state"][0]["step"] == 3
    if how == "torch.save":
        torch.save(sd, tmp_path / "opt.pt")
        sd = torch.load(tmp_path / "opt.pt", weights_only=True)
    elif how != "snapshot":
        sd = copy.deepcopy(sd)
        if how == "without-record":  # state dicts written before the record existed
            del sd["learned_optimizer"]
        for st in sd["state"].values():
            st["step"] = {"float-step": 3.0, "int-step": 3}.get(how, st["step"])
    saved_model = copy.deepcopy(model)
    train(model, opt, data[3:])
    opt2 = Adapter(saved_model.parameters(), lopt)
    opt2.load_state_dict(sd)
    train(saved_model, opt2, data[3:])
    assert_all_equal(list(model.parameters()), list(saved_model.parameters()))
    assert_all_equal(state_tensors(opt), state_tensors(opt2))


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_of_the_adapter_step_bit_identically(name, how, make_lopt):
    """deepcopy and pickle (which ``torch.save(opt)`` uses too: reloading a whole adapter object
    needs ``torch.load(..., weights_only=False)``, which this project does not use) give working
    copies whose steps are bit-identical to the original's."""
    model, data = tiny_model(), batches(5)
    opt = Adapter(model.parameters(), make_lopt(name))
    train(model, opt, data[:2])
    if how == "deepcopy":
        model2, opt2 = copy.deepcopy((model, opt))
    else:
        model2, opt2 = pickle.loads(pickle.dumps((model, opt)))
    train(model, opt, data[2:])
    train(model2, opt2, data[2:])
    assert_all_equal(list(model.parameters()), list(model2.parameters()))
    assert_all_equal(state_tensors(opt), state_tensors(opt2))
    # the copy's state entries are views of its own flat state
    flat_ptrs = {t.untyped_storage().data_ptr() for t in (*opt2._flat.stats, *opt2._flat.hidden)}
    assert all(v.untyped_storage().data_ptr() in flat_ptrs
               for st in opt2.state.values() for k, v in st.items() if k != "step")
    assert "differentiable" not in opt2.defaults


@pytest.mark.parametrize("name", ALL)
def test_state_holds_views_of_the_current_state(name, make_lopt):
    """``opt.state[p]`` is current after every step and is no second copy of the state."""
    lopt = make_lopt(name)
    params = make_params()
    opt = Adapter(params, lopt)
    assert len(opt.state) == 0  # lazily initialised at the first step, as torch optimizers
    keys = per_coordinate(lopt)
    for t in range(2):
        opt.step(set_grads(params, make_grads(t), loss_at(t)))
        flat = {f"{kind}_{j}": x for kind in ("stats", "hidden") for j, x in enumerate(getattr(opt._flat, kind))}
        o = 0
        for i, p in enumerate(params):
            st = opt.state[p]
            assert float(st["step"]) == t + 1
            for k in keys:
                assert torch.equal(st[k], flat[k][o:o + p.numel()])
                assert st[k].untyped_storage().data_ptr() == flat[k].untyped_storage().data_ptr()
            for k in flat.keys() - set(keys):  # global entries live on the first parameter
                assert (f"global_{k}" in st) == (i == 0)
                if i == 0:
                    assert st[f"global_{k}"] is flat[k]
            o += p.numel()
    sd = opt.state_dict()
    assert all(sd["state"][i][k] is opt.state[p][k] for i, p in enumerate(params) for k in opt.state[p])


@pytest.mark.parametrize("name", ALL)
def test_torch_optim_hooks_fire(name, make_lopt):
    model, data = tiny_model(), batches(1)
    opt = Adapter(model.parameters(), make_lopt(name))
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("step_pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append(("step_post", o._flat.step)))
    opt.register_state_dict_pre_hook(lambda o: calls.append("state_dict_pre"))
    opt.register_state_dict_post_hook(lambda o, sd: calls.append(("state_dict_post", len(sd["state"]))))

    def load_pre(o, sd):
        calls.append("load_pre")
        sd = copy.deepcopy(sd)
        sd["param_groups"][0]["lr"] = 0.25  # a pre-hook may rewrite the state dict
        return sd
    opt.register_load_state_dict_pre_hook(load_pre)
    opt.register_load_state_dict_post_hook(lambda o: calls.append(("load_post", o._flat.step, len(o.state))))
    handle = register_optimizer_step_pre_hook(lambda o, a, k: calls.append("global_pre"))
    try:
        train(model, opt, data)
    finally:
        handle.remove()
    opt.load_state_dict(opt.state_dict())
    n = len(list(model.parameters()))
    assert calls == ["global_pre", "step_pre", ("step_post", 1), "state_dict_pre", ("state_dict_post", n),
                     "load_pre", ("load_post", 1, n)]
    assert opt.param_groups[0]["lr"] == 0.25


# ----------------------------------------------------------------------------- param groups and lr
@pytest.mark.parametrize("name", ALL)
def test_add_param_group_after_steps_starts_new_coordinates_fresh(name, make_lopt):
    """Progressive unfreezing: existing coordinates keep their state exactly, new ones start fresh,
    and the next step is the pure update from that state (new group's lr applied)."""
    lopt = make_lopt(name)
    params = make_params()
    opt = Adapter(params[:2], lopt)
    n_old, n = sum(p.numel() for p in params[:2]), sum(p.numel() for p in params)
    for t in range(2):
        opt.step(set_grads(params[:2], make_grads(t)[:2], loss_at(t)))
    old = copy.deepcopy(opt._flat)
    opt.add_param_group({"params": params[2:], "lr": 0.5})
    fresh = lopt.init_state(n)

    def expect(x_old, x_fresh):
        if x_old.dim() > 0 and x_old.shape[0] == n_old and x_fresh.shape[0] == n:
            return torch.cat([x_old, x_fresh[n_old:]])
        return x_old
    state = l2l_zoo.OptState(old.step, tuple(map(expect, old.stats, fresh.stats)),
                             tuple(map(expect, old.hidden, fresh.hidden)))
    assert_all_equal(state_tensors(opt), [*state.stats, *state.hidden])
    assert all(params[i] in opt.state for i in (2, 3))
    before = [p.detach().clone() for p in params]
    grads = make_grads(2)
    opt.step(set_grads(params, grads, loss_at(2)))
    upd, state = pure(lopt, state, grads, 2, before)
    ref = [b + (u.view_as(b) if i < 2 else (u * 0.5).view_as(b))
           for i, (b, u) in enumerate(zip(before, upd.split([b.numel() for b in before])))]
    assert_all_equal([p.detach() for p in params], ref)
    assert_all_equal(state_tensors(opt), [*state.stats, *state.hidden])


@pytest.mark.parametrize("name", ALL)
def test_tensor_lr_of_any_one_element_shape_equals_a_float_lr(name, make_lopt):
    results = []
    for lr in (0.3, torch.tensor(0.3), torch.tensor([0.3]), torch.tensor([[0.3]]),
               torch.tensor([[[0.3]]], dtype=torch.float64)):
        params = make_params()  # includes 1-D parameters, which a (1, 1) lr used to break
        opt = Adapter([{"params": params[:2]}, {"params": params[2:], "lr": lr}], make_lopt(name), lr=lr)
        for t in range(2):
            opt.step(set_grads(params, make_grads(t), loss_at(t)))
        results.append([p.detach().clone() for p in params])
    for r in results[1:]:
        assert_all_equal(r, results[0])


def test_lr_is_validated_at_construction_in_add_param_group_and_at_step():
    p = torch.nn.Parameter(torch.ones(3))
    lopt = l2l_zoo.create("simple")
    for bad, msg in ((torch.ones(2), r"exactly one element, got a tensor of shape \(2,\)"),
                     (torch.ones(0), r"exactly one element, got a tensor of shape \(0,\)"),
                     (-1.0, "finite number >= 0, got -1.0"), (float("nan"), "finite number >= 0"),
                     (torch.tensor(float("inf")), "finite number >= 0"), ("0.1", "got '0.1'")):
        with pytest.raises(ValueError, match=msg):
            Adapter([p], lopt, lr=bad)
        opt = Adapter([p], lopt)
        with pytest.raises(ValueError, match="param group lr must be"):
            opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))], "lr": bad})
        assert len(opt.param_groups) == 1
    opt = Adapter([p], lopt)
    opt.param_groups[0]["lr"] = torch.ones(2)  # as a misbehaving scheduler might
    with pytest.raises(ValueError, match=r"exactly one element, got a tensor of shape \(2,\)"):
        opt.step(set_grads([p], [torch.ones(3)], 1.0))
    assert torch.equal(p.detach(), torch.ones(3)) and opt._flat is None and len(opt.state) == 0


def test_lr_schedulers_drive_float_and_tensor_lr(make_lopt):
    for lr in (1.0, torch.tensor(1.0)):
        model, data = tiny_model(), batches(2)
        opt = Adapter(model.parameters(), make_lopt("dm"), lr=lr)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        train(model, opt, data[:1])
        sched.step()
        assert float(opt.param_groups[0]["lr"]) == 0.5
        train(model, opt, data[1:])


# ----------------------------------------------------------------------------- error inputs
def test_rejects_bad_constructor_arguments_and_parameters():
    ok = [torch.nn.Parameter(torch.ones(2))]
    lopt = l2l_zoo.create("simple")
    with pytest.raises(TypeError, match="lopt must be a LearnedOptimizer, got SGD"):
        Adapter(ok, torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=1))
    for kw, msg in ((dict(weight_decay=-0.1), "weight_decay must be a finite number >= 0, got -0.1"),
                    (dict(weight_decay=float("inf")), "weight_decay must be"),
                    (dict(weight_decay=True), "weight_decay must be"),
                    (dict(compute_dtype=torch.int32), "compute_dtype must be a floating-point"),
                    (dict(none_grad="ignore"), r"none_grad must be one of \('skip', 'zero'\), got 'ignore'"),
                    (dict(nonfinite="warn"), r"nonfinite must be one of \('raise', 'skip'\), got 'warn'")):
        with pytest.raises(ValueError, match=msg):
            Adapter(ok, lopt, **kw)
    with pytest.raises(ValueError, match=r"parameter 0 \(shape \(3,\)\) of param group 0 is complex"):
        Adapter([torch.nn.Parameter(torch.ones(3, dtype=torch.complex64))], lopt)
    with pytest.raises(ValueError, match="has dtype torch.int64; .* floating-point parameters only"):
        Adapter([torch.zeros(3, dtype=torch.long)], lopt)
    with pytest.raises(ValueError, match="is on meta, the others on cpu"):
        Adapter([ok[0], torch.nn.Parameter(torch.ones(2, device="meta"))], lopt)
    opt = Adapter(ok, lopt)
    for group, msg in (({"params": [torch.nn.Parameter(torch.ones(1, dtype=torch.complex128))]}, "is complex"),
                       ({"params": [torch.nn.Parameter(torch.ones(1))], "weight_decay": -1},
                        "param group weight_decay must be a finite number >= 0, got -1")):
        with pytest.raises(ValueError, match=msg):
            opt.add_param_group(group)
        assert len(opt.param_groups) == 1


def test_rejects_sparse_gradients_and_a_missing_loss(make_lopt):
    p = torch.nn.Parameter(torch.ones(4))
    opt = Adapter([p], make_lopt("simple"))
    sparse = torch.sparse_coo_tensor(torch.tensor([[1]]), torch.tensor([2.0]), (4,))
    with pytest.raises(RuntimeError, match=r"parameter 0 \(shape \(4,\)\) has a sparse gradient"):
        opt.step(set_grads([p], [sparse], 1.0))
    p.grad = torch.ones(4)
    opt = Adapter([p], make_lopt("mlrsnet"))
    with pytest.raises(ValueError, match="'mlrsnet' needs the loss"):
        opt.step()
    assert torch.equal(p.detach(), torch.ones(4)) and opt._flat is None


def _stepped_state_dict(opt_factory, params):
    opt = opt_factory(params)
    opt.zero_grad()
    (sum((q * q).sum() for q in params)).backward()
    opt.step(lambda: 1.0) if isinstance(opt, Adapter) else opt.step()
    return opt.state_dict()


@pytest.mark.parametrize("name", ALL)
def test_load_state_dict_rejects_foreign_states_and_changes_nothing(name, make_lopt):
    params = make_params()
    opt = Adapter(params, make_lopt(name))
    opt.step(set_grads(params, make_grads(0), loss_at(0)))
    before, groups = state_tensors(opt), copy.deepcopy(opt.param_groups)
    foreign = {
        "SGD": (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), "state of a torch.optim optimizer"),
        "SGD, no state": (lambda ps: torch.optim.SGD(ps, lr=0.1), "state of a torch.optim optimizer"),
        "Adam": (lambda ps: torch.optim.Adam(ps), "state of a torch.optim optimizer"),
    }
    for other in ALL:
        if other != name:
            foreign[other] = (lambda ps, o=other: Adapter(ps, make_lopt(o)),
                              f"written for learned optimizer {other!r}")
    for label, (factory, msg) in foreign.items():
        sd = _stepped_state_dict(factory, make_params())
        with pytest.raises(ValueError, match=msg):
            opt.load_state_dict(sd)
        if "learned_optimizer" in sd:  # without the record: caught by the keys or shapes of the state
            del sd["learned_optimizer"]
            with pytest.raises(ValueError, match="state of parameter 0 has keys|has shape"):
                opt.load_state_dict(sd)
        assert_all_equal(state_tensors(opt), before)
        assert opt.param_groups[0]["lr"] == groups[0]["lr"] and len(opt.state) == len(params)


@pytest.mark.parametrize("name", ALL)
def test_load_state_dict_checks_every_parameter_shape(name, make_lopt):
    """Same total number of coordinates, different per-parameter sizes: rows would pair with the
    wrong coordinates."""
    lopt = make_lopt(name)
    keys = per_coordinate(lopt)
    assert keys, f"{name}: the registry's optimizers all keep per-coordinate state (LOPT_OPTIONS)"
    a = make_params(shapes=[(3,), (5,)])
    opt_a = Adapter(a, lopt)
    opt_a.step(set_grads(a, [torch.ones(3), torch.ones(5)], 1.0))
    b = make_params(shapes=[(5,), (3,)])
    opt_b = Adapter(b, lopt)
    with pytest.raises(ValueError, match=rf"state entry '{keys[0]}' of parameter 0 \(shape \(5,\), 5 coordinates\) "
                                         rf"has shape \(3[,)]"):
        opt_b.load_state_dict(opt_a.state_dict())
    assert len(opt_b.state) == 0 and opt_b._flat is None


def test_load_state_dict_rejects_another_config_and_bad_steps(make_lopt):
    params = make_params()
    opt = Adapter(params, make_lopt("simple"))
    opt.step(set_grads(params, make_grads(0), 1.0))
    sd = opt.state_dict()
    assert sd["learned_optimizer"] == {"name": "simple", "config": make_lopt("simple").config}
    other = Adapter(make_params(), make_lopt("simple", hidden_size=4))
    with pytest.raises(ValueError, match=r"written for learned optimizer 'simple' with config .*'hidden_size': 10"):
        other.load_state_dict(sd)
    sd = copy.deepcopy(sd)
    sd["state"][1]["step"] = torch.tensor(2.0)
    with pytest.raises(ValueError, match=r"different steps \[1, 2\]"):
        Adapter(make_params(), make_lopt("simple")).load_state_dict(sd)
    sd["state"][1]["step"] = 1.5
    with pytest.raises(ValueError, match="state of parameter 1: step must be an integer >= 0"):
        Adapter(make_params(), make_lopt("simple")).load_state_dict(sd)


# ----------------------------------------------------------------------------- real training
def test_untrained_simple_optimizer_trains_real_mnist(mnist_small):
    """The adapter drives an ordinary training loop on real data: loss falls."""
    from l2l_zoo.tasks import Task
    task = Task("mlp", lambda: MLP(784, (64,), 10), mnist_small, batch_size=128)
    torch.manual_seed(0)
    model = task.build_model(seed=0)
    opt = Adapter(model.parameters(), l2l_zoo.create("simple"))
    before, _ = task.evaluate(model, "train")
    gen = torch.Generator().manual_seed(0)
    for _ in range(100):
        x, y = task.sample_batch(gen)
        opt.zero_grad()
        task.loss(model(x), y).backward()
        opt.step()
    after, acc = task.evaluate(model, "test")
    assert after < 0.7 * before, (before, after)
