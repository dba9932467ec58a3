"""Random quadratics f(θ) = ‖Wθ − y‖² (Andrychowicz et al. 2016, §3.1), for unit tests and demos.

Synthetic by design: it is used to check shapes and exact math (meta-gradients, backends), never for
quality claims.
"""
from __future__ import annotations

import torch
from torch import nn

from .data import DataSplits
from .task import Task

__all__ = ["QuadraticTask"]


class _Linear(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.theta = nn.Parameter(torch.randn(dim))

    def forward(self, w):  # w: (dim, dim)
        return w @ self.theta


class QuadraticTask(Task):
    """``dim``-dimensional quadratic with a fixed random (W, y) drawn from ``seed``; ``noise`` > 0
    adds Gaussian noise to y at every sampled "batch" (a stochastic objective)."""

    def __init__(self, dim: int = 10, *, seed: int = 0, noise: float = 0.0, device="cpu",
                 dtype=torch.float32):
        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(dim, dim, generator=g, dtype=dtype).to(device)
        self.y = torch.randn(dim, generator=g, dtype=dtype).to(device)
        self.noise = noise
        self.dtype = dtype
        empty = torch.empty(0)
        data = DataSplits("quadratic", empty, empty, empty, empty, empty, empty, 0, "synthetic",
                          "synthetic random quadratic")
        super().__init__("quadratic", lambda: _Linear(dim).to(dtype), data, batch_size=1, device=device)

    def sample_batch(self, gen, split="train"):
        y = self.y
        if self.noise > 0:
            y = y + self.noise * torch.randn(y.shape, generator=gen, dtype=self.dtype).to(y.device)
        return self.w, y

    @staticmethod
    def loss(outputs, targets):
        return ((outputs - targets) ** 2).sum()

    @torch.no_grad()
    def evaluate(self, model, split="test", batch=0):
        return float(self.loss(model(self.w), self.y)), float("nan")
