#!/usr/bin/env python
"""Rank optimizers on one evaluation setup from ``benchmarks/mnist_mlp.py`` results files: learned
optimizers against tuned hand-designed and untuned learning-rate-free ones. Never trains.

    python benchmarks/mnist_mlp.py --opt simple --smooth eps=0.1 --eval-steps 10000
    python benchmarks/mnist_mlp.py --opt prodigy --baselines sf-adamw,sgd,sgdm,adam --eval-steps 10000 --out results/lrfree
    python benchmarks/leaderboard.py results/mnist_mlp/mlp_simple_smooth/results.json results/lrfree/results.json \\
        --steps 1000,10000 --out results/leaderboard

Writes ``leaderboard.json`` (every entry: its metric at each step, mean ± std over seeds, diverged
seeds, kind, set-up cost, source file with its SHA-256), ``leaderboard.md`` (the table) and
``leaderboard.png`` (the metric's curves of every entry) into ``--out`` and prints the table. The
files must share the evaluation setup (task, data, minibatch size, mixed precision, fine-tuning) and
every step must be an evaluated step of every entry; anything else is a one-line error.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from l2l_zoo import runs  # noqa: E402
from l2l_zoo.cli import ArgumentParser, UsageError, output_folder, plot_curves, run_main  # noqa: E402
from l2l_zoo.leaderboard import METRICS, LeaderboardError, build, to_markdown  # noqa: E402


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", help="results.json files written by benchmarks/mnist_mlp.py")
    p.add_argument("--metric", default="train_loss", help=f"what is ranked, one of {list(METRICS)} (full-split "
                   "evaluations; losses ascending, accuracies descending)")
    p.add_argument("--steps", default="1000", help="comma list of optimizee steps to report; the last one ranks")
    p.add_argument("--out", default="results/leaderboard", help="output folder")
    a = p.parse_args(argv)
    if a.metric not in METRICS:
        raise UsageError(f"--metric must be one of {list(METRICS)}, got {a.metric!r}")
    try:
        steps = [int(s) for s in a.steps.split(",") if s.strip()]
    except ValueError:
        raise UsageError(f"--steps must be a comma list of integers, got {a.steps!r}") from None
    if not steps or any(s < 0 for s in steps):
        raise UsageError(f"--steps must be a comma list of integers >= 0, got {a.steps!r}")
    dup = [r for i, r in enumerate(a.results) if os.path.abspath(r) in map(os.path.abspath, a.results[:i])]
    if dup:
        raise UsageError(f"results file given twice: {dup[0]!r}")
    with output_folder(a.out):
        loaded = [(path, runs.read_results(path, benchmark="mnist_mlp")) for path in a.results]
        try:
            board = build(loaded, metric=a.metric, steps=steps)
        except LeaderboardError as e:
            raise UsageError(str(e)) from None
        board["inputs"] = [{"path": os.path.abspath(path), "sha256": runs.file_digest(path),
                            "created": res.get("created"), "git_commit": res["environment"].get("git_commit"),
                            "argv": res["environment"].get("argv")} for path, res in loaded]
        board["environment"] = runs.environment()
        series, by_source = {}, dict(loaded)
        for row in board["rows"]:  # in rank order, labelled as in the table
            x, mean, std = runs.mean_curve(by_source[row["source"]]["runs"][row["run"]], a.metric)
            series[f"{row['rank']}. {row['label']}"] = {"x": x, a.metric: mean, f"{a.metric}_std": std}
        runs.write_json(os.path.join(a.out, "leaderboard.json"), board)
        table = to_markdown(board)
        runs.atomic_write(os.path.join(a.out, "leaderboard.md"), lambda f: f.write(table.encode()))
        plot_curves(os.path.join(a.out, "leaderboard.png"), series, title=f"{board['setup']['task']}: {a.metric}",
                    panels=[(a.metric, a.metric.replace("_", " "))], logy=a.metric in METRICS[:3])
    print(table, end="")
    print(f"leaderboard: {os.path.join(a.out, 'leaderboard.json')}, .md, .png")
    return 0


if __name__ == "__main__":
    run_main(main)
