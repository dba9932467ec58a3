"""Learned optimizers and their registry (``l2l_zoo.create`` builds them by name)."""
from .dm import DMOptimizer
from .mlrsnet import MLRSNet
from .rnnprop import RNNProp
from .simple import SimpleOptimizer

REGISTRY = {cls.name: cls for cls in (SimpleOptimizer, DMOptimizer, RNNProp, MLRSNet)}


def register(cls):
    """Add a LearnedOptimizer subclass to the registry under ``cls.name`` (usable as a decorator)."""
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise KeyError(f"optimizer name {cls.name!r} already registered by {REGISTRY[cls.name]}")
    REGISTRY[cls.name] = cls
    return cls


__all__ = ["DMOptimizer", "RNNProp", "SimpleOptimizer", "MLRSNet", "REGISTRY", "register"]
