#!/usr/bin/env python
"""Figures 1 and 2 of the MARTHE paper from the benchmark results files. Never trains.

    python paper_figs/fig_marthe.py --mnist results/lr_schedules_mnist/results.json \\
        --demos results/hypergradient_demos/results.json --out figs/marthe

* Fig. 1 (``--demos``, from ``benchmarks/hypergradient_demos.py``): for the Beale and the smoothed
  Bukin N.6 functions, the trajectories of gradient descent with HD, RTHO and MARTHE (each at its
  best β) on the loss contours, and the best optimality gap within the horizon versus β.
* Fig. 2 (``--mnist``, from ``benchmarks/lr_schedules_mnist.py``): left, the LRS-OPT schedules;
  centre, the online schedules of the first seed at each method's best β (or α) beside LRS-OPT's;
  right, mean validation accuracy versus β (α for MARTHE with adaptive β), diverged configurations
  left out, with the constant rate and LRS-OPT as horizontal lines.

Writes ``<out>_fig1.{png,pdf}`` and/or ``<out>_fig2.{png,pdf}`` (``--format`` picks other formats).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from l2l_zoo import runs  # noqa: E402
from l2l_zoo.cli import ArgumentParser, UsageError, output_file, run_main  # noqa: E402

NAMES = {"constant": "constant η", "hd": "HD", "rtho": "RTHO", "marthe-hmu": "MARTHE h_μ (fixed β)",
         "marthe": "MARTHE (adaptive μ, β)", "lrs-opt": "LRS-OPT", "multistep": "staircase",
         "exponential": "exponential", "sgdr": "SGDR"}


GAP_FLOOR = 1e-32  # optimality gaps of exactly 0 (the iterate landed on the valley) are drawn here


def _name(method: str) -> str:
    if method.startswith("marthe-mu"):
        return f"MARTHE μ={method[len('marthe-mu'):]}"
    return NAMES.get(method, method)


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: str) -> list[str]:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    root, ext = os.path.splitext(path)
    paths = [path] if ext else [root + ".png", root + ".pdf"]
    for p in paths:
        fig.savefig(p, dpi=130, bbox_inches="tight")
    return paths


def plot_fig2(result: dict, path: str) -> list[str]:
    """Fig. 2 from a ``lr_schedules_mnist.py`` results dict; ``path`` with an extension writes that
    file, without one writes .png and .pdf. Returns the paths written."""
    plt = _plt()
    summary, run_table = result["summary"], result["runs"]
    configs, best = summary["configs"], summary["best"]
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.4))

    ax = axes[0]
    for r in run_table.get("lrs-opt", []):
        ax.plot(r["lrs_opt"]["schedule"], label=f"seed {r['seed']} ({r['lrs_opt']['iterations']} it.)")
    ax.set_title("LRS-OPT schedules")
    ax.set_xlabel("step t")
    ax.set_ylabel("η_t")
    if run_table.get("lrs-opt"):
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "LRS-OPT not in this run\n(--methods ...,lrs-opt)", ha="center", va="center",
                transform=ax.transAxes, color="0.4")
    ax.grid(alpha=0.3)

    ax = axes[1]
    seed0 = result["config"]["seeds"][0]
    for method, key in best.items():
        rec = next((r for r in run_table.get(key, []) if r["seed"] == seed0), None)
        if rec is None or method in ("multistep", "exponential", "sgdr"):
            continue
        c = configs[key]
        tag = "" if c["x"] is None else (f" α={c['beta_lr']:g}" if c["beta_lr"] is not None else f" β={c['beta']:g}")
        ax.plot(rec["step_log"]["lr"], label=_name(method) + tag, lw=2 if method == "lrs-opt" else 1.2)
    ax.set_title(f"schedules, seed {seed0} (best β per method)")
    ax.set_xlabel("step t")
    ax.set_ylabel("η_t")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)

    ax = axes[2]
    methods = dict.fromkeys(c["method"] for c in configs.values() if c["x"] is not None)
    for method in methods:
        pts = sorted((c["x"], 100 * c["val_acc"]) for c in configs.values()
                     if c["method"] == method and not c["diverged"] and c["val_acc"] is not None)
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, "o-", label=_name(method) + (" (vs α)" if method == "marthe" else ""))
    for method, style in (("constant", "k--"), ("lrs-opt", "k:")):
        key = best.get(method)
        if key is not None:
            ax.axhline(100 * configs[key]["val_acc"], color="k", ls=style[1:], lw=1, label=_name(method))
    paper = result.get("paper", {}).get("val_acc_percent", {})
    for method, v in paper.items():
        ax.axhline(v, color="gray", ls="--" if method == "constant" else ":", lw=0.8, alpha=0.7,
                   label=f"paper {_name(method)} {v}%")
    ax.set_xscale("log")
    ax.set_xlabel("β (α for adaptive β)")
    ax.set_ylabel("mean validation accuracy (%)")
    n = len(result["config"]["seeds"])
    ax.set_title(f"accuracy vs β, {n} seed(s); diverged configs omitted")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = _save(fig, path)
    plt.close(fig)
    return out


def plot_fig1(result: dict, path: str) -> list[str]:
    """Fig. 1 from a ``hypergradient_demos.py`` results dict (see :func:`plot_fig2` for ``path``)."""
    import numpy as np
    plt = _plt()
    probs = result["problems"]
    fig, axes = plt.subplots(len(probs), 3, figsize=(16, 4.4 * len(probs)), squeeze=False)
    for row, (name, p) in enumerate(probs.items()):
        ax = axes[row][0]
        (x0, x1), (y0, y1) = p["plot_box"]
        zs = np.array(p["contour"]) if "contour" in p else None
        if zs is not None:  # values on a regular grid over plot_box, rows = y
            cx = np.linspace(x0, x1, zs.shape[1])
            cy = np.linspace(y0, y1, zs.shape[0])
            ax.contourf(cx, cy, np.log10(zs - p["f_star"] + 1e-12), levels=30, cmap="viridis", alpha=0.8)
        for method, beta in p["best"].items():
            if beta is None:
                continue
            run = p["methods"][method][f"{beta:g}"]
            tr = np.array(run["trajectory"])
            ax.plot(tr[:, 0], tr[:, 1], lw=1.5, label=f"{_name(method)} β={beta:g}")
        ax.plot(*p["start"], "k*", ms=10)
        ax.plot(*p["argmin_shown"], "r+", ms=12, mew=2)
        ax.set_xlim(x0, x1)
        ax.set_ylim(y0, y1)
        ax.set_title(f"{p['title']}: trajectories, log10(f − f*)", fontsize=10)
        ax.legend(fontsize=7)

        ax = axes[row][1]
        for method, by_beta in p["methods"].items():
            pts = sorted((float(b), max(r["best_gap"], GAP_FLOOR)) for b, r in by_beta.items()
                         if r["diverged_at"] is None)
            if pts:
                bx, gy = zip(*pts)
                ax.plot(bx, gy, "o-", label=_name(method))
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("β")
        ax.set_ylabel(f"best f − f* within {p['steps']} steps (floor {GAP_FLOOR:g})")
        ax.set_title(f"{p['title']}: best gap vs β (diverged omitted)", fontsize=10)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)

        ax = axes[row][2]
        for method, beta in p["best"].items():
            if beta is None:
                continue
            ax.plot(p["methods"][method][f"{beta:g}"]["lrs"], label=f"{_name(method)} β={beta:g}")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("η_t")
        ax.set_title(f"{p['title']}: learning rates at the best β", fontsize=10)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = _save(fig, path)
    plt.close(fig)
    return out


FORMATS = ("png", "pdf", "svg")


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mnist", default=None, help="results.json of benchmarks/lr_schedules_mnist.py (Fig. 2)")
    p.add_argument("--demos", default=None, help="results.json of benchmarks/hypergradient_demos.py (Fig. 1)")
    p.add_argument("--out", default=os.path.join("figs", "marthe"),
                   help="output prefix: writes <out>_fig1 and/or <out>_fig2 in each --format")
    p.add_argument("--format", default="png,pdf", help=f"comma list of image formats from {list(FORMATS)}")
    a = p.parse_args(argv)
    if a.mnist is None and a.demos is None:
        raise UsageError("give --mnist and/or --demos")
    formats = [f.strip().lower() for f in a.format.split(",") if f.strip()]
    if not formats or any(f not in FORMATS for f in formats):
        raise UsageError(f"--format must be a comma list from {list(FORMATS)}, got {a.format!r}")
    jobs = []  # read and validate every input before drawing anything
    for path, bench, fn in ((a.demos, "hypergradient_demos", plot_fig1), (a.mnist, "lr_schedules_mnist", plot_fig2)):
        if path is not None:
            jobs.append((runs.read_results(path, benchmark=bench), fn))
    written = []
    for res, fn in jobs:
        for fmt in formats:
            target = f"{a.out}_{'fig1' if fn is plot_fig1 else 'fig2'}.{fmt}"
            with output_file(target):
                written += fn(res, target)
    print("wrote " + ", ".join(written))
    return 0


if __name__ == "__main__":
    run_main(main)
