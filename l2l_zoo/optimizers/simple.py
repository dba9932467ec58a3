"""SimpleOptimizer of Chen et al. (2020), "Learning to learn with better convergence".

A bias-free vanilla RNN per coordinate fed the raw gradient (§3.1, eqs. 4-5 without b), with mean
embedding sharing across coordinates (§3.3):

    h_t   = tanh(W_ih g_t + W_hh h_{t-1})                       (n, 10)
    e_t   = [α · h_t, β · mean_i(h_t)]                           (n, 20)
    u_t   = W_out e_t,   θ_{t+1} = θ_t + u_t   (eq. 1)

Meta-parameters: W_ih 10 + W_hh 100 + W_out 20 + α + β = 132 (§4, Table 1). ``h_t`` (10-d) is
carried to the next step; the 20-d embedding feeds the output layer. With no bias anywhere a zero
gradient and zero state give a zero update, the property §3.1 argues long-horizon convergence needs.

Ablation options (Fig. 3): ``bias=True`` adds a bias to the RNN (one vector, as b in eq. 4) and to
the output layer (143 parameters); ``aggregation=False`` drops the shared embedding (W_out 10→1, no
α, β: 120 parameters). ``input_norm="rms"`` divides the gradient by √(mean(g²)+1e-5), the input used
by a public smoothed-optimizer code base (off by default: Chen et al. feed the raw gradient).

Speed: on CPU the cell runs a native kernel (``simple_cell.c``, compiled at first use by
:mod:`l2l_zoo.native`; forward and exact backward fused per block of 256 coordinates), with the torch
formulas as fallback and reference (``tests/test_native.py``, ``tests/test_fast_path.py``).

Initialisation (the paper is silent): nn.RNN/nn.Linear's uniform initialisation, α = β = 1. With
``init="descent"`` (default) the sign of W_out is then chosen so that the initial optimizer's
immediate response to a gradient, α·W_out[:H]·W_ih, is negative, i.e. it starts as a (random)
descent method rather than, with probability 1/2, as gradient *ascent*, which makes short
meta-training budgets far less seed-dependent. ``init="random"`` skips the sign choice.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..base import LearnedOptimizer, MetaDefaults, OptState, fused_kernels_enabled
from .. import native

__all__ = ["SimpleOptimizer"]

INPUT_NORMS = ("none", "rms")
INITS = ("descent", "random")


class SimpleOptimizer(LearnedOptimizer):
    name = "simple"
    meta_defaults = MetaDefaults(meta_loss="wdiff", lr=1e-3, random_scale=0.0)

    def __init__(self, *, hidden_size: int = 10, bias: bool = False, aggregation: bool = True,
                 input_norm: str = "none", init: str = "descent"):
        if hidden_size < 1:
            raise ValueError(f"hidden_size must be >= 1, got {hidden_size!r}")
        if input_norm not in INPUT_NORMS:
            raise ValueError(f"input_norm must be one of {INPUT_NORMS}, got {input_norm!r}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        super().__init__(hidden_size=hidden_size, bias=bias, aggregation=aggregation,
                         input_norm=input_norm, init=init)
        H = hidden_size
        bound = 1.0 / math.sqrt(H)  # nn.RNN's initialisation
        self.weight_ih = nn.Parameter(torch.empty(H, 1).uniform_(-bound, bound))
        self.weight_hh = nn.Parameter(torch.empty(H, H).uniform_(-bound, bound))
        self.bias_h = nn.Parameter(torch.empty(H).uniform_(-bound, bound)) if bias else None
        if aggregation:
            self.alpha = nn.Parameter(torch.ones(()))
            self.beta = nn.Parameter(torch.ones(()))
        self.out = nn.Linear(2 * H if aggregation else H, 1, bias=bias)
        if init == "descent":
            with torch.no_grad():
                if torch.dot(self.out.weight[0, :H], self.weight_ih[:, 0]) > 0:
                    self.out.weight.neg_()

    #: the autograd path uses :class:`_FusedCell` (chunked forward, hand-written backward) from this
    #: many coordinates on (below it the plain autograd formulas, whose per-op overhead is smaller);
    #: ``fused = False`` always uses the plain formulas (the reference the fused cell is tested against)
    fused: bool = True
    #: the fused cell and the no-autograd path run ``simple_cell.c`` (l2l_zoo.native) where it can be
    #: built; ``native = False`` (or ``L2L_ZOO_NATIVE=0``) keeps them on torch kernels
    native: bool = True
    #: with the native kernel the fused cell pays from this many coordinates on (measured, a
    #: forward and backward of two steps: 1,000 coordinates level, 15,910 (mlp20) 2.7x faster)
    native_min: int = 2048
    fused_min: int = 32768
    fused_chunk: int = 16384

    def init_state(self, n, *, device=None, dtype=None) -> OptState:
        # (n, H) stored column-major: the no-autograd path works on its (H, n) transpose, where the
        # small matrix products and reductions over coordinates run 2-3x faster.
        H = self._config["hidden_size"]
        return OptState(0, (), (torch.zeros(H, n, device=device, dtype=dtype).t(),))

    def features(self, grads, state, *, params=None, loss=None):
        """The gradient itself (optionally RMS-normalised), shape (n, 1)."""
        g = grads.reshape(-1, 1)
        if self._config["input_norm"] == "rms":
            g = g / torch.sqrt(g.pow(2).mean() + 1e-5)
        return g, ()

    def network(self, feats, hidden):
        (h,) = hidden
        if not torch.is_grad_enabled() or not (feats.requires_grad or h.requires_grad
                                               or self.weight_hh.requires_grad):
            with torch.no_grad():
                return self._network_chunked(feats, h)
        H = h.shape[1]
        w = self.out.weight[0]
        agg = self._config["aggregation"]
        if self._fusable(feats, h) and h.shape[0] >= (min(self.fused_min, self.native_min)
                                                      if _native_ok(self.native, feats, h, self.weight_hh)
                                                      else self.fused_min):
            # the same formulas in cache-sized chunks, backward hand-written (see _FusedCell)
            h_new, u, h_sum = _FusedCell.apply(feats, h, self.weight_ih, self.weight_hh,
                                               self.alpha * w[:H] if agg else w, self.fused_chunk,
                                               self.native)
            if agg:
                u = u + self.beta * torch.dot(h_sum / h.shape[0], w[H:])
            return u, (h_new,)
        # feats @ W_ih^T with a (n, 1) input is a broadcast product; addmm keeps it one kernel.
        pre = torch.addmm(feats * self.weight_ih[:, 0], h, self.weight_hh.t())
        if self.bias_h is not None:
            pre = pre + self.bias_h
        h = torch.tanh(pre)  # not 2σ(2x) − 1 (faster on CPU): it loses relative accuracy near 0
        # Same as out([α h, β mean(h)]) without materialising the (n, 2H) embedding.
        if agg:
            u = torch.mv(h, self.alpha * w[:H]) + self.beta * torch.dot(h.mean(0), w[H:])
        else:
            u = torch.mv(h, w)
        if self.out.bias is not None:
            u = u + self.out.bias
        return u, (h,)

    def _fusable(self, feats, h) -> bool:
        """Whether ``_FusedCell`` can compute this step at all (size thresholds aside): asked for, no
        bias (``bias=True`` adds one to the RNN and the output layer together), fused kernels not
        switched off (``reference_kernels``), not inside a ``torch.func`` transform."""
        return self.fused and self.bias_h is None and fused_kernels_enabled() and not native.functorch_wrapped(feats, h)

    def network_segments(self, feats, hidden):
        """``network``'s update for T independent problems stacked along a first dimension: ``feats``
        (T, k, 1), ``hidden`` ((T, k, H),) -> u (T, k), equal to ``torch.func.vmap`` of ``network``
        over T (the mean embedding stays per problem). The smoothness regularizer's batched PGD
        calls it (``regularizers.smoothness``): the T·k coordinates go through the fused cell in one
        call, which also returns the T per-problem sums of h' (and takes their gradient back), where
        vmap runs the plain formulas."""
        (h,) = hidden
        T, k = feats.shape[:2]
        H = h.shape[-1]
        flat_f, flat_h = feats.reshape(T * k, 1), h.reshape(T * k, H)
        if not (self._fusable(feats, h) and _native_ok(self.native, flat_f, flat_h, self.weight_hh)
                and T * k >= self.native_min):
            return torch.func.vmap(lambda f, hd: self.network(f, (hd,))[0])(feats, h)
        if flat_h.stride(0) != 1:  # the fused cell reads the (H, n) layout; PGD passes the same
            # hidden K + 2 times: copy it once. The memo holds h itself (so its memory cannot be
            # reused by another tensor while it is there) and its version (in-place changes).
            memo = getattr(self, "_segments_layout", None)
            if memo is None or memo[0] is not h or memo[1] != h._version:
                memo = (h, h._version, flat_h.t().contiguous().t())
                self._segments_layout = memo
            flat_h = memo[2]
        w = self.out.weight[0]
        agg = self._config["aggregation"]
        _, u, h_sums = _FusedCell.apply(flat_f, flat_h, self.weight_ih, self.weight_hh,
                                        self.alpha * w[:H] if agg else w, self.fused_chunk, self.native, k)
        u = u.reshape(T, k)
        if agg:  # h' itself is not used: its gradient stays None, nothing of size (T·k, H) comes back
            u = u + self.beta * torch.mv(h_sums / k, w[H:])[:, None]
        return u

    def _network_chunked(self, feats, h, chunk: int = 65536):
        """The same computation without autograd, on the (H, n) transpose of the hidden state in
        cache-sized chunks of coordinates with in-place kernels (used by the torch.optim adapter;
        ~3x faster than the autograd path on CPU). Returns the new hidden state column-major."""
        n, H = h.shape
        w = self.out.weight[0]
        agg = self._config["aggregation"]
        newT, u, h_sum = _cell_chunks(feats.reshape(-1), h.t(), self.weight_ih, self.weight_hh,
                                      self.alpha * w[:H] if agg else w, self.bias_h, chunk, self.native)
        if agg:
            u += self.beta * torch.dot(h_sum / n, w[H:])
        if self.out.bias is not None:
            u += self.out.bias
        return u, (newT.t(),)


def _native_ok(use, *ts) -> bool:
    """Whether the native cell kernels apply: asked for (``use``), CPU, float32 or float64, one dtype,
    and buildable (l2l_zoo.native)."""
    return use and native.plain_cpu(*ts) and native.simple_cell() is not None


#: the native kernels' byte and FLOP counters (``native.COUNTS``); the FLOPs counted here are the
#: products with W_hh, which the torch formulas run as mm/addmm (the rank-1 and matrix-vector products
#: with w_ih and w_out are not counted there either)
NATIVE_COUNTS = native.COUNTS


def _native_forward(gv, hT, w_ih, w_hh, w_out, bias, seg=None):
    """``_cell_chunks``'s result from ``simple_cell.c`` (one pass over memory, see there). With
    ``seg``, the n coordinates are n / seg problems of ``seg`` each and the sum of h' is per problem,
    shape (n / seg, H)."""
    H, n = hT.shape
    seg = n if seg is None else seg
    gv, hT = gv.contiguous(), hT.contiguous()
    w_ih, w_hh, w_out = (w.detach().reshape(s).contiguous() for w, s in ((w_ih, H), (w_hh, (H, H)), (w_out, H)))
    bias = None if bias is None else bias.detach().contiguous()
    nseg = n // seg
    newT, u = hT.new_empty(H, n), hT.new_empty(n)
    h_sum = hT.new_empty(nseg, H) if seg != n else hT.new_empty(H)
    lib = native.simple_cell()
    part = hT.new_empty(lib.simple_cell_forward_scratch(n, seg, H))
    getattr(lib, "simple_cell_forward_" + native.SUFFIX[hT.dtype])(
        n, seg, H, *map(native.ptr, (gv, hT, w_ih, w_hh, w_out, bias, newT, u, h_sum, part)), torch.get_num_threads())
    NATIVE_COUNTS["bytes"] += hT.element_size() * (2 * H * n + 2 * n)  # g, h read; h', u written
    NATIVE_COUNTS["flops"] += 2 * n * H * H
    return newT, u, h_sum


def _cell_chunks(gv, hT, w_ih, w_hh, w_out, bias, chunk, use_native=False):
    """h' = tanh(W_hh h + w_ih g + b) in chunks of ``chunk`` coordinates, each written in place into
    a new (H, n) tensor while cache-resident, with u = h'ᵀ w_out (n,) and Σ_i h'_i (H,). ``gv``: (n,),
    ``hT``: (H, n). No autograd (callers wrap it). Runs the native kernel where it applies."""
    if _native_ok(use_native, gv, hT, w_hh):
        return _native_forward(gv, hT, w_ih, w_hh, w_out, bias)
    H, n = hT.shape
    newT = torch.empty(H, n, dtype=hT.dtype, device=hT.device)
    u = hT.new_empty(n)
    h_sum = hT.new_zeros(H)
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        out = newT[:, s:e]  # a row-major block with leading dimension n: written in place
        torch.mm(w_hh, hT[:, s:e], out=out)
        out.addr_(w_ih[:, 0], gv[s:e])
        if bias is not None:
            out.add_(bias[:, None])
        out.tanh_()
        torch.mv(out.t(), w_out, out=u[s:e])
        h_sum += out.sum(1)
    return newT, u, h_sum


def _native_backward(gv, hT, newT, w_ih, w_hh, w_out, d_h, d_u, d_sum, need_g, need_h, need_w, seg=None):
    """``_FusedCell.backward``'s gradients from ``simple_cell.c``: (dg, dhT, dw_ih, dw_hh, dw_out).
    With ``seg``, ``d_sum`` is per problem of ``seg`` coordinates, shape (n / seg, H)."""
    H, n = newT.shape
    seg = n if seg is None else seg
    # every tensor handed over is bound to a name here: a temporary could be freed before the call
    gv, hT, newT = gv.contiguous(), hT.contiguous(), newT.contiguous()
    w_ih, w_hh, w_out = w_ih.reshape(H).contiguous(), w_hh.contiguous(), w_out.contiguous()
    # a missing d_h is passed as NULL (the kernel reads nothing); zeros for a missing d_u or d_sum,
    # which the kernel's fast block needs (both small)
    dT = None if d_h is None else d_h.t().contiguous()
    d_u = newT.new_zeros(n) if d_u is None else d_u.contiguous()
    d_sum = newT.new_zeros(n // seg, H) if d_sum is None else d_sum.contiguous()
    dg = gv.new_empty(n) if need_g else None
    dhT = newT.new_empty(H, n) if need_h else None
    dw_ih, dw_hh, dw_out = w_ih.new_zeros(H), w_hh.new_zeros(H, H), w_out.new_zeros(H)
    lib = native.simple_cell()
    part = newT.new_empty(lib.simple_cell_backward_scratch(n, seg, H))
    getattr(lib, "simple_cell_backward_" + native.SUFFIX[newT.dtype])(
        n, seg, H, *map(native.ptr, (gv, hT, newT, w_ih, w_hh, w_out, dT, d_u, d_sum, dg, dhT)),
        int(bool(need_w)), *map(native.ptr, (dw_ih, dw_hh, dw_out, part)), torch.get_num_threads())
    NATIVE_COUNTS["bytes"] += newT.element_size() * ((3 - (dT is None)) * H * n + 2 * n + (H * n + n) * bool(need_h))
    NATIVE_COUNTS["flops"] += 2 * n * H * H * (bool(need_w) + bool(need_h))
    return dg, dhT, dw_ih, dw_hh, dw_out


class _FusedCell(torch.autograd.Function):
    """The SimpleOptimizer cell with its output layer, in chunks of coordinates:

        h' = tanh(g·w_ihᵀ + h W_hhᵀ)  (n, H),   u = h' w  (n,),   s = Σ_i h'_i  (H,)

    The plain autograd formulas make ~10 passes over (n, H) tensors in each direction, each larger
    than the CPU caches (n = 397,510: 16 MB); here every chunk's forward and backward run while it is
    cache-resident, and the hidden states are kept (H, n) row-major, the layout of ``init_state``.
    The backward is the exact derivative (first order; double backward is not supported), tested
    against the plain formulas in float64 (``tests/test_fast_path.py``). On CPU in float32/float64
    both directions run ``simple_cell.c`` instead (one pass over memory per direction; ``native``).

    With ``seg`` (needs the native kernel), the n coordinates are n / seg independent problems of
    ``seg`` each and ``s`` is their per-problem sums, (n / seg, H) (``network_segments``). An output
    that is not used gets no gradient: its ``None`` is passed on, not a tensor of zeros."""

    @staticmethod
    def forward(ctx, g, h, w_ih, w_hh, w_out, chunk, use_native=False, seg=None):
        ctx.set_materialize_grads(False)
        gv, hT = g.reshape(-1), h.t()
        ctx.native = _native_ok(use_native, gv, hT, w_hh)
        if seg is not None and (not ctx.native or seg < 1 or gv.shape[0] % seg):
            raise ValueError(f"_FusedCell: segments of {seg} need the native kernel and to divide n = {gv.shape[0]}")
        if ctx.native:  # saved as the kernel reads them, so the backward does not copy them again
            gv, hT = gv.contiguous(), hT.contiguous()
            newT, u, h_sum = _native_forward(gv, hT, w_ih, w_hh, w_out, None, seg)
        else:
            newT, u, h_sum = _cell_chunks(gv, hT, w_ih, w_hh, w_out, None, chunk)
        ctx.save_for_backward(gv, hT, newT, w_ih, w_hh, w_out)
        ctx.chunk = chunk
        ctx.seg = seg
        ctx.g_shape = g.shape
        return newT.t(), u, h_sum

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_h, d_u, d_sum):
        gv, hT, newT, w_ih, w_hh, w_out = ctx.saved_tensors
        H, n = newT.shape
        chunk = ctx.chunk
        need_g, need_h = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_w = ctx.needs_input_grad[2] or ctx.needs_input_grad[3]
        if ctx.seg is not None and d_sum is not None and not _native_ok(ctx.native, newT, d_h, d_u, d_sum):
            # the torch formulas below take one d_sum: spread the per-problem ones over d_h instead
            spread = d_sum.to(newT.dtype).repeat_interleave(ctx.seg, 0)
            d_h, d_sum = (spread if d_h is None else d_h + spread), None
        if _native_ok(ctx.native, gv, hT, newT, w_hh, d_h, d_u, d_sum):
            dg, dhT, dw_ih, dw_hh, dw_out = _native_backward(gv, hT, newT, w_ih, w_hh, w_out, d_h, d_u, d_sum,
                                                             need_g, need_h, need_w, ctx.seg)
            return (None if dg is None else dg.reshape(ctx.g_shape), None if dhT is None else dhT.t(),
                    dw_ih[:, None], dw_hh, dw_out, None, None, None)
        dT = None if d_h is None else d_h.t()
        dg = gv.new_empty(n) if need_g else None
        dhT = newT.new_empty(H, n) if need_h else None
        dw_ih = w_ih.new_zeros(H)
        dw_hh = torch.zeros_like(w_hh)
        dw_out = torch.zeros_like(w_out)
        buf = newT.new_empty(H, min(chunk, n))
        tmp = newT.new_empty(H, min(chunk, n))
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            d, t = buf[:, :e - s], tmp[:, :e - s]
            hn = newT[:, s:e]
            if dT is None:
                d.zero_()
                if d_u is not None:
                    d.addr_(w_out, d_u[s:e])
            elif d_u is not None:
                torch.addr(dT[:, s:e], w_out, d_u[s:e], out=d)
            else:
                d.copy_(dT[:, s:e])
            if d_u is not None:
                dw_out.addmv_(hn, d_u[s:e])
            if d_sum is not None:
                d.add_(d_sum[:, None])
            torch.mul(hn, hn, out=t)
            d.addcmul_(d, t, value=-1.0)  # ∂/∂pre = ∂/∂h' · (1 − h'²)
            if need_w:
                dw_hh.addmm_(d, hT[:, s:e].t())
                dw_ih.addmv_(d, gv[s:e])
            if need_g:
                torch.mv(d.t(), w_ih[:, 0], out=dg[s:e])
            if need_h:
                torch.mm(w_hh.t(), d, out=dhT[:, s:e])
        return (None if dg is None else dg.reshape(ctx.g_shape), None if dhT is None else dhT.t(),
                dw_ih[:, None], dw_hh, dw_out, None, None, None)
