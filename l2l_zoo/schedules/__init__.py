"""Learning-rate schedules: online hypergradient controllers (HD, RTHO, MARTHE), MLR-SNet's
meta-test controller (Algorithm 2 of Shu et al. 2022), the offline exact hypergradient (LRS-OPT) and
hand-designed baselines.

    from l2l_zoo.schedules import MARTHE
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    ctrl = MARTHE(opt, val_loss_fn, beta=0.0, beta_lr=1e-6)   # adaptive μ and β (Algorithm 1)
    for x, y in loader:
        ctrl.step(F.cross_entropy(model(x), y))               # replaces backward() + opt.step()

Every controller follows :class:`LRController`. HD, RTHO and MARTHE clip the training gradient's
global norm at ``grad_clip=100`` by default (the authors' public code; ``None`` disables it).

Source: Donini et al., "Scheduling the learning rate via hypergradients: new insights and a new
algorithm" (the MARTHE paper); see each module.
"""
from .baselines import BASELINES, PRESETS, baseline_lrs, make_baseline
from .controller import (DEFAULT_GRAD_CLIP, HypergradientController, HypergradientWarning, LRController,
                         ScheduleDiverged)
from .core import (BETA_RULES, AdamDynamics, SGDDynamics, beta_update, clip_by_global_norm, clip_tangent,
                   dynamics_from_optimizer, global_norm, lr_update, mu_heuristic)
from .hd import HD
from .lrs_opt import LRSOpt, flat_functional, schedule_hypergradient, unroll
from .marthe import MARTHE, RTHO
from .mlrsnet import MLRSNetController

__all__ = [
    "HD", "RTHO", "MARTHE", "MLRSNetController", "LRSOpt", "schedule_hypergradient", "unroll", "flat_functional",
    "LRController", "HypergradientController", "ScheduleDiverged", "HypergradientWarning", "DEFAULT_GRAD_CLIP",
    "SGDDynamics", "AdamDynamics", "dynamics_from_optimizer", "lr_update", "mu_heuristic",
    "global_norm", "clip_by_global_norm", "clip_tangent",
    "beta_update", "BETA_RULES", "BASELINES", "PRESETS", "make_baseline", "baseline_lrs",
]
