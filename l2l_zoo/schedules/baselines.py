"""Hand-designed learning-rate schedules used as baselines (§6 of the MARTHE paper), built from
``torch.optim.lr_scheduler`` and stepped once per training step.

The paper's settings are given per epoch for 200 epochs; :func:`make_baseline` rescales them to a
horizon of ``total_steps`` optimizer steps so that the *shape* of each schedule is the paper's:

* ``fixed``: ``η_t = η_0``.
* ``multistep`` (staircase): ×``gamma`` = 0.1 ("decay by 90%") at 30%, 60% and 90% of training
  (every 60 of 200 epochs).
* ``exponential``: ``η_t = η_0·γ^t`` with ``γ = 0.99^{200/total_steps}`` (0.99 per epoch).
* ``sgdr`` (Loshchilov & Hutter 2017): cosine annealing with warm restarts, ``T_0`` = 5% of the
  horizon (10 of 200 epochs), ``T_mult = 2``, ``eta_min = 0``.
"""
from __future__ import annotations

import torch
from torch.optim import lr_scheduler

__all__ = ["BASELINES", "make_baseline", "baseline_lrs"]

BASELINES = ("fixed", "multistep", "exponential", "sgdr")


def _positive_int(name, v):
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {v!r}")


def make_baseline(name: str, optimizer: torch.optim.Optimizer, *, total_steps: int,
                  gamma: float | None = None, milestones: list[int] | None = None,
                  t_0: int | None = None, t_mult: int = 2, eta_min: float = 0.0) -> lr_scheduler.LRScheduler:
    """A ``torch.optim.lr_scheduler`` for baseline ``name`` over ``total_steps`` steps.

    ``gamma``: decay factor (multistep: per milestone, default 0.1; exponential: per step, default
    ``0.99^{200/total_steps}``); ``milestones``: multistep steps (default 30/60/90% of the horizon);
    ``t_0``/``t_mult``/``eta_min``: SGDR first period (default 5% of the horizon), period multiplier
    and floor."""
    if name not in BASELINES:
        raise KeyError(f"unknown baseline {name!r}; choose from {list(BASELINES)}")
    _positive_int("total_steps", total_steps)
    if gamma is not None and not (isinstance(gamma, (int, float)) and 0 < gamma <= 1):
        raise ValueError(f"gamma must be in (0, 1], got {gamma!r}")
    if name == "fixed":
        return lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    if name == "multistep":
        if milestones is None:
            milestones = sorted({max(1, round(f * total_steps)) for f in (0.3, 0.6, 0.9)})
        if not milestones or any(not isinstance(m, int) or m < 1 for m in milestones):
            raise ValueError(f"milestones must be a non-empty list of integers >= 1, got {milestones!r}")
        return lr_scheduler.MultiStepLR(optimizer, milestones=list(milestones),
                                        gamma=0.1 if gamma is None else gamma)
    if name == "exponential":
        return lr_scheduler.ExponentialLR(optimizer, gamma=0.99 ** (200 / total_steps) if gamma is None else gamma)
    t_0 = max(1, round(0.05 * total_steps)) if t_0 is None else t_0
    _positive_int("t_0", t_0)
    _positive_int("t_mult", t_mult)
    if not eta_min >= 0:
        raise ValueError(f"eta_min must be >= 0, got {eta_min!r}")
    return lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=t_0, T_mult=t_mult, eta_min=eta_min)


def baseline_lrs(name: str, lr: float, total_steps: int, **kwargs) -> list[float]:
    """The rates ``[η_0, …, η_{T−1}]`` that :func:`make_baseline` produces (for plots and tests)."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=lr)
    sched = make_baseline(name, opt, total_steps=total_steps, **kwargs)
    out = []
    for _ in range(total_steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out

