"""Meta-training: unroll backends, meta-loss weightings, the trainer."""
from .losses import META_LOSSES, meta_loss, step_weights
from .trainer import MetaTrainConfig, MetaTrainer, MetaTrainingDiverged
from .unroll import BACKENDS, FuncBackend, HigherBackend, make_backend

__all__ = ["META_LOSSES", "meta_loss", "step_weights", "MetaTrainConfig", "MetaTrainer",
           "MetaTrainingDiverged", "BACKENDS", "FuncBackend", "HigherBackend", "make_backend"]
