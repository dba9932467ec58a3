#!/usr/bin/env python
"""Does evaluating the smoothness penalty on a random subsample of coordinates change results?

    python benchmarks/smooth_subsample.py                      # subsample 4096 vs all, 3 seeds
    python benchmarks/smooth_subsample.py --subsamples 1024,4096,0 --seeds 5

For each subsample size (0 = every coordinate) and each seed, meta-trains a smoothed optimizer
(``--opt``, default SimpleOptimizer, whose mean embedding makes the subsample an approximation; for DM
and RNNProp it is exactly unbiased) on the base MNIST MLP, then trains fresh MLPs with it. Reports the
final training/test loss per setting (mean ± std over seeds), the difference of means against the
seed-to-seed standard deviation, and the meta-step time of each setting. Writes a results JSON (the
``l2l_zoo.runs`` schema: one label per subsample size, one record per meta-training seed) and a PNG.
With ``--resume``, finished (setting, seed) pairs whose full settings match are reused (the run cache
keys on every flag that affects the result) and an interrupted meta-training continues from its
checkpoint.
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import l2l_zoo  # noqa: E402
from l2l_zoo import runs  # noqa: E402
from l2l_zoo.cli import (ArgumentParser, UsageError, output_folder, parse_seeds, resolve_device,  # noqa: E402
                         run_main)
from l2l_zoo.evaluation import train_optimizee  # noqa: E402
from l2l_zoo.meta import MetaTrainConfig, MetaTrainer  # noqa: E402
from l2l_zoo.regularizers import parse_smooth  # noqa: E402
from l2l_zoo.tasks import TASKS, make_task  # noqa: E402

LEARNED = ("simple", "dm", "rnnprop")


@dataclass
class Config:
    opt: str
    smooth: str
    subsamples: list
    task: str
    meta_steps: int
    eval_steps: int
    eval_seeds: int
    seeds: list
    device: str
    data_dir: str | None
    out: str
    resume: bool
    progress: bool


def parse_config(argv=None) -> Config:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--opt", default="simple", help=f"learned optimizer, one of {list(LEARNED)}")
    p.add_argument("--smooth", default="eps=0.1", help="regularizer spec without subsample (see mnist_mlp.py --help)")
    p.add_argument("--subsamples", default="4096,0", help="comma list of subsample sizes to compare (0 = all)")
    p.add_argument("--task", default="mlp", help=f"meta-training and evaluation task, one of {sorted(TASKS)}")
    p.add_argument("--meta-steps", type=int, default=40, help="meta-updates per meta-training run")
    p.add_argument("--eval-steps", type=int, default=500, help="optimizee steps of each evaluation run")
    p.add_argument("--eval-seeds", type=int, default=2, help="evaluation runs per trained optimizer")
    p.add_argument("--seeds", default="3", help="meta-training seeds: a count or a comma list")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--data-dir", default=None, help="dataset folder; must exist if given (default $L2L_ZOO_DATA)")
    p.add_argument("--out", default="results/smooth_subsample", help="output folder")
    p.add_argument("--resume", action="store_true",
                   help="reuse finished (setting, seed) results in --out that were computed with the same settings")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    a = p.parse_args(argv)
    if a.opt not in LEARNED:
        raise UsageError(f"--opt must be one of {list(LEARNED)}, got {a.opt!r}")
    if a.task not in TASKS:
        raise UsageError(f"--task must be one of {sorted(TASKS)}, got {a.task!r}")
    try:
        spec = parse_smooth(a.smooth)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if any(item.split("=")[0].strip() == "subsample" for item in a.smooth.split(",")):
        raise UsageError("--smooth must not set subsample here: use --subsamples")
    try:
        subs = [int(s) for s in a.subsamples.split(",") if s.strip()]
        if not subs or min(subs) < 0 or len(set(subs)) != len(subs):
            raise ValueError
    except ValueError:
        raise UsageError(f"--subsamples must be a comma list of distinct integers >= 0, got {a.subsamples!r}") from None
    for flag, v in (("--meta-steps", a.meta_steps), ("--eval-steps", a.eval_steps), ("--eval-seeds", a.eval_seeds)):
        if v < 1:
            raise UsageError(f"{flag} must be >= 1, got {v}")
    if a.data_dir is not None and not os.path.isdir(a.data_dir):
        raise UsageError(f"--data-dir: no such folder {a.data_dir!r}")
    resolve_device(a.device)
    del spec
    return Config(opt=a.opt, smooth=a.smooth, subsamples=subs, task=a.task, meta_steps=a.meta_steps,
                  eval_steps=a.eval_steps, eval_seeds=a.eval_seeds, seeds=parse_seeds(a.seeds), device=a.device,
                  data_dir=a.data_dir, out=a.out, resume=a.resume, progress=not a.no_progress)


def one_setting(cfg: Config, task, sub: int, seed: int, unit: dict) -> dict:
    """Meta-train with penalty subsample ``sub`` from ``seed``, then train fresh models with it."""
    torch.manual_seed(seed)
    lopt = l2l_zoo.create(cfg.opt)
    mcfg = MetaTrainConfig(meta_steps=cfg.meta_steps, seed=seed, smooth=parse_smooth(f"{cfg.smooth},subsample={sub}"))
    ckpt = os.path.join(cfg.out, "ckpt", f"sub{sub}-seed{seed}-{runs.config_hash(unit)}.ckpt")
    tr = MetaTrainer(lopt, task, mcfg, checkpoint_path=ckpt)
    t0 = time.perf_counter()
    tr.train(resume=cfg.resume, progress=cfg.progress)
    meta_s = time.perf_counter() - t0
    lopt.to(task.device)
    evals = [train_optimizee(task, lambda ps: l2l_zoo.LearnedOptimizerAdapter(ps, lopt), steps=cfg.eval_steps,
                             seed=1000 + k, eval_every=cfg.eval_steps, progress=cfg.progress)
             for k in range(cfg.eval_seeds)]
    ok = [r for r in evals if r["diverged_at"] is None]
    final = None
    if ok:
        final = {k: statistics.mean(r["final"][k] for r in ok)
                 for k in ("train_loss", "val_loss", "test_loss", "test_acc")}
        final["meta_step_s"] = tr.elapsed / max(1, tr.meta_step)
    rec = runs.new_record(cfg.eval_steps, seed=seed, subsample=sub, meta_wall_s=meta_s,
                          eval_diverged=len(evals) - len(ok), evaluation_runs=evals)
    rec["final"], rec["wall_s"] = final, meta_s + sum(r["wall_s"] for r in evals)
    if not ok:
        rec["diverged_at"], rec["error"] = evals[0]["diverged_at"], "every evaluation run diverged"
    if os.path.exists(ckpt):
        os.remove(ckpt)
    return rec


def main(argv=None) -> int:
    cfg = parse_config(argv)
    with output_folder(cfg.out):
        return _main(cfg)


def _main(cfg: Config) -> int:
    device = resolve_device(cfg.device)
    task = make_task(cfg.task, data_dir=cfg.data_dir, device=device)
    print(f"[data] {task.data.note}")
    results = runs.new_results("smooth_subsample", asdict(cfg), data=task.data.summary())
    cache = runs.RunCache(os.path.join(cfg.out, "runs"), enabled=cfg.resume)
    setup = {k: v for k, v in asdict(cfg).items() if k not in ("subsamples", "seeds", "out", "resume", "progress")}
    setup["data"] = task.data.summary()
    for sub in cfg.subsamples:
        label = "all" if sub == 0 else str(sub)
        for seed in cfg.seeds:
            unit = {**setup, "subsample": sub, "seed": seed}
            rec = cache.run(unit, lambda: one_setting(cfg, task, sub, seed, unit), name=f"sub{sub}-seed{seed}")
            results["runs"].setdefault(label, []).append(rec)
    results["summary"] = {label: runs.summarize(recs) for label, recs in results["runs"].items()}

    print(f"\n{'subsample':>10}{'train loss':>22}{'test loss':>22}{'test acc':>18}{'s/meta-step':>13}")
    fmt = lambda m, s, d=4: "n/a" if s is None or s.get(m) is None else f"{s[m]:.{d}g} ± {s[m + '_std']:.2g}"  # noqa: E731
    for label, s in results["summary"].items():
        print(f"{label:>10}{fmt('train_loss', s):>22}{fmt('test_loss', s):>22}{fmt('test_acc', s, 3):>18}"
              f"{(s.get('meta_step_s') or float('nan')):>13.2f}")
    labels = list(results["summary"])
    if len(labels) >= 2:
        a0, b0 = results["summary"][labels[0]], results["summary"][labels[-1]]
        if a0.get("train_loss") is not None and b0.get("train_loss") is not None:
            diff = a0["train_loss"] - b0["train_loss"]
            noise = max(a0["train_loss_std"], b0["train_loss_std"])
            verdict = "within" if abs(diff) <= noise else "OUTSIDE"
            print(f"difference of mean final train loss ({labels[0]} vs {labels[-1]}): {diff:+.4g}; "
                  f"seed std {noise:.4g}: {verdict} seed noise")
            results["difference"] = {"pair": [labels[0], labels[-1]], "train_loss_diff": diff,
                                     "seed_std": noise, "within_noise": abs(diff) <= noise}
    runs.write_json(os.path.join(cfg.out, "results.json"), results)
    plot(results["summary"], os.path.join(cfg.out, "subsample.png"))
    print(f"results: {os.path.join(cfg.out, 'results.json')}")
    return 0


def plot(summary, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    labels = list(summary)
    for ax, key in zip(axes, ("train_loss", "test_loss")):
        means = [summary[k].get(key) or float("nan") for k in labels]
        stds = [summary[k].get(f"{key}_std") or 0.0 for k in labels]
        ax.bar(labels, means, yerr=stds, capsize=4, color="tab:blue", alpha=0.7)
        ax.set_xlabel("coordinates in the penalty")
        ax.set_ylabel(key.replace("_", " "))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    run_main(main)
