"""Input preprocessing shared by the coordinate-wise optimizers, and their fused recurrent kernels.

All functions are pure and differentiable; shapes are given per function.
"""
from __future__ import annotations

import math

import torch
from torch import nn

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


class CoordLSTM(nn.Module):
    """A stack of LSTM cells applied independently to every coordinate (rows share weights).

    Parameters are stored as ``nn.LSTMCell`` modules (same names, shapes and initialisation), so
    weights interchange with a plain ``nn.LSTMCell`` reference; the computation uses fused kernels.
    Without autograd the coordinates are processed in cache-sized chunks with in-place kernels,
    which is 2-3x faster than ``nn.LSTMCell`` on CPU for ~10^5-10^6 coordinates.
    """

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
        fused = [_fused_weights(cell) for cell in self.cells]
        if torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in hidden)
                                        or any(p.requires_grad for p in self.parameters())):
            new, inp = [], x
            for layer, (w_t, b) in enumerate(fused):
                h, c = lstm_cell(inp, hidden[2 * layer], hidden[2 * layer + 1], w_t, b)
                new += [h, c]
                inp = h
            return inp, tuple(new)
        with torch.no_grad():
            return self._forward_chunked(x, hidden, fused)

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
