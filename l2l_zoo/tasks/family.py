"""Task families: a distribution over optimizee problems that meta-training samples from, one fresh
task per run (as google/learned_optimization separates ``TaskFamily.sample`` from the task's inner
and outer data).

A :class:`~l2l_zoo.tasks.Task` supplies the two data streams a meta-trainer needs:

* ``inner_batch(gen)``: the minibatch of an inner (optimizee) step: the training split, or a few-shot
  episode's support set;
* ``outer_batch(gen)``: the minibatch the outer objective is measured on when the meta-loss is
  ``"outer"``: the validation split, or an episode's query set;

plus ``reset()`` (called at the start of every run, e.g. to reset BatchNorm statistics) and
``outer_train_mode`` (whether the outer batch is evaluated in train mode, i.e. with its own batch
statistics: transductive, or in eval mode with the statistics the inner loop accumulated).

A family is anything with ``sample(gen) -> Task`` and a ``template`` task that fixes the
architecture (all sampled tasks share it: the unroll backends evaluate the template module with each
task's parameters) plus a ``name``. :class:`SingleTask` is the family of one fixed task, what
meta-training on a single problem has always done.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from .task import Task

__all__ = ["TaskFamily", "SingleTask", "as_family"]


@runtime_checkable
class TaskFamily(Protocol):
    name: str
    template: Task

    def sample(self, gen: torch.Generator) -> Task:
        """A task drawn with the CPU generator ``gen`` (the same generator state gives the same task)."""


class SingleTask:
    """The family of one task: ``sample`` always returns it (and draws nothing from ``gen``)."""

    def __init__(self, task: Task):
        if not isinstance(task, Task):
            raise TypeError(f"task must be a Task, got {type(task).__name__}")
        self.task = self.template = task
        self.name = task.name

    def sample(self, gen: torch.Generator) -> Task:
        return self.task


def as_family(task_or_family) -> TaskFamily:
    """A :class:`TaskFamily` for a Task (wrapped in :class:`SingleTask`) or a family (as it is)."""
    if isinstance(task_or_family, Task):
        return SingleTask(task_or_family)
    if isinstance(task_or_family, TaskFamily) and isinstance(task_or_family.template, Task):
        return task_or_family
    raise TypeError(f"expected a Task or a TaskFamily (sample(gen) -> Task, template, name), got "
                    f"{type(task_or_family).__name__}")
