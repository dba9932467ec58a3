"""The LearnedOptimizer contract shared by every optimizer, regularizer, trainer and the adapter.

A learned optimizer is an ``nn.Module`` whose parameters are its meta-parameters (``theta``). It works
on a *flat* vector of ``n`` optimizee coordinates and splits one step into two pure functions:

* ``features(grads, state, params=, loss=) -> (feats, stats)``: the optimizer's *input state* ``s_t``
  (shape ``(n, d_in)``; one row for optimizers that see a global quantity, such as MLR-SNet's loss)
  and the updated feature statistics (running moments and the like);
* ``network(feats, hidden) -> (updates, hidden)``: the learned map from input state and recurrent
  hidden state to per-coordinate updates ``u_t`` (shape ``(n,)``), applied as ``params + updates``.

``step`` composes the two (and returns the intermediates), ``update`` returns just the updates and
the new state. A network whose output is not itself the update (MLR-SNet outputs one learning rate)
overrides ``step`` to combine it with a base direction. Nothing is mutated: the state is an explicit :class:`OptState` that the
caller threads through and may :meth:`~OptState.detach` at truncation boundaries. The smoothness
regularizer (``l2l_zoo.regularizers``) perturbs ``feats`` with ``hidden`` held fixed, which is why the
split exists: it works for every optimizer without any code inside them.
"""
from __future__ import annotations

import contextlib
import inspect
import threading
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn

__all__ = ["OptState", "Step", "LearnedOptimizer", "MetaDefaults", "reference_kernels", "fused_kernels_enabled"]

_KERNELS = threading.local()


@contextlib.contextmanager
def reference_kernels():
    """Within this block optimizers compute with their plain autograd formulas, not their fused
    kernels (``MetaTrainConfig(fast=False)``: the reference path that the fast one is tested
    against)."""
    old = getattr(_KERNELS, "reference", False)
    _KERNELS.reference = True
    try:
        yield
    finally:
        _KERNELS.reference = old


def fused_kernels_enabled() -> bool:
    """False inside :func:`reference_kernels`."""
    return not getattr(_KERNELS, "reference", False)


class OptState(NamedTuple):
    """State of a learned optimizer over ``n`` coordinates.

    ``step``: number of updates taken so far (a Python int).
    ``stats``: feature statistics, e.g. RNNProp's moments; tensors of shape ``(n,)``.
    ``hidden``: the network's recurrent state, e.g. ``(h1, c1, h2, c2)`` each ``(n, hidden_size)``.
    """

    step: int
    stats: tuple
    hidden: tuple

    def detach(self) -> "OptState":
        """Cut the graph at a truncation boundary (values kept)."""
        return OptState(self.step, tuple(t.detach() for t in self.stats),
                        tuple(t.detach() for t in self.hidden))

    def to(self, device=None, dtype=None) -> "OptState":
        def mv(t):
            return t.to(device=device, dtype=dtype if t.is_floating_point() else None)
        return OptState(self.step, tuple(mv(t) for t in self.stats), tuple(mv(t) for t in self.hidden))

    def is_finite(self) -> bool:
        return all(bool(torch.isfinite(t).all()) for t in (*self.stats, *self.hidden))


class Step(NamedTuple):
    """Everything one optimizer step produced: ``updates`` (n,), the new ``state``, and the input
    state ``feats`` and hidden state ``hidden`` the network read (what regularizers perturb)."""

    updates: torch.Tensor
    state: OptState
    feats: torch.Tensor
    hidden: tuple


class MetaDefaults(NamedTuple):
    """Meta-training settings each optimizer's paper used (overridable by the trainer's config).

    ``meta_loss``: name in ``l2l_zoo.meta.losses.META_LOSSES``; ``lr``: Adam meta learning rate;
    ``random_scale``: r of RNNProp's random scaling c = exp(U(-r, r)) (0 disables it).
    """

    meta_loss: str = "sum"
    lr: float = 1e-3
    random_scale: float = 0.0


class LearnedOptimizer(nn.Module):
    """Base class. Subclasses set ``name`` and ``meta_defaults``, implement ``init_state``,
    ``features`` and ``network``, and accept only keyword arguments in ``__init__`` (their
    values are recorded as :attr:`config` so that ``l2l_zoo.load`` rebuilds an identical object).

    ``coordinatewise`` is True when row ``i`` of the features and hidden state belongs to
    coordinate ``i`` (so that subsets of coordinates can be processed independently up to any
    cross-coordinate aggregation the network does).

    ``separable`` is True when ``network`` treats rows independently (no aggregation over
    coordinates) and a coordinate's features and statistics depend only on its own gradient,
    parameter and statistics, the shared step count and (with ``needs_loss``) the loss. The
    smoothness PGD then evaluates many steps' rows stacked in one call, and a meta-batch of B
    instances without ``needs_loss`` runs one ordinary step over the B·n stacked coordinates instead
    of a vmapped one (the same numbers, one large kernel per op).

    ``vmappable`` is True when ``step`` can run under ``torch.func.vmap`` over optimizee instances
    (no data-dependent Python control flow), which meta-batches (``MetaTrainConfig(meta_batch=B)``)
    need.
    """

    name: ClassVar[str] = "base"
    meta_defaults: ClassVar[MetaDefaults] = MetaDefaults()
    coordinatewise: ClassVar[bool] = True
    separable: ClassVar[bool] = False
    vmappable: ClassVar[bool] = True
    needs_loss: ClassVar[bool] = False
    needs_params: ClassVar[bool] = False

    def __init__(self, **config: Any):
        super().__init__()
        self._config = dict(config)

    # ------------------------------------------------------------------ configuration
    @property
    def config(self) -> dict:
        """Constructor keyword arguments, enough to rebuild this optimizer (without weights)."""
        return dict(self._config)

    @classmethod
    def option_names(cls) -> list[str]:
        sig = inspect.signature(cls.__init__)
        return [p for p, v in sig.parameters.items()
                if p != "self" and v.kind is inspect.Parameter.KEYWORD_ONLY]

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self._config.items())

    def num_meta_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------ the contract
    def init_state(self, n: int, *, device=None, dtype=None) -> OptState:
        """Fresh state for ``n`` coordinates (hidden state and statistics zero)."""
        raise NotImplementedError

    def features(self, grads: torch.Tensor, state: OptState, *, params: torch.Tensor | None = None,
                 loss: torch.Tensor | None = None) -> tuple[torch.Tensor, tuple]:
        """Input state ``s_t`` of shape ``(n, d_in)`` (or ``(1, d_in)``) and new statistics."""
        raise NotImplementedError

    def network(self, feats: torch.Tensor, hidden: tuple) -> tuple[torch.Tensor, tuple]:
        """Updates ``u_t`` of shape ``(n,)`` and the new hidden state."""
        raise NotImplementedError

    def initial_params(self, params: torch.Tensor) -> torch.Tensor:
        """The optimizee's starting point for a run, given the task's fresh initialisation ``params``
        (flat, shape (n,)). Default: ``params`` itself. An optimizer that meta-learns the
        initialisation (Meta-LSTM's c₀, Ravi & Larochelle 2017 §3.2, whose cell state starts at the
        learner's learned initial parameters) returns its own parameter, differentiably, so that the
        meta-gradient reaches it through the unrolled trajectory; it is a meta-parameter like any
        other (in ``parameters()``, trained by the meta-optimizer, saved and loaded)."""
        return params

    def step(self, grads: torch.Tensor, state: OptState, *, params: torch.Tensor | None = None,
             loss: torch.Tensor | None = None, network=None) -> Step:
        """One pure step with its intermediates (see :class:`Step`). ``network`` replaces
        ``self.network`` for this call (the trainer passes a checkpointed version). Optimizers whose
        network output is not itself the update (MLR-SNet: a learning rate) override this."""
        feats, stats = self.features(grads, state, params=params, loss=loss)
        updates, hidden = (network or self.network)(feats, state.hidden)
        return Step(updates, OptState(state.step + 1, stats, hidden), feats, state.hidden)

    def update(self, grads: torch.Tensor, state: OptState, *, params: torch.Tensor | None = None,
               loss: torch.Tensor | None = None) -> tuple[torch.Tensor, OptState]:
        """One pure step: ``updates, state = lopt.update(grads, state)``; apply as ``params + updates``.

        ``grads``: flat gradient of shape ``(n,)``. Differentiable with respect to the
        meta-parameters; nothing is modified in place.
        """
        s = self.step(grads, state, params=params, loss=loss)
        return s.updates, s.state

    def forward(self, grads, state, **kw):  # so that nn.Module hooks and __call__ work
        return self.update(grads, state, **kw)
