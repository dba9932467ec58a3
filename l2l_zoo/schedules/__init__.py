"""Learning-rate schedules: online hypergradient controllers (HD, RTHO, MARTHE), the offline exact
hypergradient (LRS-OPT) and hand-designed baselines.

    from l2l_zoo.schedules import MARTHE
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    ctrl = MARTHE(opt, val_loss_fn, beta=0.0, beta_lr=1e-6)   # adaptive μ and β (Algorithm 1)
    for x, y in loader:
        ctrl.step(F.cross_entropy(model(x), y))               # replaces backward() + opt.step()

Source: the MARTHE paper (``papers/marthe-hypergradient-lr-schedules.txt``); see each module.
"""
from .baselines import BASELINES, baseline_lrs, make_baseline
from .controller import HypergradientController, HypergradientWarning, ScheduleDiverged
from .core import (BETA_RULES, AdamDynamics, SGDDynamics, beta_update, dynamics_from_optimizer,
                   lr_update, mu_heuristic)
from .hd import HD
from .lrs_opt import LRSOpt, flat_functional, schedule_hypergradient, unroll
from .marthe import MARTHE, RTHO

__all__ = [
    "HD", "RTHO", "MARTHE", "LRSOpt", "schedule_hypergradient", "unroll", "flat_functional",
    "HypergradientController", "ScheduleDiverged", "HypergradientWarning",
    "SGDDynamics", "AdamDynamics", "dynamics_from_optimizer", "lr_update", "mu_heuristic",
    "beta_update", "BETA_RULES", "BASELINES", "make_baseline", "baseline_lrs",
]
