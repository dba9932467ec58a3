"""``benchmarks/fewshot_omniglot.py``'s bookkeeping, with ``fewshot.train`` replaced by a stub that
writes a results file in the real schema (the training itself is tested in test_fewshot_cli.py):
a ``--smooth`` grid runs every spec in its own folder and reports, per seed, the spec with the best
*validation* accuracy (never the best test accuracy); a single spec keeps the old folder names."""
import importlib.util
import os
import sys

import pytest

from l2l_zoo import runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture()
def study(monkeypatch):
    spec = importlib.util.spec_from_file_location("_study_fewshot_omniglot",
                                                  os.path.join(ROOT, "benchmarks", "fewshot_omniglot.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    calls = []

    def fake_train(args):
        """Validation accuracy favours lam=10, test accuracy favours lam=100 (so a selection on test
        would pick differently); plain runs get fixed numbers. Differs by seed."""
        calls.append(args)
        out, seed = args[args.index("--out") + 1], int(args[args.index("--seed") + 1])
        smooth = args[args.index("--smooth") + 1] if "--smooth" in args else None
        val, test = {None: (0.80, 0.81), "eps=0.1,lam=10": (0.85, 0.70),
                     "eps=0.1,lam=100": (0.75, 0.90)}[smooth]
        rec = runs.new_record(1, final={"test_acc": test + 0.01 * seed, "test_ci": 0.01, "best_val_acc": val})
        res = runs.new_results("fewshot.train", {"smooth": smooth})
        res["runs"]["x"] = [rec]
        os.makedirs(out, exist_ok=True)
        runs.write_json(os.path.join(out, "results.json"), res)
        return 0

    monkeypatch.setattr(mod.fstrain, "main", fake_train)
    monkeypatch.setattr(mod.fstrain, "parse_config", lambda args: None)
    monkeypatch.setattr(mod, "plot", lambda table, path: None)
    return mod, calls


def test_a_smooth_grid_selects_on_validation_per_seed(study, tmp_path):
    mod, calls = study
    out = tmp_path / "o"
    assert mod.main(["--methods", "sib,sib+smooth", "--shots", "1", "--seeds", "2", "--out", str(out),
                     "--smooth", "eps=0.1,lam=10;eps=0.1,lam=100"]) == 0
    folders = sorted(os.path.basename(c[c.index("--out") + 1]) for c in calls)
    assert folders == ["sib+smooth_5w1s_seed0_eps0.1_lam10", "sib+smooth_5w1s_seed0_eps0.1_lam100",
                       "sib+smooth_5w1s_seed1_eps0.1_lam10", "sib+smooth_5w1s_seed1_eps0.1_lam100",
                       "sib_5w1s_seed0", "sib_5w1s_seed1"]
    res = runs.read_results(out / "results.json", benchmark="fewshot_omniglot")
    chosen = res["runs"]["sib+smooth 5w1s"]
    assert [r["seed"] for r in chosen] == [0, 1]
    assert [r["smooth_selected"] for r in chosen] == ["eps=0.1,lam=10"] * 2  # best validation, not best test
    assert [r["final"]["test_acc"] for r in chosen] == pytest.approx([0.70, 0.71])
    assert len(res["smooth_grid"]["sib+smooth 5w1s"]["0"]) == 2
    d = res["differences"]["sib+smooth - sib 5w1s"]
    assert d["per_seed"] == pytest.approx([-0.11, -0.11]) and d["mean"] == pytest.approx(-0.11)


def test_a_single_spec_keeps_the_plain_folder_names(study, tmp_path):
    mod, calls = study
    assert mod.main(["--methods", "sib+smooth", "--shots", "1", "--seeds", "1", "--out", str(tmp_path / "o"),
                     "--smooth", "eps=0.1,lam=100"]) == 0
    (args,) = calls
    assert os.path.basename(args[args.index("--out") + 1]) == "sib+smooth_5w1s_seed0"
    assert args[args.index("--smooth") + 1] == "eps=0.1,lam=100"
    res = runs.read_results(tmp_path / "o" / "results.json")
    assert "smooth_grid" not in res and "smooth_selected" not in res["runs"]["sib+smooth 5w1s"][0]


def test_selection_ties_and_missing_validation_take_the_first():
    from importlib import util
    spec = util.spec_from_file_location("_sel", os.path.join(ROOT, "benchmarks", "fewshot_omniglot.py"))
    mod = util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    a, b, c = ({"final": {"best_val_acc": v}} for v in (0.5, 0.5, None))
    assert mod.select_by_validation([("a", a), ("b", b)])[0] == "a"
    assert mod.select_by_validation([("c", c), ("a", a)])[0] == "a"
    assert mod.select_by_validation([("c", c), ("c2", {"final": {}})])[0] == "c"
