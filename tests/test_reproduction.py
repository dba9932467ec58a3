"""Reproduction checks at the full CPU-scale protocols, on real data: marked ``slow`` (minutes, not
seconds), run with ``python -m pytest -m slow``. They guard the numbers the README reports against
regressions of the algorithms or of the results layer; each expected value is the one measured
before (the session and command are named), not a value chosen to make the check pass."""
import io
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.slow


def script(name, *args, cwd):
    env = dict(os.environ)
    if env.get("L2L_ZOO_DATA"):  # absolute: the scripts run in a temporary folder (CI sets ../shared/data)
        env["L2L_ZOO_DATA"] = os.path.abspath(env["L2L_ZOO_DATA"])
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", f"{name}.py"), *args, "--no-progress"],
                       capture_output=True, text=True, cwd=cwd, timeout=3600, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    return r


def test_flagship_meta_training_is_deterministic_on_one_machine(data_dir, tmp_path):
    """`mnist_mlp.py --opt simple --smooth eps=0.1` meta-trains to identical bits when run twice on one
    machine (here 40 meta-steps; the full 360-step quick start gave the same optimizer twice on an AMD
    EPYC machine, 2026-12-07). Its *number* is not reproducible across machines, so it is not checked
    against a band here: float rounding differs between machines and meta-training amplifies it (seed 0,
    the same command: step-1000 train loss 0.01691 on the machine of 2026-12-02, 0.0295 on the AMD EPYC
    machine; meta-seeds 0 / 1 / 2 there: 0.0295 / 0.0022 / 0.0133). The optimizer of the recorded run
    ships in the zoo, and its evaluation reproduces 0.01691 on both machines (tests/test_zoo.py)."""
    results = []
    for k in range(2):
        out = tmp_path / f"run{k}"
        script("mnist_mlp", "--opt", "simple", "--smooth", "eps=0.1", "--meta-steps", "40", "--eval-steps", "20",
               "--baselines", "none", "--device", "cpu", "--out", str(out), cwd=tmp_path)
        results.append((json.loads((out / "results.json").read_text()), (out / "optimizer.pt").read_bytes()))
    (a, wa), (b, wb) = results
    untimed = lambda h: [{k: v for k, v in r.items() if k != "elapsed_s"} for r in h]  # noqa: E731
    assert untimed(a["meta_training"]["history"]) == untimed(b["meta_training"]["history"])
    assert a["runs"]["simple+smooth"][0]["step_log"] == b["runs"]["simple+smooth"][0]["step_log"]
    sa, sb = (torch.load(io.BytesIO(w), weights_only=True)["state_dict"] for w in (wa, wb))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_constant_rate_of_the_marthe_study_is_in_its_recorded_band(data_dir, tmp_path):
    """§5 of the MARTHE paper, constant η = 0.01, seed 0 (512 steps): the 20-seed study of stop 6
    measured 87.55 ± 0.56 % validation accuracy (paper: 87.5 %); one seed must lie within 4 standard
    deviations of that mean."""
    out = tmp_path / "marthe"
    script("lr_schedules_mnist", "--seeds", "1", "--methods", "constant", "--baselines", "none",
           "--lrs-opt-seeds", "0", "--check-steps", "0", "--out", str(out), cwd=tmp_path)
    res = json.loads((out / "results.json").read_text())
    acc = res["summary"]["configs"]["constant"]["val_acc"]
    assert abs(100 * acc - 87.55) <= 4 * 0.56, acc
