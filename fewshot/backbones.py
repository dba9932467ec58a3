"""Frozen feature extractors for SIB (Hu et al. 2020) and the nearest-class-mean baseline.

* :func:`conv4_64`: Conv-4-64, the :class:`~fewshot.learners.Conv4` stack with 64 filters and no
  classifier (Hu et al. 2020 report it beside WRN-28-10; 28×28 Omniglot gives 64 features).
* :class:`WideResNet` / :func:`wrn28_10`: WRN-28-10 (Zagoruyko & Komodakis 2016), 640 features after
  global average pooling, with the module names of the authors' release so that their backbone
  checkpoints load (:func:`load_official_wrn`). Architecture only: training one takes a GPU.
* :func:`pretrain`: the backbone and a cosine classifier (:class:`CosineClassifier`) trained by plain
  classification over the training split's classes, SGD with Nesterov momentum 0.9 and weight decay
  5e-4, a linear warm-up and ×``gamma`` decays at ``milestones`` (the authors' backbone pretraining;
  their released recipe for WRN-28-10 on miniImageNet: lr 0.1, batch 64, 6000 warm-up iterations,
  60 epochs, ×0.1 after epoch 50). It is a :func:`l2l_zoo.runs.train` run with an
  :class:`~l2l_zoo.runs.OptimizerStepper`, so it checkpoints, resumes bit-for-bit and stops on a
  non-finite loss like every other training run of the library. Minibatches are epoch-wise
  shuffles: batch ``t`` is slice ``t mod E`` of the permutation of epoch ``t // E`` drawn from a
  generator seeded by ``(seed, epoch)``, a function of the step counter (so resuming needs no data
  state).
* Feature caching (:func:`cache_features`, :class:`FeatureSplit`): with the backbone frozen, every
  image of a split is embedded once (eval mode: BatchNorm running statistics) and episodes are built
  from the cached features, which makes an SIB episode about 15× cheaper. A :class:`FeatureSplit`
  has the class layout of its :class:`~fewshot.data.FewShotSplit`, so
  ``EpisodeSampler(feature_split, N, K, Q).episode(seed, i)`` holds exactly the classes and images of
  ``EpisodeSampler(split, N, K, Q).episode(seed, i)``, as features. Caching forgoes per-episode
  pixel augmentation (the sampler's ``transform`` would act on features, so do not pass one).
"""
from __future__ import annotations

import math
import os
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from l2l_zoo import runs

from .data.episodes import Episode, FewShotSplit, episode_generator, mean_ci
from .learners import Conv4
from .sib import evaluate_ncm

__all__ = ["conv4_64", "WideResNet", "wrn28_10", "load_official_wrn", "CosineClassifier", "pretrain",
           "FeatureSplit", "cache_features", "embed_episode", "ncm_validation"]


# ============================================================================ networks

def conv4_64(in_channels: int = 1, image_size: int = 28) -> Conv4:
    """Conv-4-64 feature extractor: 4 × [conv3×3(64) – BN – ReLU – maxpool 2], flattened;
    ``feature_dim`` = 64·(image_size // 16)² (64 for 28×28, 1600 for 84×84)."""
    return Conv4(in_channels=in_channels, num_classes=0, filters=64, image_size=image_size)


class _WideBlock(nn.Module):
    """Pre-activation basic block BN-ReLU-conv3×3-BN-ReLU-conv3×3 with a 1×1 projection shortcut
    when the width changes. Attribute names follow the authors' release (state-dict keys)."""

    def __init__(self, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.equal = in_planes == out_planes and stride == 1
        self.convShortcut = None if self.equal else nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)

    def forward(self, x):
        a = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(a))))
        # the projection reads the activated input, the identity the raw one (as the release)
        return (x if self.equal else self.convShortcut(a)) + out


class _WideGroup(nn.Module):
    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(*[_WideBlock(in_planes if i == 0 else out_planes, out_planes,
                                                stride if i == 0 else 1) for i in range(n)])

    def forward(self, x):
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-``depth``-``widen_factor`` feature extractor (Zagoruyko & Komodakis 2016): conv3×3(16), three
    groups of (depth − 4)/6 blocks of widths 16k, 32k, 64k with strides 2, 2, 2 (``cifar=True``:
    1, 2, 2 for 32×32 inputs, as the authors' code), BN-ReLU, global average pooling. Output
    (B, 64·k); WRN-28-10 gives 640 features. He-normal convolution init, BN weight 1 and bias 0."""

    def __init__(self, depth: int = 28, widen_factor: int = 10, *, in_channels: int = 3, cifar: bool = False):
        super().__init__()
        if not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
            raise ValueError(f"depth must be an integer 6n + 4 >= 10, got {depth!r}")
        if not isinstance(widen_factor, int) or widen_factor < 1:
            raise ValueError(f"widen_factor must be an integer >= 1, got {widen_factor!r}")
        n = (depth - 4) // 6
        w = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, w[0], 3, padding=1, bias=False)
        self.block1 = _WideGroup(n, w[0], w[1], 1 if cifar else 2)
        self.block2 = _WideGroup(n, w[1], w[2], 2)
        self.block3 = _WideGroup(n, w[2], w[3], 2)
        self.bn1 = nn.BatchNorm2d(w[3])
        self.relu = nn.ReLU()
        self.feature_dim = w[3]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        h = self.block3(self.block2(self.block1(self.conv1(x))))
        h = self.relu(self.bn1(h))
        return F.adaptive_avg_pool2d(h, 1).flatten(1)


def wrn28_10(*, in_channels: int = 3, cifar: bool = False) -> WideResNet:
    """WRN-28-10 (640 features): the backbone of Hu et al. 2020's miniImageNet and CIFAR-FS results."""
    return WideResNet(28, 10, in_channels=in_channels, cifar=cifar)


def load_official_wrn(path: str | os.PathLike, *, cifar: bool = False, depth: int = 28,
                      widen_factor: int = 10) -> WideResNet:
    """A WRN from a checkpoint of the authors' layout: either a backbone state dict as their
    pretraining writes it (``netFeatBest*.pth``) or a meta-training checkpoint holding it under
    ``"netFeat"`` (``netSIBBest*.pth``); a ``module.`` prefix (DataParallel) is stripped. Read with
    ``torch.load(weights_only=True)`` (:func:`l2l_zoo.runs.load_torch`). Raises
    :class:`l2l_zoo.runs.CheckpointError` (one line) when the file is missing, unreadable or not such
    a state dict."""
    sd = runs.load_torch(path, what="WRN checkpoint")
    if isinstance(sd, dict) and isinstance(sd.get("netFeat"), dict):
        sd = sd["netFeat"]
    if not isinstance(sd, dict) or not sd or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                    for k, v in sd.items()):
        raise runs.CheckpointError(f"WRN checkpoint {os.fspath(path)!r} is not a state dict of tensors (nor a "
                                   "dict holding one under 'netFeat')")
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    model = WideResNet(depth, widen_factor, cifar=cifar)
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        detail = " ".join(s.strip() for s in first[1:3]) if len(first) > 1 else first[0]
        raise runs.CheckpointError(f"WRN checkpoint {os.fspath(path)!r} does not fit WRN-{depth}-{widen_factor}"
                                   f"{' (cifar strides)' if cifar else ''}: {detail[:300]}") from None
    return model


# ============================================================================ pretraining

class CosineClassifier(nn.Module):
    """logits = scale · cos(h, w_c) over ``num_classes`` classes, weights (feature_dim, num_classes)
    ~ N(0, 2/feature_dim), learnable scale (init ``scale``), no bias: the classification head of the
    authors' backbone pretraining (Gidaris & Komodakis 2018's cosine classifier)."""

    def __init__(self, feature_dim: int, num_classes: int, scale: float = 10.0, *,
                 generator: torch.Generator | None = None):
        super().__init__()
        w = torch.randn(feature_dim, num_classes, generator=generator) * math.sqrt(2.0 / feature_dim)
        self.weight = nn.Parameter(w)
        self.scale = nn.Parameter(torch.tensor([float(scale)]))

    def forward(self, h):
        return self.scale * (F.normalize(h, dim=1) @ F.normalize(self.weight, dim=0))


def _check_int(name, v, lo):
    if not isinstance(v, int) or isinstance(v, bool) or v < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")


def pretrain(backbone: nn.Module, split: FewShotSplit, *, steps: int, batch_size: int = 64, lr: float = 0.1,
             momentum: float = 0.9, weight_decay: float = 5e-4, warmup_steps: int = 0,
             milestones: Sequence[int] = (), gamma: float = 0.1, scale: float = 10.0, seed: int = 0,
             transform: Callable | None = None, device=None, evaluate: Callable[[], dict] | None = None,
             eval_every: int = 0, checkpoint: str | os.PathLike | None = None, checkpoint_every: int = 0,
             resume: bool = False, keep_final: bool = False, identity=None, progress: bool = False,
             log: Callable[[str], None] | None = None) -> dict:
    """Train ``backbone`` (in place) with a :class:`CosineClassifier` over the classes of ``split``
    for ``steps`` SGD steps (module docstring); returns the :func:`l2l_zoo.runs.train` record.

    The learning rate is lr·min(1, (t+1)/warmup_steps)·gamma^(number of milestones ≤ t) at step t
    (0-based). ``transform(x, gen) -> x`` augments a float batch with randomness from ``gen`` (its
    state is checkpointed). ``evaluate`` (e.g. :func:`ncm_validation`) is called every
    ``eval_every`` steps; ``checkpoint``/``resume``/``keep_final`` as in :func:`l2l_zoo.runs.train`,
    whose checkpoint identity is this call's configuration plus ``identity``. The classifier head
    is discarded; the backbone is left in train mode.
    """
    _check_int("steps", steps, 0)
    _check_int("batch_size", batch_size, 1)
    _check_int("warmup_steps", warmup_steps, 0)
    _check_int("seed", seed, 0)
    for k, v in (("lr", lr), ("gamma", gamma), ("scale", scale)):
        if isinstance(v, bool) or not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise ValueError(f"{k} must be a finite number > 0, got {v!r}")
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 <= momentum < 1:
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or not (
            math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
    if any(isinstance(m, bool) or not isinstance(m, int) or m < 0 for m in milestones):
        raise ValueError(f"milestones must be step indices (integers >= 0), got {list(milestones)!r}")
    milestones = sorted(milestones)
    n = int(split.labels.numel())
    if batch_size > n:
        raise ValueError(f"batch_size={batch_size} exceeds the {n} images of the {split.name!r} split")
    device = torch.device(device) if device is not None else next(backbone.parameters()).device
    backbone.to(device)
    feature_dim = getattr(backbone, "feature_dim", None)
    if feature_dim is None:
        raise ValueError(f"backbone must have a feature_dim attribute, got {type(backbone).__name__}")
    head = CosineClassifier(feature_dim, split.num_classes, scale, generator=torch.Generator().manual_seed(seed))
    model = nn.Sequential(backbone, head).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=True)

    def factor(t: int) -> float:
        warm = min(1.0, (t + 1) / warmup_steps) if warmup_steps else 1.0
        return warm * gamma ** sum(1 for m in milestones if m <= t)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    stepper = runs.OptimizerStepper(model, opt, lambda m, b: F.cross_entropy(m(b[0]), b[1]), scheduler=sched)
    per_epoch = n // batch_size
    aug = torch.Generator().manual_seed(seed)
    perm = {}

    def next_batch(_aux):
        epoch, i = divmod(stepper.t, per_epoch)
        if epoch not in perm:
            perm.clear()
            perm[epoch] = torch.randperm(n, generator=episode_generator(seed, epoch))
        idx = perm[epoch][i * batch_size:(i + 1) * batch_size]
        x = split.to_float(split.images[idx])
        if transform is not None:
            x = transform(x, aug)
        return x.to(device), split.labels[idx].to(device)

    where = {k: v for k, v in split.summary().items() if k != "note"}  # the note names a folder: may move
    ident = {"what": "fewshot.backbones.pretrain", "backbone": type(backbone).__name__, "feature_dim": feature_dim,
             "split": where, "steps": steps, "batch_size": batch_size, "lr": lr, "momentum": momentum,
             "weight_decay": weight_decay, "warmup_steps": warmup_steps, "milestones": milestones, "gamma": gamma,
             "scale": scale, "seed": seed, "transform": transform is not None, "extra": identity}
    return runs.train(stepper, next_batch, steps=steps, evaluate=evaluate, eval_every=eval_every,
                      checkpoint=checkpoint, checkpoint_every=checkpoint_every, identity=ident,
                      generators={"augment": aug}, resume=resume, keep_final=keep_final, progress=progress,
                      desc="pretrain", log=log)


# ============================================================================ feature caching

class FeatureSplit:
    """Backbone features of every image of a split: ``features`` float32 (M, D) in the split's image
    order, ``labels`` (M,), ``class_names``; the per-class index lists are the source split's, so
    episode sampling draws the same images. It has the interface :class:`~fewshot.data.EpisodeSampler`
    reads (``images`` is an alias of ``features`` and ``to_float`` the identity, since features are
    already floats), so ``EpisodeSampler(feature_split, ...)`` gives feature episodes
    (``support_x`` (N·K, D), ``query_x`` (N·Q, D))."""

    def __init__(self, name: str, features: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str],
                 class_indices: Sequence[torch.Tensor], *, note: str = ""):
        if features.dim() != 2 or not features.is_floating_point():
            raise ValueError(f"features must be a float tensor (M, D), got {features.dtype} {tuple(features.shape)}")
        if labels.shape != (features.shape[0],):
            raise ValueError(f"labels must have shape ({features.shape[0]},), got {tuple(labels.shape)}")
        if len(class_indices) != len(class_names):
            raise ValueError(f"class_indices must have one entry per class ({len(class_names)}), got "
                             f"{len(class_indices)}")
        self.name, self.features, self.labels, self.note = name, features, labels, note
        self.class_names = list(class_names)
        self._by_class = [torch.as_tensor(ix, dtype=torch.long) for ix in class_indices]

    @property
    def images(self) -> torch.Tensor:  # what EpisodeSampler indexes
        return self.features

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def feature_dim(self) -> int:
        return int(self.features.shape[1])

    @property
    def image_shape(self) -> tuple:
        return (self.feature_dim,)

    def class_indices(self, c: int) -> torch.Tensor:
        return self._by_class[c]

    def counts(self) -> list[int]:
        return [len(ix) for ix in self._by_class]

    def to_float(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def summary(self) -> dict:
        c = self.counts()
        return {"split": self.name, "classes": self.num_classes, "images": int(self.features.shape[0]),
                "feature_dim": self.feature_dim, "min_per_class": min(c) if c else 0, "note": self.note}


def _embed(backbone: nn.Module, chunks: Iterable[torch.Tensor]) -> torch.Tensor:
    """Features of the concatenated float ``chunks`` by ``backbone`` in eval mode (its mode is
    restored), computed on its device, returned on the CPU."""
    device = next(backbone.parameters()).device
    was = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            return torch.cat([backbone(x.to(device)).float().cpu() for x in chunks])
    finally:
        backbone.train(was)


def cache_features(backbone: nn.Module, split: FewShotSplit, *, batch_size: int = 128) -> FeatureSplit:
    """The features of every image of ``split`` (normalised by ``split.to_float``, ``batch_size`` images
    at a time: the float copy of a whole split may not fit in memory), computed once by the frozen
    ``backbone`` in eval mode on its own device, stored on the CPU."""
    _check_int("batch_size", batch_size, 1)
    m = split.images.shape[0]
    feats = _embed(backbone, (split.to_float(split.images[i:i + batch_size]) for i in range(0, m, batch_size)))
    return FeatureSplit(split.name, feats, split.labels.clone(), split.class_names,
                        [split.class_indices(c) for c in range(split.num_classes)],
                        note=f"{split.note}; {type(backbone).__name__} features ({feats.shape[1]}-d)")


def embed_episode(backbone: nn.Module, episode: Episode, *, batch_size: int = 128) -> Episode:
    """A pixel episode as a feature episode: support and query images through the frozen ``backbone``
    (eval mode), on the CPU. Equal (up to float rounding of batched convolutions) to the episode of
    the same ``(seed, index)`` drawn from :func:`cache_features`' split."""
    return Episode(_embed(backbone, episode.support_x.split(batch_size)), episode.support_y.cpu(),
                   _embed(backbone, episode.query_x.split(batch_size)), episode.query_y.cpu(), episode.classes)


def ncm_validation(backbone: nn.Module, episodes: Sequence[Episode], *, prefix: str = "val") -> Callable[[], dict]:
    """An ``evaluate`` callable for :func:`pretrain` / :func:`l2l_zoo.runs.train`: nearest-class-mean
    accuracy (:func:`fewshot.sib.evaluate_ncm`) of the current backbone on fixed pixel ``episodes``,
    as ``{f"{prefix}_acc": mean, f"{prefix}_acc_ci": 95 % half-width}``."""
    episodes = list(episodes)

    def evaluate() -> dict:
        m, ci = mean_ci(evaluate_ncm([embed_episode(backbone, e) for e in episodes]))
        return {f"{prefix}_acc": m, f"{prefix}_acc_ci": ci}
    return evaluate
