#!/usr/bin/env python
"""The smoothness paper's Fig. 2 (the learned update as one input moves) and Fig. 7 (loss with
perturbed input states minus loss with normal ones) from a ``benchmarks/smoothness_probe.py`` results
file. Never trains.

    python paper_figs/fig_smoothness.py results/smoothness_probe/results.json --out figs/smoothness.png
    python paper_figs/fig_smoothness.py results.json --sigmas 4 --metric test_loss --out fig7.pdf

Left panels (Fig. 2), one per optimizer: u_i(s + δ) − u_i(s) against δ / rms(s) for the recorded
coordinates, hidden state fixed. Right panel (Fig. 7): diff = loss_ps − loss_ns over the run, mean over
seeds (shaded ± std), one curve per optimizer and input-noise strength σ.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from l2l_zoo import runs  # noqa: E402
from l2l_zoo.cli import ArgumentParser, UsageError, output_file, parse_floats, run_main  # noqa: E402

FORMATS = (".png", ".pdf", ".svg")
METRICS = ("train_loss", "test_loss")


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", help="results.json written by benchmarks/smoothness_probe.py")
    p.add_argument("--sigmas", default=None, help="comma list of the σ to draw in Fig. 7 (default: all in the file)")
    p.add_argument("--metric", default="train_loss", help=f"loss whose difference Fig. 7 shows, one of {list(METRICS)}")
    p.add_argument("--out", default="figs/smoothness.png", help=f"output image, one of {list(FORMATS)}")
    a = p.parse_args(argv)
    if a.metric not in METRICS:
        raise UsageError(f"--metric must be one of {list(METRICS)}, got {a.metric!r}")
    if os.path.splitext(a.out)[1].lower() not in FORMATS:
        raise UsageError(f"--out must end in one of {list(FORMATS)}, got {a.out!r}")
    res = runs.read_results(a.results, benchmark="smoothness_probe")
    diff, response = res.get("diff", {}), res.get("response", {})
    in_file = sorted({s for per in diff.values() for s in per}, key=float)
    if a.sigmas is not None:
        wanted = [f"{s:g}" for s in parse_floats(a.sigmas, "--sigmas")]
        missing = [s for s in wanted if s not in in_file]
        if missing:
            raise UsageError(f"--sigmas: {missing} not in {a.results!r}, which has σ {in_file}")
    else:
        wanted = in_file
    curves = {name: r for name, r in response.items() if "response" in r}
    if not curves and not wanted:
        raise UsageError(f"{a.results!r} has neither response curves nor perturbed runs to draw")
    with output_file(a.out):
        draw(a.out, curves, {n: {s: per[s] for s in wanted if s in per} for n, per in diff.items()}, a.metric,
             relative=not res["config"].get("absolute", False))
    print(f"figure: {a.out}")
    return 0


def draw(path, curves: dict, diff: dict, metric: str, relative: bool) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_panels = len(curves) + (1 if any(diff.values()) else 0)
    fig, axes = plt.subplots(1, n_panels, figsize=(4.2 * n_panels, 3.6), squeeze=False)
    axes = list(axes[0])
    for ax, (name, r) in zip(axes, curves.items()):
        x = [d / r["input_rms"] for d in r["deltas"]]
        for i, ys in zip(r["coords"], r["response"]):
            ax.plot(x, ys, lw=1.2, label=f"coordinate {i}")
        ax.axhline(0.0, color="0.6", lw=0.6)
        ax.axvline(0.0, color="0.6", lw=0.6)
        ax.set_title(f"{name}, step {r['step']}", fontsize=9)
        ax.set_xlabel("δ / rms(s)")
        ax.set_ylabel("u_i(s + δ) − u_i(s)")
        ax.grid(alpha=0.3)
    if any(diff.values()):
        ax = axes[-1]
        for name, per in diff.items():
            for s, d in per.items():
                if metric not in d:
                    continue
                pts = [(x, y, e) for x, y, e in zip(d["step"], d[metric], d[f"{metric}_std"]) if y is not None]
                if not pts:
                    continue
                x, y, e = zip(*pts)
                line, = ax.plot(x, y, label=f"{name}, σ = {s}{'·rms(s)' if relative else ''}")
                ax.fill_between(x, [a - b for a, b in zip(y, e)], [a + b for a, b in zip(y, e)],
                                color=line.get_color(), alpha=0.2)
        ax.axhline(0.0, color="0.6", lw=0.6)
        ax.set_xlabel("optimizee step")
        ax.set_ylabel(f"{metric.replace('_', ' ')}: perturbed − normal")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)


if __name__ == "__main__":
    run_main(main)
