#!/usr/bin/env python
"""MLR-SNet (Shu et al., TPAMI 2022, §4.1.2 and §4.2.3) on word-level Penn Treebank language modelling
at CPU scale: MLR-SNet meta-trained online with the normalised loss input, the authors' released
CIFAR-10 nets transferred across modality, against SGD and Adam with the tuned "Val Strategy".

    python benchmarks/mlrsnet_ptb.py                      # CPU defaults: 24 min on 2 cores at load ~5
    python benchmarks/mlrsnet_ptb.py --hidden 512 --epochs 150 --t-val 100 --device cuda --seeds 3
    python benchmarks/mlrsnet_ptb.py --transfer results/mlrsnet_cifar/nets/mlrsnet_1.pt,...  # our CIFAR nets too

Data: only ``ptb.valid.txt`` and ``ptb.test.txt`` are available here (``$L2L_ZOO_DATA/ptb``). The model
trains on the first ``1 - --val-fraction`` of ``ptb.valid.txt``; the held-out rest is the validation
set (MLR-SNet's meta-data and the Val Strategy's signal, as the paper uses PTB's validation set for
both); ``ptb.test.txt`` is the test set. The vocabulary is every word of the two files (+ <eos>):
smaller than PTB's 10k because the training split is not on disk; it is C of γ and of the input
normalisation loss / ln C.

Model (paper: 2-layer LSTM, 512 units, tied embedding, dropout 0.5, batch 32, BPTT 35, gradient
clipping 0.25, weight decay 5e-6, 150 epochs): the same shape with ``--hidden`` units.

Methods (every run: same initialisation and data order per seed):
* ``MLR-SNet (meta-train)``: Algorithm 1 with base SGD, input loss / ln C, γ from the initial training
  perplexity, a meta-update every ``--t-val`` steps on a random held-out validation chunk;
* ``MLR-SNet (official nets)``: Algorithm 2 with the released CIFAR-10/ResNet-18 nets (epochs 1/100/200,
  meta-test gate layout) for thirds of training, γ from the training perplexity at each switch;
* ``SGD + Val Strategy`` / ``Adam + Val Strategy`` (paper: α0 20 and 0.01 with β1 = 0): divide the rate
  by 4 when the validation loss did not decrease over an epoch; α0 tuned over ``--sgd-grid`` /
  ``--adam-grid`` by final validation perplexity on the first seed (``--baselines`` picks which run;
  ``none`` meta-trains and evaluates MLR-SNet alone).

Under ``torchrun`` (``torchrun --nproc_per_node P benchmarks/mlrsnet_ptb.py``, ``--batch-size`` a
multiple of P) MLR-SNet's meta-training is data-parallel: each process trains on its share of the
token streams of every training and meta-data chunk (:class:`~l2l_zoo.meta.MLRSNetMetaTrainer`
averages over the processes); rank 0 alone writes ``--out`` and runs the rest. Dropout masks then
differ from one process's, so such a run is cached apart (``world_size`` in its identity).

Outputs in ``--out`` (locked while the script runs): ``results.json`` (the ``l2l_zoo.runs`` schema:
config, environment, data, every run's per-step loss and rate, periodic validation/test perplexity
under ``"ptb/<method>"`` labels, tuning records, summary), ``mlrsnet_ptb.png``
(``paper_figs/fig_mlrsnet.py``), checkpoints every epoch so that ``--resume`` loses nothing; finished
runs are reused only when everything they depend on is unchanged.
"""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import l2l_zoo  # noqa: E402
from l2l_zoo import MLRSNet  # noqa: E402
from l2l_zoo import runs  # noqa: E402
from l2l_zoo.cli import (ArgumentParser, UsageError, distributed_main, parse_autocast,  # noqa: E402
                         parse_choices, parse_floats, parse_seeds, resolve_device, run_main,
                         torchrun_world_size)
from l2l_zoo.meta.distributed import all_sum, dist_world, my_share, rank0_decides  # noqa: E402
from l2l_zoo.meta.mlrsnet import MLRSNetMetaTrainer, MLRSNetTrainConfig  # noqa: E402
from l2l_zoo.schedules.mlrsnet import MLRSNetController  # noqa: E402
from l2l_zoo.tasks import DataNotFoundError  # noqa: E402
from l2l_zoo.tasks.data import resolve_data_dirs  # noqa: E402


@dataclass
class Config:
    epochs: int
    hidden: int
    layers: int
    dropout: float
    batch_size: int
    bptt: int
    clip: float
    weight_decay: float
    val_fraction: float
    t_val: int
    meta_lr: float
    sgd_grid: list
    adam_grid: list
    baselines: list
    official: bool
    transfer: list
    seeds: list
    evals: int
    autocast: str | None
    threads: int
    device: str
    data_dir: str | None
    out: str
    resume: bool
    progress: bool


#: the tuned Val Strategy baselines (``--baselines``)
BASELINES = ("sgd", "adam")


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n\n")[0], epilog="The module docstring has the protocol.")
    p.add_argument("--epochs", type=int, default=4, help="training epochs of every run (paper: 150)")
    p.add_argument("--hidden", type=int, default=128, help="LSTM units = embedding size, tied (paper: 512)")
    p.add_argument("--layers", type=int, default=2, help="LSTM layers (paper: 2 and 3)")
    p.add_argument("--dropout", type=float, default=0.5, help="dropout on embeddings and LSTM outputs (paper: 0.5)")
    p.add_argument("--batch-size", type=int, default=32, help="parallel token streams (paper: 32)")
    p.add_argument("--bptt", type=int, default=35, help="truncated-BPTT length (paper: 35)")
    p.add_argument("--clip", type=float, default=0.25, help="gradient-norm clipping of every run (paper: 0.25)")
    p.add_argument("--weight-decay", type=float, default=5e-6, help="weight decay of SGD and Adam (paper: 5e-6)")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="tail of ptb.valid.txt held out as validation / meta-data")
    p.add_argument("--t-val", type=int, default=5, help="steps between MLR-SNet meta-updates (paper: 100; code: 300)")
    p.add_argument("--meta-lr", type=float, default=1e-3, help="Adam learning rate on MLR-SNet (paper: 1e-3)")
    p.add_argument("--sgd-grid", default="20,10", help="initial rates tried for SGD + Val Strategy (paper: 20)")
    p.add_argument("--adam-grid", default="0.01,0.003",
                   help="initial rates tried for Adam + Val Strategy (paper: 0.01)")
    p.add_argument("--baselines", default=",".join(BASELINES),
                   help=f"the Val Strategy baselines to tune and run: none or a comma list from {list(BASELINES)}")
    p.add_argument("--no-official", action="store_true", help="skip the authors' released nets")
    p.add_argument("--transfer", default=None, metavar="PATHS",
                   help="comma list of our saved MLR-SNet nets (e.g. from mlrsnet_cifar.py) to transfer too")
    p.add_argument("--seeds", default="1", help="evaluation seeds: a count N (0..N-1) or a comma list")
    p.add_argument("--evals", type=int, default=2, help="test evaluations per run (plus step 0)")
    p.add_argument("--autocast", default="none",
                   help="none or bfloat16: every training run's forward passes (meta-training's real and virtual "
                        "steps, meta-test, baselines) under torch.autocast; evaluations stay float32")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for torch (1 is fastest on a shared, busy CPU; 0 = torch's default)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--data-dir", default=None, help="folder holding ptb/ptb.valid.txt (default: $L2L_ZOO_DATA, ./data)")
    p.add_argument("--out", default=os.path.join("results", "mlrsnet_ptb"), help="output folder")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def parse_config(argv=None) -> Config:
    a = build_parser().parse_args(argv)
    for flag, val, lo in (("--epochs", a.epochs, 1), ("--hidden", a.hidden, 1), ("--layers", a.layers, 1),
                          ("--batch-size", a.batch_size, 1), ("--bptt", a.bptt, 2), ("--t-val", a.t_val, 1),
                          ("--evals", a.evals, 1), ("--threads", a.threads, 0)):
        if val < lo:
            raise UsageError(f"{flag} must be >= {lo}, got {val}")
    if not 0 <= a.dropout < 1:
        raise UsageError(f"--dropout must be in [0, 1), got {a.dropout}")
    if not 0 < a.val_fraction < 0.5:
        raise UsageError(f"--val-fraction must be in (0, 0.5), got {a.val_fraction}")
    for flag, val in (("--clip", a.clip), ("--meta-lr", a.meta_lr)):
        if not (math.isfinite(val) and val > 0):
            raise UsageError(f"{flag} must be > 0, got {val}")
    if not (math.isfinite(a.weight_decay) and a.weight_decay >= 0):
        raise UsageError(f"--weight-decay must be >= 0, got {a.weight_decay}")
    transfer = [s.strip() for s in (a.transfer or "").split(",") if s.strip()]
    for t in transfer:
        if not os.path.isfile(t):
            raise UsageError(f"--transfer: no such file {t!r}")
        try:
            n = l2l_zoo.load(t)
        except (ValueError, KeyError, TypeError) as e:
            raise UsageError(f"--transfer: {e}") from None
        if not isinstance(n, MLRSNet):
            raise UsageError(f"--transfer: {t!r} holds a {n.name!r} optimizer, not an MLR-SNet")
    autocast_dtype = parse_autocast(a.autocast)
    if a.data_dir is not None and not os.path.isdir(a.data_dir):
        raise UsageError(f"--data-dir: no such folder {a.data_dir!r}")
    resolve_device(a.device)
    world = torchrun_world_size()
    if world > 1 and a.batch_size % world:
        raise UsageError(f"--batch-size {a.batch_size} must be a multiple of WORLD_SIZE={world} (each process "
                         "meta-trains on an equal share of the token streams)")
    return Config(epochs=a.epochs, hidden=a.hidden, layers=a.layers, dropout=a.dropout, batch_size=a.batch_size,
                  bptt=a.bptt, clip=a.clip, weight_decay=a.weight_decay, val_fraction=a.val_fraction, t_val=a.t_val,
                  meta_lr=a.meta_lr, sgd_grid=parse_floats(a.sgd_grid, "--sgd-grid"),
                  adam_grid=parse_floats(a.adam_grid, "--adam-grid"), baselines=parse_choices(a.baselines, BASELINES, "--baselines"),
                  official=not a.no_official,
                  transfer=transfer, seeds=parse_seeds(a.seeds), evals=a.evals,
                  autocast=autocast_dtype, threads=a.threads, device=a.device,
                  data_dir=a.data_dir, out=a.out, resume=a.resume, progress=not a.no_progress)


# ---------------------------------------------------------------------------------- data and model

def find_ptb(data_dir) -> tuple[str, str]:
    dirs = resolve_data_dirs(data_dir)
    for d in dirs:
        for sub in ("ptb", "penn", ""):
            v, t = d / sub / "ptb.valid.txt", d / sub / "ptb.test.txt"
            if v.is_file() and t.is_file():
                return str(v), str(t)
    raise DataNotFoundError(f"PTB not found: need ptb.valid.txt and ptb.test.txt, looked in "
                            f"{[str(d) for d in dirs]} and their ptb/ sub-folders; set --data-dir or L2L_ZOO_DATA")


def read_words(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [w for line in f for w in line.split() + ["<eos>"]]


class Corpus:
    """Token ids of the train / validation / test streams (word_language_model conventions)."""

    def __init__(self, valid_path: str, test_path: str, val_fraction: float):
        vw, tw = read_words(valid_path), read_words(test_path)
        self.vocab = {w: i for i, w in enumerate(dict.fromkeys(vw + tw))}
        ids = torch.tensor([self.vocab[w] for w in vw], dtype=torch.long)
        cut = int(round(len(ids) * (1 - val_fraction)))
        self.train, self.val = ids[:cut], ids[cut:]
        self.test = torch.tensor([self.vocab[w] for w in tw], dtype=torch.long)
        self.note = (f"PTB: train = first {cut} tokens of ptb.valid.txt, validation/meta-data = its last "
                     f"{len(ids) - cut}, test = ptb.test.txt ({len(self.test)} tokens); vocabulary "
                     f"{len(self.vocab)} words of the two files (PTB's training split is not available)")


def batchify(ids: torch.Tensor, bsz: int, device) -> torch.Tensor:
    n = len(ids) // bsz
    return ids[:n * bsz].view(bsz, n).t().contiguous().to(device)  # (n, bsz)


class RNNLM(nn.Module):
    """Embedding → multi-layer LSTM → linear decoder tied to the embedding, dropout on the embedding and
    LSTM outputs (paper §4.1.2)."""

    def __init__(self, vocab: int, hidden: int, layers: int, dropout: float):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.emb = nn.Embedding(vocab, hidden)
        self.lstm = nn.LSTM(hidden, hidden, layers, dropout=dropout)
        self.dec = nn.Linear(hidden, vocab)
        self.dec.weight = self.emb.weight
        self.layers, self.hidden = layers, hidden
        with torch.no_grad():
            self.emb.weight.uniform_(-0.1, 0.1)
            self.dec.bias.zero_()

    def init_state(self, bsz, device):
        z = torch.zeros(self.layers, bsz, self.hidden, device=device)
        return (z, z.clone())

    def forward(self, x, state):
        out, state = self.lstm(self.drop(self.emb(x)), state)
        return self.dec(self.drop(out)).view(-1, self.dec.out_features), state


def lm_loss(model, batch):
    """Mean token cross-entropy and the detached carried state."""
    x, y, state = batch
    logits, state = model(x, state)
    return F.cross_entropy(logits, y.reshape(-1)), tuple(s.detach() for s in state)


@torch.no_grad()
def stream_loss(model, data: torch.Tensor, bptt: int, distributed: bool = False) -> float:
    """Mean per-token loss over a batchified stream, state carried (eval mode). With
    ``distributed`` under torch.distributed, each process evaluates its share of the streams
    (columns) and the sums are all-reduced (every process must call it, with the same model)."""
    distributed = distributed and dist_world()[0] > 1  # (one process: exactly as without)
    if distributed:
        data = data[:, my_share(data.shape[1])]
    was = model.training
    model.eval()
    total, count = 0.0, 0
    if data.shape[1]:  # (a process may have no column of a narrow stream)
        state = model.init_state(data.shape[1], data.device)
        for i in range(0, data.shape[0] - 1, bptt):
            n = min(bptt, data.shape[0] - 1 - i)
            logits, state = model(data[i:i + n], state)
            target = data[i + 1:i + 1 + n].reshape(-1)
            if distributed:  # shares summed in float64, so that how the streams are shared hardly matters
                total += float(F.cross_entropy(logits, target, reduction="none").double().sum())
            else:
                total += float(F.cross_entropy(logits, target, reduction="sum"))
            count += n * data.shape[1]
    model.train(was)
    if distributed:
        total, count = all_sum([total, count], device=data.device)
    return total / count


class ValStrategy:
    """Divide every param group's lr by 4 when the validation loss did not decrease over an epoch
    (paper §4.1.2, "Val Strategy"); ``torch.optim.lr_scheduler.ReduceLROnPlateau`` checked once per
    epoch, stepped as a scheduler after every optimizer step."""

    def __init__(self, optimizer, steps_per_epoch: int, val_loss_fn):
        self.plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.25, patience=0)
        self.spe, self.val_loss_fn, self.t = steps_per_epoch, val_loss_fn, 0

    def step(self):
        self.t += 1
        if self.t % self.spe == 0:
            self.plateau.step(self.val_loss_fn())

    def state_dict(self):
        return {"t": self.t, "plateau": self.plateau.state_dict()}

    def load_state_dict(self, sd):
        self.t = sd["t"]
        self.plateau.load_state_dict(sd["plateau"])


# ---------------------------------------------------------------------------------- runs

# Which results each field decides (a test checks that every field is classified).
SELECTION_KEYS = ("seeds", "official", "transfer", "sgd_grid", "adam_grid", "baselines")
NO_RESULT_KEYS = ("out", "resume", "progress")
DIVERGENCE_LOSS = 1e4


def main(argv=None) -> int:
    cfg = parse_config(argv)  # under torchrun: rank 0 owns --out, the others only meta-train
    return distributed_main(resolve_device(cfg.device), cfg.out, lambda: _main(cfg),
                            lambda: _main(replace(cfg, progress=False), worker=True))


def _main(cfg: Config, worker: bool = False) -> int:
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    from tqdm.auto import tqdm
    log = (lambda s: None) if worker else tqdm.write
    world, _ = dist_world()
    # under torchrun, MLR-SNet's meta-training runs data-parallel: each process its share of the
    # token streams (columns) of every training and meta-data chunk
    cols = my_share(cfg.batch_size)
    t_start = time.perf_counter()
    corpus = Corpus(*find_ptb(cfg.data_dir), cfg.val_fraction)
    V = len(corpus.vocab)
    log(f"[data] {corpus.note}")
    train = batchify(corpus.train, cfg.batch_size, device)
    val_chunks = batchify(corpus.val, cfg.batch_size, device)
    val_eval, test_eval = batchify(corpus.val, 10, device), batchify(corpus.test, 10, device)
    spe = (train.shape[0] - 1) // cfg.bptt
    steps = cfg.epochs * spe
    n_val_chunks = (val_chunks.shape[0] - 1) // cfg.bptt
    log(f"[setup] vocabulary {V}, {spe} steps per epoch, {steps} steps per run, device {device}")
    data = {"note": corpus.note, "vocab": V, "train_tokens": len(corpus.train), "val_tokens": len(corpus.val),
            "test_tokens": len(corpus.test), "steps_per_epoch": spe}
    setup = {**runs.without_later_defaults({k: v for k, v in asdict(cfg).items()
                                            if k not in SELECTION_KEYS + NO_RESULT_KEYS}), "data": data}
    cache = runs.RunCache(os.path.join(cfg.out, "runs"), enabled=cfg.resume)
    result = runs.new_results("mlrsnet_ptb", asdict(cfg), data=data)
    result["tasks"] = {"ptb": []}

    def new_model(seed):
        torch.manual_seed(seed)
        return RNNLM(V, cfg.hidden, cfg.layers, cfg.dropout).to(device)

    def batches(stepper, shard=False):
        c = cols if shard else slice(None)
        def next_batch(aux):
            i = stepper.t % spe
            x = train[i * cfg.bptt:(i + 1) * cfg.bptt, c]
            y = train[i * cfg.bptt + 1:(i + 1) * cfg.bptt + 1, c]
            state = stepper.model.init_state(x.shape[1], device) if i == 0 or aux is None else aux
            return x, y, state
        return next_batch

    def evaluate_fn(model):
        def evaluate():
            # under torchrun (the data-parallel meta-training) each process evaluates its share
            vl = stream_loss(model, val_eval, cfg.bptt, distributed=True)
            tl = stream_loss(model, test_eval, cfg.bptt, distributed=True)
            return {"val_loss": vl, "val_ppl": math.exp(vl), "test_loss": tl, "test_ppl": math.exp(tl)}
        return evaluate

    def run(key, method, seed, make_stepper, gens=None, shard=False):
        unit = {**setup, "method": method, "seed": seed, "steps": steps}
        if shard and world > 1:  # dropout masks differ from one process's: not the same run
            unit["world_size"] = world

        def compute():
            model = new_model(seed)
            stepper = make_stepper(model)
            torch.manual_seed(seed)  # dropout masks (the same stream on every process: resume stays exact)
            rec = runs.train(stepper, batches(stepper, shard), steps=steps, evaluate=evaluate_fn(model),
                             eval_every=max(1, steps // cfg.evals), divergence_loss=DIVERGENCE_LOSS,
                             checkpoint=os.path.join(cfg.out, "ckpt", f"{key}-{runs.config_hash(unit)}.pt"),
                             checkpoint_every=spe, identity=unit, generators=gens or {}, resume=cfg.resume,
                             progress=cfg.progress, desc=key, log=log)
            rec["seed"] = seed
            ctl = getattr(stepper, "controller", None)
            if isinstance(ctl, MLRSNetController):
                rec["gammas"] = ctl.gammas
            if isinstance(stepper, MLRSNetMetaTrainer):
                rec.update(gamma=stepper.gamma, meta_failures=stepper.total_failures, world_size=world)
            return rec
        if shard and world > 1:  # rank 0's run cache decides for everyone
            hit = rank0_decides(not worker and cache.get(unit, name=key) is not None, device)
            if worker:
                return None if hit else compute()
        return cache.run(unit, compute, name=key)

    def add(label, recs):
        result["runs"][f"ptb/{label}"] = recs
        result["tasks"]["ptb"].append(f"ptb/{label}")

    # 1. MLR-SNet meta-trained online (Algorithm 1) with the normalised loss input.
    def make_meta(model, gval, seed):
        torch.manual_seed(30_000 + seed)  # MLR-SNet's initialisation
        net = MLRSNet(objective="language_model", num_classes=V)
        opt = torch.optim.SGD(model.parameters(), lr=1.0, weight_decay=cfg.weight_decay)

        def val_batch():
            j = int(torch.randint(0, n_val_chunks, (1,), generator=gval))
            x = val_chunks[j * cfg.bptt:(j + 1) * cfg.bptt, cols]
            return x, val_chunks[j * cfg.bptt + 1:(j + 1) * cfg.bptt + 1, cols], model.init_state(x.shape[1], device)
        # γ's training loss (once, at the start; it scales every rate): whole on every process, exactly
        # as one process computes it, not sharded like the evaluations. Sharding would save one forward
        # pass per run but sums in another order, and the last-bit change of γ grows into a visibly
        # different trajectory within ~15 steps at these rates (tried: 3e-4 relative by step 16)
        return MLRSNetMetaTrainer(net, model, opt, loss_fn=lm_loss, val_batch_fn=val_batch,
                                  config=MLRSNetTrainConfig(t_val=cfg.t_val, meta_lr=cfg.meta_lr, grad_clip=cfg.clip,
                                                            autocast=cfg.autocast),
                                  train_loss_fn=lambda: stream_loss(model, train, cfg.bptt), log=log)
    label = "MLR-SNet (meta-train)"
    out = []
    for s in cfg.seeds:
        gval = torch.Generator().manual_seed(20_000 + s)
        # MetaUpdateFailed (repeated non-finite meta-updates) ends the script: one line, exit status 4.
        out.append(run(f"mlrsnet_meta_seed{s}", {"method": label}, s, lambda m: make_meta(m, gval, s),
                       gens={"val": gval}, shard=True))
    if world > 1:  # the processes are done with each other; rank 0 runs the rest alone
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if worker:
        return 0
    add(label, out)

    # 2. Transferred nets (Algorithm 2).
    sets = []
    if cfg.official:
        d = os.path.join(cfg.data_dir or os.environ.get("L2L_ZOO_DATA") or "data", "mlr_snet_official")
        paths = [os.path.join(d, f"mlr_snet_{e}.pth") for e in (1, 100, 200)]
        if all(os.path.isfile(p) for p in paths):
            sets.append(("MLR-SNet (official nets)", [MLRSNet.from_official_checkpoint(
                p, layout="meta-test", objective="language_model", num_classes=V) for p in paths],
                [runs.file_digest(p) for p in paths]))
        else:
            result["notes"].append(f"official nets not found in {d}: skipped")
    if cfg.transfer:
        ours = []
        for p in cfg.transfer:
            n = l2l_zoo.load(p)
            m = MLRSNet(**{**n.config, "objective": "language_model", "num_classes": V})
            m.load_state_dict(n.state_dict())
            ours.append(m)
        sets.append(("MLR-SNet (ours from CIFAR-10)", ours, [runs.file_digest(p) for p in cfg.transfer]))
    for label, nets, digests in sets:
        def make_ctl(model, nets=nets):
            opt = torch.optim.SGD(model.parameters(), lr=0.0, weight_decay=cfg.weight_decay)
            ctl = MLRSNetController(opt, nets, total_steps=steps, grad_clip=cfg.clip,
                                    train_loss_fn=lambda: stream_loss(model, train, cfg.bptt))
            return runs.ControllerStepper(model, ctl, lm_loss, autocast=cfg.autocast)
        tag = "official" if "official" in label else "ours"
        add(label, [run(f"mlrsnet_{tag}_seed{s}", {"method": label, "nets": digests}, s, make_ctl)
                    for s in cfg.seeds])

    # 3. Tuned baselines with the Val Strategy.
    for name, grid in (("SGD", cfg.sgd_grid), ("Adam", cfg.adam_grid)):
        if name.lower() not in cfg.baselines:
            continue
        def make_b(lr, name=name):
            def make(model):
                opt = (torch.optim.SGD(model.parameters(), lr=lr, weight_decay=cfg.weight_decay) if name == "SGD" else
                       torch.optim.Adam(model.parameters(), lr=lr, betas=(0.0, 0.999), weight_decay=cfg.weight_decay))
                pol = ValStrategy(opt, spe, lambda: stream_loss(model, val_eval, cfg.bptt))
                return runs.OptimizerStepper(model, opt, lm_loss, scheduler=pol, grad_clip=cfg.clip,
                                             autocast=cfg.autocast)
            return make
        tuned = runs.tune(grid, lambda lr: run(f"{name}_lr{lr:g}_seed{cfg.seeds[0]}", {"method": name, "lr": lr},
                                               cfg.seeds[0], make_b(lr)),
                          criterion="val_ppl", note=f"seed {cfg.seeds[0]}")
        result["tuning"][name] = tuned.to_dict()
        if tuned.best is None:
            result["notes"].append(f"{name}: every α0 of the grid diverged; not evaluated")
            continue
        best = tuned.best
        add(f"{name} + Val Strategy (α0={best:g})", [
            run(f"{name}_lr{best:g}_seed{s}", {"method": name, "lr": best}, s, make_b(best)) for s in cfg.seeds])

    result["summary"] = {k: runs.summarize(v) for k, v in result["runs"].items()}
    result["wall_s"] = time.perf_counter() - t_start
    runs.write_json(os.path.join(cfg.out, "results.json"), result)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "paper_figs"))
    from fig_mlrsnet import plot  # noqa: E402
    plot(result, os.path.join(cfg.out, "mlrsnet_ptb.png"))
    log(f"\n{'method':<36}{'test ppl':>18}{'val ppl':>10}{'diverged':>9}   ({cfg.epochs} epochs, {steps} steps)")
    for key, s in result["summary"].items():
        tp = "n/a" if s.get("test_ppl") is None else f"{s['test_ppl']:.2f} ± {s['test_ppl_std']:.2f}"
        vp = "n/a" if s.get("val_ppl") is None else f"{s['val_ppl']:.2f}"
        log(f"{key.split('/', 1)[1]:<36}{tp:>18}{vp:>10}{s['diverged']:>6}/{s['n_seeds']}")
    log(f"results: {os.path.join(cfg.out, 'results.json')}  plot: {os.path.join(cfg.out, 'mlrsnet_ptb.png')}  "
        f"({result['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    run_main(main)
