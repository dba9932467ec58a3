"""N-way K-shot episodes from class-disjoint splits.

* :class:`FewShotSplit`: the images of one split (train, validation or test classes), kept as
  ``uint8`` in memory (a float copy of miniImageNet's training split would take 3.3 GB), with
  their labels 0..C−1 within the split and the class names.
* :class:`EpisodeSampler`: N-way K-shot episodes with Q queries per class. Episode ``i`` of seed ``s``
  is drawn from its own CPU generator seeded from ``(s, i)``, so the same ``(seed, index)`` gives the
  same episode on any machine, in any order, and a resumed run continues with exactly the episodes
  it would have seen. Labels are remapped to 0..N−1 in the order the classes were drawn.
* :func:`mean_ci`: mean and 95 % confidence half-width 1.96·std/√n over episodes (the convention of
  Ravi & Larochelle 2017 and Hu et al. 2020).
* :class:`TaskDatasetSource`: any object with learn2learn's ``TaskDataset.sample() -> (x, y)``
  interface (duck typing; learn2learn is not a dependency), cut into support and query sets.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from l2l_zoo.tasks.data import DataNotFoundError

__all__ = ["Episode", "FewShotSplit", "EpisodeSampler", "TaskDatasetSource", "mean_ci", "FewShotDataError",
           "episode_generator"]


class FewShotDataError(DataNotFoundError):
    """A few-shot dataset is missing or malformed: the message names the file, the expected layout
    and where it looked (scripts report it as one line, exit status 3)."""


@dataclass(frozen=True)
class Episode:
    """One N-way K-shot task. ``support_x``: (N·K, C, H, W) float32, ``support_y``: (N·K,) int64 in
    0..N−1 (class-major: K examples of class 0, then class 1, ...); ``query_x``/``query_y`` likewise
    with Q per class; ``classes``: the split's class indices in label order."""

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor
    classes: tuple

    @property
    def ways(self) -> int:
        return len(self.classes)

    def to(self, device) -> "Episode":
        return Episode(self.support_x.to(device), self.support_y.to(device), self.query_x.to(device),
                       self.query_y.to(device), self.classes)


class FewShotSplit:
    """The images of one split. ``images``: uint8 (M, C, H, W); ``labels``: int64 (M,) in
    0..C−1; ``class_names``: C names; ``mean``/``std``: per-channel statistics of the float pixels
    in [0, 1] used to normalise (a split's episodes are normalised with the *training* split's, so
    pass those); ``note``: provenance (printed by scripts)."""

    def __init__(self, name: str, images: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str], *,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None, note: str = ""):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be a uint8 tensor (M, C, H, W), got {images.dtype} {tuple(images.shape)}")
        labels = torch.as_tensor(labels, dtype=torch.long)
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
        C = len(class_names)
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= C):
            raise ValueError(f"labels must lie in 0..{C - 1} (one per class name), got {int(labels.min())}.."
                             f"{int(labels.max())}")
        self.name, self.images, self.labels, self.class_names, self.note = name, images, labels, list(class_names), note
        ch = images.shape[1]
        self.mean = torch.tensor(mean if mean is not None else [0.0] * ch, dtype=torch.float32).view(1, ch, 1, 1)
        self.std = torch.tensor(std if std is not None else [1.0] * ch, dtype=torch.float32).view(1, ch, 1, 1)
        order = torch.argsort(labels, stable=True)
        counts = torch.bincount(labels, minlength=C)
        self._by_class = list(order.split(counts.tolist()))

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple:
        return tuple(self.images.shape[1:])

    def class_indices(self, c: int) -> torch.Tensor:
        """Indices into ``images`` of class ``c`` (in file order)."""
        return self._by_class[c]

    def counts(self) -> list[int]:
        return [len(ix) for ix in self._by_class]

    def to_float(self, uint8: torch.Tensor) -> torch.Tensor:
        """uint8 images → normalised float32."""
        return (uint8.float().div_(255.0) - self.mean) / self.std

    def with_rotations(self) -> "FewShotSplit":
        """Every class rotated by 0/90/180/270 degrees as four classes (Omniglot's training
        augmentation, Santoro et al. 2016 / Vinyals et al. 2016): class ``c`` rotated ``k`` quarter
        turns becomes class ``4c + k``."""
        imgs, labs = [], []
        for k in range(4):
            imgs.append(torch.rot90(self.images, k, dims=(2, 3)))
            labs.append(self.labels * 4 + k)
        names = [f"{n}@rot{90 * k}" for n in self.class_names for k in range(4)]
        return FewShotSplit(self.name, torch.cat(imgs), torch.cat(labs), names, mean=self.mean.flatten().tolist(),
                            std=self.std.flatten().tolist(), note=f"{self.note}; rotations x4")

    def summary(self) -> dict:
        c = self.counts()
        return {"split": self.name, "classes": self.num_classes, "images": int(self.images.shape[0]),
                "image_shape": list(self.image_shape), "min_per_class": min(c) if c else 0, "note": self.note}


def episode_generator(seed: int, index: int) -> torch.Generator:
    """The CPU generator of episode ``index`` of ``seed`` (independent of every other episode)."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got {seed}, {index}")
    return torch.Generator().manual_seed((seed * 1_000_003 + index * 7_919 + 1) % (2 ** 63 - 1))


def _check_counts(ways, shots, queries) -> None:
    for k, v in (("ways", ways), ("shots", shots), ("queries", queries)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{k} must be an integer >= 1, got {v!r}")


class EpisodeSampler:
    """N-way (``ways``) K-shot (``shots``) episodes with ``queries`` queries per class from ``split``.

    ``transform(x, gen) -> x`` optionally augments the float support and query images (e.g. random
    crops; it must draw its randomness from ``gen`` so episodes stay reproducible). Raises
    ``ValueError`` when the split cannot provide such episodes (too few classes, or a class with
    fewer than shots + queries images), naming what is short.
    """

    def __init__(self, split: FewShotSplit, ways: int, shots: int, queries: int, *,
                 transform: Callable | None = None):
        _check_counts(ways, shots, queries)
        if ways > split.num_classes:
            raise ValueError(f"ways={ways} exceeds the {split.num_classes} classes of the {split.name!r} split")
        short = [(split.class_names[c], n) for c, n in enumerate(split.counts()) if n < shots + queries]
        if short:
            raise ValueError(f"{len(short)} classes of the {split.name!r} split have fewer than shots + queries = "
                             f"{shots + queries} images (e.g. {short[0][0]!r}: {short[0][1]})")
        self.split, self.ways, self.shots, self.queries, self.transform = split, ways, shots, queries, transform

    def episode(self, seed: int, index: int) -> Episode:
        """Episode ``index`` of ``seed`` (see the module docstring)."""
        g = episode_generator(seed, index)
        return self._draw(g)

    def sample(self, gen: torch.Generator) -> Episode:
        """An episode drawn from ``gen`` (for callers that keep their own generator)."""
        return self._draw(gen)

    def _draw(self, g: torch.Generator) -> Episode:
        sp = self.split
        classes = torch.randperm(sp.num_classes, generator=g)[: self.ways].tolist()
        s_idx, q_idx = [], []
        for c in classes:
            ix = sp.class_indices(c)
            pick = ix[torch.randperm(len(ix), generator=g)[: self.shots + self.queries]]
            s_idx.append(pick[: self.shots])
            q_idx.append(pick[self.shots:])
        s_idx, q_idx = torch.cat(s_idx), torch.cat(q_idx)
        sx, qx = sp.to_float(sp.images[s_idx]), sp.to_float(sp.images[q_idx])
        if self.transform is not None:
            sx, qx = self.transform(sx, g), self.transform(qx, g)
        sy = torch.arange(self.ways).repeat_interleave(self.shots)
        qy = torch.arange(self.ways).repeat_interleave(self.queries)
        return Episode(sx, sy, qx, qy, tuple(classes))

    def episodes(self, n: int, seed: int) -> list[Episode]:
        """The fixed list of episodes 0..n−1 of ``seed`` (validation and test sets of episodes)."""
        return [self.episode(seed, i) for i in range(n)]


class TaskDatasetSource:
    """Episodes from an object with learn2learn's ``TaskDataset.sample() -> (x, y)`` interface: one
    sampled task holds ``ways·(shots+queries)`` examples with arbitrary labels; they are split per
    class into ``shots`` support and ``queries`` query examples and relabelled 0..N−1 (in order of
    first appearance). learn2learn draws with its own global RNG, so such episodes are only as
    reproducible as the caller's seeding of it."""

    def __init__(self, task_dataset, ways: int, shots: int, queries: int):
        if not callable(getattr(task_dataset, "sample", None)):
            raise TypeError(f"expected an object with sample() -> (x, y), got {type(task_dataset).__name__}")
        _check_counts(ways, shots, queries)
        self.source, self.ways, self.shots, self.queries = task_dataset, ways, shots, queries

    def sample(self, gen: torch.Generator | None = None) -> Episode:
        x, y = self.source.sample()
        x, y = torch.as_tensor(x), torch.as_tensor(y).long().reshape(-1)
        classes = list(dict.fromkeys(y.tolist()))
        if len(classes) != self.ways:
            raise ValueError(f"the task dataset gave {len(classes)} classes, expected ways={self.ways}")
        sx, sy, qx, qy = [], [], [], []
        for new, c in enumerate(classes):
            ix = (y == c).nonzero().flatten()
            if len(ix) < self.shots + self.queries:
                raise ValueError(f"class {c} has {len(ix)} examples, expected shots + queries = "
                                 f"{self.shots + self.queries}")
            sx.append(x[ix[: self.shots]])
            qx.append(x[ix[self.shots:self.shots + self.queries]])
            sy += [new] * self.shots
            qy += [new] * self.queries
        return Episode(torch.cat(sx).float(), torch.tensor(sy), torch.cat(qx).float(), torch.tensor(qy),
                       tuple(classes))

    def episode(self, seed: int, index: int) -> Episode:
        return self.sample()


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """(mean, 1.96·std/√n) of per-episode accuracies (population std, as Ravi & Larochelle's and
    Hu et al.'s evaluation code)."""
    v = [float(x) for x in values]
    if not v:
        raise ValueError("mean_ci needs at least one value")
    m = sum(v) / len(v)
    sd = math.sqrt(sum((x - m) ** 2 for x in v) / len(v))
    return m, 1.96 * sd / math.sqrt(len(v))
