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

from l2l_zoo import runs  # noqa: E402
from l2l_zoo.cli import ArgumentParser, UsageError, output_file, plot_curves, run_main  # noqa: E402

METRICS = {"train_loss": "train loss", "val_loss": "validation loss", "test_loss": "test loss",
           "train_acc": "train accuracy", "val_acc": "validation accuracy", "test_acc": "test accuracy"}
FORMATS = (".png", ".pdf", ".svg")
BENCHMARKS = ("mnist_mlp", "simple_ablation", "smooth_subsample")


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", help="results.json files written by benchmarks/mnist_mlp.py or "
                   "benchmarks/simple_ablation.py")
    p.add_argument("--metrics", default="train_loss,test_loss", help=f"comma list from {sorted(METRICS)}")
    p.add_argument("--out", default="figs/learning_curves.png", help=f"output image, one of {list(FORMATS)}")
    p.add_argument("--title", default="", help="figure title")
    a = p.parse_args(argv)
    metrics = [m.strip() for m in a.metrics.split(",") if m.strip()]
    bad = [m for m in metrics if m not in METRICS]
    if bad or not metrics:
        raise UsageError(f"--metrics must be a comma list from {sorted(METRICS)}, got {a.metrics!r}")
    if os.path.splitext(a.out)[1].lower() not in FORMATS:
        raise UsageError(f"--out must end in one of {list(FORMATS)}, got {a.out!r}")
    series, seen = {}, set()
    for path in a.results:  # every input is read and validated before anything is drawn
        res = runs.read_results(path, benchmark=BENCHMARKS[:2])
        tag = os.path.basename(os.path.dirname(os.path.abspath(path)))
        for label, recs in res["runs"].items():
            name = label if label not in seen else f"{tag}: {label}"
            seen.add(label)
            s = {}
            for m in metrics:
                x, mean, std = runs.mean_curve(recs, m)
                if x:
                    s.update({"x": x, m: mean, f"{m}_std": std})
            if not s:
                raise UsageError(f"{path!r}: run {label!r} has none of the metrics {metrics}")
            series[name] = s
    with output_file(a.out):
        plot_curves(a.out, series, title=a.title, panels=[(m, METRICS[m]) for m in metrics])
    print(f"figure: {a.out}")
    return 0


if __name__ == "__main__":
    run_main(main)
