#!/usr/bin/env python
"""Meta-train a learned optimizer on the MNIST MLP, evaluate it far beyond its training horizon,
and compare it with hand-designed optimizers tuned on the same task.

    python benchmarks/mnist_mlp.py --opt simple --smooth eps=0.1          # the flagship run
    python benchmarks/mnist_mlp.py --opt simple --eval-steps 10000        # long-horizon check
    python benchmarks/mnist_mlp.py --opt dm --meta-steps 40 --baselines none
    python benchmarks/mnist_mlp.py --opt adam --task lenet                # a tuned baseline alone
    python benchmarks/mnist_mlp.py --opt simple --load results/.../optimizer.pt --task lenet --finetune

Protocol (Chen et al. 2020 §4; smoothness paper §5.1): the learned optimizer is meta-trained on the
base MLP 784→500→10 (``--meta-task``) with runs of ``--horizon`` 200 optimizee steps cut into
truncations of ``--unroll`` 20, Adam on the meta-parameters; then it trains freshly initialised
models of ``--task`` for ``--eval-steps`` steps (default 1000, 5× the training horizon) through the
``torch.optim`` adapter. Hand-designed baselines (SGD, SGD with momentum 0.9, Adam) get the best
learning rate of ``--lr-grid`` (Chen et al.: {1, 0.1, 0.01, 0.001}), chosen by the final training-set
loss on the first seed, and are then run on every seed with the same initialisations and minibatch
order as the learned optimizer.

Outputs in ``--out``: ``results.json`` (full config, environment, data provenance, meta-training
history, per-step minibatch loss and periodic full train/test loss and accuracy of every run, wall
times, summary), ``curves.png``, the trained ``optimizer.pt`` (``l2l_zoo.load`` reads it), the
meta-training checkpoint, and one cached JSON per finished run so that ``--resume`` loses nothing.
"""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import l2l_zoo  # noqa: E402
from l2l_zoo.cli import (ArgumentParser, RunCache, UsageError, environment, parse_floats,  # noqa: E402
                         parse_kv, parse_seeds, plot_curves, resolve_device, run_main, write_json)
from l2l_zoo.evaluation import train_optimizee  # noqa: E402
from l2l_zoo.meta import META_LOSSES, MetaTrainConfig, MetaTrainer  # noqa: E402
from l2l_zoo.regularizers import parse_smooth  # noqa: E402
from l2l_zoo.tasks import TASKS, make_task  # noqa: E402

LEARNED = ("simple", "dm", "rnnprop")
HAND = ("sgd", "sgdm", "adam")
# Meta-steps that fit the default run into ~10 minutes on 2 CPU cores (the per-meta-step cost on
# the 397,510-coordinate MLP is ~1.5 s for SimpleOptimizer and ~15-20x more for the LSTMs).
DEFAULT_META_STEPS = {"simple": 200, "dm": 20, "rnnprop": 20}


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
    opt_config: dict
    load: str | None
    finetune: bool
    eval_steps: int
    eval_every: int
    seeds: list
    meta_seed: int
    lr_grid: list
    baselines: list
    batch_size: int
    device: str
    data_dir: str | None
    out: str
    resume: bool
    progress: bool


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n\n")[0], epilog="See the module docstring for the protocol.")
    p.add_argument("--opt", required=True, help=f"optimizer to evaluate: learned {list(LEARNED)} or "
                   f"hand-designed {list(HAND)}")
    p.add_argument("--smooth", default=None, metavar="SPEC",
                   help="smoothness regularizer for meta-training: eps=E[,lam=L,steps=K,step_size=S,"
                        "noise=N,subsample=M]; omitted keys take the defaults lam=1, steps=10, "
                        "step_size=eps/5, noise=0.05, subsample=4096 (0 = all coordinates)")
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
    p.add_argument("--opt-config", default=None, metavar="K=V,...",
                   help="constructor options of the learned optimizer, e.g. output_scale=0.01 or input_norm=rms")
    p.add_argument("--load", default=None, metavar="PATH", help="skip meta-training: load a saved learned optimizer")
    p.add_argument("--finetune", action="store_true",
                   help="Chen et al. §3.4 fine-tuning on the evaluation task before evaluating (5%% "
                        "subsample, until the loss halves, 5 times); baselines then tune their learning "
                        "rate on the same subsample")
    p.add_argument("--eval-steps", type=int, default=1000, help="optimizee steps of each evaluation run")
    p.add_argument("--eval-every", type=int, default=None,
                   help="steps between full train/test evaluations (default eval-steps/20)")
    p.add_argument("--seeds", default="1", help="evaluation seeds: a count N (seeds 0..N-1) or a comma list")
    p.add_argument("--meta-seed", type=int, default=0, help="seed of meta-training (meta-parameter init, data order)")
    p.add_argument("--lr-grid", default="1,0.1,0.01,0.001", help="learning rates tried for each hand-designed optimizer")
    p.add_argument("--baselines", default=None,
                   help="comma list of hand-designed optimizers to compare with, or 'none' (default: all "
                        "three for a learned --opt, none otherwise)")
    p.add_argument("--batch-size", type=int, default=128, help="optimizee minibatch size")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--data-dir", default=None, help="dataset folder (default: $L2L_ZOO_DATA, then ./data)")
    p.add_argument("--out", default=None, help="output folder (default results/mnist_mlp/<task>_<opt>[_smooth])")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def parse_config(argv=None) -> Config:
    a = build_parser().parse_args(argv)
    if a.opt not in LEARNED + HAND:
        raise UsageError(f"--opt must be one of {list(LEARNED + HAND)}, got {a.opt!r}")
    for flag, val in (("--task", a.task), ("--meta-task", a.meta_task)):
        if val not in TASKS:
            raise UsageError(f"{flag} must be one of {sorted(TASKS)}, got {val!r}")
    smooth = None
    if a.smooth is not None:
        if a.opt in HAND:
            raise UsageError(f"--smooth applies to learned optimizers {list(LEARNED)}, not {a.opt!r}")
        try:
            smooth = parse_smooth(a.smooth)
        except ValueError as e:
            raise UsageError(str(e)) from None
    if a.meta_loss is not None and a.meta_loss not in META_LOSSES:
        raise UsageError(f"--meta-loss must be one of {list(META_LOSSES)}, got {a.meta_loss!r}")
    if a.backend not in ("func", "higher"):
        raise UsageError(f"--backend must be func or higher, got {a.backend!r}")
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
        bad = [b for b in baselines if b not in HAND]
        if bad:
            raise UsageError(f"--baselines must be 'none' or a comma list from {list(HAND)}, got {bad}")
    if a.opt in HAND:
        baselines = [a.opt] + [b for b in baselines if b != a.opt]
    opt_config = parse_kv(a.opt_config, "--opt-config")
    if opt_config and a.opt in HAND:
        raise UsageError("--opt-config applies to learned optimizers only")
    if opt_config:
        try:  # validate the options now, before any data is loaded
            l2l_zoo.create(a.opt, **opt_config)
        except (TypeError, ValueError) as e:
            raise UsageError(f"--opt-config: {e}") from None
    if a.load is not None and not os.path.isfile(a.load):
        raise UsageError(f"--load: no such file {a.load!r}")
    resolve_device(a.device)  # validates
    tag = f"{a.task}_{a.opt}" + ("_smooth" if smooth else "") + ("_ft" if a.finetune else "")
    return Config(
        opt=a.opt, smooth=a.smooth, task=a.task, meta_task=a.meta_task,
        meta_steps=a.meta_steps or DEFAULT_META_STEPS.get(a.opt, 0), horizon=a.horizon, unroll=a.unroll,
        meta_lr=a.meta_lr, meta_loss=a.meta_loss, meta_grad_clip=a.meta_grad_clip, backend=a.backend,
        opt_config=opt_config, load=a.load, finetune=a.finetune, eval_steps=a.eval_steps,
        eval_every=a.eval_every or max(1, a.eval_steps // 20), seeds=parse_seeds(a.seeds),
        meta_seed=a.meta_seed, lr_grid=parse_floats(a.lr_grid, "--lr-grid"), baselines=baselines,
        batch_size=a.batch_size, device=a.device, data_dir=a.data_dir,
        out=a.out or os.path.join("results", "mnist_mlp", tag), resume=a.resume,
        progress=not a.no_progress)


# ---------------------------------------------------------------------------------- pieces

def hand_optimizer(name: str, lr: float):
    if name == "sgd":
        return lambda params: torch.optim.SGD(params, lr=lr)
    if name == "sgdm":
        return lambda params: torch.optim.SGD(params, lr=lr, momentum=0.9)
    return lambda params: torch.optim.Adam(params, lr=lr)


def final_loss(run: dict) -> float:
    """Final full training-set loss; +inf for a diverged run (so it is never selected)."""
    if run["diverged_at"] is not None or run["train_loss"][-1] is None:
        return math.inf
    return run["train_loss"][-1]


def meta_train(cfg: Config, device, log) -> tuple[l2l_zoo.LearnedOptimizer, dict]:
    ckpt = os.path.join(cfg.out, "metatrain.ckpt")
    torch.manual_seed(cfg.meta_seed)
    lopt = l2l_zoo.create(cfg.opt, **cfg.opt_config)  # options validated by parse_config
    meta_task = make_task(cfg.meta_task, data_dir=cfg.data_dir, device=device, batch_size=cfg.batch_size)
    log(f"[data] meta-training data: {meta_task.data.note}")
    mcfg = MetaTrainConfig(meta_steps=cfg.meta_steps, horizon=cfg.horizon, unroll=cfg.unroll,
                           meta_lr=cfg.meta_lr, meta_loss=cfg.meta_loss, backend=cfg.backend,
                           meta_grad_clip=cfg.meta_grad_clip, seed=cfg.meta_seed,
                           smooth=parse_smooth(cfg.smooth) if cfg.smooth else None)
    if not cfg.resume and os.path.exists(ckpt):
        os.remove(ckpt)
    trainer = MetaTrainer(lopt, meta_task, mcfg, checkpoint_path=ckpt, log=log)
    history = trainer.train(resume=cfg.resume, progress=cfg.progress)
    info = {"config": trainer.cfg.to_dict(), "num_meta_parameters": lopt.num_meta_parameters(),
            "lopt_config": lopt.config, "history": history, "wall_s": trainer.elapsed,
            "failures": trainer.total_failures, "data": meta_task.data.summary()}
    l2l_zoo.save(lopt, os.path.join(cfg.out, "optimizer.pt"), meta_training=info["config"],
                 meta_task=cfg.meta_task)
    return lopt, info


def summarize(runs: list[dict]) -> dict:
    def stat(key):
        vals = [r[key][-1] for r in runs if r["diverged_at"] is None and r[key][-1] is not None]
        if not vals:
            return None, None
        return float(np.mean(vals)), float(np.std(vals))

    out = {"n_seeds": len(runs), "diverged": sum(r["diverged_at"] is not None for r in runs),
           "steps": runs[0]["steps"] if runs else None,  # the horizon (a diverged run stops earlier)
           "wall_s_mean": float(np.mean([r["wall_s"] for r in runs]))}
    for key in ("train_loss", "train_acc", "test_loss", "test_acc"):
        out[f"final_{key}"], out[f"final_{key}_std"] = stat(key)
    return out


def mean_curves(runs: list[dict]) -> dict:
    ok = [r for r in runs if r["diverged_at"] is None] or runs
    n = min(len(r["eval_steps"]) for r in ok)
    series = {"x": ok[0]["eval_steps"][:n]}
    for key in ("train_loss", "test_loss", "test_acc"):
        arr = np.array([[np.nan if v is None else v for v in r[key][:n]] for r in ok], dtype=float)
        series[key] = [None if np.isnan(v) else float(v) for v in np.nanmean(arr, 0)]
        series[f"{key}_std"] = [0.0 if np.isnan(v) else float(v) for v in np.nanstd(arr, 0)]
    return series


# ---------------------------------------------------------------------------------- main

def main(argv=None) -> int:
    cfg = parse_config(argv)
    device = resolve_device(cfg.device)
    os.makedirs(cfg.out, exist_ok=True)
    from tqdm.auto import tqdm
    log = tqdm.write
    t_start = time.perf_counter()
    task = make_task(cfg.task, data_dir=cfg.data_dir, device=device, batch_size=cfg.batch_size)
    log(f"[data] evaluation data: {task.data.note}")
    log(f"[setup] task {cfg.task} ({task.num_params:,} parameters) on {device}; out: {cfg.out}")
    signature = {k: v for k, v in asdict(cfg).items() if k not in ("resume", "progress", "out", "device")}
    cache = RunCache(os.path.join(cfg.out, "runs"), signature, cfg.resume)
    result = {"config": asdict(cfg), "environment": environment(), "data": task.data.summary(),
              "runs": {}, "tuning": {}, "summary": {}}
    tune_task = task.subsample(0.05, seed=0) if cfg.finetune else task

    def run(label, make_opt, seed, on_task=None):
        key = f"{label}_seed{seed}" + ("_tune" if on_task is not None else "")
        cached = cache.get(key)
        if cached is not None:
            return cached
        r = train_optimizee(on_task or task, make_opt, steps=cfg.eval_steps, seed=seed,
                            eval_every=cfg.eval_every, progress=cfg.progress, desc=f"{label} seed {seed}")
        cache.put(key, r)
        return r

    # Learned optimizer: meta-train (or load), optionally fine-tune, evaluate on every seed.
    if cfg.opt in LEARNED:
        if cfg.load:
            lopt, extra = l2l_zoo.load(cfg.load, with_extra=True)
            if lopt.name != cfg.opt:
                raise UsageError(f"--load holds a {lopt.name!r} optimizer but --opt is {cfg.opt!r}")
            result["meta_training"] = {"loaded_from": os.path.abspath(cfg.load), **extra}
        else:
            lopt, result["meta_training"] = meta_train(cfg, device, log)
        label = cfg.opt + ("+smooth" if cfg.smooth else "") + ("+ft" if cfg.finetune else "")
        if cfg.finetune:
            ft_cfg = MetaTrainConfig(meta_lr=cfg.meta_lr, meta_loss=cfg.meta_loss, unroll=cfg.unroll,
                                     seed=cfg.meta_seed, smooth=parse_smooth(cfg.smooth) if cfg.smooth else None)
            torch.manual_seed(cfg.meta_seed)
            ft = MetaTrainer(lopt, task, ft_cfg, log=log)
            result["finetune"] = ft.finetune(progress=cfg.progress)
            l2l_zoo.save(lopt, os.path.join(cfg.out, "optimizer_finetuned.pt"))
        lopt = lopt.to(device)
        runs = [run(label, lambda params: l2l_zoo.LearnedOptimizerAdapter(params, lopt), s) for s in cfg.seeds]
        result["runs"][label] = runs
        result["summary"][label] = summarize(runs)

    # Hand-designed baselines: tune the learning rate on the first seed, then run every seed.
    for name in cfg.baselines:
        scores = {}
        for lr in cfg.lr_grid:
            r = run(f"{name}_lr{lr:g}", hand_optimizer(name, lr), cfg.seeds[0],
                    on_task=tune_task if cfg.finetune else None)
            scores[f"{lr:g}"] = final_loss(r)
        best = min(cfg.lr_grid, key=lambda lr: scores[f"{lr:g}"])
        result["tuning"][name] = {"final_train_loss_by_lr": scores, "best_lr": best,
                                  "criterion": "final full training-set loss, seed "
                                               f"{cfg.seeds[0]}" + (" on the 5% subsample" if cfg.finetune else "")}
        label = f"{name}(lr={best:g})"
        runs = [run(f"{name}_lr{best:g}", hand_optimizer(name, best), s) for s in cfg.seeds]
        result["runs"][label] = runs
        result["summary"][label] = summarize(runs)

    result["wall_s_total"] = time.perf_counter() - t_start
    write_json(os.path.join(cfg.out, "results.json"), result)
    plot_curves(os.path.join(cfg.out, "curves.png"), {k: mean_curves(v) for k, v in result["runs"].items()},
                title=f"{cfg.task}: {cfg.eval_steps} steps, {len(cfg.seeds)} seed(s)")

    # Report.
    log(f"\n{'optimizer':<22}{'train loss':>14}{'test loss':>14}{'test acc':>10}{'diverged':>10}  (step {cfg.eval_steps})")
    for label, s in result["summary"].items():
        f = lambda v, d=4: "nan" if v is None else f"{v:.{d}g}"  # noqa: E731
        log(f"{label:<22}{f(s['final_train_loss']):>14}{f(s['final_test_loss']):>14}"
            f"{f(s['final_test_acc'], 3):>10}{s['diverged']:>7}/{s['n_seeds']}")
    log(f"results: {os.path.join(cfg.out, 'results.json')}  plot: {os.path.join(cfg.out, 'curves.png')}  "
        f"({result['wall_s_total']:.0f} s)")
    return 0


if __name__ == "__main__":
    run_main(main)
