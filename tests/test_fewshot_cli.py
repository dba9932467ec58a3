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
    ("fewshot.train", ["--method", "ncm", "--smooth", "eps=0.1"], "--smooth applies to --method metalstm and sib, not 'ncm'"),
    # a flag that would do nothing for the method is refused (it would still enter the run's identity)
    ("fewshot.train", ["--method", "sib", "--preset", "markdtw"], "--preset applies to --method metalstm, not 'sib'"),
    ("fewshot.train", ["--method", "sib", "--preset", "bogus"], "--preset applies to --method metalstm, not 'sib'"),
    ("fewshot.train", ["--method", "finetune", "--episodes", "10"], "--episodes applies to --method metalstm and sib"),
    ("fewshot.train", ["--method", "ncm", "--inner-steps", "3"], "--inner-steps applies to --method metalstm, not 'ncm'"),
    ("fewshot.train", ["--method", "pixelnn", "--meta-lr", "0.1"], "--meta-lr applies to --method metalstm"),
    ("fewshot.train", ["--method", "sib", "--filters", "16"], "--filters applies to --method metalstm and finetune"),
    ("fewshot.train", ["--method", "pixelnn", "--val-episodes", "5"], "--val-episodes applies to --method metalstm and sib"),
    ("fewshot.train", ["--method", "metalstm", "--pretrain-steps", "9"], "--pretrain-steps applies to --method sib and ncm"),
    ("fewshot.train", ["--method", "finetune", "--backbone-cache", "x"], "--backbone-cache applies to --method sib and ncm"),
    ("fewshot.train", ["--method", "sib", "--finetune-lrs", "0.1"], "--finetune-lrs applies to --method finetune, not 'sib'"),
    ("fewshot.train", ["--method", "finetune", "--finetune-lrs", "0.1,-1"], "--finetune-lrs must be"),
    ("fewshot.train", ["--method", "finetune", "--finetune-steps", "5,0"],
     "--finetune-steps must be a comma list of integers >= 1, got '5,0'"),
    ("fewshot.train", ["--method", "metalstm", "--preset", "markdtw", "--shots", "1"], "markdtw"),
    ("fewshot.train", ["--method", "metalstm", "--smooth", "eps=0.1,eps=1"], "given more than once"),
    ("fewshot.train", ["--method", "sib", "--backbone", "wrn"], "needs --backbone-checkpoint"),
    ("fewshot.train", ["--method", "sib", "--data-dir", "/nonexistent/folder"], "--data-dir: no such folder"),
    ("fewshot.train", ["--method", "pixelnn", "--ways", "30"], "ways=30 exceeds the 22 classes of the 'val' split"),
    ("fewshot.train", ["--method", "metalstm", "--meta-batch", "0"], "--meta-batch must be an integer >= 1, got 0"),
    ("fewshot.train", ["--method", "ncm", "--meta-batch", "2"], "--meta-batch applies to --method metalstm and sib, not 'ncm'"),
    ("fewshot.train", ["--method", "ncm", "--meta-batch", "1"], "--meta-batch applies to --method metalstm and sib, not 'ncm'"),
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


SMALL = {"--episodes": "30", "--val-every": "10", "--val-episodes": "10", "--test-episodes": "40", "--filters": "8",
         "--pretrain-steps": "60", "--finetune-lrs": "0.1,0.01", "--finetune-steps": "5,10"}


def small(method: str) -> list[str]:
    """The CI-sized flags that apply to ``method`` (fewshot.train refuses the others)."""
    from fewshot.train import APPLIES
    out = ["--no-progress"]
    for flag, v in SMALL.items():
        key = flag[2:].replace("-", "_")
        if key not in APPLIES or method in APPLIES[key]:
            out += [flag, v]
    return out


@pytest.mark.parametrize("method,chance_margin", [("metalstm", 0.1), ("sib", 0.15), ("pixelnn", 0.1),
                                                  ("finetune", 0.1), ("ncm", 0.15)])
def test_ci_sized_runs_complete_and_beat_chance(method, chance_margin, data_dir, tmp_path, capsys):
    out = tmp_path / method
    code, cap = call("fewshot.train", ["--method", method, "--out", str(out), *small(method)], capsys)
    assert code == 0, cap.err
    res = json.loads((out / "results.json").read_text())
    assert res["schema"] == "l2l_zoo.results" and res["benchmark"] == "fewshot.train"
    (rec,) = next(iter(res["runs"].values()))
    f = rec["final"]
    assert f["test_episodes"] == 40 and len(rec["test_accs"]) == 40
    assert f["test_acc"] > 0.2 + chance_margin, f"{method}: {f['test_acc']:.3f} is not above 5-way chance"
    assert f["test_ci"] > 0 and set(res["data"]) == {"train", "val", "test"}
    if method in ("metalstm", "sib"):
        assert rec["eval"]["step"] == [10, 20, 30] if method == "metalstm" else rec["eval"]["step"][0] == 0
        assert (out / "val_curve.png").stat().st_size > 0
    if method == "finetune":  # tuned on the validation episodes over the grid given
        (tuning,) = res["tuning"].values()
        assert sorted(map(tuple, tuning["grid"])) == [(0.01, 5), (0.01, 10), (0.1, 5), (0.1, 10)]
    if method != "pixelnn":
        # the model file reproduces the test number through fewshot.evaluate (same seeded episodes)
        code, cap = call("fewshot.evaluate", [str(out / "model.pt"), "--episodes", "40"], capsys)
        assert code == 0, cap.err
        ev = json.loads((out / "evaluate_5w1s.json").read_text())
        assert ev["summary"][method]["test_acc"] == pytest.approx(f["test_acc"], abs=1e-9)


def test_a_killed_metalstm_run_resumes_through_the_command_line(data_dir, tmp_path, capsys, monkeypatch):
    """fewshot.train killed at meta-step 12 (checkpoints every --val-every 5 meta-steps) and rerun with
    --resume ends with the uninterrupted run's results: meta-losses, validation curve, selection and
    test accuracy (the episode counter, the RNG states and the validation selector are restored)."""
    import fewshot.metalstm as mlstm
    args = ["--method", "metalstm", "--episodes", "15", "--val-every", "5", "--val-episodes", "5",
            "--test-episodes", "20", "--filters", "4", "--inner-steps", "2", "--smooth", "eps=0.1,lam=10,steps=2",
            "--no-progress"]
    assert call("fewshot.train", [*args, "--out", str(tmp_path / "full")], capsys)[0] == 0
    validate = mlstm.BestOnValidation.__call__

    def dying(self, meta_step, record):
        if meta_step == 12:
            raise KeyboardInterrupt
        return validate(self, meta_step, record)
    monkeypatch.setattr(mlstm.BestOnValidation, "__call__", dying)
    code, cap = call("fewshot.train", [*args, "--out", str(tmp_path / "cut")], capsys)
    assert code == 130 and "rerun with --resume" in cap.err
    monkeypatch.setattr(mlstm.BestOnValidation, "__call__", validate)
    assert call("fewshot.train", [*args, "--out", str(tmp_path / "cut"), "--resume"], capsys)[0] == 0
    (full,), (cut,) = (json.loads((tmp_path / d / "results.json").read_text())["runs"]["metalstm+smooth"]
                       for d in ("full", "cut"))
    assert cut["step_log"] == full["step_log"] and cut["eval"] == full["eval"]
    assert cut["final"]["test_acc"] == full["final"]["test_acc"] and cut["test_accs"] == full["test_accs"]


def test_finished_run_resumes_from_its_cache_and_other_settings_do_not(data_dir, tmp_path, capsys):
    out = tmp_path / "m"
    args = ["--method", "metalstm", "--out", str(out), *small("metalstm")]
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


def test_evaluate_at_other_shots_and_ways_equals_the_library_on_those_episodes(data_dir, tmp_path, capsys):
    """fewshot.evaluate --shots K' (Ravi & Larochelle test 1-shot with a 5-shot meta-learner; here the
    reverse) runs the saved Meta-LSTM on the seeded K'-shot test episodes, exactly as
    fewshot.metalstm.evaluate does; --ways is refused for Meta-LSTM (its output layer is part of c₀)
    and honoured by fine-tuning (a fresh learner of that width)."""
    import fewshot.metalstm as mlstm
    from fewshot.data import EpisodeSampler, load_fewshot
    from fewshot.train import TEST_SEED
    ml, ft = tmp_path / "ml", tmp_path / "ft"
    assert call("fewshot.train", ["--method", "metalstm", "--episodes", "4", "--val-every", "2", "--val-episodes", "3",
                                  "--test-episodes", "5", "--filters", "4", "--inner-steps", "2", "--no-progress",
                                  "--out", str(ml)], capsys)[0] == 0
    code, cap = call("fewshot.evaluate", [str(ml / "model.pt"), "--episodes", "6", "--shots", "5", "--no-progress"],
                     capsys)
    assert code == 0, cap.err
    ev = json.loads((ml / "evaluate_5w5s.json").read_text())
    assert (ev["config"]["ways"], ev["config"]["shots"]) == (5, 5)
    lopt, extra = __import__("l2l_zoo").load(str(ml / "model.pt"), with_extra=True)
    protocol = extra["fewshot"]["protocol"]
    mcfg = mlstm.MetaLSTMConfig(**{**protocol, "shots": 5, "inner_batch_size": None})
    test = load_fewshot("omniglot-small", data_dir)["test"]
    want = mlstm.evaluate(lopt, mcfg, EpisodeSampler(test, 5, 5, 15), 6, TEST_SEED)
    assert ev["runs"]["metalstm"][0]["test_accs"] == want
    code, cap = call("fewshot.evaluate", [str(ml / "model.pt"), "--ways", "3"], capsys)
    assert code == 2 and "was trained for 5-way episodes" in cap.err
    assert call("fewshot.train", ["--method", "finetune", "--val-episodes", "2", "--test-episodes", "5", "--filters",
                                  "4", "--finetune-lrs", "0.1", "--finetune-steps", "3", "--no-progress",
                                  "--out", str(ft)], capsys)[0] == 0
    code, cap = call("fewshot.evaluate", [str(ft / "model.pt"), "--episodes", "4", "--ways", "3", "--shots", "2",
                                          "--no-progress"], capsys)
    assert code == 0, cap.err
    ev = json.loads((ft / "evaluate_3w2s.json").read_text())
    (rec,) = ev["runs"]["finetune"]
    assert (ev["config"]["ways"], ev["config"]["shots"]) == (3, 2) and len(rec["test_accs"]) == 4
    assert all(abs(a * 45 - round(a * 45)) < 1e-4 for a in rec["test_accs"])  # 3 ways x 15 queries each
