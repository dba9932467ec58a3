"""Train and test a few-shot method on N-way K-shot episodes.

    python -m fewshot.train --method metalstm --dataset omniglot-small --ways 5 --shots 1
    python -m fewshot.train --method metalstm --dataset omniglot-small --shots 5 --smooth eps=0.1,lam=1000
    python -m fewshot.train --method sib --dataset omniglot-small --ways 20 --shots 1
    python -m fewshot.train --method finetune --dataset omniglot-small --shots 5
    python -m fewshot.train --method metalstm --dataset miniimagenet --shots 5 --episodes 50000 --device cuda

Methods:
* ``metalstm``: Meta-LSTM (Ravi & Larochelle 2017): the coordinate-wise LSTM meta-learner with a
  learned initialisation c₀ trains a Conv-4 learner on each episode's support set for T inner updates
  and is meta-trained on the query loss; ``--preset official`` (the authors' Lua code: 5-shot 8 updates
  of batch 25, 1-shot 12 updates of batch 5) or ``markdtw`` (the PyTorch port the smoothness paper used;
  5-shot). With ``--smooth``, Algorithm 2 of the smoothness paper (λ·Σ_t R_t added to the query loss).
* ``sib``: SIB (Hu et al. 2020) on a frozen backbone pretrained here by cosine-classifier
  classification over the training classes (Conv-4-64; ``--backbone wrn`` with
  ``--backbone-checkpoint`` for the authors' WRN-28-10), features cached; ``--smooth`` penalises the
  synthetic-gradient network on the query logits.
* ``finetune``: the Ravi & Larochelle baseline: the same Conv-4 from the same initialisation,
  fine-tuned on the support set by SGD; learning rate and number of steps tuned on validation episodes.
* ``ncm``: nearest class mean of the pretrained backbone's normalised features (SIB with K = 0).
* ``pixelnn``: nearest neighbour on raw pixels (no training).

Protocol: class-disjoint train/validation/test splits; meta-training episodes from the training
classes, model selection on a fixed list of ``--val-episodes`` validation episodes (every
``--val-every`` meta-steps, best kept), test on ``--test-episodes`` seeded episodes (default 600) with
the mean and 95 % CI (1.96·std/√n). Default budgets fit CPU runs of ≤ 30 minutes on omniglot-small
(``--episodes``: Meta-LSTM 500, SIB 3000; the papers use 50,000-75,000 on miniImageNet: pass them).

Scale (Meta-LSTM, SIB): ``--meta-batch B`` averages the meta-gradients of B episodes per meta-step
(``--episodes`` counts meta-steps); under ``torchrun`` (``torchrun --nproc_per_node P -m fewshot.train
--method metalstm --meta-batch B ...``, B a multiple of P) each process runs its share of every
meta-step's episodes and meta-gradients are all-reduced; Meta-LSTM validates on rank 0, SIB shares the
validation episodes out too; rank 0 alone tests and writes ``--out``. SIB's backbone is pretrained by
rank 0 and broadcast. ``--autocast bfloat16`` (Meta-LSTM): the learner's forward passes in bfloat16.

Outputs in ``--out`` (locked while running): ``results.json`` (the ``l2l_zoo.runs`` schema: config,
environment, the splits used, the validation curve, test accuracy ± CI with the per-episode
accuracies, wall times and episodes per second), ``val_curve.png`` and ``model.pt`` (read by
``python -m fewshot.evaluate``); checkpoints, so that ``--resume`` continues a killed run exactly and
reuses only what was computed with the same settings.
"""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch

import l2l_zoo
from l2l_zoo import runs
from l2l_zoo.cli import (ArgumentParser, UsageError, distributed_main, parse_autocast, parse_floats, plot_curves,
                         resolve_device, run_main, torchrun_world_size)
from l2l_zoo.meta.distributed import dist_world, rank0_decides
from l2l_zoo.regularizers import parse_smooth

from . import metalstm as mlstm
from .data import DATASETS, EpisodeSampler, load_fewshot, mean_ci
from .finetune import LR_GRID as FT_LR_GRID
from .finetune import STEPS_GRID as FT_STEPS_GRID

METHODS = ("metalstm", "sib", "finetune", "ncm", "pixelnn")
DEFAULT_EPISODES = {"metalstm": 500, "sib": 3000}
DEFAULT_PRETRAIN_STEPS = 800
SIB_DNI_INITS = ("random", "zero")
PARALLEL_METHODS = ("metalstm", "sib")  # --meta-batch and torchrun
BACKBONE_METHODS = ("sib", "ncm")
# The methods each method-specific flag applies to. Giving one to another method is a one-line error:
# it would do nothing, yet enter the run's identity (so the cache would rerun an identical run).
APPLIES = {"smooth": PARALLEL_METHODS, "preset": ("metalstm",), "episodes": PARALLEL_METHODS,
           "val_every": PARALLEL_METHODS, "val_episodes": ("metalstm", "sib", "finetune", "ncm"),
           "filters": ("metalstm", "finetune"), "inner_steps": ("metalstm",), "meta_lr": ("metalstm",),
           "backbone": BACKBONE_METHODS, "backbone_checkpoint": BACKBONE_METHODS,
           "pretrain_steps": BACKBONE_METHODS, "backbone_cache": BACKBONE_METHODS, "sib_dni_init": ("sib",),
           "meta_batch": PARALLEL_METHODS, "autocast": ("metalstm",),
           "finetune_lrs": ("finetune",), "finetune_steps": ("finetune",)}
# Their values when not given (argparse's default is None, so that "given" can be told apart)
DEFAULTS = {"preset": "official", "val_episodes": 50, "filters": 32, "backbone": "conv4",
            "pretrain_steps": DEFAULT_PRETRAIN_STEPS, "sib_dni_init": "random", "meta_batch": 1, "autocast": "none"}


@dataclass
class Config:
    method: str
    dataset: str
    ways: int
    shots: int
    queries: int
    smooth: str | None
    preset: str
    episodes: int
    val_episodes: int
    val_every: int
    test_episodes: int
    seed: int
    filters: int
    inner_steps: int | None
    meta_lr: float | None
    backbone: str
    backbone_checkpoint: str | None
    pretrain_steps: int
    backbone_cache: str | None
    sib_dni_init: str
    threads: int
    device: str
    data_dir: str | None
    meta_batch: int
    autocast: str | None
    finetune_lrs: list
    finetune_steps: list
    out: str
    resume: bool
    progress: bool


NO_RESULT_KEYS = ("out", "resume", "progress", "backbone_cache")


def identity(cfg: "Config") -> dict:
    """What a run's results depend on: the config without output/progress settings (and without
    the later fields at their defaults, ``runs.LATER_DEFAULTS`` and the fine-tuning grid); the number
    of processes is not part of it."""
    return runs.without_later_defaults({k: v for k, v in asdict(cfg).items() if k not in NO_RESULT_KEYS},
                                       {**runs.LATER_DEFAULTS, "finetune_lrs": list(FT_LR_GRID),
                                        "finetune_steps": list(FT_STEPS_GRID)})


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m fewshot.train", description=__doc__.split("\n\n")[0],
                       epilog="See the module docstring (python -c 'import fewshot.train; help(fewshot.train)').")
    p.add_argument("--method", required=True, help=f"one of {list(METHODS)}")
    p.add_argument("--dataset", default="omniglot-small", help=f"one of {list(DATASETS)}")
    p.add_argument("--ways", type=int, default=5, help="N: classes per episode")
    p.add_argument("--shots", type=int, default=1, help="K: labelled support examples per class")
    p.add_argument("--queries", type=int, default=15, help="Q: query examples per class")
    p.add_argument("--smooth", default=None, metavar="SPEC",
                   help="smoothness regularizer (metalstm, sib): eps=E[,lam=L,steps=K,step_size=S,noise=N,"
                        "subsample=M], as benchmarks/mnist_mlp.py --smooth")
    p.add_argument("--preset", default=None, help="metalstm protocol and initialisation: official (default) or markdtw")
    p.add_argument("--episodes", type=int, default=None,
                   help=f"meta-training episodes (default {DEFAULT_EPISODES}; the papers: 50,000-75,000)")
    p.add_argument("--val-episodes", type=int, default=None,
                   help="fixed validation episodes for model selection (metalstm, sib, ncm) or tuning (finetune); "
                        f"default {DEFAULTS['val_episodes']}")
    p.add_argument("--val-every", type=int, default=None,
                   help="meta-steps between validations (default: episodes/5)")
    p.add_argument("--test-episodes", type=int, default=600, help="seeded test episodes (mean ± 95%% CI)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of meta-training (meta-learner init, episode order); validation and test "
                        "episodes are fixed lists that do not depend on it")
    p.add_argument("--filters", type=int, default=None,
                   help=f"Conv-4 learner width (metalstm, finetune); default {DEFAULTS['filters']}")
    p.add_argument("--inner-steps", type=int, default=None,
                   help="metalstm inner updates per episode (default: the preset's, 12 for 1-shot, 8 for 5-shot)")
    p.add_argument("--meta-lr", type=float, default=None, help="metalstm Adam rate (default: the preset's, 1e-3)")
    p.add_argument("--backbone", default=None, help="sib/ncm backbone: conv4 (Conv-4-64, pretrained here; the "
                   "default) or wrn (WRN-28-10, needs --backbone-checkpoint)")
    p.add_argument("--backbone-checkpoint", default=None, metavar="PATH",
                   help="the authors' WRN-28-10 checkpoint (netFeatBest*.pth) instead of pretraining")
    p.add_argument("--pretrain-steps", type=int, default=None,
                   help=f"sib/ncm: cosine-classifier pretraining steps of the conv4 backbone (batch 64); default "
                        f"{DEFAULT_PRETRAIN_STEPS}")
    p.add_argument("--backbone-cache", default=None, metavar="DIR",
                   help="folder for pretrained backbones, shared between runs (default: --out); each is kept "
                        "under a hash of its settings")
    p.add_argument("--sib-dni-init", default=None,
                   help="sib: initialisation of the synthetic-gradient network's output layer: random (the "
                        "default: PyTorch's, as the authors' code) or zero (an ablation: ξ = 0 at first, so SIB starts as "
                        "the nearest class mean and meta-training moves it from there)")
    p.add_argument("--meta-batch", type=int, default=None,
                   help="metalstm, sib: episodes per meta-step, their meta-gradients averaged (default 1, as the "
                        "authors' codes). Under torchrun the episodes of a meta-step are shared out over the "
                        "processes (a multiple of WORLD_SIZE; see the README's distributed section)")
    p.add_argument("--autocast", default=None, help="metalstm: none (the default) or bfloat16 (the learner's "
                   "forward passes under torch.autocast, in meta-training and evaluation)")
    p.add_argument("--finetune-lrs", default=None,
                   help="finetune: learning rates tuned on the validation episodes (default: the official "
                        f"baseline's grid {','.join(f'{v:g}' for v in FT_LR_GRID)})")
    p.add_argument("--finetune-steps", default=None,
                   help="finetune: numbers of SGD updates tuned with them (default "
                        f"{','.join(str(v) for v in FT_STEPS_GRID)})")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = torch's default)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--data-dir", default=None, help="dataset folder; must exist if given (default: $L2L_ZOO_DATA)")
    p.add_argument("--out", default=None, help="output folder (default results/fewshot/<dataset>_<method>_<N>w<K>s)")
    p.add_argument("--resume", action="store_true", help="continue a killed run in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def parse_config(argv=None) -> Config:
    a = build_parser().parse_args(argv)
    if a.method not in METHODS:
        raise UsageError(f"--method must be one of {list(METHODS)}, got {a.method!r}")
    for key, methods in APPLIES.items():
        if getattr(a, key) is not None and a.method not in methods:
            raise UsageError(f"--{key.replace('_', '-')} applies to --method {' and '.join(methods)}, "
                             f"not {a.method!r}")
        if getattr(a, key) is None and key in DEFAULTS:
            setattr(a, key, DEFAULTS[key])
    ft_lrs = list(FT_LR_GRID) if a.finetune_lrs is None else parse_floats(a.finetune_lrs, "--finetune-lrs")
    try:
        ft_steps = list(FT_STEPS_GRID) if a.finetune_steps is None else \
            [int(v) for v in a.finetune_steps.split(",") if v.strip()]
        if not ft_steps or min(ft_steps) < 1:
            raise ValueError
    except ValueError:
        raise UsageError(f"--finetune-steps must be a comma list of integers >= 1, got {a.finetune_steps!r}") from None
    if a.dataset not in DATASETS:
        raise UsageError(f"--dataset must be one of {list(DATASETS)}, got {a.dataset!r}")
    for flag, v, lo in (("--ways", a.ways, 2), ("--shots", a.shots, 1), ("--queries", a.queries, 1),
                        ("--val-episodes", a.val_episodes, 1), ("--test-episodes", a.test_episodes, 1),
                        ("--seed", a.seed, 0), ("--filters", a.filters, 1), ("--pretrain-steps", a.pretrain_steps, 1),
                        ("--threads", a.threads, 0), ("--meta-batch", a.meta_batch, 1)):
        if v < lo:
            raise UsageError(f"{flag} must be an integer >= {lo}, got {v}")
    for flag, v in (("--episodes", a.episodes), ("--val-every", a.val_every), ("--inner-steps", a.inner_steps)):
        if v is not None and v < 1:
            raise UsageError(f"{flag} must be an integer >= 1, got {v}")
    if a.meta_lr is not None and not (math.isfinite(a.meta_lr) and a.meta_lr > 0):
        raise UsageError(f"--meta-lr must be a positive number, got {a.meta_lr}")
    if a.smooth is not None:
        try:
            parse_smooth(a.smooth)
        except ValueError as e:
            raise UsageError(str(e)) from None
    if a.method == "metalstm":
        try:
            mlstm.preset_config(a.preset, a.shots)
        except ValueError as e:
            raise UsageError(f"--preset {a.preset!r} with --shots {a.shots}: {e}") from None
    autocast_dtype = parse_autocast(a.autocast)
    if a.sib_dni_init not in SIB_DNI_INITS:
        raise UsageError(f"--sib-dni-init must be one of {list(SIB_DNI_INITS)}, got {a.sib_dni_init!r}")
    world = torchrun_world_size()
    if world > 1:  # under torchrun: the episodes of a meta-step shared out over the processes
        if a.method not in PARALLEL_METHODS:
            raise UsageError(f"under torchrun (WORLD_SIZE={world}) only --method {' and '.join(PARALLEL_METHODS)} "
                             f"meta-train in parallel, not {a.method!r}; run it without torchrun")
        if a.meta_batch % world:
            raise UsageError(f"--meta-batch {a.meta_batch} must be a multiple of WORLD_SIZE={world} (each "
                             "process meta-trains on meta-batch / world-size episodes per meta-step)")
    if a.backbone not in ("conv4", "wrn"):
        raise UsageError(f"--backbone must be conv4 or wrn, got {a.backbone!r}")
    if a.backbone == "wrn" and a.backbone_checkpoint is None:
        raise UsageError("--backbone wrn needs --backbone-checkpoint (the authors' WRN-28-10 weights)")
    if a.backbone_checkpoint is not None and not os.path.isfile(a.backbone_checkpoint):
        raise UsageError(f"--backbone-checkpoint: no such file {a.backbone_checkpoint!r}")
    if a.data_dir is not None and not os.path.isdir(a.data_dir):
        raise UsageError(f"--data-dir: no such folder {a.data_dir!r}")
    resolve_device(a.device)
    episodes = a.episodes or DEFAULT_EPISODES.get(a.method, 0)
    out = a.out or os.path.join("results", "fewshot", f"{a.dataset}_{a.method}{'_smooth' if a.smooth else ''}_"
                                                      f"{a.ways}w{a.shots}s")
    return Config(method=a.method, dataset=a.dataset, ways=a.ways, shots=a.shots, queries=a.queries, smooth=a.smooth,
                  preset=a.preset, episodes=episodes, val_episodes=a.val_episodes,
                  val_every=a.val_every or max(1, episodes // 5), test_episodes=a.test_episodes, seed=a.seed,
                  filters=a.filters, inner_steps=a.inner_steps, meta_lr=a.meta_lr, backbone=a.backbone,
                  backbone_checkpoint=a.backbone_checkpoint, pretrain_steps=a.pretrain_steps,
                  backbone_cache=a.backbone_cache, sib_dni_init=a.sib_dni_init, threads=a.threads,
                  device=a.device, data_dir=a.data_dir, meta_batch=a.meta_batch,
                  autocast=autocast_dtype, finetune_lrs=ft_lrs, finetune_steps=ft_steps, out=out, resume=a.resume,
                  progress=not a.no_progress)


# Fixed episode lists: validation and test episodes never depend on --seed.
VAL_SEED, TEST_SEED = 1_000, 2_000


def samplers(cfg: Config, splits) -> dict:
    """Episode samplers of every split; a split with too few classes or images for the requested
    episodes is a one-line error naming it."""
    return {k: EpisodeSampler(splits[k], cfg.ways, cfg.shots, cfg.queries) for k in ("train", "val", "test")}


def summary_of(accs, episodes_s: float | None = None) -> dict:
    m, ci = mean_ci(accs)
    out = {"test_acc": m, "test_ci": ci, "test_episodes": len(accs)}
    if episodes_s:
        out["test_episodes_per_s"] = len(accs) / episodes_s
    return out


# ---------------------------------------------------------------------------------- methods

def metalstm_config(cfg: Config) -> "mlstm.MetaLSTMConfig":
    over = {"ways": cfg.ways, "queries": cfg.queries, "filters": cfg.filters, "episodes": cfg.episodes,
            "val_episodes": cfg.val_episodes, "val_every": cfg.val_every, "test_episodes": cfg.test_episodes}
    if cfg.inner_steps is not None:
        over["inner_steps"] = cfg.inner_steps
    if cfg.meta_lr is not None:
        over["meta_lr"] = cfg.meta_lr
    return mlstm.preset_config(cfg.preset, cfg.shots, **over)


def run_metalstm(cfg: Config, splits, smp, device, log) -> tuple[dict, dict] | None:
    """Meta-train (under torchrun: every process, each on its share of a meta-step's episodes),
    then, on rank 0 only, select on validation and test; other ranks return None."""
    mcfg = metalstm_config(cfg)
    smooth = parse_smooth(cfg.smooth) if cfg.smooth else None
    ckpt = os.path.join(cfg.out, f"metatrain-{runs.config_hash(identity(cfg))}.ckpt")
    world, rank = dist_world()
    if not cfg.resume and os.path.exists(ckpt) and rank == 0:
        os.remove(ckpt)
    if world > 1:
        torch.distributed.barrier()  # nobody reads a checkpoint rank 0 is about to remove
    family = mlstm.episode_family(mcfg, smp["train"], device=device)
    lopt = mlstm.build_metalstm(mcfg, family.template, cfg.seed)
    selector = None
    if rank == 0:  # validation and selection on rank 0 (the others hold the same meta-parameters)
        selector = mlstm.BestOnValidation(lopt, mcfg, smp["val"], episodes=cfg.val_episodes, seed=VAL_SEED,
                                          every=cfg.val_every, device=device, log=log, autocast=cfg.autocast)
    t0 = time.perf_counter()
    trainer = mlstm.meta_train(mcfg, smp["train"], smooth=smooth, episodes=cfg.episodes, seed=cfg.seed,
                               checkpoint_path=ckpt, checkpoint_every=cfg.val_every, resume=cfg.resume,
                               progress=cfg.progress and rank == 0, log=log, callback=selector, lopt=lopt,
                               attach={"selector": selector} if selector is not None else None, device=device,
                               meta_batch=cfg.meta_batch, autocast=cfg.autocast)
    train_s = time.perf_counter() - t0
    if world > 1:  # done with each other: tear the group down together; rank 0 tests alone
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if rank != 0:
        return None
    if selector.best_state is not None:  # best on validation
        lopt.load_state_dict(selector.best_state)
    t1 = time.perf_counter()
    accs = mlstm.evaluate(lopt, mcfg, smp["test"], cfg.test_episodes, TEST_SEED, device=device, progress=cfg.progress,
                          autocast=cfg.autocast)
    test_s = time.perf_counter() - t1
    rec = runs.new_record(cfg.episodes, seed=cfg.seed)
    for r in trainer.history:
        runs.log_step(rec, len(rec["step_log"].get("meta_loss", [])),
                       {"meta_loss": r["meta_loss"], "query_loss": r["outer_loss"], "penalty": r["penalty"]})
    for e in selector.curve:
        runs.log_eval(rec, e["meta_step"], {"val_acc": e["val_acc"], "val_ci": e["val_ci"]})
    rec["final"] = {**summary_of(accs, test_s), "best_val_acc": (selector.best or {}).get("val_acc"),
                    "best_meta_step": (selector.best or {}).get("meta_step"),
                    "train_episodes_per_s": cfg.episodes * cfg.meta_batch / max(trainer.elapsed, 1e-9)}
    rec.update(wall_s=train_s + test_s, meta_train_s=trainer.elapsed, test_accs=accs,
               meta_failures=trainer.total_failures, protocol=mcfg.to_dict(),
               num_meta_parameters=lopt.num_meta_parameters(), world_size=world)
    l2l_zoo.save(lopt, os.path.join(cfg.out, "model.pt"),
                 fewshot={"method": "metalstm", "protocol": mcfg.to_dict(), "dataset": cfg.dataset,
                          "smooth": cfg.smooth, "autocast": cfg.autocast})
    return rec, {"protocol": mcfg.to_dict()}


def backbone_for(cfg: Config, splits, device, log):
    """The frozen backbone of sib/ncm: the authors' WRN-28-10 or a Conv-4-64 pretrained here (its
    final state is kept in a checkpoint so that --resume does not pretrain again).

    Under torchrun the WRN checkpoint is read by every process; the Conv-4-64 is pretrained (or read
    from the backbone cache) by rank 0 alone while the others wait, and its state is then broadcast,
    so every process embeds with the same weights (the wait must fit in the backend's timeout, 30
    minutes for gloo and 10 for NCCL by default: pretrain a long one first without torchrun, into
    the same ``--backbone-cache``)."""
    from . import backbones as bb
    if cfg.backbone == "wrn":
        return bb.load_official_wrn(cfg.backbone_checkpoint).to(device).eval(), {"backbone": "wrn28_10",
                                                                                 "checkpoint": runs.file_digest(cfg.backbone_checkpoint)}
    c, h, _ = splits["train"].image_shape
    torch.manual_seed(cfg.seed)
    net = bb.conv4_64(in_channels=c, image_size=h).to(device)
    steps = cfg.pretrain_steps
    world, rank = dist_world()
    info = {"backbone": "conv4_64", "pretrain_steps": steps}
    if rank == 0:
        ident = {"dataset": cfg.dataset, "pretrain_steps": cfg.pretrain_steps, "seed": cfg.seed, "device": cfg.device,
                 "data_dir": cfg.data_dir, "train": splits["train"].summary()}
        ckpt = os.path.join(cfg.backbone_cache or cfg.out, f"backbone-{runs.config_hash(ident)}.pt")
        rec = bb.pretrain(net, splits["train"], steps=steps, warmup_steps=max(1, steps // 10),
                          milestones=[int(0.8 * steps)], seed=cfg.seed, device=device, checkpoint=ckpt,
                          checkpoint_every=max(1, steps // 4), resume=cfg.resume, keep_final=True, identity=ident,
                          progress=cfg.progress, log=log)
        info.update(pretrain_wall_s=rec["wall_s"], pretrain_final=rec["final"])
    if world > 1:  # rank 0's weights to everyone
        for v in net.state_dict().values():
            torch.distributed.broadcast(v, src=0)
    return net.eval(), info


def feature_samplers(cfg: Config, net, splits, names=("train", "val", "test")):
    from .backbones import cache_features
    return {k: EpisodeSampler(cache_features(net, splits[k]), cfg.ways, cfg.shots, cfg.queries) for k in names}


def run_sib(cfg: Config, splits, smp, device, log) -> tuple[dict, dict] | None:
    """Meta-train SIB on cached backbone features (under torchrun: every process, each on its share
    of every iteration's ``--meta-batch`` episodes and of the validation episodes), then, on rank 0
    only, test the best-on-validation state; other ranks return None."""
    from l2l_zoo.meta.distributed import gather_shares, my_share

    from .sib import SIB, SIBStepper
    world, rank = dist_world()
    net, info = backbone_for(cfg, splits, device, log)
    t0 = time.perf_counter()
    fs = feature_samplers(cfg, net, splits, ("train", "val", "test") if rank == 0 else ("train", "val"))
    info["cache_s"] = time.perf_counter() - t0
    smooth = parse_smooth(cfg.smooth) if cfg.smooth else None
    torch.manual_seed(cfg.seed)
    sib = SIB(cfg.ways, fs["train"].split.features.shape[1], dni_init=cfg.sib_dni_init).to(device)
    stepper = SIBStepper(sib, smooth=smooth, seed=cfg.seed, meta_batch=cfg.meta_batch, distributed=world > 1)
    val_eps = [e.to(device) for e in fs["val"].episodes(cfg.val_episodes, VAL_SEED)]
    mine = val_eps[my_share(len(val_eps))]  # every validation episode in one process
    best = {"val_acc": -1.0, "state": None, "step": 0}

    def evaluate():
        m, ci = mean_ci(gather_shares(stepper.evaluate(mine), len(val_eps), device))
        if m > best["val_acc"]:
            best.update(val_acc=m, state={k: v.detach().clone() for k, v in sib.state_dict().items()},
                        step=stepper.t)
        return {"val_acc": m, "val_ci": ci}

    ident = {**identity(cfg), **{
        k: v for k, v in info.items() if k in ("backbone", "checkpoint", "pretrain_steps")}}
    ckpt = os.path.join(cfg.out, f"sib-{runs.config_hash(ident)}.pt")
    rec = runs.train(stepper, lambda aux: [fs["train"].episode(cfg.seed, i) for i in stepper.episode_indices()],
                     steps=cfg.episodes, evaluate=evaluate, eval_every=cfg.val_every, checkpoint=ckpt,
                     checkpoint_every=cfg.val_every, identity=ident, resume=cfg.resume, keep_final=True,
                     progress=cfg.progress and rank == 0, desc="SIB", log=log)
    if rec["diverged_at"] is None and best["state"] is None:  # resumed after the last validation
        evaluate()
    if world > 1:  # done with each other: tear the group down together; rank 0 tests alone
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if rank != 0:
        return None
    if rec["diverged_at"] is not None:
        raise FloatingPointError(f"SIB meta-training diverged at episode {rec['diverged_at']}: {rec['error']}")
    sib.load_state_dict(best["state"])
    t1 = time.perf_counter()
    accs = stepper.evaluate([e.to(device) for e in fs["test"].episodes(cfg.test_episodes, TEST_SEED)])
    test_s = time.perf_counter() - t1
    rec["final"] = {**summary_of(accs, test_s), "best_val_acc": best["val_acc"], "best_meta_step": best["step"],
                    "train_episodes_per_s": cfg.episodes * cfg.meta_batch / max(rec["wall_s"], 1e-9)}
    rec.update(seed=cfg.seed, test_accs=accs, backbone=info, world_size=world)
    runs.save_torch(os.path.join(cfg.out, "model.pt"),
                    {"format": "fewshot.sib", "version": 1, "sib": sib.state_dict(), "sib_config": sib.config,
                     "backbone": net.state_dict(), "backbone_info": {k: v for k, v in info.items()
                                                                     if isinstance(v, (str, int, float))},
                     "fewshot": {"method": "sib", "dataset": cfg.dataset, "ways": cfg.ways, "shots": cfg.shots,
                                 "queries": cfg.queries, "smooth": cfg.smooth}})
    return rec, info


def run_ncm(cfg: Config, splits, smp, device, log) -> tuple[dict, dict]:
    from .sib import evaluate_ncm
    net, info = backbone_for(cfg, splits, device, log)
    fs = feature_samplers(cfg, net, splits)
    val = evaluate_ncm(fs["val"].episodes(cfg.val_episodes, VAL_SEED))
    t1 = time.perf_counter()
    accs = evaluate_ncm(fs["test"].episodes(cfg.test_episodes, TEST_SEED))
    rec = runs.new_record(0, seed=cfg.seed, test_accs=accs, backbone=info)
    rec["final"] = {**summary_of(accs, time.perf_counter() - t1), "best_val_acc": mean_ci(val)[0]}
    runs.save_torch(os.path.join(cfg.out, "model.pt"),
                    {"format": "fewshot.ncm", "version": 1, "backbone": net.state_dict(),
                     "fewshot": {"method": "ncm", "dataset": cfg.dataset, "ways": cfg.ways, "shots": cfg.shots,
                                 "queries": cfg.queries}})
    return rec, info


def run_finetune(cfg: Config, splits, smp, device, log) -> tuple[dict, dict]:
    from .finetune import evaluate_finetune, tune_finetune
    # the Meta-LSTM learner (Conv-4, same width, BatchNorm and initialisation seed) for any shots
    mcfg = mlstm.MetaLSTMConfig(ways=cfg.ways, shots=cfg.shots, queries=cfg.queries, filters=cfg.filters)
    model_fn = mlstm.learner_fn(mcfg, splits["train"].image_shape)
    val = smp["val"].episodes(cfg.val_episodes, VAL_SEED)
    tuned = tune_finetune(val, model_fn, mcfg.init_seed, lrs=cfg.finetune_lrs, steps=cfg.finetune_steps,
                          inner_batch_size=mcfg.inner_batch_size, device=device, progress=cfg.progress)
    if tuned.best is None:
        raise FloatingPointError("fine-tuning diverged for every (lr, steps) of the grid on the validation episodes")
    lr, steps = tuned.best
    t1 = time.perf_counter()
    accs = evaluate_finetune(smp["test"], model_fn, mcfg.init_seed, lr=lr, steps=steps, n_episodes=cfg.test_episodes,
                             seed=TEST_SEED, inner_batch_size=mcfg.inner_batch_size, device=device,
                             progress=cfg.progress)
    rec = runs.new_record(steps, seed=cfg.seed, test_accs=accs, lr=lr)
    rec["final"] = {**summary_of(accs, time.perf_counter() - t1), "best_val_acc": max(
        v for v in tuned.scores.values() if v is not None)}
    runs.save_torch(os.path.join(cfg.out, "model.pt"),
                    {"format": "fewshot.finetune", "version": 1, "lr": lr, "steps": steps,
                     "protocol": mcfg.to_dict(), "fewshot": {"method": "finetune", "dataset": cfg.dataset}})
    return rec, {"tuning": tuned.to_dict()}


def run_pixelnn(cfg: Config, splits, smp, device, log) -> tuple[dict, dict]:
    from .finetune import evaluate_pixel_nn
    t1 = time.perf_counter()
    accs = evaluate_pixel_nn(smp["test"], n_episodes=cfg.test_episodes, seed=TEST_SEED)
    rec = runs.new_record(0, seed=cfg.seed, test_accs=accs)
    rec["final"] = summary_of(accs, time.perf_counter() - t1)
    return rec, {}


RUNNERS = {"metalstm": run_metalstm, "sib": run_sib, "ncm": run_ncm, "finetune": run_finetune,
           "pixelnn": run_pixelnn}


# ---------------------------------------------------------------------------------- main

def main(argv=None) -> int:
    cfg = parse_config(argv)  # under torchrun (metalstm, sib): rank 0 owns --out, the others meta-train
    return distributed_main(resolve_device(cfg.device), cfg.out, lambda: _main(cfg), lambda: _main(cfg, worker=True))


def _main(cfg: Config, worker: bool = False) -> int:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    from tqdm.auto import tqdm
    log = (lambda s: None) if worker else tqdm.write
    t_start = time.perf_counter()
    splits = load_fewshot(cfg.dataset, cfg.data_dir)
    for k, s in splits.items():
        log(f"[data] {k}: {s.num_classes} classes, {s.images.shape[0]} images {tuple(s.image_shape)}; {s.note}")
    smp = samplers(cfg, splits)  # ValueError (e.g. more ways than a split has classes): one line
    world, _ = dist_world()
    label = cfg.method + ("+smooth" if cfg.smooth else "")
    cache = runs.RunCache(os.path.join(cfg.out, "runs"), enabled=cfg.resume)
    unit = {**identity(cfg), "data": {k: s.summary() for k, s in splits.items()}}
    if world > 1:  # rank 0's run cache decides for everyone (a cached run needs no meta-training)
        if rank0_decides(not worker and cache.get(unit, name=label) is not None, device):
            torch.distributed.destroy_process_group()
            if worker:
                return 0
    if worker:
        RUNNERS[cfg.method](cfg, splits, smp, device, log)
        return 0
    results = runs.new_results("fewshot.train", asdict(cfg), data={k: s.summary() for k, s in splits.items()})
    results["protocol"] = {"val_seed": VAL_SEED, "test_seed": TEST_SEED,
                           "episodes": f"{cfg.ways}-way {cfg.shots}-shot, {cfg.queries} queries per class"}
    results["world_size"] = world
    rec, info = cache.run(unit, lambda: RUNNERS[cfg.method](cfg, splits, smp, device, log), name=label)
    results["runs"][label] = [rec]
    results["summary"][label] = runs.summarize([rec])
    results["method_info"] = info
    if "tuning" in info:
        results["tuning"][label] = info["tuning"]
    results["wall_s"] = time.perf_counter() - t_start
    runs.write_json(os.path.join(cfg.out, "results.json"), results)
    if rec["eval"]["step"]:
        x, y, _ = runs.mean_curve([rec], "val_acc", include_diverged=True)
        plot_curves(os.path.join(cfg.out, "val_curve.png"), {label: {"x": x, "val_acc": y}},
                    panels=[("val_acc", "validation accuracy")], logy=False,
                    title=f"{cfg.dataset} {cfg.ways}-way {cfg.shots}-shot: {label}")
    f = rec["final"]
    log(f"\n{label} on {cfg.dataset}, {cfg.ways}-way {cfg.shots}-shot: test accuracy "
        f"{100 * f['test_acc']:.2f} ± {100 * f['test_ci']:.2f} % over {f['test_episodes']} episodes"
        + (f" (best validation {100 * f['best_val_acc']:.2f} %)" if f.get("best_val_acc") is not None else ""))
    log(f"results: {os.path.join(cfg.out, 'results.json')}  ({results['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.argv[0] = "fewshot.train"
    run_main(main)
