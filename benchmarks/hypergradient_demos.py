#!/usr/bin/env python
"""Fig. 1 of the MARTHE paper: gradient descent with HD, RTHO and MARTHE (adaptive μ, appendix B)
learning rates on the Beale function and a smoothed, simplified Bukin N.6 function.

    python benchmarks/hypergradient_demos.py
    python benchmarks/hypergradient_demos.py --betas 1e-7,1e-6,1e-5,1e-4 --steps 1000 --bukin-eps 1e-6

Setting (paper §3, footnote 5): E = L (the objective is the function itself), 500 steps of plain
gradient descent from a fixed start, one run per β, in float64 on CPU (two coordinates: a GPU would
only add latency, so ``--device cuda`` is accepted and moves the computation but gains nothing).

* Beale: L(x, y) = (1.5 − x + xy)² + (2.25 − x + xy²)² + (2.625 − x + xy³)², minimum 0 at (3, 0.5).
* Smoothed Bukin N.6: L(x, y) = sqrt(sqrt((y − 0.01x)² + ε) + ε), minimised on the whole valley
  y = 0.01x with value sqrt(sqrt(ε) + ε); the gap is computed without cancellation as
  r² / ((sqrt(r² + ε) + sqrt(ε))·(L + L*)) with r = y − 0.01x.

The paper gives neither the starting points nor η0 nor ε: ours are flags with documented defaults.
Reported per problem, method and β: the best optimality gap within the horizon (Fig. 1 centre), the
final gap, divergence, the fraction of steps at which h_μ chose μ = 0 and μ = 1 (appendix B: Beale
μ = 1 throughout, Bukin μ = 0 on ≈40% of steps), and the trajectory and rates (Fig. 1 left/right).
Outputs in ``--out``: ``results.json`` (the ``l2l_zoo.runs`` schema, with the per-problem runs under
``problems`` and the best β per method as the summary) and ``fig1.png`` (drawn by
``paper_figs/fig_marthe.py``).
"""
from __future__ import annotations

import math
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, os.path.join(HERE, "..", "paper_figs"))

from l2l_zoo import runs  # noqa: E402
from l2l_zoo.cli import ArgumentParser, UsageError, output_folder, parse_floats, resolve_device, run_main  # noqa: E402
from l2l_zoo.schedules import HD, MARTHE, RTHO, HypergradientWarning, ScheduleDiverged  # noqa: E402

METHODS = ("hd", "rtho", "marthe-hmu")
DIVERGENCE = 1e8  # objective value treated as divergence


@dataclass
class Config:
    betas: list
    steps: int
    beale_start: list
    beale_lr: float
    bukin_start: list
    bukin_lr: float
    bukin_eps: float
    grad_clip: float | None
    device: str
    out: str
    progress: bool


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n\n")[0], epilog="See the module docstring for the setting.")
    p.add_argument("--betas", default="1e-7,1e-6,1e-5,3e-5,1e-4,3e-4,1e-3,3e-3,1e-2",
                   help="hyper-learning rates β (one run per method and β)")
    p.add_argument("--steps", type=int, default=500, help="gradient-descent steps per run (paper: 500)")
    p.add_argument("--beale-start", default="1.0,1.5", help="starting point x,y on the Beale function")
    p.add_argument("--beale-lr", type=float, default=0.01, help="initial learning rate η0 on Beale")
    p.add_argument("--bukin-start", default="-5.0,1.0", help="starting point x,y on the smoothed Bukin function")
    p.add_argument("--bukin-lr", type=float, default=0.01, help="initial learning rate η0 on Bukin")
    p.add_argument("--bukin-eps", type=float, default=1e-4, help="smoothing ε of the Bukin function (> 0)")
    p.add_argument("--grad-clip", type=float, default=0.0,
                   help="maximum gradient norm of the controllers (0 = off, the default here: Fig. 1 is plain "
                        "gradient descent on the function, and Beale's gradient at the start is already ~99; "
                        "the library's default is the authors' 100)")
    p.add_argument("--device", default="cpu", help="auto, cpu or cuda")
    p.add_argument("--out", default=os.path.join("results", "hypergradient_demos"), help="output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _point(spec: str, flag: str) -> list[float]:
    vals = parse_floats(spec, flag, positive=False)
    if len(vals) != 2:
        raise UsageError(f"{flag} must be two numbers x,y, got {spec!r}")
    return vals


def parse_config(argv=None) -> Config:
    a = build_parser().parse_args(argv)
    if a.steps < 1:
        raise UsageError(f"--steps must be an integer >= 1, got {a.steps}")
    for flag, v in (("--beale-lr", a.beale_lr), ("--bukin-lr", a.bukin_lr), ("--bukin-eps", a.bukin_eps)):
        if not (math.isfinite(v) and v > 0):
            raise UsageError(f"{flag} must be a positive number, got {v}")
    if not (math.isfinite(a.grad_clip) and a.grad_clip >= 0):
        raise UsageError(f"--grad-clip must be a number >= 0 (0 = off), got {a.grad_clip}")
    resolve_device(a.device)
    return Config(betas=parse_floats(a.betas, "--betas"), steps=a.steps,
                  beale_start=_point(a.beale_start, "--beale-start"), beale_lr=a.beale_lr,
                  bukin_start=_point(a.bukin_start, "--bukin-start"), bukin_lr=a.bukin_lr,
                  bukin_eps=a.bukin_eps, grad_clip=a.grad_clip or None, device=a.device, out=a.out, progress=not a.no_progress)


# ---------------------------------------------------------------------------------- problems

def beale(p: torch.Tensor) -> torch.Tensor:
    """Beale function of a (2,) tensor (paper footnote 5)."""
    x, y = p[0], p[1]
    return (1.5 - x + x * y) ** 2 + (2.25 - x + x * y ** 2) ** 2 + (2.625 - x + x * y ** 3) ** 2


def make_bukin(eps: float):
    """Smoothed, simplified Bukin N.6 (paper footnote 5) and its optimality gap."""
    f_star = math.sqrt(math.sqrt(eps) + eps)

    def f(p):
        return torch.sqrt(torch.sqrt((p[1] - 0.01 * p[0]) ** 2 + eps) + eps)

    def gap(p):
        r2 = (p[1] - 0.01 * p[0]) ** 2
        return r2 / ((torch.sqrt(r2 + eps) + math.sqrt(eps)) * (f(p) + f_star))

    return f, gap, f_star


def problems(cfg: Config) -> dict:
    bukin, bukin_gap, bukin_star = make_bukin(cfg.bukin_eps)
    return {
        "beale": {"title": "Beale", "f": beale, "gap": beale, "f_star": 0.0, "start": cfg.beale_start,
                  "lr": cfg.beale_lr, "box": [[-0.5, 3.5], [-0.5, 2.0]], "argmin": [3.0, 0.5]},
        "bukin": {"title": f"Bukin N.6 smoothed, ε={cfg.bukin_eps:g}", "f": bukin, "gap": bukin_gap,
                  "f_star": bukin_star, "start": cfg.bukin_start, "lr": cfg.bukin_lr,
                  "box": [[-6.0, 6.0], [-1.5, 1.5]], "argmin": [0.0, 0.0]},
    }


def run_one(prob: dict, method: str, beta: float, steps: int, device, grad_clip: float | None = None) -> dict:
    p = torch.nn.Parameter(torch.tensor(prob["start"], dtype=torch.float64, device=device))
    opt = torch.optim.SGD([p], lr=prob["lr"])
    f = prob["f"]

    def objective():
        return f(p)
    if method == "hd":
        ctrl = HD(opt, objective, beta=beta, divergence_loss=DIVERGENCE, grad_clip=grad_clip)
    elif method == "rtho":
        ctrl = RTHO(opt, objective, beta=beta, divergence_loss=DIVERGENCE, grad_clip=grad_clip)
    else:
        ctrl = MARTHE(opt, objective, beta=beta, mu="adaptive", divergence_loss=DIVERGENCE, grad_clip=grad_clip)
    rec = {"trajectory": [p.detach().cpu().tolist()], "gaps": [], "lrs": [], "mus": [], "diverged_at": None}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HypergradientWarning)  # counted in n_skipped below
        for t in range(steps):
            with torch.no_grad():
                rec["gaps"].append(float(prob["gap"](p.detach())))
            try:
                ctrl.step(f(p))
            except ScheduleDiverged as e:
                rec["diverged_at"], rec["error"] = t, str(e)
                break
            rec["lrs"].append(ctrl.last["lr"])
            rec["mus"].append(ctrl.last.get("mu", 0.0))
            rec["trajectory"].append(p.detach().cpu().tolist())
    if rec["diverged_at"] is None:
        with torch.no_grad():
            rec["gaps"].append(float(prob["gap"](p.detach())))
    finite = [g for g in rec["gaps"] if math.isfinite(g)]
    rec["best_gap"] = min(finite) if finite else None
    rec["final_gap"] = rec["gaps"][-1] if rec["diverged_at"] is None else None
    mus = [m for m in rec["mus"] if m is not None]
    rec["frac_mu0"] = sum(m == 0.0 for m in mus) / max(1, len(mus))
    rec["frac_mu1"] = sum(m == 1.0 for m in mus) / max(1, len(mus))
    rec["n_skipped"] = ctrl.n_skipped
    return rec


def contour(prob: dict, n: int = 120) -> list[list[float]]:
    """Objective values on an n×n grid over the plot box (rows: y), for the figure."""
    (x0, x1), (y0, y1) = prob["box"]
    xs, ys = torch.linspace(x0, x1, n, dtype=torch.float64), torch.linspace(y0, y1, n, dtype=torch.float64)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return prob["f"](torch.stack([xx, yy])).tolist()


def main(argv=None) -> int:
    cfg = parse_config(argv)
    with output_folder(cfg.out):
        return _main(cfg)


def _main(cfg: Config) -> int:
    device = resolve_device(cfg.device)
    from tqdm.auto import tqdm
    t0 = time.perf_counter()
    probs = problems(cfg)
    result = runs.new_results("hypergradient_demos", asdict(cfg))
    result["problems"] = {}
    jobs = [(name, m, b) for name in probs for m in METHODS for b in cfg.betas]
    for name, method, beta in tqdm(jobs, desc="demo runs", disable=not cfg.progress, dynamic_ncols=True):
        prob = probs[name]
        out = result["problems"].setdefault(name, {
            "title": prob["title"], "f_star": prob["f_star"], "start": prob["start"], "lr": prob["lr"],
            "steps": cfg.steps, "plot_box": prob["box"], "argmin_shown": prob["argmin"],
            "contour": contour(prob), "methods": {}})
        out["methods"].setdefault(method, {})[f"{beta:g}"] = run_one(prob, method, beta, cfg.steps, device, cfg.grad_clip)
    for name, out in result["problems"].items():
        out["best"] = {}
        for method, by_beta in out["methods"].items():
            ok = {b: r["best_gap"] for b, r in by_beta.items()
                  if r["diverged_at"] is None and r["best_gap"] is not None}
            out["best"][method] = float(min(ok, key=ok.get)) if ok else None
        result["summary"][name] = {m: {"best_beta": b, "best_gap": None if b is None else
                                       out["methods"][m][f"{b:g}"]["best_gap"]} for m, b in out["best"].items()}
    result["wall_s"] = time.perf_counter() - t0
    runs.write_json(os.path.join(cfg.out, "results.json"), result)
    from fig_marthe import plot_fig1
    plot_fig1(result, os.path.join(cfg.out, "fig1.png"))

    log = tqdm.write
    for name, out in result["problems"].items():
        log(f"\n{out['title']}: start {out['start']}, η0={out['lr']}, {cfg.steps} steps; best gap f−f* per β "
            "('div' = diverged)")
        log(f"{'β':>8}" + "".join(f"{m:>14}" for m in METHODS) + f"{'h_μ: μ=0 / μ=1':>20}")
        for b in cfg.betas:
            row = f"{b:>8g}"
            for m in METHODS:
                r = out["methods"][m][f"{b:g}"]
                cell = f"div@{r['diverged_at']}" if r["diverged_at"] is not None else format(r["best_gap"], ".3g")
                row += f"{cell:>14}"
            r = out["methods"]["marthe-hmu"][f"{b:g}"]
            row += f"{100 * r['frac_mu0']:>12.0f}% / {100 * r['frac_mu1']:.0f}%"
            log(row)
        log("best β: " + ", ".join(f"{m} {out['best'][m]}" for m in METHODS))
    log(f"results: {os.path.join(cfg.out, 'results.json')}  figure: {os.path.join(cfg.out, 'fig1.png')}  "
        f"({result['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    run_main(main)
