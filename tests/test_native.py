"""The native kernels (``l2l_zoo/optimizers/simple_cell.c`` and ``lstm_cell.c`` via ``l2l_zoo.native``)
against the torch formulas they replace, their tanh and sigmoid against float64, thread-count
independence, and the fallback when they cannot be built."""
import subprocess
import sys

import pytest
import torch

import l2l_zoo
from l2l_zoo import native
from l2l_zoo.base import reference_kernels
from l2l_zoo.optimizers import features, simple

lib = native.simple_cell()
needs_lib = pytest.mark.skipif(lib is None, reason="native kernels could not be built here (no C compiler)")


def _inputs(n, H, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, scale=1.0: torch.randn(*s, generator=g, dtype=dtype) * scale
    return dict(gv=r(n, scale=0.3), hT=r(H, n, scale=0.5), w_ih=r(H, 1), w_hh=r(H, H, scale=0.3), w_out=r(H),
                bias=r(H))


def _fwd(x, use_native, bias=True):
    return simple._cell_chunks(x["gv"], x["hT"], x["w_ih"], x["w_hh"], x["w_out"], x["bias"] if bias else None,
                               100, use_native)


def _cell_grads(x, dtype, use_native, d_h=True, d_u=True, d_sum=True, seed=1):
    """Gradients of ⟨h', A⟩ + ⟨u, b⟩ + ⟨s, c⟩ through _FusedCell w.r.t. (g, h, w_ih, w_hh, w_out)."""
    n = x["gv"].shape[0]
    ins = [x["gv"].reshape(n, 1), x["hT"].t(), x["w_ih"], x["w_hh"], x["w_out"]]
    ins = [t.clone().requires_grad_(True) for t in ins]
    out = simple._FusedCell.apply(*ins, 100, use_native)
    g = torch.Generator().manual_seed(seed)
    loss = 0
    for o, on in zip(out, (d_h, d_u, d_sum)):
        if on:
            loss = loss + (o * torch.randn(o.shape, generator=g, dtype=torch.float64).to(dtype)).sum()
    return torch.autograd.grad(loss, ins, allow_unused=True)


@needs_lib
@pytest.mark.parametrize("H", [10, 7])
@pytest.mark.parametrize("n", [1, 256 * 3, 1000])
def test_native_cell_equals_torch_formulas_in_float64(H, n):
    """Forward (with and without bias) and every gradient, including missing incoming gradients,
    equal the torch code to float64 rounding; n = 768 is whole blocks, 1000 a partial last block."""
    x = _inputs(n, H, torch.float64)
    for bias in (True, False):
        for a, b in zip(_fwd(x, True, bias), _fwd(x, False, bias)):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    for which in [(True, True, True), (False, True, False), (True, False, True), (True, False, False)]:
        gn, gt = _cell_grads(x, torch.float64, True, *which), _cell_grads(x, torch.float64, False, *which)
        for a, b in zip(gn, gt):
            if b is None:
                assert a is None or float(a.abs().max()) == 0
            else:
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


@needs_lib
@pytest.mark.parametrize("n", [256 * 4, 1000])
def test_native_float32_blocks_match_float64(n):
    """The float32 kernel (vector blocks for H = 10, generic loops for the partial block) against
    the float64 torch formulas: float32 rounding, not a formula error."""
    x64 = _inputs(n, 10, torch.float64)
    x32 = {k: v.float() for k, v in x64.items()}
    for a, b in zip(_fwd(x32, True), _fwd(x64, False)):
        assert float((a.double() - b).abs().max()) <= 2e-6 * max(1.0, float(b.abs().max()))
    for which in [(True, True, True), (False, True, False)]:
        for a, b in zip(_cell_grads(x32, torch.float32, True, *which), _cell_grads(x64, torch.float64, False, *which)):
            assert float((a.double() - b).abs().max()) <= 2e-5 * float(b.abs().max())


@needs_lib
def test_native_tanh32_is_accurate_everywhere():
    """Absolute error ≤ 2e-7 and relative error ≤ 1e-6 over [-20, 20] and near 0 (where 2σ(2x) − 1,
    the former CPU formula, is off by over 10 % relative); odd; NaN stays NaN, ±inf gives ±1."""
    x = torch.cat([torch.linspace(-20, 20, 400001), torch.logspace(-30, 0, 3001), -torch.logspace(-30, 0, 3001),
                   torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan")])])
    y = torch.empty_like(x)
    lib.simple_cell_tanh_f32(x.numel(), x.data_ptr(), y.data_ptr())
    ref = torch.tanh(x.double())
    fin = torch.isfinite(x)
    err = (y.double() - ref)[fin].abs()
    assert float(err.max()) <= 2e-7
    assert float((err / ref[fin].abs().clamp_min(1e-38)).max()) <= 1e-6
    assert torch.isnan(y[-1]) and y[-3] == 1 and y[-2] == -1
    tiny = torch.tensor([1e-7])
    shortcut = 2.0 * torch.sigmoid(2.0 * tiny) - 1.0  # the former CPU formula
    assert abs(float(shortcut) - 1e-7) / 1e-7 > 0.05  # why SimpleOptimizer no longer uses it


@needs_lib
def test_native_results_do_not_depend_on_the_thread_count():
    x = _inputs(5000, 10, torch.float32)
    old = torch.get_num_threads()
    try:
        res = []
        for t in (1, 2):
            torch.set_num_threads(t)
            res.append(list(_fwd(x, True)) + list(_cell_grads(x, torch.float32, True)))
    finally:
        torch.set_num_threads(old)
    for a, b in zip(*res):
        assert torch.equal(a, b)


@needs_lib
def test_simple_optimizer_uses_the_native_cell_in_float32_and_float64(monkeypatch):
    calls = []
    real = simple._native_backward
    monkeypatch.setattr(simple, "_native_backward", lambda *a: calls.append(1) or real(*a))
    for dtype in (torch.float32, torch.float64):
        lopt = l2l_zoo.create("simple").to(dtype)
        lopt.fused_min = 0
        g = torch.randn(600, 1, dtype=dtype)
        u, _ = lopt.network(g, lopt.init_state(600, dtype=dtype).hidden)
        u.sum().backward()
    assert len(calls) == 2
    lopt.native = False
    lopt.network(g, lopt.init_state(600, dtype=dtype).hidden)[0].sum().backward()
    assert len(calls) == 2


def test_without_a_compiler_the_torch_code_runs_with_one_warning(tmp_path):
    """CC pointing at a compiler that fails: one RuntimeWarning naming the failure, and
    SimpleOptimizer still steps (torch fallback); L2L_ZOO_NATIVE=0 builds nothing."""
    code = ("import warnings, torch, l2l_zoo\n"
            "from l2l_zoo import native\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    lopt = l2l_zoo.create('simple'); lopt.fused_min = 0\n"
            "    for _ in range(2):\n"
            "        g = torch.randn(300, 1, requires_grad=True)\n"
            "        lopt.network(g, lopt.init_state(300).hidden)[0].sum().backward()\n"
            "print(native.simple_cell() is None, sum('native kernels unavailable' in str(x.message) for x in w))\n")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "L2L_ZOO_CACHE": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-c", code], env={**env, "CC": "false"}, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["True", "1"]
    r = subprocess.run([sys.executable, "-c", code], env={**env, "L2L_ZOO_NATIVE": "0"}, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.split() == ["True", "0"]
    assert not (tmp_path / "cache" / "native").exists() or not any((tmp_path / "cache" / "native").iterdir())


def _probe(env, tmp_path):
    code = ("import warnings, l2l_zoo\nfrom l2l_zoo import native\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    ok = native.simple_cell() is not None\n"
            "print(ok, ' | '.join(str(x.message) for x in w))\n")
    return subprocess.Popen([sys.executable, "-c", code], env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@needs_lib
def test_concurrent_first_builds_both_load_and_leave_one_library(tmp_path):
    """Two processes building into an empty cache at once: both load a whole library (each compiles
    under its own temporary name and renames), and no temporary file is left behind."""
    env = {"L2L_ZOO_CACHE": str(tmp_path / "cache")}
    procs = [_probe(env, tmp_path) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-500:] for o in outs]
    assert [o[0].split()[0] for o in outs] == ["True", "True"], outs
    files = sorted(f.name for f in (tmp_path / "cache" / "native").iterdir())
    assert len(files) == 1 and files[0].endswith(".so") and not files[0].startswith("."), files


@needs_lib
def test_a_cache_others_can_write_to_is_not_loaded(tmp_path):
    """A library in a group- or world-writable cache could have been planted: refused with a
    warning naming the folder, and the torch code runs instead."""
    env = {"L2L_ZOO_CACHE": str(tmp_path / "cache")}
    p = _probe(env, tmp_path)
    assert p.communicate(timeout=300)[0].split()[0] == "True"
    (tmp_path / "cache" / "native").chmod(0o777)
    out, err = _probe(env, tmp_path).communicate(timeout=300)
    assert out.startswith("False") and "is not private to this user" in out and "native" in out, (out, err)


@needs_lib
def test_native_calls_are_counted_for_the_benchmarks():
    """metatrain_speed.py adds NATIVE_COUNTS to torch's FLOP and byte counters, which cannot see
    inside the kernel: one forward and one backward of n coordinates add the W_hh products' FLOPs
    (2nH² forward, 2nH² per needed backward product) and each tensor's bytes once."""
    n, H = 1000, 10
    x = _inputs(n, H, torch.float32)
    before = dict(simple.NATIVE_COUNTS)
    _cell_grads(x, torch.float32, True)  # forward, then backward needing dg, dh and the weights
    flops = simple.NATIVE_COUNTS["flops"] - before["flops"]
    nbytes = simple.NATIVE_COUNTS["bytes"] - before["bytes"]
    assert flops == 2 * n * H * H * 3
    assert nbytes == 4 * ((2 * H * n + 2 * n) + (3 * H * n + 2 * n + H * n + n))


@needs_lib
def test_a_compiler_without_openmp_builds_a_serial_kernel_with_the_same_results(tmp_path):
    """A compiler that rejects -fopenmp (e.g. Apple clang) gets the kernels built without it: they
    load, and since the results do not depend on the thread count they equal the OpenMP builds'."""
    import shutil
    real_cc = shutil.which("cc") or shutil.which("gcc")
    wrapper = tmp_path / "cc-no-openmp"
    log = tmp_path / "cc.log"
    wrapper.write_text(f'#!/bin/sh\ncase " $* " in *" -fopenmp "*) echo refused >> {log}; exit 1;; *" -c "*|*-shared*) echo built >> {log};; esac\n'
                       f'exec {real_cc} "$@"\n')
    wrapper.chmod(0o755)
    code = ("import torch\nfrom l2l_zoo.optimizers import simple\nfrom l2l_zoo import native\n"
            "assert native.simple_cell() is not None\n"
            "torch.manual_seed(0)\n"
            "g, hT, wi, wh, wo = torch.randn(5000), torch.randn(10, 5000), torch.randn(10, 1), torch.randn(10, 10), torch.randn(10)\n"
            "out = simple._cell_chunks(g, hT, wi, wh, wo, None, 100, True)\n"
            "from l2l_zoo.optimizers import features\n"
            "x, hc, W, b = torch.randn(3000, 2), torch.randn(3000, 20), torch.randn(80, 22), torch.randn(80)\n"
            "out = out + features._NativeLSTMLayer.apply(x, hc, hc, W, b)\n"
            "print(' '.join(float(o.double().sum()).hex() for o in out))\n")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "L2L_ZOO_CACHE": str(tmp_path / "cache"), "CC": str(wrapper)}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert log.read_text().split() == ["refused", "built", "refused", "built"]  # simple_cell.c, lstm_cell.c
    torch.manual_seed(0)
    g, hT, wi, wh, wo = torch.randn(5000), torch.randn(10, 5000), torch.randn(10, 1), torch.randn(10, 10), torch.randn(10)
    out = simple._cell_chunks(g, hT, wi, wh, wo, None, 100, True)
    x, hc, W, b = torch.randn(3000, 2), torch.randn(3000, 20), torch.randn(80, 22), torch.randn(80)
    out = out + features._NativeLSTMLayer.apply(x, hc, hc, W, b)
    assert r.stdout.split() == [float(o.double().sum()).hex() for o in out]


@needs_lib
@pytest.mark.parametrize("aggregation", [True, False])
def test_network_segments_equals_vmapped_network_in_float64(aggregation, monkeypatch):
    """SimpleOptimizer.network_segments (T problems through one fused call, the mean embedding per
    problem) against torch.func.vmap of network: the update and its gradients w.r.t. the inputs and
    every meta-parameter, twice on the same hidden state (the layout copy is reused) and once after
    it changed in place; and the smoothness penalties of T steps batched through it against one step
    at a time, in float64."""
    from l2l_zoo.regularizers import SmoothnessConfig, SmoothnessRegularizer
    torch.manual_seed(0)
    lopt = l2l_zoo.create("simple", aggregation=aggregation).to(torch.float64)
    T, k, H = 3, 1000, lopt.config["hidden_size"]
    assert T * k >= lopt.native_min
    F = torch.randn(T, k, 1, dtype=torch.float64)
    Hs = torch.randn(T, k, H, dtype=torch.float64) * 0.5
    calls = []
    real = simple._native_backward
    monkeypatch.setattr(simple, "_native_backward", lambda *a: calls.append(1) or real(*a))

    def both():
        res = []
        for seg in (True, False):
            f = F.clone().requires_grad_(True)
            u = (lopt.network_segments(f, (Hs,)) if seg
                 else torch.func.vmap(lambda a, b: lopt.network(a, (b,))[0])(f, Hs))
            loss = (u * torch.linspace(-1, 1, T * k, dtype=torch.float64).reshape(T, k)).pow(2).sum()
            res.append((u.detach(),) + torch.autograd.grad(loss, [f] + list(lopt.parameters())))
        for a, b in zip(*res):
            assert float(b.abs().max()) > 0
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)

    both()
    both()
    Hs.mul_(-0.7)  # the same tensor changed in place: the cached layout must not be reused
    both()
    assert len(calls) == 3, "the fused native cell did not run"
    reg = SmoothnessRegularizer(SmoothnessConfig(eps=0.1, steps=3, subsample=0))
    g = torch.Generator().manual_seed(1)
    prepared = [reg.prepare(lopt, F[t], (Hs[t],), g) for t in range(T)]
    pb = reg.penalties(lopt, prepared, batched=True)
    ps = reg.penalties(lopt, prepared, batched=False)
    torch.testing.assert_close(pb, ps, rtol=1e-10, atol=1e-15)


def _segment_cell(x, seg, dtype, use_native=True):
    """_FusedCell with problems of ``seg`` coordinates: (g, h, w_ih, w_hh, w_out) leaves and the
    outputs (h', u, per-problem sums)."""
    n = x["gv"].shape[0]
    ins = [t.to(dtype).clone().requires_grad_(True)
           for t in (x["gv"].reshape(n, 1), x["hT"].t(), x["w_ih"], x["w_hh"], x["w_out"])]
    return ins, simple._FusedCell.apply(*ins, 100, use_native, seg)


@needs_lib
@pytest.mark.parametrize("seg,dtype", [(512, torch.float32), (700, torch.float64), (256 * 3, torch.float64)])
def test_segmented_cell_sums_and_gradients_per_problem(seg, dtype, monkeypatch):
    """With segments the cell's sum of h' is one row per problem, and the gradient of a per-problem
    weighting of those sums (with and without a gradient on h' and u) equals the torch formulas
    applied problem by problem in float64. Whole blocks in float32 take the vector path with no d_h
    (NULL); 700 cuts blocks at problem boundaries. The torch fallback of the backward (spreading the
    per-problem d_sum over d_h) gives the same gradients."""
    P = 3
    x = _inputs(P * seg, 10, torch.float64, seed=2)
    g = torch.Generator().manual_seed(3)
    c = torch.randn(P, 10, generator=g, dtype=torch.float64)
    b = torch.randn(P * seg, generator=g, dtype=torch.float64)
    tol = dict(rtol=1e-10, atol=1e-13) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
    for with_u in (False, True):
        ins, (hn, u, sums) = _segment_cell(x, seg, dtype)
        assert sums.shape == (P, 10)
        loss = (sums.double() * c).sum() + ((u.double() * b).sum() if with_u else 0)
        got = torch.autograd.grad(loss, ins)
        ref_ins = [t.detach().double().clone().requires_grad_(True) for t in ins]
        ref_loss = 0
        for p in range(P):
            sl = slice(p * seg, (p + 1) * seg)
            hn_p, u_p, s_p = simple._FusedCell.apply(ref_ins[0][sl], ref_ins[1][sl], *ref_ins[2:], 100, False)
            torch.testing.assert_close(sums[p].double(), s_p.detach(), **tol)
            ref_loss = ref_loss + (s_p * c[p]).sum() + ((u_p * b[sl]).sum() if with_u else 0)
        ref = torch.autograd.grad(ref_loss, ref_ins)
        for a, r in zip(got, ref):
            torch.testing.assert_close(a.double(), r, **tol)
    # the torch fallback of the backward, entered when the kernel does not apply there
    ins, (hn, u, sums) = _segment_cell(x, seg, dtype)
    loss = (sums.double() * c).sum() + (hn.double() ** 2).sum()
    native_grads = torch.autograd.grad(loss, ins, retain_graph=True)
    monkeypatch.setattr(simple, "_native_ok", lambda *a: False)
    for a, r in zip(torch.autograd.grad(loss, ins), native_grads):
        torch.testing.assert_close(a, r, **tol)


@needs_lib
def test_network_segments_passes_no_hidden_gradient_to_the_kernel(monkeypatch):
    """The smoothness PGD's stacked problems give the kernel their per-problem mean gradient as
    d_sum: no (T·k, H) broadcast of it is built and read (d_h is None), and float32 agrees with
    float64 vmap of ``network``."""
    seen = []
    real = simple._native_backward
    monkeypatch.setattr(simple, "_native_backward", lambda *a: seen.append((a[6], a[8].shape)) or real(*a))
    torch.manual_seed(0)
    lopt = l2l_zoo.create("simple")
    T, k = 4, 512
    F = torch.randn(T, k, 1) * 0.1
    Hs = torch.randn(T, k, 10) * 0.5
    f = F.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(lopt.network_segments(f, (Hs,)).pow(2).sum(), f)
    assert seen == [(None, (T, 10))]
    l64 = lopt.to(torch.float64)
    f64 = F.double().requires_grad_(True)
    u64 = torch.func.vmap(lambda a, b: l64.network(a, (b,))[0])(f64, Hs.double())
    (ref,) = torch.autograd.grad(u64.pow(2).sum(), f64)
    torch.testing.assert_close(grad.double(), ref, rtol=2e-4, atol=1e-7)


# ------------------------------------------------------------------ the coordinate-wise LSTM layer


lstm_lib = native.lstm_cell()
needs_lstm = pytest.mark.skipif(lstm_lib is None, reason="native kernels could not be built here (no C compiler)")


def _lstm_run(m, x, hidden, reference, outputs=(0, 1, 2, 3, 4), seed=1):
    """CoordLSTM ``m``'s outputs (top h, then h1, c1, h2, c2) and the gradients of a random weighting
    of the ``outputs`` chosen w.r.t. the input, the hidden state and every weight."""
    leaves = [x] + list(hidden)
    with (reference_kernels() if reference else torch.enable_grad()):
        top, new = m(x, hidden)
    outs = (top,) + new
    g = torch.Generator().manual_seed(seed)
    loss = sum((outs[i] * torch.randn(outs[i].shape, generator=g, dtype=torch.float64).to(x.dtype)).sum()
               for i in outputs)
    grads = torch.autograd.grad(loss, leaves + list(m.parameters()), allow_unused=True)
    return [o.detach() for o in outs] + list(grads)


def _lstm_inputs(n, d, dtype, seed=0, column_major=False):
    """A CoordLSTM and inputs; ``column_major``: x and the hidden state as (k, n) transposes, the
    layout the kernel writes (read in place for whole blocks)."""
    torch.manual_seed(seed)
    m = features.CoordLSTM(d, 20, 2).to(dtype)
    mk = (lambda k, s: (torch.randn(k, n, dtype=dtype) * s).t()) if column_major else (
        lambda k, s: torch.randn(n, k, dtype=dtype) * s)
    x = mk(d, 1.0).requires_grad_(True)
    hidden = tuple(mk(20, 0.7).requires_grad_(True) for _ in range(4))
    return m, x, hidden


@needs_lstm
@pytest.mark.parametrize("n,d,column_major", [(64, 2, False), (1000, 2, False), (1000, 2, True),
                                              (64 * 16 * 2 + 5, 20, False), (64 * 16 * 2 + 5, 20, True)])
def test_native_lstm_layer_equals_torch_formulas_in_float64(n, d, column_major, monkeypatch):
    """The two-layer CoordLSTM through the native layer kernel against the torch formulas (the
    reference path): outputs and every gradient to float64 rounding, for one block, a partial last
    block, and several super-blocks (the unit of the ordered weight-gradient sums), with inputs in
    either layout; also with only some outputs used (missing incoming gradients: None, not zeros)."""
    calls = []
    real = features._NativeLSTMLayer.apply
    monkeypatch.setattr(features._NativeLSTMLayer, "apply", lambda *a: calls.append(1) or real(*a))
    m, x, hidden = _lstm_inputs(n, d, torch.float64, column_major=column_major)
    m.native_min = 0
    for outputs in [(0, 1, 2, 3, 4), (0,), (2, 4), (1,)]:
        got, ref = _lstm_run(m, x, hidden, False, outputs), _lstm_run(m, x, hidden, True, outputs)
        for a, b in zip(got, ref):
            if b is None:
                assert a is None or float(a.abs().max()) == 0
            else:
                assert float(b.abs().max()) > 0
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert len(calls) == 2 * 4  # two layers, four times; the reference path never called it


@needs_lstm
def test_native_lstm_float32_and_thread_count():
    """float32: within rounding of the float64 torch formulas; and bit-identical on 1 and 2 threads."""
    m, x, hidden = _lstm_inputs(3000, 2, torch.float64)
    m.native_min = 0
    ref = _lstm_run(m, x, hidden, True)
    m32 = m.float()
    x32, h32 = x.detach().float().requires_grad_(True), tuple(h.detach().float().requires_grad_(True) for h in hidden)
    old = torch.get_num_threads()
    try:
        res = []
        for t in (1, 2):
            torch.set_num_threads(t)
            res.append(_lstm_run(m32, x32, h32, False))
    finally:
        torch.set_num_threads(old)
    for a, b in zip(*res):
        assert torch.equal(a, b)
    for a, b in zip(res[0], ref):
        assert float((a.double() - b).abs().max()) <= 2e-5 * float(b.abs().max())


@needs_lstm
def test_native_sigmoid32_is_accurate_everywhere():
    """The kernel's float32 sigmoid: relative error ≤ 3e-7 over [-87, 87] (small values keep their
    relative accuracy), NaN stays NaN, ±inf gives 1 and a tiny positive value."""
    x = torch.cat([torch.linspace(-100, 100, 400000), torch.tensor([0.0, -0.0, float("inf"), -float("inf"),
                                                                     float("nan"), 1e-30, -1e-30, 87.5])])
    y = torch.empty_like(x)
    lstm_lib.lstm_sigmoid_f32(x.numel(), x.data_ptr(), y.data_ptr())
    ref = torch.sigmoid(x.double())
    fin = torch.isfinite(x) & (x.abs() < 87)
    assert float(((y.double() - ref) / ref)[fin].abs().max()) <= 3e-7
    assert y[-6] == 1 and 0 < float(y[-5]) < 1e-37 and torch.isnan(y[-4]) and y[-1] == 1


@needs_lstm
@pytest.mark.parametrize("name", ["dm", "rnnprop"])
def test_dm_and_rnnprop_meta_train_through_the_native_layer(name, monkeypatch):
    """A meta-gradient of DM and RNNProp (one unrolled optimizer step on a quadratic) goes through the
    native layer and equals the reference path's in float64; inside torch.func.vmap, and below
    ``native_min``, the torch formulas run."""
    calls = []
    real = features._NativeLSTMLayer.apply
    monkeypatch.setattr(features._NativeLSTMLayer, "apply", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    lopt = l2l_zoo.create(name).to(torch.float64)
    lopt.lstm.native_min = 2000
    n = 3000
    A = torch.rand(n, dtype=torch.float64) + 0.1

    def meta_grad(reference):
        theta = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        state = lopt.init_state(n, dtype=torch.float64)
        with (reference_kernels() if reference else torch.enable_grad()):
            for _ in range(3):
                grad = A * theta
                step = lopt.step(grad, state)
                theta, state = theta + step.updates, step.state
            return torch.autograd.grad((A * theta * theta).sum(), list(lopt.parameters()))

    got, ref = meta_grad(False), meta_grad(True)
    assert len(calls) == 2 * 3
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    calls.clear()
    f = torch.randn(2, 100, lopt.lstm.cells[0].input_size, dtype=torch.float64)
    h = tuple(torch.zeros(2, 100, 20, dtype=torch.float64) for _ in range(4))
    lopt.lstm.native_min = 0
    torch.func.vmap(lambda a, *b: lopt.lstm(a, b)[0])(f, *h)
    assert calls == []


@needs_lstm
def test_native_lstm_with_frozen_weights_needs_no_weight_gradient_scratch():
    """Weights that do not require grad (need_w = 0): the kernel gets no scratch buffer (NULL) and
    must not write its weight-gradient partial sums; the input and state gradients still
    equal the torch formulas in float64 (several super-blocks)."""
    m, x, hidden = _lstm_inputs(64 * 16 * 3 + 7, 2, torch.float64)
    m.native_min = 0
    m.requires_grad_(False)

    def run(reference):
        with (reference_kernels() if reference else torch.enable_grad()):
            top, new = m(x, hidden)
        w = torch.randn(top.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        return [top.detach()] + list(torch.autograd.grad((top * w).sum() + new[1].sum(), [x, *hidden]))

    for a, b in zip(run(False), run(True)):
        assert float(b.abs().max()) > 0
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
