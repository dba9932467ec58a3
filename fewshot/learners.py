"""Learners and episodes as optimizee tasks.

* :class:`Conv4`: the Conv-4 learner of Ravi & Larochelle (2017, §5.1; Vinyals et al. 2016):
  4 × [conv3×3(``filters``) – BatchNorm(eps 1e-3) – ReLU – maxpool 2], then (``num_classes`` > 0) a
  linear classifier; 84×84 inputs give 5×5×filters = 800 features (32 filters), 28×28 inputs 1×1.
  With ``num_classes=0`` it is the feature extractor (SIB's Conv-4-64 backbone).
* :class:`EpisodeTask`: one episode as an :class:`l2l_zoo.tasks.Task`: inner batches from the support
  set (the whole support set when ``inner_batch_size`` covers it, in a fixed order: no randomness),
  the outer batch is the query set. BatchNorm statistics are reset at the start of every run
  (``Task.reset``); ``bn_mode="transductive"`` evaluates the query with its own batch statistics
  (the official Meta-LSTM meta-training), ``"running"`` with the running statistics the inner loop
  accumulated (their meta-test).
* :class:`EpisodeFamily`: a :class:`l2l_zoo.tasks.TaskFamily` of episodes (one per meta-training run).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from l2l_zoo.tasks import DataSplits, Task

from .data.episodes import Episode, EpisodeSampler

__all__ = ["Conv4", "EpisodeTask", "EpisodeFamily", "BN_MODES"]

BN_MODES = ("transductive", "running")


class Conv4(nn.Module):
    """Conv-4 (module docstring). ``bn_momentum`` is PyTorch's (running ← (1−m)·running + m·batch,
    the same convention as Torch7's, so the official 0.95 / 0.9 carry over)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 5, filters: int = 32, image_size: int = 28,
                 bn_momentum: float = 0.1, bn_eps: float = 1e-3):
        super().__init__()
        layers, c = [], in_channels
        for _ in range(4):
            layers += [nn.Conv2d(c, filters, 3, padding=1), nn.BatchNorm2d(filters, eps=bn_eps, momentum=bn_momentum),
                       nn.ReLU(), nn.MaxPool2d(2)]
            c = filters
        self.features = nn.Sequential(*layers)
        side = image_size
        for _ in range(4):
            side //= 2
        self.feature_dim = filters * side * side
        self.classifier = nn.Linear(self.feature_dim, num_classes) if num_classes > 0 else None

    def forward(self, x):
        h = self.features(x).flatten(1)
        return h if self.classifier is None else self.classifier(h)


class EpisodeTask(Task):
    """One episode as an optimizee task (module docstring). ``model_fn() -> nn.Module`` builds the
    learner for ``episode.ways`` classes; ``inner_batch_size``: support examples per inner step (None:
    the whole support set, as the official Meta-LSTM configurations: batch 25 = 5×5 in 5-shot, 5 in
    1-shot)."""

    def __init__(self, episode: Episode, model_fn: Callable[[], nn.Module], *, inner_batch_size: int | None = None,
                 bn_mode: str = "transductive", device="cpu", name: str = "episode"):
        if bn_mode not in BN_MODES:
            raise ValueError(f"bn_mode must be one of {BN_MODES}, got {bn_mode!r}")
        n = len(episode.support_y)
        bs = n if inner_batch_size is None else int(inner_batch_size)
        if not 1 <= bs <= n:
            raise ValueError(f"inner_batch_size must be in 1..{n} (the support set), got {inner_batch_size!r}")
        data = DataSplits(name, episode.support_x, episode.support_y, episode.query_x, episode.query_y,
                          episode.query_x, episode.query_y, episode.ways, "episode",
                          f"{episode.ways}-way episode, {n} support / {len(episode.query_y)} query examples")
        super().__init__(name, model_fn, data, batch_size=bs, device=device)
        self.episode = episode
        self.bn_mode = bn_mode
        self.outer_train_mode = bn_mode == "transductive"
        self._full = bs == n

    def inner_batch(self, gen: torch.Generator):
        if self._full:
            return self.data.x_train, self.data.y_train
        return self.sample_batch(gen, "train")

    def outer_batch(self, gen: torch.Generator):
        return self.data.x_val, self.data.y_val

    @torch.no_grad()
    def query_accuracy(self, flat_params: torch.Tensor) -> tuple[float, float]:
        """(loss, accuracy) on the query set of the learner at ``flat_params``, with the template's
        current BatchNorm statistics (``bn_mode="running"``) or the query's own (transductive)."""
        model = self.build_model(params=[t.detach() for t in self.unflatten(flat_params).values()])
        model.train(self.outer_train_mode)
        out = model(self.data.x_val)
        return float(F.cross_entropy(out, self.data.y_val)), float((out.argmax(1) == self.data.y_val).float().mean())


class EpisodeFamily:
    """Episodes of ``sampler`` as a task family: ``sample(gen)`` draws an episode with ``gen`` and
    wraps it in an :class:`EpisodeTask` (``task_kwargs``: ``inner_batch_size``, ``bn_mode``,
    ``device``)."""

    def __init__(self, sampler: EpisodeSampler, model_fn: Callable[[], nn.Module], *, name: str, **task_kwargs):
        self.sampler, self.model_fn, self.name, self.task_kwargs = sampler, model_fn, name, task_kwargs
        self.template = EpisodeTask(sampler.episode(0, 0), model_fn, **task_kwargs)

    def sample(self, gen: torch.Generator) -> EpisodeTask:
        return EpisodeTask(self.sampler.sample(gen), self.model_fn, **self.task_kwargs)
