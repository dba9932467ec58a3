#!/usr/bin/env python
"""Time one training step under HD, RTHO and MARTHE against one plain SGD step on the same model,
in one process, and print the ratios (issue 3 target: MARTHE step <= 3.5x the SGD step).

    python benchmarks/schedule_overhead.py                  # CPU, the §5 MNIST MLP
    python benchmarks/schedule_overhead.py --device cuda --batch-size 128

What is timed, per contender, is a whole training step as a user's loop pays it: draw a minibatch,
forward, and then either ``loss.backward(); optimizer.step()`` (plain SGD) or ``ctrl.step(loss)``
(which adds, for HD, one validation gradient; for RTHO and MARTHE also the Hessian-vector product by
double backward and the tangent update). The model is the paper's §5 MLP 784-500-500-500-10
(Glorot init), training and validation minibatches of ``--batch-size`` images from real MNIST when
``$L2L_ZOO_DATA`` / ``--data-dir`` has it (synthetic images of the same shape otherwise: the cost does
not depend on pixel values, except MARTHE's adaptive μ, whose μ = 0 steps skip the Hessian product).
Each contender trains its own copy of the same initial model; timings are medians over interleaved
blocks of ``--block`` steps, so machine noise affects all contenders alike; the verdict uses the
ratio of the medians, and the median of each round's own ratios is printed beside it, with the ratio
of matrix-product FLOPs per step (``torch.utils.flop_counter``). With an exact Hessian-vector
product that FLOP ratio is a floor: for this MLP, HD 2.0x, and RTHO / MARTHE with μ > 0 3.66x
(gradient 3F for a forward of F, Hessian product 6F, validation gradient 3F, less the first layer's
input gradient), so a time ratio under it comes only from the SGD step's non-matmul costs.
RTHO (μ = 1: a Hessian product at every step) is MARTHE's worst case; MARTHE with adaptive μ and β
is the typical case.
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from functools import partial

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from l2l_zoo import runs  # noqa: E402
from l2l_zoo.cli import ArgumentParser, UsageError, output_file, resolve_device, run_main  # noqa: E402
from l2l_zoo.schedules import HD, MARTHE, RTHO  # noqa: E402
from l2l_zoo.tasks import MLP, glorot_init_  # noqa: E402
from l2l_zoo.tasks.data import DataNotFoundError, load_mnist  # noqa: E402

TARGET = 3.5  # MARTHE step / SGD step (issue 3)


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=15, help="timed blocks per contender (median reported)")
    p.add_argument("--block", type=int, default=8, help="training steps per timed block")
    p.add_argument("--warmup", type=int, default=2, help="untimed blocks per contender")
    p.add_argument("--batch-size", type=int, default=100, help="training and validation minibatch size")
    p.add_argument("--beta", type=float, default=1e-5, help="hyper-learning rate of HD, RTHO and MARTHE")
    p.add_argument("--beta-lr", type=float, default=1e-8, help="step size α of MARTHE's adaptive β")
    p.add_argument("--data-dir", default=None, help="dataset folder (default: $L2L_ZOO_DATA, then ./data)")
    p.add_argument("--device", default="cpu", help="auto, cpu or cuda")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = torch's default)")
    p.add_argument("--out", default="results/schedule_overhead.json", help="results JSON path")
    a = p.parse_args(argv)
    for flag, v, lo in (("--repeats", a.repeats, 1), ("--block", a.block, 1), ("--warmup", a.warmup, 0),
                        ("--batch-size", a.batch_size, 1), ("--threads", a.threads, 0)):
        if v < lo:
            raise UsageError(f"{flag} must be an integer >= {lo}, got {v}")
    if not (a.beta >= 0 and a.beta_lr >= 0):
        raise UsageError(f"--beta and --beta-lr must be >= 0, got {a.beta}, {a.beta_lr}")
    if a.batch_size > 700:
        raise UsageError(f"--batch-size must be <= 700 (the validation split), got {a.batch_size}")
    if a.data_dir is not None and not os.path.isdir(a.data_dir):
        raise UsageError(f"--data-dir: no such folder {a.data_dir!r}")
    if a.threads:
        torch.set_num_threads(a.threads)
    device = resolve_device(a.device)
    with output_file(a.out):
        return _main(a, device)


def _main(a, device) -> int:
    try:
        data = load_mnist(a.data_dir, n_train=7000, n_val=700, normalize="unit", download=False).to(device)
        xt, yt, xv, yv, source = data.x_train, data.y_train, data.x_val, data.y_val, data.note
    except DataNotFoundError:
        g = torch.Generator().manual_seed(0)
        xt, yt = torch.rand(7000, 1, 28, 28, generator=g), torch.randint(0, 10, (7000,), generator=g)
        xv, yv = torch.rand(700, 1, 28, 28, generator=g), torch.randint(0, 10, (700,), generator=g)
        xt, yt, xv, yv = (t.to(device) for t in (xt, yt, xv, yv))
        source = "synthetic images (MNIST not found)"
    make_model = partial(MLP, 784, (500, 500, 500), 10)
    torch.manual_seed(0)
    init = glorot_init_(make_model()).state_dict()

    def contender(kind):
        model = make_model().to(device)
        model.load_state_dict(init)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        gen = torch.Generator().manual_seed(1)
        vgen = torch.Generator().manual_seed(2)

        def batch(x, y, g):
            idx = torch.randint(0, len(y), (a.batch_size,), generator=g).to(device)
            return x[idx], y[idx]

        def val_loss():
            xb, yb = batch(xv, yv, vgen)
            return torch.nn.functional.cross_entropy(model(xb), yb)

        ctrl = {"sgd": lambda: None,
                "hd": lambda: HD(opt, val_loss, beta=a.beta),
                "rtho": lambda: RTHO(opt, val_loss, beta=a.beta),
                "marthe": lambda: MARTHE(opt, val_loss, beta=0.0, mu="adaptive", beta_lr=a.beta_lr)}[kind]()
        mus = []

        def steps():
            for _ in range(a.block):
                xb, yb = batch(xt, yt, gen)
                loss = torch.nn.functional.cross_entropy(model(xb), yb)
                if ctrl is None:
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                else:
                    ctrl.step(loss)
                    mus.append(ctrl.last.get("mu"))
            if device.type == "cuda":
                torch.cuda.synchronize()
        return steps, mus

    kinds = ("sgd", "hd", "rtho", "marthe")
    timed, mus = {}, {}
    for k in kinds:
        timed[k], mus[k] = contender(k)
    for _ in range(a.warmup):
        for r in timed.values():
            r()
    # FLOPs per step (matrix products; torch's own counter), over one untimed block each: the
    # floor that a step-time ratio can only undercut through the baseline's non-matmul costs.
    flops = {}
    for k, r in timed.items():
        with FlopCounterMode(display=False) as fc:
            r()
        flops[k] = fc.get_total_flops() / a.block
    flop_ratios = {f"{k}/sgd": flops[k] / flops["sgd"] for k in kinds[1:]}
    samples = {k: [] for k in kinds}
    for _ in range(a.repeats):  # interleaved
        for k, r in timed.items():
            t = time.perf_counter()
            r()
            samples[k].append((time.perf_counter() - t) / a.block)
    ms = {k: 1e3 * statistics.median(v) for k, v in samples.items()}
    ratios = {f"{k}/sgd": ms[k] / ms["sgd"] for k in kinds[1:]}
    # the same ratios from each round's own blocks (paired: slow drifts of the machine cancel)
    paired = {f"{k}/sgd": statistics.median(a / b for a, b in zip(samples[k], samples["sgd"]))
              for k in kinds[1:]}
    frac_mu0 = sum(m == 0.0 for m in mus["marthe"]) / max(1, len(mus["marthe"]))
    print(f"training step of the MLP 784-500-500-500-10 (batch {a.batch_size}, validation batch {a.batch_size}), "
          f"device {device}, {torch.get_num_threads()} thread(s), median of {a.repeats} blocks of {a.block} steps")
    print(f"  data: {source}")
    for k, v in ms.items():
        print(f"  {k:<10}{v:9.2f} ms/step")
    for k, v in ratios.items():
        verdict = f"  target <= {TARGET:g}: " + ("met" if v <= TARGET else "NOT met") if k != "hd/sgd" else ""
        print(f"  {k:<12}{v:7.2f}x  (median of per-round ratios {paired[k]:.2f}x; FLOP ratio "
              f"{flop_ratios[k]:.2f}x){verdict}")
    print(f"  (MARTHE's adaptive μ was 0, skipping the Hessian product, on {100 * frac_mu0:.0f}% of its steps; "
          "RTHO is its worst case)")
    results = runs.new_results("schedule_overhead", vars(a), data={"note": source})
    results["summary"] = {"median_ms_per_step": ms, "ratios": ratios, "paired_ratios": paired,
                          "flop_ratios": flop_ratios, "target": TARGET, "marthe_frac_mu0": frac_mu0}
    results.update(device=str(device), flops_per_step=flops,
                   samples_ms={k: [1e3 * s for s in v] for k, v in samples.items()})
    runs.write_json(a.out, results)
    print(f"results: {a.out}")
    return 0


if __name__ == "__main__":
    run_main(main)
