"""Input preprocessing shared by the coordinate-wise optimizers, and their fused recurrent kernels.

All functions are pure and differentiable; shapes are given per function.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .. import native
from ..base import fused_kernels_enabled

__all__ = ["log_sign_preprocess", "adam_features", "CoordLSTM", "lstm_cell"]


def log_sign_preprocess(grads: torch.Tensor, p: float = 10.0, clamp: bool = False) -> torch.Tensor:
    """Gradient preprocessing of Andrychowicz et al. (2016), appendix A (Chen et al. 2020, eq. 3).

    ``(log|g|/p, sign g)`` if ``|g| >= e^-p`` else ``(-1, e^p g)``. With ``clamp`` both features are
    clipped to [-1, 1] as in DeepMind's TensorFlow code (which uses p=5).
    ``grads``: shape ``(n,)``; returns ``(n, 2)``.
    """
    g = grads.reshape(-1)
    big = g.abs() >= math.exp(-p)
    # log of a clamped magnitude keeps the unused branch finite (no NaN in the backward pass).
    log_part = torch.log(g.abs().clamp_min(math.exp(-p))) / p
    first = torch.where(big, log_part, torch.full_like(g, -1.0))
    second = torch.where(big, torch.sign(g), g * math.exp(p))
    out = torch.stack((first, second), dim=1)
    return out.clamp(-1.0, 1.0) if clamp else out


def adam_features(grads: torch.Tensor, m: torch.Tensor, v: torch.Tensor, step: int,
                  beta1: float = 0.95, beta2: float = 0.95, eps: float = 1e-8):
    """RNNProp's Adam-like input (Lv et al. 2017, §3.2, eqs. 5-7).

    m ← β1 m + (1-β1) g, v ← β2 v + (1-β2) g², bias-corrected with t = step + 1; features
    ``[g/(√v̂+ε), m̂/(√v̂+ε)]`` of shape ``(n, 2)``. Returns ``(features, m, v)``.
    """
    t = step + 1
    m = beta1 * m + (1 - beta1) * grads
    v = beta2 * v + (1 - beta2) * grads * grads
    m_hat = m / (1 - beta1 ** t)
    v_hat = v / (1 - beta2 ** t)
    denom = v_hat.sqrt() + eps
    return torch.stack((grads / denom, m_hat / denom), dim=1), m, v


def _fused_weights(cell: nn.LSTMCell):
    """``[W_ih, W_hh]^T`` and ``b_ih + b_hh`` with the cell-candidate rows scaled by 2, so that one
    sigmoid over all four gates gives tanh for the candidate via tanh(x) = 2σ(2x) − 1 (on CPU
    ``sigmoid`` is several times cheaper than ``tanh``). Gate order is PyTorch's (i, f, g, o)."""
    h = cell.hidden_size
    scale = torch.ones(4 * h, dtype=cell.weight_ih.dtype, device=cell.weight_ih.device)
    scale[2 * h:3 * h] = 2.0
    w = torch.cat((cell.weight_ih, cell.weight_hh), dim=1) * scale[:, None]
    b = (cell.bias_ih + cell.bias_hh) * scale
    return w.t(), b


def lstm_cell(x, h, c, w_t, b):
    """One LSTM cell over a batch of coordinates with fused weights from :func:`_fused_weights`.
    ``x``: (n, d_in), ``h, c``: (n, H). Returns ``(h', c')``. Differentiable."""
    H = h.shape[1]
    s = torch.sigmoid(torch.addmm(b, torch.cat((x, h), dim=1), w_t))
    i, f, g2, o = s[:, :H], s[:, H:2 * H], s[:, 2 * H:3 * H], s[:, 3 * H:]
    c_new = f * c + i * (2.0 * g2 - 1.0)
    h_new = o * (2.0 * torch.sigmoid(2.0 * c_new) - 1.0)
    return h_new, c_new


class _NativeLSTMLayer(torch.autograd.Function):
    """One LSTM layer over n coordinates, ``(x (n, d), h, c (n, H), W (4H, d + H), b (4H)) -> (h', c')``,
    through ``lstm_cell.c``: forward and exact backward fused per block of 64 coordinates. The
    backward recomputes the gates from the saved inputs, so no (n, 4H) activation is stored or read
    again; the torch formulas (:func:`lstm_cell`) keep five. h' and c' (and the input gradients) are
    column-major, (H, n) transposes, which is what the kernel reads fastest at the next step; inputs
    may be either layout. First order only (as ``_FusedCell``); an output that is not used passes
    ``None`` on (no zeros are built)."""

    @staticmethod
    def forward(ctx, x, h, c, W, b):
        ctx.set_materialize_grads(False)
        (x, x_cm), (h, h_cm), (c, c_cm) = map(_kernel_layout, (x, h, c))
        W, b = W.detach().contiguous(), b.detach().contiguous()
        (n, d), H = x.shape, h.shape[1]
        h_out, c_out = h.new_empty(H, n).t(), h.new_empty(H, n).t()
        getattr(native.lstm_cell(), "lstm_forward_" + native.SUFFIX[x.dtype])(
            n, d, H, x.data_ptr(), x_cm, h.data_ptr(), h_cm, c.data_ptr(), c_cm,
            *(t.data_ptr() for t in (W, b, h_out, c_out)), torch.get_num_threads())
        native.COUNTS["bytes"] += x.element_size() * n * (d + 4 * H)
        native.COUNTS["flops"] += 2 * n * 4 * H * (d + H)
        ctx.save_for_backward(x, h, c, W, b)
        ctx.cm = (x_cm, h_cm, c_cm)
        return h_out, c_out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dh_out, dc_out):
        x, h, c, W, b = ctx.saved_tensors
        (n, d), H = x.shape, h.shape[1]
        need_x, need_h, need_c = ctx.needs_input_grad[:3]
        need_w = ctx.needs_input_grad[3] or ctx.needs_input_grad[4]
        # every tensor handed over is bound to a name here: a temporary could be freed before the call
        (dh_out, dho_cm), (dc_out, dco_cm) = (_kernel_layout(t.to(x.dtype)) if t is not None else (None, 0)
                                              for t in (dh_out, dc_out))
        dx = x.new_empty(d, n).t() if need_x else None
        dh = x.new_empty(H, n).t() if need_h else None
        dc = x.new_empty(H, n).t() if need_c else None
        dW, db = torch.empty_like(W), torch.empty_like(b)
        lib = native.lstm_cell()
        # the kernel's ordered weight-gradient partial sums (it does not touch part when need_w = 0)
        part = x.new_empty(lib.lstm_backward_scratch(n, d, H)) if need_w else None
        ptr = native.ptr
        (x_cm, h_cm, c_cm) = ctx.cm
        getattr(lib, "lstm_backward_" + native.SUFFIX[x.dtype])(
            n, d, H, x.data_ptr(), x_cm, h.data_ptr(), h_cm, c.data_ptr(), c_cm, W.data_ptr(), b.data_ptr(),
            ptr(dh_out), dho_cm, ptr(dc_out), dco_cm, *map(ptr, (dx, dh, dc)), int(bool(need_w)),
            *map(ptr, (dW, db, part)), torch.get_num_threads())
        native.COUNTS["bytes"] += x.element_size() * n * (2 * d + 6 * H)
        native.COUNTS["flops"] += 2 * n * 4 * H * (d + H) * (bool(need_x or need_h) + bool(need_w))
        return dx, dh, dc, (dW if need_w else None), (db if need_w else None)


def _kernel_layout(t):
    """``(t as lstm_cell.c reads it, cm)``: a column-major (n, k) tensor (the (k, n) transpose, what the
    kernel writes) as it is with cm = 1, anything else row-major contiguous with cm = 0."""
    t = t.detach()
    if t.shape[1] > 1 and t.t().is_contiguous():
        return t, 1
    return t.contiguous(), 0


class CoordLSTM(nn.Module):
    """A stack of LSTM cells applied independently to every coordinate (rows share weights).

    Parameters are stored as ``nn.LSTMCell`` modules (same names, shapes and initialisation), so
    weights interchange with a plain ``nn.LSTMCell`` reference; the computation uses fused kernels.
    Without autograd the coordinates are processed in cache-sized chunks with in-place kernels,
    which is 2-3x faster than ``nn.LSTMCell`` on CPU for ~10^5-10^6 coordinates. With autograd on
    CPU (meta-training) each layer runs ``lstm_cell.c`` from ``native_min`` coordinates on
    (:class:`_NativeLSTMLayer`; ``native = False`` or ``L2L_ZOO_NATIVE=0``: the torch formulas, which
    stay the reference, ``tests/test_native.py``). The kernel computes tanh exactly where the torch
    formulas use 2σ(2x) − 1 (a rounding-level difference in float32).
    """

    #: the autograd path runs the native layer kernel where it can be built
    native: bool = True
    #: from this many coordinates (below it the torch formulas' per-call overhead is no larger)
    native_min: int = 1024

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 2, chunk: int = 8192):
        super().__init__()
        sizes = [input_size] + [hidden_size] * num_layers
        self.cells = nn.ModuleList(nn.LSTMCell(sizes[i], hidden_size) for i in range(num_layers))
        self.hidden_size = hidden_size
        self.chunk = chunk

    def init_hidden(self, n: int, device=None, dtype=None) -> tuple:
        z = lambda: torch.zeros(n, self.hidden_size, device=device, dtype=dtype)  # noqa: E731
        return tuple(z() for _ in range(2 * len(self.cells)))

    def forward(self, x: torch.Tensor, hidden: tuple) -> tuple[torch.Tensor, tuple]:
        """``x``: (n, d_in); ``hidden``: (h_1, c_1, ..., h_L, c_L). Returns (top h, new hidden)."""
        if torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in hidden)
                                        or any(p.requires_grad for p in self.parameters())):
            if self._native_ok(x, hidden):
                new, inp = [], x
                for layer, cell in enumerate(self.cells):
                    W = torch.cat((cell.weight_ih, cell.weight_hh), dim=1)
                    h, c = _NativeLSTMLayer.apply(inp, hidden[2 * layer], hidden[2 * layer + 1], W,
                                                  cell.bias_ih + cell.bias_hh)
                    new += [h, c]
                    inp = h
                return inp, tuple(new)
            fused = [_fused_weights(cell) for cell in self.cells]
            new, inp = [], x
            for layer, (w_t, b) in enumerate(fused):
                h, c = lstm_cell(inp, hidden[2 * layer], hidden[2 * layer + 1], w_t, b)
                new += [h, c]
                inp = h
            return inp, tuple(new)
        with torch.no_grad():
            return self._forward_chunked(x, hidden, [_fused_weights(cell) for cell in self.cells])

    def _native_ok(self, x, hidden) -> bool:
        """Whether the native layer kernel applies: asked for, fused kernels on (not
        ``reference_kernels``), CPU, float32/float64 throughout, not inside a ``torch.func``
        transform, at least ``native_min`` coordinates, and buildable."""
        ts = (x, *hidden, self.cells[0].weight_ih)
        return (self.native and fused_kernels_enabled() and x.shape[0] >= self.native_min
                and native.plain_cpu(*ts)
                and not native.functorch_wrapped(*ts) and native.lstm_cell() is not None)

    def _forward_chunked(self, x, hidden, fused):
        n, H = x.shape[0], self.hidden_size
        new = [torch.empty_like(t) for t in hidden]
        ch = min(self.chunk, n)
        gates = x.new_empty(ch, 4 * H)
        for s in range(0, n, ch):
            e = min(s + ch, n)
            m = e - s
            g = gates[:m]
            inp = x[s:e]
            for layer, (w_t, b) in enumerate(fused):
                h_prev, c_prev = hidden[2 * layer][s:e], hidden[2 * layer + 1][s:e]
                h_out, c_out = new[2 * layer][s:e], new[2 * layer + 1][s:e]
                torch.addmm(b, torch.cat((inp, h_prev), dim=1), w_t, out=g)
                torch.sigmoid(g, out=g)
                i, f, g2, o = g[:, :H], g[:, H:2 * H], g[:, 2 * H:3 * H], g[:, 3 * H:]
                g2.mul_(2.0).sub_(1.0)
                torch.mul(f, c_prev, out=c_out)
                c_out.addcmul_(i, g2)
                torch.sigmoid(c_out * 2.0, out=h_out)
                h_out.mul_(2.0).sub_(1.0).mul_(o)
                inp = h_out
        return new[-2], tuple(new)
