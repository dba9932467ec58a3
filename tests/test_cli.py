"""The flagship benchmark's command line: bad input gives a one-line error and a non-zero exit; a
tiny end-to-end run writes complete results, and --resume reuses what was done."""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "mnist_mlp.py")


def run(*args, env_extra=None):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, env=env, timeout=600)


def test_missing_data_is_a_one_line_error(tmp_path):
    (tmp_path / "empty").mkdir()
    r = run("--opt", "sgd", "--data-dir", str(tmp_path / "empty"), "--out", str(tmp_path / "o"),
            "--no-progress", env_extra={"L2L_ZOO_DATA": str(tmp_path / "empty")})
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 3 and len(lines) == 1 and "MNIST not found" in lines[0], r.stderr
    # a --data-dir that does not exist is an error, not silently replaced by $L2L_ZOO_DATA
    r = run("--opt", "sgd", "--data-dir", str(tmp_path / "typo"), "--out", str(tmp_path / "o"), "--no-progress")
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "--data-dir: no such folder" in lines[0]


def test_help_explains_every_flag():
    r = run("--help")
    assert r.returncode == 0
    for flag in ("--opt", "--smooth", "--task", "--meta-steps", "--eval-steps", "--seeds", "--device",
                 "--out", "--resume", "--finetune", "--lr-grid", "--backend"):
        assert flag in r.stdout


def _load(name):
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", os.path.join(ROOT, "benchmarks", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, os.path.join(ROOT, "paper_figs"))
    sys.modules[f"_bench_{name}"] = mod  # dataclasses resolve annotations through sys.modules
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path.pop(0)
    return mod


@pytest.mark.parametrize("name,groups", [
    ("mnist_mlp", ("EVAL_KEYS", "META_KEYS", "SELECTION_KEYS", "NO_RESULT_KEYS")),
    ("lr_schedules_mnist", ("RUN_KEYS", "LRS_KEYS", "SELECTION_KEYS", "NO_RESULT_KEYS")),
])
def test_every_config_field_is_classified_for_the_run_cache(name, groups):
    """The run cache keys on named groups of config fields: a field in none of them would be ignored
    by the cache, which is how stale results were once reused. Adding a flag without classifying it
    fails here."""
    from dataclasses import fields
    mod = _load(name)
    classified = set().union(*(getattr(mod, g) for g in groups))
    names = {f.name for f in fields(mod.Config)}
    assert names - classified == set(), f"unclassified config fields: {sorted(names - classified)}"
    assert classified - names == set(), f"stale names in the groups: {sorted(classified - names)}"


def test_a_loaded_optimizer_is_keyed_on_its_file_not_on_the_meta_training_flags(tmp_path):
    """--load skips meta-training, so the meta-training flags must not key its cached evaluations
    (changing them once re-ran every loaded evaluation); the file's content must, and with
    --finetune so must what fine-tuning reads."""
    import l2l_zoo
    mod = _load("mnist_mlp")
    torch.manual_seed(0)
    l2l_zoo.save(l2l_zoo.create("simple"), str(tmp_path / "a.pt"))
    torch.manual_seed(1)
    l2l_zoo.save(l2l_zoo.create("simple"), str(tmp_path / "b.pt"))
    ident = lambda *a: mod.meta_identity(mod.parse_config(["--opt", "simple", *a, "--out", str(tmp_path / "o")]))  # noqa: E731
    base = ident("--load", str(tmp_path / "a.pt"))
    assert base == ident("--load", str(tmp_path / "a.pt"), "--meta-steps", "7", "--horizon", "40", "--smooth", "eps=0.1")
    assert base != ident("--load", str(tmp_path / "b.pt"))
    ft = ident("--load", str(tmp_path / "a.pt"), "--finetune")
    assert ft != base and ft != ident("--load", str(tmp_path / "a.pt"), "--finetune", "--meta-lr", "0.01")
    assert ft == ident("--load", str(tmp_path / "a.pt"), "--finetune", "--meta-steps", "7")
    # a pretrained zoo entry is keyed on its weights' digest
    z = ident("--load", "zoo:simple-smooth/mnist-mlp")
    lz = l2l_zoo.zoo.load("simple-smooth/mnist-mlp")
    assert z["load"] == l2l_zoo.zoo.weights_digest(lz.name, lz.config, lz.state_dict())
    assert z != ident("--load", "zoo:simple/mnist-mlp") and z == ident("--load", "zoo:simple-smooth/mnist-mlp",
                                                                       "--meta-steps", "7")
    # meta-training itself is keyed on its flags
    assert ident("--meta-steps", "7") != ident("--meta-steps", "8")


def test_tiny_end_to_end_run_and_resume(data_dir, tmp_path):
    out = tmp_path / "run"
    args = ["--opt", "simple", "--smooth", "eps=0.1,steps=2", "--meta-steps", "2", "--horizon", "4",
            "--unroll", "2", "--eval-steps", "30", "--eval-every", "10", "--lr-grid", "0.1,0.01",
            "--baselines", "sgd", "--device", "cpu", "--out", str(out), "--no-progress"]
    r = run(*args)
    assert r.returncode == 0, r.stderr
    res = json.loads((out / "results.json").read_text())
    assert res["schema"] == "l2l_zoo.results" and res["benchmark"] == "mnist_mlp"
    assert res["config"]["smooth"] == "eps=0.1,steps=2" and res["config"]["eval_steps"] == 30
    tuning = res["tuning"]["sgd"]
    assert tuning["criterion"] == "val_loss" and tuning["split"] == "val" and tuning["runs"] == 2
    best = min(tuning["scores"], key=tuning["scores"].get)  # the lower final validation loss wins
    assert float(best) == tuning["best"]
    assert set(res["runs"]) == {"simple+smooth", f"sgd(lr={best})"}
    run0 = res["runs"]["simple+smooth"][0]
    assert len(run0["step_log"]["loss"]) == 30 and run0["eval"]["step"] == [0, 10, 20, 30]
    assert set(run0["final"]) >= {"train_loss", "val_loss", "test_loss", "test_acc"}
    assert len(res["meta_training"]["history"]) == 2
    assert "only the MNIST test set is available" in res["data"]["note"]
    assert (out / "curves.png").stat().st_size > 1000 and (out / "optimizer.pt").exists()
    assert "train loss" in r.stderr + r.stdout
    # --resume: everything is cached, so the run is identical
    r2 = run(*args, "--resume")
    assert r2.returncode == 0, r2.stderr
    res2 = json.loads((out / "results.json").read_text())
    assert res2["runs"] == res["runs"]
    # --resume with other settings must not reuse the old numbers (the probe's worst finding)
    r3 = run(*[a if a != "eps=0.1,steps=2" else "eps=0.5,steps=2" for a in args], "--resume")
    assert r3.returncode == 0, r3.stderr
    res3 = json.loads((out / "results.json").read_text())
    assert res3["runs"]["simple+smooth"][0]["step_log"] != run0["step_log"]
    assert res3["runs"][f"sgd(lr={best})"] == res["runs"][f"sgd(lr={best})"], "baselines do not depend on --smooth"


def test_simple_ablation_on_another_task_passes_it_to_every_variant(data_dir, tmp_path):
    """simple_ablation.py --meta-task/--task: every variant is meta-trained and evaluated on that task
    (here the 784-20-10 sigmoid MLP), and the combined file holds each variant's runs."""
    script = os.path.join(ROOT, "benchmarks", "simple_ablation.py")
    out = tmp_path / "abl"
    r = subprocess.run([sys.executable, script, "--meta-task", "mlp20", "--task", "mlp20", "--variants",
                        "full,uniform_loss", "--meta-steps", "2", "--eval-steps", "4", "--no-progress",
                        "--data-dir", data_dir, "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    combined = json.loads((out / "results.json").read_text())
    assert set(combined["runs"]) == {"full", "uniform_loss"}
    for v, loss in (("full", "wdiff"), ("uniform_loss", "sum")):
        res = json.loads((out / v / "results.json").read_text())
        assert (res["config"]["meta_task"], res["config"]["task"]) == ("mlp20", "mlp20")
        assert res["meta_training"]["config"]["meta_loss"] == loss
        assert combined["runs"][v][0]["eval"]["step"][-1] == 4
