#!/usr/bin/env python
"""Learning-curve figures in the style of Chen et al. (2020) Fig. 2-5 and the smoothness paper's
Fig. 3-5, from one or more ``benchmarks/mnist_mlp.py`` results files. Never trains.

    python paper_figs/fig_learning_curves.py results/mnist_mlp/*/results.json --out figs/fig2.png
    python paper_figs/fig_learning_curves.py a.json b.json --metrics train_loss,test_acc --out f.pdf

Every run of every file becomes one curve (mean over its seeds, shaded ± std); labels are the run
labels of the files (prefixed by the file's folder name when two files share a label).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from l2l_zoo.cli import ArgumentParser, UsageError, plot_curves, read_json, run_main  # noqa: E402

METRICS = {"train_loss": "train loss", "test_loss": "test loss", "train_acc": "train accuracy",
           "test_acc": "test accuracy"}


def mean_std(runs, key):
    import numpy as np
    ok = [r for r in runs if r.get("diverged_at") is None] or runs
    n = min(len(r["eval_steps"]) for r in ok)
    arr = np.array([[np.nan if v is None else v for v in r[key][:n]] for r in ok], dtype=float)
    mean = [None if np.isnan(v) else float(v) for v in np.nanmean(arr, 0)]
    std = [0.0 if np.isnan(v) else float(v) for v in np.nanstd(arr, 0)]
    return ok[0]["eval_steps"][:n], mean, std


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", help="results.json files written by benchmarks/mnist_mlp.py")
    p.add_argument("--metrics", default="train_loss,test_loss", help=f"comma list from {sorted(METRICS)}")
    p.add_argument("--out", default="figs/learning_curves.png", help="output image (.png or .pdf)")
    p.add_argument("--title", default="", help="figure title")
    a = p.parse_args(argv)
    metrics = [m.strip() for m in a.metrics.split(",") if m.strip()]
    bad = [m for m in metrics if m not in METRICS]
    if bad or not metrics:
        raise UsageError(f"--metrics must be a comma list from {sorted(METRICS)}, got {a.metrics!r}")
    series, seen = {}, set()
    for path in a.results:
        if not os.path.isfile(path):
            raise UsageError(f"no such results file: {path!r}")
        res = read_json(path)
        if "runs" not in res:
            raise UsageError(f"{path!r} is not a mnist_mlp.py results file (no 'runs')")
        tag = os.path.basename(os.path.dirname(os.path.abspath(path)))
        for label, runs in res["runs"].items():
            name = label if label not in seen else f"{tag}: {label}"
            seen.add(label)
            s = {}
            for m in metrics:
                x, mean, std = mean_std(runs, m)
                s.update({"x": x, m: mean, f"{m}_std": std})
            series[name] = s
    plot_curves(a.out, series, title=a.title, panels=[(m, METRICS[m]) for m in metrics])
    print(f"figure: {a.out}")
    return 0


if __name__ == "__main__":
    run_main(main)
