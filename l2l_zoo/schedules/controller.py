"""The thin stateful shell shared by the online schedules (HD, RTHO, MARTHE).

A controller owns one scalar learning rate ``η`` and writes it into the ``lr`` of every param group
of a ``torch.optim`` SGD / Adam / AdamW optimizer, like a scheduler. Because the hypergradient
needs the training gradient (and, for RTHO and MARTHE, a Hessian-vector product) at the
*current* weights, the controller also performs the training step: one ``ctrl.step(loss)`` replaces
``loss.backward(); optimizer.step()``::

    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    ctrl = MARTHE(opt, val_loss_fn, beta=1e-6)            # val_loss_fn() -> scalar, held-out data
    for x, y in loader:
        ctrl.step(F.cross_entropy(model(x), y))            # step with η_t, then η_{t+1} from Δη_{t+1}

The pure pieces (dynamics, tangents, update rules) live in :mod:`l2l_zoo.schedules.core`; this
module only gathers flat tensors, calls ``optimizer.step()`` and keeps the scalars.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable

import torch

from .core import Dynamics, dynamics_from_optimizer, read_state

__all__ = ["HypergradientController", "ScheduleDiverged", "HypergradientWarning"]


class ScheduleDiverged(RuntimeError):
    """The training loss became non-finite (or exceeded ``divergence_loss``): the run cannot go on.
    ``step``, ``lr`` and ``loss`` say where and how; the parameters are left as they were before
    the failing step."""

    def __init__(self, message: str, *, step: int, lr: float, loss: float):
        super().__init__(message)
        self.step, self.lr, self.loss = step, lr, loss


class HypergradientWarning(RuntimeWarning):
    """A non-finite hypergradient was skipped (emitted once per controller)."""


def _check_nonneg(name: str, value, allow_none: bool = False):
    if value is None and allow_none:
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


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

    Attributes after each step: ``lr`` (the rate for the next step), ``beta``, ``t`` (steps
    taken), ``n_skipped`` (non-finite hypergradients skipped) and ``last`` (a dict with the
    step's ``loss``, ``lr`` used, ``hypergradient`` and method-specific scalars).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, val_loss_fn: Callable[[], torch.Tensor] | None,
                 *, beta: float, divergence_loss: float = math.inf):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if val_loss_fn is not None and not callable(val_loss_fn):
            raise TypeError(f"val_loss_fn must be a callable returning a scalar tensor, got "
                            f"{type(val_loss_fn).__name__}")
        _check_nonneg("beta", beta)
        if not (isinstance(divergence_loss, (int, float)) and divergence_loss > 0):
            raise ValueError(f"divergence_loss must be > 0, got {divergence_loss!r}")
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
        """A non-finite hypergradient: the caller keeps the rate; warn once, count every time."""
        self.n_skipped += 1
        if self.n_skipped == 1:
            warnings.warn(f"{type(self).__name__}: non-finite {what} at step {self.t}; learning-rate "
                          "update skipped (further skips are counted in .n_skipped, not reported)",
                          HypergradientWarning, stacklevel=3)

    def step(self, loss: torch.Tensor) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    # ------------------------------------------------------------------ (de)serialisation
    _scalar_keys = ("lr", "beta", "t", "n_skipped")
    _tensor_keys: tuple = ()

    def state_dict(self) -> dict:
        out = {k: getattr(self, k) for k in self._scalar_keys}
        for k in self._tensor_keys:
            v = getattr(self, k)
            out[k] = _copy(v)
        return out

    def load_state_dict(self, state: dict) -> None:
        missing = [k for k in self._scalar_keys + self._tensor_keys if k not in state]
        if missing:
            raise KeyError(f"state dict lacks {missing}")
        for k in self._scalar_keys:
            setattr(self, k, state[k])
        for k in self._tensor_keys:  # copies: the controller may update its tensors in place
            setattr(self, k, _copy(state[k]))
        self._set_lr(self.lr)
