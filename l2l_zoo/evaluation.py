"""Train an optimizee with any ``torch.optim.Optimizer`` (a learned one through the adapter, or a
hand-designed one) and record learning curves. Used by every benchmark, so that learned and
hand-designed optimizers see the same initialisation, the same minibatch order and the same metrics.
"""
from __future__ import annotations

import math
import time
from typing import Callable

import torch
from tqdm.auto import tqdm

from .tasks.task import Task
from .torch_optim import LearnedOptimizerAdapter

__all__ = ["train_optimizee", "eval_schedule"]


def eval_schedule(steps: int, every: int) -> list[int]:
    """Steps at which full-split metrics are computed: 0, every, 2·every, ..., and ``steps``."""
    pts = list(range(0, steps + 1, max(1, every)))
    if pts[-1] != steps:
        pts.append(steps)
    return pts


def train_optimizee(task: Task, make_optimizer: Callable, *, steps: int, seed: int, eval_every: int,
                    progress: bool = True, desc: str = "", divergence_loss: float = 1e4,
                    eval_splits: tuple[str, ...] = ("train", "test")) -> dict:
    """Train a freshly initialised model (seed ``seed``) for ``steps`` minibatch steps.

    ``make_optimizer(params) -> torch.optim.Optimizer``. Returns a dict with the per-step minibatch
    loss (``batch_loss``), full-split loss/accuracy at ``eval_steps``, wall time, and
    ``diverged_at`` (the step at which the loss became non-finite or exceeded ``divergence_loss``,
    after which training stops; None if it never did).
    """
    model = task.build_model(seed=seed)
    model.train()
    opt = make_optimizer(model.parameters())
    # Learned optimizers that read the loss (MLR-SNet) get it through the adapter's step(loss=...).
    pass_loss = isinstance(opt, LearnedOptimizerAdapter) and opt.lopt.needs_loss
    gen = torch.Generator().manual_seed(10_000 + seed)
    eval_at = set(eval_schedule(steps, eval_every))
    out = {"seed": seed, "steps": steps, "batch_loss": [], "eval_steps": [],
           **{f"{s}_{m}": [] for s in eval_splits for m in ("loss", "acc")}, "diverged_at": None}

    def record(step):
        out["eval_steps"].append(step)
        for s in eval_splits:
            loss, acc = task.evaluate(model, s)
            out[f"{s}_loss"].append(loss)
            out[f"{s}_acc"].append(acc)

    t0 = time.perf_counter()
    record(0)
    bar = tqdm(range(1, steps + 1), desc=desc, disable=not progress, dynamic_ncols=True, leave=False)
    for step in bar:
        x, y = task.sample_batch(gen)
        opt.zero_grad(set_to_none=True)
        loss = task.loss(model(x), y)
        value = float(loss.detach())
        if not math.isfinite(value) or value > divergence_loss:
            out["batch_loss"].append(value if math.isfinite(value) else None)
            out["diverged_at"] = step
            break
        loss.backward()
        opt.step(loss=loss.detach()) if pass_loss else opt.step()
        out["batch_loss"].append(value)
        if step in eval_at:
            record(step)
            if not all(math.isfinite(out[f"{s}_loss"][-1]) for s in eval_splits):
                out["diverged_at"] = step
                break
        if step % 50 == 0:
            bar.set_postfix(loss=f"{value:.4g}")
    bar.close()
    out["wall_s"] = time.perf_counter() - t0
    # JSON cannot hold NaN/inf: store them as None.
    for k, v in out.items():
        if isinstance(v, list):
            out[k] = [None if isinstance(a, float) and not math.isfinite(a) else a for a in v]
    return out
