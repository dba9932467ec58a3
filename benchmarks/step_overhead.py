#!/usr/bin/env python
"""Time one optimizer step of each learned optimizer on the 784→500→10 MLP (batch 128) against
``torch.optim.Adam``'s step and against one matrix multiply of the same FLOP count, in one process.

    python benchmarks/step_overhead.py                 # CPU, prints ratios, writes JSON
    python benchmarks/step_overhead.py --device cuda

What is timed: ``optimizer.step()`` with gradients already in ``.grad`` (the learned optimizers go
through the ``torch.optim`` adapter, i.e. what a user's training loop pays: gathering gradients, the
network, applying updates). The reference matrix multiply has the FLOP count of the DM/RNNProp
network's matrix products over all coordinates (elementwise work not counted) and is shaped
(n × k)·(k × k) with n = 397,510 coordinates, i.e. the same problem shape; a square product of the
same FLOP count, which runs at the machine's peak, is reported too. Targets (issue 2): SimpleOptimizer
≤ 10× Adam; DM and RNNProp ≤ 2× the matrix multiply. Timings are medians over interleaved repeats, so
machine noise affects all contenders alike.
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
from l2l_zoo.tasks import MLP  # noqa: E402

# Multiply-add FLOPs per coordinate of each network's matrix products (2 FLOPs per MAC).
FLOPS_PER_COORD = {
    "dm": 2 * (2 + 20) * 80 + 2 * (20 + 20) * 80 + 2 * 20,                  # 9,960
    "rnnprop": 2 * 2 * 20 + 2 * (2 * (20 + 20) * 80) + 2 * 20,              # 12,920
}


def timer(fn, device):
    def run():
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t
    return run


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=15, help="timed repeats per contender (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed warm-up calls per contender")
    p.add_argument("--device", default="cpu", help="auto, cpu or cuda")
    p.add_argument("--out", default="results/step_overhead.json", help="results JSON path")
    a = p.parse_args(argv)
    if a.repeats < 1 or a.warmup < 0:
        raise UsageError(f"--repeats must be >= 1 and --warmup >= 0, got {a.repeats}, {a.warmup}")
    device = resolve_device(a.device)
    with output_file(a.out):
        return _main(a, device)


def _main(a, device) -> int:
    torch.manual_seed(0)
    model = MLP().to(device)
    x = torch.randn(128, 784, device=device)
    y = torch.randint(0, 10, (128,), device=device)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    n = sum(g.numel() for g in grads)

    contenders = {}

    def with_grads(opt):
        def step():
            for p, g in zip(model.parameters(), grads):
                p.grad = g
            opt.step()
        return step

    contenders["adam"] = with_grads(torch.optim.Adam(model.parameters(), lr=1e-3))
    for name in ("simple", "dm", "rnnprop"):
        torch.manual_seed(0)
        contenders[name] = with_grads(l2l_zoo.LearnedOptimizerAdapter(model.parameters(), l2l_zoo.create(name)))
    for name, flops in FLOPS_PER_COORD.items():
        k = max(1, round((flops / 2) ** 0.5))  # (n × k)·(k × k) costs 2·n·k² FLOPs
        A = torch.randn(n, k, device=device)
        B = torch.randn(k, k, device=device)
        contenders[f"matmul_{name}"] = lambda A=A, B=B: A @ B
        m = max(1, round((flops * n / 2) ** (1 / 3)))
        S = torch.randn(m, m, device=device)
        contenders[f"square_matmul_{name}"] = lambda S=S: S @ S
    timed = {k: timer(v, device) for k, v in contenders.items()}
    for _ in range(a.warmup):
        for r in timed.values():
            r()
    samples = {k: [] for k in timed}
    for _ in range(a.repeats):  # interleaved, so load changes hit every contender alike
        for k, r in timed.items():
            samples[k].append(r())
    ms = {k: 1e3 * statistics.median(v) for k, v in samples.items()}
    ratios = {"simple/adam": ms["simple"] / ms["adam"],
              "dm/matmul": ms["dm"] / ms["matmul_dm"], "rnnprop/matmul": ms["rnnprop"] / ms["matmul_rnnprop"],
              "dm/square_matmul": ms["dm"] / ms["square_matmul_dm"],
              "rnnprop/square_matmul": ms["rnnprop"] / ms["square_matmul_rnnprop"],
              "dm/adam": ms["dm"] / ms["adam"], "rnnprop/adam": ms["rnnprop"] / ms["adam"]}
    targets = {"simple/adam": 10.0, "dm/matmul": 2.0, "rnnprop/matmul": 2.0}
    print(f"optimizer step on the 784-500-10 MLP ({n:,} coordinates), device {device}, median of {a.repeats}")
    for k, v in ms.items():
        print(f"  {k:<24}{v:10.2f} ms")
    for k, v in ratios.items():
        t = targets.get(k)
        verdict = "" if t is None else (f"  target <= {t:g}: " + ("met" if v <= t else "NOT met"))
        print(f"  {k:<24}{v:10.2f}x{verdict}")
    results = runs.new_results("step_overhead", vars(a))
    results["summary"] = {"median_ms": ms, "ratios": ratios, "targets": targets}
    results.update(device=str(device), coordinates=n, flops_per_coordinate=FLOPS_PER_COORD,
                   samples_ms={k: [1e3 * s for s in v] for k, v in samples.items()})
    runs.write_json(a.out, results)
    print(f"results: {a.out}")
    return 0


if __name__ == "__main__":
    run_main(main)
