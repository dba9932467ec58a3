"""Functional core of the hypergradient learning-rate schedules: the optimizer dynamics Φ, their
tangents, gradient-norm clipping and its tangent, and the scalar update rules of HD, RTHO and MARTHE.

Source: "Scheduling the learning rate via hypergradients: new insights and a new algorithm"
(Donini et al., the MARTHE paper). Notation of its §2 and Table 1: parameters ``w_t``, learning
rate ``η_t``, update ``w_{t+1} = Φ_t(w_t, η_t)``, ``A_t = ∂Φ_t/∂w_t``, ``B_t = ∂Φ_t/∂η_t``.

Every dynamics here has the form ``Φ_t(w, η) = w − η·d_t`` where the *direction* ``d_t`` depends on
the minibatch gradient ``g_t = ∇L_t(w_t)`` and on optimizer state ``s_t`` (momentum buffer, Adam
moments) but not on ``η``. So ``B_t = −d_t`` (Table 1: SGD ``[B_t]_t = −∇L_t``), and the dynamics
acts on the pair ``(w, s)``; its tangent therefore has one component per state tensor (SGD: one,
SGD with momentum: two, Adam: three).

Gradient-norm clipping (:func:`clip_by_global_norm`, as the authors' public code does by default
with a maximum norm of 100) replaces ``g_t`` by ``clip(g_t) = g_t·min(1, c/‖g_t‖)`` before the
optimizer sees it, so it is part of ``d_t`` and of ``A_t``: the tangent of ``g_t`` along ``z`` is
then :func:`clip_tangent` applied to ``H_t z``.

Everything in this module is pure: flat tensors (or Python floats) in, new ones out, nothing
mutated, nothing detached. The same ``direction`` is used by the online controllers (on detached
values) and by LRS-OPT (differentiated by reverse mode through a whole unroll).

The scalar rules never return a non-finite rate or β: a non-finite hypergradient, or a product that
overflows, leaves the value unchanged and is reported (``on_skip``, else a
:class:`HypergradientWarning`).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence, Union

import torch

__all__ = ["SGDDynamics", "AdamDynamics", "Dynamics", "dynamics_from_optimizer", "read_state",
           "global_norm", "clip_by_global_norm", "clip_tangent", "lr_update", "mu_heuristic",
           "beta_update", "BETA_RULES", "HypergradientWarning"]


class HypergradientWarning(RuntimeWarning):
    """A non-finite hypergradient, rate or β update was skipped (the controllers emit it once)."""


def _check_nonneg(name: str, value, allow_none: bool = False) -> None:
    """``value`` must be a finite real number >= 0 (or None when ``allow_none``)."""
    if value is None and allow_none:
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def check_grad_clip(grad_clip) -> float | None:
    """``grad_clip`` must be None (no clipping) or a finite number > 0; returns it as a float."""
    if grad_clip is None:
        return None
    if (not isinstance(grad_clip, (int, float)) or isinstance(grad_clip, bool) or not math.isfinite(grad_clip)
            or grad_clip <= 0):
        raise ValueError(f"grad_clip must be None or a finite number > 0, got {grad_clip!r}")
    return float(grad_clip)


def _safe_sqrt(v: torch.Tensor) -> torch.Tensor:
    """sqrt(v) with a zero (instead of infinite) derivative at v = 0.

    Adam's second moment is exactly 0 on coordinates whose gradient has always been 0 (e.g. the
    weights of MNIST's always-black border pixels); a plain sqrt would turn 0·∞ into NaN in both
    the tangent and reverse-mode hypergradients."""
    pos = v > 0
    return torch.where(pos, torch.where(pos, v, torch.ones_like(v)).sqrt(), torch.zeros_like(v))


@dataclass(frozen=True)
class SGDDynamics:
    """``torch.optim.SGD``: with ``gg = g + weight_decay·w``,
    ``buf_t = gg`` (first step) or ``momentum·buf_{t−1} + (1 − dampening)·gg``;
    ``d = gg + momentum·buf_t`` (Nesterov) or ``buf_t``; without momentum ``d = gg``.
    State: ``(buf,)`` with momentum, ``()`` without."""

    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0

    @property
    def n_state(self) -> int:
        return 1 if self.momentum != 0 else 0

    @property
    def tangent_is_hvp(self) -> bool:
        """True when :meth:`tangent` returns ``hz`` unchanged (no momentum, no weight decay)."""
        return self.momentum == 0 and not self.weight_decay

    def init_state(self, w: torch.Tensor) -> tuple:
        return tuple(torch.zeros_like(w) for _ in range(self.n_state))

    def objective_grad(self, g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Gradient of the regularised training loss L + weight_decay·|w|²/2 (what SGD descends)."""
        return g + self.weight_decay * w if self.weight_decay else g

    def direction(self, g: torch.Tensor, w: torch.Tensor, state: tuple, step: int):
        """``(d_t, s_{t+1})`` for gradient ``g`` (shape (n,)) at ``w`` (n,) with state ``s_t``;
        ``step`` = number of updates taken before this one (only ``step == 0`` matters)."""
        gg = self.objective_grad(g, w)
        if self.momentum == 0:
            return gg, ()
        buf = gg if step == 0 else self.momentum * state[0] + (1.0 - self.dampening) * gg
        d = gg + self.momentum * buf if self.nesterov else buf
        return d, (buf,)

    def tangent(self, g, hz, w, state, step, z_w, z_state):
        """Directional derivative of ``direction`` along ``(z_w, z_state)``: returns
        ``(dd, ds_{t+1})`` where ``hz = ∇²L_t(w)·z_w`` (the Hessian of the unregularised minibatch
        loss times the weight tangent; the weight decay term is added here)."""
        dgg = hz + self.weight_decay * z_w if self.weight_decay else hz
        if self.momentum == 0:
            return dgg, ()
        dbuf = dgg if step == 0 else self.momentum * z_state[0] + (1.0 - self.dampening) * dgg
        dd = dgg + self.momentum * dbuf if self.nesterov else dbuf
        return dd, (dbuf,)


@dataclass(frozen=True)
class AdamDynamics:
    """``torch.optim.Adam`` (L2 weight decay: ``gg = g + weight_decay·w``) and ``torch.optim.AdamW``
    (``decoupled=True``: ``gg = g`` and ``weight_decay·w`` added to the direction):
    ``m = β1·m + (1−β1)·gg``, ``v = β2·v + (1−β2)·gg²``, ``k = step + 1``,
    ``u = (m/(1−β1^k)) / (sqrt(v)/sqrt(1−β2^k) + eps)``, ``d = u [+ weight_decay·w]``.
    State: ``(m, v)``."""

    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    decoupled: bool = False

    n_state = 2
    tangent_is_hvp = False

    def init_state(self, w: torch.Tensor) -> tuple:
        return torch.zeros_like(w), torch.zeros_like(w)

    def objective_grad(self, g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Gradient of the training objective: with L2 weight decay it includes the penalty; with
        decoupled (AdamW) decay the decay is not part of any loss, so it is ``g``."""
        return g + self.weight_decay * w if (self.weight_decay and not self.decoupled) else g

    def _coeffs(self, step: int):
        b1, b2 = self.betas
        k = step + 1
        return b1, b2, 1.0 - b1 ** k, math.sqrt(1.0 - b2 ** k)

    def direction(self, g, w, state, step):
        """``(d_t, (m_{t+1}, v_{t+1}))``; shapes as :meth:`SGDDynamics.direction`."""
        b1, b2, bc1, sbc2 = self._coeffs(step)
        gg = self.objective_grad(g, w)
        m = b1 * state[0] + (1.0 - b1) * gg
        v = b2 * state[1] + (1.0 - b2) * gg * gg
        denom = _safe_sqrt(v) / sbc2 + self.eps
        d = (m / bc1) / denom
        if self.decoupled and self.weight_decay:
            d = d + self.weight_decay * w
        return d, (m, v)

    def tangent(self, g, hz, w, state, step, z_w, z_state):
        """Directional derivative of ``direction`` (see :meth:`SGDDynamics.tangent`)."""
        b1, b2, bc1, sbc2 = self._coeffs(step)
        gg = self.objective_grad(g, w)
        dgg = hz + self.weight_decay * z_w if (self.weight_decay and not self.decoupled) else hz
        m = b1 * state[0] + (1.0 - b1) * gg
        v = b2 * state[1] + (1.0 - b2) * gg * gg
        dm = b1 * z_state[0] + (1.0 - b1) * dgg
        dv = b2 * z_state[1] + 2.0 * (1.0 - b2) * gg * dgg
        sq = _safe_sqrt(v)
        # d sqrt(v) = dv / (2 sqrt(v)); where v = 0 the coordinate has only ever seen zero gradients,
        # so dv = 0 there as well and the derivative is taken as 0.
        dsq = torch.where(sq > 0, dv / (2.0 * torch.where(sq > 0, sq, torch.ones_like(sq))),
                          torch.zeros_like(sq))
        denom = sq / sbc2 + self.eps
        dd = (dm / bc1) / denom - (m / bc1) / (denom * denom) * (dsq / sbc2)
        if self.decoupled and self.weight_decay:
            dd = dd + self.weight_decay * z_w
        return dd, (dm, dv)


Dynamics = Union[SGDDynamics, AdamDynamics]

_SGD_KEYS = ("momentum", "dampening", "nesterov", "weight_decay", "maximize")
_ADAM_KEYS = ("betas", "eps", "weight_decay", "amsgrad", "maximize")


def dynamics_from_optimizer(optimizer: torch.optim.Optimizer) -> Dynamics:
    """The dynamics of a ``torch.optim`` SGD, Adam or AdamW instance.

    All param groups must share their hyperparameters (the schedules control one scalar rate);
    ``maximize``, ``amsgrad`` and Adam's ``decoupled_weight_decay=True`` variants other than AdamW
    are supported as documented below, everything else raises."""
    groups = optimizer.param_groups
    if isinstance(optimizer, torch.optim.SGD):
        keys = _SGD_KEYS
    elif isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        keys = _ADAM_KEYS + ("decoupled_weight_decay",)
    else:
        raise TypeError(f"hypergradient schedules support torch.optim.SGD, Adam and AdamW, got "
                        f"{type(optimizer).__name__}")
    for k in keys + ("lr",):
        vals = {repr(g.get(k)) for g in groups}
        if len(vals) > 1:
            raise ValueError(f"all param groups must share {k!r} (one learning rate is controlled "
                             f"for all of them), got {sorted(vals)}")
    g0 = groups[0]
    if g0.get("maximize", False):
        raise ValueError("maximize=True is not supported (the schedules minimise the objective)")
    if isinstance(optimizer, torch.optim.SGD):
        return SGDDynamics(momentum=float(g0["momentum"]), dampening=float(g0["dampening"]),
                           nesterov=bool(g0["nesterov"]), weight_decay=float(g0["weight_decay"]))
    if g0.get("amsgrad", False):
        raise ValueError("amsgrad=True is not supported (its max is not differentiable); use amsgrad=False")
    decoupled = isinstance(optimizer, torch.optim.AdamW) or bool(g0.get("decoupled_weight_decay", False))
    return AdamDynamics(betas=tuple(float(b) for b in g0["betas"]), eps=float(g0["eps"]),
                        weight_decay=float(g0["weight_decay"]), decoupled=decoupled)


def _flat(tensors, like) -> torch.Tensor:
    return torch.cat([t.reshape(-1) if t is not None else torch.zeros_like(p).reshape(-1)
                      for t, p in zip(tensors, like)])


def read_state(optimizer: torch.optim.Optimizer, dynamics: Dynamics, params: list) -> tuple[tuple, int]:
    """The optimizer's current state as flat tensors (shape (n,) each) and the number of updates
    taken (SGD: 0 before the momentum buffer exists, else 1, which is all its dynamics needs)."""
    st = [optimizer.state.get(p, {}) for p in params]
    if isinstance(dynamics, SGDDynamics):
        if dynamics.n_state == 0:
            return (), 0
        bufs = [s.get("momentum_buffer") for s in st]
        if all(b is None for b in bufs):
            w = torch.cat([p.detach().reshape(-1) for p in params])
            return (torch.zeros_like(w),), 0
        return (_flat(bufs, params),), 1
    steps = {int(s["step"]) for s in st if "step" in s}
    if not steps:
        w = torch.cat([p.detach().reshape(-1) for p in params])
        return (torch.zeros_like(w), torch.zeros_like(w)), 0
    if len(steps) > 1:
        raise RuntimeError(f"Adam state holds different step counts {sorted(steps)} across parameters")
    return (_flat([s.get("exp_avg") for s in st], params),
            _flat([s.get("exp_avg_sq") for s in st], params)), steps.pop()


# ----------------------------------------------------------------------------- gradient clipping

Tensors = Union[torch.Tensor, Sequence[torch.Tensor]]


def _as_list(tensors: Tensors) -> list:
    return [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)


def global_norm(tensors: Tensors) -> torch.Tensor:
    """``‖g‖₂`` over all entries of a tensor or a sequence of tensors (a 0-d tensor), computed as
    ``torch.nn.utils.clip_grad_norm_`` does: the norm of the per-tensor norms."""
    ts = _as_list(tensors)
    if len(ts) == 1:
        return torch.linalg.vector_norm(ts[0])
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in ts]))


def _clip_active(norm: float, max_norm: float | None) -> bool:
    return max_norm is not None and math.isfinite(norm) and norm > max_norm


def clip_by_global_norm(grads: Tensors, max_norm: float | None) -> tuple[Tensors, float]:
    """``(clip(g), ‖g‖)`` with ``clip(g) = g·min(1, c/‖g‖)``, ``c = max_norm`` and the global norm
    over all tensors of ``grads`` (a tensor or a sequence; the result has the same form). This is
    ``torch.nn.utils.clip_grad_norm_`` without its ``1e-6`` in the denominator, which makes ``clip``
    exactly ``c·g/‖g‖`` when active, with the derivative of :func:`clip_tangent`.

    When the clip is inactive (``‖g‖ <= c``, ``max_norm=None``, or a non-finite norm, which the
    caller must check) ``grads`` itself is returned: no copy, and bit-identical results. When
    active the result is differentiable in ``grads`` (reverse mode: LRS-OPT's unroll). The norm is
    returned as a Python float (one device synchronisation)."""
    norm_t = global_norm(grads)
    norm = float(norm_t.detach())
    if not _clip_active(norm, max_norm):
        return grads, norm
    scale = max_norm / norm_t
    if isinstance(grads, torch.Tensor):
        return grads * scale, norm
    return [g * scale for g in grads], norm


def clip_tangent(grads: Tensors, v: Tensors, norm: float, max_norm: float | None) -> Tensors:
    """Directional derivative of :func:`clip_by_global_norm` at the *unclipped* ``g = grads`` along
    ``v`` (same form as ``grads``), ``norm = ‖g‖``:
    ``(c/‖g‖)·(v − ĝ(ĝᵀv))`` with ``ĝ = g/‖g‖`` when the clip is active, ``v`` itself otherwise.
    In the tangent system ``v = H_t z``, the Hessian-vector product of the minibatch loss."""
    if not _clip_active(norm, max_norm):
        return v
    gs, vs = _as_list(grads), _as_list(v)
    coef = max_norm / norm
    gv = torch.stack([torch.dot(g.reshape(-1), x.reshape(-1)) for g, x in zip(gs, vs)]).sum()
    k = gv * (coef / (norm * norm))  # coef·(ĝᵀv)/‖g‖, a 0-d tensor (no synchronisation)
    out = [torch.addcmul(x * coef, g, k, value=-1.0) for g, x in zip(gs, vs)]
    return out[0] if isinstance(v, torch.Tensor) else out


# ----------------------------------------------------------------------------- scalar rules

BETA_RULES = ("descent", "as-printed", "public-code")


def _skipped(on_skip: Callable[[str], None] | None, what: str) -> None:
    if on_skip is None:
        warnings.warn(f"{what}; update skipped", HypergradientWarning, stacklevel=3)
    else:
        on_skip(what)


def lr_update(lr: float, hypergradient: float, beta: float, *,
              on_skip: Callable[[str], None] | None = None) -> float:
    """Eq. (5): ``η_{t+1} = max(η_t − β·Δη_{t+1}, 0)``; the max keeps the rate non-negative.

    ``lr`` and ``beta`` must be finite and >= 0 (else ``ValueError``). The result is always finite:
    when ``η_t − β·Δη_{t+1}`` is not (a non-finite hypergradient, ``0·inf``, or an overflow), ``lr``
    is returned unchanged and the skip is reported to ``on_skip(message)`` (the controllers count
    it), or as a :class:`HypergradientWarning` when ``on_skip`` is None."""
    _check_nonneg("lr", lr)
    _check_nonneg("beta", beta)
    new = lr - beta * hypergradient
    if not math.isfinite(new):
        _skipped(on_skip, f"non-finite learning-rate update: lr - beta*hypergradient = {lr!r} - "
                          f"{beta!r}*{hypergradient!r}")
        return lr
    return max(new, 0.0)


def mu_heuristic(q: float, g1: float, mu: float, c: float) -> tuple[float, float]:
    """Appendix B: ``q̃ = clip(q / g'_1², 0, 1)``, ``μ_{t+1} = q̃^{1/(c_t+1)}``,
    ``c_{t+1} = μ_t·(1 + c_t)``, with ``q = q(μ_t) = Δη_{t+1}·g'_1`` of eq. (10) and
    ``g'_1 = [B_t]_tᵀ∇E(w_{t+1})`` the one-step (HD) hypergradient. Returns ``(μ_{t+1}, c_{t+1})``.
    When ``g'_1 = 0`` (no one-step information) ``q̃`` is taken as 0, which forgets the history;
    so is an undefined ratio (``q`` or ``g'_1²`` overflowed to inf, or NaN), so that μ stays in
    [0, 1]."""
    g1sq = g1 * g1
    ratio = 0.0 if g1sq == 0.0 else q / g1sq
    q_tilde = 0.0 if math.isnan(ratio) else min(max(ratio, 0.0), 1.0)
    return q_tilde ** (1.0 / (c + 1.0)), mu * (1.0 + c)


def beta_update(beta: float, beta_lr: float, hypergradient: float, prev_hypergradient: float,
                lr: float, rule: str = "descent", *, on_skip: Callable[[str], None] | None = None) -> float:
    """Adaptive hyper-learning rate (§4 "Adapting μ and β online", Algorithm 1 last line).

    With ``η_t = η_{t−1} − β_t·Δη_t``, the one-step hypergradient of β is
    ``∂E(w_{t+1})/∂β_t = Δη_{t+1}·∂η_t/∂β_t = −Δη_{t+1}·Δη_t``, so

    * ``"descent"`` (default): gradient descent on it, ``β_{t+1} = max(β_t + α·Δη_{t+1}·Δη_t, 0)``;
    * ``"as-printed"``: Algorithm 1 as printed, ``β_t − α·Δη_{t+1}·Δη_t`` (the opposite sign, an
      ascent step on the same derivative), also clamped at 0;
    * ``"public-code"``: the authors' public code, ``max(β_t + α·Δη_{t+1}·η_t, 0)``.

    ``α`` is ``beta_lr``. Returns ``β_{t+1}``. ``beta``, ``beta_lr`` and ``lr`` must be finite and
    >= 0 (else ``ValueError``); a non-finite new value (non-finite hypergradients or an overflow)
    leaves ``beta`` unchanged and is reported as in :func:`lr_update`."""
    if rule not in BETA_RULES:
        raise ValueError(f"beta_rule must be one of {list(BETA_RULES)}, got {rule!r}")
    _check_nonneg("beta", beta)
    _check_nonneg("beta_lr", beta_lr)
    _check_nonneg("lr", lr)
    # the product of the two hypergradients first (β's own hypergradient, up to sign), so that a
    # zero Δη_t gives exactly β_t even when α·Δη_{t+1} alone would overflow
    if rule == "descent":
        new = beta + beta_lr * (hypergradient * prev_hypergradient)
    elif rule == "as-printed":
        new = beta - beta_lr * (hypergradient * prev_hypergradient)
    else:
        new = beta + beta_lr * (hypergradient * lr)
    if not math.isfinite(new):
        _skipped(on_skip, f"non-finite beta update ({rule!r} rule, beta={beta!r}, beta_lr={beta_lr!r}, "
                          f"hypergradients {hypergradient!r}, {prev_hypergradient!r}, lr={lr!r})")
        return beta
    return max(new, 0.0)
