"""Differentiable unrolling of optimizee training: two interchangeable backends.

A backend owns the optimizee's parameters during one truncation and offers three operations:

    P = backend.start(flat_params)                # cut the graph, begin a truncation
    loss, grad = backend.loss_and_grad(P, batch)  # minibatch loss f(θ) and flat ∇f, graph kept
    P = backend.apply(P, updates)                 # θ + u, differentiable in the meta-parameters
    loss = backend.loss(P, batch)                 # f(θ) only (the outer objective of a run)

``start`` cuts the graph unless its input requires grad: a learned initialisation
(``LearnedOptimizer.initial_params``, e.g. Meta-LSTM's c₀) keeps its graph so that the meta-gradient
reaches it.

* ``func`` keeps the parameters as one flat vector and evaluates the model with
  ``torch.func.functional_call`` on views of it (no copies, no per-tensor bookkeeping).
* ``higher`` keeps a list of per-tensor fast weights in a ``higher.monkeypatch``-ed model (a new one
  per truncation, since ``higher`` stores every version of the fast weights it has seen).

Both compute the same function; ``tests/test_meta.py`` checks that their meta-gradients agree in
float64. Random scaling (Lv et al. 2017, §3.1) is a property of the backend: with a per-coordinate
scale c the optimizer sees x and the model is evaluated at θ = c·x. With ``autocast="bfloat16"`` the
model's forward runs under ``torch.autocast`` (the parameters, their gradients and the optimizer stay
float32).
"""
from __future__ import annotations

import contextlib

import torch
from torch.func import functional_call

from ..tasks.task import Task

__all__ = ["AUTOCAST_DTYPES", "BACKENDS", "FuncBackend", "HigherBackend", "autocast", "make_backend"]


AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16}


def autocast(device: torch.device | str, dtype: str | None):
    """``torch.autocast`` for the optimizee's forward pass (``dtype`` "bfloat16": matrix products in
    bfloat16, losses, reductions and the parameters themselves in float32; no loss scaling is needed,
    unlike float16), or a no-op for ``None``."""
    if dtype is None:
        return contextlib.nullcontext()
    if dtype not in AUTOCAST_DTYPES:
        raise ValueError(f"autocast must be None or one of {sorted(AUTOCAST_DTYPES)}, got {dtype!r}")
    return torch.autocast(device_type=torch.device(device).type, dtype=AUTOCAST_DTYPES[dtype])


def model_loss(task: Task, theta: torch.Tensor, x, y, autocast_dtype: str | None = None) -> torch.Tensor:
    """The task's loss of its model at flat parameters ``theta`` (``functional_call``, so it also
    runs under ``torch.func.vmap``), the forward under :func:`autocast`; a float32 loss with autocast."""
    with autocast(task.device, autocast_dtype):
        loss = task.loss(functional_call(task.model, task.unflatten(theta), (x,)), y)
    return loss if autocast_dtype is None else loss.float()


class _Backend:
    name = "base"

    def __init__(self, task: Task, scale: torch.Tensor | None = None, autocast: str | None = None):
        self.task = task
        self.scale = scale  # flat (n,) or None
        self.autocast = autocast  # the optimizee forward's torch.autocast dtype name, or None

    def _autocast(self):
        return autocast(self.task.device, self.autocast)

    def set_scale(self, scale: torch.Tensor | None) -> None:
        self.scale = scale

    def flat(self, P) -> torch.Tensor:
        """The optimizer-visible coordinates x as one flat vector."""
        raise NotImplementedError

    def start(self, flat: torch.Tensor):
        raise NotImplementedError

    def loss_and_grad(self, P, batch, *, create_graph: bool = False):
        raise NotImplementedError

    def apply(self, P, updates: torch.Tensor):
        raise NotImplementedError

    def theta(self, flat_x: torch.Tensor) -> torch.Tensor:
        """Model parameters θ = c·x for optimizer coordinates x."""
        return flat_x if self.scale is None else flat_x * self.scale


class FuncBackend(_Backend):
    """Flat parameter vector + ``torch.func.functional_call``."""

    name = "func"

    def flat(self, P):
        return P

    def start(self, flat):
        return flat if flat.requires_grad else flat.detach().requires_grad_(True)

    def loss(self, P, batch):
        return model_loss(self.task, self.theta(P), *batch, self.autocast)

    def loss_and_grad(self, P, batch, *, create_graph=False):
        loss = self.loss(P, batch)
        (grad,) = torch.autograd.grad(loss, P, create_graph=create_graph, retain_graph=True)
        return loss, grad

    def apply(self, P, updates):
        return P + updates


class HigherBackend(_Backend):
    """Per-tensor fast weights in a ``higher.monkeypatch``-ed copy of the model."""

    name = "higher"

    def __init__(self, task, scale=None, autocast=None):
        super().__init__(task, scale, autocast)
        import higher  # imported here so that the library works without it installed

        self._higher = higher
        self._fmodel = None

    def flat(self, P):
        return torch.cat([p.reshape(-1) for p in P])

    def _scales(self):
        if self.scale is None:
            return None
        return [s.view(shape) for s, shape in zip(self.scale.split(self.task.numels), self.task.param_shapes)]

    def start(self, flat):
        # A fresh patched module per truncation drops higher's history of earlier fast weights.
        self._fmodel = self._higher.monkeypatch(self.task.model, copy_initial_weights=True,
                                                track_higher_grads=True)
        keep = flat.requires_grad  # a learned initialisation keeps its graph
        return [t.view(s) if keep else t.view(s).detach().requires_grad_(True)
                for t, s in zip(flat.split(self.task.numels), self.task.param_shapes)]

    def loss(self, P, batch):
        x, y = batch
        scales = self._scales()
        params = P if scales is None else [p * s for p, s in zip(P, scales)]
        with self._autocast():
            loss = self.task.loss(self._fmodel(x, params=params), y)
        return loss if self.autocast is None else loss.float()

    def loss_and_grad(self, P, batch, *, create_graph=False):
        loss = self.loss(P, batch)
        grads = torch.autograd.grad(loss, P, create_graph=create_graph, retain_graph=True)
        return loss, torch.cat([g.reshape(-1) for g in grads])

    def apply(self, P, updates):
        return [p + u.view_as(p) for p, u in zip(P, updates.split(self.task.numels))]


BACKENDS = {"func": FuncBackend, "higher": HigherBackend}


def make_backend(name: str, task: Task, scale: torch.Tensor | None = None, autocast: str | None = None) -> _Backend:
    if name not in BACKENDS:
        raise KeyError(f"unknown unroll backend {name!r}; choose from {sorted(BACKENDS)}")
    return BACKENDS[name](task, scale, autocast)
