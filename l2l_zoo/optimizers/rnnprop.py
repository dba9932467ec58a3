"""RNNProp of Lv et al. (2017), "Learning gradient descent: better generalization and longer
horizons", §3.

Input: Adam-like preprocessed features (§3.2) ``[g/(√v̂+ε), m̂/(√v̂+ε)]`` with β1 = β2 = 0.95;
network: Linear(2→20) + ELU → two LSTM layers (hidden 20) → Linear(20→1) = a;
step Δ = step_scale · tanh(a) and θ ← θ − Δ (eq. 8, step_scale = 0.1).
Meta-parameters: 60 + 3360 + 3360 + 21 = 6801. Random scaling of the optimizee during meta-training
(§3.1, "random scaling") is a trainer option, on by default for this optimizer (r = 3 on MNIST).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..base import LearnedOptimizer, MetaDefaults, OptState
from .features import CoordLSTM, adam_features

__all__ = ["RNNProp"]


class RNNProp(LearnedOptimizer):
    """Options: ``hidden_size`` (20), ``num_layers`` (2), ``beta1``/``beta2`` (0.95), ``eps`` (1e-8),
    ``step_scale`` (0.1)."""

    name = "rnnprop"
    separable = True  # per-coordinate LSTM, no aggregation over coordinates
    meta_defaults = MetaDefaults(meta_loss="last", lr=1e-4, random_scale=3.0)

    def __init__(self, *, hidden_size: int = 20, num_layers: int = 2, beta1: float = 0.95,
                 beta2: float = 0.95, eps: float = 1e-8, step_scale: float = 0.1):
        for k, v in (("beta1", beta1), ("beta2", beta2)):
            if not 0.0 <= v < 1.0:
                raise ValueError(f"{k} must be in [0, 1), got {v!r}")
        super().__init__(hidden_size=hidden_size, num_layers=num_layers, beta1=beta1, beta2=beta2,
                         eps=eps, step_scale=step_scale)
        self.inp = nn.Linear(2, hidden_size)
        self.lstm = CoordLSTM(hidden_size, hidden_size, num_layers)
        self.out = nn.Linear(hidden_size, 1)

    def init_state(self, n, *, device=None, dtype=None) -> OptState:
        z = torch.zeros(n, device=device, dtype=dtype)
        return OptState(0, (z, z.clone()), self.lstm.init_hidden(n, device, dtype))

    def features(self, grads, state, *, params=None, loss=None):
        """``[g/(√v̂+ε), m̂/(√v̂+ε)]``, shape (n, 2); statistics (m, v)."""
        m, v = state.stats
        c = self._config
        feats, m, v = adam_features(grads, m, v, state.step, c["beta1"], c["beta2"], c["eps"])
        return feats, (m, v)

    def network(self, feats, hidden):
        h, hidden = self.lstm(F.elu(self.inp(feats)), hidden)
        return -self._config["step_scale"] * torch.tanh(self.out(h).squeeze(1)), hidden
