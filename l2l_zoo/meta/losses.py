"""Meta-loss weightings over one truncation of T optimizee steps.

``losses`` is the list [f_0, f_1, ..., f_T] of minibatch losses: f_0 at the truncation's starting
point (a constant: the graph is cut there), f_i after the i-th learned update. ``penalties`` holds
per-step regularizer values R_1..R_T (or is empty). Every weighting is normalised to sum to one, so
meta learning rates and λ mean the same across truncation lengths.

* ``sum``: Σ_i f_i / T, uniform (Andrychowicz et al. 2016, eq. 2; Chen et al. 2020, §3.2).
* ``last``: f_T only, the last step of each truncation (Lv et al. 2017; Chen et al. §3.2).
* ``wdiff``: Σ_i w_i (f_i − f_{i−1}), w_i ∝ i² (Chen et al. 2020, eq. 6). Eq. 6 prints
  (f_{i−1} − f_i), which minimised literally rewards increasing the loss; the intent (weighted
  *decreases*, see §3.2's argument; the public smoothed-optimizer code does the same) is implemented.
* ``linear``: Σ_i w_i f_i with w_i ∝ i (smoothness paper, §4.3: w_t = t mod T).
* ``outer``: the outer objective F at the end of the truncation (a validation minibatch, or a
  few-shot episode's query set: Ravi & Larochelle 2017, Algorithm 1 line 15; the inner losses only
  drive the inner steps), plus λ·Σ_t R_t summed (not averaged) over the inner steps as the smoothness
  paper's few-shot objective does (eq. 6, Algorithm 2 lines 14 and 17).

With a regularizer, step i's term gets + λ R_i before weighting (smoothness paper eqs. 4-5).
"""
from __future__ import annotations

import torch

__all__ = ["META_LOSSES", "meta_loss", "step_weights"]

META_LOSSES = ("sum", "last", "wdiff", "linear", "outer")


def step_weights(kind: str, T: int, *, device=None, dtype=None) -> torch.Tensor:
    """Normalised weights w_1..w_T, shape (T,)."""
    i = torch.arange(1, T + 1, device=device, dtype=dtype or torch.float32)
    if kind == "outer":
        raise ValueError("the 'outer' meta-loss has no per-step weights (it is F(θ_T) + λ Σ R_t)")
    if kind == "sum":
        w = torch.ones_like(i)
    elif kind == "last":
        w = torch.zeros_like(i)
        w[-1] = 1.0
    elif kind == "wdiff":
        w = i * i
    elif kind == "linear":
        w = i
    else:
        raise KeyError(f"unknown meta-loss {kind!r}; choose from {list(META_LOSSES)}")
    return w / w.sum()


def meta_loss(kind: str, losses: list[torch.Tensor], penalties: list[torch.Tensor] | None = None,
              lam: float = 0.0, outer: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted meta-loss of one truncation (see module docstring); ``outer`` is F(θ_T) for
    ``kind="outer"``."""
    T = len(losses) - 1
    if T < 1:
        raise ValueError("meta_loss needs at least one step after the starting loss")
    if kind == "outer":
        if outer is None:
            raise ValueError("meta_loss 'outer' needs the outer objective (outer=)")
        out = outer.reshape(())
        if penalties:
            out = out + lam * torch.stack([r.reshape(()) for r in penalties]).sum()
        return out
    f = torch.stack([torch.as_tensor(x, dtype=losses[-1].dtype, device=losses[-1].device).reshape(())
                     for x in losses])
    terms = f[1:] - f[:-1] if kind == "wdiff" else f[1:]
    if penalties:
        terms = terms + lam * torch.stack([r.reshape(()) for r in penalties])
    w = step_weights(kind, T, device=terms.device, dtype=terms.dtype)
    return (w * terms).sum()
