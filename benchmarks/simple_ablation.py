#!/usr/bin/env python
"""Ablations of SimpleOptimizer (Chen et al. 2020, §4 "Ablation analysis", Fig. 3): remove one
design choice at a time and compare the learning curves on the base MNIST MLP.

    python benchmarks/simple_ablation.py                         # 4 variants, 1000 evaluation steps
    python benchmarks/simple_ablation.py --eval-steps 10000 --meta-steps 200 --seeds 3

Variants: ``full`` (no bias, mean embedding sharing, weighted-difference meta-loss), ``bias``
(biases added back, Fig. 3a), ``no_aggregation`` (no embedding sharing, Fig. 3b) and ``uniform_loss``
(the DM meta-loss Σ f_i instead of the weighted difference, Fig. 3b). Every variant is one
``benchmarks/mnist_mlp.py`` run (same seeds, data and evaluation protocol, no baselines) in its own
sub-folder of ``--out`` (so ``--resume`` continues an interrupted ablation); a combined JSON and PNG
are written at the end.
"""
from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

import mnist_mlp  # noqa: E402  (each variant is a run of the flagship benchmark)
from l2l_zoo.cli import ArgumentParser, UsageError, plot_curves, read_json, run_main, write_json  # noqa: E402

VARIANTS = {
    "full": [],
    "bias": ["--opt-config", "bias=true"],
    "no_aggregation": ["--opt-config", "aggregation=false"],
    "uniform_loss": ["--meta-loss", "sum"],
}


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list from {list(VARIANTS)}")
    p.add_argument("--meta-steps", type=int, default=200, help="meta-updates per variant")
    p.add_argument("--eval-steps", type=int, default=1000, help="optimizee steps of each evaluation run")
    p.add_argument("--seeds", default="1", help="evaluation seeds: a count or a comma list")
    p.add_argument("--meta-seed", type=int, default=0, help="meta-training seed (the same for every variant)")
    p.add_argument("--smooth", default=None, help="also apply the smoothness regularizer (mnist_mlp.py --smooth)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--data-dir", default=None, help="dataset folder (default $L2L_ZOO_DATA)")
    p.add_argument("--out", default="results/simple_ablation", help="output folder")
    p.add_argument("--resume", action="store_true", help="continue an interrupted ablation")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    a = p.parse_args(argv)
    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad or not variants:
        raise UsageError(f"--variants must be a comma list from {list(VARIANTS)}, got {a.variants!r}")
    series, summary = {}, {}
    for v in variants:
        out = os.path.join(a.out, v)
        args = ["--opt", "simple", "--baselines", "none", "--meta-steps", str(a.meta_steps),
                "--eval-steps", str(a.eval_steps), "--seeds", a.seeds, "--meta-seed", str(a.meta_seed),
                "--device", a.device, "--out", out, *VARIANTS[v]]
        if a.smooth:
            args += ["--smooth", a.smooth]
        if a.data_dir:
            args += ["--data-dir", a.data_dir]
        if a.resume:
            args.append("--resume")
        if a.no_progress:
            args.append("--no-progress")
        print(f"[ablation] {v}: mnist_mlp.py {' '.join(args)}")
        if not (a.resume and os.path.exists(os.path.join(out, "results.json"))):
            mnist_mlp.main(args)
        res = read_json(os.path.join(out, "results.json"))
        (label, runs), = res["runs"].items()
        series[v] = mnist_mlp.mean_curves(runs)
        summary[v] = res["summary"][label]
    write_json(os.path.join(a.out, "results.json"), {"config": vars(a), "variants": VARIANTS,
                                                     "summary": summary, "curves": series})
    plot_curves(os.path.join(a.out, "ablation.png"), series, title="SimpleOptimizer ablations (Chen et al. Fig. 3)")
    print(f"\n{'variant':<18}{'train loss':>14}{'test loss':>12}{'test acc':>10}")
    for v, s in summary.items():
        f = lambda x, d=4: "nan" if x is None else f"{x:.{d}g}"  # noqa: E731
        print(f"{v:<18}{f(s['final_train_loss']):>14}{f(s['final_test_loss']):>12}{f(s['final_test_acc'], 3):>10}")
    print(f"results: {os.path.join(a.out, 'results.json')}")
    return 0


if __name__ == "__main__":
    run_main(main)
