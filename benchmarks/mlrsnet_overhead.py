#!/usr/bin/env python
"""Wall-clock overhead of MLR-SNet against plain SGD on the same model, in one process.

    python benchmarks/mlrsnet_overhead.py                  # CPU: small CNN on CIFAR-10, batch 128
    python benchmarks/mlrsnet_overhead.py --device cuda --arch lenet --steps 1000

Contenders, each with its own copy of the same initial model and the same minibatches:
* ``sgd``: forward, backward, ``torch.optim.SGD.step()`` with a fixed rate (the reference);
* ``mlrsnet_test``: Algorithm 2 (meta-test) — the same, driven by ``MLRSNetController.step(loss)``
  (backward, the rate of 3 switched nets, the optimizer step: what a user pays to use a meta-learned
  schedule);
* ``mlrsnet_train``: Algorithm 1 (meta-training) with ``--t-val`` (default 100, the paper's): every
  step also runs the schedule net, every T_val-th step a ``higher`` virtual step and a validation
  forward/backward and an Adam step on MLR-SNet;
* ``adapter`` (for information): MLR-SNet as a ``LearnedOptimizer`` through the ``torch.optim`` adapter
  (flat gradient vector, pure update, base direction computed by MLR-SNet itself).

Timing: the contenders take their steps interleaved (one step each, in a shuffled order, repeated
``--steps`` times), so that the load of a shared machine hits all of them alike; the total time per
contender over all steps is compared with ``sgd``'s (and, for robustness, the median of the ratios
over consecutive chunks of T_val steps). Targets (issue 3): meta-test ≤ 1.05x, meta-training with
T_val = 100 ≤ 1.2x. Prints the ratios and writes them to ``--out`` (JSON). Not timed: Algorithm 2's
γ recomputation at the k − 1 net switches (one pass over the training set each: a per-run cost,
amortised over a whole training run, not a per-step one).
"""
from __future__ import annotations

import os
import random
import statistics
import sys
import time
from functools import partial

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import l2l_zoo  # noqa: E402
from l2l_zoo import MLRSNet  # noqa: E402
from l2l_zoo import runs  # noqa: E402
from l2l_zoo.cli import ArgumentParser, UsageError, output_file, resolve_device, run_main  # noqa: E402
from l2l_zoo.meta.mlrsnet import MLRSNetMetaTrainer, MLRSNetTrainConfig  # noqa: E402
from l2l_zoo.schedules.mlrsnet import MLRSNetController  # noqa: E402
from l2l_zoo.tasks import ConvNet, LeNet, MLP, Task, load_dataset  # noqa: E402

TARGETS = {"mlrsnet_test": 1.05, "mlrsnet_train": 1.2}


def ce(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


class AdapterStepper:
    def __init__(self, model, net):
        self.model = model
        self.opt = l2l_zoo.LearnedOptimizerAdapter(model.parameters(), net)

    def step(self, batch):
        self.opt.zero_grad(set_to_none=True)
        loss = ce(self.model, batch)
        loss.backward()
        self.opt.step(loss=loss.detach())


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__.split("\n\n")[0], epilog="The module docstring says what is timed.")
    p.add_argument("--arch", default="cnn", help="model: cnn (3-layer CNN, --channels), lenet (LeNet-5) or mlp "
                   "(3072-500-10), all on CIFAR-10")
    p.add_argument("--channels", type=int, default=16, help="channels of the cnn (as benchmarks/mlrsnet_cifar.py)")
    p.add_argument("--batch-size", type=int, default=128, help="minibatch size")
    p.add_argument("--steps", type=int, default=400,
                   help="timed steps per contender (a multiple of --t-val is fairest)")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps per contender first")
    p.add_argument("--t-val", type=int, default=100, help="steps between MLR-SNet meta-updates (paper: 100)")
    p.add_argument("--no-adapter", action="store_true", help="skip the adapter contender")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for torch (0 = torch's default)")
    p.add_argument("--seed", type=int, default=0, help="seed of models, batches and the interleaving order")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--data-dir", default=None, help="dataset folder (default: $L2L_ZOO_DATA, then ./data)")
    p.add_argument("--out", default=os.path.join("results", "mlrsnet_overhead.json"), help="results JSON path")
    a = p.parse_args(argv)
    for flag, val, lo in (("--steps", a.steps, 1), ("--warmup", a.warmup, 0), ("--t-val", a.t_val, 1),
                          ("--batch-size", a.batch_size, 1), ("--channels", a.channels, 1),
                          ("--threads", a.threads, 0)):
        if val < lo:
            raise UsageError(f"{flag} must be >= {lo}, got {val}")
    archs = {"cnn": partial(ConvNet, 3, a.channels, 10, 32), "lenet": partial(LeNet, 3, 10, 32),
             "mlp": partial(MLP, 3072, (500,), 10)}
    if a.arch not in archs:
        raise UsageError(f"--arch must be one of {sorted(archs)}, got {a.arch!r}")
    if a.warmup + a.steps < 3:
        raise UsageError(f"--warmup + --steps must be >= 3 (the meta-test contender switches between 3 nets), "
                         f"got {a.warmup} + {a.steps}")
    if a.data_dir is not None and not os.path.isdir(a.data_dir):
        raise UsageError(f"--data-dir: no such folder {a.data_dir!r}")
    device = resolve_device(a.device)
    if a.threads:
        torch.set_num_threads(a.threads)
    with output_file(a.out):
        return _main(a, archs, device)


def _main(a, archs, device) -> int:
    data = load_dataset("cifar10", a.data_dir, seed=0)
    task = Task(f"cifar10_{a.arch}", archs[a.arch], data, batch_size=a.batch_size, device=device)
    print(f"[data] {data.note}")
    gen = torch.Generator().manual_seed(a.seed)
    batches = [task.sample_batch(gen) for _ in range(16)]
    val_batches = [task.sample_batch(gen, "val") for _ in range(4)]
    torch.manual_seed(a.seed)
    nets = [MLRSNet(num_classes=10) for _ in range(3)]
    total = a.warmup + a.steps

    def sgd_model():
        m = task.build_model(seed=a.seed)
        return m, torch.optim.SGD(m.parameters(), lr=0.05, weight_decay=5e-4)

    m, o = sgd_model()
    steppers = {"sgd": runs.OptimizerStepper(m, o, ce)}
    m, o = sgd_model()
    steppers["mlrsnet_test"] = runs.ControllerStepper(m, MLRSNetController(
        o, nets, total_steps=total, gamma=0.1 / 0.5, recompute_gamma=False), ce)
    m, o = sgd_model()
    vb = iter(range(10 ** 9))
    steppers["mlrsnet_train"] = MLRSNetMetaTrainer(
        MLRSNet(num_classes=10), m, o, loss_fn=ce, val_batch_fn=lambda: val_batches[next(vb) % 4],
        config=MLRSNetTrainConfig(t_val=a.t_val), gamma=0.2)
    if not a.no_adapter:
        m, _ = sgd_model()
        steppers["adapter"] = AdapterStepper(m, MLRSNet(num_classes=10, gamma=0.2, weight_decay=5e-4))
    names = list(steppers)
    times = {n: [] for n in names}
    rng = random.Random(a.seed)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    from tqdm.auto import tqdm
    for i in tqdm(range(total), desc="interleaved steps", dynamic_ncols=True):
        order = names[:]
        rng.shuffle(order)
        for n in order:
            sync()
            t0 = time.perf_counter()
            steppers[n].step(batches[i % len(batches)])
            sync()
            if i >= a.warmup:
                times[n].append(time.perf_counter() - t0)
    ref = sum(times["sgd"])
    chunk = a.t_val if a.steps >= a.t_val else a.steps
    res = {"per_step_ms": {}, "ratio": {}, "ratio_chunk_median": {}, "targets": TARGETS, "meets_target": {}}
    # The meta-trainer's meta-updates fall on its own steps 0, T_val, 2·T_val, ...: the warm-up shifts
    # them, but every window of T_val consecutive timed steps still holds exactly one.
    for n in names:
        res["per_step_ms"][n] = 1000 * sum(times[n]) / len(times[n])
        res["ratio"][n] = sum(times[n]) / ref
        chunks = [sum(times[n][j:j + chunk]) / sum(times["sgd"][j:j + chunk])
                  for j in range(0, len(times[n]) - chunk + 1, chunk)]
        res["ratio_chunk_median"][n] = statistics.median(chunks) if chunks else None
        if n in TARGETS:
            res["meets_target"][n] = res["ratio"][n] <= TARGETS[n]
    results = runs.new_results("mlrsnet_overhead", vars(a), data={"note": data.note})
    results["summary"] = res
    results.update(device=str(device), model=task.name, num_params=task.num_params)
    runs.write_json(a.out, results)
    print(f"\nmodel {task.name} ({task.num_params:,} parameters), batch {a.batch_size}, {a.steps} timed steps each, "
          f"T_val={a.t_val}, device {device}")
    print(f"{'contender':<16}{'ms/step':>10}{'ratio':>9}{'chunk median':>14}{'target':>9}")
    for n in names:
        tgt = f"<= {TARGETS[n]:.2f}" if n in TARGETS else ""
        cm = res["ratio_chunk_median"][n]
        print(f"{n:<16}{res['per_step_ms'][n]:>10.2f}{res['ratio'][n]:>9.3f}"
              f"{'n/a' if cm is None else f'{cm:.3f}':>14}{tgt:>9}")
    verdict = ", ".join(f"{n} {'meets' if ok else 'MISSES'} its target" for n, ok in res["meets_target"].items())
    print(f"{verdict}\nresults: {a.out}")
    return 0


if __name__ == "__main__":
    run_main(main)
