"""Build learned optimizers by name, and save/load them with their full configuration."""
from __future__ import annotations

import os

import torch

from .base import LearnedOptimizer
from .optimizers import REGISTRY

__all__ = ["create", "save", "load", "available"]

_FORMAT = "l2l_zoo.learned_optimizer"
_VERSION = 1


def available() -> list[str]:
    """Names accepted by :func:`create`."""
    return sorted(REGISTRY)


def create(name: str, **options) -> LearnedOptimizer:
    """Build a learned optimizer by registry name with keyword options.

    >>> create("simple", bias=True).num_meta_parameters()
    143
    Unknown names raise ``KeyError`` and unknown options ``TypeError``, listing what is allowed.
    """
    if name not in REGISTRY:
        raise KeyError(f"unknown optimizer {name!r}; choose from {available()}")
    cls = REGISTRY[name]
    allowed = cls.option_names()
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(f"unknown option(s) {unknown} for optimizer {name!r}; allowed: {allowed}")
    return cls(**options)


def save(lopt: LearnedOptimizer, path: str | os.PathLike, **extra) -> None:
    """Write name, configuration and meta-parameters (plus JSON-like ``extra``, e.g. the training
    config) so that :func:`load` rebuilds an identical optimizer. Written atomically."""
    payload = {"format": _FORMAT, "version": _VERSION, "name": lopt.name, "config": lopt.config,
               "state_dict": {k: v.detach().cpu() for k, v in lopt.state_dict().items()},
               "extra": extra}
    tmp = f"{os.fspath(path)}.tmp"
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load(path: str | os.PathLike, map_location="cpu", *, with_extra: bool = False):
    """Restore a learned optimizer written by :func:`save` (``with_extra`` also returns ``extra``)."""
    payload = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
        raise ValueError(f"{os.fspath(path)!r} is not an l2l_zoo learned-optimizer file")
    lopt = create(payload["name"], **payload["config"])
    lopt.load_state_dict(payload["state_dict"])
    return (lopt, payload.get("extra", {})) if with_extra else lopt
