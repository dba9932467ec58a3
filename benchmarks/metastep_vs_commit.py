#!/usr/bin/env python
"""Time the flagship meta-step of this checkout against the same meta-step of another commit, on this
machine, now: the same-machine baseline for a speed-up claim (issue 10's 3x target was set against
commit 7b66ef6 on another machine).

    python benchmarks/metastep_vs_commit.py                       # against 7b66ef6, 2 rounds
    python benchmarks/metastep_vs_commit.py --commit HEAD~5 --rounds 3 --device cuda

A meta-step is one truncation of the flagship's meta-training (SimpleOptimizer on the MNIST MLP
784-500-10, batch 128, 20 optimizee steps unrolled, the meta-backward and Adam's step), through each
version's public ``MetaTrainer`` with the same settings, plain and with the smoothness regularizer
(``--smooth``). The other commit is checked out into a temporary ``git worktree`` (removed at the
end); each version runs in its own process (two versions of a package cannot share one), the two
alternating ``--rounds`` times so that drifts of the machine hit both; each process reports the median
of its meta-steps after the first. Prints and writes (``--out``) every round's medians and the ratio
of the medians over rounds (commit / this checkout).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from l2l_zoo import runs  # noqa: E402
from l2l_zoo.cli import ArgumentParser, UsageError, output_file, resolve_device, run_main  # noqa: E402
from l2l_zoo.regularizers import parse_smooth  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs in a fresh interpreter with the library of one version first on sys.path (argv: root, JSON settings).
WORKER = r'''
import json, statistics, sys, time
root, s = sys.argv[1], json.loads(sys.argv[2])
sys.path.insert(0, root)
import torch
import l2l_zoo
from l2l_zoo.meta import MetaTrainConfig, MetaTrainer
from l2l_zoo.regularizers import SmoothnessConfig
from l2l_zoo.tasks import make_task
assert l2l_zoo.__file__.startswith(root), f"imported {l2l_zoo.__file__}, not the version under {root}"
if s["threads"]:
    torch.set_num_threads(s["threads"])
device = torch.device(s["device"])
task = make_task("mlp", data_dir=s["data_dir"], device=device)
out = {}
for label, smooth in (("plain", None), ("smooth", SmoothnessConfig(**s["smooth"]))):
    torch.manual_seed(0)
    lopt = l2l_zoo.create("simple").to(device)
    tr = MetaTrainer(lopt, task, MetaTrainConfig(meta_steps=s["meta_steps"], horizon=200, unroll=20, smooth=smooth,
                                                 seed=0), log=lambda m: None)
    stamps = []

    def stamp(step, rec):
        if device.type == "cuda":
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
    tr.train(progress=False, callback=stamp)
    out[label] = statistics.median([b - a for a, b in zip(stamps, stamps[1:])])
print("RESULT " + json.dumps(out))
'''


def parse(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0], epilog="See the module docstring.")
    p.add_argument("--commit", default="7b66ef6", help="the other version: any git revision of this repository")
    p.add_argument("--rounds", type=int, default=2, help="alternating runs of the two versions")
    p.add_argument("--meta-steps", type=int, default=14, help="meta-steps per version and setting (median of all "
                   "but the first)")
    p.add_argument("--smooth", default="eps=0.1", help="the smoothed setting's --smooth spec")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads in each process (0: torch's default)")
    p.add_argument("--device", default="cpu", help="auto, cpu or cuda")
    p.add_argument("--data-dir", default=None, help="dataset folder; must exist if given (default $L2L_ZOO_DATA)")
    p.add_argument("--out", default=os.path.join("results", "metastep_vs_commit.json"), help="results JSON path")
    a = p.parse_args(argv)
    for flag, v, lo in (("--rounds", a.rounds, 1), ("--meta-steps", a.meta_steps, 3), ("--threads", a.threads, 0)):
        if v < lo:
            raise UsageError(f"{flag} must be an integer >= {lo}, got {v}")
    try:
        a.smooth_cfg = parse_smooth(a.smooth)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if a.data_dir is not None and not os.path.isdir(a.data_dir):
        raise UsageError(f"--data-dir: no such folder {a.data_dir!r}")
    a.device = str(resolve_device(a.device))
    r = subprocess.run(["git", "-C", ROOT, "rev-parse", "--verify", "--quiet", f"{a.commit}^{{commit}}"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise UsageError(f"--commit {a.commit!r} is not a commit of the repository at {ROOT} (git rev-parse failed)")
    a.commit_sha = r.stdout.strip()
    return a


def run_version(root: str, settings: dict) -> dict:
    # the worker runs in the version's folder: a relative $L2L_ZOO_DATA (CI's ../shared/data) would point
    # elsewhere from there, so it gets the absolute data folder
    r = subprocess.run([sys.executable, "-c", WORKER, root, json.dumps(settings)], capture_output=True, text=True,
                       cwd=root, env={**os.environ, "PYTHONPATH": root, "L2L_ZOO_DATA": settings["data_dir"]})
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if r.returncode != 0 or line is None:
        raise RuntimeError(f"timing the version at {root} failed (exit {r.returncode}): {r.stderr.strip()[-800:]}")
    return json.loads(line[len("RESULT "):])


def main(argv=None) -> int:
    a = parse(argv)
    data_dir = os.path.abspath(a.data_dir or os.environ.get("L2L_ZOO_DATA") or "data")
    settings = {"threads": a.threads, "device": a.device, "data_dir": data_dir, "meta_steps": a.meta_steps,
                "smooth": {k: v for k, v in a.smooth_cfg.to_dict().items()}}
    with output_file(a.out), tempfile.TemporaryDirectory(prefix="metastep_vs_commit_") as tmp:
        base = os.path.join(tmp, "base")
        r = subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", "--force", base, a.commit_sha],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"git worktree add failed: {r.stderr.strip()}")
        try:
            rounds = []
            for k in range(a.rounds):
                row = {"commit": run_version(base, settings), "checkout": run_version(ROOT, settings)}
                rounds.append(row)
                print(f"round {k + 1}: " + "; ".join(
                    f"{label} {row['commit'][label]:.3f} s ({a.commit}) vs {row['checkout'][label]:.3f} s (this "
                    f"checkout): {row['commit'][label] / row['checkout'][label]:.2f}x" for label in ("plain", "smooth")))
        finally:
            subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", base], capture_output=True)
        summary = {}
        for label in ("plain", "smooth"):
            c = statistics.median(r["commit"][label] for r in rounds)
            h = statistics.median(r["checkout"][label] for r in rounds)
            summary[label] = {"commit_s": c, "checkout_s": h, "speedup": c / h}
            print(f"{label}: {a.commit} {c:.3f} s, this checkout {h:.3f} s per meta-step: {c / h:.2f}x")
        res = runs.new_results("metastep_vs_commit", {k: v for k, v in vars(a).items() if k != "smooth_cfg"})
        res.update(rounds=rounds, summary=summary, settings=settings)
        runs.write_json(a.out, res)
    print(f"results: {a.out}")
    return 0


if __name__ == "__main__":
    run_main(main)
