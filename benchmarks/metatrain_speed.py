#!/usr/bin/env python
"""Where a meta-training step goes: seconds per truncation (forward unroll + meta-backward),
optimizee steps per second, memory, matrix-product FLOPs against a matrix multiply of the same FLOP
count, tensor bytes against a large copy (the memory roofline), and a ``torch.profiler`` breakdown by
phase, all in one process.

    python benchmarks/metatrain_speed.py                         # the four cases below, CPU
    python benchmarks/metatrain_speed.py --cases simple+smooth --repeats 5 --device cuda
    python benchmarks/metatrain_speed.py --cases dm,simple --meta-batch 8    # meta-batch vs sequential

Cases (``--cases``): ``simple`` and ``simple+smooth`` are the flagship (SimpleOptimizer, MNIST MLP
784-500-10, batch 128, truncation ``--unroll`` 20; ``+smooth`` is ``--smooth eps=0.1`` as in
``mnist_mlp.py``); ``dm`` and ``rnnprop`` run on ``mlp20`` (the 784-20-10 sigmoid MLP of
Andrychowicz et al. and Lv et al.). One truncation is exactly what ``MetaTrainer`` does per
meta-step (``MetaTrainer.meta_gradient``: the unroll, then ``autograd.grad`` of the meta-loss), on
a fresh optimizee run each repeat, after ``--warmup`` untimed truncations.

What is reported per case (medians over ``--repeats``):

* ``forward_s`` / ``backward_s`` / ``truncation_s``: the unroll, the meta-backward, their sum;
  ``steps_per_s`` = unroll / truncation_s.
* ``matmul_flops``: the matrix-product FLOPs of one truncation, forward and backward, counted by
  ``torch.utils.flop_counter.FlopCounterMode`` (elementwise work is not counted); ``gflops_per_s``
  achieved; ``matmul_time_ratio`` = truncation_s / the time a square float32 matrix multiply
  (``--matmul-size``) takes for the same FLOPs in this process. Includes ``native_flops``: the
  matrix-product FLOPs that the native kernels (SimpleOptimizer's cell, DM's and RNNProp's LSTM
  layer) do in place of the torch formulas (``l2l_zoo.native.COUNTS``; the counter cannot see
  inside them).
* ``tensor_bytes``: the bytes every aten op of one truncation reads (its tensor inputs) and writes
  (its outputs that are not views of an input), counted by a dispatch mode: the traffic of the
  unfused eager program, plus ``native_bytes``, what the native kernels read and write (each
  tensor once per call). ``bytes_per_s`` achieved and ``copy_bw_ratio`` = that against the
  bandwidth of a large ``Tensor.copy_`` (read + write) in this process.
* ``saved_bytes``: bytes saved for the meta-backward during the unroll (autograd's saved-tensor
  hooks, each storage once): the activation memory of a truncation. ``peak_rss_mb``: the process's
  peak resident memory after the case (monotone over the run); on CUDA ``cuda_peak_mb``
  (``torch.cuda.max_memory_allocated``, reset per case).
* ``phases``: one profiled truncation (``torch.profiler``), the share of its time in optimizee
  forward/backward (``backend.loss_and_grad``), the optimizer network (``lopt.step``), the
  smoothness PGD (the regularizer's call), the meta-backward and the rest; ``top_ops``: the aten ops
  with the largest self time. Profiling slows the program, so only the shares are meaningful.

``reference``: the default (fast) path against the eager reference path
(``MetaTrainConfig(fast=False)``: the smoothness PGD step by step, plain autograd formulas instead of
SimpleOptimizer's fused cell), interleaved in this process (``speedup``; skip with
``--no-reference``).

With ``--meta-batch B``: ``meta_batch``: a meta-batch of B instances in one truncation (with
``--meta-batch-mode vmap``, the default: the optimizee vmapped; the optimizer step stacked for
DM/RNNProp, per instance for large ones, vmapped otherwise: ``MetaTrainer._truncation_batch``; with
``loop``: the B truncations one after another, one backward pass) against B sequential truncations
(``speedup``), and the meta-gradient's total variance over fresh
single instances against fresh meta-batches (``variance_reduction``; B in expectation).

Writes ``--out`` (results JSON, ``l2l_zoo.runs`` schema) and a PNG of the phase shares beside it.
"""
from __future__ import annotations

import contextlib
import os
import resource
import statistics
import sys
import time

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # keep the profiler's start/stop lines off stderr

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import l2l_zoo  # noqa: E402
from l2l_zoo import native, runs  # noqa: E402
from l2l_zoo.cli import ArgumentParser, UsageError, output_file, parse_autocast, resolve_device, run_main  # noqa: E402
from l2l_zoo.meta import MetaTrainConfig, MetaTrainer  # noqa: E402
from l2l_zoo.regularizers import parse_smooth  # noqa: E402
from l2l_zoo.tasks import make_task  # noqa: E402

#: case -> (optimizer, task, --smooth spec)
CASES = {"simple": ("simple", "mlp", None), "simple+smooth": ("simple", "mlp", "eps=0.1"),
         "dm": ("dm", "mlp20", None), "rnnprop": ("rnnprop", "mlp20", None)}
PHASES = ("optimizee fwd/bwd", "optimizer network", "smoothness PGD", "meta-backward")


def parse(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0], epilog="See the module docstring.")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma list from {list(CASES)}")
    p.add_argument("--unroll", type=int, default=20, help="truncation length (optimizee steps)")
    p.add_argument("--batch-size", type=int, default=128, help="optimizee minibatch size")
    p.add_argument("--repeats", type=int, default=3, help="timed truncations per case (medians reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed truncations per case before timing")
    p.add_argument("--matmul-size", type=int, default=1024, help="side of the square reference matrix multiply")
    p.add_argument("--copy-mb", type=int, default=256, help="size of the reference tensor copy (MB)")
    p.add_argument("--no-profile", action="store_true", help="skip the torch.profiler phase breakdown")
    p.add_argument("--no-reference", action="store_true",
                   help="skip timing the eager reference path (MetaTrainConfig(fast=False)) against the default")
    p.add_argument("--meta-batch", type=int, default=1,
                   help="also time a meta-batch of B instances (torch.func.vmap) against B sequential "
                        "truncations and measure the meta-gradient's variance reduction (1 = skip)")
    p.add_argument("--meta-batch-mode", default="vmap", help="how the meta-batch is unrolled: vmap or loop "
                   "(MetaTrainConfig.meta_batch_mode)")
    p.add_argument("--var-samples", type=int, default=8,
                   help="fresh meta-gradients per estimate of the meta-gradient variance (with --meta-batch)")
    p.add_argument("--autocast", default="none",
                   help="none or bfloat16: the optimizee's forward passes under torch.autocast in every timed "
                        "truncation (MetaTrainConfig(autocast=...); for a GPU's bf16 rate)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = torch's default)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--data-dir", default=None, help="dataset folder (default $L2L_ZOO_DATA)")
    p.add_argument("--out", default=os.path.join("results", "metatrain_speed.json"), help="results JSON path")
    a = p.parse_args(argv)
    cases = [c.strip() for c in a.cases.split(",") if c.strip()]
    bad = [c for c in cases if c not in CASES]
    if bad or not cases or len(set(cases)) != len(cases):
        raise UsageError(f"--cases must be a comma list of distinct names from {list(CASES)}, got {a.cases!r}")
    for flag, v, lo in (("--unroll", a.unroll, 1), ("--batch-size", a.batch_size, 1), ("--repeats", a.repeats, 1),
                        ("--warmup", a.warmup, 0), ("--matmul-size", a.matmul_size, 16), ("--copy-mb", a.copy_mb, 1),
                        ("--threads", a.threads, 0), ("--meta-batch", a.meta_batch, 1),
                        ("--var-samples", a.var_samples, 2)):
        if v < lo:
            raise UsageError(f"{flag} must be an integer >= {lo}, got {v}")
    if a.data_dir is not None and not os.path.isdir(a.data_dir):
        raise UsageError(f"--data-dir: no such folder {a.data_dir!r}")
    if a.meta_batch_mode not in ("vmap", "loop"):
        raise UsageError(f"--meta-batch-mode must be vmap or loop, got {a.meta_batch_mode!r}")
    a.autocast = parse_autocast(a.autocast)
    return a, cases


def main(argv=None) -> int:
    a, cases = parse(argv)
    device = resolve_device(a.device)
    with output_file(a.out):
        return _main(a, cases, device)


# ---------------------------------------------------------------------------------------- counters
class ByteCounter(TorchDispatchMode):
    """Bytes each aten op reads (tensor inputs, each storage once) and writes (outputs that do not
    share an input's storage: in-place results are not new traffic). View ops (slices, transposes,
    reshapes that alias) move no data and are not counted."""

    def __init__(self):
        super().__init__()
        self.read = 0
        self.written = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if getattr(func, "is_view", False):
            return out
        ins = {}
        for t in tree_flatten((args, kwargs or {}))[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                ins[(t.untyped_storage().data_ptr(), t.data_ptr())] = t.numel() * t.element_size()
        self.read += sum(ins.values())
        in_storages = {k[0] for k in ins}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in in_storages:
                self.written += t.numel() * t.element_size()
        return out

    @property
    def total(self) -> int:
        return self.read + self.written


class SavedBytes:
    """Bytes autograd saves for the backward pass inside the context (each storage once)."""

    def __init__(self):
        self.seen = {}

    def pack(self, t):
        self.seen[(t.untyped_storage().data_ptr(), t.data_ptr(), tuple(t.shape))] = t.numel() * t.element_size()
        return t

    @property
    def total(self) -> int:
        return sum(self.seen.values())


class _Labelled:
    """Calls ``fn`` inside ``torch.profiler.record_function(label)``; other attributes delegate."""

    def __init__(self, obj, label, fn=None):
        self._obj, self._label, self._fn = obj, label, fn or obj

    def __call__(self, *args, **kwargs):
        with torch.profiler.record_function(self._label):
            return self._fn(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._obj, name)


def label_phases(tr: MetaTrainer):
    """Wrap the trainer's optimizee, optimizer-network and regularizer calls in profiler labels."""
    be = tr.backend
    be.loss_and_grad = _Labelled(be.loss_and_grad, PHASES[0])
    tr.lopt.step = _Labelled(tr.lopt.step, PHASES[1])
    if tr.reg is not None:
        reg = tr.reg
        tr.reg = _Labelled(reg, PHASES[2])
        tr.reg.prepare = _Labelled(reg.prepare, PHASES[2])  # the fast path's two calls
        tr.reg.penalties = _Labelled(reg.penalties, PHASES[2])


# ---------------------------------------------------------------------------------------- timing
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def truncation(tr: MetaTrainer, device, *, mode=None, label: bool = False, keep_grad: bool = False):
    """One meta-step's gradient computation (``MetaTrainer.meta_gradient``, split in two) on fresh
    optimizee runs (one, or B with a meta-batch), set up before ``mode`` (a counter) is entered and
    outside the timing; returns (forward seconds, backward seconds, meta-loss[, flat meta-gradient])."""
    batched = tr.cfg.meta_batch > 1
    run = tr._new_batch() if batched else tr._new_run()
    params = [p for p in tr.lopt.parameters() if p.requires_grad]
    rf = torch.profiler.record_function if label else (lambda name: contextlib.nullcontext())
    with mode if mode is not None else contextlib.nullcontext(), rf("truncation"):
        sync(device)
        t0 = time.perf_counter()
        ml, *_ = (tr._truncation_many if batched else tr._truncation)(run, tr.cfg.unroll)
        sync(device)
        t1 = time.perf_counter()
        with rf(PHASES[3]):
            grads = torch.autograd.grad(ml, params, allow_unused=True)
        sync(device)
        t2 = time.perf_counter()
    out = (t1 - t0, t2 - t1, float(ml.detach()))
    if keep_grad:
        out += (torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params)]),)
    return out


def matmul_rate(n: int, device, seconds: float = 1.0) -> float:
    """FLOP/s of a square float32 n×n matrix multiply (2n³ FLOPs), best of short timed bursts."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    torch.mm(a, b)
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        sync(device)
        t0 = time.perf_counter()
        for _ in range(4):
            torch.mm(a, b)
        sync(device)
        best = max(best, 4 * 2 * n ** 3 / (time.perf_counter() - t0))
    return best


def copy_bandwidth(mb: int, device, repeats: int = 5) -> float:
    """Bytes/s of ``dst.copy_(src)`` (read + write) over ``mb`` MB, best of ``repeats``."""
    src = torch.empty(mb * 2 ** 20 // 4, device=device).uniform_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = 0.0
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = max(best, 2 * src.numel() * 4 / (time.perf_counter() - t0))
    return best


def make_trainer(case: str, a, device, tasks: dict, meta_batch: int = 1, fast: bool = True,
                 meta_batch_mode: str = "auto") -> MetaTrainer:
    opt, task_name, smooth = CASES[case]
    if task_name not in tasks:
        tasks[task_name] = make_task(task_name, data_dir=a.data_dir, device=device, batch_size=a.batch_size)
    torch.manual_seed(0)
    lopt = l2l_zoo.create(opt).to(device)
    cfg = MetaTrainConfig(unroll=a.unroll, seed=0, smooth=parse_smooth(smooth) if smooth else None,
                          meta_batch=meta_batch, fast=fast, meta_batch_mode=meta_batch_mode, autocast=a.autocast)
    return MetaTrainer(lopt, tasks[task_name], cfg, log=lambda s: None)


def measure(case: str, a, device, tasks: dict, mm_rate: float, copy_bw: float) -> dict:
    tr = make_trainer(case, a, device, tasks)
    task = tr.task
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(a.warmup):
        truncation(tr, device)
    fw, bw = [], []
    for _ in range(a.repeats):
        f, b, _ = truncation(tr, device)
        fw.append(f)
        bw.append(b)
    tot = [f + b for f, b in zip(fw, bw)]
    t = statistics.median(tot)
    # counted on one further truncation each (the counters slow it down; not timed)
    from torch.utils.flop_counter import FlopCounterMode
    fc = FlopCounterMode(display=False)
    counts0 = dict(native.COUNTS)
    truncation(tr, device, mode=fc)
    native_flops = native.COUNTS["flops"] - counts0["flops"]
    flops = fc.get_total_flops() + native_flops
    bc = ByteCounter()
    counts0 = dict(native.COUNTS)
    truncation(tr, device, mode=bc)
    native_bytes = native.COUNTS["bytes"] - counts0["bytes"]  # the kernel's reads + writes
    traffic = bc.total + native_bytes
    saved = SavedBytes()
    run = tr._new_run()
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda x: x):
        tr._truncation(run, tr.cfg.unroll)
    out = {"optimizer": CASES[case][0], "task": CASES[case][1], "smooth": CASES[case][2],
           "coordinates": task.num_params, "unroll": a.unroll, "batch_size": a.batch_size,
           "forward_s": statistics.median(fw), "backward_s": statistics.median(bw), "truncation_s": t,
           "truncation_s_all": tot, "steps_per_s": a.unroll / t,
           "matmul_flops": flops, "gflops_per_s": flops / t / 1e9,
           "matmul_time_ratio": t / (flops / mm_rate) if flops else None,
           "tensor_bytes": traffic, "tensor_bytes_read": bc.read, "tensor_bytes_written": bc.written,
           "native_flops": native_flops, "native_bytes": native_bytes,
           "bytes_per_s": traffic / t, "copy_bw_ratio": (traffic / t) / copy_bw,
           "saved_bytes": saved.total,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    if not a.no_reference:
        out["reference"] = reference_comparison(case, a, device, tasks, tr)
    if a.meta_batch > 1:
        out["meta_batch"] = meta_batch_comparison(case, a, device, tasks, tr)
    if not a.no_profile:
        out.update(profile(tr, device))
    return out


def reference_comparison(case: str, a, device, tasks: dict, fast: MetaTrainer) -> dict:
    """The default (fast) path against the eager reference path (``MetaTrainConfig(fast=False)``:
    per-step smoothness PGD, plain autograd formulas) in this process, interleaved repeats."""
    ref = make_trainer(case, a, device, tasks, fast=False)
    for _ in range(a.warmup):
        truncation(ref, device)
    t_fast, t_ref = [], []
    for _ in range(a.repeats):
        f, b, _ = truncation(ref, device)
        t_ref.append(f + b)
        f, b, _ = truncation(fast, device)
        t_fast.append(f + b)
    tf, tr = statistics.median(t_fast), statistics.median(t_ref)
    return {"fast_s": tf, "reference_s": tr, "speedup": tr / tf, "fast_s_all": t_fast, "reference_s_all": t_ref}


def meta_batch_comparison(case: str, a, device, tasks: dict, single: MetaTrainer) -> dict:
    """A meta-batch of B instances in one vmapped truncation against B sequential truncations (same
    process, interleaved repeats), and the spread of the meta-gradient: its total variance over
    ``--var-samples`` fresh single instances against that of ``--var-samples`` fresh meta-batches
    (the mean of B independent instances: B times smaller in expectation)."""
    B = a.meta_batch
    trb = make_trainer(case, a, device, tasks, meta_batch=B, meta_batch_mode=a.meta_batch_mode)
    for _ in range(a.warmup):
        truncation(trb, device)
    t_batch, t_seq = [], []
    for _ in range(a.repeats):
        f, b, _ = truncation(trb, device)
        t_batch.append(f + b)
        t0 = time.perf_counter()
        for _ in range(B):
            truncation(single, device)
        t_seq.append(time.perf_counter() - t0)

    def total_var(gs):
        g = torch.stack(gs)
        return float(((g - g.mean(0)) ** 2).sum(1).mean() * len(gs) / (len(gs) - 1))

    g1 = [truncation(single, device, keep_grad=True)[3] for _ in range(a.var_samples)]
    gb = [truncation(trb, device, keep_grad=True)[3] for _ in range(a.var_samples)]
    v1, vb = total_var(g1), total_var(gb)
    tb, ts = statistics.median(t_batch), statistics.median(t_seq)
    return {"B": B, "mode": a.meta_batch_mode, "batched_s": tb, "sequential_s": ts, "speedup": ts / tb, "batched_s_all": t_batch,
            "sequential_s_all": t_seq, "grad_var_single": v1, "grad_var_batched": vb,
            "variance_reduction": v1 / vb if vb > 0 else None, "var_samples": a.var_samples}


def profile(tr: MetaTrainer, device, top: int = 12) -> dict:
    label_phases(tr)
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        truncation(tr, device, label=True)
    ev = {e.key: e for e in prof.key_averages()}
    total = ev["truncation"].cpu_time_total
    times = {p: (ev[p].cpu_time_total if p in ev else 0.0) for p in PHASES}
    # the profiler's per-event times can add up to slightly more than the enclosing event's (timer
    # granularity, its own overhead): shares are of the larger of the two, so they sum to 1
    denom = max(total, sum(times.values()))
    phases = {p: t / denom for p, t in times.items()}
    phases["other"] = (denom - sum(times.values())) / denom
    ops = sorted((e for e in prof.key_averages() if e.key.startswith("aten::")),
                 key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return {"phases": phases, "profiled_s": total / 1e6,
            "top_ops": [{"op": e.key, "self_share": e.self_cpu_time_total / total, "calls": e.count} for e in ops]}


def _main(a, cases, device) -> int:
    if a.threads:
        torch.set_num_threads(a.threads)
    t_start = time.perf_counter()
    mm_rate = matmul_rate(a.matmul_size, device)
    copy_bw = copy_bandwidth(a.copy_mb, device)
    native_on = native.simple_cell() is not None and native.lstm_cell() is not None
    print(f"device {device}, {torch.get_num_threads()} threads: square matmul n={a.matmul_size} "
          f"{mm_rate / 1e9:.1f} GFLOP/s; copy of {a.copy_mb} MB {copy_bw / 1e9:.1f} GB/s (read + write); "
          f"native kernels {'on' if native_on else 'off (torch fallback)'}")
    tasks, summary = {}, {}
    for case in cases:
        s = summary[case] = measure(case, a, device, tasks, mm_rate, copy_bw)
        print(f"\n{case} ({s['optimizer']} on {s['task']}, {s['coordinates']:,} coordinates, truncation {a.unroll})")
        print(f"  truncation {s['truncation_s']:.3f} s (forward {s['forward_s']:.3f} + meta-backward "
              f"{s['backward_s']:.3f}), {s['steps_per_s']:.1f} optimizee steps/s")
        print(f"  matrix products {s['matmul_flops'] / 1e9:.2f} GFLOP -> {s['gflops_per_s']:.2f} GFLOP/s, "
              f"{s['matmul_time_ratio']:.1f}x a square matmul of the same FLOPs")
        print(f"  tensor traffic {s['tensor_bytes'] / 1e9:.2f} GB -> {s['bytes_per_s'] / 1e9:.2f} GB/s, "
              f"{100 * s['copy_bw_ratio']:.0f} % of the copy bandwidth")
        print(f"  saved for backward {s['saved_bytes'] / 2 ** 20:.0f} MB; peak RSS {s['peak_rss_mb']:.0f} MB"
              + (f"; CUDA peak {s['cuda_peak_mb']:.0f} MB" if "cuda_peak_mb" in s else ""))
        if "reference" in s:
            m = s["reference"]
            print(f"  fast path {m['fast_s']:.3f} s vs eager reference path {m['reference_s']:.3f} s: "
                  f"{m['speedup']:.2f}x faster")
        if "meta_batch" in s:
            m = s["meta_batch"]
            print(f"  meta-batch B={m['B']} ({m.get('mode', 'vmap')}): {m['batched_s']:.3f} s vs {m['sequential_s']:.3f} s for {m['B']} sequential "
                  f"truncations ({m['speedup']:.2f}x); meta-gradient variance {m['grad_var_single']:.3g} (one instance) "
                  f"-> {m['grad_var_batched']:.3g} (meta-batch), {m['variance_reduction']:.2f}x smaller "
                  f"({m['var_samples']} samples each)")
        if "phases" in s:
            print("  profile: " + ", ".join(f"{k} {100 * v:.0f} %" for k, v in s["phases"].items()))
            print("  top ops (self time): " + ", ".join(f"{o['op'].removeprefix('aten::')} {100 * o['self_share']:.0f} %"
                                                        for o in s["top_ops"][:8]))
    results = runs.new_results("metatrain_speed", vars(a),
                               data={k: v.data.summary() for k, v in tasks.items()})
    results["summary"] = summary
    results["reference"] = {"matmul_flops_per_s": mm_rate, "copy_bytes_per_s": copy_bw,
                            "threads": torch.get_num_threads(), "device": str(device),
                            "native_kernels": native_on}
    results["wall_s"] = time.perf_counter() - t_start
    runs.write_json(a.out, results)
    if any("phases" in s for s in summary.values()):
        plot(summary, os.path.splitext(a.out)[0] + ".png")
    print(f"\nresults: {a.out}")
    return 0


def plot(summary: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [c for c, s in summary.items() if "phases" in s]
    keys = [*PHASES, "other"]
    fig, ax = plt.subplots(figsize=(max(5, 1.4 * len(names)), 3.6))
    bottom = [0.0] * len(names)
    for k in keys:
        vals = [summary[c]["truncation_s"] * summary[c]["phases"][k] for c in names]
        ax.bar(names, vals, bottom=bottom, label=k)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_ylabel("seconds per truncation (profile shares)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    run_main(main)
