#!/usr/bin/env python
"""Meta-train a learned optimizer on the MNIST MLP, evaluate it far beyond its training horizon,
and compare it with hand-designed optimizers tuned on the same task.

    python benchmarks/mnist_mlp.py --opt simple --smooth eps=0.1          # the flagship run
    python benchmarks/mnist_mlp.py --opt simple --eval-steps 10000        # long-horizon check
    python benchmarks/mnist_mlp.py --opt dm --meta-steps 40 --baselines none
    python benchmarks/mnist_mlp.py --opt adam --task lenet                # a tuned baseline alone
    python benchmarks/mnist_mlp.py --opt simple --load results/.../optimizer.pt --task lenet --finetune
    python benchmarks/mnist_mlp.py --opt simple --load zoo:simple-smooth/mnist-mlp --task deep_mlp

Protocol (Chen et al. 2020 §4; smoothness paper §5.1): the learned optimizer is meta-trained on the
base MLP 784→500→10 (``--meta-task``) with runs of ``--horizon`` 200 optimizee steps cut into
truncations of ``--unroll`` 20, Adam on the meta-parameters; then it trains freshly initialised
models of ``--task`` for ``--eval-steps`` steps (default 1000, 5× the training horizon) through the
``torch.optim`` adapter. Hand-designed baselines (SGD, SGD with momentum 0.9, Adam) get the best
learning rate of ``--lr-grid`` (Chen et al.: {1, 0.1, 0.01, 0.001}), chosen by ``--tune-criterion``
(default: the final full validation-set loss; never a test metric) on the first seed, and are then
run on every seed with the same initialisations and minibatch order as the learned optimizer.
Learning-rate-free optimizers (``--baselines prodigy,sf-adamw``: Prodigy, schedule-free AdamW; the
authors' packages, ``pip install -e '.[lrfree]'``) run untuned at their authors' settings on the same
seeds; schedule-free AdamW is evaluated at its averaged point.

Outputs in ``--out`` (locked while the script runs: a second run on the same folder is refused):
``results.json`` (the ``l2l_zoo.runs`` results schema: full config, environment, data provenance,
meta-training history, per-step minibatch loss and periodic full train/validation/test loss and
accuracy of every run, tuning record, summary), ``curves.png``, the trained ``optimizer.pt``
(``l2l_zoo.load`` reads it), the meta-training checkpoint, and one cached JSON per finished run
(keyed by a hash of everything it depends on) so that ``--resume`` loses nothing and never reuses a
result computed under other settings.
"""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import l2l_zoo  # noqa: E402
from l2l_zoo import baselines as base_opts  # noqa: E402
from l2l_zoo import runs  # noqa: E402
from l2l_zoo.cli import (ArgumentParser, UsageError, distributed_main, parse_autocast,  # noqa: E402
                         parse_floats, parse_kv, parse_seeds, plot_curves, resolve_device, run_main,
                         torchrun_world_size)
from l2l_zoo.evaluation import train_optimizee  # noqa: E402
from l2l_zoo.meta import META_LOSSES, MetaTrainConfig, MetaTrainer  # noqa: E402
from l2l_zoo.meta.trainer import dist_world  # noqa: E402
from l2l_zoo.regularizers import parse_smooth  # noqa: E402
from l2l_zoo.tasks import TASKS, make_task  # noqa: E402

LEARNED = ("simple", "dm", "rnnprop")
HAND = base_opts.HAND            # tuned over --lr-grid
LR_FREE = base_opts.LR_FREE      # run untuned at their authors' settings
BASELINES = HAND + LR_FREE
CRITERIA = ("val_loss", "val_acc")
# Meta-steps that fit the default run into ~10 minutes on 2 CPU cores; the speed-ups are spent on
# meta-training longer. SimpleOptimizer: 200 until 2026-12-02 (an optimizer that tracked plain SGD),
# then 360 (the fast path), since 2026-12-07 720 (the native kernels; about 400 s of meta-training
# on this project's 2-core AMD machine): over meta-seeds 0-2 the step-1000 training loss went from
# 0.030 to 0.0089 on average (every seed better; README, Measured results). The LSTMs cost ~15-20x
# more per meta-step on this MLP.
DEFAULT_META_STEPS = {"simple": 720, "dm": 20, "rnnprop": 20}
DIVERGENCE_LOSS = 1e4
CHECKPOINT_EVERY = 1000  # optimizee steps between checkpoints of an evaluation run


@dataclass
class Config:
    opt: str
    smooth: str | None
    task: str
    meta_task: str
    meta_steps: int
    horizon: int
    unroll: int
    meta_lr: float | None
    meta_loss: str | None
    meta_grad_clip: float | None
    backend: str
    meta_batch: int
    autocast: str | None
    opt_config: dict
    load: str | None
    finetune: bool
    eval_steps: int
    eval_every: int
    seeds: list
    meta_seed: int
    lr_grid: list
    tune_criterion: str
    baselines: list
    batch_size: int
    device: str
    data_dir: str | None
    out: str
    resume: bool
    progress: bool


# Which results each field decides (the run cache keys on these groups; a test checks that every
# field is classified, so a new flag cannot be forgotten by the cache).
EVAL_KEYS = ("task", "eval_steps", "eval_every", "batch_size", "device", "data_dir", "finetune", "autocast")
META_KEYS = ("opt", "smooth", "meta_task", "meta_steps", "horizon", "unroll", "meta_lr", "meta_loss",
             "meta_grad_clip", "backend", "meta_batch", "opt_config", "load", "finetune", "meta_seed",
             "batch_size", "device", "data_dir", "autocast")
SELECTION_KEYS = ("seeds", "lr_grid", "tune_criterion", "baselines")  # which runs, not what they give
NO_RESULT_KEYS = ("out", "resume", "progress")


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n\n")[0], epilog="See the module docstring for the protocol.")
    p.add_argument("--opt", required=True, help=f"optimizer to evaluate: learned {list(LEARNED)}, "
                   f"hand-designed {list(HAND)} or learning-rate-free {list(LR_FREE)} (these two need "
                   "pip install -e '.[lrfree]')")
    p.add_argument("--smooth", default=None, metavar="SPEC",
                   help="smoothness regularizer for meta-training: eps=E[,lam=L,steps=K,step_size=S,"
                        "noise=N,subsample=M,corners=C]; omitted keys take the defaults lam=1, steps=10, "
                        "step_size=eps/5, noise=0.05, subsample=4096 (0 = all coordinates), corners=0 (1: PGD "
                        "also from the corners s ± eps, the largest penalty kept)")
    p.add_argument("--task", default="mlp", help=f"evaluation task, one of {sorted(TASKS)}")
    p.add_argument("--meta-task", default="mlp", help="task the learned optimizer is meta-trained on")
    p.add_argument("--meta-steps", type=int, default=None,
                   help=f"number of meta-updates (one per truncation); default per optimizer {DEFAULT_META_STEPS}")
    p.add_argument("--horizon", type=int, default=200, help="optimizee steps per meta-training run (T_total)")
    p.add_argument("--unroll", type=int, default=20, help="truncation length T of backpropagation through time")
    p.add_argument("--meta-lr", type=float, default=None,
                   help="Adam learning rate on the meta-parameters (default: the optimizer's paper value: "
                        "simple 1e-3, dm 1e-3, rnnprop 1e-4)")
    p.add_argument("--meta-loss", default=None, help=f"meta-loss weighting {list(META_LOSSES)} (default: "
                   "the optimizer's paper choice: simple wdiff, dm sum, rnnprop last)")
    p.add_argument("--meta-grad-clip", type=float, default=None, help="clamp meta-gradient entries to ±value")
    p.add_argument("--backend", default="func", help="unroll backend: func (torch.func) or higher")
    p.add_argument("--meta-batch", type=int, default=1,
                   help="optimizee instances per meta-step, their meta-gradients averaged (unrolled together "
                        "under torch.func.vmap with --backend func, else one after another; "
                        "MetaTrainConfig.meta_batch_mode='auto')")
    p.add_argument("--autocast", default="none",
                   help="mixed precision for the optimizee's forward passes, in meta-training and in every "
                        "evaluation run (learned and baselines alike): none or bfloat16 (torch.autocast; "
                        "parameters, gradients and optimizers stay float32)")
    p.add_argument("--opt-config", default=None, metavar="K=V,...",
                   help="constructor options of the learned optimizer, e.g. output_scale=0.01 or input_norm=rms")
    p.add_argument("--load", default=None, metavar="PATH",
                   help="skip meta-training: load a saved learned optimizer (a file of l2l_zoo.save, or "
                        "zoo:NAME for a pretrained one; python -m l2l_zoo.zoo list)")
    p.add_argument("--finetune", action="store_true",
                   help="Chen et al. §3.4 fine-tuning on the evaluation task before evaluating (5%% "
                        "subsample, until the loss halves, 5 times); baselines then tune their learning "
                        "rate on the same subsample")
    p.add_argument("--eval-steps", type=int, default=1000, help="optimizee steps of each evaluation run")
    p.add_argument("--eval-every", type=int, default=None,
                   help="steps between full train/validation/test evaluations (default eval-steps/20)")
    p.add_argument("--seeds", default="1", help="evaluation seeds: a count N (seeds 0..N-1) or a comma list")
    p.add_argument("--meta-seed", type=int, default=0, help="seed of meta-training (meta-parameter init, data order)")
    p.add_argument("--lr-grid", default="1,0.1,0.01,0.001",
                   help="learning rates tried for each hand-designed optimizer (learning-rate-free ones are not tuned)")
    p.add_argument("--tune-criterion", default="val_loss",
                   help=f"how a baseline's learning rate is chosen on the first seed, one of {list(CRITERIA)}: "
                        "final full validation-set loss (minimised) or accuracy (maximised); never a test metric")
    p.add_argument("--baselines", default=None,
                   help=f"comma list of optimizers to compare with, from {list(BASELINES)}, or 'none' (default: "
                        "the three hand-designed ones for a learned --opt, none otherwise); prodigy (Prodigy) "
                        "and sf-adamw (schedule-free AdamW) run at their authors' settings without tuning")
    p.add_argument("--batch-size", type=int, default=128, help="optimizee minibatch size (at most the training-set size)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--data-dir", default=None,
                   help="dataset folder; must exist if given (default: $L2L_ZOO_DATA, then ./data)")
    p.add_argument("--out", default=None, help="output folder (default results/mnist_mlp/<task>_<opt>[_smooth])")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run in --out: finished runs with the same settings are reused")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def parse_config(argv=None) -> Config:
    a = build_parser().parse_args(argv)
    if a.opt not in LEARNED + BASELINES:
        raise UsageError(f"--opt must be one of {list(LEARNED + BASELINES)}, got {a.opt!r}")
    for flag, val in (("--task", a.task), ("--meta-task", a.meta_task)):
        if val not in TASKS:
            raise UsageError(f"{flag} must be one of {sorted(TASKS)}, got {val!r}")
    smooth = None
    if a.smooth is not None:
        if a.opt in BASELINES:
            raise UsageError(f"--smooth applies to learned optimizers {list(LEARNED)}, not {a.opt!r}")
        try:
            smooth = parse_smooth(a.smooth)
        except ValueError as e:
            raise UsageError(str(e)) from None
    if a.meta_loss is not None and a.meta_loss not in META_LOSSES:
        raise UsageError(f"--meta-loss must be one of {list(META_LOSSES)}, got {a.meta_loss!r}")
    if a.backend not in ("func", "higher"):
        raise UsageError(f"--backend must be func or higher, got {a.backend!r}")
    if a.meta_batch < 1:
        raise UsageError(f"--meta-batch must be an integer >= 1, got {a.meta_batch}")
    autocast_dtype = parse_autocast(a.autocast)
    world = torchrun_world_size()
    if world > 1:  # under torchrun: data-parallel meta-training, meta_batch instances shared out
        if a.opt in BASELINES or a.load is not None:
            raise UsageError(f"under torchrun (WORLD_SIZE={world}) only meta-training runs in parallel: use a "
                             "learned --opt without --load, or run without torchrun")
        if a.meta_batch % world:
            raise UsageError(f"--meta-batch {a.meta_batch} must be a multiple of WORLD_SIZE={world} (each "
                             "process unrolls meta-batch / world-size optimizee instances)")
    if a.meta_batch > 1:
        if a.opt in BASELINES or a.load is not None:
            raise UsageError("--meta-batch applies to meta-training a learned optimizer (not to --opt "
                             f"{a.opt!r}{' with --load' if a.load else ''})")
        per = a.meta_batch // max(world, 1)
        if per > 1 and a.meta_task in TASKS and any(True for _ in TASKS[a.meta_task][1]().buffers()):
            raise UsageError(f"--meta-batch {a.meta_batch}: the meta-task {a.meta_task!r} has BatchNorm buffers, "
                             f"which the {per} instances of a process would share; use --meta-batch 1 (or one "
                             "instance per process under torchrun)")
    if a.tune_criterion not in CRITERIA:
        raise UsageError(f"--tune-criterion must be one of {list(CRITERIA)}, got {a.tune_criterion!r}")
    for flag, val, lo in (("--meta-steps", a.meta_steps, 1), ("--horizon", a.horizon, 1),
                          ("--unroll", a.unroll, 1), ("--eval-steps", a.eval_steps, 1),
                          ("--eval-every", a.eval_every, 1), ("--batch-size", a.batch_size, 1),
                          ("--meta-seed", a.meta_seed, 0)):
        if val is not None and val < lo:
            raise UsageError(f"{flag} must be >= {lo}, got {val}")
    for flag, val in (("--meta-lr", a.meta_lr), ("--meta-grad-clip", a.meta_grad_clip)):
        if val is not None and not (math.isfinite(val) and val > 0):
            raise UsageError(f"{flag} must be a positive number, got {val}")
    if a.baselines is None:
        baselines = list(HAND) if a.opt in LEARNED else []
    elif a.baselines.strip() == "none":
        baselines = []
    else:
        baselines = [b.strip() for b in a.baselines.split(",") if b.strip()]
        bad = [b for b in baselines if b not in BASELINES]
        if bad:
            raise UsageError(f"--baselines must be 'none' or a comma list from {list(BASELINES)}, got {bad}")
    if a.opt in BASELINES:
        baselines = [a.opt] + [b for b in baselines if b != a.opt]
    for b in baselines:
        try:
            base_opts.check(b)  # a missing optional package is reported now, before any work
        except ImportError as e:
            raise UsageError(str(e)) from None
    opt_config = parse_kv(a.opt_config, "--opt-config")
    if opt_config and a.opt in BASELINES:
        raise UsageError("--opt-config applies to learned optimizers only")
    if opt_config:
        try:  # validate the options now, before any data is loaded
            l2l_zoo.create(a.opt, **opt_config)
        except (TypeError, ValueError) as e:
            raise UsageError(f"--opt-config: {e}") from None
    if a.load is not None:
        if a.opt in BASELINES:
            raise UsageError("--load applies to learned optimizers only")
        if not a.load.startswith(ZOO) and not os.path.isfile(a.load):
            raise UsageError(f"--load: no such file {a.load!r} (or zoo:NAME for a pretrained one)")
        try:
            loaded = load_learned(a.load)[0]
        except (ValueError, KeyError, TypeError) as e:
            raise UsageError(f"--load: {e}") from None
        if loaded.name != a.opt:
            raise UsageError(f"--load holds a {loaded.name!r} optimizer but --opt is {a.opt!r}")
    if a.data_dir is not None and not os.path.isdir(a.data_dir):
        raise UsageError(f"--data-dir: no such folder {a.data_dir!r}")
    resolve_device(a.device)  # validates
    tag = f"{a.task}_{a.opt}" + ("_smooth" if smooth else "") + ("_ft" if a.finetune else "")
    return Config(
        opt=a.opt, smooth=a.smooth, task=a.task, meta_task=a.meta_task,
        meta_steps=a.meta_steps or DEFAULT_META_STEPS.get(a.opt, 0), horizon=a.horizon, unroll=a.unroll,
        meta_lr=a.meta_lr, meta_loss=a.meta_loss, meta_grad_clip=a.meta_grad_clip, backend=a.backend,
        meta_batch=a.meta_batch, autocast=autocast_dtype, opt_config=opt_config, load=a.load, finetune=a.finetune, eval_steps=a.eval_steps,
        eval_every=a.eval_every or max(1, a.eval_steps // 20), seeds=parse_seeds(a.seeds),
        meta_seed=a.meta_seed, lr_grid=parse_floats(a.lr_grid, "--lr-grid"), tune_criterion=a.tune_criterion,
        baselines=baselines, batch_size=a.batch_size, device=a.device, data_dir=a.data_dir,
        out=a.out or os.path.join("results", "mnist_mlp", tag), resume=a.resume,
        progress=not a.no_progress)


# ---------------------------------------------------------------------------------- pieces

def learned_label(cfg: Config) -> str:
    return cfg.opt + ("+smooth" if cfg.smooth else "") + ("+ft" if cfg.finetune else "")


# What a --load'ed optimizer depends on: the file's content, and with --finetune what fine-tuning reads
# (the meta-training flags do not apply to it, so changing them must not rerun its evaluations)
FINETUNE_KEYS = ("finetune", "meta_lr", "meta_loss", "unroll", "meta_seed", "smooth", "autocast")


ZOO = l2l_zoo.zoo.LOAD_PREFIX  # --load zoo:NAME: a pretrained optimizer of l2l_zoo.zoo


def load_learned(spec: str):
    """``--load``'s optimizer: (learned optimizer, what it records about itself, SHA-256) for a file
    of ``l2l_zoo.save`` (the file's digest) or ``zoo:NAME`` (the weight file's content digest)."""
    if spec.startswith(ZOO):
        name = spec[len(ZOO):]
        e = l2l_zoo.zoo.entry(name)  # ZooError (a ValueError) names the entries there are
        if e.kind != "shipped":
            raise ValueError(f"zoo entry {name!r} is not a single shipped optimizer (kind {e.kind!r})")
        lopt, prov = l2l_zoo.zoo.read_weights(l2l_zoo.zoo.WEIGHTS_DIR / e.weights)
        return lopt, {"zoo_entry": name, "zoo_measured": e.measured,
                      **{k: prov[k] for k in ("meta_training", "meta_task") if k in prov}}, \
            l2l_zoo.zoo.weights_digest(lopt.name, lopt.config, lopt.state_dict())
    lopt, extra = l2l_zoo.load(spec, with_extra=True)
    return lopt, extra, runs.file_digest(spec)


def meta_identity(cfg: Config) -> dict:
    """Everything the learned optimizer depends on: the meta-training settings, or for a loaded one
    the file's content (plus the fine-tuning settings with ``--finetune``)."""
    if cfg.load:
        keys = ("opt",) + (FINETUNE_KEYS if cfg.finetune else ())
        ident = runs.without_later_defaults({k: getattr(cfg, k) for k in keys})
        ident["load"] = load_learned(cfg.load)[2]
        return ident
    return runs.without_later_defaults({k: getattr(cfg, k) for k in META_KEYS})


def meta_train(cfg: Config, device, log) -> tuple[l2l_zoo.LearnedOptimizer, dict]:
    ident = meta_identity(cfg)
    ckpt = os.path.join(cfg.out, f"metatrain-{runs.config_hash(ident)}.ckpt")
    torch.manual_seed(cfg.meta_seed)
    lopt = l2l_zoo.create(cfg.opt, **cfg.opt_config)  # options validated by parse_config
    meta_task = make_task(cfg.meta_task, data_dir=cfg.data_dir, device=device, batch_size=cfg.batch_size)
    log(f"[data] meta-training data: {meta_task.data.note}")
    mcfg = MetaTrainConfig(meta_steps=cfg.meta_steps, horizon=cfg.horizon, unroll=cfg.unroll,
                           meta_lr=cfg.meta_lr, meta_loss=cfg.meta_loss, backend=cfg.backend,
                           meta_grad_clip=cfg.meta_grad_clip, seed=cfg.meta_seed, meta_batch=cfg.meta_batch,
                           autocast=cfg.autocast,
                           smooth=parse_smooth(cfg.smooth) if cfg.smooth else None)
    world, rank = dist_world()
    if not cfg.resume and os.path.exists(ckpt) and rank == 0:
        os.remove(ckpt)
    if world > 1:
        torch.distributed.barrier()  # nobody reads a checkpoint rank 0 is about to remove
    trainer = MetaTrainer(lopt, meta_task, mcfg, checkpoint_path=ckpt, log=log)
    history = trainer.train(resume=cfg.resume, progress=cfg.progress and rank == 0)
    if world > 1:  # the processes are done with each other: tear the group down together, before
        torch.distributed.barrier()  # rank 0 evaluates alone (no collective timeout can hit it)
        torch.distributed.destroy_process_group()
    info = {"config": trainer.cfg.to_dict(), "num_meta_parameters": lopt.num_meta_parameters(),
            "lopt_config": lopt.config, "history": history, "wall_s": trainer.elapsed,
            "failures": trainer.total_failures, "data": meta_task.data.summary(), "world_size": world}
    if rank == 0:
        l2l_zoo.save(lopt, os.path.join(cfg.out, "optimizer.pt"), meta_training=info["config"],
                     meta_task=cfg.meta_task)
    return lopt, info



def report(results: dict, cfg: Config, log) -> None:
    log(f"\n{'optimizer':<22}{'train loss':>14}{'val loss':>12}{'test loss':>12}{'test acc':>10}{'diverged':>10}"
        f"  (step {cfg.eval_steps})")
    f = lambda v, d=4: "nan" if v is None else f"{v:.{d}g}"  # noqa: E731
    for label, s in results["summary"].items():
        log(f"{label:<22}{f(s.get('train_loss')):>14}{f(s.get('val_loss')):>12}{f(s.get('test_loss')):>12}"
            f"{f(s.get('test_acc'), 3):>10}{s['diverged']:>7}/{s['n_seeds']}")


# ---------------------------------------------------------------------------------- main

def main(argv=None) -> int:
    cfg = parse_config(argv)
    device = resolve_device(cfg.device)

    def worker() -> int:
        meta_train(cfg, device, log=lambda s: None)
        return 0
    # under torchrun: rank 0 owns --out (the lock, results, the checkpoint); the others only meta-train
    return distributed_main(device, cfg.out, lambda: _main(cfg), worker)


def _main(cfg: Config) -> int:
    device = resolve_device(cfg.device)
    from tqdm.auto import tqdm
    log = tqdm.write
    t_start = time.perf_counter()
    task = make_task(cfg.task, data_dir=cfg.data_dir, device=device, batch_size=cfg.batch_size)
    log(f"[data] evaluation data: {task.data.note}")
    log(f"[setup] task {cfg.task} ({task.num_params:,} parameters) on {device}; out: {cfg.out}")
    results = runs.new_results("mnist_mlp", asdict(cfg), data=task.data.summary())
    results["methods"] = {}  # per run label: what it is and how it was tuned (read by benchmarks/leaderboard.py)
    cache = runs.RunCache(os.path.join(cfg.out, "runs"), enabled=cfg.resume)
    eval_setup = {**runs.without_later_defaults({k: getattr(cfg, k) for k in EVAL_KEYS}),
                  "data": task.data.summary()}
    tune_task = task.subsample(0.05, seed=0) if cfg.finetune else task

    def run(name: str, method: dict, make_opt, seed: int, on_task=None) -> dict:
        """One evaluation run, cached under everything it depends on."""
        unit = {**eval_setup, "method": method, "seed": seed, "tune_task": on_task is not None}
        ckpt = os.path.join(cfg.out, "ckpt", f"{name}-seed{seed}-{runs.config_hash(unit)}.pt")
        return cache.run(unit, lambda: train_optimizee(
            on_task or task, make_opt, steps=cfg.eval_steps, seed=seed, eval_every=cfg.eval_every,
            divergence_loss=DIVERGENCE_LOSS, progress=cfg.progress, desc=f"{name} seed {seed}",
            checkpoint=ckpt, checkpoint_every=CHECKPOINT_EVERY, identity=unit, resume=cfg.resume, log=log,
            autocast=cfg.autocast),
            name=f"{name}-seed{seed}")

    # Learned optimizer: meta-train (or load), optionally fine-tune, evaluate on every seed.
    if cfg.opt in LEARNED:
        if cfg.load:
            lopt, extra, digest = load_learned(cfg.load)
            results["meta_training"] = {"loaded_from": cfg.load if cfg.load.startswith(ZOO) else
                                        os.path.abspath(cfg.load), "sha256": digest, **extra}
        else:
            lopt, results["meta_training"] = meta_train(cfg, device, log)
        if cfg.finetune:
            ft_cfg = MetaTrainConfig(meta_lr=cfg.meta_lr, meta_loss=cfg.meta_loss, unroll=cfg.unroll,
                                     seed=cfg.meta_seed, smooth=parse_smooth(cfg.smooth) if cfg.smooth else None,
                                     autocast=cfg.autocast)
            torch.manual_seed(cfg.meta_seed)
            ft = MetaTrainer(lopt, task, ft_cfg, log=log)
            results["finetune"] = ft.finetune(progress=cfg.progress)
            l2l_zoo.save(lopt, os.path.join(cfg.out, "optimizer_finetuned.pt"))
        lopt = lopt.to(device)
        label = learned_label(cfg)
        method = {"learned": meta_identity(cfg)}
        results["runs"][label] = [run(label, method, lambda params: l2l_zoo.LearnedOptimizerAdapter(params, lopt), s)
                                  for s in cfg.seeds]
        results["methods"][label] = {"kind": "learned", "method": method, "tuned": None, "finetuned": cfg.finetune}

    # Hand-designed baselines: tune the learning rate on the first seed (validation split), then run
    # every seed with the chosen one.
    for name in cfg.baselines:
        if name in LR_FREE:  # nothing to tune: every seed at the authors' settings
            ident, label = base_opts.identity(name), f"{name}(lr={base_opts.LR_FREE_SETTINGS[name]['lr']:g})"
            results["runs"][label] = [run(name, ident, base_opts.make(name), s) for s in cfg.seeds]
            results["methods"][label] = {"kind": "learning-rate-free", "method": ident, "tuned": None}
            results["notes"].append(f"{name}: learning-rate-free, run at its authors' settings "
                                    f"{ident['settings']}, not tuned")
            continue
        tuned = runs.tune(cfg.lr_grid, lambda lr: run(f"{name}_lr{lr:g}", base_opts.identity(name, lr),
                                                      base_opts.make(name, lr), cfg.seeds[0],
                                                      on_task=tune_task if cfg.finetune else None),
                          criterion=cfg.tune_criterion,
                          note=f"seed {cfg.seeds[0]}" + (", 5% fine-tuning subsample" if cfg.finetune else ""))
        results["tuning"][name] = tuned.to_dict()
        if tuned.best is None:
            results["notes"].append(f"{name}: every learning rate of the grid diverged; not evaluated")
            log(f"[tune] {name}: every learning rate of {cfg.lr_grid} diverged")
            continue
        best = tuned.best
        ident, label = base_opts.identity(name, best), f"{name}(lr={best:g})"
        results["runs"][label] = [run(f"{name}_lr{best:g}", ident, base_opts.make(name, best), s) for s in cfg.seeds]
        results["methods"][label] = {"kind": "hand-designed", "method": ident, "tuned": name}

    results["summary"] = {label: runs.summarize(recs) for label, recs in results["runs"].items()}
    results["wall_s"] = time.perf_counter() - t_start
    runs.write_json(os.path.join(cfg.out, "results.json"), results)
    plot_curves(os.path.join(cfg.out, "curves.png"), curve_series(results["runs"]),
                title=f"{cfg.task}: {cfg.eval_steps} steps, {len(cfg.seeds)} seed(s)")
    report(results, cfg, log)
    log(f"results: {os.path.join(cfg.out, 'results.json')}  plot: {os.path.join(cfg.out, 'curves.png')}  "
        f"({results['wall_s']:.0f} s)")
    return 0


def curve_series(run_table: dict, metrics=("train_loss", "test_loss", "test_acc")) -> dict:
    """Mean ± std curves per label for :func:`l2l_zoo.cli.plot_curves`."""
    series = {}
    for label, recs in run_table.items():
        s = {}
        for m in metrics:
            x, mean, std = runs.mean_curve(recs, m)
            s.update({"x": x, m: mean, f"{m}_std": std})
        series[label] = s
    return series


if __name__ == "__main__":
    run_main(main)
