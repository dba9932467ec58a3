#!/usr/bin/env python
"""The §5 study of the MARTHE paper on real MNIST: online hypergradient learning-rate schedules
(HD, RTHO, MARTHE with a fixed μ, with adaptive μ, with adaptive μ and β) against the constant rate,
hand-designed schedules and the offline optimum LRS-OPT.

    python benchmarks/lr_schedules_mnist.py                          # CPU default, minutes
    python benchmarks/lr_schedules_mnist.py --seeds 20 --lrs-opt-seeds 4 --lrs-opt-iters 5000 \\
        --betas 1e-6,1e-5,1e-4,1e-3 --beta-lrs 1e-9,1e-8,1e-7,1e-6 --device cuda   # paper scale
    python benchmarks/lr_schedules_mnist.py --resume                 # continue a killed run

Protocol (paper §5 and the authors' public code): 7000 training and 700 validation images
carved (stratified, seed ``--data-seed``) from the MNIST test set in ``$L2L_ZOO_DATA``, the other
2300 images as a test set that nothing is tuned on; pixels in [0, 1]; MLP 784-500-500-500-10 with
ReLU, Glorot-uniform weights and zero biases (the authors' TensorFlow default; PyTorch's default
init makes the constant-rate baseline meaningless: measured 52-56 % against 88-89 %); cross-entropy; plain SGD,
batch 100, T = 512 steps, η0 = 0.01. The seed fixes the initial weights and the minibatch order,
which are the same for every method. The online methods' objective E is the validation loss, on a
random validation minibatch of ``--val-batch`` images per step (0 = the whole validation split).
LRS-OPT optimises all 512 rates by exact reverse-mode hypergradients of the full validation loss
after T steps, with fresh minibatches in every outer iteration (paper: 5000 iterations of gradient
descent; here ``--lrs-opt-iters`` of projected Adam, see ``LRSOpt``); its schedule is then
evaluated with the seed's minibatch order. Accuracies are reported on the validation split (as the
paper does, Fig. 2) and on the held-out test images. For each method the β (or α) with the best mean
validation accuracy is reported, as in Fig. 2.

Also: ``--check-steps`` validates the online approximations on this very problem: with a fixed rate,
MARTHE's Δη_T must equal the μ-discounted sum of LRS-OPT's exact hypergradient (eq. 9/11 vs eq. 4).

Gradient-norm clipping (``--grad-clip``, default 100 as in the authors' public code; 0 disables it)
applies to every method alike: the online controllers and LRS-OPT differentiate through it exactly,
the constant rate and the hand-designed schedules clip before their SGD step.

Outputs in ``--out`` (locked while the script runs): ``results.json`` (the ``l2l_zoo.runs`` schema:
config, environment, data provenance, per-seed records with the per-step rates, hypergradients, μ
and β, the β selection as a tuning record, summary), ``fig2.png`` (drawn by
``paper_figs/fig_marthe.py``), and ``runs/`` with one cached JSON per finished run (keyed by a hash of
everything it depends on) and LRS-OPT checkpoints, so that ``--resume`` loses nothing and never reuses
a result computed under other settings.
"""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from functools import partial

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, os.path.join(HERE, "..", "paper_figs"))

from l2l_zoo import runs  # noqa: E402
from l2l_zoo.cli import (ArgumentParser, UsageError, output_folder, parse_autocast, parse_floats,  # noqa: E402
                         parse_seeds, resolve_device, run_main)
from l2l_zoo.schedules import (HD, MARTHE, BASELINES, BETA_RULES, LRSOpt, SGDDynamics,  # noqa: E402
                               flat_functional, make_baseline, schedule_hypergradient)
from l2l_zoo.meta.unroll import autocast  # noqa: E402
from l2l_zoo.tasks import MLP, Task, glorot_init_  # noqa: E402
from l2l_zoo.tasks.data import load_mnist  # noqa: E402

ONLINE = ("hd", "rtho", "marthe-mu", "marthe-hmu", "marthe")
METHODS = ("constant",) + ONLINE + ("lrs-opt",)
PAPER = {"constant": 87.5, "lrs-opt": 96.2}  # % mean validation accuracy, paper §5 / Fig. 2 caption
DIVERGENCE_LOSS = 1e3  # a minibatch loss above this (or non-finite) ends a run as diverged


@dataclass
class Config:
    seeds: list
    methods: list
    baselines: list
    betas: list
    mus: list
    beta_lrs: list
    beta_rule: str
    steps: int
    lr: float
    batch_size: int
    val_batch: int
    eval_every: int
    lrs_opt_seeds: int
    lrs_opt_iters: int
    lrs_opt_outer_lr: float
    lrs_opt_outer: str
    check_steps: int
    grad_clip: float | None
    autocast: str | None
    data_seed: int
    data_dir: str | None
    device: str
    threads: int
    out: str
    resume: bool
    progress: bool


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n\n")[0], epilog="See the module docstring for the protocol.")
    p.add_argument("--seeds", default="2", help="seeds (initial weights and minibatch order): a count N "
                   "(seeds 0..N-1) or a comma list; the paper uses 20")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma list from {list(METHODS)}: constant rate; HD (validation objective); RTHO "
                        "(μ=1); MARTHE with each fixed μ of --mus; MARTHE with adaptive μ (h_μ) and fixed "
                        "β; MARTHE with adaptive μ and β; the offline LRS-OPT")
    p.add_argument("--baselines", default="multistep,exponential,sgdr",
                   help=f"hand-designed schedules from η0, comma list from {list(BASELINES[1:])} or 'none' "
                        "(paper §6 settings rescaled to T steps)")
    p.add_argument("--betas", default="1e-5,1e-4,1e-3",
                   help="hyper-learning rates β tried for HD, RTHO, MARTHE-μ and MARTHE-h_μ (Fig. 2 right)")
    p.add_argument("--mus", default="0.99", help="fixed discounts μ in [0,1] for marthe-mu (paper: 0.99)")
    p.add_argument("--beta-lrs", default="1e-8,1e-7",
                   help="step sizes α of the adaptive β for 'marthe' (β0 = 0, Algorithm 1)")
    p.add_argument("--beta-rule", default="descent", help=f"sign convention of the β update, one of "
                   f"{list(BETA_RULES)} (see l2l_zoo.schedules.core.beta_update)")
    p.add_argument("--steps", type=int, default=512, help="horizon T (optimizer steps per run)")
    p.add_argument("--lr", type=float, default=0.01, help="initial (and constant-baseline) learning rate η0")
    p.add_argument("--batch-size", type=int, default=100, help="training minibatch size")
    p.add_argument("--val-batch", type=int, default=100,
                   help="validation images per hypergradient of the online methods (0 = all 700)")
    p.add_argument("--eval-every", type=int, default=64, help="steps between validation-accuracy points")
    p.add_argument("--lrs-opt-seeds", type=int, default=1,
                   help="LRS-OPT runs on the first N seeds (paper: 4); 0 skips it")
    p.add_argument("--lrs-opt-iters", type=int, default=8,
                   help="outer iterations of LRS-OPT (paper: 5000); each costs one reverse-mode unroll of "
                        "T steps (≈30 s and ≈6 GB on one CPU thread)")
    p.add_argument("--lrs-opt-outer-lr", type=float, default=0.01, help="step size of LRS-OPT's outer update")
    p.add_argument("--lrs-opt-outer", default="adam", help="LRS-OPT outer update: adam or sgd (projected)")
    p.add_argument("--check-steps", type=int, default=64,
                   help="horizon of the check of the online hypergradients against LRS-OPT's exact one "
                        "(0 skips it)")
    p.add_argument("--grad-clip", type=float, default=100.0,
                   help="maximum global gradient norm of every method's SGD step (the authors' public code: "
                        "100); 0 disables clipping")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the train/validation/test carve")
    p.add_argument("--data-dir", default=None, help="dataset folder; must exist if given (default: $L2L_ZOO_DATA, then ./data)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--autocast", default="none",
                   help="none or bfloat16: the MLP's training forward passes (every schedule's steps, LRS-OPT's "
                        "unrolled steps) under torch.autocast; validation losses and evaluations stay float32")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = torch's default)")
    p.add_argument("--out", default=os.path.join("results", "lr_schedules_mnist"), help="output folder")
    p.add_argument("--resume", action="store_true",
                   help="reuse finished runs and LRS-OPT checkpoints in --out that have the same settings")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _list(spec: str, allowed, flag: str) -> list[str]:
    if spec.strip() == "none":
        return []
    items = [s.strip() for s in spec.split(",") if s.strip()]
    bad = [s for s in items if s not in allowed]
    if bad or len(set(items)) != len(items):
        raise UsageError(f"{flag} must be 'none' or a comma list of distinct names from {list(allowed)}, got {spec!r}")
    return items


def parse_config(argv=None) -> Config:
    a = build_parser().parse_args(argv)
    methods = _list(a.methods, METHODS, "--methods")
    if not methods:
        raise UsageError("--methods: nothing to run")
    baselines = _list(a.baselines, BASELINES[1:], "--baselines")
    mus = parse_floats(a.mus, "--mus", positive=False)
    if any(not 0 <= m <= 1 for m in mus):
        raise UsageError(f"--mus must lie in [0, 1], got {a.mus!r}")
    if a.beta_rule not in BETA_RULES:
        raise UsageError(f"--beta-rule must be one of {list(BETA_RULES)}, got {a.beta_rule!r}")
    if a.lrs_opt_outer not in LRSOpt.OUTER:
        raise UsageError(f"--lrs-opt-outer must be one of {list(LRSOpt.OUTER)}, got {a.lrs_opt_outer!r}")
    for flag, val, lo in (("--steps", a.steps, 1), ("--batch-size", a.batch_size, 1), ("--val-batch", a.val_batch, 0),
                          ("--eval-every", a.eval_every, 1), ("--lrs-opt-seeds", a.lrs_opt_seeds, 0),
                          ("--lrs-opt-iters", a.lrs_opt_iters, 1), ("--check-steps", a.check_steps, 0),
                          ("--data-seed", a.data_seed, 0), ("--threads", a.threads, 0)):
        if val < lo:
            raise UsageError(f"{flag} must be an integer >= {lo}, got {val}")
    for flag, val in (("--lr", a.lr), ("--lrs-opt-outer-lr", a.lrs_opt_outer_lr)):
        if not (math.isfinite(val) and val > 0):
            raise UsageError(f"{flag} must be a positive number, got {val}")
    if a.batch_size > 7000:
        raise UsageError(f"--batch-size must be <= 7000 (the training split), got {a.batch_size}")
    if a.val_batch > 700:
        raise UsageError(f"--val-batch must be <= 700 (the validation split; 0 = all), got {a.val_batch}")
    if not (math.isfinite(a.grad_clip) and a.grad_clip >= 0):
        raise UsageError(f"--grad-clip must be a number >= 0 (0 = off), got {a.grad_clip}")
    autocast_dtype = parse_autocast(a.autocast)
    if a.data_dir is not None and not os.path.isdir(a.data_dir):
        raise UsageError(f"--data-dir: no such folder {a.data_dir!r}")
    resolve_device(a.device)  # validates
    return Config(seeds=parse_seeds(a.seeds), methods=methods, baselines=baselines,
                  betas=parse_floats(a.betas, "--betas"), mus=mus,
                  beta_lrs=parse_floats(a.beta_lrs, "--beta-lrs"), beta_rule=a.beta_rule, steps=a.steps,
                  lr=a.lr, batch_size=a.batch_size, val_batch=a.val_batch, eval_every=a.eval_every,
                  lrs_opt_seeds=a.lrs_opt_seeds, lrs_opt_iters=a.lrs_opt_iters,
                  lrs_opt_outer_lr=a.lrs_opt_outer_lr, lrs_opt_outer=a.lrs_opt_outer,
                  check_steps=a.check_steps, grad_clip=a.grad_clip or None,
                  autocast=autocast_dtype, data_seed=a.data_seed, data_dir=a.data_dir, device=a.device,
                  threads=a.threads, out=a.out, resume=a.resume, progress=not a.no_progress)


# ---------------------------------------------------------------------------------- runs

@dataclass(frozen=True)
class Spec:
    """One configuration of one method: ``kind`` in METHODS or a baseline name."""

    kind: str
    beta: float | None = None
    mu: float | str | None = None
    beta_lr: float | None = None

    @property
    def method(self) -> str:
        """The row of the summary table this configuration competes in."""
        if self.kind == "marthe-mu":
            return f"marthe-mu{self.mu:g}"
        return self.kind

    @property
    def key(self) -> str:
        parts = [self.kind]
        if self.beta is not None:
            parts.append(f"b{self.beta:g}")
        if self.mu is not None:
            parts.append(f"mu{self.mu if isinstance(self.mu, str) else format(self.mu, 'g')}")
        if self.beta_lr is not None:
            parts.append(f"a{self.beta_lr:g}")
        return "_".join(parts)

    @property
    def x(self) -> float | None:
        """The abscissa of Fig. 2 right: β, or α for adaptive β."""
        return self.beta_lr if self.beta_lr is not None else self.beta


def specs(cfg: Config) -> list[Spec]:
    out = []
    for m in cfg.methods:
        if m == "constant":
            out.append(Spec("constant"))
        elif m == "hd":
            out += [Spec("hd", beta=b, mu=0.0) for b in cfg.betas]
        elif m == "rtho":
            out += [Spec("rtho", beta=b, mu=1.0) for b in cfg.betas]
        elif m == "marthe-mu":
            out += [Spec("marthe-mu", beta=b, mu=mu) for mu in cfg.mus for b in cfg.betas]
        elif m == "marthe-hmu":
            out += [Spec("marthe-hmu", beta=b, mu="adaptive") for b in cfg.betas]
        elif m == "marthe":
            out += [Spec("marthe", beta=0.0, mu="adaptive", beta_lr=a) for a in cfg.beta_lrs]
    out += [Spec(b) for b in cfg.baselines]
    return out


def make_task(cfg: Config, device) -> Task:
    data = load_mnist(cfg.data_dir, n_train=7000, n_val=700, seed=cfg.data_seed, normalize="unit")
    return Task("mnist_mlp3x500", partial(MLP, 784, (500, 500, 500), 10), data, batch_size=cfg.batch_size,
                device=device, init=glorot_init_)


def _val_loss_fn(task: Task, model, n: int, gen: torch.Generator):
    """E for the online methods: validation loss on ``n`` random validation images (all if n = 0)."""
    xv, yv = task.data.x_val, task.data.y_val

    def fn():
        if n == 0:
            return task.loss(model(xv), yv)
        idx = torch.randperm(len(yv), generator=gen)[:n].to(xv.device)
        return task.loss(model(xv[idx]), yv[idx])
    return fn


class ListSchedule:
    """A fixed per-step schedule (LRS-OPT's optimised rates) as a scheduler: after step t the rate of
    step t+1 is set."""

    def __init__(self, optimizer, lrs: list[float]):
        self.optimizer, self.lrs, self.t = optimizer, list(lrs), 0
        self._set()

    def _set(self):
        for g in self.optimizer.param_groups:
            g["lr"] = self.lrs[min(self.t, len(self.lrs) - 1)]

    def step(self):
        self.t += 1
        self._set()

    def state_dict(self):
        return {"t": self.t}

    def load_state_dict(self, sd):
        self.t = int(sd["t"])
        self._set()


def train_run(task: Task, cfg: Config, spec: Spec, seed: int, *, lrs: list[float] | None = None,
              progress: bool = False, desc: str = "") -> dict:
    """Train the seed's MLP for T steps under ``spec`` (or the fixed schedule ``lrs``): a run record
    of the results schema with the per-step ``lr`` (and, for the online methods, ``hypergradient``,
    ``mu``, ``beta``) in ``step_log``, validation metrics every ``eval_every`` steps and the final
    validation, test and training metrics."""
    model = task.build_model(seed=seed)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr if lrs is None else lrs[0])
    gen = torch.Generator().manual_seed(10_000 + seed)       # minibatch order: same for every method
    vgen = torch.Generator().manual_seed(20_000 + seed)
    val_fn = _val_loss_fn(task, model, cfg.val_batch, vgen)
    loss_fn = lambda m, b: task.loss(m(b[0]), b[1])  # noqa: E731
    ctrl = None
    if spec.kind == "hd":
        ctrl = HD(opt, val_fn, beta=spec.beta, divergence_loss=DIVERGENCE_LOSS, grad_clip=cfg.grad_clip)
    elif spec.kind in ONLINE:
        ctrl = MARTHE(opt, val_fn, beta=spec.beta, mu=spec.mu, beta_lr=spec.beta_lr, beta_rule=cfg.beta_rule,
                      divergence_loss=DIVERGENCE_LOSS, grad_clip=cfg.grad_clip)
    if ctrl is not None:
        stepper = runs.ControllerStepper(model, ctrl, loss_fn, autocast=cfg.autocast)
    else:
        sched = (ListSchedule(opt, lrs) if lrs is not None else
                 make_baseline(spec.kind, opt, total_steps=cfg.steps) if spec.kind in BASELINES else None)
        stepper = runs.OptimizerStepper(model, opt, loss_fn, scheduler=sched, grad_clip=cfg.grad_clip,
                                        autocast=cfg.autocast)

    def evaluate():
        loss, acc = task.evaluate(model, "val")
        return {"val_loss": loss, "val_acc": acc}

    def final():
        out = {}
        out["test_loss"], out["test_acc"] = task.evaluate(model, "test")
        out["train_loss"], out["train_acc"] = task.evaluate(model, "train")
        return out

    rec = runs.train(stepper, lambda aux: task.sample_batch(gen), steps=cfg.steps, evaluate=evaluate,
                     eval_every=cfg.eval_every, final=final, divergence_loss=DIVERGENCE_LOSS,
                     progress=progress, desc=desc)
    rec.update(seed=seed, spec=asdict(spec), n_skipped=getattr(ctrl, "n_skipped", 0),
               step_ms=1000 * rec["wall_s"] / max(1, len(rec["step_log"].get("loss", []))))
    return rec


def lrs_opt_run(task: Task, cfg: Config, seed: int, ckpt_path: str, log, progress: bool) -> dict:
    """LRS-OPT for one seed: ``--lrs-opt-iters`` outer iterations from η = η0·1, checkpointed after
    each, then the optimised schedule is evaluated with the seed's minibatch order."""
    from tqdm.auto import tqdm
    model = task.build_model(seed=seed)
    w0, forward = flat_functional(model)
    xt, yt = task.data.x_train, task.data.y_train
    xv, yv = task.data.x_val, task.data.y_val
    dyn = SGDDynamics()

    def loss_fn(w, idx):
        with autocast(w.device, cfg.autocast):
            return task.loss(forward(w, xt[idx]), yt[idx])

    def val_fn(w):
        return task.loss(forward(w, xv), yv)

    outer = LRSOpt(torch.full((cfg.steps,), cfg.lr, dtype=w0.dtype, device=w0.device),
                   outer_lr=cfg.lrs_opt_outer_lr, outer=cfg.lrs_opt_outer)
    gen = torch.Generator().manual_seed(30_000 + seed)   # fresh minibatches every outer iteration
    history = {"val_loss": [], "hypergradient_norm": [], "wall_s": []}
    # Everything but the iteration budget must match for a checkpoint to be continued, so that
    # `--resume --lrs-opt-iters N` with a larger N extends a finished optimisation.
    ck_sig = runs.canonical({**run_fields(cfg, [k for k in RUN_KEYS + LRS_KEYS if k != "lrs_opt_iters"]),
                             "seed": seed, "data": task.data.summary()})
    if cfg.resume and os.path.exists(ckpt_path):
        ck = runs.load_torch(ckpt_path, what="LRS-OPT checkpoint")
        if not isinstance(ck, dict) or "outer" not in ck:
            raise runs.CheckpointError(f"{ckpt_path!r} is not an LRS-OPT checkpoint")
        if ck.get("signature") == ck_sig and ck["outer"]["iteration"] <= cfg.lrs_opt_iters:
            outer.load_state_dict(ck["outer"])
            gen.set_state(ck["gen"])
            history = ck["history"]
            log(f"[lrs-opt] seed {seed}: resumed at outer iteration {outer.iteration}")
        else:
            log(f"[lrs-opt] seed {seed}: checkpoint {ckpt_path} was made with other settings; starting over")
    bar = tqdm(total=cfg.lrs_opt_iters, initial=outer.iteration, desc=f"LRS-OPT seed {seed}",
               disable=not progress, leave=False, dynamic_ncols=True)
    while outer.iteration < cfg.lrs_opt_iters:
        t0 = time.perf_counter()
        batches = [torch.randperm(len(yt), generator=gen)[:cfg.batch_size].to(xt.device) for _ in range(cfg.steps)]
        value, h = schedule_hypergradient(w0, outer.lrs, batches, loss_fn, val_fn, dyn, grad_clip=cfg.grad_clip)
        if not (math.isfinite(value) and bool(torch.isfinite(h).all())):
            history["stopped"] = f"non-finite validation loss or hypergradient at outer iteration {outer.iteration}"
            log(f"[lrs-opt] seed {seed}: {history['stopped']}; keeping the last finite schedule")
            break
        outer.update(h)
        history["val_loss"].append(value)
        history["hypergradient_norm"].append(float(h.norm()))
        history["wall_s"].append(time.perf_counter() - t0)
        runs.save_torch(ckpt_path, {"outer": outer.state_dict(), "gen": gen.get_state(), "history": history,
                                    "signature": ck_sig})  # atomic: never a half-written checkpoint
        bar.update(1)
        bar.set_postfix(E=f"{value:.4f}")
    bar.close()
    schedule = outer.lrs.cpu().tolist()
    rec = train_run(task, cfg, Spec("lrs-opt"), seed, lrs=schedule)
    rec["lrs_opt"] = {"iterations": outer.iteration, "history": history, "schedule": schedule}
    return rec


def check_hypergradients(task: Task, cfg: Config, seed: int) -> dict:
    """Online vs exact on the real problem: with β = 0 (η fixed at η0) and E the full validation loss,
    MARTHE's Δη_T must equal Σ_t μ^{T−1−t}·∂f_T/∂η_t computed by LRS-OPT's reverse mode. In float64,
    so that the comparison is not blurred by float32 rounding accumulated over the unroll."""
    t_check = cfg.check_steps
    gen = torch.Generator().manual_seed(40_000 + seed)
    idx = [torch.randperm(len(task.data.y_train), generator=gen)[:cfg.batch_size].to(task.device)
           for _ in range(t_check)]
    model = task.build_model(seed=seed).double()
    w0, forward = flat_functional(model)
    xt, yt = task.data.x_train.double(), task.data.y_train
    xv, yv = task.data.x_val.double(), task.data.y_val
    value, h = schedule_hypergradient(
        w0, torch.full((t_check,), cfg.lr, dtype=w0.dtype, device=w0.device), idx,
        lambda w, i: task.loss(forward(w, xt[i]), yt[i]), lambda w: task.loss(forward(w, xv), yv), SGDDynamics(),
        grad_clip=cfg.grad_clip)
    out = {"steps": t_check, "seed": seed, "dtype": "float64", "grad_clip": cfg.grad_clip,
           "exact_hypergradient": h.cpu().tolist(), "E": value, "by_mu": {}}
    for mu in (0.0, 0.9, 0.99, 1.0):
        m = task.build_model(seed=seed).double()
        ctrl = MARTHE(torch.optim.SGD(m.parameters(), lr=cfg.lr), lambda: task.loss(m(xv), yv), beta=0.0, mu=mu,
                      grad_clip=cfg.grad_clip)
        for i in idx:
            ctrl.step(task.loss(m(xt[i]), yt[i]))
        weights = torch.tensor([mu ** (t_check - 1 - t) for t in range(t_check)], dtype=h.dtype, device=h.device)
        exact = float(weights @ h)
        online = ctrl.last["hypergradient"]
        out["by_mu"][f"{mu:g}"] = {"online": online, "exact": exact,
                                   "rel_error": abs(online - exact) / max(abs(exact), 1e-12)}
    return out


# ---------------------------------------------------------------------------------- summary

def summarize(run_table: dict[str, list[dict]], all_specs: list[Spec]) -> tuple[dict, dict]:
    """Per configuration: mean ± std over seeds; per method: the configuration with the best mean
    validation accuracy among those where no seed diverged (Fig. 2: 'the value of β that achieves
    the best average final validation accuracy'), chosen by :func:`l2l_zoo.runs.tune` over the
    method's configurations. Returns ``(summary, tuning)``."""
    configs = {}
    for spec in all_specs:
        rs = run_table.get(spec.key, [])
        if not rs:
            continue
        s = runs.summarize(rs, ("val_acc", "test_acc", "val_loss", "train_loss"))
        configs[spec.key] = {"method": spec.method, "kind": spec.kind, "beta": spec.beta, "mu": spec.mu,
                             "beta_lr": spec.beta_lr, "x": spec.x, **s,
                             "step_ms": float(np.mean([r["step_ms"] for r in rs]))}
    best, tuning = {}, {}
    for method in dict.fromkeys(c["method"] for c in configs.values()):
        keys = [k for k, c in configs.items() if c["method"] == method]
        # a configuration with a diverged seed competes with no score (never selected)
        t = runs.tune(keys, lambda k: {"final": {"val_acc": None if configs[k]["diverged"] else configs[k]["val_acc"]}},
                      criterion="val_acc", note="best mean validation accuracy over seeds, configurations "
                                                "with a diverged seed excluded (Fig. 2)")
        tuning[method] = t.to_dict()
        if t.best is not None:
            best[method] = t.best
    return {"configs": configs, "best": best}, tuning


# ---------------------------------------------------------------------------------- main

# Which results each field decides (the run cache keys on these groups; a test checks that every
# field is classified, so a new flag cannot be forgotten by the cache).
RUN_KEYS = ("steps", "lr", "batch_size", "val_batch", "eval_every", "beta_rule", "grad_clip", "autocast",
            "data_seed", "data_dir", "device", "threads")
LRS_KEYS = ("lrs_opt_iters", "lrs_opt_outer_lr", "lrs_opt_outer")
SELECTION_KEYS = ("seeds", "methods", "baselines", "betas", "mus", "beta_lrs", "lrs_opt_seeds", "check_steps")
NO_RESULT_KEYS = ("out", "resume", "progress")


def run_fields(cfg: Config, keys) -> dict:
    """The config's values of ``keys`` for a run's identity, without the later fields at their
    defaults (``autocast``: runs cached before the flag existed still hold)."""
    return runs.without_later_defaults({k: getattr(cfg, k) for k in keys})


def main(argv=None) -> int:
    cfg = parse_config(argv)
    with output_folder(cfg.out):
        return _main(cfg)


def _main(cfg: Config) -> int:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    from tqdm.auto import tqdm
    log = tqdm.write
    t_start = time.perf_counter()
    task = make_task(cfg, device)
    log(f"[data] {task.data.note}")
    log(f"[setup] MLP 784-500-500-500-10 ({task.num_params:,} parameters, Glorot init) on {device}, "
        f"T={cfg.steps}, η0={cfg.lr}, batch {cfg.batch_size}, E on {cfg.val_batch or 700} validation "
        f"images per step, gradient clip {cfg.grad_clip}; out: {cfg.out}")
    setup = {**run_fields(cfg, RUN_KEYS), "data": task.data.summary()}
    cache = runs.RunCache(os.path.join(cfg.out, "runs"), enabled=cfg.resume)
    result = runs.new_results("lr_schedules_mnist", asdict(cfg), data=task.data.summary())
    result.update(paper={"val_acc_percent": PAPER}, divergence_loss=DIVERGENCE_LOSS)

    def save():
        result["wall_s"] = time.perf_counter() - t_start
        runs.write_json(os.path.join(cfg.out, "results.json"), result)

    all_specs = specs(cfg)
    jobs = [(spec, seed) for seed in cfg.seeds for spec in all_specs]
    bar = tqdm(jobs, desc="online runs", disable=not cfg.progress, dynamic_ncols=True)
    for spec, seed in bar:
        key = f"{spec.key}_seed{seed}"
        unit = {**setup, "spec": asdict(spec), "seed": seed}
        rec = cache.run(unit, lambda: train_run(task, cfg, spec, seed, progress=cfg.progress, desc=key), name=key)
        if rec["diverged_at"] is not None:
            log(f"[diverged] {key}: {rec['error']}")
        result["runs"].setdefault(spec.key, []).append(rec)
        save()  # a partial result is on disk after every run
    bar.close()

    if "lrs-opt" in cfg.methods and cfg.lrs_opt_seeds:
        for seed in cfg.seeds[:cfg.lrs_opt_seeds]:
            key = f"lrs-opt_seed{seed}"
            unit = {**setup, **{k: getattr(cfg, k) for k in LRS_KEYS}, "spec": "lrs-opt", "seed": seed}
            ckpt = os.path.join(cfg.out, "runs", f"{key}-{runs.config_hash(unit)}.ckpt.pt")
            rec = cache.run(unit, lambda: lrs_opt_run(task, cfg, seed, ckpt, log, cfg.progress), name=key)
            result["runs"].setdefault("lrs-opt", []).append(rec)
            save()
        all_specs = all_specs + [Spec("lrs-opt")]

    if cfg.check_steps:
        log(f"[check] online vs exact hypergradients over {cfg.check_steps} steps (seed {cfg.seeds[0]})")
        result["hypergradient_check"] = check_hypergradients(task, cfg, cfg.seeds[0])

    result["summary"], result["tuning"] = summarize(result["runs"], all_specs)
    save()
    from fig_marthe import plot_fig2
    plot_fig2(result, os.path.join(cfg.out, "fig2.png"))

    # Report.
    s = result["summary"]
    log(f"\nvalidation / test accuracy after T={cfg.steps} steps, mean ± std over seeds "
        f"(best β or α per method by mean validation accuracy)")
    log(f"{'method':<16}{'config':<22}{'val acc %':>16}{'test acc %':>16}{'paper val %':>13}{'diverged':>10}"
        f"{'ms/step':>9}")
    for method in dict.fromkeys(c["method"] for c in s["configs"].values()):
        key = s["best"].get(method)
        if key is None:
            log(f"{method:<16}{'(every config had a diverged seed)':<22}")
            continue
        c = s["configs"][key]
        conf = "" if c["x"] is None else (f"α={c['beta_lr']:g}" if c["beta_lr"] is not None else f"β={c['beta']:g}")
        paper = PAPER.get(method)
        log(f"{method:<16}{conf:<22}{100 * c['val_acc']:>9.2f} ± {100 * c['val_acc_std']:<4.2f}"
            f"{100 * c['test_acc']:>9.2f} ± {100 * c['test_acc_std']:<4.2f}"
            f"{('%.1f' % paper) if paper else '—':>13}{c['diverged']:>7}/{c['n_seeds']}{c['step_ms']:>9.1f}")
    if "hypergradient_check" in result:
        for mu, v in result["hypergradient_check"]["by_mu"].items():
            log(f"[check] μ={mu}: MARTHE Δη_T = {v['online']:.6g}, exact Σ μ^(T-1-t) ∂f/∂η_t = {v['exact']:.6g} "
                f"(rel. error {v['rel_error']:.1e})")
    log(f"results: {os.path.join(cfg.out, 'results.json')}  figure: {os.path.join(cfg.out, 'fig2.png')}  "
        f"({result['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    run_main(main)
