"""The pretrained zoo: shipped weight files load to the optimizer they were exported from (bit for
bit) and reproduce their recorded number on real MNIST; altered or malformed weight files and
data files are refused in one line; the authors' MLR-SNet nets load by pinned digest; the command
line; a build runs its command and compares with the shipped weights."""
import base64
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import l2l_zoo
from l2l_zoo import zoo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_entry_is_complete_and_every_shipped_one_loads():
    assert set(zoo.available()) == set(zoo.ENTRIES), "an entry's weight file is missing from the package"
    for name in zoo.available():
        e = zoo.entry(name)
        assert e.optimizer in l2l_zoo.available() and e.summary and e.paper and e.kind in ("shipped", "data")
        if e.kind == "shipped":
            lopt = zoo.load(name)
            assert isinstance(lopt, l2l_zoo.LearnedOptimizer) and lopt.name == e.optimizer
            assert e.build and e.artifact and e.check and e.check["recorded"] in e.recorded
            assert e.measured.startswith("python benchmarks/"), e.measured
            prov = zoo.read_weights(zoo.WEIGHTS_DIR / e.weights)[1]  # how it was meta-trained, as saved
            b = list(e.build)
            steps = int(b[b.index("--meta-steps") + 1])  # pinned: mnist_mlp's default changes over time
            task = b[b.index("--meta-task") + 1] if "--meta-task" in b else "mlp"
            assert prov["meta_training"]["meta_steps"] == steps and prov["meta_task"] == task == e.check["task"]
        else:
            assert len(e.files) == len(e.sha256) > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_weight_files_round_trip_bit_for_bit(tmp_path, dtype):
    torch.manual_seed(3)
    lopt = l2l_zoo.create("dm").to(dtype)
    digest = zoo.write_weights(lopt, tmp_path / "w.json", recorded={"x": 1.0}, measured="test")
    back, prov = zoo.read_weights(tmp_path / "w.json")
    assert prov == {"recorded": {"x": 1.0}, "measured": "test"} and back.config == lopt.config
    for (k, a), b in zip(lopt.state_dict().items(), back.state_dict().values()):
        assert a.dtype == b.dtype and torch.equal(a, b), k
    assert digest == zoo.weights_digest(back.name, back.config, back.state_dict())
    assert not any(f.endswith(".tmp") for f in os.listdir(tmp_path))


def _tamper(src, dst, edit):
    doc = json.loads(open(src).read())
    edit(doc)
    open(dst, "w").write(json.dumps(doc))
    return dst


def test_altered_or_malformed_weight_files_are_refused_in_one_line(tmp_path):
    src = zoo.WEIGHTS_DIR / zoo.ENTRIES["simple-smooth/mnist-mlp"].weights

    def flip(doc):  # one value changed, the digest kept
        raw = bytearray(base64.b64decode(doc["state_dict"]["alpha"]["data"]))
        raw[0] ^= 1
        doc["state_dict"]["alpha"]["data"] = base64.b64encode(bytes(raw)).decode()

    def redigest(doc):  # the digest of the edited content, so that only the check under test fires
        state = {k: torch.frombuffer(bytearray(base64.b64decode(v["data"])), dtype=torch.float32).reshape(v["shape"])
                 for k, v in doc["state_dict"].items()}
        doc["sha256"] = zoo.weights_digest(doc["name"], doc["config"], state)

    def nan(doc):  # a non-finite value with a matching digest: refused by the optimizer checks
        doc["state_dict"]["alpha"]["data"] = base64.b64encode(torch.tensor(float("nan")).numpy().tobytes()).decode()
        redigest(doc)

    def rename(doc):
        doc["name"] = "nosuch"
        redigest(doc)

    cases = [(flip, "altered or damaged"),
             (lambda d: d["state_dict"]["alpha"].update(shape=[2]), r"4 bytes for shape \[2\] of float32"),
             (lambda d: d["state_dict"]["alpha"].update(dtype="complex64"), "should hold dtype"),
             (lambda d: d.update(format="other"), "format should be 'l2l_zoo.zoo_weights'"),
             (lambda d: d.update(version=9), "format version 9"),
             (rename, "optimizer 'nosuch' is not registered"),
             (nan, "non-finite")]
    for i, (edit, msg) in enumerate(cases):
        with pytest.raises(zoo.ZooError, match=msg) as ei:
            zoo.read_weights(_tamper(src, tmp_path / f"w{i}.json", edit))
        assert "\n" not in str(ei.value) and f"w{i}.json" in str(ei.value)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(zoo.ZooError, match="not JSON"):
        zoo.read_weights(tmp_path / "bad.json")
    with pytest.raises(zoo.ZooError, match="no zoo entry 'nope'; entries: "):
        zoo.load("nope")


@pytest.mark.parametrize("name", [n for n, e in zoo.ENTRIES.items() if e.check])
def test_each_shipped_optimizer_reproduces_its_recorded_training_loss(name, data_dir):
    """The weights alone, on real MNIST (the entry's task, seed 0, 1,000 steps): the step-1,000
    training loss that seed's run recorded when it saved them, to the entry's tolerance."""
    r = zoo.check(name, data_dir=data_dir)
    assert r["recorded"] == zoo.entry(name).recorded_per_seed["train_loss@1000"]["0"]
    assert r["ok"] and r["rel_diff"] <= zoo.entry(name).rtol, r
    assert r["threads"] == zoo.entry(name).recorded_threads["train_loss@1000"] == 2  # as recorded
    if name == "simple-smooth/mnist-mlp":
        assert r["recorded"] == pytest.approx(0.016911739349365233, rel=1e-12)
    # the check identifies the entry: of the recorded numbers of the entries of its task, the measured
    # number is nearest to its own (DM's and RNNProp's are 12.8 % apart, closer than their 15 %
    # tolerance, and DM's measured number moves 4-8 % with rounding: 0.0523 on an AMD EPYC machine,
    # 2026-12-07, so "no other entry within 10 %" held on one machine only)
    others = [zoo.entry(n).recorded_per_seed["train_loss@1000"]["0"] for n, e in zoo.ENTRIES.items()
              if e.check and n != name and e.check["task"] == zoo.ENTRIES[name].check["task"]]
    assert all(abs(o - r["measured"]) > abs(r["recorded"] - r["measured"]) for o in others), (r, others)


def test_the_authors_mlrsnet_nets_load_by_pinned_digest(data_dir, tmp_path):
    nets = zoo.load("mlrsnet/authors-cifar10", data_dir=data_dir)
    assert len(nets) == 3 and all(isinstance(n, l2l_zoo.MLRSNet) for n in nets)
    ref = l2l_zoo.MLRSNet.from_official_checkpoint(os.path.join(data_dir, "mlr_snet_official", "mlr_snet_100.pth"),
                                                   layout="meta-test", num_classes=10)
    for a, b in zip(nets[1].state_dict().values(), ref.state_dict().values()):
        assert torch.equal(a, b)
    fake = tmp_path / "data" / "mlr_snet_official"
    fake.mkdir(parents=True)
    for f in ("mlr_snet_1.pth", "mlr_snet_100.pth"):
        shutil.copy(os.path.join(data_dir, "mlr_snet_official", f), fake / f)
    shutil.copy(os.path.join(data_dir, "mlr_snet_official", "mlr_snet_1.pth"), fake / "mlr_snet_200.pth")
    with pytest.raises(zoo.ZooError, match="mlr_snet_200.pth.*has SHA-256 .* the zoo pins"):
        zoo.load("mlrsnet/authors-cifar10", data_dir=tmp_path / "data")
    os.remove(fake / "mlr_snet_200.pth")
    with pytest.raises(zoo.ZooError, match="no file .*mlr_snet_200.pth"):
        zoo.load("mlrsnet/authors-cifar10", data_dir=tmp_path / "data")


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "l2l_zoo.zoo", *args], capture_output=True, text=True, cwd=ROOT,
                          env=env or os.environ, timeout=600)


def test_command_line_lists_shows_and_refuses_bad_input_in_one_line(tmp_path):
    r = run_cli("list")
    assert r.returncode == 0 and "simple-smooth/mnist-mlp" in r.stdout and "train_loss@1000 0.01691" in r.stdout
    r = run_cli("show", "simple/mnist-mlp")
    assert r.returncode == 0 and json.loads(r.stdout)["optimizer"] == "simple"
    for args, msg in ((("show", "nope"), "no zoo entry 'nope'"), ((), "a command is required"),
                      (("check", "mlrsnet/authors-cifar10"), "has no check"),
                      (("export", str(tmp_path / "none.pt"), str(tmp_path / "w.json"), "--results", "r.json",
                        "--label", "x"), "no such optimizer file")):
        r = run_cli(*args)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and msg in lines[0], r.stderr


def test_output_piped_into_head_stops_quietly():
    r = subprocess.run(f"{sys.executable} -m l2l_zoo.zoo list | head -1", shell=True, capture_output=True,
                       text=True, cwd=ROOT, timeout=120)
    assert "simple-smooth/mnist-mlp" in r.stdout and "Traceback" not in r.stderr, r.stderr


def test_export_takes_its_numbers_only_from_results_that_measured_that_file(data_dir, tmp_path):
    """A tiny mnist_mlp.py run: export reads the numbers of the run that saved the optimizer, and
    refuses results written by another run; build re-runs an entry's command and compares."""
    out = tmp_path / "run"
    flags = ("benchmarks/mnist_mlp.py", "--opt", "simple", "--meta-steps", "2", "--horizon", "4", "--unroll", "2",
             "--baselines", "none", "--eval-steps", "6", "--eval-every", "3", "--no-progress", "--data-dir", data_dir)
    entry = zoo.ZooEntry(name="tiny", optimizer="simple", kind="shipped", summary="s", paper="p", build=flags,
                         artifact="optimizer.pt", weights=zoo.ENTRIES["simple/mnist-mlp"].weights)
    report = zoo.build("tiny", out, entry_override=entry)
    assert report["identical"] is False and report["max_abs_diff"] > 0  # 2 meta-steps are not 360
    r = run_cli("export", str(out / "optimizer.pt"), str(tmp_path / "w.json"), "--results",
                str(out / "results.json"), "--label", "simple")
    assert r.returncode == 0, r.stderr
    lopt, prov = zoo.read_weights(tmp_path / "w.json")
    res = json.loads((out / "results.json").read_text())
    assert prov["recorded"]["train_loss@6"] == res["summary"]["simple"]["train_loss"]
    assert prov["sha256_source"] == l2l_zoo.runs.file_digest(out / "optimizer.pt")
    other = tmp_path / "elsewhere"
    other.mkdir()
    shutil.copy(out / "results.json", other / "results.json")
    with pytest.raises(zoo.ZooError, match="did not measure"):
        zoo.provenance_from_results(out / "optimizer.pt", [other / "results.json"], "simple")
