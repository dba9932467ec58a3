"""The thin stateful shell shared by the online schedules (HD, RTHO, MARTHE), and the protocol of
every learning-rate controller (:class:`LRController`).

A controller owns one scalar learning rate ``η`` and writes it into the ``lr`` of every param group
of a ``torch.optim`` SGD / Adam / AdamW optimizer, like a scheduler. Because the hypergradient
needs the training gradient (and, for RTHO and MARTHE, a Hessian-vector product) at the
*current* weights, the controller also performs the training step: one ``ctrl.step(loss)`` replaces
``loss.backward(); [clip_grad_norm_;] optimizer.step()``::

    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    ctrl = MARTHE(opt, val_loss_fn, beta=1e-6)            # val_loss_fn() -> scalar, held-out data
    for x, y in loader:
        ctrl.step(F.cross_entropy(model(x), y))            # step with η_t, then η_{t+1} from Δη_{t+1}

Each step, in order: the loss is checked (non-finite or above ``divergence_loss``: ScheduleDiverged);
the gradient's global norm is taken and checked (non-finite: ScheduleDiverged, before anything is
changed); the gradient is clipped to norm ``grad_clip`` (default 100, the authors' public MARTHE
code's value; ``None`` disables it; the clip is part of the dynamics Φ, so the tangents
differentiate it, see :func:`~l2l_zoo.schedules.core.clip_tangent`); the optimizer steps; the rate
is updated. A non-finite hypergradient, or a rate / β update that would not be finite, is skipped
(the value is kept), counted in ``n_skipped`` and warned about once.

The pure pieces (dynamics, clipping, tangents, update rules) live in
:mod:`l2l_zoo.schedules.core`; this module only gathers flat tensors, calls ``optimizer.step()``
and keeps the scalars.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, Mapping, Protocol, runtime_checkable

import torch

from .core import (Dynamics, HypergradientWarning, _check_nonneg, check_grad_clip, clip_by_global_norm,
                   dynamics_from_optimizer, read_state)

__all__ = ["LRController", "HypergradientController", "ScheduleDiverged", "HypergradientWarning",
           "DEFAULT_GRAD_CLIP"]

DEFAULT_GRAD_CLIP = 100.0
"""The global gradient-norm clip of the authors' public MARTHE code, the default of HD, RTHO and
MARTHE here."""


@runtime_checkable
class LRController(Protocol):
    """What every learning-rate controller offers (HD, RTHO, MARTHE, MLR-SNet's controller), so that
    one training loop (:class:`l2l_zoo.runs.ControllerStepper`) drives any of them.

    * ``optimizer``: the wrapped ``torch.optim`` optimizer, whose param groups' ``lr`` the
      controller sets;
    * ``lr``: the current rate (the one in the optimizer's param groups): the rate the next step
      will use, except for a controller whose next rate is a function of the next minibatch
      (HD on the training loss, MLR-SNet): there, the rate its last step used;
    * ``t``: the number of steps taken;
    * ``last``: a dict of the last step's scalars, at least ``loss`` and ``lr`` (the rate that step
      used); empty before the first step;
    * ``step(loss) -> float``: one training step from the scalar minibatch loss tensor (backward,
      gradient clipping if configured, set the rate, ``optimizer.step()``); returns the loss value;
      raises :class:`ScheduleDiverged` when training cannot go on;
    * ``state_dict()`` / ``load_state_dict(state)``: the controller's own state (not the model's
      or the optimizer's), of plain containers and tensors.

    ``isinstance(obj, LRController)`` checks that these members exist (not their signatures).
    """

    optimizer: torch.optim.Optimizer
    lr: float
    t: int
    last: dict

    def step(self, loss: torch.Tensor) -> float: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class ScheduleDiverged(RuntimeError):
    """Training cannot go on: the training loss became non-finite (or exceeded
    ``divergence_loss``), or the training gradient did (with a finite loss). ``step``, ``lr`` and
    ``loss`` say where and how; the parameters, the optimizer state, the tangent and the rate are
    left as they were before the failing step."""

    def __init__(self, message: str, *, step: int, lr: float, loss: float):
        super().__init__(message)
        self.step, self.lr, self.loss = step, lr, loss


def _copy(v):
    """A copy of a controller's tensor state: a tensor, a tuple of tensors or ``None``."""
    return tuple(x.clone() for x in v) if isinstance(v, tuple) else (None if v is None else v.clone())


class HypergradientController:
    """Base class: optimizer bookkeeping, the learning rate, NaN handling, divergence.

    ``val_loss_fn()`` returns the objective ``E`` (a scalar tensor) at the model's *current*
    weights, typically the loss on (a minibatch of) a held-out validation split. Subclasses
    implement :meth:`step`.

    Parameters that do not influence the training loss get a zero gradient (so weight decay still
    acts on them, exactly as in the dynamics the tangent follows).

    ``grad_clip``: the training gradient ``g`` (over all parameters, before weight decay, as
    ``torch.nn.utils.clip_grad_norm_`` before ``optimizer.step()``) is replaced by
    ``g·min(1, grad_clip/‖g‖)``; ``None`` disables it. The clip is part of the dynamics, and the
    tangents use its exact derivative.

    Satisfies :class:`LRController`. Attributes after each step: ``lr`` (the rate for the next
    step), ``beta``, ``t`` (steps taken), ``n_skipped`` (hypergradients and rate / β updates
    skipped because they were not finite) and ``last`` (a dict with the step's ``loss``, ``lr``
    used, ``grad_norm`` (the global norm before clipping), ``hypergradient`` and method-specific
    scalars).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, val_loss_fn: Callable[[], torch.Tensor] | None,
                 *, beta: float, divergence_loss: float = math.inf,
                 grad_clip: float | None = DEFAULT_GRAD_CLIP):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if val_loss_fn is not None and not callable(val_loss_fn):
            raise TypeError(f"val_loss_fn must be a callable returning a scalar tensor, got "
                            f"{type(val_loss_fn).__name__}")
        _check_nonneg("beta", beta)
        if not (isinstance(divergence_loss, (int, float)) and divergence_loss > 0):
            raise ValueError(f"divergence_loss must be > 0, got {divergence_loss!r}")
        self.grad_clip = check_grad_clip(grad_clip)
        self.optimizer = optimizer
        self.dynamics: Dynamics = dynamics_from_optimizer(optimizer)
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        if not self.params:
            raise ValueError("the optimizer has no parameters")
        lr = optimizer.param_groups[0]["lr"]
        if isinstance(lr, torch.Tensor):
            lr = float(lr)
        _check_nonneg("the optimizer's initial lr", lr)
        self.val_loss_fn = val_loss_fn
        self.lr = float(lr)
        self.beta = float(beta)
        self.divergence_loss = float(divergence_loss)
        self.t = 0
        self.n_skipped = 0
        self.last: dict = {}
        self._numels = [p.numel() for p in self.params]

    # ------------------------------------------------------------------ flat helpers
    def _flat(self, tensors) -> torch.Tensor:
        return torch.cat([(t if t is not None else torch.zeros_like(p)).reshape(-1)
                          for t, p in zip(tensors, self.params)])

    def _views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [v.view_as(p) for v, p in zip(flat.split(self._numels), self.params)]

    @staticmethod
    def _dots(xss: tuple, ys) -> list[float]:
        """``[Σ_i <x_i, y_i> for xs in xss]``: flat dot products of tensor lists against the same
        list ``ys`` without concatenating any side, ordered tensor by tensor so that each ``y_i``
        is read while it is in cache."""
        k = len(xss)
        terms = [torch.dot(xs[i].reshape(-1), y.reshape(-1)) for i, y in enumerate(ys) for xs in xss]
        return torch.stack(terms).view(-1, k).sum(0).tolist()

    def _weights(self) -> torch.Tensor | None:
        """The flat weights ``w`` (n,), or ``None`` when the dynamics never read them (no weight
        decay): the concatenation is a full copy of the model, skipped when it is not needed."""
        if not self.dynamics.weight_decay:
            return None
        return torch.cat([p.detach().reshape(-1) for p in self.params])

    def _state(self):
        return read_state(self.optimizer, self.dynamics, self.params)

    # ------------------------------------------------------------------ steps
    def _check_loss(self, loss: torch.Tensor) -> float:
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise TypeError(f"step() needs the scalar training-loss tensor of this step, got {loss!r}")
        value = float(loss.detach())
        if not math.isfinite(value) or value > self.divergence_loss:
            raise ScheduleDiverged(
                f"training diverged at step {self.t}: minibatch loss {value:.4g} (lr={self.lr:.4g}, "
                f"beta={self.beta:.4g}); try a smaller beta or initial lr", step=self.t, lr=self.lr,
                loss=value)
        return value

    def _clip(self, grads, value: float):
        """``(clip(g), ‖g‖)`` for the training gradient ``grads`` (a flat tensor or one tensor per
        parameter), see :func:`~l2l_zoo.schedules.core.clip_by_global_norm`. A non-finite norm
        raises :class:`ScheduleDiverged` here, before anything has been changed."""
        clipped, norm = clip_by_global_norm(grads, self.grad_clip)
        if not math.isfinite(norm):
            raise ScheduleDiverged(
                f"training diverged at step {self.t}: the training gradient is not finite (global norm "
                f"{norm!r}) although the minibatch loss is {value:.4g} (lr={self.lr:.4g}, beta={self.beta:.4g}); "
                "the weights, optimizer state and rate are those before this step", step=self.t,
                lr=self.lr, loss=value)
        return clipped, norm

    def _grads(self, scalar: torch.Tensor, create_graph: bool = False) -> tuple:
        """``∂scalar/∂params``, one tensor per parameter (zeros for parameters it does not use)."""
        grads = torch.autograd.grad(scalar, self.params, create_graph=create_graph, allow_unused=True)
        return tuple(torch.zeros_like(p) if g is None else g for g, p in zip(grads, self.params))

    def _apply(self, grads, lr: float) -> None:
        """The parameter update ``w_{t+1} = Φ_t(w_t, η_t)`` by the wrapped optimizer."""
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        for p, g in zip(self.params, grads):
            p.grad = g.detach()
        self.optimizer.step()
        for p in self.params:
            p.grad = None

    def _set_lr(self, lr: float) -> None:
        _check_nonneg("lr", lr)  # the update rules guarantee it; a loaded state is checked before
        self.lr = lr
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    def _val_grad(self) -> tuple:
        """``∇E`` at the current weights, one tensor per parameter (zeros where unused)."""
        e = self.val_loss_fn()
        if not isinstance(e, torch.Tensor) or e.numel() != 1:
            raise TypeError(f"val_loss_fn must return a scalar tensor, got {e!r}")
        return self._grads(e)

    def _skip(self, what: str) -> None:
        """A non-finite hypergradient or update (``what`` says which): the caller keeps the value;
        warn once, count every time. Also the ``on_skip`` of the core update rules."""
        self.n_skipped += 1
        if self.n_skipped == 1:
            warnings.warn(f"{type(self).__name__} step {self.t}: {what}; update skipped (further skips are "
                          "counted in .n_skipped, not reported)", HypergradientWarning, stacklevel=3)

    def step(self, loss: torch.Tensor) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    # ------------------------------------------------------------------ (de)serialisation
    _scalar_keys = ("lr", "beta", "t", "n_skipped")
    _tensor_keys: tuple = ()   # flat (n,) tensors or None; or tuples of them if also in _tuple_keys
    _tuple_keys: tuple = ()    # checked by the subclass's _checked_state

    def state_dict(self) -> dict:
        """The controller's scalars and (copies of its) tensors, with its class name under
        ``"controller"``; plain types only (``torch.load(weights_only=True)`` reads it)."""
        out = {"controller": type(self).__name__}
        out.update({k: getattr(self, k) for k in self._scalar_keys})
        for k in self._tensor_keys:
            out[k] = _copy(getattr(self, k))
        return out

    def load_state_dict(self, state: Mapping) -> None:
        """Restore a :meth:`state_dict`. Everything is checked before anything is set: a missing key
        raises ``KeyError``; a state dict of another controller class, a tensor whose size does not
        match the parameters' (another model), a rate or β that is not finite and >= 0, or any other
        invalid entry raises ``ValueError``. Tensors are copied onto the parameters' device and dtype.
        (State dicts written before the class name was recorded are checked on their entries only.)"""
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a dict from state_dict(), got {type(state).__name__}")
        name = state.get("controller", type(self).__name__)
        if name != type(self).__name__:
            raise ValueError(f"state dict is from a {name!r} controller, cannot load it into a "
                             f"{type(self).__name__!r}")
        missing = [k for k in self._scalar_keys + self._tensor_keys if k not in state]
        if missing:
            raise KeyError(f"state dict lacks {missing}")
        values = self._checked_state(state)
        for k, v in values.items():
            setattr(self, k, v)
        self._set_lr(self.lr)

    def _checked_state(self, state: Mapping) -> dict:
        """The validated attribute values of ``state`` (tensors copied); raises ``ValueError``."""
        out = {}
        for k in ("lr", "beta"):
            _check_nonneg(f"state[{k!r}]", state[k])
            out[k] = float(state[k])
        for k in ("t", "n_skipped"):
            v = state[k]
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"state[{k!r}] must be an integer >= 0, got {v!r}")
            out[k] = v
        for k in self._tensor_keys:
            if k not in self._tuple_keys:
                out[k] = self._checked_flat(k, state[k])
        return out

    def _checked_flat(self, key: str, v, allow_none: bool = True) -> torch.Tensor | None:
        """A copy of a flat state tensor of shape (n,), n = the number of parameter entries, on the
        parameters' device and dtype; ``None`` passes when ``allow_none``."""
        if v is None and allow_none:
            return None
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"state[{key!r}] must be a tensor{' or None' if allow_none else ''}, got "
                             f"{type(v).__name__}")
        n = sum(self._numels)
        if tuple(v.shape) != (n,):
            raise ValueError(f"state[{key!r}] has shape {tuple(v.shape)}, but this controller's parameters "
                             f"have {n} entries: expected shape ({n},) (a state dict of another model?)")
        if not bool(torch.isfinite(v).all()):
            raise ValueError(f"state[{key!r}] has non-finite entries")
        p0 = self.params[0]
        return v.detach().to(device=p0.device, dtype=p0.dtype, copy=True)
