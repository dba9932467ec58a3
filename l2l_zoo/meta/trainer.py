"""Meta-training of a learned optimizer by truncated backpropagation through unrolled optimizee
training (Andrychowicz et al. 2016 §2; Lv et al. 2017 §3; Chen et al. 2020 §3-4; smoothness paper
Algorithm 1).

One *run* trains a freshly initialised optimizee for ``horizon`` steps (paper default 200). It is cut
into truncations of ``unroll`` steps (20); after each truncation the meta-loss of that truncation is
back-propagated into the optimizer's meta-parameters and Adam takes one *meta-step*. The optimizee
parameters and the optimizer's hidden state are carried to the next truncation, detached.

Reliability: the trainer checkpoints every ``checkpoint_every`` meta-steps (atomically) and
:meth:`MetaTrainer.train` with ``resume=True`` continues a killed run bit-for-bit (all random
generators, the optimizee, hidden states and Adam's moments are in the checkpoint). A non-finite
meta-loss or meta-gradient skips that meta-step, restores the last good meta-parameters (and Adam
state), restarts the optimizee run and logs it; ``max_failures`` consecutive failures abort with
:class:`MetaTrainingDiverged`.
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
import torch.utils.checkpoint
from tqdm.auto import tqdm

from .. import runs
from ..base import LearnedOptimizer, OptState, reference_kernels
from ..regularizers.smoothness import SmoothnessConfig, SmoothnessRegularizer
from ..tasks.family import SingleTask, TaskFamily, as_family
from ..tasks.task import Task
from .distributed import SYNC_CHECK_EVERY, all_mean, check_in_sync, dist_world
from .losses import META_LOSSES, meta_loss
from .unroll import AUTOCAST_DTYPES, BACKENDS, make_backend, model_loss

__all__ = ["MetaTrainConfig", "MetaTrainer", "MetaTrainingDiverged", "adapt", "dist_world"]


#: how a meta-batch is unrolled (MetaTrainConfig.meta_batch_mode)
META_BATCH_MODES = ("auto", "vmap", "loop")


class MetaTrainingDiverged(RuntimeError):
    """Raised after ``max_failures`` consecutive non-finite meta-losses or meta-gradients."""


#: MetaTrainConfig fields that postdate the checkpoints and run caches keyed on its ``to_dict()``,
#: at their defaults
CONFIG_LATER_DEFAULTS = {**runs.LATER_DEFAULTS, "meta_batch_mode": "auto", "fast": True}


@dataclass
class MetaTrainConfig:
    """Meta-training settings. ``None`` means "the optimizer's paper default"
    (``lopt.meta_defaults``): meta-loss, meta learning rate and random scaling.

    ``meta_steps``: number of meta-updates (one per truncation). ``horizon``: optimizee steps per
    run (T_total). ``unroll``: truncation length T. ``second_order``: back-propagate through the
    optimizee gradients (off: gradients fed to the optimizer are treated as constants, as
    Andrychowicz et al. do). ``meta_grad_clip``: clamp each meta-gradient entry to ±value (None: off).
    ``meta_clip_norm``: rescale the meta-gradient to at most this global norm
    (``torch.nn.utils.clip_grad_norm_``; Ravi & Larochelle's Meta-LSTM uses 0.25; None: off).
    ``checkpoint_network``: recompute the optimizer network in the backward pass instead of storing
    its activations (``torch.utils.checkpoint``; same meta-gradient, ~1.3x the time, a fraction of
    the memory). ``"auto"`` turns it on when the hidden state holds more than 10^7 numbers (e.g. DM
    or RNNProp on the 397,510-coordinate MNIST MLP, whose 20-step unroll otherwise needs > 20 GB).
    ``meta_batch``: B optimizee instances (independent initialisations, minibatch streams and, for a
    task family, tasks) unrolled together, the optimizee through ``torch.func.vmap`` over its
    functional form and the optimizer step vmapped over the instances; the meta-loss is the mean of
    the B instances' meta-losses, so the meta-gradient is the mean of their meta-gradients (equal
    to B sequential ones with the same seeds: ``tests/test_meta_batch.py``). Needs the ``func``
    backend and an optimizee without buffers (no BatchNorm); instance b draws its minibatches and
    regularizer noise from generators of its own. Under ``torch.distributed`` (e.g. ``torchrun``) the B
    instances are shared out over the processes (B must be a multiple of the world size; instance b
    has the same seeds whatever the number of processes), meta-gradients are all-reduced, only rank
    0 writes checkpoints (which hold every instance, so a run resumes on any number of processes),
    and every process must be given the same ``checkpoint_path``.
    ``meta_batch_mode``: how the B instances are unrolled: ``"vmap"`` (as above), ``"loop"`` (one
    ordinary truncation per instance, one after another, and the mean of their meta-losses: the same
    meta-gradient, for any optimizee, backend and optimizer, e.g. few-shot episodes whose learner
    has BatchNorm; the B graphs are held until the one backward pass) or ``"auto"`` (default: vmap
    when the optimizee, backend and optimizer allow it, else loop; on CPU, optimizees of at least
    ``LOOP_MIN_COORDINATES`` parameters loop too, ``SEPARABLE_LOOP_MIN_COORDINATES`` for a separable
    optimizer such as DM, which measured faster there). Under
    torch.distributed with one instance per process, ``"auto"`` loops (there is nothing to vmap over).
    ``fast``: the fast implementation of the same computation: the smoothness PGD of a truncation
    runs once at its end for all its steps together (:meth:`SmoothnessRegularizer.penalties`; R_t
    depends on data of step t only, and the random draws keep their order), and a separable
    optimizer's meta-batch step runs on the stacked coordinates. ``False``: the per-step eager
    reference path. Equal meta-gradients (float64, ``tests/test_fast_path.py``), so ``fast`` is
    not part of a run's identity (omitted from :meth:`to_dict` at its default).
    ``autocast``: ``"bfloat16"`` runs the optimizee's forward passes under ``torch.autocast``
    (bfloat16 matrix products; parameters, gradients, the learned optimizer and the meta-gradient
    stay float32); None (default): no autocast.
    """

    meta_steps: int = 100
    horizon: int = 200
    unroll: int = 20
    meta_lr: float | None = None
    meta_loss: str | None = None
    random_scale: float | None = None
    second_order: bool = False
    backend: str = "func"
    meta_grad_clip: float | None = None
    meta_clip_norm: float | None = None
    checkpoint_network: bool | str = "auto"
    checkpoint_every: int = 10
    max_failures: int = 5
    seed: int = 0
    smooth: SmoothnessConfig | None = None
    meta_batch: int = 1
    meta_batch_mode: str = "auto"
    fast: bool = True
    autocast: str | None = None

    def __post_init__(self):
        for k in ("meta_steps", "horizon", "unroll", "checkpoint_every", "max_failures", "meta_batch"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)!r}")
        if self.meta_loss is not None and self.meta_loss not in META_LOSSES:
            raise ValueError(f"meta_loss must be one of {list(META_LOSSES)}, got {self.meta_loss!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {sorted(BACKENDS)}, got {self.backend!r}")
        if self.meta_batch_mode not in META_BATCH_MODES:
            raise ValueError(f"meta_batch_mode must be one of {list(META_BATCH_MODES)}, got {self.meta_batch_mode!r}")
        if self.meta_lr is not None and not self.meta_lr > 0:
            raise ValueError(f"meta_lr must be > 0, got {self.meta_lr!r}")
        if self.autocast is not None and self.autocast not in AUTOCAST_DTYPES:
            raise ValueError(f"autocast must be None or one of {sorted(AUTOCAST_DTYPES)}, got {self.autocast!r}")
        if self.checkpoint_network not in (True, False, "auto"):
            raise ValueError(f"checkpoint_network must be True, False or 'auto', got {self.checkpoint_network!r}")
        if self.random_scale is not None and self.random_scale < 0:
            raise ValueError(f"random_scale must be >= 0, got {self.random_scale!r}")
        for k in ("meta_grad_clip", "meta_clip_norm"):
            v = getattr(self, k)
            if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"{k} must be a finite number > 0 or None, got {v!r}")

    def resolved(self, lopt: LearnedOptimizer) -> "MetaTrainConfig":
        """A copy with the ``None`` fields filled from ``lopt.meta_defaults``."""
        md = lopt.meta_defaults
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["meta_lr"] = md.lr if self.meta_lr is None else self.meta_lr
        d["meta_loss"] = md.meta_loss if self.meta_loss is None else self.meta_loss
        d["random_scale"] = md.random_scale if self.random_scale is None else self.random_scale
        return MetaTrainConfig(**d)

    def to_dict(self) -> dict:
        """Every field, except the fields that postdate checkpoints and run caches keyed on this dict
        while they sit at their defaults (:data:`CONFIG_LATER_DEFAULTS`), so that those stay valid."""
        d = asdict(self)
        d["smooth"] = None if self.smooth is None else self.smooth.to_dict()
        return runs.without_later_defaults(d, CONFIG_LATER_DEFAULTS)


#: with ``fast``, a meta-batch of instances at least this large runs the optimizer step once per
#: instance instead of under vmap (unless the optimizer is separable: then once, stacked); and
#: ``meta_batch_mode="auto"`` loops on CPU from this size on
LOOP_MIN_COORDINATES = 32768
#: ``meta_batch_mode="auto"`` loops on CPU from this optimizee size on for a separable optimizer
#: (DM, RNNProp: a 2-layer LSTM per coordinate). Measured, B = 8, 2 threads, MNIST MLPs 784-h-10:
#: vmapped over looped 1.67x at 1,600 coordinates, 1.10x at 2,395, 0.92x at 3,985, 0.78x at 15,910
#: (DM; RNNProp alike); the SimpleOptimizer's vmap still wins at 15,910 (1.25x)
SEPARABLE_LOOP_MIN_COORDINATES = 3072


@dataclass
class _Run:
    """One optimizee run in progress (everything needed to continue it exactly)."""

    index: int
    step: int
    x: torch.Tensor           # optimizer-visible flat coordinates (θ = scale·x)
    state: OptState
    loss: torch.Tensor        # minibatch loss at x (detached)
    grad: torch.Tensor        # flat gradient at x (detached)
    scale: torch.Tensor | None
    initial_loss: float = float("nan")
    losses: list = field(default_factory=list)
    task: Task | None = None                   # the task this run trains (sampled from the family)
    task_state: torch.Tensor | None = None     # the task generator's state before it was sampled


class MetaTrainer:
    """Meta-train ``lopt`` on ``task``: a :class:`~l2l_zoo.tasks.Task` or a
    :class:`~l2l_zoo.tasks.TaskFamily`, from which every run samples a fresh task (e.g. a few-shot
    episode); see the module docstring.

    ``checkpoint_path``: where checkpoints go (None: no checkpoints). ``log``: a callable for
    one-line messages (default ``tqdm.write``).
    """

    def __init__(self, lopt: LearnedOptimizer, task: Task | TaskFamily, config: MetaTrainConfig | None = None, *,
                 checkpoint_path: str | os.PathLike | None = None, log: Callable[[str], None] | None = None):
        self.lopt = lopt
        self.family = as_family(task)
        task = self.task = self.family.template
        self.cfg = (config or MetaTrainConfig()).resolved(lopt)
        self.checkpoint_path = None if checkpoint_path is None else os.fspath(checkpoint_path)
        self.log = log or tqdm.write
        dev = task.device
        self.lopt.to(dev)
        self.dtype = next(iter(lopt.parameters())).dtype
        self.meta_opt = torch.optim.Adam(self.lopt.parameters(), lr=self.cfg.meta_lr)
        self.backend = make_backend(self.cfg.backend, task, autocast=self.cfg.autocast)
        self.reg = SmoothnessRegularizer(self.cfg.smooth) if self.cfg.smooth is not None else None
        s = self.cfg.seed
        self.gens = {"data": torch.Generator().manual_seed(s),
                     "init": torch.Generator().manual_seed(s + 1_000_003),
                     "reg": torch.Generator().manual_seed(s + 2_000_003),
                     "task": torch.Generator().manual_seed(s + 3_000_003)}
        self.batch_runs: list[_Run] | None = None
        self.world, self.rank = dist_world()
        self.batched = self.cfg.meta_batch > 1 or self.world > 1
        self.instances = range(0)
        self.loop = False  # meta-batch instances one after another instead of under vmap
        if self.batched:
            per = self._check_batchable()
            self.instances = range(self.rank * per, (self.rank + 1) * per)  # this process's share
            for b in self.instances:  # instance b's own streams: the same on any number of processes
                self.gens[f"data/{b}"] = torch.Generator().manual_seed(s + 5_000_011 * (b + 1))
                self.gens[f"reg/{b}"] = torch.Generator().manual_seed(s + 7_000_003 * (b + 1))
                self.gens[f"init/{b}"] = torch.Generator().manual_seed(s + 9_000_011 * (b + 1))
                self.gens[f"task/{b}"] = torch.Generator().manual_seed(s + 11_000_027 * (b + 1))
        self.meta_step = 0
        self.run: _Run | None = None
        self.runs_started = 0
        self.history: list[dict] = []
        self.failures = 0
        self.total_failures = 0
        self.elapsed = 0.0
        self._last_outer = None
        #: objects whose state_dict() travels in the checkpoints (see attach)
        self.attached: dict = {}
        self._good = self._snapshot()

    # ------------------------------------------------------------------ runs and truncations
    def _new_run(self, task: Task | None = None, task_state: torch.Tensor | None = None,
                 instance: int | None = None) -> _Run:
        """A fresh optimizee run: ``task`` if given (fine-tuning), else one sampled from the family
        (from ``task_state`` when a checkpoint restores a run). Meta-batch ``instance`` b draws its
        task, initialisation and first minibatch from its own generators (default: the trainer's)."""
        g = self.gens if instance is None else {k: self.gens[f"{k}/{instance}"] for k in ("data", "init", "task")}
        if task is None:
            gen = g["task"]
            if task_state is not None:
                gen = torch.Generator()
                gen.set_state(task_state)
            task_state = gen.get_state()
            task = self.family.sample(gen)
        self.backend.task = task
        task.reset()
        task.model.train()
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=g["init"]))
        theta0 = self.lopt.initial_params(task.flatten(task.init_params(seed)).to(self.dtype))
        r = self.cfg.random_scale
        scale = None
        if r > 0:  # Lv et al. §3.1: f_c(x) = f(c·x), c = exp(U(-r, r)) per coordinate, start x0 = θ0/c
            u = torch.rand(theta0.shape, generator=g["init"], dtype=self.dtype)
            scale = torch.exp((2 * u - 1) * r).to(theta0.device)
        x0 = theta0 if scale is None else theta0 / scale
        self.backend.set_scale(scale)
        P = self.backend.start(x0)
        learned = x0.requires_grad  # a learned initialisation: keep its graph
        loss, grad = self.backend.loss_and_grad(P, task.inner_batch(g["data"]),
                                                create_graph=learned and self.cfg.second_order)
        self.runs_started += 1
        state = self.lopt.init_state(x0.numel(), device=x0.device, dtype=self.dtype)
        # With a learned initialisation x0 (and, second-order, the first gradient) keep their graph:
        # they are consumed by this run's first truncation, within the same meta-step. Otherwise
        # they are constants.
        if not (learned and self.cfg.second_order):
            grad = grad.detach()
        return _Run(self.runs_started - 1, 0, x0 if learned else x0.detach(), state, loss.detach(),
                    grad, scale, initial_loss=float(loss.detach()), task=task, task_state=task_state)

    def _truncation(self, run: _Run, steps: int, task: Task | None = None, instance: int | None = None):
        """Unroll ``steps`` optimizee steps from ``run``; returns (meta_loss, losses, penalties, P,
        state, last loss, last grad). The graph reaches the meta-parameters. With the ``outer``
        meta-loss the outer batch is evaluated at the end (in the task's ``outer_train_mode``).
        Meta-batch ``instance`` b draws minibatches and regularizer noise from its own generators."""
        task = task or run.task or self.task
        gdata, greg = (self.gens["data"], self.gens["reg"]) if instance is None else \
            (self.gens[f"data/{instance}"], self.gens[f"reg/{instance}"])
        lopt, be = self.lopt, self.backend
        be.task = task
        be.set_scale(run.scale)
        P = be.start(run.x)
        state = run.state.detach()
        loss, grad = run.loss, run.grad
        losses, penalties = [loss], []
        for _ in range(steps):
            kw = {}
            if lopt.needs_params:
                kw["params"] = be.flat(P)
            if lopt.needs_loss:
                kw["loss"] = loss.detach()
            step = lopt.step(grad, state, network=self._network, **kw)
            if self.reg is not None:  # the random draws now, the PGD of every step after the loop
                penalties.append(self.reg.prepare(lopt, step.feats, step.hidden, greg))
            state = step.state
            P = be.apply(P, step.updates)
            loss, grad = be.loss_and_grad(P, task.inner_batch(gdata),
                                          create_graph=self.cfg.second_order)
            if not self.cfg.second_order:
                grad = grad.detach()
            losses.append(loss)
        if self.reg is not None and penalties:  # fast: all steps together; else one at a time
            penalties = list(self.reg.penalties(lopt, penalties, batched=self.cfg.fast).unbind())
        lam = self.reg.config.lam if self.reg is not None else 0.0
        outer = None
        if self.cfg.meta_loss == "outer":
            mode = task.model.training
            task.model.train(task.outer_train_mode)
            try:
                outer = be.loss(P, task.outer_batch(gdata))
            finally:
                task.model.train(mode)
        ml = meta_loss(self.cfg.meta_loss, losses, penalties, lam, outer=outer)
        self._last_outer = None if outer is None else float(outer.detach())
        return ml, losses, penalties, P, state, loss, grad

    def _network(self, feats, hidden):
        """``lopt.network``, recomputed in the backward pass when checkpointing is on."""
        kernels = contextlib.nullcontext if self.cfg.fast else reference_kernels  # fast=False: the reference
        use = self.cfg.checkpoint_network
        if use == "auto":
            use = sum(h.numel() for h in hidden) > 10_000_000
        if not use:
            with kernels():
                return self.lopt.network(feats, hidden)

        def flat_fn(f, *h):  # also the recomputation in the backward pass
            with kernels():
                u, new = self.lopt.network(f, h)
            return (u, *new)

        out = torch.utils.checkpoint.checkpoint(flat_fn, feats, *hidden, use_reentrant=False)
        return out[0], tuple(out[1:])

    def meta_gradient(self, run: _Run | list[_Run] | None = None,
                      steps: int | None = None) -> tuple[torch.Tensor, list]:
        """Meta-loss of one truncation and its gradient w.r.t. the meta-parameters, without taking a
        step (used by tests and diagnostics). With ``meta_batch`` > 1, ``run`` is a list of B runs
        (default: fresh ones) unrolled together."""
        if self.batched:
            ml, *_ = self._truncation_many(run or self._new_batch(), steps or self.cfg.unroll)
        else:
            ml, *_ = self._truncation(run or self._new_run(), steps or self.cfg.unroll)
        grads = torch.autograd.grad(ml, list(self.lopt.parameters()), allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, self.lopt.parameters())]
        if self.world > 1:  # the mean over every process's instances
            ml = ml.detach().clone()
            self._all_mean([ml, *grads])
        return ml.detach(), grads

    # ------------------------------------------------------------------ meta-batches (vmap)
    def _vmap_obstacle(self) -> str | None:
        """Why this meta-batch cannot run under vmap (None: it can)."""
        cfg = self.cfg
        if cfg.backend != "func":
            return f"vmap needs backend='func', got {cfg.backend!r}"
        if cfg.checkpoint_network is True:
            return "vmap does not combine with checkpoint_network=True"
        if not self.lopt.vmappable:
            return f"the {self.lopt.name!r} optimizer's step cannot run under torch.func.vmap"
        bufs = [k for k, _ in self.task.model.named_buffers()]
        if bufs:
            return f"vmap cannot update buffers in place; task {self.task.name!r} has {bufs[:3]}"
        return None

    def _check_batchable(self) -> int:
        """Check the meta-batch settings, choose vmap or loop (``self.loop``); returns the number of
        instances of this process."""
        cfg = self.cfg
        if cfg.meta_batch % self.world:
            raise ValueError(f"meta_batch {cfg.meta_batch} must be a multiple of the {self.world} processes of "
                             "torch.distributed (each unrolls meta_batch / world_size instances)")
        per = cfg.meta_batch // self.world
        why = self._vmap_obstacle()
        if cfg.meta_batch_mode == "vmap" and why is not None:
            raise ValueError(f"meta_batch_mode='vmap': {why}; use meta_batch_mode='loop' or 'auto'")
        # auto: vmap only where it can run and can pay; on CPU, instances of >= LOOP_MIN_COORDINATES
        # loop (measured, SimpleOptimizer on the 397,510-coordinate MLP, B = 8: looped 0.98x the
        # sequential time, vmapped 0.46x; benchmarks/metatrain_speed.py --meta-batch-mode), those of a
        # separable optimizer from SEPARABLE_LOOP_MIN_COORDINATES (DM on mlp20: 0.93x against 0.57x)
        loop_min = SEPARABLE_LOOP_MIN_COORDINATES if getattr(self.lopt, "separable", False) else LOOP_MIN_COORDINATES
        large_cpu = torch.device(self.task.device).type == "cpu" and self.task.num_params >= loop_min
        self.loop = cfg.meta_batch_mode == "loop" or (cfg.meta_batch_mode == "auto" and (
            why is not None or per == 1 or large_cpu))
        if self.loop and per > 1 and isinstance(self.family, SingleTask) and any(True for _ in
                                                                               self.task.model.named_buffers()):
            raise ValueError(f"meta_batch {cfg.meta_batch}, looped: the {per} instances of a process would share "
                             f"the buffers of task {self.task.name!r} (one model); use a task family (a task per "
                             "instance), one instance per process, or meta_batch=1")
        return per

    def _truncation_many(self, batch: list[_Run], steps: int):
        """One truncation of every run of this process's meta-batch: vmapped or looped."""
        return (self._truncation_loop if self.loop else self._truncation_batch)(batch, steps)

    def _truncation_loop(self, batch: list[_Run], steps: int):
        """:meth:`_truncation` of each run in turn (its own generators), returned like
        :meth:`_truncation_batch`: the mean meta-loss (its gradient is the mean meta-gradient), the
        per-step mean losses and penalties, and the instances' end states stacked."""
        mls, losses, pens, xs, states, loss, grad, outers = [], [], [], [], [], [], [], []
        for b, r in zip(self.instances, batch):
            ml_b, losses_b, pens_b, P, st, l_b, g_b = self._truncation(r, steps, instance=b)
            mls.append(ml_b)
            losses.append(torch.stack([torch.as_tensor(x) for x in losses_b]))
            if pens_b:
                pens.append(torch.stack(pens_b))
            xs.append(self.backend.flat(P))
            states.append(st)
            loss.append(l_b)
            grad.append(g_b)
            outers.append(self._last_outer)
        self._last_outer = None if outers[0] is None else sum(outers) / len(outers)
        mean_pens = list(torch.stack(pens).mean(0).unbind()) if pens else []
        state = OptState(states[0].step, tuple(torch.stack(ts) for ts in zip(*(x.stats for x in states))),
                         tuple(torch.stack(ts) for ts in zip(*(x.hidden for x in states))))
        return (torch.stack(mls).mean(), list(torch.stack(losses).mean(0).unbind()), mean_pens, torch.stack(xs),
                state, torch.stack(loss), torch.stack(grad))

    def _new_batch(self) -> list[_Run]:
        """Fresh runs for this process's instances (all B of them without torch.distributed), each
        from its own generators; run indices count instances globally."""
        first = self.runs_started
        batch = [self._new_run(instance=b) for b in self.instances]
        for b, r in zip(self.instances, batch):
            r.index = first + b
        self.runs_started = first + self.cfg.meta_batch
        return batch

    def _batched_loss(self, X, S, xb, yb):
        """Losses (B,) of the template module at the B parameter rows X (θ = S·X with a scale)."""
        task = self.task

        def one(x, xi, yi, s=None):
            return model_loss(task, x if s is None else x * s, xi, yi, self.cfg.autocast)

        if S is None:
            return torch.func.vmap(one)(X, xb, yb)
        return torch.func.vmap(one)(X, xb, yb, S)

    def _truncation_batch(self, batch: list[_Run], steps: int):
        """:meth:`_truncation` for B runs at once: the optimizee losses and gradients through one
        vmapped functional call, the optimizer step vmapped over the instances (a separable
        optimizer's step runs once over the stacked coordinates instead), the regularizer per
        instance (its own generator); returns (mean meta-loss, per-step mean losses, per-step mean
        penalties, X (B, n), stacked state, losses (B,), grads (B, n))."""
        lopt, cfg, B = self.lopt, self.cfg, len(batch)
        tasks = [r.task or self.task for r in batch]
        X = torch.stack([r.x for r in batch])
        X = X if X.requires_grad else X.detach().requires_grad_(True)
        S = None if batch[0].scale is None else torch.stack([r.scale for r in batch])
        st = [r.state.detach() for r in batch]
        stats = tuple(torch.stack(ts) for ts in zip(*(x.stats for x in st)))
        hidden = tuple(torch.stack(ts) for ts in zip(*(x.hidden for x in st)))
        step_no = st[0].step
        loss = torch.stack([r.loss for r in batch])
        grad = torch.stack([r.grad for r in batch])
        losses, pens = [loss], [[] for _ in range(B)]
        extra = (["params"] if lopt.needs_params else []) + (["loss"] if lopt.needs_loss else [])

        def step_fn(g, stats_, hidden_, *args):
            kw = dict(zip(extra, args))
            out = lopt.step(g, OptState(step_no, stats_, hidden_), **kw)
            return out.updates, out.state.stats, out.state.hidden, out.feats

        def stacked_step(g, stats_, hidden_, *args):
            # A separable optimizer: one ordinary step over the B·n stacked coordinates (rows are
            # independent, so this is the vmapped step without vmap's batching overhead).
            n = g.shape[1]
            fold = lambda t: t.reshape(B * n, *t.shape[2:])  # noqa: E731
            unfold = lambda t: t.reshape(B, n, *t.shape[1:])  # noqa: E731
            kw = {k: fold(a) for k, a in zip(extra, args)}
            out = lopt.step(fold(g), OptState(step_no, tuple(map(fold, stats_)), tuple(map(fold, hidden_))),
                            network=self._network, **kw)
            return (unfold(out.updates), tuple(map(unfold, out.state.stats)),
                    tuple(map(unfold, out.state.hidden)), unfold(out.feats))

        def looped_step(g, stats_, hidden_, *args):
            # Large instances: one ordinary step per instance (fused kernels apply, and each
            # instance's working set stays cache-sized; per-call overhead is negligible at this size).
            # unbind, not g[b]: the backward of B index ops would write B full-size zero tensors
            # (one per instance) where unbind's is one stack
            gs, sts, hs = g.unbind(0), [t.unbind(0) for t in stats_], [t.unbind(0) for t in hidden_]
            ax = {k: a.unbind(0) for k, a in zip(extra, args)}
            outs = [lopt.step(gs[b], OptState(step_no, tuple(t[b] for t in sts), tuple(t[b] for t in hs)),
                              network=self._network, **{k: a[b] for k, a in ax.items()}) for b in range(B)]
            return (torch.stack([o.updates for o in outs]),
                    tuple(torch.stack(ts) for ts in zip(*(o.state.stats for o in outs))),
                    tuple(torch.stack(ts) for ts in zip(*(o.state.hidden for o in outs))),
                    torch.stack([o.feats for o in outs]))

        if cfg.fast and lopt.separable and not lopt.needs_loss:
            batched_step = stacked_step
        elif cfg.fast and X.shape[1] >= LOOP_MIN_COORDINATES:
            batched_step = looped_step
        else:
            batched_step = torch.func.vmap(step_fn)

        def draw(split_fn):
            xs, ys = zip(*(split_fn(t, self.gens[f"data/{b}"]) for b, t in zip(self.instances, tasks)))
            return torch.stack(xs), torch.stack(ys)

        for _ in range(steps):
            args = [{"params": X, "loss": loss.detach()}[k] for k in extra]
            hid_in = hidden
            upd, stats, hidden, feats = batched_step(grad, stats, hidden, *args)
            step_no += 1
            if self.reg is not None:
                fb, hb = feats.unbind(0), [h.unbind(0) for h in hid_in]
                for b in range(B):
                    pens[b].append(self.reg.prepare(lopt, fb[b], tuple(h[b] for h in hb),
                                                    self.gens[f"reg/{self.instances[b]}"]))
            X = X + upd
            loss = self._batched_loss(X, S, *draw(lambda t, g: t.inner_batch(g)))
            (grad,) = torch.autograd.grad(loss.sum(), X, create_graph=cfg.second_order, retain_graph=True)
            if not cfg.second_order:
                grad = grad.detach()
            losses.append(loss)
        if self.reg is not None and steps:  # every instance's and step's PGD (fast: at once)
            R = self.reg.penalties(lopt, [p for pb in pens for p in pb], batched=cfg.fast).reshape(B, steps)
            pens = [list(R[b].unbind()) for b in range(B)]
        lam = self.reg.config.lam if self.reg is not None else 0.0
        outer = None
        if cfg.meta_loss == "outer":
            mode = self.task.model.training
            self.task.model.train(self.task.outer_train_mode)
            try:
                outer = self._batched_loss(X, S, *draw(lambda t, g: t.outer_batch(g)))
            finally:
                self.task.model.train(mode)
        mls = [meta_loss(cfg.meta_loss, [l_[b] for l_ in losses], pens[b], lam,
                         outer=None if outer is None else outer[b]) for b in range(B)]
        ml = torch.stack(mls).mean()
        self._last_outer = None if outer is None else float(outer.detach().mean())
        mean_pens = [torch.stack([p[t] for p in pens]).mean() for t in range(len(pens[0]))]
        return ml, [l_.mean() for l_ in losses], mean_pens, X, OptState(step_no, stats, hidden), loss, grad

    def _unstack(self, batch: list[_Run], X, state: OptState, loss, grad, steps: int) -> None:
        for b, r in enumerate(batch):
            r.x = X[b].detach()
            r.state = OptState(state.step, tuple(t[b].detach() for t in state.stats),
                               tuple(t[b].detach() for t in state.hidden))
            r.loss, r.grad = loss[b].detach(), grad[b].detach()
            r.step += steps

    def attach(self, name: str, obj) -> None:
        """Keep ``obj``'s ``state_dict()`` in every checkpoint and restore it with
        ``load_state_dict`` on resume (e.g. a best-on-validation selector driven by the ``train``
        callback, which runs before each checkpoint, so both always describe the same meta-step)."""
        if not (callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))):
            raise TypeError(f"attach: {name!r} needs state_dict() and load_state_dict(), got {type(obj).__name__}")
        self.attached[name] = obj

    # ------------------------------------------------------------------ failure handling
    def _snapshot(self):
        return (copy.deepcopy(self.lopt.state_dict()), copy.deepcopy(self.meta_opt.state_dict()))

    def _restore(self, snap):
        self.lopt.load_state_dict(snap[0])
        self.meta_opt.load_state_dict(snap[1])

    def _fail(self, what: str):
        self.failures += 1
        self.total_failures += 1
        where = f"meta-step {self.meta_step + 1}, run {self.run.index if self.run else '?'}, " \
                f"optimizee step {self.run.step if self.run else '?'}"
        self._restore(self._good)
        self.run = self.batch_runs = None
        self.log(f"[meta-train] non-finite {what} at {where}: meta-update skipped, last good "
                 f"meta-parameters restored, optimizee run restarted "
                 f"({self.failures}/{self.cfg.max_failures} consecutive)")
        if self.failures >= self.cfg.max_failures:
            self.save_checkpoint()
            raise MetaTrainingDiverged(
                f"meta-training aborted: {self.failures} consecutive non-finite meta-updates "
                f"(last: {what} at {where}); try a smaller meta_lr, a meta_grad_clip, or a shorter "
                f"unroll")

    def _meta_update(self, ml: torch.Tensor) -> bool:
        """Back-propagate and step; False (and nothing changed) if anything is non-finite. Under
        torch.distributed the meta-gradient is averaged over the processes (all-reduce) and every
        decision is taken on all-reduced values, so all processes step, skip and fail together."""
        finite = bool(torch.isfinite(ml))
        if self.world > 1:
            flag = torch.tensor([1.0 if finite else 0.0], dtype=torch.float64, device=ml.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
            finite = bool(flag.item() == 1.0)
        if not finite:
            self._fail("meta-loss")
            return False
        snap = self._snapshot()
        self.meta_opt.zero_grad(set_to_none=True)
        ml.backward()
        params = list(self.lopt.parameters())
        if self.world > 1:
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            self._all_mean([p.grad for p in params])
        if not all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in params):
            self._fail("meta-gradient")
            return False
        if self.cfg.meta_grad_clip is not None:
            for p in params:
                if p.grad is not None:
                    p.grad.clamp_(-self.cfg.meta_grad_clip, self.cfg.meta_grad_clip)
        if self.cfg.meta_clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, self.cfg.meta_clip_norm)
        self._good = snap
        self.meta_opt.step()
        self.failures = 0
        if self.world > 1 and (self.meta_step + 1) % SYNC_CHECK_EVERY == 0:
            self._check_in_sync()
        return True

    # ------------------------------------------------------------------ torch.distributed
    def _all_mean(self, tensors: list[torch.Tensor]) -> None:
        all_mean(tensors)

    def _check_in_sync(self) -> None:
        """Meta-parameters and Adam moments must be bit-identical on every process."""
        vals = [p.detach() for p in self.lopt.parameters()]
        for st in self.meta_opt.state.values():
            vals += [v for v in st.values() if torch.is_tensor(v) and v.is_floating_point()]
        check_in_sync(vals, "meta-parameters", f"meta-step {self.meta_step + 1}")

    # ------------------------------------------------------------------ main loop
    def train(self, *, resume: bool = False, progress: bool = True,
              callback: Callable[[int, dict], None] | None = None) -> list[dict]:
        """Run until ``meta_steps`` meta-updates are done; returns the per-meta-step history.

        ``resume``: continue from ``checkpoint_path`` if it exists. ``callback(meta_step, record)`` is
        called after every meta-step, before that step's checkpoint (tests use it to simulate a
        kill; :meth:`attach` keeps a callback's own state in the checkpoints)."""
        if resume and self.checkpoint_path and os.path.exists(self.checkpoint_path):
            self.load_checkpoint()
            self.log(f"[meta-train] resumed from {self.checkpoint_path} at meta-step {self.meta_step}")
        cfg = self.cfg
        bar = tqdm(total=cfg.meta_steps, initial=self.meta_step, desc=f"meta-train {self.lopt.name}",
                   disable=not progress, dynamic_ncols=True)
        try:
            while self.meta_step < cfg.meta_steps:
                t0 = time.perf_counter()
                if self.batched:
                    if self.batch_runs is None:
                        self.batch_runs = self._new_batch()
                    run = self.batch_runs[0]
                    steps = min(cfg.unroll, cfg.horizon - run.step)
                    ml, losses, pens, P, state, loss, grad = self._truncation_many(self.batch_runs, steps)
                else:
                    if self.run is None:
                        self.run = self._new_run()
                    run = self.run
                    steps = min(cfg.unroll, cfg.horizon - run.step)
                    ml, losses, pens, P, state, loss, grad = self._truncation(run, steps)
                if not self._meta_update(ml):
                    continue
                self.meta_step += 1
                if self.batched:
                    self._unstack(self.batch_runs, P, state, loss, grad, steps)
                else:
                    run.x = self.backend.flat(P).detach()
                    run.state, run.loss, run.grad = state.detach(), loss.detach(), grad.detach()
                    run.step += steps
                vals = [ml.detach(), losses[0].detach(), losses[-1].detach(),
                        torch.stack(pens).detach().mean() if pens else ml.new_zeros(()),
                        ml.new_tensor(self._last_outer if self._last_outer is not None else 0.0)]
                if self.world > 1:  # the record describes the whole meta-batch, not this process's share
                    vals = [v.clone().to(ml.dtype) for v in vals]
                    self._all_mean(vals)
                rec = {"meta_step": self.meta_step, "run": run.index, "run_step": run.step,
                       "meta_loss": float(vals[0]), "loss_start": float(vals[1]), "loss_end": float(vals[2]),
                       "penalty": float(vals[3]) if pens else None,
                       "outer_loss": None if self._last_outer is None else float(vals[4])}
                if run.step >= cfg.horizon:
                    self.run = self.batch_runs = None
                self.elapsed += time.perf_counter() - t0
                rec["elapsed_s"] = self.elapsed
                self.history.append(rec)
                bar.update(1)
                bar.set_postfix(meta_loss=f"{rec['meta_loss']:.4g}", loss=f"{rec['loss_end']:.4g}")
                if callback is not None:  # before the checkpoint, so that attached state is in it
                    callback(self.meta_step, rec)
                if self.checkpoint_path and (self.meta_step % cfg.checkpoint_every == 0
                                             or self.meta_step == cfg.meta_steps):
                    self.save_checkpoint()
        finally:
            bar.close()
        return self.history

    # ------------------------------------------------------------------ fine-tuning (Chen et al. §3.4)
    def finetune(self, *, fraction: float = 0.05, repeats: int = 5, threshold: float = 0.5,
                 max_steps: int = 2000, seed: int = 0, progress: bool = True) -> list[dict]:
        """Fine-tune on a new task: subsample ``fraction`` of its training set; ``repeats`` times,
        train a fresh optimizee with meta-updates every ``unroll`` steps until the mean minibatch loss
        of a truncation is below ``threshold`` × the initial loss (or ``max_steps``).

        A non-finite meta-update restores the last good meta-parameters and restarts the repeat with
        a fresh optimizee; ``max_failures`` consecutive failures (counted across repeats: a success
        resets the count) abort with :class:`MetaTrainingDiverged`, so an untuned optimizer is never
        returned as fine-tuned. Each record says whether the repeat reached the threshold."""
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {threshold!r}")
        if repeats < 1 or max_steps < 1:
            raise ValueError(f"repeats and max_steps must be >= 1, got {repeats!r}, {max_steps!r}")
        if self.batched:
            raise ValueError("finetune works on one optimizee at a time in one process; use a trainer with "
                             "meta_batch=1 outside torch.distributed")
        sub = self.task.subsample(fraction, seed)
        self.backend.task = sub
        records = []
        try:
            bar = tqdm(total=repeats, desc="fine-tune", disable=not progress)
            while len(records) < repeats:
                run = self.run = self._new_run(sub)
                failed, reached, mean_loss = False, False, float("nan")
                while run.step < max_steps:
                    ml, losses, _, P, state, loss, grad = self._truncation(run, self.cfg.unroll, sub)
                    mean_loss = float(torch.stack([torch.as_tensor(x).detach() for x in losses[1:]]).mean())
                    if not self._meta_update(ml):  # raises MetaTrainingDiverged after max_failures
                        failed = True
                        break
                    run.x = self.backend.flat(P).detach()
                    run.state, run.loss, run.grad = state.detach(), loss.detach(), grad.detach()
                    run.step += self.cfg.unroll
                    if mean_loss < threshold * run.initial_loss:
                        reached = True
                        break
                if failed:
                    continue  # the same repeat again, from a fresh optimizee
                records.append({"repeat": len(records), "steps": run.step, "initial_loss": run.initial_loss,
                                "final_mean_loss": mean_loss, "reached_threshold": reached})
                bar.update(1)
            bar.close()
        finally:
            self.backend.task = self.task
            self.run = None
        return records

    # ------------------------------------------------------------------ checkpoints
    def _identity(self) -> dict:
        return {"lopt": self.lopt.name, "lopt_config": self.lopt.config,
                "trainer": {k: v for k, v in self.cfg.to_dict().items()
                            if k not in ("meta_steps", "checkpoint_every", "max_failures")},
                "task": self.family.name, "num_params": self.task.num_params}

    def save_checkpoint(self, path: str | None = None) -> None:
        path = path or self.checkpoint_path
        if path is None:
            return
        def pack(r):
            return {"index": r.index, "step": r.step, "x": r.x.detach(), "state_step": r.state.step,
                    "stats": list(r.state.stats), "hidden": list(r.state.hidden), "loss": r.loss.detach(),
                    "grad": r.grad.detach(), "scale": r.scale, "initial_loss": r.initial_loss,
                    "task_state": r.task_state,
                    "buffers": {k: v.detach().clone() for k, v in (r.task or self.task).model.named_buffers()}}

        run = None if self.run is None else pack(self.run)
        payload = {"identity": runs.canonical(self._identity()), "meta_step": self.meta_step,
                   "lopt": self.lopt.state_dict(), "meta_opt": self.meta_opt.state_dict(),
                   "good": self._good, "gens": {k: g.get_state() for k, g in self.gens.items()},
                   "run": run, "runs_started": self.runs_started, "history": self.history,
                   "failures": self.failures, "total_failures": self.total_failures,
                   "elapsed": self.elapsed,
                   "attached": {k: obj.state_dict() for k, obj in self.attached.items()}}
        if self.batched:
            mine = None if self.batch_runs is None else [pack(r) for r in self.batch_runs]
            if self.world > 1:  # every instance's run and generators go into rank 0's one checkpoint
                shared = {k: v for k, v in payload["gens"].items() if "/" not in k}
                parts = [None] * self.world
                torch.distributed.all_gather_object(parts, (mine, payload["gens"]))
                if self.rank != 0:
                    return
                mine = None if any(m is None for m, _ in parts) else [r for m, _ in parts for r in m]
                payload["gens"] = {**{k: v for _, g in parts for k, v in g.items()}, **shared}
            payload["batch_runs"] = mine
        payload["format"], payload["version"] = "l2l_zoo.meta_checkpoint", 1
        runs.save_torch(path, payload)

    def load_checkpoint(self, path: str | None = None) -> None:
        """Restore everything :meth:`save_checkpoint` wrote (read with ``weights_only=True``: a
        checkpoint cannot run code). A file that is not a meta-training checkpoint, or one written by
        a different setup, raises :class:`~l2l_zoo.runs.CheckpointError`."""
        path = path or self.checkpoint_path
        ck = runs.load_torch(path, map_location=self.task.device, what="meta-training checkpoint")
        if not isinstance(ck, dict) or ck.get("format") != "l2l_zoo.meta_checkpoint":
            raise runs.CheckpointError(f"{os.fspath(path)!r} is not an l2l_zoo meta-training checkpoint")
        if ck["identity"] != runs.canonical(self._identity()):
            raise runs.CheckpointError(
                f"checkpoint {os.fspath(path)!r} was written by a different setup (identity "
                f"{runs.config_hash(ck['identity'])}, this run {runs.config_hash(self._identity())}); "
                "delete it or start without resume")
        self.meta_step = ck["meta_step"]
        self.lopt.load_state_dict(ck["lopt"])
        self.meta_opt.load_state_dict(ck["meta_opt"])
        self._good = ck["good"]
        missing = sorted(set(self.gens) - set(ck["gens"]))
        if missing:
            raise runs.CheckpointError(f"checkpoint {os.fspath(path)!r} has no state for the generators {missing[:4]}")
        for k, s in ck["gens"].items():
            if k in self.gens:  # another process's instances are not ours
                self.gens[k].set_state(s.cpu())
        self.run = None if ck["run"] is None else self._unpack_run(ck["run"])
        self.batch_runs = None
        if ck.get("batch_runs") is not None:  # this process's share (any number of processes)
            self.batch_runs = [self._unpack_run(ck["batch_runs"][b]) for b in self.instances]
        self.runs_started = ck["runs_started"]
        self.history = ck["history"]
        self.failures = ck["failures"]
        self.total_failures = ck["total_failures"]
        self.elapsed = ck["elapsed"]
        missing = sorted(set(self.attached) - set(ck.get("attached", {})))
        if missing:
            raise runs.CheckpointError(f"checkpoint {os.fspath(path)!r} has no state for the attached {missing}")
        for k, obj in self.attached.items():
            obj.load_state_dict(ck["attached"][k])

    def _unpack_run(self, r: dict) -> _Run:
        """A run as :meth:`MetaTrainer.save_checkpoint` packed it (its task re-sampled from the
        generator state it came from, the template's buffers restored)."""
        task = self.task
        if r.get("task_state") is not None:
            g = torch.Generator()
            g.set_state(r["task_state"])
            task = self.family.sample(g)
        with torch.no_grad():
            for k, v in task.model.named_buffers():
                if k in r.get("buffers", {}):
                    v.copy_(r["buffers"][k])
        self.backend.task = task
        return _Run(r["index"], r["step"], r["x"], OptState(r["state_step"], tuple(r["stats"]), tuple(r["hidden"])),
                    r["loss"], r["grad"], r["scale"], r["initial_loss"], task=task, task_state=r.get("task_state"))


def adapt(lopt: LearnedOptimizer, task: Task, steps: int, *, gen: torch.Generator, init_seed: int = 0,
          backend: str = "func", autocast: str | None = None) -> tuple[torch.Tensor, list[float]]:
    """Run ``steps`` inner steps of ``lopt`` on ``task`` from its starting point
    (``lopt.initial_params`` of the task's initialisation with ``init_seed``), without meta-gradient:
    the meta-test inner loop (e.g. adapting to a few-shot episode's support set). The task is
    ``reset()`` first and its template module left in train mode, so BatchNorm running statistics
    accumulate over the inner loop as in training. Returns the final flat parameters (detached) and
    the inner minibatch losses [f_0, ..., f_{steps-1}]. ``autocast``: as
    :class:`MetaTrainConfig`'s (the forward passes in bfloat16)."""
    if not (isinstance(steps, int) and steps >= 0):
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    be = make_backend(backend, task, autocast=autocast)
    task.reset()
    task.model.train()
    dtype = next(iter(lopt.parameters())).dtype
    with torch.no_grad():
        x = lopt.initial_params(task.flatten(task.init_params(init_seed)).to(dtype)).detach().clone()
    state = lopt.init_state(x.numel(), device=x.device, dtype=dtype)
    losses = []
    for _ in range(steps):
        P = be.start(x)
        loss, grad = be.loss_and_grad(P, task.inner_batch(gen))
        kw = {}
        if lopt.needs_params:
            kw["params"] = x
        if lopt.needs_loss:
            kw["loss"] = loss.detach()
        with torch.no_grad():
            upd, state = lopt.update(grad.detach(), state, **kw)
            x = x + upd
        losses.append(float(loss.detach()))
    return x, losses
