"""The leaderboard (l2l_zoo.leaderboard, benchmarks/leaderboard.py): ranking, like-with-like checks,
and the script on real tiny runs of benchmarks/mnist_mlp.py."""
import json
import os
import subprocess
import sys

import pytest

from l2l_zoo.leaderboard import LeaderboardError, build, to_markdown

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rec(seed, losses, diverged_at=None, every=10, planned=20):
    steps = [every * i for i in range(len(losses))]
    return {"steps": planned, "seed": seed, "diverged_at": diverged_at,
            "eval": {"step": steps, "train_loss": losses, "test_acc": [1 - v for v in losses]}}


def results(runs, kinds, task="mlp", data="mnist carved"):
    return {"benchmark": "mnist_mlp", "data": {"note": data},
            "config": {"task": task, "batch_size": 128, "autocast": None, "finetune": False, "meta_steps": 360,
                       "meta_task": "mlp", "lr_grid": [1, 0.1], "tune_criterion": "val_loss", "eval_every": 10},
            "runs": runs, "methods": {k: {"kind": v, "tuned": k if v == "hand-designed" else None}
                                      for k, v in kinds.items()},
            "tuning": {}, "meta_training": {"wall_s": 12.0}}


def test_ranks_by_the_last_step_in_the_metrics_direction_and_puts_diverged_entries_last():
    a = results({"simple+smooth": [rec(0, [2.3, 0.5, 0.20]), rec(1, [2.3, 0.5, 0.30])],
                 "sgd(lr=0.1)": [rec(0, [2.3, 0.4, 0.10]), rec(1, [2.3, 0.4, 0.10])]},
                {"simple+smooth": "learned", "sgd(lr=0.1)": "hand-designed"})
    b = results({"prodigy(lr=1)": [rec(0, [2.3, 0.3, 0.01]), rec(1, [2.3, 0.3], diverged_at=15)]},
                {"prodigy(lr=1)": "learning-rate-free"})
    board = build([("a", a), ("b", b)], metric="train_loss", steps=[10, 20])
    assert [r["label"] for r in board["rows"]] == ["sgd(lr=0.1)", "simple+smooth", "prodigy(lr=1)"]
    top, learned, div = board["rows"]
    assert learned["at"]["20"] == {"mean": pytest.approx(0.25), "std": pytest.approx(0.05), "n": 2, "diverged": 0}
    assert div["at"]["20"]["diverged"] == 1 and div["at"]["10"]["diverged"] == 0  # it diverged after step 10
    assert learned["setup_cost"].startswith("meta-trained 360 meta-steps") and div["kind"] == "learning-rate-free"
    acc = build([("a", a), ("b", b)], metric="test_acc", steps=[20])  # accuracies rank descending
    assert [r["label"] for r in acc["rows"]] == ["sgd(lr=0.1)", "simple+smooth", "prodigy(lr=1)"]
    md = to_markdown(board)
    assert md.count("\n| ") == 3 and "(1 diverged)" in md and "0.25 ± 0.05" in md


def test_refuses_to_mix_setups_or_to_rank_at_a_step_that_was_not_evaluated():
    a = results({"sgd(lr=0.1)": [rec(0, [2.3, 0.4, 0.1])]}, {"sgd(lr=0.1)": "hand-designed"})
    other = results({"adam(lr=0.001)": [rec(0, [2.3, 0.4, 0.1])]}, {"adam(lr=0.001)": "hand-designed"}, task="lenet")
    with pytest.raises(LeaderboardError, match=r"b: evaluation setup differs from a in 'task' \('lenet' vs 'mlp'\)"):
        build([("a", a), ("b", other)], steps=[20])
    with pytest.raises(LeaderboardError, match="step 15 is not an evaluated step"):
        build([("a", a)], steps=[15])
    with pytest.raises(LeaderboardError, match="fewer than 30 steps"):
        build([("a", a)], steps=[30])
    old = dict(a)
    del old["methods"]
    with pytest.raises(LeaderboardError, match="no 'methods' record"):
        build([("a", old)], steps=[20])
    with pytest.raises(LeaderboardError, match="metric must be one of"):
        build([("a", a)], metric="loss")


def _run(script, *args, cwd, data_dir=None):
    env = dict(os.environ)
    if data_dir is not None:  # absolute: the scripts run in a temporary folder (CI sets ../shared/data)
        env["L2L_ZOO_DATA"] = str(data_dir)
    return subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), *args], capture_output=True,
                          text=True, cwd=cwd, timeout=600, env=env)


def test_the_script_on_real_tiny_runs(data_dir, tmp_path):
    common = ["--eval-steps", "20", "--eval-every", "10", "--no-progress", "--data-dir", str(data_dir)]
    r = _run("mnist_mlp.py", "--opt", "sgd", "--lr-grid", "0.1,0.01", "--baselines", "sgd,prodigy",
             "--out", str(tmp_path / "a"), *common, cwd=tmp_path, data_dir=data_dir)
    assert r.returncode == 0, r.stderr[-2000:]
    r = _run("mnist_mlp.py", "--opt", "adam", "--lr-grid", "0.001", "--task", "mlp20", "--out", str(tmp_path / "b"),
             *common, cwd=tmp_path, data_dir=data_dir)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = str(tmp_path / "a" / "results.json"), str(tmp_path / "b" / "results.json")
    r = _run("leaderboard.py", a, "--steps", "10,20", "--out", str(tmp_path / "lb"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    board = json.loads((tmp_path / "lb" / "leaderboard.json").read_text())
    res = json.loads(open(a).read())
    finals = {label: recs[0]["final"]["train_loss"] for label, recs in res["runs"].items()}
    assert [row["label"] for row in board["rows"]] == sorted(finals, key=finals.get)
    assert {row["kind"] for row in board["rows"]} == {"hand-designed", "learning-rate-free"}
    assert (tmp_path / "lb" / "leaderboard.md").exists() and (tmp_path / "lb" / "leaderboard.png").exists()
    assert board["inputs"][0]["sha256"] and "prodigy(lr=1)" in r.stdout
    for args, message in (([a, b], "evaluation setup differs"), ([a, "--steps", "15"], "step 15 is not an evaluated"),
                          ([a, "--steps", "x"], "--steps must be a comma list of integers"),
                          ([a, a], "results file given twice")):
        r = _run("leaderboard.py", *args, "--out", str(tmp_path / "lb2"), cwd=tmp_path)
        lines = r.stderr.strip().splitlines()
        assert r.returncode != 0 and len(lines) == 1 and message in lines[0], r.stderr
