#!/usr/bin/env python
"""MLR-SNet (Shu et al., TPAMI 2022) on CIFAR-10 at CPU scale: meta-train online (Algorithm 1) with a
small CNN, then transfer the saved nets (Algorithm 2) to MNIST, to another architecture and to a 3x
longer horizon, against tuned hand-designed schedules; the authors' released nets too.

    python benchmarks/mlrsnet_cifar.py                       # CPU defaults: 26 min on 2 cores at load ~7
    python benchmarks/mlrsnet_cifar.py --epochs 200 --t-val 100 --channels 32 --device cuda --seeds 3
    python benchmarks/mlrsnet_cifar.py --resume              # continue an interrupted run
    torchrun --nproc_per_node 4 benchmarks/mlrsnet_cifar.py --device cuda   # meta-training data-parallel

Protocol.
* Data: CIFAR-10 and MNIST from ``$L2L_ZOO_DATA`` through the core loaders (with only the official
  test sets on disk: seeded, class-stratified train/val/test carves, printed). The validation split
  (``--n-meta`` images, paper: 1000; 100 = 10 per class as in §4.4) is MLR-SNet's clean meta-data
  and the baselines' tuning set; test accuracy is reported.
* Meta-training (§4.1.1 at CPU scale): ``--arch`` CNN on CIFAR-10, base SGD (momentum
  ``--momentum``, default 0 as the paper and the authors' code), weight decay 5e-4, batch 128,
  ``--epochs`` epochs, MLR-SNet's rate every step, a meta-update every ``--t-val`` steps (paper 100;
  default 5 because the default CPU-scale run has 376 steps, ~200x fewer than the paper's 78,200), Adam(1e-3, wd
  1e-4) on φ, γ from the initial mean training loss, a snapshot of φ per epoch.
* Meta-test (Algorithm 2, §4.2): the k = ``--k`` snapshots at epochs ⌈E·l/k⌉ schedule a fresh model's
  training in consecutive k-ths, γ recomputed from the mean training loss at each switch, LSTM
  state carried. Tasks: ``cifar`` (the meta-training task, new initialisations), ``mnist`` (dataset
  and modality change: MLP 784-500-10 on MNIST), ``arch`` (architecture change: LeNet-5 on CIFAR-10),
  ``long`` (``--long-factor`` x more steps). The authors' released CIFAR-10/ResNet-18 nets
  (``mlr_snet_official``, epochs 1/100/200, meta-test gate layout) are run on the same tasks.
* Baselines (§3.1 eq. 4, §4.1.1 settings rescaled to the horizon): fixed, MultiStep (x0.1 at 30/60/90
  %), exponential (x0.95 per 1/200 of training), SGDR (first period 1/20 of training, T_mult 2),
  each with α0 tuned over ``--lr-grid`` by final validation accuracy on the first seed, with the same
  base optimizer as MLR-SNet (``--baseline-momentum`` to give them momentum, as §4.2.1 does). On
  ``long`` the α0 tuned on ``cifar`` is reused with the schedule rescaled, as §4.2.2 does.

Under ``torchrun`` the meta-training (Algorithm 1) is data-parallel: every process draws the same
minibatch indices and trains on its 1/WORLD_SIZE share of each training and meta-data minibatch
(:class:`~l2l_zoo.meta.MLRSNetMetaTrainer` averages losses, gradients and meta-gradients over the
processes, as DDP would), so the batch stays ``--batch-size`` in total; rank 0 alone writes ``--out``
and runs the meta-test and the baselines after it (the others stop after meta-training).

Outputs in ``--out`` (locked while the script runs): ``results.json`` (the ``l2l_zoo.runs`` schema:
full config, environment, data notes, meta-training run, tuning records, every run's per-step loss
and rate and periodic validation/test metrics under ``"<task>/<method>"`` labels, summary),
``mlrsnet_cifar.png`` (``paper_figs/fig_mlrsnet.py``), the k selected nets (``nets/mlrsnet_*.pt``,
``l2l_zoo.load`` reads them) and checkpoints so that ``--resume`` loses nothing (meta-training and
every run checkpoint every epoch; finished runs are reused only when everything they depend on is
unchanged).
"""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from functools import partial

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import l2l_zoo  # noqa: E402
from l2l_zoo import MLRSNet  # noqa: E402
from l2l_zoo import runs  # noqa: E402
from l2l_zoo.cli import (ArgumentParser, UsageError, distributed_main, parse_autocast,  # noqa: E402
                         parse_choices, parse_floats, parse_seeds, resolve_device, run_main,
                         torchrun_world_size)
from l2l_zoo.meta.distributed import dist_world, my_share  # noqa: E402
from l2l_zoo.meta.mlrsnet import MLRSNetMetaTrainer, MLRSNetTrainConfig, select_snapshots  # noqa: E402
from l2l_zoo.schedules.baselines import BASELINES as HAND_DESIGNED, make_baseline  # noqa: E402
from l2l_zoo.schedules.mlrsnet import MLRSNetController  # noqa: E402
from l2l_zoo.tasks import ConvNet, LeNet, MLP, Task, load_dataset  # noqa: E402

TRANSFERS = ("cifar", "mnist", "arch", "long")
ARCHS = ("cnn", "lenet")


@dataclass
class Config:
    epochs: int
    batch_size: int
    arch: str
    channels: int
    momentum: float
    weight_decay: float
    t_val: int
    meta_lr: float
    meta_weight_decay: float
    n_meta: int
    layout: str
    k: int
    transfers: list
    long_factor: int
    lr_grid: list
    schedules: list
    baseline_momentum: float
    official: bool
    seeds: list
    meta_seed: int
    data_seed: int
    evals: int
    threads: int
    autocast: str | None
    device: str
    data_dir: str | None
    out: str
    resume: bool
    progress: bool


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n\n")[0], epilog="The module docstring has the protocol.")
    p.add_argument("--epochs", type=int, default=8,
                   help="epochs of meta-training and of every 1x transfer run (paper: 200)")
    p.add_argument("--batch-size", type=int, default=128, help="minibatch size of all training runs (paper: 128)")
    p.add_argument("--arch", default="cnn", help=f"meta-training architecture on CIFAR-10, one of {list(ARCHS)}: "
                   "cnn = 3x[conv3x3-ReLU-maxpool] + linear (the core ConvNet), lenet = LeNet-5")
    p.add_argument("--channels", type=int, default=16, help="channels of the cnn (core ConvNet: 32)")
    p.add_argument("--momentum", type=float, default=0.0,
                   help="momentum of the SGD base optimizer under MLR-SNet (paper and authors' code: 0)")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="weight decay of every SGD run (paper: 5e-4)")
    p.add_argument("--t-val", type=int, default=5,
                   help="steps between meta-updates of MLR-SNet (paper: 100, authors' code: 300)")
    p.add_argument("--meta-lr", type=float, default=1e-3, help="Adam learning rate on MLR-SNet (paper: 1e-3)")
    p.add_argument("--meta-weight-decay", type=float, default=1e-4, help="Adam weight decay on MLR-SNet (paper: 1e-4)")
    p.add_argument("--n-meta", type=int, default=1000,
                   help="held-out clean meta-data images, stratified (paper: 1000; 100 = 10 per class)")
    p.add_argument("--layout", default="meta-train",
                   help="gate layout of the net we meta-train: meta-train (i,f-1,o,g) or meta-test (i,f,g,o)")
    p.add_argument("--k", type=int, default=3,
                   help="saved nets used for consecutive parts of a meta-test run (paper: 3)")
    p.add_argument("--transfers", default=",".join(TRANSFERS),
                   help=f"meta-test tasks, comma list from {list(TRANSFERS)} or 'none'")
    p.add_argument("--long-factor", type=int, default=3, help="horizon multiplier of the 'long' task")
    p.add_argument("--lr-grid", default="0.3,0.1,0.03", help="initial learning rates tried for each baseline schedule")
    p.add_argument("--schedules", default=",".join(HAND_DESIGNED),
                   help=f"hand-designed baselines, comma list from {list(HAND_DESIGNED)} or 'none'")
    p.add_argument("--baseline-momentum", type=float, default=None,
                   help="momentum of the baselines' SGD (default: the same as --momentum; the paper's "
                        "meta-test gives them 0.9)")
    p.add_argument("--no-official", action="store_true", help="skip the authors' released nets")
    p.add_argument("--seeds", default="1", help="evaluation seeds: a count N (0..N-1) or a comma list")
    p.add_argument("--meta-seed", type=int, default=0,
                   help="seed of meta-training (model init, data order, MLR-SNet init)")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the train/val/test carves")
    p.add_argument("--evals", type=int, default=8, help="validation/test evaluations per run (plus step 0)")
    p.add_argument("--autocast", default="none",
                   help="none or bfloat16: every training run's forward passes (meta-training's real and virtual "
                        "steps, meta-test, baselines) under torch.autocast; evaluations stay float32")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for torch (1 is fastest on a shared, busy CPU; 0 = torch's default)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--data-dir", default=None, help="dataset folder (default: $L2L_ZOO_DATA, then ./data)")
    p.add_argument("--out", default=os.path.join("results", "mlrsnet_cifar"), help="output folder")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def parse_config(argv=None) -> Config:
    a = build_parser().parse_args(argv)
    for flag, val, lo in (("--epochs", a.epochs, 1), ("--batch-size", a.batch_size, 1), ("--channels", a.channels, 1),
                          ("--t-val", a.t_val, 1), ("--n-meta", a.n_meta, 10), ("--k", a.k, 1),
                          ("--long-factor", a.long_factor, 1), ("--evals", a.evals, 1), ("--threads", a.threads, 0),
                          ("--meta-seed", a.meta_seed, 0), ("--data-seed", a.data_seed, 0)):
        if val < lo:
            raise UsageError(f"{flag} must be >= {lo}, got {val}")
    for flag, val in (("--weight-decay", a.weight_decay), ("--meta-weight-decay", a.meta_weight_decay)):
        if not (math.isfinite(val) and val >= 0):
            raise UsageError(f"{flag} must be a number >= 0, got {val}")
    for flag, val in (("--momentum", a.momentum), ("--baseline-momentum", a.baseline_momentum)):
        if val is not None and not (math.isfinite(val) and 0 <= val < 1):
            raise UsageError(f"{flag} must be in [0, 1), got {val}")
    if a.n_meta > 5000:
        raise UsageError(f"--n-meta must be <= 5000 (it is carved out of the training images), got {a.n_meta}")
    if a.data_dir is not None and not os.path.isdir(a.data_dir):
        raise UsageError(f"--data-dir: no such folder {a.data_dir!r}")
    if not (math.isfinite(a.meta_lr) and a.meta_lr > 0):
        raise UsageError(f"--meta-lr must be > 0, got {a.meta_lr}")
    if a.arch not in ARCHS:
        raise UsageError(f"--arch must be one of {list(ARCHS)}, got {a.arch!r}")
    if a.layout not in ("meta-train", "meta-test"):
        raise UsageError(f"--layout must be meta-train or meta-test, got {a.layout!r}")
    resolve_device(a.device)
    autocast_dtype = parse_autocast(a.autocast)
    world = torchrun_world_size()
    if world > 1:  # under torchrun: each process takes an equal share of every minibatch
        for flag, n in (("--batch-size", a.batch_size), ("--n-meta (the meta-data minibatch)",
                                                         min(a.batch_size, a.n_meta))):
            if n % world:
                raise UsageError(f"{flag} {n} must be a multiple of WORLD_SIZE={world} (each process trains "
                                 "on an equal share of every minibatch)")
    return Config(epochs=a.epochs, batch_size=a.batch_size, arch=a.arch, channels=a.channels, momentum=a.momentum,
                  weight_decay=a.weight_decay, t_val=a.t_val, meta_lr=a.meta_lr,
                  meta_weight_decay=a.meta_weight_decay, n_meta=a.n_meta, layout=a.layout, k=a.k,
                  transfers=parse_choices(a.transfers, TRANSFERS, "--transfers"), long_factor=a.long_factor,
                  lr_grid=parse_floats(a.lr_grid, "--lr-grid"),
                  schedules=parse_choices(a.schedules, HAND_DESIGNED, "--schedules"),
                  baseline_momentum=a.momentum if a.baseline_momentum is None else a.baseline_momentum,
                  official=not a.no_official, seeds=parse_seeds(a.seeds), meta_seed=a.meta_seed,
                  data_seed=a.data_seed, evals=a.evals, threads=a.threads,
                  autocast=autocast_dtype, device=a.device, data_dir=a.data_dir,
                  out=a.out, resume=a.resume, progress=not a.no_progress)


# ---------------------------------------------------------------------------------- tasks

def make_tasks(cfg: Config, device) -> dict:
    """name -> (Task, steps). The validation split is the meta-data / tuning set."""
    cifar = load_dataset("cifar10", cfg.data_dir, n_val=cfg.n_meta, seed=cfg.data_seed)
    archs = {"cnn": (f"cnn{cfg.channels}", partial(ConvNet, 3, cfg.channels, 10, 32)),
             "lenet": ("lenet5", partial(LeNet, 3, 10, 32))}
    name, fn = archs[cfg.arch]
    cifar_task = Task(f"cifar10_{name}", fn, cifar, batch_size=cfg.batch_size, device=device)
    steps = cfg.epochs * math.ceil(len(cifar.y_train) / cfg.batch_size)
    tasks = {"cifar": (cifar_task, steps)}
    if "mnist" in cfg.transfers:
        mnist = load_dataset("mnist", cfg.data_dir, n_val=cfg.n_meta, seed=cfg.data_seed)
        tasks["mnist"] = (Task("mnist_mlp", partial(MLP, 784, (500,), 10), mnist, batch_size=cfg.batch_size,
                               device=device), cfg.epochs * math.ceil(len(mnist.y_train) / cfg.batch_size))
    if "arch" in cfg.transfers:
        other = "lenet" if cfg.arch == "cnn" else "cnn"
        oname, ofn = archs[other]
        tasks["arch"] = (Task(f"cifar10_{oname}", ofn, cifar, batch_size=cfg.batch_size, device=device), steps)
    if "long" in cfg.transfers:
        tasks["long"] = (cifar_task, steps * cfg.long_factor)
    return tasks


def ce(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def evaluator(task: Task, model):
    """Validation and test metrics; under torchrun (during the data-parallel meta-training) each
    process evaluates its share of the splits and the sums are all-reduced."""
    def evaluate():
        vl, va = task.evaluate(model, "val", distributed=True)
        tl, ta = task.evaluate(model, "test", distributed=True)
        return {"val_loss": vl, "val_acc": va, "test_loss": tl, "test_acc": ta}
    return evaluate


def sgd(model, lr, momentum, wd):
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=wd)


# ---------------------------------------------------------------------------------- runs

# Which results each field decides (a test checks that every field is classified).
SELECTION_KEYS = ("seeds", "transfers", "schedules", "lr_grid", "official")
NO_RESULT_KEYS = ("out", "resume", "progress")
DIVERGENCE_LOSS = 1e4


class Runner:
    """Runs one training run (checkpointed every epoch, resumable) and caches finished ones under a
    hash of everything they depend on."""

    def __init__(self, cfg: Config, log):
        self.cfg, self.log = cfg, log
        self.ckpt_dir = os.path.join(cfg.out, "ckpt")
        self.cache = runs.RunCache(os.path.join(cfg.out, "runs"), enabled=cfg.resume)
        self.setup = runs.without_later_defaults({k: v for k, v in asdict(cfg).items()
                                                  if k not in SELECTION_KEYS + NO_RESULT_KEYS})

    def unit(self, method: dict, task: Task, steps: int, seed: int) -> dict:
        return {**self.setup, "method": method, "steps": steps, "seed": seed, "task": task.name,
                "data": task.data.summary()}

    def train(self, key, unit, task, steps, seed, stepper, gens, *, keep_final=False, batch=None):
        spe = math.ceil(len(task.data.y_train) / task.batch_size)
        batch = batch or (lambda: task.sample_batch(gens["data"]))
        return runs.train(stepper, lambda aux: batch(), steps=steps,
                          evaluate=evaluator(task, stepper.model), eval_every=max(1, steps // self.cfg.evals),
                          divergence_loss=DIVERGENCE_LOSS,
                          checkpoint=os.path.join(self.ckpt_dir, f"{key}-{runs.config_hash(unit)}.pt"),
                          checkpoint_every=spe, identity=unit, generators=gens, resume=self.cfg.resume,
                          keep_final=keep_final, progress=self.cfg.progress, desc=key, log=self.log)

    def run(self, key: str, method: dict, task: Task, steps: int, seed: int, make_stepper) -> dict:
        unit = self.unit(method, task, steps, seed)

        def compute():
            model = task.build_model(seed=seed)
            stepper = make_stepper(model)
            gen = torch.Generator().manual_seed(10_000 + seed)
            torch.manual_seed(seed)
            rec = self.train(key, unit, task, steps, seed, stepper, {"data": gen})
            rec["seed"] = seed
            ctl = getattr(stepper, "controller", None)
            if isinstance(ctl, MLRSNetController):
                rec["gammas"] = ctl.gammas
            return rec
        return self.cache.run(unit, compute, name=key)


def shard(batch):
    """This process's equal share of a minibatch under torch.distributed (the whole batch otherwise)."""
    world, _ = dist_world()
    if world == 1:
        return batch
    n = len(batch[1])
    if n % world:
        raise ValueError(f"a minibatch of {n} does not split into {world} equal shares")
    part = my_share(n)
    return tuple(t[part] for t in batch)


def meta_train(cfg: Config, task: Task, steps: int, runner: Runner, log):
    """Algorithm 1 on the CIFAR-10 task; returns (run record, trainer). The final state is kept in its
    checkpoint, so a resumed run gets the trained snapshots back without training again. Under
    torchrun, data-parallel (module docstring)."""
    torch.manual_seed(cfg.meta_seed)
    net = MLRSNet(layout=cfg.layout, num_classes=10)
    spe = math.ceil(len(task.data.y_train) / task.batch_size)
    model = task.build_model(seed=cfg.meta_seed)
    opt = sgd(model, 1.0, cfg.momentum, cfg.weight_decay)
    gval = torch.Generator().manual_seed(20_000 + cfg.meta_seed)
    tcfg = MLRSNetTrainConfig(t_val=cfg.t_val, meta_lr=cfg.meta_lr, meta_weight_decay=cfg.meta_weight_decay,
                              snapshot_every=spe, autocast=cfg.autocast)
    # γ's training loss (once, at the start; it scales every rate): whole on every process, exactly
    # as one process computes it, not sharded like the evaluations. Sharding would save one forward
    # pass per run but sums in another order, and the last-bit change of γ grows into a visibly
    # different trajectory within ~15 steps at these rates (tried: 3e-4 relative by step 16)
    trainer = MLRSNetMetaTrainer(net, model, opt, loss_fn=ce,
                                 val_batch_fn=lambda: shard(task.sample_batch(gval, "val")),
                                 config=tcfg, train_loss_fn=lambda: task.evaluate(model, "train")[0], log=log)
    gen = torch.Generator().manual_seed(10_000 + cfg.meta_seed)
    unit = runner.unit({"what": "meta-train"}, task, steps, cfg.meta_seed)
    torch.manual_seed(cfg.meta_seed)
    rec = runner.train("metatrain", unit, task, steps, cfg.meta_seed, trainer, {"data": gen, "val": gval},
                       keep_final=True, batch=lambda: shard(task.sample_batch(gen)))
    world, _ = dist_world()
    if world > 1:  # the processes are done with each other; rank 0 meta-tests alone
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    rec["world_size"] = world
    rec.update(seed=cfg.meta_seed, gamma=trainer.gamma, meta_failures=trainer.total_failures,
               meta_updates=sum(v is not None for v in rec["step_log"].get("meta_loss", [])),
               snapshot_steps=[t for t, _ in trainer.snapshots], config=tcfg.to_dict(), net_config=net.config)
    return rec, trainer


def final(run, key):
    return None if not run.get("final") else run["final"].get(key)


# ---------------------------------------------------------------------------------- main

def main(argv=None) -> int:
    cfg = parse_config(argv)  # under torchrun: rank 0 owns --out, the others only meta-train
    return distributed_main(resolve_device(cfg.device), cfg.out, lambda: _main(cfg), lambda: _main(cfg, worker=True))


def _main(cfg: Config, worker: bool = False) -> int:
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    from tqdm.auto import tqdm
    log = (lambda s: None) if worker else tqdm.write
    if worker:
        cfg = replace(cfg, progress=False)
        cifar_task, T = make_tasks(cfg, device)["cifar"]
        meta_train(cfg, cifar_task, T, Runner(cfg, log), log)
        return 0
    t_start = time.perf_counter()
    tasks = make_tasks(cfg, device)
    for name, (task, steps) in tasks.items():
        log(f"[data] {name}: {task.name} ({task.num_params:,} parameters), {steps} steps; {task.data.note}")
    runner = Runner(cfg, log)
    result = runs.new_results("mlrsnet_cifar", asdict(cfg),
                              data={n: {**t.data.summary(), "task": t.name, "steps": s, "num_params": t.num_params}
                                    for n, (t, s) in tasks.items()})
    result["tasks"] = {}

    def add(task_name, label, recs):
        key = f"{task_name}/{label}"
        result["runs"][key] = recs
        result["tasks"].setdefault(task_name, []).append(key)

    # 1. Meta-training (Algorithm 1).
    cifar_task, T = tasks["cifar"]
    mt_run, trainer = meta_train(cfg, cifar_task, T, runner, log)  # MetaUpdateFailed: exit 4
    result["meta_training"] = {k: v for k, v in mt_run.items() if k not in ("step_log", "eval")}
    nets = []
    if mt_run["diverged_at"] is not None or not trainer.snapshots:
        msg = (f"meta-training diverged at step {mt_run['diverged_at']} (saved {len(trainer.snapshots)} "
               f"snapshots): our nets are not transferred")
        result["notes"].append(msg)
        log(f"[meta-train] {msg}")
    else:
        idx = select_snapshots(len(trainer.snapshots), cfg.k)
        nets = trainer.snapshot_nets(idx)
        for i, (j, n) in enumerate(zip(idx, nets)):
            l2l_zoo.save(n, os.path.join(cfg.out, "nets", f"mlrsnet_{i + 1}.pt"), epoch=j + 1,
                         meta_task=cifar_task.name)
        mt_run["selected_epochs"] = result["meta_training"]["selected_epochs"] = [j + 1 for j in idx]
        log(f"[meta-train] {T} steps, {mt_run['meta_updates']} meta-updates, γ={mt_run['gamma']:.4f}, final test "
            f"acc {final(mt_run, 'test_acc')}, nets kept from epochs {mt_run['selected_epochs']}")
    add("cifar", "MLR-SNet (meta-train run)", [mt_run])

    official = None
    if cfg.official:
        d = os.path.join(cfg.data_dir or os.environ.get("L2L_ZOO_DATA") or "data", "mlr_snet_official")
        paths = [os.path.join(d, f"mlr_snet_{e}.pth") for e in (1, 100, 200)]
        if all(os.path.isfile(p) for p in paths):
            official = [MLRSNet.from_official_checkpoint(p, layout="meta-test", num_classes=10) for p in paths]
        else:
            msg = f"official nets not found in {d}: skipped"
            result["notes"].append(msg)
            log(f"[official] {msg}")

    # 2. Meta-test on every task, and the tuned baselines.
    for name, (task, steps) in tasks.items():
        C = task.data.num_classes
        mlr_sets = [("MLR-SNet (ours, transferred)", "ours", [copy_with_classes(n, C) for n in nets])] if nets else []
        if official is not None:
            mlr_sets.append(("MLR-SNet (official nets)", "official", [copy_with_classes(n, C) for n in official]))
        for label, tag, ns in mlr_sets:
            def make(model, ns=ns, task=task, steps=steps):
                opt = sgd(model, 0.0, cfg.momentum, cfg.weight_decay)
                ctl = MLRSNetController(opt, ns, total_steps=steps,
                                        train_loss_fn=lambda: task.evaluate(model, "train")[0])
                return runs.ControllerStepper(model, ctl, ce, autocast=cfg.autocast)
            method = {"method": label, "nets": [{k: v.tolist() for k, v in n.state_dict().items()} for n in ns]
                      if tag == "ours" else "official"}
            add(name, label, [runner.run(f"{name}_{tag}_seed{s}", method, task, steps, s, make) for s in cfg.seeds])
        for sched in cfg.schedules:
            def make_b(lr, sched=sched, steps=steps):
                def make(model):
                    opt = sgd(model, lr, cfg.baseline_momentum, cfg.weight_decay)
                    return runs.OptimizerStepper(model, opt, ce, scheduler=make_baseline(
                        sched, opt, total_steps=steps, preset="mlrsnet"), autocast=cfg.autocast)
                return make
            cifar_key = f"cifar/{sched}"
            if name == "long" and cifar_key in result["tuning"] and result["tuning"][cifar_key]["best"] is not None:
                best = result["tuning"][cifar_key]["best"]
                result["tuning"][f"{name}/{sched}"] = {"best": best, "from": "cifar (§4.2.2)"}
            else:
                tuned = runs.tune(cfg.lr_grid, lambda lr: runner.run(
                    f"{name}_{sched}_lr{lr:g}_seed{cfg.seeds[0]}", {"method": sched, "lr": lr}, task, steps,
                    cfg.seeds[0], make_b(lr)), criterion="val_acc", note=f"seed {cfg.seeds[0]}")
                result["tuning"][f"{name}/{sched}"] = tuned.to_dict()
                best = tuned.best
                if best is None:
                    result["notes"].append(f"{name}/{sched}: every α0 of the grid diverged; not evaluated")
                    continue
            add(name, f"{sched} (α0={best:g})", [
                runner.run(f"{name}_{sched}_lr{best:g}_seed{s}", {"method": sched, "lr": best}, task, steps, s,
                           make_b(best)) for s in cfg.seeds])
        result["summary"] = {k: runs.summarize(v) for k, v in result["runs"].items()}
        runs.write_json(os.path.join(cfg.out, "results.json"), result)

    result["wall_s"] = time.perf_counter() - t_start
    runs.write_json(os.path.join(cfg.out, "results.json"), result)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "paper_figs"))
    from fig_mlrsnet import plot  # noqa: E402
    plot(result, os.path.join(cfg.out, "mlrsnet_cifar.png"))

    log(f"\n{'task':<7}{'method':<34}{'test acc':>16}{'test loss':>11}{'diverged':>9}")
    for key, s in result["summary"].items():
        name, label = key.split("/", 1)
        acc = "n/a" if s.get("test_acc") is None else f"{100 * s['test_acc']:.2f} ± {100 * s['test_acc_std']:.2f}"
        loss = "n/a" if s.get("test_loss") is None else f"{s['test_loss']:.4f}"
        log(f"{name:<7}{label:<34}{acc:>16}{loss:>11}{s['diverged']:>6}/{s['n_seeds']}")
    log(f"results: {os.path.join(cfg.out, 'results.json')}  plot: {os.path.join(cfg.out, 'mlrsnet_cifar.png')}  "
        f"({result['wall_s']:.0f} s)")
    return 0


def copy_with_classes(net: MLRSNet, num_classes: int) -> MLRSNet:
    """The same schedule net with γ computed for ``num_classes`` classes."""
    out = MLRSNet(**{**net.config, "num_classes": num_classes})
    out.load_state_dict(net.state_dict())
    return out


if __name__ == "__main__":
    run_main(main)
