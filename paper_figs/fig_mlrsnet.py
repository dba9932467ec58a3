#!/usr/bin/env python
"""MLR-SNet figure (after Shu et al. 2022, Figs. 3/4 and 8-10): for every task of a benchmark results
file, the test metric along training (mean over seeds) and the learning-rate schedules (first seed).
Reads the JSON written by ``benchmarks/mlrsnet_cifar.py`` or ``benchmarks/mlrsnet_ptb.py``; never
trains.

    python paper_figs/fig_mlrsnet.py results/mlrsnet_cifar/results.json [--out fig.png]
"""
from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from l2l_zoo import runs  # noqa: E402
from l2l_zoo.cli import ArgumentParser, UsageError, output_file, run_main  # noqa: E402

METRICS = {"mlrsnet_cifar": ("test_acc", "test accuracy", False),
           "mlrsnet_ptb": ("test_ppl", "test perplexity", True)}
# One colour per method family in every panel (matched on the method label, first match wins).
COLOURS = (("meta-train", "C0"), ("ours", "C1"), ("official", "C2"), ("fixed", "C3"), ("SGD", "C3"),
           ("multistep", "C4"), ("Adam", "C4"), ("exponential", "C5"), ("sgdr", "C6"))
TITLES = {"cifar": "CIFAR-10 (meta-training task)", "mnist": "transfer: MNIST (dataset)",
          "arch": "transfer: another architecture", "long": "transfer: longer horizon", "ptb": "Penn Treebank"}
FORMATS = (".png", ".pdf", ".svg")


def plot(result: dict, path: str) -> None:
    """Write the figure for ``result`` (a validated benchmark results dict) to ``path``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key, label, logy = METRICS[result["benchmark"]]
    tasks = {t: keys for t, keys in result.get("tasks", {}).items() if keys}
    if not tasks:
        raise runs.ResultsFormatError(f"{result['benchmark']} results hold no runs to plot")
    fig, axes = plt.subplots(len(tasks), 2, figsize=(12, 3.6 * len(tasks)), squeeze=False)
    for row, (task, keys) in zip(axes, tasks.items()):
        for run_key in keys:
            recs = result["runs"].get(run_key, [])
            method = run_key.split("/", 1)[-1]
            x, y, _ = runs.mean_curve(recs, key, include_diverged=True)
            if not x:
                continue
            colour = next((c for k, c in COLOURS if k in method), None)
            line, = row[0].plot(x, [np.nan if v is None else v for v in y], label=method, lw=1.4, color=colour)
            lr = [v for v in recs[0].get("step_log", {}).get("lr", []) if v is not None]
            if lr:
                row[1].plot(np.arange(1, len(lr) + 1), lr, color=line.get_color(), lw=1.0, label=method)
        row[0].set_title(f"{TITLES.get(task, task)}: {label}", fontsize=10)
        row[0].set_xlabel("training step")
        row[0].set_ylabel(label)
        if logy:
            row[0].set_yscale("log")
        row[1].set_title(f"{TITLES.get(task, task)}: learning rate (first seed)", fontsize=10)
        row[1].set_xlabel("training step")
        row[1].set_ylabel("learning rate")
        row[1].set_yscale("log")
        for ax in row:
            ax.grid(alpha=0.3)
        row[0].legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = ArgumentParser(description="MLR-SNet figure from a benchmark results JSON (never trains).")
    p.add_argument("results", help="results.json of benchmarks/mlrsnet_cifar.py or benchmarks/mlrsnet_ptb.py")
    p.add_argument("--out", default=None,
                   help=f"output image, one of {list(FORMATS)} (default: next to the results, fig_mlrsnet.png)")
    a = p.parse_args(argv)
    out = a.out or os.path.join(os.path.dirname(os.path.abspath(a.results)), "fig_mlrsnet.png")
    if os.path.splitext(out)[1].lower() not in FORMATS:
        raise UsageError(f"--out must end in one of {list(FORMATS)}, got {out!r}")
    result = runs.read_results(a.results, benchmark=sorted(METRICS))
    with output_file(out):
        plot(result, out)
    print(out)
    return 0


if __name__ == "__main__":
    run_main(main)
