#!/usr/bin/env python
"""MLR-SNet figure (after Shu et al. 2022, Figs. 3/4 and 8-10): for every task of a benchmark results
file, the test metric along training (mean over seeds) and the learning-rate schedules (first seed).
Reads the JSON written by ``benchmarks/mlrsnet_cifar.py`` or ``benchmarks/mlrsnet_ptb.py``; never
trains.

    python paper_figs/fig_mlrsnet.py results/mlrsnet_cifar/results.json [--out fig.png]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

METRICS = {"mlrsnet_cifar": ("test_acc", "test accuracy", False),
           "mlrsnet_ptb": ("test_ppl", "test perplexity", True)}
# One colour per method family in every panel (matched on the method label, first match wins).
COLOURS = (("meta-train", "C0"), ("ours", "C1"), ("official", "C2"), ("fixed", "C3"), ("SGD", "C3"),
           ("multistep", "C4"), ("Adam", "C4"), ("exponential", "C5"), ("sgdr", "C6"))
TITLES = {"cifar": "CIFAR-10 (meta-training task)", "mnist": "transfer: MNIST (dataset)",
          "arch": "transfer: another architecture", "long": "transfer: longer horizon", "ptb": "Penn Treebank"}


def _mean_curve(runs: list[dict], key: str):
    ok = [r for r in runs if r.get("eval")]
    if not ok:
        return None, None
    n = min(len(r["eval"]) for r in ok)
    x = [e["step"] for e in ok[0]["eval"][:n]]
    ys = np.array([[np.nan if e.get(key) is None else e[key] for e in r["eval"][:n]] for r in ok], dtype=float)
    return x, np.nanmean(ys, axis=0)


def plot(result: dict, path: str) -> None:
    """Write the figure for ``result`` (a benchmark results dict) to ``path``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key, label, logy = METRICS[result.get("benchmark", "mlrsnet_cifar")]
    tasks = [t for t in result["runs"] if result["runs"][t]]
    fig, axes = plt.subplots(len(tasks), 2, figsize=(12, 3.6 * len(tasks)), squeeze=False)
    for row, task in zip(axes, tasks):
        for method, runs in result["runs"][task].items():
            x, y = _mean_curve(runs, key)
            if x is None:
                continue
            colour = next((c for k, c in COLOURS if k in method), None)
            line, = row[0].plot(x, y, label=method, lw=1.4, color=colour)
            lr = [v for v in runs[0].get("lr", []) if v is not None]
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
    p = argparse.ArgumentParser(description="MLR-SNet figure from a benchmark results JSON (never trains).")
    p.add_argument("results", help="results.json of benchmarks/mlrsnet_cifar.py or benchmarks/mlrsnet_ptb.py")
    p.add_argument("--out", default=None, help="output image (default: next to the results, fig_mlrsnet.png)")
    a = p.parse_args(argv)
    try:
        with open(a.results) as f:
            result = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        sys.stderr.write(f"fig_mlrsnet.py: error: cannot read {a.results!r}: {e}\n")
        return 2
    if result.get("benchmark") not in METRICS:
        sys.stderr.write(f"fig_mlrsnet.py: error: {a.results!r} is not an MLR-SNet benchmark result "
                         f"(benchmark={result.get('benchmark')!r}; expected one of {sorted(METRICS)})\n")
        return 2
    out = a.out or os.path.join(os.path.dirname(os.path.abspath(a.results)), "fig_mlrsnet.png")
    plot(result, out)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
