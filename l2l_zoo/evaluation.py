"""Train an optimizee :class:`~l2l_zoo.tasks.Task` with any ``torch.optim.Optimizer`` (a learned one
through the adapter, or a hand-designed one) and record learning curves: the task-level wrapper of
:func:`l2l_zoo.runs.train` that every benchmark uses, so that learned and hand-designed optimizers
see the same initialisation, the same minibatch order and the same metrics.
"""
from __future__ import annotations

import math
import os
from typing import Callable

import torch

from . import runs
from .tasks.task import Task

__all__ = ["train_optimizee", "eval_schedule", "task_evaluator"]

SPLITS = ("train", "val", "test")


def eval_schedule(steps: int, every: int) -> list[int]:
    """Steps at which full-split metrics are computed: 0, every, 2·every, ..., and ``steps``."""
    pts = list(range(0, steps + 1, max(1, every)))
    if pts[-1] != steps:
        pts.append(steps)
    return pts


def task_evaluator(task: Task, model: torch.nn.Module, splits=SPLITS) -> Callable[[], dict]:
    """``() -> {"<split>_loss", "<split>_acc"}``: mean loss and accuracy over whole splits."""
    for s in splits:
        if s not in SPLITS:
            raise ValueError(f"splits must be drawn from {SPLITS}, got {s!r}")

    def evaluate():
        out = {}
        for s in splits:
            out[f"{s}_loss"], out[f"{s}_acc"] = task.evaluate(model, s)
        return out
    return evaluate


def train_optimizee(task: Task, make_optimizer: Callable, *, steps: int, seed: int, eval_every: int,
                    progress: bool = True, desc: str = "", divergence_loss: float = 1e4,
                    eval_splits: tuple[str, ...] = SPLITS, grad_clip: float | None = None,
                    checkpoint: str | os.PathLike | None = None, checkpoint_every: int = 0,
                    identity=None, resume: bool = False, log=None, autocast: str | None = None,
                    probe: Callable | None = None) -> dict:
    """Train a freshly initialised model (seed ``seed``) of ``task`` for ``steps`` minibatch steps.

    ``make_optimizer(params) -> torch.optim.Optimizer``. The minibatch order is drawn from a
    generator seeded with ``10_000 + seed``. Returns a run record of the results schema
    (:func:`l2l_zoo.runs.train`): per-step minibatch ``loss`` in ``step_log``, full-split loss and
    accuracy of ``eval_splits`` every ``eval_every`` steps in ``eval``, the last of them in
    ``final``, ``diverged_at`` (the step at which the loss became non-finite or exceeded
    ``divergence_loss``, or the gradient non-finite; training stops there), ``wall_s`` and ``seed``.
    ``checkpoint``/``checkpoint_every``/``identity``/``resume`` are passed to
    :func:`l2l_zoo.runs.train` (a killed run resumes exactly). ``autocast``: "bfloat16" runs the
    model's training forward passes under ``torch.autocast`` (evaluations stay float32).
    ``probe(model, optimizer) -> {name: number}``: more metrics computed at every evaluation and
    recorded beside the splits' (e.g. how smooth a learned optimizer is at the state it has reached);
    it must leave the model and the optimizer as it found them.
    """
    if not (isinstance(eval_every, int) and eval_every >= 1):
        raise ValueError(f"eval_every must be an integer >= 1, got {eval_every!r}")
    if not divergence_loss > 0:
        raise ValueError(f"divergence_loss must be > 0, got {divergence_loss!r}")
    model = task.build_model(seed=seed)
    model.train()
    opt = make_optimizer(model.parameters())
    gen = torch.Generator().manual_seed(10_000 + seed)
    stepper = runs.OptimizerStepper(model, opt, lambda m, b: task.loss(m(b[0]), b[1]), grad_clip=grad_clip,
                                    autocast=autocast)
    evaluate = task_evaluator(task, model, eval_splits)
    if probe is not None:
        splits_only = evaluate

        def evaluate():
            return {**splits_only(), **probe(model, opt)}
    rec = runs.train(stepper, lambda aux: task.sample_batch(gen), steps=steps,
                     evaluate=evaluate, eval_every=eval_every,
                     divergence_loss=divergence_loss if math.isfinite(divergence_loss) else math.inf,
                     checkpoint=checkpoint, checkpoint_every=checkpoint_every, identity=identity,
                     generators={"data": gen}, resume=resume, progress=progress, desc=desc, log=log)
    rec["seed"] = seed
    return rec
