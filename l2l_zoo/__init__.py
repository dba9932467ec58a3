"""l2l_zoo: learned optimizers, smoothness regularization and learning-rate schedules for PyTorch.

    import l2l_zoo
    lopt = l2l_zoo.create("simple")                 # a LearnedOptimizer (nn.Module)
    opt = l2l_zoo.LearnedOptimizerAdapter(model.parameters(), lopt)   # a torch.optim.Optimizer
    l2l_zoo.save(lopt, "simple.pt"); lopt = l2l_zoo.load("simple.pt")
    lopt = l2l_zoo.zoo.load("simple-smooth/mnist-mlp")   # a pretrained one (python -m l2l_zoo.zoo list)
"""
from .base import LearnedOptimizer, MetaDefaults, OptState
from .optimizers import REGISTRY, DMOptimizer, MLRSNet, RNNProp, SimpleOptimizer, register
from .registry import LearnedOptimizerFileError, create, load, save, available
from .torch_optim import LearnedOptimizerAdapter
from . import zoo  # noqa: E402  the pretrained zoo: l2l_zoo.zoo.load("simple-smooth/mnist-mlp")

__version__ = "0.1.0"

__all__ = [
    "LearnedOptimizer", "OptState", "MetaDefaults", "REGISTRY", "register", "create", "load", "save",
    "available", "LearnedOptimizerFileError", "DMOptimizer", "RNNProp", "SimpleOptimizer", "MLRSNet", "LearnedOptimizerAdapter",
    "zoo",
]
