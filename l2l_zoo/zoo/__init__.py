"""The pretrained zoo: learned optimizers meta-trained by this project's own recorded commands (and
the MLR-SNet authors' released nets), ready for any training loop.

    import l2l_zoo
    lopt = l2l_zoo.zoo.load("simple-smooth/mnist-mlp")
    opt = l2l_zoo.LearnedOptimizerAdapter(model.parameters(), lopt)    # a torch.optim.Optimizer

    python -m l2l_zoo.zoo list                              # the entries, what they are, their numbers
    python -m l2l_zoo.zoo show simple-smooth/mnist-mlp      # one entry in full (command, provenance)
    python -m l2l_zoo.zoo check simple-smooth/mnist-mlp     # re-measure its recorded number from the weights
    python -m l2l_zoo.zoo build simple-smooth/mnist-mlp     # meta-train it again with its command, compare

Two kinds of entry:

* ``shipped``: the meta-parameters are part of the package, as a JSON weight file
  (:func:`write_weights`: name, configuration, every tensor's dtype, shape and raw little-endian
  bytes in base64, a SHA-256 over them, and the provenance: the command, commit and what it
  measured). Reading one runs no pickle at all, and a file whose content does not match its digest
  is refused. Each names the command that produced it (run from a source checkout) and a check that
  re-measures the number it was recorded with from the shipped weights alone (``check``), so a
  user can see that the weights in hand are the ones the number belongs to.
* ``data``: files a user already has under the data folder (``$L2L_ZOO_DATA``), pinned by SHA-256,
  e.g. the MLR-SNet authors' three released nets (Shu et al. 2022, Algorithm 2 meta-test).

The zoo only holds what was measured here: every number of an entry comes from the command beside
it; nothing is copied from the papers.
"""
from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .. import runs
from ..base import LearnedOptimizer
from ..registry import from_parts

__all__ = ["ZooEntry", "ZooError", "ENTRIES", "LOAD_PREFIX", "available", "entry", "load", "check", "build", "write_weights",
           "read_weights", "weights_digest"]

WEIGHTS_DIR = Path(__file__).with_name("weights")
#: how a script's ``--load`` names a zoo entry instead of a file: ``zoo:NAME``
LOAD_PREFIX = "zoo:"
_FORMAT, _VERSION = "l2l_zoo.zoo_weights", 1
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
           "bfloat16": torch.bfloat16, "int64": torch.int64, "int32": torch.int32, "bool": torch.bool}


class ZooError(ValueError):
    """An unknown entry, a weight file that cannot be used, a missing or altered data file: the
    message is one line naming it and what is allowed or expected."""


@dataclass(frozen=True)
class ZooEntry:
    """One zoo entry. ``kind``: ``"shipped"`` (``weights``: a file of ``zoo_weights/``) or
    ``"data"`` (``files``: paths under the data folder, ``sha256`` theirs). ``build``: the command
    (argv after ``python``, run from a source checkout, ``--out`` appended) that produced it, and
    ``artifact`` the optimizer file inside that ``--out``. ``recorded``/``measured``: the numbers
    and how they were measured (a shipped entry's come from its weight file's provenance). ``check``: how ``check`` re-measures
    ``recorded`` (``{"task", "steps", "seed", "metric"}``: train a fresh ``task`` model for
    ``steps`` minibatch steps with this optimizer, seed ``seed``, the full-split ``metric`` at the
    end), with relative tolerance ``rtol`` (other CPUs and libraries round differently)."""

    name: str
    optimizer: str
    kind: str
    summary: str
    paper: str
    recorded: dict = field(default_factory=dict)
    recorded_per_seed: dict = field(default_factory=dict)
    recorded_threads: dict = field(default_factory=dict)
    measured: str = ""
    weights: str | None = None
    files: tuple = ()
    sha256: tuple = ()
    build: tuple = ()
    artifact: str | None = None
    check: dict | None = None
    rtol: float = 1e-3
    options: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


#: DM's and RNNProp's step-1,000 losses on the sigmoid MLP move with rounding alone: 1 CPU thread instead
#: of the recorded 2 gave 0.0503 instead of 0.0546 (DM, 7.8 %) and 0.0473 instead of 0.0484 (RNNProp,
#: 2.4 %); ``check`` runs at the recorded thread count, and on other hardware this tolerance applies
ROUNDING_SENSITIVE = 0.15


def _mnist(name: str, opt: str, flags: tuple, summary: str, paper: str, task: str = "mlp",
           rtol: float = 1e-3) -> ZooEntry:
    """An optimizer meta-trained by ``mnist_mlp.py --opt opt`` + ``flags``, checked by its step-1,000
    training loss (seed 0) on ``task``, the task its recorded numbers were measured on."""
    return ZooEntry(name=name, optimizer=opt, kind="shipped", summary=summary, paper=paper,
                    weights=name.replace("/", "_") + ".json",
                    build=("benchmarks/mnist_mlp.py", "--opt", opt, *flags, "--baselines", "none", "--no-progress"),
                    artifact="optimizer.pt",
                    check={"task": task, "steps": 1000, "seed": 0, "metric": "train_loss",
                           "recorded": "train_loss@1000"}, rtol=rtol)


def _mnist_simple(name: str, flags: tuple, summary: str, paper: str) -> ZooEntry:
    return _mnist(name, "simple", flags, summary, paper)


ENTRIES: dict[str, ZooEntry] = {e.name: e for e in (
    _mnist_simple("simple-smooth/mnist-mlp", ("--smooth", "eps=0.1", "--meta-steps", "360"),
                  "SimpleOptimizer (bias-free, embedding sharing, weighted-difference meta-loss) meta-trained "
                  "360 meta-steps with the smoothness regularizer (eps=0.1) on the MNIST MLP 784-500-10: "
                  "the README's flagship until 2026-12-07 (now meta-trained 720 meta-steps)",
                  "Chen et al. 2020 (SimpleOptimizer, §3); the smoothness paper (§4, Algorithm 1)"),
    _mnist_simple("simple/mnist-mlp", ("--meta-steps", "360"),
                  "SimpleOptimizer meta-trained 360 meta-steps without smoothing on the MNIST MLP 784-500-10",
                  "Chen et al. 2020 (SimpleOptimizer, §3)"),
    _mnist_simple("simple-sumloss/mnist-mlp", ("--meta-loss", "sum", "--meta-steps", "360"),
                  "SimpleOptimizer meta-trained 360 meta-steps with the plain sum of losses as meta-loss (the "
                  "DM meta-loss; Chen et al.'s ablation, which beats their weighted difference on this task) "
                  "on the MNIST MLP 784-500-10: the best learned optimizer of the zoo here",
                  "Chen et al. 2020 (SimpleOptimizer, §3; ablation §4, Fig. 3b)"),
    _mnist("dm/mnist-mlp20", "dm", ("--meta-task", "mlp20", "--task", "mlp20", "--meta-steps", "1000"),
           "DMOptimizer (coordinate-wise two-layer LSTM, 20 units) meta-trained 1,000 meta-steps on the "
           "784-20-10 sigmoid MNIST MLP, Andrychowicz et al.'s setting; measured on that MLP",
           "Andrychowicz et al. 2016 (§3.1, MNIST)", task="mlp20", rtol=ROUNDING_SENSITIVE),
    _mnist("rnnprop/mnist-mlp20", "rnnprop", ("--meta-task", "mlp20", "--task", "mlp20", "--meta-steps", "1000"),
           "RNNProp (LSTM on Adam-normalised inputs, random scaling) meta-trained 1,000 meta-steps on the "
           "784-20-10 sigmoid MNIST MLP; measured on that MLP",
           "Lv et al. 2017 (§3-4, MNIST)", task="mlp20", rtol=ROUNDING_SENSITIVE),
    ZooEntry(
        name="mlrsnet/authors-cifar10", optimizer="mlrsnet", kind="data",
        summary="the MLR-SNet authors' three released nets (meta-trained on CIFAR-10 / ResNet-18, saved at "
                "epochs 1, 100, 200), for epochs [0, N/3), [N/3, 2N/3), [2N/3, N) of a new run "
                "(l2l_zoo.schedules.MLRSNetController)",
        paper="Shu et al. 2022 (MLR-SNet, §4.2.1, Algorithm 2)",
        measured="not re-measured by the zoo: benchmarks/mlrsnet_cifar.py and mlrsnet_ptb.py transfer them "
                 "(the README's MLR-SNet section)",
        files=("mlr_snet_official/mlr_snet_1.pth", "mlr_snet_official/mlr_snet_100.pth",
               "mlr_snet_official/mlr_snet_200.pth"),
        sha256=("7159d1e0b20dc1f2f340a8d73757b4b94fea923e62539653571bb75014bcb07d",
                "c2da6fd9cd9015e8217b3e9ff3c604ae96888adfb675435252864b406eaebecd",
                "5d19565c6065a0d1dff653a082ce65b8f7e66e00765f36e77f86b9cab1c9ea65"),
        options={"layout": "meta-test", "num_classes": 10}),
)}


def available() -> list[str]:
    """The entries' names; for a shipped one, only if its weight file is in the package."""
    return [n for n, e in ENTRIES.items() if e.kind != "shipped" or (WEIGHTS_DIR / e.weights).is_file()]


def entry(name: str) -> ZooEntry:
    """The entry ``name``; a shipped one with the numbers and provenance its weight file records
    (``recorded``, ``measured``). :class:`ZooError` names the entries there are."""
    if not isinstance(name, str) or name not in available():
        raise ZooError(f"no zoo entry {name!r}; entries: {available()}")
    e = ENTRIES[name]
    if e.kind == "shipped":
        prov = _read(WEIGHTS_DIR / e.weights)["provenance"]
        e = ZooEntry(**{**e.to_dict(), "recorded": dict(prov.get("recorded", {})),
                        "recorded_per_seed": dict(prov.get("recorded_per_seed", {})),
                        "recorded_threads": dict(prov.get("recorded_threads", {})),
                        "measured": prov.get("measured", "")})
    return e


# ------------------------------------------------------------------------------ weight files

def weights_digest(name: str, config: dict, state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the optimizer name, its configuration (canonical JSON) and every tensor's name,
    dtype, shape and raw bytes, in name order."""
    h = hashlib.sha256()
    h.update(json.dumps({"name": name, "config": config}, sort_keys=True).encode())
    for k in sorted(state):
        v = state[k].detach().cpu().contiguous()
        h.update(json.dumps([k, str(v.dtype).removeprefix("torch."), list(v.shape)]).encode())
        h.update(_raw(v))
    return h.hexdigest()


def _raw(v: torch.Tensor) -> bytes:
    if v.dtype == torch.bfloat16:
        v = v.view(torch.int16)
    b = v.numpy().tobytes()
    return b if sys.byteorder == "little" else v.numpy().byteswap().tobytes()


def write_weights(lopt: LearnedOptimizer, path: str | os.PathLike, **provenance) -> str:
    """Write ``lopt`` (name, configuration, meta-parameters) as a zoo weight file, with JSON-like
    ``provenance`` (e.g. ``command``, ``commit``, ``recorded``: the numbers it was measured at);
    atomically. Returns the digest (:func:`weights_digest`)."""
    if not isinstance(lopt, LearnedOptimizer):
        raise TypeError(f"write_weights: lopt must be a LearnedOptimizer, got {type(lopt).__name__}")
    state = {k: v.detach().cpu().contiguous() for k, v in lopt.state_dict().items()}
    for k, v in state.items():
        if str(v.dtype).removeprefix("torch.") not in _DTYPES:
            raise TypeError(f"write_weights: meta-parameter {k!r} has dtype {v.dtype}; allowed: {sorted(_DTYPES)}")
    digest = weights_digest(lopt.name, lopt.config, state)
    doc = {"format": _FORMAT, "version": _VERSION, "name": lopt.name, "config": lopt.config,
           "state_dict": {k: {"dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape),
                              "data": base64.b64encode(_raw(v)).decode("ascii")} for k, v in state.items()},
           "sha256": digest, "provenance": provenance}
    text = json.dumps(doc, indent=1, sort_keys=True) + "\n"
    runs.atomic_write(path, lambda f: f.write(text.encode()))
    return digest


def _read(path: Path) -> dict:
    def bad(what):
        return ZooError(f"{os.fspath(path)!r} is not a usable zoo weight file: {what}")
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ZooError(f"no such zoo weight file {os.fspath(path)!r}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"not JSON ({type(e).__name__}: {str(e).splitlines()[0][:80]})") from None
    if not isinstance(doc, dict) or doc.get("format") != _FORMAT:
        raise bad(f"format should be {_FORMAT!r}")
    if doc.get("version") != _VERSION:
        raise bad(f"format version {doc.get('version')!r}, this l2l_zoo reads version {_VERSION}")
    for key, kind in (("name", str), ("config", dict), ("state_dict", dict), ("sha256", str), ("provenance", dict)):
        if not isinstance(doc.get(key), kind):
            raise bad(f"entry {key!r} should be a {kind.__name__}")
    return doc


def read_weights(path: str | os.PathLike) -> tuple[LearnedOptimizer, dict]:
    """A zoo weight file → (the learned optimizer, its provenance). Refused with a one-line
    :class:`ZooError`: not the format, a tensor whose bytes do not fit its dtype and shape, a digest
    that does not match the content, or anything :func:`l2l_zoo.registry.from_parts` refuses
    (unregistered name, unknown options, wrong names or shapes, non-finite values)."""
    path = Path(path)
    doc = _read(path)

    def bad(what):
        return ZooError(f"{os.fspath(path)!r} is not a usable zoo weight file: {what}")
    state = {}
    for k, t in doc["state_dict"].items():
        if not (isinstance(t, dict) and t.get("dtype") in _DTYPES and isinstance(t.get("shape"), list)
                and all(isinstance(n, int) and n >= 0 for n in t["shape"]) and isinstance(t.get("data"), str)):
            raise bad(f"meta-parameter {k!r} should hold dtype (one of {sorted(_DTYPES)}), shape and data")
        dtype = _DTYPES[t["dtype"]]
        try:
            raw = base64.b64decode(t["data"], validate=True)
        except ValueError:
            raise bad(f"meta-parameter {k!r}: data is not base64") from None
        n = math.prod(t["shape"])
        item = torch.empty((), dtype=dtype).element_size()
        if len(raw) != n * item:
            raise bad(f"meta-parameter {k!r}: {len(raw)} bytes for shape {t['shape']} of {t['dtype']} "
                      f"({n * item} expected)")
        buf = torch.frombuffer(bytearray(raw), dtype=torch.int16 if dtype == torch.bfloat16 else dtype) if n else \
            torch.empty(0, dtype=dtype)
        if sys.byteorder != "little" and n:
            buf = torch.from_numpy(buf.numpy().byteswap())
        if dtype == torch.bfloat16 and n:
            buf = buf.view(torch.bfloat16)
        state[k] = buf.reshape(t["shape"]).clone()
    digest = weights_digest(doc["name"], doc["config"], state)
    if digest != doc["sha256"]:
        raise bad(f"its content has SHA-256 {digest[:16]}…, the file says {doc['sha256'][:16]}… "
                  "(altered or damaged)")
    return from_parts(doc["name"], doc["config"], state, bad), doc["provenance"]


# ------------------------------------------------------------------------------ using entries

def _data_dir(data_dir) -> Path:
    d = data_dir or os.environ.get("L2L_ZOO_DATA")
    if not d or not os.path.isdir(d):
        raise ZooError(f"this entry reads files from the data folder: pass data_dir= or set L2L_ZOO_DATA "
                       f"(got {d!r})")
    return Path(d)


def load(name: str, *, data_dir: str | os.PathLike | None = None, map_location="cpu"):
    """The learned optimizer of zoo entry ``name`` on ``map_location``: a :class:`LearnedOptimizer`
    for a shipped entry; for ``mlrsnet/authors-cifar10`` the list of its three
    :class:`~l2l_zoo.MLRSNet` nets (read from ``data_dir`` or ``$L2L_ZOO_DATA``, each checked
    against its pinned SHA-256 first)."""
    e = entry(name)
    if e.kind == "shipped":
        lopt, _ = read_weights(WEIGHTS_DIR / e.weights)
        return lopt.to(map_location)
    root = _data_dir(data_dir)
    from ..optimizers.mlrsnet import MLRSNet
    nets = []
    for rel, want in zip(e.files, e.sha256):
        p = root / rel
        if not p.is_file():
            raise ZooError(f"{name}: no file {os.fspath(p)!r} (expected {rel} under the data folder {os.fspath(root)!r})")
        got = runs.file_digest(p)
        if got != want:
            raise ZooError(f"{name}: {os.fspath(p)!r} has SHA-256 {got[:16]}…, the zoo pins {want[:16]}… "
                           "(another file, or altered)")
        nets.append(MLRSNet.from_official_checkpoint(p, **e.options).to(map_location))
    return nets


def check(name: str, *, data_dir: str | os.PathLike | None = None, device="cpu", progress: bool = False) -> dict:
    """Re-measure a shipped entry's recorded number from its weights alone (the entry's ``check``:
    a fresh model of its task trained with it, on the real data of ``data_dir`` /
    ``$L2L_ZOO_DATA``; on the CPU at the torch thread count the number was recorded with). Returns
    ``{"name", "metric", "recorded", "measured", "rel_diff", "ok", "rtol", "threads"}`` (``ok``:
    within the entry's ``rtol``)."""
    e = entry(name)
    if e.check is None:
        raise ZooError(f"zoo entry {name!r} has no check (kind {e.kind!r}); entries with one: "
                       f"{[n for n in available() if ENTRIES[n].check]}")
    from ..evaluation import train_optimizee
    from ..tasks import make_task
    from ..torch_optim import LearnedOptimizerAdapter
    c = e.check
    task = make_task(c["task"], data_dir=os.fspath(_data_dir(data_dir)), device=device, batch_size=128)
    lopt = load(name, map_location=device)
    threads, before = e.recorded_threads.get(c["recorded"]), torch.get_num_threads()
    try:  # on the CPU, at the thread count it was recorded with (the summation order changes the rounding)
        if threads and torch.device(device).type == "cpu":
            torch.set_num_threads(int(threads))
        rec = train_optimizee(task, lambda p: LearnedOptimizerAdapter(p, lopt), steps=c["steps"], seed=c["seed"],
                              eval_every=c["steps"], eval_splits=(c["metric"].split("_")[0],), progress=progress,
                              desc=name)
    finally:
        torch.set_num_threads(before)
    if rec["final"] is None:
        raise FloatingPointError(f"{name}: training diverged at step {rec['diverged_at']} ({rec['error']})")
    measured = float(rec["final"][c["metric"]])
    seeds = e.recorded_per_seed.get(c["recorded"], {})
    want = float(seeds[str(c["seed"])] if str(c["seed"]) in seeds else e.recorded[c["recorded"]])  # that seed's run
    rel = abs(measured - want) / abs(want)
    return {"name": name, "metric": f"{c['metric']} at step {c['steps']} ({c['task']}, seed {c['seed']})",
            "recorded": want, "measured": measured, "rel_diff": rel, "ok": rel <= e.rtol, "rtol": e.rtol,
            "threads": int(threads) if threads and torch.device(device).type == "cpu" else before}


def source_root() -> Path:
    """The source checkout this package runs from (the folder with ``benchmarks/``), for ``build``."""
    root = Path(__file__).resolve().parent.parent.parent
    if not (root / "benchmarks").is_dir():
        raise ZooError(f"build needs a source checkout (a folder with benchmarks/ above the package); "
                       f"{os.fspath(root)!r} has none: clone the repository and pip install -e .")
    return root


def build(name: str, out: str | os.PathLike, *, extra_args: tuple = (), resume: bool = False,
          entry_override: ZooEntry | None = None) -> dict:
    """Meta-train a shipped entry again with its recorded command (``--out out``; ``extra_args``
    appended, e.g. ``("--device", "cuda")``), then compare the result with the shipped weights:
    ``{"name", "command", "artifact", "max_abs_diff", "max_rel_diff", "identical"}`` (identical
    bits are expected on the machine and thread count it was recorded with, not elsewhere).
    ``entry_override``: build that entry instead (tests)."""
    e = entry_override or entry(name)
    if not e.build:
        raise ZooError(f"zoo entry {e.name!r} has no build command (kind {e.kind!r})")
    root = source_root()
    out = Path(out).resolve()
    cmd = [sys.executable, *e.build, "--out", os.fspath(out), *extra_args, *(["--resume"] if resume else [])]
    r = subprocess.run(cmd, cwd=root)
    if r.returncode != 0:
        raise ZooError(f"build of {e.name!r} failed (exit {r.returncode}): {' '.join(cmd[1:])}")
    from ..registry import load as load_file
    built = load_file(out / e.artifact)
    report = {"name": e.name, "command": " ".join(["python", *e.build]), "artifact": os.fspath(out / e.artifact)}
    if e.weights and (WEIGHTS_DIR / e.weights).is_file():
        shipped, _ = read_weights(WEIGHTS_DIR / e.weights)
        a, b = built.state_dict(), shipped.state_dict()
        if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in a):
            raise ZooError(f"build of {e.name!r} gave meta-parameters of other names or shapes than the shipped ones")
        diffs = [float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].numel()]
        rels = [float(((a[k].double() - b[k].double()).abs() / b[k].double().abs().clamp_min(1e-12)).max())
                for k in a if a[k].numel()]
        report.update(max_abs_diff=max(diffs, default=0.0), max_rel_diff=max(rels, default=0.0),
                      identical=all(torch.equal(a[k], b[k]) for k in a))
    return report


# ------------------------------------------------------------------------------ making entries

def provenance_from_results(optimizer_file: str | os.PathLike, results_files, label: str) -> dict:
    """The provenance of a weight file, read from the ``mnist_mlp.py`` results that measured the
    optimizer in ``optimizer_file``: ``recorded`` (``<metric>@<eval steps>`` of run ``label`` for its
    train/val/test loss and test accuracy, the mean over its seeds; ``recorded_per_seed`` each
    seed's; ``recorded_threads`` the torch CPU threads each was measured with), ``measured`` (each run's
    command, commit, torch version and threads), ``sha256_source`` (the optimizer file's digest) and
    the file's own ``meta_training`` configuration and ``meta_task``.
    A results file counts only if it was written by the run that saved ``optimizer_file`` (the same
    folder) or evaluated that very file (``--load`` with the same SHA-256); else :class:`ZooError`."""
    opt = Path(optimizer_file).resolve()
    digest = runs.file_digest(opt)
    recorded, per_seed, threads, measured = {}, {}, {}, []
    for rf in results_files:
        rf = Path(rf).resolve()
        res = runs.read_results(rf, benchmark="mnist_mlp")
        mt = res.get("meta_training") or {}
        same_run = rf.parent == opt.parent and not res["config"].get("load")
        if not (same_run or mt.get("sha256") == digest):
            raise ZooError(f"{os.fspath(rf)!r} did not measure {os.fspath(opt)!r} (not written beside it, and "
                           f"its --load file has SHA-256 {str(mt.get('sha256'))[:16]}…, not {digest[:16]}…)")
        if label not in res["summary"]:
            raise ZooError(f"{os.fspath(rf)!r} has no run {label!r}; runs: {sorted(res['summary'])}")
        s, steps = res["summary"][label], res["config"]["eval_steps"]
        for m in ("train_loss", "val_loss", "test_loss", "test_acc"):
            if s.get(m) is not None:
                recorded[f"{m}@{steps}"] = s[m]
                per_seed[f"{m}@{steps}"] = {str(r["seed"]): (r.get("final") or {}).get(m)
                                            for r in res["runs"][label]}
                threads[f"{m}@{steps}"] = res.get("environment", {}).get("cpu_threads")
        env = res.get("environment", {})
        measured.append(f"python {' '.join(env.get('argv', []))} (commit {str(env.get('git_commit'))[:7]}, "
                        f"torch {env.get('torch')}, {env.get('cpu_threads')} CPU threads, {s['n_seeds']} seed(s))")
    from ..registry import load as load_file
    _, extra = load_file(opt, with_extra=True)  # how it was meta-trained, as the run saved it
    return {"recorded": recorded, "recorded_per_seed": per_seed, "recorded_threads": threads,
            "measured": "; ".join(measured),
            "sha256_source": digest,
            **{k: extra[k] for k in ("meta_training", "meta_task") if k in extra}}
