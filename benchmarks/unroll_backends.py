#!/usr/bin/env python
"""Compare the two unroll backends (``func``: torch.func.functional_call on a flat vector;
``higher``: per-tensor fast weights) on one truncation of meta-training: time per meta-gradient and
agreement of the meta-gradients, in one process.

    python benchmarks/unroll_backends.py                     # SimpleOptimizer on the MNIST MLP
    python benchmarks/unroll_backends.py --opt dm --task lenet --repeats 2

The same seeds give both backends the same optimizee initialisation and minibatches, so their
meta-losses and meta-gradients must agree up to float32 rounding (the float64 equality test is in
tests/test_meta.py). Prints median seconds per truncation and the ratio higher/func; writes JSON.
"""
from __future__ import annotations

import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import l2l_zoo  # noqa: E402
from l2l_zoo import runs  # noqa: E402
from l2l_zoo.cli import ArgumentParser, UsageError, output_file, resolve_device, run_main  # noqa: E402
from l2l_zoo.meta import MetaTrainConfig, MetaTrainer  # noqa: E402
from l2l_zoo.tasks import TASKS, make_task  # noqa: E402


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--opt", default="simple", help="learned optimizer: simple, dm or rnnprop")
    p.add_argument("--task", default="mlp", help=f"optimizee task, one of {sorted(TASKS)}")
    p.add_argument("--unroll", type=int, default=20, help="truncation length")
    p.add_argument("--repeats", type=int, default=3, help="timed truncations per backend (median reported)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--data-dir", default=None, help="dataset folder (default $L2L_ZOO_DATA)")
    p.add_argument("--out", default="results/unroll_backends.json", help="results JSON path")
    a = p.parse_args(argv)
    if a.opt not in ("simple", "dm", "rnnprop"):
        raise UsageError(f"--opt must be simple, dm or rnnprop, got {a.opt!r}")
    if a.task not in TASKS:
        raise UsageError(f"--task must be one of {sorted(TASKS)}, got {a.task!r}")
    if a.unroll < 1 or a.repeats < 1:
        raise UsageError(f"--unroll and --repeats must be >= 1, got {a.unroll}, {a.repeats}")
    if a.data_dir is not None and not os.path.isdir(a.data_dir):
        raise UsageError(f"--data-dir: no such folder {a.data_dir!r}")
    device = resolve_device(a.device)
    with output_file(a.out):
        return _main(a, device)


def _main(a, device) -> int:
    task = make_task(a.task, data_dir=a.data_dir, device=device)
    times = {"func": [], "higher": []}
    grads, losses = {}, {}
    for rep in range(a.repeats):
        for backend in ("func", "higher") if rep % 2 == 0 else ("higher", "func"):
            torch.manual_seed(0)
            lopt = l2l_zoo.create(a.opt).to(device)
            tr = MetaTrainer(lopt, task, MetaTrainConfig(backend=backend, unroll=a.unroll, seed=0), log=print)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            ml, g = tr.meta_gradient()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[backend].append(time.perf_counter() - t0)
            grads[backend] = torch.cat([x.reshape(-1) for x in g])
            losses[backend] = float(ml)
    med = {k: statistics.median(v) for k, v in times.items()}
    rel = float((grads["func"] - grads["higher"]).norm() / grads["func"].norm())
    print(f"{a.opt} on {a.task} ({task.num_params:,} coordinates), {a.unroll}-step truncation, device {device}")
    for k, v in med.items():
        print(f"  {k:<8}{v:8.2f} s per truncation (median of {a.repeats})   meta-loss {losses[k]:.6g}")
    print(f"  higher/func time ratio {med['higher'] / med['func']:.2f}; meta-gradient relative difference {rel:.2e}")
    results = runs.new_results("unroll_backends", vars(a), data=task.data.summary())
    results["summary"] = {"median_s": med, "ratio_higher_over_func": med["higher"] / med["func"],
                          "meta_loss": losses, "meta_gradient_rel_diff": rel}
    results["seconds"] = times
    runs.write_json(a.out, results)
    print(f"results: {a.out}")
    return 0


if __name__ == "__main__":
    run_main(main)
