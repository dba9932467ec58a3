#!/usr/bin/env python
"""Ablations of SimpleOptimizer (Chen et al. 2020, §4 "Ablation analysis", Fig. 3): remove one
design choice at a time and compare the learning curves on the base MNIST MLP (or, with
``--meta-task``/``--task``, on another of the project's tasks: does a finding hold beyond one task?).

    python benchmarks/simple_ablation.py --seeds 3               # 4 variants, 1000 evaluation steps
    python benchmarks/simple_ablation.py --eval-steps 10000 --meta-steps 200
    python benchmarks/simple_ablation.py --meta-task lenet --task lenet --variants full,uniform_loss --seeds 3

Variants: ``full`` (no bias, mean embedding sharing, weighted-difference meta-loss), ``bias``
(biases added back, Fig. 3a), ``no_aggregation`` (no embedding sharing, Fig. 3b) and ``uniform_loss``
(the DM meta-loss Σ f_i instead of the weighted difference, Fig. 3b). Every variant is one
``benchmarks/mnist_mlp.py`` run (same seeds, data and evaluation protocol, no baselines) in its own
sub-folder of ``--out``; with ``--resume`` each variant continues from what it finished, through
``mnist_mlp.py``'s own run cache and checkpoints, which key on the full settings (so a resumed ablation
never reuses a result computed under other settings). A combined results JSON (the ``l2l_zoo.runs``
schema, every variant's runs under its name) and PNG are written at the end.
"""
from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

import mnist_mlp  # noqa: E402  (each variant is a run of the flagship benchmark)
from l2l_zoo import runs  # noqa: E402
from l2l_zoo.cli import ArgumentParser, UsageError, output_folder, parse_seeds, plot_curves, run_main  # noqa: E402

VARIANTS = {
    "full": [],
    "bias": ["--opt-config", "bias=true"],
    "no_aggregation": ["--opt-config", "aggregation=false"],
    "uniform_loss": ["--meta-loss", "sum"],
}


def variant_args(a, v: str) -> list[str]:
    args = ["--opt", "simple", "--baselines", "none", "--meta-steps", str(a.meta_steps),
            "--meta-task", a.meta_task, "--task", a.task,
            "--eval-steps", str(a.eval_steps), "--seeds", a.seeds, "--meta-seed", str(a.meta_seed),
            "--device", a.device, "--out", os.path.join(a.out, v), *VARIANTS[v]]
    if a.smooth:
        args += ["--smooth", a.smooth]
    if a.data_dir:
        args += ["--data-dir", a.data_dir]
    if a.resume:
        args.append("--resume")
    if a.no_progress:
        args.append("--no-progress")
    return args


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list from {list(VARIANTS)}")
    p.add_argument("--meta-steps", type=int, default=mnist_mlp.DEFAULT_META_STEPS["simple"],
                   help="meta-updates per variant (default: the flagship's, %(default)s)")
    p.add_argument("--meta-task", default="mlp", help="task every variant is meta-trained on (mnist_mlp.py --meta-task)")
    p.add_argument("--task", default="mlp", help="task every variant is evaluated on (mnist_mlp.py --task)")
    p.add_argument("--eval-steps", type=int, default=1000, help="optimizee steps of each evaluation run")
    p.add_argument("--seeds", default="1", help="evaluation seeds: a count or a comma list")
    p.add_argument("--meta-seed", type=int, default=0, help="meta-training seed (the same for every variant)")
    p.add_argument("--smooth", default=None, help="also apply the smoothness regularizer (mnist_mlp.py --smooth)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--data-dir", default=None, help="dataset folder (default $L2L_ZOO_DATA)")
    p.add_argument("--out", default="results/simple_ablation", help="output folder")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted ablation (finished runs with the same settings are reused)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    a = p.parse_args(argv)
    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad or not variants or len(set(variants)) != len(variants):
        raise UsageError(f"--variants must be a comma list of distinct names from {list(VARIANTS)}, got {a.variants!r}")
    parse_seeds(a.seeds)
    # every variant's flags are validated before anything runs
    for v in variants:
        mnist_mlp.parse_config(variant_args(a, v))
    with output_folder(a.out):
        results = runs.new_results("simple_ablation", vars(a))
        results["variants"] = {v: VARIANTS[v] for v in variants}
        for v in variants:
            args = variant_args(a, v)
            print(f"[ablation] {v}: mnist_mlp.py {' '.join(args)}")
            mnist_mlp.main(args)
            res = runs.read_results(os.path.join(a.out, v, "results.json"), benchmark="mnist_mlp")
            (label, recs), = res["runs"].items()
            results["runs"][v] = recs
            results["summary"][v] = res["summary"][label]
            results.setdefault("meta_training", {})[v] = res.get("meta_training")
        runs.write_json(os.path.join(a.out, "results.json"), results)
        plot_curves(os.path.join(a.out, "ablation.png"), mnist_mlp.curve_series(results["runs"]),
                    title=f"SimpleOptimizer ablations (Chen et al. Fig. 3): meta-trained on {a.meta_task}, "
                          f"evaluated on {a.task}")
    print(f"\n{'variant':<18}{'train loss':>14}{'test loss':>12}{'test acc':>10}")
    for v, s in results["summary"].items():
        f = lambda x, d=4: "nan" if x is None else f"{x:.{d}g}"  # noqa: E731
        print(f"{v:<18}{f(s.get('train_loss')):>14}{f(s.get('test_loss')):>12}{f(s.get('test_acc'), 3):>10}")
    print(f"results: {os.path.join(a.out, 'results.json')}")
    return 0


if __name__ == "__main__":
    run_main(main)
