"""Hand-designed learning-rate schedules used as baselines, built from ``torch.optim.lr_scheduler``
and stepped once per training step; the one factory for them is :func:`make_baseline`.

Both source papers give their settings per epoch for 200 epochs; :func:`make_baseline` rescales
them to a horizon of ``total_steps`` optimizer steps so that the *shape* of each schedule is the
paper's. Two presets (``preset=``) hold the papers' numbers:

* ``fixed``: ``η_t = η_0`` (both).
* ``multistep`` (staircase): ×0.1 at 30%, 60% and 90% of training (both: "decay by 90%" every 60
  of 200 epochs in the MARTHE paper §6; epochs 60/120/180, γ_M = 0.1 in the MLR-SNet paper §4.1.1).
* ``exponential``: ×0.99 (``"marthe"``) or ×0.95 (``"mlrsnet"``) per 1/200 of training (per epoch).
* ``sgdr`` (Loshchilov & Hutter 2017): cosine annealing with warm restarts, first period 5% of
  training (10 of 200 epochs), ``T_mult = 2``; floor ``eta_min = 0`` (``"marthe"``) or
  α_min = 1e-5 (``"mlrsnet"``).

The exponential factor per step is ``base^{200/total_steps}``; η_0 is the optimizer's ``lr``.
"""
from __future__ import annotations

import torch
from torch.optim import lr_scheduler

__all__ = ["BASELINES", "PRESETS", "make_baseline", "baseline_lrs"]

BASELINES = ("fixed", "multistep", "exponential", "sgdr")

# Per preset: multistep factor and milestones (fractions of training), exponential factor per
# 1/200 of training, SGDR first period (fraction of training), period multiplier and floor.
PRESETS = {
    "marthe": {"step_gamma": 0.1, "milestones": (0.3, 0.6, 0.9), "exp_per_200th": 0.99,
               "t_0": 0.05, "t_mult": 2, "eta_min": 0.0},
    "mlrsnet": {"step_gamma": 0.1, "milestones": (0.3, 0.6, 0.9), "exp_per_200th": 0.95,
                "t_0": 0.05, "t_mult": 2, "eta_min": 1e-5},
}


def _positive_int(name, v):
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {v!r}")


def make_baseline(name: str, optimizer: torch.optim.Optimizer, *, total_steps: int,
                  preset: str = "marthe", gamma: float | None = None, milestones: list[int] | None = None,
                  t_0: int | None = None, t_mult: int | None = None,
                  eta_min: float | None = None) -> lr_scheduler.LRScheduler:
    """A ``torch.optim.lr_scheduler`` for baseline ``name`` over ``total_steps`` steps, with the
    settings of ``preset`` (module docstring) unless given explicitly. ``fixed`` is a constant
    ``LambdaLR`` (so every baseline is a scheduler to step and save).

    ``gamma``: decay factor (multistep: per milestone; exponential: per step); ``milestones``:
    multistep steps; ``t_0``/``t_mult``/``eta_min``: SGDR first period (steps), period multiplier
    and floor."""
    if name not in BASELINES:
        raise KeyError(f"unknown baseline {name!r}; choose from {list(BASELINES)}")
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    _positive_int("total_steps", total_steps)
    if gamma is not None and not (isinstance(gamma, (int, float)) and 0 < gamma <= 1):
        raise ValueError(f"gamma must be in (0, 1], got {gamma!r}")
    ps = PRESETS[preset]
    if name == "fixed":
        return lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    if name == "multistep":
        if milestones is None:
            milestones = sorted({max(1, round(f * total_steps)) for f in ps["milestones"]})
        if not milestones or any(not isinstance(m, int) or m < 1 for m in milestones):
            raise ValueError(f"milestones must be a non-empty list of integers >= 1, got {milestones!r}")
        return lr_scheduler.MultiStepLR(optimizer, milestones=list(milestones),
                                        gamma=ps["step_gamma"] if gamma is None else gamma)
    if name == "exponential":
        return lr_scheduler.ExponentialLR(
            optimizer, gamma=ps["exp_per_200th"] ** (200 / total_steps) if gamma is None else gamma)
    t_0 = max(1, round(ps["t_0"] * total_steps)) if t_0 is None else t_0
    t_mult = ps["t_mult"] if t_mult is None else t_mult
    eta_min = ps["eta_min"] if eta_min is None else eta_min
    _positive_int("t_0", t_0)
    _positive_int("t_mult", t_mult)
    if not (isinstance(eta_min, (int, float)) and eta_min >= 0):
        raise ValueError(f"eta_min must be >= 0, got {eta_min!r}")
    return lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=t_0, T_mult=t_mult, eta_min=eta_min)


def baseline_lrs(name: str, lr: float, total_steps: int, **kwargs) -> list[float]:
    """The rates ``[η_0, …, η_{T−1}]`` that :func:`make_baseline` produces (for plots and tests;
    ``kwargs``: its options, e.g. ``preset``)."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=lr)
    sched = make_baseline(name, opt, total_steps=total_steps, **kwargs)
    out = []
    for _ in range(total_steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out

