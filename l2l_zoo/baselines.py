"""The optimizers a learned optimizer is compared with: hand-designed ones, whose learning rate is
tuned, and learning-rate-free ones, which are run untuned at their authors' defaults.

* ``sgd``, ``sgdm`` (SGD with momentum 0.9) and ``adam``: ``torch.optim``; the benchmarks tune their
  learning rate over a grid on the validation split (:func:`l2l_zoo.runs.tune`).
* ``prodigy``: Prodigy (Mishchenko & Defazio, "Prodigy: an expeditiously adaptive parameter-free
  learner", ICML 2024), an Adam whose step size is the running estimate d of the distance to the
  solution (lr = 1.0 multiplies d; the paper's and the package's default). The authors' package
  ``prodigyopt``.
* ``sf-adamw``: schedule-free AdamW (Defazio et al., "The road less scheduled", NeurIPS 2024): no
  learning-rate schedule; gradients are taken at an interpolation y of the iterate z and its
  running average x, and the model is *evaluated at x*. The authors' package ``schedulefree``,
  at its defaults (lr 0.0025, no warm-up). :class:`l2l_zoo.runs.OptimizerStepper` switches such an
  optimizer to x for every evaluation and back to the exact training point afterwards.

Both packages are optional (``pip install -e '.[lrfree]'``). Their hyperparameters are passed
explicitly (:data:`LR_FREE_SETTINGS`; Prodigy's ``growth_rate`` stays at the package's unbounded
default) so that a package whose defaults change cannot change a result silently, and the package
version is part of a run's identity (:func:`identity`).
"""
from __future__ import annotations

from typing import Callable

import torch

HAND = ("sgd", "sgdm", "adam")
LR_FREE = ("prodigy", "sf-adamw")
NAMES = HAND + LR_FREE

# The authors' defaults, passed explicitly.
LR_FREE_SETTINGS = {
    "prodigy": {"lr": 1.0, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "d0": 1e-6,
                "d_coef": 1.0, "beta3": None, "decouple": True, "use_bias_correction": False,
                "safeguard_warmup": False},
    "sf-adamw": {"lr": 0.0025, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "warmup_steps": 0,
                 "r": 0.0, "weight_lr_power": 2.0},
}
PACKAGES = {"prodigy": "prodigyopt", "sf-adamw": "schedulefree"}


def _module(name: str):
    import importlib

    pkg = PACKAGES[name]
    try:
        return importlib.import_module(pkg)
    except ImportError:
        raise ImportError(f"the {name!r} baseline needs the {pkg!r} package: pip install -e '.[lrfree]' "
                          f"(or pip install {pkg})") from None


def check(name: str) -> None:
    """Raise ``ValueError`` for an unknown name and ``ImportError`` (with the install command) when a
    learning-rate-free baseline's package is missing; cheap, for validating flags before any work."""
    if name not in NAMES:
        raise ValueError(f"unknown baseline optimizer {name!r}; allowed: {list(NAMES)}")
    if name in LR_FREE:
        _module(name)


def _check_lr(name: str, lr: float | None) -> None:
    """A hand-designed baseline needs a learning rate; a learning-rate-free one takes none."""
    check(name)
    if name in HAND and lr is None:
        raise ValueError(f"the hand-designed baseline {name!r} needs a learning rate")
    if name in LR_FREE and lr is not None:
        raise ValueError(f"{name!r} is learning-rate-free: it runs at its authors' settings, without a lr")


def identity(name: str, lr: float | None = None) -> dict:
    """What a baseline's results depend on: for a hand-designed one its learning rate, for a
    learning-rate-free one its settings and the version of the package that implements it."""
    _check_lr(name, lr)
    if name in HAND:
        return {"hand": name, "lr": lr}
    from importlib.metadata import version

    settings = {k: list(v) if isinstance(v, tuple) else v for k, v in LR_FREE_SETTINGS[name].items()}
    return {"lr_free": name, "settings": settings, "package": f"{PACKAGES[name]}=={version(PACKAGES[name])}"}


def make(name: str, lr: float | None = None) -> Callable[..., torch.optim.Optimizer]:
    """``params -> torch.optim.Optimizer`` for baseline ``name`` (``lr`` only for the hand-designed
    ones; a learning-rate-free one takes :data:`LR_FREE_SETTINGS`)."""
    _check_lr(name, lr)
    if name in HAND:
        if name == "sgd":
            return lambda params: torch.optim.SGD(params, lr=lr)
        if name == "sgdm":
            return lambda params: torch.optim.SGD(params, lr=lr, momentum=0.9)
        return lambda params: torch.optim.Adam(params, lr=lr)
    mod, settings = _module(name), dict(LR_FREE_SETTINGS[name])
    if name == "prodigy":
        return lambda params: mod.Prodigy(params, **settings)
    return lambda params: mod.AdamWScheduleFree(params, **settings)


def has_eval_point(optimizer) -> bool:
    """Whether ``optimizer`` trains and evaluates at different points (the schedule-free protocol:
    ``optimizer.train()`` before training steps, ``optimizer.eval()`` before evaluating)."""
    return (not isinstance(optimizer, torch.nn.Module) and callable(getattr(optimizer, "train", None))
            and callable(getattr(optimizer, "eval", None)))
