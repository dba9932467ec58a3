"""HD: hypergradient descent on the learning rate (Baydin et al. 2018), as analysed in §3 of the
MARTHE paper.

HD greedily minimises the objective one step ahead. With ``Φ_t(w, η) = w − η·d_t``
(:mod:`~l2l_zoo.schedules.core`), ``B_t = −d_t`` and eq. (6) gives

    Δ^HD η_{t+1} = B_tᵀ ∇E(w_{t+1}) = −d_t · ∇E(w_{t+1}),     η_{t+1} = max(η_t − β·Δη_{t+1}, 0)  (5)

* ``val_loss_fn`` given: ``E`` is the held-out objective (the MARTHE paper's choice, footnote 4);
  this equals MARTHE with μ = 0. One extra gradient of ``E`` per step, no Hessian.
* ``val_loss_fn=None``: Baydin et al.'s original, ``E = L`` the (regularised) training loss,
  with ``∇L(w_{t+1})`` taken from the *next* minibatch, i.e. at step ``t+1`` before its update:
  ``Δη = −(g_{t+1} + weight_decay·w_{t+1})·d_t``. No extra gradient at all. ``d_t`` is the step
  direction actually taken: the momentum buffer for heavy-ball SGD (as in their code),
  ``gg + momentum·buf`` with Nesterov, the bias-corrected Adam direction for Adam. The update
  to ``η_{t+1}`` thus happens at the start of step ``t+1``: after a step, ``lr`` is the rate it used.

Gradient-norm clipping (``grad_clip``, default 100 as in the authors' public code) is part of the
dynamics: ``d_t`` is built from ``clip(g_t)``. The objective is not clipped, so in Baydin et al.'s
variant ``∇L(w_{t+1})`` is the unclipped gradient of the next minibatch (the exact derivative of
``L(w_{t+1}(η))``), while ``d_t`` is the clipped step actually taken.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from .controller import DEFAULT_GRAD_CLIP, HypergradientController
from .core import lr_update

__all__ = ["HD"]


class HD(HypergradientController):
    """HD controller (see the module docstring for the equations).

    ``beta`` is the hyper-learning rate. Public-code defaults: 1e-6 for SGD and 1e-8 for Adam on
    CIFAR-sized networks; it scales with 1/|g|², so tune it per problem. ``grad_clip``: the maximum
    global gradient norm (the authors' public code clips at 100); ``None`` disables clipping.
    """

    _tensor_keys = ("_prev_direction",)

    def __init__(self, optimizer: torch.optim.Optimizer, val_loss_fn: Callable[[], torch.Tensor] | None = None,
                 *, beta: float, divergence_loss: float = math.inf,
                 grad_clip: float | None = DEFAULT_GRAD_CLIP):
        super().__init__(optimizer, val_loss_fn, beta=beta, divergence_loss=divergence_loss,
                         grad_clip=grad_clip)
        self._prev_direction: torch.Tensor | None = None

    def step(self, loss: torch.Tensor) -> float:
        """One training step with the current rate, then the rate update. ``loss``: the scalar
        minibatch training loss at the current weights (its graph is consumed). Returns its value.
        A non-finite loss or gradient raises ``ScheduleDiverged`` before anything changes."""
        value = self._check_loss(loss)
        grads = self._grads(loss, create_graph=False)
        g = self._flat(grads).detach()
        gc, norm = self._clip(g, value)
        w = self._weights()
        state, k = self._state()
        hg = None
        if self.val_loss_fn is None and self._prev_direction is not None:
            # Baydin et al.: the gradient of this minibatch is ∇L at w_t = Φ_{t−1}(w_{t−1}, η_{t−1}).
            hg = -float(torch.dot(self.dynamics.objective_grad(g, w), self._prev_direction))
            self._update_lr(hg)
        lr_used = self.lr
        d, _ = self.dynamics.direction(gc, w, state, k)
        self._apply(grads if gc is g else self._views(gc), lr_used)
        if self.val_loss_fn is None:
            self._prev_direction = d
        else:
            hg = -self._dots((self._views(d),), self._val_grad())[0]
            self._update_lr(hg)
        self.last = {"loss": value, "lr": lr_used, "hypergradient": hg, "beta": self.beta, "grad_norm": norm}
        self.t += 1
        return value

    def _update_lr(self, hg: float) -> None:
        if not math.isfinite(hg):
            self._skip(f"non-finite hypergradient {hg!r}")
            return
        self._set_lr(lr_update(self.lr, hg, self.beta, on_skip=self._skip))
