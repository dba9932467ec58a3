"""DMOptimizer: the coordinate-wise two-layer LSTM of Andrychowicz et al. (2016), "Learning to learn
by gradient descent by gradient descent", §2.1 (coordinate-wise LSTM, Fig. 3) and §3 / appendix A
(gradient preprocessing).

Update rule (eq. 1 with the LSTM m): θ_{t+1} = θ_t + output_scale · W h²_t + b, where h² is the
top LSTM layer's hidden state driven by the preprocessed gradient. Meta-parameters: two LSTM layers
of hidden size 20 with both PyTorch bias vectors, Linear(20→1): 1920 + 3360 + 21 = 5301.
"""
from __future__ import annotations

from torch import nn

from ..base import LearnedOptimizer, MetaDefaults, OptState
from .features import CoordLSTM, log_sign_preprocess

__all__ = ["DMOptimizer"]


class DMOptimizer(LearnedOptimizer):
    """Coordinate-wise LSTM optimizer.

    Options: ``hidden_size`` (20), ``num_layers`` (2), ``preprocess`` (log/sign preprocessing, eq. 3
    of Chen et al. 2020; else the raw gradient), ``p`` (10; DeepMind's TF code uses 5),
    ``clamp`` (clip preprocessed features to [-1, 1] as the TF code), ``output_scale`` (0.1 as in
    common PyTorch MNIST reproductions; the TF code uses 0.01, quadratics 1.0).
    """

    name = "dm"
    separable = True  # per-coordinate LSTM, no aggregation over coordinates
    meta_defaults = MetaDefaults(meta_loss="sum", lr=1e-3, random_scale=0.0)

    def __init__(self, *, hidden_size: int = 20, num_layers: int = 2, preprocess: bool = True,
                 p: float = 10.0, clamp: bool = False, output_scale: float = 0.1):
        if hidden_size < 1 or num_layers < 1:
            raise ValueError(f"hidden_size and num_layers must be >= 1, got {hidden_size}, {num_layers}")
        if p <= 0:
            raise ValueError(f"p must be > 0, got {p!r}")
        super().__init__(hidden_size=hidden_size, num_layers=num_layers, preprocess=preprocess,
                         p=p, clamp=clamp, output_scale=output_scale)
        self.lstm = CoordLSTM(2 if preprocess else 1, hidden_size, num_layers)
        self.out = nn.Linear(hidden_size, 1)

    def init_state(self, n, *, device=None, dtype=None) -> OptState:
        return OptState(0, (), self.lstm.init_hidden(n, device, dtype))

    def features(self, grads, state, *, params=None, loss=None):
        """Preprocessed gradient, shape (n, 2) (or (n, 1) without preprocessing)."""
        cfg = self._config
        if cfg["preprocess"]:
            return log_sign_preprocess(grads, cfg["p"], cfg["clamp"]), ()
        return grads.reshape(-1, 1), ()

    def network(self, feats, hidden):
        h, hidden = self.lstm(feats, hidden)
        return self._config["output_scale"] * self.out(h).squeeze(1), hidden
