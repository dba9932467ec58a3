"""MARTHE (Algorithm 1 of the MARTHE paper) and RTHO (Franceschi et al. 2017) = MARTHE with μ = 1.

Per step t (the paper's Algorithm 1, with the rate update moved to the end of the previous step,
which is the same sequence of operations):

    Z_{t+1} = μ_t·A_t Z_t + [B_t]_t                        tangent system, eq. (9)
    w_{t+1} = Φ_t(w_t, η_t)                                parameter update
    Δη_{t+1} = Z_{t+1}ᵀ ∇E(w_{t+1})                        = S_{t+1,μ}, eq. (11)
    μ_{t+1} = h_μ(q(μ_t)),  q = Δη_{t+1}·g'_1              eq. (10), appendix B (adaptive μ only)
    β_{t+1} from Δη_{t+1}·Δη_t                              §4 (adaptive β only, see core.beta_update)
    η_{t+1} = max(η_t − β_{t+1}·Δη_{t+1}, 0)               eq. (5)

with ``g'_1 = [B_t]_tᵀ∇E(w_{t+1})`` the HD hypergradient, ``Z_0 = 0`` and ``μ_0 = 0``.
For dynamics with state ``s`` (momentum buffer, Adam moments) ``Z = (Z_w, Z_s)`` and
``A_t Z = (Z_w − η_t·∂d_t[Z], ∂s_{t+1}[Z])``, ``[B_t]_t = (−d_t, 0)``; ``∂d_t[Z]`` needs
``H_t Z_w`` (Hessian of the minibatch loss), computed by double backward (Pearlmutter 1994).

Gradient-norm clipping (``grad_clip``, default 100 as in the authors' public code) is part of Φ:
``d_t`` is built from ``clip(g_t) = g_t·min(1, c/‖g_t‖)`` and ``∂d_t[Z]`` from its exact tangent
``dclip(g_t)[H_t Z_w]`` (:func:`~l2l_zoo.schedules.core.clip_tangent`), so the identities below
hold for the clipped dynamics too. A linear training loss has ``H_t = 0``: no gradient then carries
a graph, and ``H_t Z_w = 0`` is used.

Unrolled, ``Δη_T = Σ_t (Π_{j=t}^{T−2} μ_j)·∂E(w_T)/∂η_t`` restricted to the past trajectory:
μ = 0 gives HD on E, μ = 1 gives RTHO, whose ``Z_T`` is the forward-mode total derivative
``dw_T/dη`` for a perturbation of every past rate (eq. 3 summed over columns).

Differences from the authors' public code, on purpose (it has these defects): the tangent
uses the current rate ``η_t`` (not the initial one), ``E`` is whatever held-out objective the caller
passes (the benchmarks use a validation split, never the test set), and the hypergradient is one dot
product over all parameters (one rate update per step, not one per tensor).
"""
from __future__ import annotations

import math
from typing import Callable, Mapping

import torch

from .controller import DEFAULT_GRAD_CLIP, HypergradientController
from .core import BETA_RULES, _check_nonneg, beta_update, clip_tangent, lr_update, mu_heuristic

__all__ = ["MARTHE", "RTHO"]


class MARTHE(HypergradientController):
    """MARTHE learning-rate controller.

    Args:
        optimizer: a ``torch.optim`` SGD (any momentum / Nesterov / weight decay), Adam or AdamW;
            its ``lr`` is the initial rate ``η_0`` (the paper suggests 0 without prior knowledge).
        val_loss_fn: ``() -> scalar tensor``, the objective ``E`` at the current weights
            (validation loss on held-out data).
        beta: the hyper-learning rate β, or its initial value ``β_0`` when ``beta_lr`` is set
            (the paper's Algorithm 1 uses ``β_0 = 0``).
        mu: the discount μ in [0, 1], or ``"adaptive"`` for the heuristic h_μ of appendix B.
        beta_lr: step size α for adapting β online (§4); ``None`` keeps β fixed.
        beta_rule: the sign convention of the β update, see :func:`core.beta_update`.
        divergence_loss: a training loss above this (or non-finite) raises ``ScheduleDiverged``
            (as does a non-finite training gradient).
        grad_clip: the maximum global norm of the training gradient (the authors' public code clips
            at 100); ``None`` disables clipping. The tangent differentiates the clip exactly.
    """

    _scalar_keys = HypergradientController._scalar_keys + ("mu", "_c", "_prev_hg", "_z_zero")
    _tensor_keys = ("_z_w", "_z_s")
    _tuple_keys = ("_z_s",)

    def __init__(self, optimizer: torch.optim.Optimizer, val_loss_fn: Callable[[], torch.Tensor], *,
                 beta: float, mu: float | str = "adaptive", beta_lr: float | None = None,
                 beta_rule: str = "descent", divergence_loss: float = math.inf,
                 grad_clip: float | None = DEFAULT_GRAD_CLIP):
        if val_loss_fn is None:
            raise TypeError("MARTHE needs val_loss_fn, the objective E (e.g. a validation loss)")
        super().__init__(optimizer, val_loss_fn, beta=beta, divergence_loss=divergence_loss,
                         grad_clip=grad_clip)
        if mu == "adaptive":
            self.adaptive_mu = True
            self.mu = 0.0  # μ_0 = 0 (Algorithm 1)
        elif isinstance(mu, (int, float)) and not isinstance(mu, bool) and 0.0 <= mu <= 1.0:
            self.adaptive_mu = False
            self.mu = float(mu)
        else:
            raise ValueError(f"mu must be a number in [0, 1] or 'adaptive', got {mu!r}")
        if beta_lr is not None and not (isinstance(beta_lr, (int, float)) and math.isfinite(beta_lr)
                                        and beta_lr >= 0):
            raise ValueError(f"beta_lr must be None or a finite number >= 0, got {beta_lr!r}")
        if beta_rule not in BETA_RULES:
            raise ValueError(f"beta_rule must be one of {list(BETA_RULES)}, got {beta_rule!r}")
        self.beta_lr = None if beta_lr is None else float(beta_lr)
        self.beta_rule = beta_rule
        self._c = 0.0           # c_t of appendix B (effective horizon counter)
        self._prev_hg = 0.0     # Δη_t (0 before the first step)
        self._z_zero = True     # Z_t = 0: the Hessian-vector product can be skipped
        self._z_w: torch.Tensor | None = None
        self._z_s: tuple = ()

    @property
    def tangent(self) -> tuple[torch.Tensor | None, tuple]:
        """``(Z_w, Z_s)``: copies of the weight tangent (n,) and of one (n,) tensor per
        optimizer-state tensor (copies: the controller updates its own buffers in place)."""
        z_w = None if self._z_w is None else (-self._z_w if self._negated else self._z_w.clone())
        return z_w, tuple(x.clone() for x in self._z_s)

    @property
    def _negated(self) -> bool:
        """Plain SGD keeps ``−Z_w`` in ``_z_w`` (see :meth:`_plain_sgd_step`); other dynamics ``Z_w``."""
        return self.dynamics.tangent_is_hvp

    def state_dict(self) -> dict:
        out = super().state_dict()
        if self._negated and out["_z_w"] is not None:
            out["_z_w"].neg_()  # always Z_w itself in a state dict
        return out

    def load_state_dict(self, state: Mapping) -> None:
        super().load_state_dict(state)
        if self._negated and self._z_w is not None:
            self._z_w.neg_()  # a copy (see the base class), so the caller's dict is untouched

    def _checked_state(self, state: Mapping) -> dict:
        out = super()._checked_state(state)
        mu = state["mu"]
        if not (isinstance(mu, (int, float)) and not isinstance(mu, bool) and 0.0 <= mu <= 1.0):
            raise ValueError(f"state['mu'] must be a number in [0, 1], got {mu!r}")
        out["mu"] = float(mu)
        _check_nonneg("state['_c']", state["_c"])
        out["_c"] = float(state["_c"])
        prev = state["_prev_hg"]
        if not (isinstance(prev, (int, float)) and not isinstance(prev, bool) and math.isfinite(prev)):
            raise ValueError(f"state['_prev_hg'] must be a finite number, got {prev!r}")
        out["_prev_hg"] = float(prev)
        if not isinstance(state["_z_zero"], bool):
            raise ValueError(f"state['_z_zero'] must be a bool, got {state['_z_zero']!r}")
        out["_z_zero"] = state["_z_zero"]
        if not out["_z_zero"] and out["_z_w"] is None:
            raise ValueError("state['_z_w'] is None but state['_z_zero'] is False (a tangent is needed)")
        z_s = state["_z_s"]
        n_state = 0 if self._negated else self.dynamics.n_state
        expected = 0 if out["_z_w"] is None else n_state
        if not isinstance(z_s, (tuple, list)) or len(z_s) != expected:
            raise ValueError(f"state['_z_s'] must be a tuple of {expected} tensor(s) (one per optimizer-state "
                             f"tensor of {self.dynamics!r}), got {z_s!r:.200}")
        out["_z_s"] = tuple(self._checked_flat(f"_z_s[{i}]", x, allow_none=False) for i, x in enumerate(z_s))
        return out

    def step(self, loss: torch.Tensor) -> float:
        """One training step with rate η_t and the update to η_{t+1} (module docstring).
        ``loss``: the scalar minibatch training loss at the current weights. Returns its value.
        A non-finite loss or gradient raises ``ScheduleDiverged`` before anything changes."""
        value = self._check_loss(loss)
        mu, lr = self.mu, self.lr
        need_hvp = mu != 0.0 and not self._z_zero
        grads = self._grads(loss, create_graph=need_hvp)
        if self.dynamics.tangent_is_hvp:
            hg, g1, norm = self._plain_sgd_step(grads, need_hvp, mu, lr, value)
            z_w, z_s = self._z_w, ()
        else:
            g = self._flat(grads).detach()
            gc, norm = self._clip(g, value)
            w = self._weights()
            state, k = self._state()
            d, _ = self.dynamics.direction(gc, w, state, k)
            if need_hvp:
                hz = clip_tangent(g, self._hvp(grads, self._z_w), norm, self.grad_clip)
                dd, ds = self.dynamics.tangent(gc, hz, w, state, k, self._z_w, self._z_s)
                # μ·(Z_w − η_t·dd) − d_t; the in-place ops act on the new tensor made by add
                z_w = torch.add(self._z_w, dd, alpha=-lr).mul_(mu).sub_(d)
                z_s = ds if mu == 1.0 else tuple(mu * x for x in ds)
            else:  # μ_t A_t Z_t = 0: Z_{t+1} = [B_t]_t
                z_w = -d
                z_s = tuple(torch.zeros_like(g) for _ in range(self.dynamics.n_state))
            self._apply(grads if gc is g else self._views(gc), lr)
            # Δη_{t+1} = Z_{t+1}ᵀ∇E(w_{t+1}) and g'_1 = −d_tᵀ∇E(w_{t+1}), per tensor (no flat ∇E)
            hg, g1 = self._dots((self._views(z_w), self._views(d)), self._val_grad())
            g1 = -g1
        info = {"loss": value, "lr": lr, "mu": mu, "hypergradient": hg, "hd_hypergradient": g1,
                "grad_norm": norm}
        # A non-finite entry of Z_w or ∇E makes the dot products non-finite (0·inf = nan), so
        # checking the two scalars covers the tangent as well.
        if not (math.isfinite(hg) and math.isfinite(g1)):
            # Keep η; restart the tangent system from Z = 0 (as at t = 0) so that one overflow
            # does not poison every later step.
            self._skip(f"non-finite hypergradient {hg!r} (one-step part {g1!r})")
            self._z_w, self._z_s, self._z_zero = None, (), True
            self._prev_hg = 0.0
            if self.adaptive_mu:
                self.mu, self._c = 0.0, 0.0
        else:
            self._z_w, self._z_s, self._z_zero = z_w, z_s, False
            if self.adaptive_mu:
                self.mu, self._c = mu_heuristic(hg * g1, g1, mu, self._c)
            if self.beta_lr is not None:
                self.beta = beta_update(self.beta, self.beta_lr, hg, self._prev_hg, lr, self.beta_rule,
                                        on_skip=self._skip)
            self._prev_hg = hg
            self._set_lr(lr_update(lr, hg, self.beta, on_skip=self._skip))
        info["beta"] = self.beta
        self.last = info
        self.t += 1
        return value

    def _plain_sgd_step(self, grads: tuple, need_hvp: bool, mu: float, lr: float,
                        value: float) -> tuple[float, float, float]:
        """The step for plain SGD (``d_t = clip(g_t)``, ``dd = dclip(g_t)[H_t Z_t]``): the same
        equations as the general path, arranged for memory traffic, which is what this O(n) work
        costs. The buffer holds ``Y = −Z_w``, so that ``Y_{t+1} = μ·(Y_t − η_t·dd) + d_t`` is two
        in-place passes (``Y_0 = d_0``); ``H_t Y_t`` is formed before the parameter update (it needs
        the graph at ``w_t``), the tangent update after ``∇E(w_{t+1})``, just before the dot
        products that read it. Returns ``(Δη_{t+1}, g'_1, ‖g_t‖) = (−Yᵀ∇E, −d_tᵀ∇E, ‖g_t‖)``."""
        g = [x.detach() for x in grads]
        gc, norm = self._clip(g, value)
        hy = None
        if need_hvp:  # dclip is linear, so dclip[H·Y] = −dclip[H·Z]
            hy = clip_tangent(g, self._hvp_tensors(grads, self._z_w), norm, self.grad_clip)
        self._apply(gc, lr)
        g_e = self._val_grad()
        if self._z_w is None:
            self._z_w = torch.empty(sum(self._numels), dtype=self.params[0].dtype, device=self.params[0].device)
        y = self._views(self._z_w)
        for i, (yi, gi) in enumerate(zip(y, gc)):
            if hy is None:  # μ_t A_t Z_t = 0: Z_{t+1} = [B_t]_t = −d_t
                yi.copy_(gi)
            else:  # (were H·Y_t handed back as Y_t's own view, each element is read before written)
                yi.add_(hy[i], alpha=-lr)
                torch.add(gi, yi, alpha=mu, out=yi)
        y_dot, g_dot = self._dots((y, gc), g_e)
        return -y_dot, -g_dot, norm

    def _hvp_tensors(self, grads: tuple, z: torch.Tensor) -> list[torch.Tensor]:
        """``H_t z`` as one tensor per parameter, by double backward through ``grads`` (created
        with a graph); zeros for parameters the gradient does not depend on, and everywhere when
        no gradient carries a graph (a loss linear in the weights: ``H_t = 0``)."""
        pairs = [(g, p, v) for g, p, v in zip(grads, self.params, self._views(z)) if g.requires_grad]
        out = (torch.autograd.grad([g for g, _, _ in pairs], [p for _, p, _ in pairs],
                                   grad_outputs=[v for _, _, v in pairs], allow_unused=True)
               if pairs else ())
        by_param = {id(p): h for (_, p, _), h in zip(pairs, out) if h is not None}
        return [by_param[id(p)] if id(p) in by_param else torch.zeros_like(p) for p in self.params]

    def _hvp(self, grads: tuple, z: torch.Tensor) -> torch.Tensor:
        """``H_t z`` (flat (n,))."""
        return self._flat(self._hvp_tensors(grads, z))


class RTHO(MARTHE):
    """RTHO (Franceschi et al. 2017, with hyperparameter updates every step, footnote 4):
    MARTHE with μ = 1, i.e. the undiscounted tangent ``Z_t = dw_t/dη`` and
    ``Δη_t = Z_tᵀ∇E(w_t)`` (eq. 6). Arguments as :class:`MARTHE` without ``mu``."""

    def __init__(self, optimizer: torch.optim.Optimizer, val_loss_fn: Callable[[], torch.Tensor], *,
                 beta: float, beta_lr: float | None = None, beta_rule: str = "descent",
                 divergence_loss: float = math.inf, grad_clip: float | None = DEFAULT_GRAD_CLIP):
        super().__init__(optimizer, val_loss_fn, beta=beta, mu=1.0, beta_lr=beta_lr,
                         beta_rule=beta_rule, divergence_loss=divergence_loss, grad_clip=grad_clip)
