"""The flagship benchmark's command line: bad input gives a one-line error and a non-zero exit; a
tiny end-to-end run writes complete results, and --resume reuses what was done."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "mnist_mlp.py")


def run(*args, env_extra=None):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.parametrize("args,message", [
    (["--opt", "simple", "--smooth", "eps=abc"], "eps must be a number, got 'abc'"),
    (["--opt", "simple", "--smooth", "eps=-1"], "eps must be > 0, got -1.0"),
    (["--opt", "simple", "--smooth", "eps=0.1,gamma=2"], "unknown key 'gamma'"),
    (["--opt", "lion"], "--opt must be one of ['simple', 'dm', 'rnnprop', 'sgd', 'sgdm', 'adam'], got 'lion'"),
    (["--opt", "simple", "--task", "resnet"], "--task must be one of"),
    (["--opt", "simple", "--seeds", "0,x"], "--seeds must be"),
    (["--opt", "simple", "--eval-steps", "0"], "--eval-steps must be >= 1, got 0"),
    (["--opt", "simple", "--meta-loss", "mean"], "--meta-loss must be one of"),
    (["--opt", "sgd", "--smooth", "eps=0.1"], "--smooth applies to learned optimizers"),
    (["--opt", "simple", "--opt-config", "hiden=3", "--meta-steps", "1"], "unknown option(s) ['hiden']"),
    (["--opt", "simple", "--eval-steps", "abc"], "invalid int value: 'abc'"),
])
def test_bad_values_exit_nonzero_with_one_line(args, message, tmp_path):
    r = run(*args, "--out", str(tmp_path), "--no-progress")
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert message in lines[0] and "Traceback" not in r.stderr


def test_missing_data_is_a_one_line_error(tmp_path):
    r = run("--opt", "sgd", "--data-dir", str(tmp_path / "nothing"), "--out", str(tmp_path / "o"),
            "--no-progress", env_extra={"L2L_ZOO_DATA": str(tmp_path / "nothing")})
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 3 and len(lines) == 1 and "MNIST not found" in lines[0]


def test_help_explains_every_flag():
    r = run("--help")
    assert r.returncode == 0
    for flag in ("--opt", "--smooth", "--task", "--meta-steps", "--eval-steps", "--seeds", "--device",
                 "--out", "--resume", "--finetune", "--lr-grid", "--backend"):
        assert flag in r.stdout


def test_tiny_end_to_end_run_and_resume(data_dir, tmp_path):
    out = tmp_path / "run"
    args = ["--opt", "simple", "--smooth", "eps=0.1,steps=2", "--meta-steps", "2", "--horizon", "4",
            "--unroll", "2", "--eval-steps", "30", "--eval-every", "10", "--lr-grid", "0.1,0.01",
            "--baselines", "sgd", "--device", "cpu", "--out", str(out), "--no-progress"]
    r = run(*args)
    assert r.returncode == 0, r.stderr
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["smooth"] == "eps=0.1,steps=2" and res["config"]["eval_steps"] == 30
    assert set(res["runs"]) == {"simple+smooth", "sgd(lr=0.1)"} or set(res["runs"]) == {"simple+smooth", "sgd(lr=0.01)"}
    run0 = res["runs"]["simple+smooth"][0]
    assert len(run0["batch_loss"]) == 30 and run0["eval_steps"] == [0, 10, 20, 30]
    assert len(res["meta_training"]["history"]) == 2
    assert "only the MNIST test set is available" in res["data"]["note"]
    assert (out / "curves.png").stat().st_size > 1000 and (out / "optimizer.pt").exists()
    assert "train loss" in r.stderr + r.stdout
    # --resume: everything is cached, so the run is identical and fast
    r2 = run(*args, "--resume")
    assert r2.returncode == 0, r2.stderr
    res2 = json.loads((out / "results.json").read_text())
    assert res2["runs"] == res["runs"]
