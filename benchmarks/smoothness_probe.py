#!/usr/bin/env python
"""How smooth is a learned optimizer, and how much does noise in what it reads cost its trajectory?
The smoothness paper's Fig. 2 and appendix D / Fig. 7 ("Learning to learn with smooth regularization"),
as measurements on trained optimizers.

    python benchmarks/smoothness_probe.py                 # the zoo's SimpleOptimizer without and with smoothing
    python benchmarks/smoothness_probe.py --sigmas 1,4,16 --seeds 3
    python benchmarks/smoothness_probe.py --optimizers zoo:dm/mnist-mlp20,zoo:rnnprop/mnist-mlp20 --task mlp20

For every learned optimizer of ``--optimizers`` (``zoo:NAME`` or a file of ``l2l_zoo.save``) and every seed:

1. **Normal states.** A freshly initialised model of ``--task`` is trained for ``--steps`` steps; every
   ``--eval-every`` steps, beside the full-split losses, the optimizer is measured at the state the run
   has reached, on a fixed probe minibatch of that seed: R_ε = max over s' in B∞(s, ε) of
   mean_i (u_i(s) − u_i(s'))² (eq. 3, by ``--pgd-steps`` projected sign-gradient steps over every
   coordinate from the regularizer's random start and from the two corners s ± ε, the largest kept:
   ``l2l_zoo.regularizers.measure_smoothness``) for each ε of ``--eps``, R_ε from the random start alone
   (``Rnoise``: what training penalises), the update's root mean square ``u_rms`` and ``rel`` =
   √R_ε / u_rms (the worst-case change of the update within the ball relative to the update itself).
2. **Perturbed states** (appendix D): the same model, initialisation and minibatches, with the
   optimizer's input state replaced at every step by s_t + σ_t·δ_t, δ_t ~ N(0, I)
   (``l2l_zoo.regularizers.PerturbedInput``), for each σ of ``--sigmas``: σ_t = σ·rms(s_t) by default
   (the paper's N(0, I) on a state normalised to entries of order one; SimpleOptimizer reads the raw
   gradient), σ_t = σ with ``--absolute``. Reported: diff = loss_ps − loss_ns (Fig. 7), per evaluation
   step, mean ± std over seeds.
3. **Response curve** (Fig. 2), seed 0 only: at step ``--sweep-step``, the update of ``--sweep-coords``
   random coordinates as their input moves by δ ∈ [−r, r] (r = ``--sweep-range`` · rms(s)), the hidden
   state fixed.

Writes ``results.json`` (the ``l2l_zoo.runs`` schema: runs labelled ``<optimizer>`` and
``<optimizer> σ=<σ>``, plus ``diff``, ``smoothness`` and ``response`` sections), ``curves.png``, and one
cached JSON per finished run so that ``--resume`` loses at most the run in progress (each takes about a
minute on the MNIST MLP; a run is not checkpointed mid-way because its probe and noise state live outside
the training checkpoint) and never reuses a result computed under other settings.
``python paper_figs/fig_smoothness.py results.json`` draws Figs. 2 and 7 from it.
"""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

import mnist_mlp  # noqa: E402  (--load's reader: zoo:NAME or a saved file, with its digest)
import l2l_zoo  # noqa: E402
from l2l_zoo import runs  # noqa: E402
from l2l_zoo.cli import (ArgumentParser, UsageError, output_folder, parse_floats, parse_seeds,  # noqa: E402
                         plot_curves, resolve_device, run_main)
from l2l_zoo.evaluation import train_optimizee  # noqa: E402
from l2l_zoo.regularizers import (STARTS, PerturbedInput, input_noise_seed, measure_smoothness,  # noqa: E402
                                  response_curve)
from l2l_zoo.tasks import TASKS, make_task  # noqa: E402

DEFAULT_OPTIMIZERS = "zoo:simple/mnist-mlp,zoo:simple-smooth/mnist-mlp"
DIVERGENCE_LOSS = 1e4
PROBE_SEED = 20_000   # the probe minibatch of seed s is drawn from a generator seeded PROBE_SEED + s
SWEEP_POINTS = 81


@dataclass
class Config:
    optimizers: list
    task: str
    steps: int
    eval_every: int
    seeds: list
    sigmas: list
    absolute: bool
    eps: list
    pgd_steps: int
    subsample: int
    sweep_step: int
    sweep_coords: int
    sweep_range: float
    batch_size: int
    threads: int | None
    device: str
    data_dir: str | None
    out: str
    resume: bool
    progress: bool


def parse_config(argv=None) -> Config:
    p = ArgumentParser(description=__doc__.split("\n\n")[0], epilog="See the module docstring for the protocol.")
    p.add_argument("--optimizers", default=DEFAULT_OPTIMIZERS,
                   help="comma list of learned optimizers: zoo:NAME (python -m l2l_zoo.zoo list) or files of l2l_zoo.save")
    p.add_argument("--task", default="mlp", help=f"task the optimizers train, one of {sorted(TASKS)}")
    p.add_argument("--steps", type=int, default=1000, help="optimizee steps of every run")
    p.add_argument("--eval-every", type=int, default=50,
                   help="steps between evaluations (full-split losses, and the smoothness probe of normal runs)")
    p.add_argument("--seeds", default="3", help="seeds (model initialisation, minibatches, noise): a count or a comma list")
    p.add_argument("--sigmas", default="1,4,16",
                   help="input-noise strengths of the perturbed runs, relative to the input state's rms "
                        "(absolute with --absolute); 'none' runs no perturbed runs")
    p.add_argument("--absolute", action="store_true", help="--sigmas are absolute standard deviations")
    p.add_argument("--eps", default="0.001,0.01,0.1",
                   help="radii ε of the L∞ ball at which R_ε is measured (the flagship was smoothed at 0.1)")
    p.add_argument("--pgd-steps", type=int, default=20, help="PGD steps of each R_ε measurement (training uses 10)")
    p.add_argument("--subsample", type=int, default=0,
                   help="coordinates in each R_ε measurement (0 = all: exact, also for SimpleOptimizer's mean embedding)")
    p.add_argument("--sweep-step", type=int, default=100, help="step at which the response curve is taken (seed 0)")
    p.add_argument("--sweep-coords", type=int, default=6, help="coordinates in the response curve (0: no curve)")
    p.add_argument("--sweep-range", type=float, default=5.0,
                   help="the response curve spans δ in ±this many times the input state's rms")
    p.add_argument("--batch-size", type=int, default=128, help="optimizee minibatch size")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--data-dir", default=None, help="dataset folder; must exist if given (default: $L2L_ZOO_DATA, then ./data)")
    p.add_argument("--out", default="results/smoothness_probe", help="output folder")
    p.add_argument("--resume", action="store_true",
                   help="reuse finished runs in --out that were computed with the same settings")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    a = p.parse_args(argv)
    if a.task not in TASKS:
        raise UsageError(f"--task must be one of {sorted(TASKS)}, got {a.task!r}")
    specs = [s.strip() for s in a.optimizers.split(",") if s.strip()]
    if not specs or len(set(specs)) != len(specs):
        raise UsageError(f"--optimizers must be a comma list of distinct zoo:NAME or files, got {a.optimizers!r}")
    for spec in specs:  # every optimizer is read and checked before any work
        if not spec.startswith(mnist_mlp.ZOO) and not os.path.isfile(spec):
            raise UsageError(f"--optimizers: no such file {spec!r} (or zoo:NAME for a pretrained one)")
        try:
            lopt = mnist_mlp.load_learned(spec)[0]
            PerturbedInput(lopt, std=0.0)
        except (ValueError, KeyError, TypeError) as e:
            raise UsageError(f"--optimizers: {spec}: {e}") from None
    sigmas = [] if a.sigmas.strip() == "none" else parse_floats(a.sigmas, "--sigmas")
    if len(set(sigmas)) != len(sigmas):
        raise UsageError(f"--sigmas must not repeat a value, got {a.sigmas!r}")
    eps = parse_floats(a.eps, "--eps")
    for flag, v, lo in (("--steps", a.steps, 1), ("--eval-every", a.eval_every, 1), ("--pgd-steps", a.pgd_steps, 1),
                        ("--subsample", a.subsample, 0), ("--sweep-step", a.sweep_step, 0),
                        ("--sweep-coords", a.sweep_coords, 0), ("--batch-size", a.batch_size, 1),
                        ("--threads", a.threads, 1)):
        if v is not None and v < lo:
            raise UsageError(f"{flag} must be >= {lo}, got {v}")
    if a.sweep_coords and a.sweep_step > a.steps:
        raise UsageError(f"--sweep-step must be <= --steps ({a.steps}), got {a.sweep_step}")
    if not (math.isfinite(a.sweep_range) and a.sweep_range > 0):
        raise UsageError(f"--sweep-range must be a positive number, got {a.sweep_range}")
    if a.data_dir is not None and not os.path.isdir(a.data_dir):
        raise UsageError(f"--data-dir: no such folder {a.data_dir!r}")
    resolve_device(a.device)
    return Config(optimizers=specs, task=a.task, steps=a.steps, eval_every=a.eval_every, seeds=parse_seeds(a.seeds),
                  sigmas=sigmas, absolute=a.absolute, eps=eps, pgd_steps=a.pgd_steps, subsample=a.subsample,
                  sweep_step=a.sweep_step, sweep_coords=a.sweep_coords, sweep_range=a.sweep_range,
                  batch_size=a.batch_size, threads=a.threads, device=a.device, data_dir=a.data_dir, out=a.out,
                  resume=a.resume, progress=not a.no_progress)


def label_of(spec: str) -> str:
    """A zoo entry's name, or a file's folder and name (results/x/optimizer.pt -> x/optimizer.pt)."""
    if spec.startswith(mnist_mlp.ZOO):
        return spec[len(mnist_mlp.ZOO):]
    path = os.path.abspath(spec)
    return os.path.join(os.path.basename(os.path.dirname(path)), os.path.basename(path))


def input_state(task, model, opt, batch):
    """(feats, hidden) that the optimizer would read next if ``batch`` were the next minibatch: the
    gradient at the current parameters, through the optimizer's own features. The model's buffers
    are restored (nothing the run does next depends on the probe)."""
    saved = {k: v.clone() for k, v in model.named_buffers()}
    params = list(model.parameters())
    grads = torch.autograd.grad(task.loss(model(batch[0]), batch[1]), params)
    model.load_state_dict({**model.state_dict(), **saved})
    flat = torch.cat([g.reshape(-1) for g in grads]).to(next(opt.lopt.parameters()).dtype)
    state = opt.opt_state
    feats, _ = opt.lopt.features(flat, state)
    return feats.detach(), state.hidden


def smoothness_probe(cfg: Config, task, seed: int):
    """``probe(model, optimizer)`` for :func:`train_optimizee`: R_ε, u_rms and rel at every evaluation."""
    batch = task.sample_batch(torch.Generator().manual_seed(PROBE_SEED + seed))

    def probe(model, opt):
        feats, hidden = input_state(task, model, opt, batch)
        gen = torch.Generator().manual_seed(input_noise_seed(PROBE_SEED + seed, opt.opt_state.step))
        out = {"input_rms": float(feats.pow(2).mean().sqrt())}
        for e in cfg.eps:
            m = measure_smoothness(opt.lopt, feats, hidden, e, steps=cfg.pgd_steps, subsample=cfg.subsample,
                                   generator=gen)
            out.update({f"R_eps{e:g}": m["R"], f"Rnoise_eps{e:g}": m["R_noise"], f"rel_eps{e:g}": m["rel"]})
            out["u_rms"] = m["u_rms"]
        return out
    return probe


def response_run(cfg: Config, task, lopt, seed: int) -> dict:
    """Train to ``--sweep-step`` with normal states, then take the response curve there."""
    taken = {}

    def probe(model, opt):
        if opt.opt_state.step == cfg.sweep_step:
            feats, hidden = input_state(task, model, opt, task.sample_batch(torch.Generator().manual_seed(PROBE_SEED + seed)))
            gen = torch.Generator().manual_seed(PROBE_SEED + seed)
            coords = torch.randperm(feats.shape[0], generator=gen)[:cfg.sweep_coords].tolist()
            rms = float(feats.pow(2).mean().sqrt())
            deltas = [rms * cfg.sweep_range * (2 * k / (SWEEP_POINTS - 1) - 1) for k in range(SWEEP_POINTS)]
            curve = response_curve(opt.lopt, feats, hidden, coords, deltas)
            taken.update(step=cfg.sweep_step, coords=coords, input=[float(feats[i].reshape(-1)[0]) for i in coords],
                         input_rms=rms, deltas=deltas, response=curve.t().tolist())
        return {}
    rec = train_optimizee(task, lambda ps: l2l_zoo.LearnedOptimizerAdapter(ps, lopt), steps=cfg.sweep_step,
                          seed=seed, eval_every=max(1, cfg.sweep_step), progress=False, eval_splits=("train",),
                          divergence_loss=DIVERGENCE_LOSS, probe=probe)
    if not taken:
        taken["error"] = f"the run stopped before step {cfg.sweep_step}: {rec.get('error')}"
    return taken


def main(argv=None) -> int:
    cfg = parse_config(argv)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    with output_folder(cfg.out):
        return _main(cfg)


def _main(cfg: Config) -> int:
    from tqdm.auto import tqdm
    log = tqdm.write
    t_start = time.perf_counter()
    device = resolve_device(cfg.device)
    task = make_task(cfg.task, data_dir=cfg.data_dir, device=device, batch_size=cfg.batch_size)
    log(f"[data] {task.data.note}")
    log(f"[setup] task {cfg.task} ({task.num_params:,} parameters) on {device}; out: {cfg.out}")
    results = runs.new_results("smoothness_probe", asdict(cfg), data=task.data.summary())
    cache = runs.RunCache(os.path.join(cfg.out, "runs"), enabled=cfg.resume)
    setup = {"task": cfg.task, "steps": cfg.steps, "eval_every": cfg.eval_every, "batch_size": cfg.batch_size,
             "device": cfg.device, "data": task.data.summary()}
    probe_setup = {"eps": cfg.eps, "pgd_steps": cfg.pgd_steps, "subsample": cfg.subsample, "probe_seed": PROBE_SEED,
                   "starts": list(STARTS)}
    results["diff"], results["smoothness"], results["response"], results["optimizers"] = {}, {}, {}, {}
    for spec in cfg.optimizers:
        lopt, extra, digest = mnist_mlp.load_learned(spec)
        lopt = lopt.to(device)
        name = label_of(spec)
        results["optimizers"][name] = {"spec": spec, "sha256": digest, "name": lopt.name, "config": lopt.config,
                                       "num_meta_parameters": lopt.num_meta_parameters(), **extra}
        for seed in cfg.seeds:
            unit = {**setup, "optimizer": digest, "seed": seed, "probe": probe_setup}
            results["runs"].setdefault(name, []).append(cache.run(unit, lambda: train_optimizee(
                task, lambda ps: l2l_zoo.LearnedOptimizerAdapter(ps, lopt), steps=cfg.steps, seed=seed,
                eval_every=cfg.eval_every, divergence_loss=DIVERGENCE_LOSS, progress=cfg.progress,
                desc=f"{name} seed {seed}", log=log, probe=smoothness_probe(cfg, task, seed)),
                name=f"normal-seed{seed}"))
            for sigma in cfg.sigmas:
                noisy = PerturbedInput(lopt, std=sigma, relative=not cfg.absolute, seed=seed)
                u = {**setup, "optimizer": digest, "seed": seed, "input_noise": noisy.config["input_noise"]}
                results["runs"].setdefault(f"{name} σ={sigma:g}", []).append(cache.run(u, lambda: train_optimizee(
                    task, lambda ps: l2l_zoo.LearnedOptimizerAdapter(ps, noisy), steps=cfg.steps, seed=seed,
                    eval_every=cfg.eval_every, divergence_loss=DIVERGENCE_LOSS, progress=cfg.progress,
                    desc=f"{name} σ={sigma:g} seed {seed}", log=log), name=f"sigma{sigma:g}-seed{seed}"))
        if cfg.sweep_coords:
            u = {**setup, "optimizer": digest, "seed": cfg.seeds[0], "sweep": [cfg.sweep_step, cfg.sweep_coords,
                                                                              cfg.sweep_range, SWEEP_POINTS]}
            results["response"][name] = cache.run(u, lambda: response_run(cfg, task, lopt, cfg.seeds[0]),
                                                  name=f"response-seed{cfg.seeds[0]}")
        results["smoothness"][name] = smoothness_summary(results["runs"][name], cfg.eps)
        results["diff"][name] = {f"{s:g}": loss_diff(results["runs"][name], results["runs"][f"{name} σ={s:g}"])
                                 for s in cfg.sigmas}
    results["summary"] = {label: runs.summarize(recs) for label, recs in results["runs"].items()}
    results["wall_s"] = time.perf_counter() - t_start
    runs.write_json(os.path.join(cfg.out, "results.json"), results)
    plot(results, cfg, os.path.join(cfg.out, "curves.png"))
    report(results, cfg, log)
    log(f"results: {os.path.join(cfg.out, 'results.json')}  plot: {os.path.join(cfg.out, 'curves.png')}  "
        f"({results['wall_s']:.0f} s)")
    return 0


def _mean_std(vals):
    vals = [v for v in vals if v is not None and math.isfinite(v)]
    if not vals:
        return None, None
    m = sum(vals) / len(vals)
    return m, math.sqrt(sum((v - m) ** 2 for v in vals) / len(vals))


def smoothness_summary(records, eps) -> dict:
    """Per ε: R_ε and rel averaged over each run's evaluations, then mean ± std over seeds."""
    out = {}
    for e in eps:
        for key in (f"R_eps{e:g}", f"Rnoise_eps{e:g}", f"rel_eps{e:g}"):
            per_seed = [_mean_std(r["eval"].get(key, []))[0] for r in records]
            out[key], out[f"{key}_std"] = _mean_std(per_seed)
    out["u_rms"], out["u_rms_std"] = _mean_std([_mean_std(r["eval"].get("u_rms", []))[0] for r in records])
    return out


def loss_diff(normal, perturbed, metrics=("train_loss", "test_loss")) -> dict:
    """diff = loss_ps − loss_ns per evaluation step (Fig. 7), mean ± std over the seeds where neither
    run diverged, and the same at the last step relative to loss_ns."""
    out = {"diverged": sum(r["diverged_at"] is not None for r in perturbed), "n_seeds": len(perturbed)}
    pairs = [(n, p) for n, p in zip(normal, perturbed) if n["diverged_at"] is None and p["diverged_at"] is None]
    if not pairs:
        return out
    out["step"] = pairs[0][0]["eval"]["step"]
    for m in metrics:
        cols = [[pv - nv if pv is not None and nv is not None else None
                 for nv, pv in zip(n["eval"][m], p["eval"][m])] for n, p in pairs]
        stats = [_mean_std(list(c)) for c in zip(*cols)]
        out[m], out[f"{m}_std"] = [s[0] for s in stats], [s[1] for s in stats]
        rel = [(p["final"][m] - n["final"][m]) / n["final"][m] for n, p in pairs]
        out[f"{m}_final_rel"], out[f"{m}_final_rel_std"] = _mean_std(rel)
    return out


def report(results, cfg: Config, log) -> None:
    f = lambda v, d=3: "n/a" if v is None else f"{v:.{d}g}"  # noqa: E731
    log(f"\nsmoothness along the normal runs (mean over evaluations, then over {len(cfg.seeds)} seed(s)):")
    log("(R: the largest PGD value from the regularizer's random start and the two ±ε corners; R_noise: from the "
        "random start alone, the estimate training penalises)")
    log(f"{'optimizer':<28}{'u_rms':>10}" + "".join(
        f"{'R ε=' + format(e, 'g'):>13}{'R_noise':>11}{'rel':>9}" for e in cfg.eps))
    for name, s in results["smoothness"].items():
        log(f"{name:<28}{f(s['u_rms']):>10}" + "".join(
            f"{f(s[f'R_eps{e:g}']):>13}{f(s[f'Rnoise_eps{e:g}']):>11}{f(s[f'rel_eps{e:g}']):>9}" for e in cfg.eps))
    if cfg.sigmas:
        log(f"\nperturbed input states (σ {'absolute' if cfg.absolute else 'relative to the state rms'}): final "
            f"train loss, (loss_ps − loss_ns) / loss_ns at step {cfg.steps}, mean ± std over seeds")
        for name, per in results["diff"].items():
            base = results["summary"][name]
            log(f"{name:<28} normal {f(base.get('train_loss'), 4)}")
            for s, d in per.items():
                ps = results["summary"][f"{name} σ={s}"]
                rel, rel_std = d.get("train_loss_final_rel"), d.get("train_loss_final_rel_std")
                rel_txt = "n/a" if rel is None else f"{rel:+.3f} ± {rel_std:.3f}"
                log(f"{'':<28} σ={s:<6} {f(ps.get('train_loss'), 4):>10}  rel. diff {rel_txt}"
                    f"  diverged {d['diverged']}/{d['n_seeds']}")


def plot(results, cfg: Config, path) -> None:
    """Train loss of every run, and rel_ε along the normal runs (the figures of the paper are
    paper_figs/fig_smoothness.py's)."""
    series = {}
    for label, recs in results["runs"].items():
        s = {}
        for m in ["train_loss"] + [f"rel_eps{e:g}" for e in cfg.eps]:
            x, mean, std = runs.mean_curve(recs, m)
            if x:
                s.update({"x": x, m: mean, f"{m}_std": std})
        series[label] = s
    plot_curves(path, series, title=f"{cfg.task}: normal and perturbed input states",
                panels=[("train_loss", "train loss")] + [(f"rel_eps{e:g}", f"√R_ε / u_rms, ε = {e:g}") for e in cfg.eps])


if __name__ == "__main__":
    run_main(main)
