"""LRS-OPT: the exact hypergradient of a final objective with respect to every step's learning rate,
by reverse mode through the whole unroll, and the offline schedule optimisation of §5 of the
MARTHE paper.

Problem (1): ``min_{η ∈ R^T_+} f_T(η) = E(w_T(η))`` with ``w_{t+1} = Φ_t(w_t, η_t)``. Eq. (2)/(4):

    ∂f_T/∂η_t = [B_t]_tᵀ (Π_{s=t+1}^{T−1} A_s)ᵀ ∇E(w_T) = −d_tᵀ P_{t+1}^{T−1 ᵀ} ∇E(w_T).

:func:`schedule_hypergradient` gets all T entries at once by backpropagating ``E(w_T)`` through the
unroll built with ``create_graph=True`` (the weight trajectory and each step's graph are kept, so
memory grows linearly with T: for small problems only, as the paper says). It is the reference that
the online approximations are checked against: with a fixed schedule, MARTHE's
``Δη_T = Σ_t μ^{T−1−t}·∂f_T/∂η_t`` (eq. 9/11), so μ = 0 gives the last entry (HD) and μ = 1 the sum
of all entries (RTHO).

Gradient-norm clipping: ``grad_clip=c`` replaces each ``g_t`` by ``g_t·min(1, c/‖g_t‖)``
(:func:`~l2l_zoo.schedules.core.clip_by_global_norm`) inside Φ, and reverse mode differentiates it
exactly; pass the online controllers' ``grad_clip`` to check them against this reference with
clipping on. The default here is ``None`` (no clipping), unlike the online controllers' 100 (the
authors' public code): LRS-OPT is the exact solution of problem (1) for the plain ``torch.optim``
dynamics, :func:`unroll` reproduces a plain ``torch.optim`` run step for step, and an optimised
schedule is evaluated, like the hand-designed baselines, by such a run; a clipping default here
would optimise the schedule for dynamics other than the ones it is run with.

Functions here work on one flat parameter vector ``w`` of shape (n,); :func:`flat_functional`
turns an ``nn.Module`` into that form with ``torch.func.functional_call``.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .core import Dynamics, check_grad_clip, clip_by_global_norm

__all__ = ["flat_functional", "unroll", "schedule_hypergradient", "LRSOpt"]


def flat_functional(model: nn.Module) -> tuple[torch.Tensor, Callable[[torch.Tensor, Any], torch.Tensor]]:
    """``(w0, forward)``: the module's parameters as one detached flat vector (n,) and
    ``forward(w, x)`` = the module's output with its parameters replaced by ``w``."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    numels = [p.numel() for p in model.parameters()]
    w0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()

    def forward(w: torch.Tensor, x):
        params = {n: t.view(s) for n, t, s in zip(names, w.split(numels), shapes)}
        return torch.func.functional_call(model, params, (x,))

    return w0, forward


def unroll(w0: torch.Tensor, lrs, batches: Sequence, loss_fn: Callable[[torch.Tensor, Any], torch.Tensor],
           dynamics: Dynamics, *, create_graph: bool = True, grad_clip: float | None = None) -> torch.Tensor:
    """``w_T`` after ``T = len(lrs)`` steps ``w_{t+1} = w_t − η_t·d_t`` (eq. 1) from ``w0`` (n,),
    the optimizer state starting at zero as in a fresh ``torch.optim`` optimizer.

    ``loss_fn(w, batches[t])`` is the minibatch training loss ``L_t``; ``d_t`` is built from its
    gradient clipped to global norm ``grad_clip`` (None: not clipped; module docstring). With
    ``create_graph`` the result is differentiable w.r.t. ``lrs`` (a (T,) tensor) and ``w0`` through
    every gradient (second order terms and the clip included); without it each step is detached
    (cheap evaluation of ``f_T``)."""
    if len(batches) < len(lrs):
        raise ValueError(f"need one batch per step: {len(lrs)} rates but {len(batches)} batches")
    grad_clip = check_grad_clip(grad_clip)
    w = w0 if (create_graph and w0.requires_grad) else w0.detach().requires_grad_(True)
    state = dynamics.init_state(w0.detach())
    for t in range(len(lrs)):
        if not create_graph:
            w = w.detach().requires_grad_(True)
        loss = loss_fn(w, batches[t])
        (g,) = torch.autograd.grad(loss, w, create_graph=create_graph)
        if grad_clip is not None:
            g, _ = clip_by_global_norm(g, grad_clip)
        d, state = dynamics.direction(g, w, state, t)
        if not create_graph:
            d, state = d.detach(), tuple(s.detach() for s in state)
        w = w - lrs[t] * d
    return w if create_graph else w.detach()


def schedule_hypergradient(w0: torch.Tensor, lrs: torch.Tensor, batches: Sequence,
                           loss_fn: Callable[[torch.Tensor, Any], torch.Tensor],
                           val_loss_fn: Callable[[torch.Tensor], torch.Tensor],
                           dynamics: Dynamics, *, grad_clip: float | None = None) -> tuple[float, torch.Tensor]:
    """``(f_T(η), ∇f_T(η))``: the objective ``E(w_T)`` (``val_loss_fn(w_T)``) and its exact gradient
    (shape (T,), eq. 2/4) w.r.t. the schedule ``lrs`` (T,), by reverse mode through the unroll
    (with the training gradients clipped to ``grad_clip``, see :func:`unroll`)."""
    lrs = lrs.detach().clone().requires_grad_(True)
    w_t = unroll(w0.detach(), lrs, batches, loss_fn, dynamics, create_graph=True, grad_clip=grad_clip)
    e = val_loss_fn(w_t)
    (h,) = torch.autograd.grad(e, lrs)
    return float(e.detach()), h


class LRSOpt:
    """Offline schedule optimisation (§5 "LRS-OPT"): first-order descent on ``η ∈ R^T_+``,
    projected onto ``η ≥ 0`` after each update.

    ``outer="sgd"`` is plain projected gradient descent as in the paper; ``outer="adam"`` (our
    default) rescales each coordinate, which matters because the entries of ``∇f_T`` span orders of
    magnitude across t and the paper's 5000 outer iterations are far beyond a CPU budget.
    ``outer_lr`` is the step size of either. ``grad_clip``: the inner dynamics' gradient clip
    (:func:`unroll`; None, the default, does not clip).

    Use: ``opt = LRSOpt(torch.full((T,), 0.01), outer_lr=1e-3)``; per iteration draw fresh
    minibatches (the paper re-randomises them every iteration), then
    ``value, hg = opt.step(w0, batches, loss_fn, val_loss_fn, dynamics)``; ``opt.lrs`` is the schedule.
    """

    OUTER = ("adam", "sgd")

    def __init__(self, lrs: torch.Tensor, *, outer_lr: float, outer: str = "adam",
                 grad_clip: float | None = None):
        if outer not in self.OUTER:
            raise ValueError(f"outer must be one of {list(self.OUTER)}, got {outer!r}")
        if not (isinstance(outer_lr, (int, float)) and math.isfinite(outer_lr) and outer_lr > 0):
            raise ValueError(f"outer_lr must be a finite number > 0, got {outer_lr!r}")
        lrs = torch.as_tensor(lrs).detach().clone()
        if lrs.dim() != 1 or len(lrs) == 0 or not bool(torch.isfinite(lrs).all()) or bool((lrs < 0).any()):
            raise ValueError(f"lrs must be a non-empty 1-d tensor of finite rates >= 0, got shape "
                             f"{tuple(lrs.shape)}")
        self.outer, self.outer_lr = outer, float(outer_lr)
        self.grad_clip = check_grad_clip(grad_clip)
        self._lrs = nn.Parameter(lrs)
        self._opt = (torch.optim.Adam([self._lrs], lr=outer_lr) if outer == "adam"
                     else torch.optim.SGD([self._lrs], lr=outer_lr))
        self.iteration = 0

    @property
    def lrs(self) -> torch.Tensor:
        """The current schedule (T,), detached."""
        return self._lrs.detach()

    def update(self, hypergradient: torch.Tensor) -> None:
        """One projected descent step with a given ``∇f_T`` (T,). A non-finite hypergradient raises
        ``FloatingPointError`` (the schedule is left unchanged)."""
        if hypergradient.shape != self._lrs.shape:
            raise ValueError(f"hypergradient must have shape {tuple(self._lrs.shape)}, got "
                             f"{tuple(hypergradient.shape)}")
        if not bool(torch.isfinite(hypergradient).all()):
            raise FloatingPointError(f"LRS-OPT iteration {self.iteration}: non-finite hypergradient; "
                                     "the unroll diverged (lower outer_lr or the initial rates)")
        self._opt.zero_grad(set_to_none=True)
        self._lrs.grad = hypergradient.detach().to(self._lrs)
        self._opt.step()
        with torch.no_grad():
            self._lrs.clamp_(min=0.0)
        self.iteration += 1

    def step(self, w0, batches, loss_fn, val_loss_fn, dynamics) -> tuple[float, torch.Tensor]:
        """Hypergradient at the current schedule (:func:`schedule_hypergradient`), then
        :meth:`update`. Returns ``(f_T, ∇f_T)`` before the update."""
        value, h = schedule_hypergradient(w0, self.lrs, batches, loss_fn, val_loss_fn, dynamics,
                                          grad_clip=self.grad_clip)
        self.update(h)
        return value, h

    def state_dict(self) -> dict:
        return {"lrs": self.lrs.clone(), "optimizer": self._opt.state_dict(), "iteration": self.iteration,
                "outer": self.outer, "outer_lr": self.outer_lr, "grad_clip": self.grad_clip}

    def load_state_dict(self, state: dict) -> None:
        if state.get("outer") != self.outer:
            raise ValueError(f"state was saved with outer={state.get('outer')!r}, this is {self.outer!r}")
        # (state dicts written before grad_clip was recorded were all unclipped)
        if state.get("grad_clip") != self.grad_clip:
            raise ValueError(f"state was saved with grad_clip={state.get('grad_clip')!r}, this is "
                             f"{self.grad_clip!r} (the schedule was optimised for other dynamics)")
        with torch.no_grad():
            self._lrs.copy_(state["lrs"])
        self._opt.load_state_dict(state["optimizer"])
        self.iteration = int(state["iteration"])
