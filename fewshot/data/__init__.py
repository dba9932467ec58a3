"""Episodic few-shot data: episodes and samplers (:mod:`.episodes`), dataset readers and
:func:`load_fewshot` over the names of :data:`DATASETS` (:mod:`.registry`)."""
from .cifarfs import load_cifarfs
from .episodes import (Episode, EpisodeSampler, FewShotDataError, FewShotSplit, TaskDatasetSource,
                       episode_generator, mean_ci)
from .miniimagenet import load_miniimagenet
from .omniglot import SMALL_SPLIT, load_omniglot, load_omniglot_small
from .registry import DATASETS, load_fewshot
from .tieredimagenet import load_tieredimagenet

__all__ = ["Episode", "EpisodeSampler", "FewShotSplit", "FewShotDataError", "TaskDatasetSource", "mean_ci",
           "episode_generator", "SMALL_SPLIT", "load_omniglot_small", "load_omniglot", "load_miniimagenet",
           "load_tieredimagenet", "load_cifarfs", "load_fewshot", "DATASETS"]
