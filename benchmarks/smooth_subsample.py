#!/usr/bin/env python
"""Does evaluating the smoothness penalty on a random subsample of coordinates change results?

    python benchmarks/smooth_subsample.py                      # subsample 4096 vs all, 3 seeds
    python benchmarks/smooth_subsample.py --subsamples 1024,4096,0 --seeds 5

For each subsample size (0 = every coordinate) and each seed, meta-trains a smoothed optimizer
(``--opt``, default SimpleOptimizer, whose mean embedding makes the subsample an approximation; for DM
and RNNProp it is exactly unbiased) on the base MNIST MLP, then trains fresh MLPs with it. Reports the
final training/test loss per setting (mean ± std over seeds), the difference of means against the
seed-to-seed standard deviation, and the meta-step time of each setting. Writes JSON + PNG.
"""
from __future__ import annotations

import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import l2l_zoo  # noqa: E402
from l2l_zoo.cli import (ArgumentParser, UsageError, environment, parse_seeds, read_json,  # noqa: E402
                         resolve_device, run_main, write_json)
from l2l_zoo.evaluation import train_optimizee  # noqa: E402
from l2l_zoo.meta import MetaTrainConfig, MetaTrainer  # noqa: E402
from l2l_zoo.regularizers import parse_smooth  # noqa: E402
from l2l_zoo.tasks import TASKS, make_task  # noqa: E402


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--opt", default="simple", help="learned optimizer: simple, dm or rnnprop")
    p.add_argument("--smooth", default="eps=0.1", help="regularizer spec without subsample (see mnist_mlp.py --help)")
    p.add_argument("--subsamples", default="4096,0", help="comma list of subsample sizes to compare (0 = all)")
    p.add_argument("--task", default="mlp", help=f"meta-training and evaluation task, one of {sorted(TASKS)}")
    p.add_argument("--meta-steps", type=int, default=40, help="meta-updates per meta-training run")
    p.add_argument("--eval-steps", type=int, default=500, help="optimizee steps of each evaluation run")
    p.add_argument("--eval-seeds", type=int, default=2, help="evaluation runs per trained optimizer")
    p.add_argument("--seeds", default="3", help="meta-training seeds: a count or a comma list")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--data-dir", default=None, help="dataset folder (default $L2L_ZOO_DATA)")
    p.add_argument("--out", default="results/smooth_subsample", help="output folder")
    p.add_argument("--resume", action="store_true", help="reuse finished (setting, seed) results in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    a = p.parse_args(argv)
    if a.opt not in ("simple", "dm", "rnnprop"):
        raise UsageError(f"--opt must be simple, dm or rnnprop, got {a.opt!r}")
    if a.task not in TASKS:
        raise UsageError(f"--task must be one of {sorted(TASKS)}, got {a.task!r}")
    if "subsample" in a.smooth:
        raise UsageError("--smooth must not set subsample here: use --subsamples")
    try:
        subs = [int(s) for s in a.subsamples.split(",") if s.strip()]
        if not subs or min(subs) < 0:
            raise ValueError
    except ValueError:
        raise UsageError(f"--subsamples must be a comma list of integers >= 0, got {a.subsamples!r}") from None
    for flag, v in (("--meta-steps", a.meta_steps), ("--eval-steps", a.eval_steps), ("--eval-seeds", a.eval_seeds)):
        if v < 1:
            raise UsageError(f"{flag} must be >= 1, got {v}")
    try:
        parse_smooth(a.smooth)
    except ValueError as e:
        raise UsageError(str(e)) from None
    seeds = parse_seeds(a.seeds)
    device = resolve_device(a.device)
    task = make_task(a.task, data_dir=a.data_dir, device=device)
    print(f"[data] {task.data.note}")
    os.makedirs(a.out, exist_ok=True)
    results = {}
    for sub in subs:
        spec = f"{a.smooth},subsample={sub}"
        for seed in seeds:
            cache = os.path.join(a.out, f"sub{sub}_seed{seed}.json")
            if a.resume and os.path.exists(cache):
                results.setdefault(sub, []).append(read_json(cache))
                continue
            torch.manual_seed(seed)
            lopt = l2l_zoo.create(a.opt)
            cfg = MetaTrainConfig(meta_steps=a.meta_steps, seed=seed, smooth=parse_smooth(spec))
            tr = MetaTrainer(lopt, task, cfg, checkpoint_path=os.path.join(a.out, f"sub{sub}_seed{seed}.ckpt"))
            t0 = time.perf_counter()
            tr.train(resume=a.resume, progress=not a.no_progress)
            meta_s = time.perf_counter() - t0
            lopt.to(device)
            runs = [train_optimizee(task, lambda ps: l2l_zoo.LearnedOptimizerAdapter(ps, lopt), steps=a.eval_steps,
                                    seed=1000 + k, eval_every=a.eval_steps, progress=not a.no_progress)
                    for k in range(a.eval_seeds)]
            ok = [r for r in runs if r["diverged_at"] is None]
            rec = {"subsample": sub, "seed": seed, "meta_step_s": tr.elapsed / max(1, tr.meta_step),
                   "meta_wall_s": meta_s, "diverged": len(runs) - len(ok),
                   "final_train_loss": statistics.mean(r["train_loss"][-1] for r in ok) if ok else None,
                   "final_test_loss": statistics.mean(r["test_loss"][-1] for r in ok) if ok else None,
                   "final_test_acc": statistics.mean(r["test_acc"][-1] for r in ok) if ok else None}
            write_json(cache, rec)
            results.setdefault(sub, []).append(rec)

    def ms(vals):
        vals = [v for v in vals if v is not None]
        if not vals:
            return None, None
        return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)

    summary = {}
    print(f"\n{'subsample':>10}{'train loss':>22}{'test loss':>22}{'test acc':>18}{'s/meta-step':>13}")
    for sub, recs in results.items():
        s = {k: ms([r[k] for r in recs]) for k in ("final_train_loss", "final_test_loss", "final_test_acc", "meta_step_s")}
        summary[str(sub)] = s
        fmt = lambda t, d=4: "n/a" if t[0] is None else f"{t[0]:.{d}g} ± {t[1]:.2g}"  # noqa: E731
        print(f"{('all' if sub == 0 else sub):>10}{fmt(s['final_train_loss']):>22}{fmt(s['final_test_loss']):>22}"
              f"{fmt(s['final_test_acc'], 3):>18}{s['meta_step_s'][0]:>13.2f}")
    if len(subs) >= 2:
        a0, b0 = summary[str(subs[0])], summary[str(subs[-1])]
        if a0["final_train_loss"][0] is not None and b0["final_train_loss"][0] is not None:
            diff = a0["final_train_loss"][0] - b0["final_train_loss"][0]
            noise = max(a0["final_train_loss"][1], b0["final_train_loss"][1])
            verdict = "within" if abs(diff) <= noise else "OUTSIDE"
            print(f"difference of mean final train loss ({subs[0]} vs {subs[-1]}): {diff:+.4g}; "
                  f"seed std {noise:.4g}: {verdict} seed noise")
            summary["difference"] = {"train_loss_diff": diff, "seed_std": noise, "within_noise": abs(diff) <= noise}
    write_json(os.path.join(a.out, "results.json"), {"config": vars(a), "environment": environment(),
                                                     "data": task.data.summary(), "runs": results,
                                                     "summary": summary})
    plot(summary, subs, os.path.join(a.out, "subsample.png"))
    print(f"results: {os.path.join(a.out, 'results.json')}")
    return 0


def plot(summary, subs, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    labels = ["all" if s == 0 else str(s) for s in subs]
    for ax, key in zip(axes, ("final_train_loss", "final_test_loss")):
        means = [summary[str(s)][key][0] or float("nan") for s in subs]
        stds = [summary[str(s)][key][1] or 0.0 for s in subs]
        ax.bar(labels, means, yerr=stds, capsize=4, color="tab:blue", alpha=0.7)
        ax.set_xlabel("coordinates in the penalty")
        ax.set_ylabel(key.replace("_", " "))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    run_main(main)
