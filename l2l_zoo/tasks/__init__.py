"""Optimizee tasks: architectures, data, and the named benchmark problems."""
from __future__ import annotations

from functools import partial

from .family import SingleTask, TaskFamily, as_family
from .data import DataFormatError, DataNotFoundError, DataSplits, load_dataset
from .models import MLP, ConvNet, LeNet, glorot_init_
from .quadratic import QuadraticTask
from .task import Task

# name -> (dataset, model builder, description)
TASKS = {
    "mlp": ("mnist", partial(MLP, 784, (500,), 10), "MNIST MLP 784-500-10 (base MLP)"),
    "mlp20": ("mnist", partial(MLP, 784, (20,), 10, "sigmoid"),
              "MNIST MLP 784-20-10 sigmoid (Andrychowicz et al.'s and Lv et al.'s base task)"),
    "deep_mlp": ("mnist", partial(MLP, 784, (2000, 1500, 1000, 500), 10),
                 "MNIST 5-layer MLP 784-2000-1500-1000-500-10 (16.5x the base MLP)"),
    "lenet": ("mnist", partial(LeNet, 1, 10, 28), "LeNet-5 on MNIST"),
    "cifar_conv": ("cifar10", partial(ConvNet, 3, 32, 10, 32), "3-layer 32-channel CNN on CIFAR-10"),
}


def make_task(name: str, *, data_dir=None, device="cpu", batch_size: int = 128, data_seed: int = 0,
              data: DataSplits | None = None, **data_kwargs) -> Task:
    """Build a named task (see ``TASKS``); ``data`` reuses already loaded splits."""
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; choose from {sorted(TASKS)}")
    dataset, model_fn, _ = TASKS[name]
    if data is None:
        data = load_dataset(dataset, data_dir, seed=data_seed, **data_kwargs)
    return Task(name, model_fn, data, batch_size=batch_size, device=device)


__all__ = ["Task", "TaskFamily", "SingleTask", "as_family", "QuadraticTask", "TASKS", "make_task", "MLP", "LeNet", "ConvNet", "glorot_init_",
           "DataSplits", "DataNotFoundError", "DataFormatError", "load_dataset"]
