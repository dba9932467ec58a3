"""``benchmarks/metatrain_speed.py``: its counters count what they claim (bytes of an op's inputs
and new outputs, bytes saved for backward), and a tiny run writes the results schema with every
field the speed issue asks for (timings themselves are never asserted)."""
import importlib.util
import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def ms():
    spec = importlib.util.spec_from_file_location("_metatrain_speed", os.path.join(ROOT, "benchmarks", "metatrain_speed.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_byte_counter_reads_inputs_and_writes_only_new_storage(ms):
    a, b = torch.ones(1000), torch.ones(1000)
    bc = ms.ByteCounter()
    with bc:
        c = a + b          # reads 8000, writes 4000
    assert (bc.read, bc.written) == (8000, 4000)
    bc = ms.ByteCounter()
    with bc:
        a.add_(b)          # in place: the result is a's storage, no new write counted
        a.view(10, 100)    # a view moves no data
        a[:500].t()
    assert (bc.read, bc.written) == (8000, 0)
    assert c.shape == (1000,)


def test_saved_bytes_counts_what_autograd_keeps(ms):
    x = torch.ones(500, requires_grad=True)
    y = torch.full((500,), 2.0, requires_grad=True)
    sb = ms.SavedBytes()
    with torch.autograd.graph.saved_tensors_hooks(sb.pack, lambda t: t):
        (x * y).sum()      # mul saves both operands; sum saves nothing of size
    assert sb.total == 2 * 500 * 4


def test_tiny_run_writes_every_reported_field(ms, data_dir, tmp_path, capsys):
    torch.set_num_threads(1)
    out = tmp_path / "speed.json"
    assert ms.main(["--cases", "dm", "--unroll", "2", "--repeats", "1", "--warmup", "0", "--matmul-size", "64",
                    "--copy-mb", "4", "--threads", "1", "--data-dir", data_dir, "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["schema"] == "l2l_zoo.results" and res["benchmark"] == "metatrain_speed"
    s = res["summary"]["dm"]
    assert s["coordinates"] == 784 * 20 + 20 + 20 * 10 + 10
    # DM's network: per coordinate per step 2 LSTM layers (input 2/20 -> 4·20 gates, hidden 20) and a
    # 20 -> 1 head; forward matrix products alone are 9,960 FLOPs per coordinate per step
    assert s["matmul_flops"] > 2 * 9960 * s["coordinates"]
    for k in ("forward_s", "backward_s", "truncation_s", "steps_per_s", "gflops_per_s", "matmul_time_ratio",
              "tensor_bytes", "bytes_per_s", "copy_bw_ratio", "saved_bytes", "peak_rss_mb", "profiled_s"):
        assert s[k] > 0, k
    assert set(s["phases"]) == {*ms.PHASES, "other"} and sum(s["phases"].values()) == pytest.approx(1.0, abs=1e-6)
    assert s["phases"]["smoothness PGD"] == 0 and s["phases"]["meta-backward"] > 0
    assert s["top_ops"] and all(o["op"].startswith("aten::") for o in s["top_ops"])
    assert (tmp_path / "speed.png").exists()
    r = s["reference"]  # the fast path timed against the eager reference path
    assert r["fast_s"] > 0 and r["reference_s"] > 0 and r["speedup"] > 0


def test_autocast_bfloat16_runs_the_optimizee_in_bfloat16(ms, data_dir, tmp_path, capsys):
    """--autocast bfloat16 (for a GPU's bf16 rate) reaches the trainer: the recorded config says so
    and the timed truncation's meta-loss differs from float32's by bfloat16 rounding, not more."""
    torch.set_num_threads(1)
    common = ["--cases", "dm", "--unroll", "2", "--repeats", "1", "--warmup", "0", "--matmul-size", "64",
              "--copy-mb", "4", "--threads", "1", "--no-profile", "--no-reference", "--data-dir", data_dir]
    a, _ = ms.parse([*common, "--autocast", "bfloat16"])
    b, _ = ms.parse(common)
    tasks = {}
    ml = {}
    for name, args in (("bf16", a), ("fp32", b)):
        tr = ms.make_trainer("dm", args, torch.device("cpu"), tasks)
        assert tr.cfg.autocast == (None if name == "fp32" else "bfloat16")
        run = tr._new_run(tr.task)
        ml[name] = float(tr._truncation(run, tr.cfg.unroll)[0].detach())
    assert ml["bf16"] != ml["fp32"] and ml["bf16"] == pytest.approx(ml["fp32"], rel=2e-2)
    out = tmp_path / "bf.json"
    assert ms.main([*common, "--autocast", "bfloat16", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["config"]["autocast"] == "bfloat16"


@pytest.mark.parametrize("mode", ["vmap", "loop"])
def test_meta_batch_comparison_fields(ms, data_dir, tmp_path, capsys, mode):
    torch.set_num_threads(1)
    out = tmp_path / "mb.json"
    assert ms.main(["--cases", "dm", "--unroll", "2", "--repeats", "1", "--warmup", "0", "--matmul-size", "64",
                    "--copy-mb", "4", "--threads", "1", "--no-profile", "--meta-batch", "3", "--var-samples", "2",
                    "--meta-batch-mode", mode, "--data-dir", data_dir, "--out", str(out)]) == 0
    m = json.loads(out.read_text())["summary"]["dm"]["meta_batch"]
    assert m["B"] == 3 and m["mode"] == mode and m["batched_s"] > 0 and m["sequential_s"] > 0 and m["speedup"] > 0
    assert m["grad_var_single"] > 0 and m["grad_var_batched"] > 0


def test_metastep_vs_commit_times_both_versions_and_removes_its_worktree(data_dir, tmp_path):
    """benchmarks/metastep_vs_commit.py against HEAD (the same code twice): both versions are timed
    in their own processes, the ratios are recorded, and the temporary git worktree is gone."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    before = subprocess.run(["git", "-C", root, "worktree", "list"], capture_output=True, text=True).stdout
    out = tmp_path / "m.json"
    # as CI runs it: $L2L_ZOO_DATA relative to the checkout (the versions' workers run in other folders)
    env = {**os.environ, "L2L_ZOO_DATA": os.path.relpath(data_dir, root)}
    r = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "metastep_vs_commit.py"), "--commit", "HEAD",
                        "--rounds", "1", "--meta-steps", "3", "--threads", "1", "--out", str(out)],
                       capture_output=True, text=True, timeout=600, cwd=root, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert len(res["rounds"]) == 1
    for label in ("plain", "smooth"):
        s = res["summary"][label]
        assert s["commit_s"] > 0 and s["checkout_s"] > 0 and s["speedup"] == pytest.approx(s["commit_s"] / s["checkout_s"])
    assert subprocess.run(["git", "-C", root, "worktree", "list"], capture_output=True, text=True).stdout == before
