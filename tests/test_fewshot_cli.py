"""``python -m fewshot.train`` / ``fewshot.evaluate``: bad arguments are one line and a non-zero exit
before any work; a CI-sized run of every method completes, writes the results schema and beats
chance; a finished run resumes from its cache unchanged; evaluate reproduces train's test number."""
import json
import os
import subprocess
import sys

import pytest
import torch

from l2l_zoo.cli import run_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def call(module, args, capsys):
    import importlib
    mod = importlib.import_module(module)
    argv0, sys.argv = sys.argv, [module, *args]
    try:
        with pytest.raises(SystemExit) as e:
            run_main(lambda: mod.main(args))
    finally:
        sys.argv = argv0
    return e.value.code, capsys.readouterr()


BAD = [
    ("fewshot.train", ["--method", "maml"], "--method must be one of"),
    ("fewshot.train", ["--method", "sib", "--dataset", "imagenet"], "--dataset must be one of"),
    ("fewshot.train", ["--method", "sib", "--ways", "0"], "--ways must be an integer >= 2, got 0"),
    ("fewshot.train", ["--method", "sib", "--shots", "-1"], "--shots must be an integer >= 1, got -1"),
    ("fewshot.train", ["--method", "ncm", "--smooth", "eps=0.1"], "--smooth applies to metalstm and sib"),
    ("fewshot.train", ["--method", "metalstm", "--preset", "markdtw", "--shots", "1"], "markdtw"),
    ("fewshot.train", ["--method", "metalstm", "--smooth", "eps=0.1,eps=1"], "given more than once"),
    ("fewshot.train", ["--method", "sib", "--backbone", "wrn"], "needs --backbone-checkpoint"),
    ("fewshot.train", ["--method", "sib", "--data-dir", "/nonexistent/folder"], "--data-dir: no such folder"),
    ("fewshot.train", ["--method", "pixelnn", "--ways", "30"], "ways=30 exceeds the 22 classes of the 'val' split"),
    ("fewshot.train", ["--method", "metalstm", "--meta-batch", "0"], "--meta-batch must be an integer >= 1, got 0"),
    ("fewshot.train", ["--method", "ncm", "--meta-batch", "2"], "--meta-batch applies to --method metalstm and sib, not 'ncm'"),
    ("fewshot.train", ["--method", "sib", "--sib-dni-init", "ones"],
     "--sib-dni-init must be one of ['random', 'zero'], got 'ones'"),
    ("fewshot.train", ["--method", "metalstm", "--sib-dni-init", "zero"], "--sib-dni-init applies to --method sib"),
    ("fewshot.train", ["--method", "metalstm", "--autocast", "fp8"], "--autocast must be one of"),
    ("fewshot.train", ["--method", "finetune", "--autocast", "bfloat16"], "--autocast applies to --method metalstm"),
    ("fewshot.evaluate", ["/nonexistent/model.pt"], "no such checkpoint"),
]


@pytest.mark.parametrize("module,args,message", BAD, ids=[" ".join(b[1])[:40] for b in BAD])
def test_bad_arguments_are_one_line(module, args, message, data_dir, tmp_path, capsys):
    if module == "fewshot.train":
        args = [*args, "--out", str(tmp_path / "o"), "--no-progress"]
    code, cap = call(module, args, capsys)
    lines = [ln for ln in cap.err.splitlines() if ln.strip()]
    assert code not in (0, None) and len(lines) == 1 and "Traceback" not in cap.err, cap.err
    assert message in lines[0], lines[0]


def test_evaluate_rejects_a_foreign_file(tmp_path, capsys):
    torch.save({"weight": torch.zeros(3)}, tmp_path / "x.pt")
    code, cap = call("fewshot.evaluate", [str(tmp_path / "x.pt")], capsys)
    assert code == 2 and "not a model written by python -m fewshot.train" in cap.err


SMALL = ["--episodes", "30", "--val-every", "10", "--val-episodes", "10", "--test-episodes", "40",
         "--filters", "8", "--pretrain-steps", "60", "--no-progress"]


@pytest.mark.parametrize("method,chance_margin", [("metalstm", 0.1), ("sib", 0.15), ("pixelnn", 0.1)])
def test_ci_sized_runs_complete_and_beat_chance(method, chance_margin, data_dir, tmp_path, capsys):
    out = tmp_path / method
    code, cap = call("fewshot.train", ["--method", method, "--out", str(out), *SMALL], capsys)
    assert code == 0, cap.err
    res = json.loads((out / "results.json").read_text())
    assert res["schema"] == "l2l_zoo.results" and res["benchmark"] == "fewshot.train"
    (rec,) = next(iter(res["runs"].values()))
    f = rec["final"]
    assert f["test_episodes"] == 40 and len(rec["test_accs"]) == 40
    assert f["test_acc"] > 0.2 + chance_margin, f"{method}: {f['test_acc']:.3f} is not above 5-way chance"
    assert f["test_ci"] > 0 and set(res["data"]) == {"train", "val", "test"}
    if method != "pixelnn":
        assert rec["eval"]["step"] == [10, 20, 30] if method == "metalstm" else rec["eval"]["step"][0] == 0
        # the model file reproduces the test number through fewshot.evaluate (same seeded episodes)
        code, cap = call("fewshot.evaluate", [str(out / "model.pt"), "--episodes", "40"], capsys)
        assert code == 0, cap.err
        ev = json.loads((out / "evaluate_5w1s.json").read_text())
        assert ev["summary"][method]["test_acc"] == pytest.approx(f["test_acc"], abs=1e-9)


def test_finished_run_resumes_from_its_cache_and_other_settings_do_not(data_dir, tmp_path, capsys):
    out = tmp_path / "m"
    args = ["--method", "metalstm", "--out", str(out), *SMALL]
    args[args.index("--episodes") + 1] = "20"
    assert call("fewshot.train", args, capsys)[0] == 0
    first = json.loads((out / "results.json").read_text())["runs"]["metalstm"][0]
    assert call("fewshot.train", [*args, "--resume"], capsys)[0] == 0
    again = json.loads((out / "results.json").read_text())["runs"]["metalstm"][0]
    assert again == first
    other = [*args, "--seed", "1", "--resume"]
    assert call("fewshot.train", other, capsys)[0] == 0
    changed = json.loads((out / "results.json").read_text())["runs"]["metalstm"][0]
    assert changed["step_log"] != first["step_log"], "a different seed must not reuse the cached run"


def test_module_entry_point(tmp_path):
    r = subprocess.run([sys.executable, "-m", "fewshot.train", "--method", "nope"], capture_output=True, text=True,
                       cwd=ROOT, timeout=300)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "fewshot.train: error: --method must be one of ['metalstm', 'sib', 'finetune', 'ncm', 'pixelnn'], got 'nope'"]
