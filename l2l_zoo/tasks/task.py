"""Optimizee problems: an architecture, a dataset and a loss, with seeded initialisation and
minibatch sampling so that meta-training and evaluation are reproducible."""
from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .data import DataSplits, stratified_split

__all__ = ["Task"]


class Task:
    """A supervised optimizee problem.

    ``model_fn`` builds the architecture (its parameters are never trained: they are a template for
    shapes and for ``torch.func.functional_call``). ``init`` is ``"default"`` (PyTorch's layer
    initialisation) or a callable applied to a fresh module. Data tensors live on ``device``.
    """

    def __init__(self, name: str, model_fn: Callable[[], nn.Module], data: DataSplits, *,
                 batch_size: int = 128, device="cpu", init: str | Callable = "default"):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        self.name = name
        self.model_fn = model_fn
        self.device = torch.device(device)
        self.data = data.to(self.device)
        n_train = len(self.data.y_train)
        if n_train and batch_size > n_train:
            raise ValueError(f"batch_size {batch_size} exceeds the {n_train} training examples of "
                             f"{data.name!r} (minibatches are drawn without replacement)")
        self.batch_size = batch_size
        self.init = init
        self.model = model_fn().to(self.device)  # functional template
        self.param_names = [n for n, _ in self.model.named_parameters()]
        self.param_shapes = [p.shape for p in self.model.parameters()]
        self.numels = [p.numel() for p in self.model.parameters()]
        self.num_params = sum(self.numels)

    # ------------------------------------------------------------------ parameters
    def init_params(self, seed: int) -> list[torch.Tensor]:
        """A fresh initialisation, identical for a given seed on every device."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            m = self.model_fn()
            if callable(self.init):
                self.init(m)
        return [p.detach().to(self.device) for p in m.parameters()]

    def build_model(self, params: list[torch.Tensor] | None = None, seed: int | None = None) -> nn.Module:
        """A regular module on ``device`` holding ``params`` (or a fresh seeded initialisation)."""
        m = copy.deepcopy(self.model)
        if params is None:
            params = self.init_params(0 if seed is None else seed)
        with torch.no_grad():
            for p, v in zip(m.parameters(), params):
                p.copy_(v)
        return m

    def flatten(self, params: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([p.reshape(-1) for p in params])

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        return {n: t.view(s) for n, t, s in zip(self.param_names, flat.split(self.numels), self.param_shapes)}

    # ------------------------------------------------------------------ the meta-trainer's two streams
    #: evaluate the outer batch in train mode (BatchNorm: its own batch statistics) or eval mode
    outer_train_mode: bool = True

    def inner_batch(self, gen: torch.Generator):
        """The minibatch of one inner (optimizee) step: a training minibatch."""
        return self.sample_batch(gen, "train")

    def outer_batch(self, gen: torch.Generator):
        """The minibatch of the outer objective (meta-loss ``"outer"``): a validation minibatch."""
        return self.sample_batch(gen, "val")

    def reset(self) -> None:
        """Called at the start of every optimizee run: resets the template module's buffers
        (BatchNorm running statistics), so that runs do not leak statistics into each other."""
        for m in self.model.modules():
            if hasattr(m, "reset_running_stats"):
                m.reset_running_stats()

    # ------------------------------------------------------------------ data and loss
    def sample_batch(self, gen: torch.Generator, split: str = "train"):
        """A minibatch drawn without replacement within the batch, from a CPU generator."""
        x, y = self._split(split)
        idx = torch.randperm(len(y), generator=gen)[:self.batch_size].to(self.device)
        return x[idx], y[idx]

    def _split(self, split):
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
        return getattr(self.data, f"x_{split}"), getattr(self.data, f"y_{split}")

    @staticmethod
    def loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs, targets)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str = "test", batch: int = 2000, *,
                 distributed: bool = False) -> tuple[float, float]:
        """Mean loss and accuracy of ``model`` over a whole split. With ``distributed`` under
        torch.distributed, every process evaluates its share of the split and the sums are
        all-reduced (every process must call it, with the same model): the same numbers, up to the
        order of summation (float64 sums), in 1/world of the time."""
        from ..meta.distributed import all_sum, dist_world, my_share
        x, y = self._split(split)
        n = len(y)
        distributed = distributed and dist_world()[0] > 1  # (one process: exactly as without)
        if distributed:
            part = my_share(n)
            x, y = x[part], y[part]
        was_training = model.training
        model.eval()
        total_loss, correct = 0.0, 0
        for s in range(0, len(y), batch):
            out = model(x[s:s + batch])
            if distributed:  # shares summed in float64, so that how the rows are shared hardly matters
                total_loss += float(F.cross_entropy(out, y[s:s + batch], reduction="none").double().sum())
            else:
                total_loss += float(F.cross_entropy(out, y[s:s + batch], reduction="sum"))
            correct += int((out.argmax(1) == y[s:s + batch]).sum())
        model.train(was_training)
        if distributed:
            total_loss, correct = all_sum([total_loss, correct], device=x.device)
        return total_loss / n, correct / n

    def subsample(self, fraction: float, seed: int = 0) -> "Task":
        """The same problem on a class-stratified ``fraction`` of the training set (Chen et al. 2020,
        §3.4 fine-tuning uses 5%)."""
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
        y = self.data.y_train.cpu()
        k = max(self.data.num_classes, int(round(fraction * len(y))))
        (idx,) = stratified_split(y, [k], seed)
        idx = idx.to(self.device)
        d = copy.copy(self.data)
        d.x_train, d.y_train = self.data.x_train[idx], self.data.y_train[idx]
        d.note = f"{self.data.note}; fine-tuning subsample {k}/{len(y)} ({fraction:.0%})"
        return Task(f"{self.name}[{fraction:.0%}]", self.model_fn, d, batch_size=self.batch_size,
                    device=self.device, init=self.init)
