"""Meta-training: unroll backends, meta-loss weightings, the trainer; MLR-SNet's online
meta-trainer (Algorithm 1 of Shu et al. 2022)."""
from .losses import META_LOSSES, meta_loss, step_weights
from .mlrsnet import (MetaUpdateFailed, MLRSNetMetaTrainer, MLRSNetTrainConfig, meta_gradient,
                      select_snapshots, virtual_step_loss)
from .trainer import MetaTrainConfig, MetaTrainer, MetaTrainingDiverged, adapt
from .unroll import BACKENDS, FuncBackend, HigherBackend, make_backend

__all__ = ["META_LOSSES", "meta_loss", "step_weights", "MetaTrainConfig", "MetaTrainer",
           "MetaTrainingDiverged", "adapt", "BACKENDS", "FuncBackend", "HigherBackend", "make_backend",
           "MLRSNetTrainConfig", "MLRSNetMetaTrainer", "MetaUpdateFailed", "virtual_step_loss",
           "meta_gradient", "select_snapshots"]
