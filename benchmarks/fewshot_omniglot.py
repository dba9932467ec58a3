#!/usr/bin/env python
"""The few-shot study on omniglot-small (CPU scale): every method, plain and smoothed, over seeds,
next to pixel nearest neighbour and the pretrained backbone's nearest class mean.

    python benchmarks/fewshot_omniglot.py                                  # 5-way 1- and 5-shot, 3 seeds
    python benchmarks/fewshot_omniglot.py --ways 20 --methods sib,ncm,pixelnn
    python benchmarks/fewshot_omniglot.py --methods metalstm,metalstm+smooth --smooth eps=0.1,lam=100 --resume

Every (method, shots, seed) is one ``python -m fewshot.train`` run (same flags, same fixed validation
and test episodes: 600 seeded test episodes unless ``--test-episodes``) in its own sub-folder of
``--out``; with ``--resume`` finished runs are reused (their caches key on the full settings) and a
killed one continues from its checkpoint. ``--smooth 'eps=0.1,lam=10;eps=0.1,lam=100'`` is a grid
for the ``+smooth`` methods (REFERENCE: ε, λ tuned on validation episodes): every spec is run in its
own sub-folder and, per (method, shots, seed), the spec with the best validation accuracy is the one
reported; every candidate's validation and test accuracy is kept under ``"smooth_grid"``. Methods: ``metalstm``, ``metalstm+smooth``, ``sib``,
``sib+smooth``, ``finetune``, ``ncm``, ``pixelnn`` (``+smooth`` adds ``--smooth``).

Reported per (method, shots): the mean over seeds of the test accuracy and, beside it, the mean of
the per-seed 95 % CIs over episodes and the std over seeds; for each smoothed method the
difference smoothed − plain per seed, its mean and a 95 % CI over seeds (t-distribution), whichever
way it falls; and each method's meta-training speed (episodes per second). Outputs: ``results.json``
(the ``l2l_zoo.runs`` schema; every run's record under ``"<method> <N>w<K>s"``), ``fewshot.png``.
"""
from __future__ import annotations

import math
import os
import re
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fewshot import train as fstrain  # noqa: E402
from l2l_zoo import runs  # noqa: E402
from l2l_zoo.cli import ArgumentParser, UsageError, output_folder, parse_seeds, run_main  # noqa: E402
from l2l_zoo.regularizers import parse_smooth  # noqa: E402

METHODS = ("metalstm", "metalstm+smooth", "sib", "sib+smooth", "finetune", "ncm", "pixelnn")
UNSEEDED = ("finetune", "pixelnn")
# two-sided 95 % t quantiles for n - 1 degrees of freedom (n seeds)
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def parse(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0], epilog="See the module docstring.")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list from {list(METHODS)}")
    p.add_argument("--shots", default="1,5", help="comma list of K")
    p.add_argument("--ways", type=int, default=5, help="N")
    p.add_argument("--seeds", default="3", help="meta-training seeds: a count or a comma list")
    p.add_argument("--smooth", default="eps=0.1,lam=100",
                   help="the --smooth spec of the +smooth methods; several specs separated by ';' are a grid "
                        "(e.g. 'eps=0.1,lam=10;eps=0.1,lam=100'): each is run, and per (method, shots, seed) the "
                        "one with the best validation accuracy is reported (test accuracy never selects)")
    p.add_argument("--episodes", type=int, default=None, help="meta-training episodes (default: fewshot.train's)")
    p.add_argument("--test-episodes", type=int, default=600, help="seeded test episodes per run")
    p.add_argument("--val-episodes", type=int, default=50, help="fixed validation episodes per run")
    p.add_argument("--dataset", default="omniglot-small", help="fewshot.train --dataset")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = default)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--data-dir", default=None, help="dataset folder (default: $L2L_ZOO_DATA)")
    p.add_argument("--out", default=os.path.join("results", "fewshot_omniglot"), help="output folder")
    p.add_argument("--resume", action="store_true", help="reuse finished runs with the same settings")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    a = p.parse_args(argv)
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods or len(set(methods)) != len(methods):
        raise UsageError(f"--methods must be a comma list of distinct names from {list(METHODS)}, got {a.methods!r}")
    try:
        shots = [int(s) for s in a.shots.split(",") if s.strip()]
        if not shots or min(shots) < 1:
            raise ValueError
    except ValueError:
        raise UsageError(f"--shots must be a comma list of integers >= 1, got {a.shots!r}") from None
    specs = smooth_specs(a.smooth)
    seeds = parse_seeds(a.seeds)
    runs_ = []
    for k in shots:
        for m in methods:
            # nothing is seeded in pixel NN, nor in fine-tuning (the learner's fixed initialisation, lr and
            # steps tuned on the fixed validation episodes): one run each, whatever --seeds says
            for s in (seeds[:1] if m in UNSEEDED else seeds):
                for spec in (specs if "+smooth" in m else [None]):
                    runs_.append((m, k, s, spec, run_args(a, m, k, s, spec, grid=len(specs) > 1)))
    for *_, args in runs_:  # every run's flags are validated before anything trains
        fstrain.parse_config(args)
    return a, methods, shots, seeds, runs_


def smooth_specs(text: str) -> list[str]:
    """The ';'-separated ``--smooth`` specs, each validated; equal settings given twice are an error."""
    specs = [t.strip() for t in text.split(";") if t.strip()]
    if not specs:
        raise UsageError(f"--smooth must be one or more specs separated by ';', got {text!r}")
    seen = {}
    for spec in specs:
        try:
            key = tuple(sorted(parse_smooth(spec).to_dict().items()))
        except ValueError as e:
            raise UsageError(str(e)) from None
        if key in seen or slug(spec) in {slug(t) for t in seen.values()}:
            raise UsageError(f"--smooth: {spec!r} repeats {seen.get(key, spec)!r}; give each setting once")
        seen[key] = spec
    return specs


def slug(spec: str) -> str:
    """A folder-name form of a --smooth spec: 'eps=0.1,lam=100' -> 'eps0.1_lam100'."""
    return re.sub(r"[^A-Za-z0-9._-]", "", spec.replace(",", "_").replace("=", ""))


def run_args(a, method: str, shots: int, seed: int, spec: str | None = None, grid: bool = False) -> list[str]:
    """fewshot.train's flags for one run; in a --smooth grid each spec has its own sub-folder."""
    base = method.split("+")[0]
    folder = f"{method}_{a.ways}w{shots}s_seed{seed}" + (f"_{slug(spec)}" if grid and spec else "")
    args = ["--method", base, "--dataset", a.dataset, "--ways", str(a.ways), "--shots", str(shots),
            "--seed", str(seed), "--test-episodes", str(a.test_episodes),
            "--out", os.path.join(a.out, folder), "--threads", str(a.threads), "--device", a.device]
    applies = lambda key: base in fstrain.APPLIES[key]  # noqa: E731  (fewshot.train refuses the others)
    if applies("val_episodes"):
        args += ["--val-episodes", str(a.val_episodes)]
    if applies("backbone_cache"):
        args += ["--backbone-cache", os.path.join(a.out, "backbones")]
    if spec is not None:
        args += ["--smooth", spec]
    if a.episodes and applies("episodes"):
        args += ["--episodes", str(a.episodes)]
    if a.data_dir:
        args += ["--data-dir", a.data_dir]
    if a.resume:
        args.append("--resume")
    if a.no_progress:
        args.append("--no-progress")
    return args


def main(argv=None) -> int:
    a, methods, shots, seeds, todo = parse(argv)
    with output_folder(a.out):
        return _main(a, methods, shots, seeds, todo)


def _main(a, methods, shots, seeds, todo) -> int:
    t0 = time.perf_counter()
    results = runs.new_results("fewshot_omniglot", vars(a))
    done = {}  # (method, shots, seed) -> [(spec, record)] in run order
    for i, (m, k, s, spec, args) in enumerate(todo):
        print(f"[{i + 1}/{len(todo)}] {m} {a.ways}-way {k}-shot seed {s}" + (f" --smooth {spec}" if spec else ""),
              flush=True)
        fstrain.main(args)
        res = runs.read_results(os.path.join(args[args.index("--out") + 1], "results.json"), benchmark="fewshot.train")
        (rec,) = next(iter(res["runs"].values()))
        rec["seed"] = s
        done.setdefault((m, k, s), []).append((spec, rec))
        results["data"] = res["data"]
    grid = {}
    for (m, k, s), cands in done.items():
        label = f"{m} {a.ways}w{k}s"
        spec, rec = select_by_validation(cands)
        if len(cands) > 1:
            rec["smooth_selected"] = spec
            grid.setdefault(label, {})[s] = [{"smooth": c, "best_val_acc": r["final"].get("best_val_acc"),
                                               "test_acc": r["final"]["test_acc"]} for c, r in cands]
        results["runs"].setdefault(label, []).append(rec)
    if grid:
        results["smooth_grid"] = grid
    table, diffs = {}, {}
    for label, recs in results["runs"].items():
        accs = [r["final"]["test_acc"] for r in recs]
        table[label] = {**runs.summarize(recs), "n_seeds": len(recs),
                        "test_acc_seed_std": statistics.pstdev(accs) if len(accs) > 1 else 0.0,
                        "mean_episode_ci": statistics.mean(r["final"]["test_ci"] for r in recs)}
    for k in shots:
        for m in methods:
            if "+smooth" not in m:
                continue
            plain, smooth = results["runs"].get(f"{m.split('+')[0]} {a.ways}w{k}s"), results["runs"].get(f"{m} {a.ways}w{k}s")
            if not plain or not smooth:
                continue
            by_seed = {r["seed"]: r["final"]["test_acc"] for r in plain}
            d = [r["final"]["test_acc"] - by_seed[r["seed"]] for r in smooth if r["seed"] in by_seed]
            mean = statistics.mean(d)
            ci = T95.get(len(d) - 1, 1.96) * statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else None
            diffs[f"{m} - {m.split('+')[0]} {a.ways}w{k}s"] = {"per_seed": d, "mean": mean, "ci95_over_seeds": ci}
    results["summary"], results["differences"] = table, diffs
    results["wall_s"] = time.perf_counter() - t0
    runs.write_json(os.path.join(a.out, "results.json"), results)
    plot(table, os.path.join(a.out, "fewshot.png"))
    print(f"\n{'method':<26}{'test acc %':>12}{'± ep. CI':>10}{'seed std':>10}{'seeds':>7}{'train ep/s':>12}")
    for label, t in table.items():
        eps = t.get("train_episodes_per_s")
        print(f"{label:<26}{100 * t['test_acc']:>12.2f}{100 * t['mean_episode_ci']:>10.2f}"
              f"{100 * t['test_acc_seed_std']:>10.2f}{t['n_seeds']:>7}{(f'{eps:.2f}' if eps else '—'):>12}")
    for label, d in diffs.items():
        ci = "n/a (1 seed)" if d["ci95_over_seeds"] is None else f"± {100 * d['ci95_over_seeds']:.2f}"
        print(f"{label}: {100 * d['mean']:+.2f} {ci} points (per seed {[round(100 * x, 2) for x in d['per_seed']]})")
    for label, by_seed in grid.items():
        for s, cands in by_seed.items():
            chosen = next(r for r in results["runs"][label] if r["seed"] == s)["smooth_selected"]
            print(f"{label} seed {s} grid (validation / test %): " + "; ".join(
                f"{c['smooth']}: {100 * (c['best_val_acc'] or float('nan')):.2f} / {100 * c['test_acc']:.2f}"
                + (" <- selected" if c["smooth"] == chosen else "") for c in cands))
    print(f"results: {os.path.join(a.out, 'results.json')}  ({results['wall_s']:.0f} s)")
    return 0


def select_by_validation(cands):
    """The (spec, record) with the highest best validation accuracy; the first on ties or when none has one."""
    best = max(range(len(cands)), key=lambda i: (cands[i][1]["final"].get("best_val_acc") or float("-inf"), -i))
    return cands[best]


def plot(table, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels = list(table)
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(labels)), 3.6))
    ax.bar(range(len(labels)), [100 * table[k]["test_acc"] for k in labels],
           yerr=[100 * table[k]["mean_episode_ci"] for k in labels], capsize=3, color="tab:blue", alpha=0.75)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("test accuracy (%)")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    run_main(main)
