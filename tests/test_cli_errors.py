"""The reliability probe, kept: every script's bad flags, values, paths and files give one line on
stderr (``<script>: error: ...``), a non-zero exit and no traceback, before any training.

The scripts are run in-process through ``l2l_zoo.cli.run_main`` (the same function their
``__main__`` calls), so ~90 cases take seconds; a few cases also run as real subprocesses to check the
entry points themselves."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

import l2l_zoo
from l2l_zoo import runs
from l2l_zoo.cli import run_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {**{n: os.path.join(ROOT, "benchmarks", f"{n}.py") for n in (
    "mnist_mlp", "simple_ablation", "smooth_subsample", "step_overhead", "unroll_backends", "lr_schedules_mnist",
    "hypergradient_demos", "schedule_overhead", "mlrsnet_cifar", "mlrsnet_ptb", "mlrsnet_overhead",
    "fewshot_omniglot", "metatrain_speed", "leaderboard", "smoothness_probe", "metastep_vs_commit")},
    **{n: os.path.join(ROOT, "paper_figs", f"{n}.py") for n in ("fig_learning_curves", "fig_marthe", "fig_mlrsnet",
                                                                 "fig_smoothness")}}
_MODULES = {}


def load(name):
    if name not in _MODULES:
        spec = importlib.util.spec_from_file_location(f"_probe_{name}", SCRIPTS[name])
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
        _MODULES[name] = mod
    return _MODULES[name]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Bad inputs of every kind, written by the test (no dataset is copied)."""
    d = tmp_path_factory.mktemp("probe")
    f = {"tmp": str(d), "file": str(d / "a_file"), "dir": str(d / "a_dir"), "missing": str(d / "nope" / "x.pt"),
         "text": str(d / "text.pt"), "random": str(d / "random.pt"), "trunc": str(d / "trunc.pt"),
         "sgd_sd": str(d / "sgd.pt"), "nan_opt": str(d / "nan.pt"), "dm_opt": str(d / "dm.pt"),
         "bad_json": str(d / "bad.json"), "not_results": str(d / "other.json"), "demos_json": str(d / "demos.json")}
    open(f["file"], "w").write("x")
    os.makedirs(f["dir"])
    open(f["text"], "w").write("hello world\n")
    open(f["random"], "wb").write(os.urandom(4096))
    torch.manual_seed(0)
    lopt = l2l_zoo.create("simple")
    l2l_zoo.save(lopt, f["trunc"])
    data = open(f["trunc"], "rb").read()
    open(f["trunc"], "wb").write(data[: len(data) // 2])
    p = torch.nn.Parameter(torch.zeros(3))
    torch.save(torch.optim.SGD([p], lr=0.1).state_dict(), f["sgd_sd"])
    with torch.no_grad():
        lopt.weight_hh.fill_(float("nan"))
    torch.save({"format": "l2l_zoo.learned_optimizer", "version": 1, "name": "simple", "config": lopt.config,
                "state_dict": lopt.state_dict(), "extra": {}}, f["nan_opt"])
    l2l_zoo.save(l2l_zoo.create("dm"), f["dm_opt"])
    open(f["bad_json"], "w").write('{"schema": "l2l_zoo.results", "runs": ')
    json.dump({"hello": 1}, open(f["not_results"], "w"))
    runs.write_json(f["demos_json"], runs.new_results("hypergradient_demos", {}))
    f["probe_json"] = str(d / "probe.json")
    probe = runs.new_results("smoothness_probe", {"absolute": False})
    probe["diff"] = {"simple": {"1": {"step": [0, 10], "train_loss": [0.0, 0.1], "train_loss_std": [0.0, 0.0]}}}
    runs.write_json(f["probe_json"], probe)
    return f


CASES = [
    # ------------------------------------------------------------------ mnist_mlp
    ("mnist_mlp", "--opt lion", "--opt must be one of"),
    ("mnist_mlp", "--opt simple --meta-batch 0", "--meta-batch must be an integer >= 1, got 0"),
    ("mnist_mlp", "--opt simple --autocast float16", "--autocast must be one of ['none', 'bfloat16'], got 'float16'"),
    ("mnist_mlp", "--opt sgd --meta-batch 2", "--meta-batch applies to meta-training a learned optimizer"),
    ("mnist_mlp", "--opt simple --smooth eps=0.1,eps=0.2", "given more than once"),
    ("mnist_mlp", "--opt simple --smooth eps=-1", "eps must be > 0"),
    ("mnist_mlp", "--opt dm --opt-config output_scale=abc", "'output_scale' of optimizer 'dm' must be a number"),
    ("mnist_mlp", "--opt dm --opt-config p=5,p=6", "key 'p' given twice"),
    ("mnist_mlp", "--opt simple --eval-steps 0", "--eval-steps must be >= 1, got 0"),
    ("mnist_mlp", "--opt simple --meta-lr nan", "--meta-lr must be a positive number"),
    ("mnist_mlp", "--opt simple --tune-criterion test_loss", "--tune-criterion must be one of"),
    ("mnist_mlp", "--opt simple --load {missing}", "--load: no such file"),
    ("mnist_mlp", "--opt simple --load {text}", "text file"),
    ("mnist_mlp", "--opt simple --load {random}", "not a usable l2l_zoo learned-optimizer file"),
    ("mnist_mlp", "--opt simple --load {trunc}", "truncated"),
    ("mnist_mlp", "--opt simple --load {sgd_sd}", "torch.optim state dict"),
    ("mnist_mlp", "--opt simple --load {nan_opt}", "non-finite"),
    ("mnist_mlp", "--opt simple --load {dm_opt}", "holds a 'dm' optimizer but --opt is 'simple'"),
    ("mnist_mlp", "--opt simple --load zoo:nope", "no zoo entry 'nope'; entries: ["),
    ("mnist_mlp", "--opt dm --load zoo:simple/mnist-mlp", "holds a 'simple' optimizer but --opt is 'dm'"),
    ("mnist_mlp", "--opt simple --load zoo:mlrsnet/authors-cifar10", "is not a single shipped optimizer"),
    ("mnist_mlp", "--opt sgd --data-dir {missing}", "--data-dir: no such folder"),
    ("mnist_mlp", "--opt sgd --out {file}", "is an existing file"),
    ("mnist_mlp", "--opt sgd --out {file}/sub", "cannot write"),
    ("mnist_mlp", "--opt sgd --device tpu", "--device must be auto, cpu or cuda"),
    ("mnist_mlp", "--opt sgd --seeds -1", "--seeds must be"),
    ("mnist_mlp", "--opt sgd --lr-grid 0.1,abc", "--lr-grid must be a comma list of numbers"),
    ("mnist_mlp", "--opt sgd --eval-steps abc", "invalid int value: 'abc'"),
    # (formerly tests/test_cli.py, one subprocess each: the entry point itself is checked below)
    ("mnist_mlp", "--opt simple --smooth eps=abc", "eps must be a number, got 'abc'"),
    ("mnist_mlp", "--opt simple --smooth eps=0.1,gamma=2", "unknown key 'gamma'"),
    ("mnist_mlp", "--opt simple --task resnet", "--task must be one of"),
    ("mnist_mlp", "--opt simple --seeds 0,x", "--seeds must be"),
    ("mnist_mlp", "--opt simple --meta-loss mean", "--meta-loss must be one of"),
    ("mnist_mlp", "--opt sgd --smooth eps=0.1", "--smooth applies to learned optimizers"),
    ("mnist_mlp", "--opt prodigy --smooth eps=0.1", "--smooth applies to learned optimizers"),
    ("mnist_mlp", "--opt simple --baselines sgd,lion", "--baselines must be 'none' or a comma list from "
     "['sgd', 'sgdm', 'adam', 'prodigy', 'sf-adamw'], got ['lion']"),
    ("mnist_mlp", "--opt simple --opt-config hiden=3 --meta-steps 1", "unknown option(s) ['hiden']"),
    # ------------------------------------------------------------------ simple_ablation
    ("simple_ablation", "--variants full,nope", "--variants must be"),
    ("simple_ablation", "--meta-steps 0", "--meta-steps must be >= 1"),
    ("simple_ablation", "--smooth eps=abc", "eps must be a number"),
    ("simple_ablation", "--out {file}", "is an existing file"),
    ("simple_ablation", "--meta-task resnet", "--meta-task must be one of"),
    ("simple_ablation", "--task resnet", "--task must be one of"),
    # ------------------------------------------------------------------ smooth_subsample
    ("smooth_subsample", "--opt adam", "--opt must be one of"),
    ("smooth_subsample", "--subsamples 4096,x", "--subsamples must be"),
    ("smooth_subsample", "--smooth eps=0.1,subsample=3", "must not set subsample"),
    ("smooth_subsample", "--eval-seeds 0", "--eval-seeds must be >= 1"),
    ("smooth_subsample", "--data-dir {missing}", "--data-dir: no such folder"),
    ("smooth_subsample", "--out {file}", "is an existing file"),
    # ------------------------------------------------------------------ step_overhead
    ("step_overhead", "--repeats 0", "--repeats must be >= 1"),
    ("step_overhead", "--out {dir}", "is an existing folder"),
    ("step_overhead", "--out {file}/x.json", "cannot write"),
    ("step_overhead", "--device tpu", "--device must be"),
    # ------------------------------------------------------------------ unroll_backends
    ("unroll_backends", "--opt adam", "--opt must be simple, dm or rnnprop"),
    ("unroll_backends", "--task resnet", "--task must be one of"),
    ("unroll_backends", "--unroll 0", "--unroll and --repeats must be >= 1"),
    ("unroll_backends", "--out {dir}", "is an existing folder"),
    # ------------------------------------------------------------------ lr_schedules_mnist
    ("lr_schedules_mnist", "--methods hd,foo", "--methods must be"),
    ("lr_schedules_mnist", "--mus 1.5", "--mus must lie in [0, 1]"),
    ("lr_schedules_mnist", "--grad-clip -1", "--grad-clip must be a number >= 0"),
    ("lr_schedules_mnist", "--batch-size 8000", "--batch-size must be <= 7000"),
    ("lr_schedules_mnist", "--betas 1e-4,-1", "--betas must be a non-empty list of positive numbers"),
    ("lr_schedules_mnist", "--beta-rule up", "--beta-rule must be one of"),
    ("lr_schedules_mnist", "--data-dir {missing}", "--data-dir: no such folder"),
    ("lr_schedules_mnist", "--out {file}", "is an existing file"),
    # ------------------------------------------------------------------ hypergradient_demos
    ("hypergradient_demos", "--beale-start 1", "--beale-start must be two numbers"),
    ("hypergradient_demos", "--bukin-eps 0", "--bukin-eps must be a positive number"),
    ("hypergradient_demos", "--grad-clip nan", "--grad-clip must be a number >= 0"),
    ("hypergradient_demos", "--steps 0", "--steps must be an integer >= 1"),
    ("hypergradient_demos", "--out {file}", "is an existing file"),
    # ------------------------------------------------------------------ schedule_overhead
    ("schedule_overhead", "--batch-size 800", "--batch-size must be <= 700"),
    ("schedule_overhead", "--threads -1", "--threads must be an integer >= 0"),
    ("schedule_overhead", "--beta -1", "--beta and --beta-lr must be >= 0"),
    ("schedule_overhead", "--out {dir}", "is an existing folder"),
    # ------------------------------------------------------------------ mlrsnet_cifar
    ("mlrsnet_cifar", "--n-meta 999999", "--n-meta must be <= 5000"),
    ("mlrsnet_cifar", "--momentum 1.5", "--momentum must be in [0, 1)"),
    ("mlrsnet_cifar", "--baseline-momentum -0.1", "--baseline-momentum must be in [0, 1)"),
    ("mlrsnet_cifar", "--arch vgg", "--arch must be one of"),
    ("mlrsnet_cifar", "--transfers cifar,svhn", "--transfers must be"),
    ("mlrsnet_cifar", "--layout sideways", "--layout must be"),
    ("mlrsnet_cifar", "--autocast fp8", "--autocast must be one of"),
    ("mlrsnet_cifar", "--out {file}", "is an existing file"),
    # ------------------------------------------------------------------ mlrsnet_ptb
    ("lr_schedules_mnist", "--autocast half", "--autocast must be one of ['none', 'bfloat16'], got 'half'"),
    ("mlrsnet_ptb", "--dropout 1", "--dropout must be in [0, 1)"),
    ("mlrsnet_ptb", "--autocast float16", "--autocast must be one of ['none', 'bfloat16'], got 'float16'"),
    ("mlrsnet_ptb", "--transfer {missing}", "--transfer: no such file"),
    ("mlrsnet_ptb", "--transfer {text}", "text file"),
    ("mlrsnet_ptb", "--transfer {dm_opt}", "holds a 'dm' optimizer, not an MLR-SNet"),
    ("mlrsnet_ptb", "--val-fraction 0.9", "--val-fraction must be in (0, 0.5)"),
    ("mlrsnet_ptb", "--baselines sgd,lion", "--baselines must be 'none' or a comma list from ['sgd', 'adam'], got 'sgd,lion'"),
    ("mlrsnet_ptb", "--out {file}", "is an existing file"),
    # ------------------------------------------------------------------ mlrsnet_overhead
    ("mlrsnet_overhead", "--steps 2 --warmup 0", "--warmup + --steps must be >= 3"),
    ("mlrsnet_overhead", "--arch vgg", "--arch must be one of"),
    ("mlrsnet_overhead", "--out {dir}", "is an existing folder"),
    # ------------------------------------------------------------------ fewshot_omniglot
    ("fewshot_omniglot", "--methods sib,maml", "--methods must be"),
    ("fewshot_omniglot", "--shots 0", "--shots must be a comma list of integers >= 1"),
    ("fewshot_omniglot", "--smooth eps=0", "eps must be > 0"),
    ("fewshot_omniglot", "--ways 1", "--ways must be an integer >= 2, got 1"),
    ("fewshot_omniglot", "--out {file}", "is an existing file"),
    ("fewshot_omniglot", "--smooth eps=0.1;eps=0.10", "'eps=0.10' repeats 'eps=0.1'"),
    ("fewshot_omniglot", "--smooth ;", "--smooth must be one or more specs separated by ';'"),
    ("fewshot_omniglot", "--smooth eps=0.1;lam=3", "eps is required"),
    # ------------------------------------------------------------------ metatrain_speed
    ("metatrain_speed", "--cases simple,lstm", "--cases must be a comma list of distinct names"),
    ("metatrain_speed", "--unroll 0", "--unroll must be an integer >= 1, got 0"),
    ("metatrain_speed", "--out {dir}", "is an existing folder"),
    ("metatrain_speed", "--out {file}/x.json", "cannot write"),
    ("metatrain_speed", "--device tpu", "--device must be"),
    ("metatrain_speed", "--threads -1", "--threads must be an integer >= 0, got -1"),
    ("metatrain_speed", "--autocast fp16", "--autocast must be one of ['none', 'bfloat16'], got 'fp16'"),
    ("metatrain_speed", "--meta-batch 0", "--meta-batch must be an integer >= 1, got 0"),
    ("metatrain_speed", "--meta-batch 2 --var-samples 1", "--var-samples must be an integer >= 2, got 1"),
    # ------------------------------------------------------------------ metastep_vs_commit
    ("metastep_vs_commit", "--commit no-such-revision", "--commit 'no-such-revision' is not a commit"),
    ("metastep_vs_commit", "--rounds 0", "--rounds must be an integer >= 1, got 0"),
    ("metastep_vs_commit", "--meta-steps 2", "--meta-steps must be an integer >= 3, got 2"),
    ("metastep_vs_commit", "--smooth eps=0", "eps must be > 0"),
    ("metastep_vs_commit", "--data-dir {missing}", "--data-dir: no such folder"),
    ("metastep_vs_commit", "--out {dir}", "is an existing folder"),
    # ------------------------------------------------------------------ leaderboard
    ("leaderboard", "{bad_json}", "is not valid JSON"),
    ("leaderboard", "{demos_json}", "written by benchmark 'hypergradient_demos'"),
    ("leaderboard", "{missing}", "does not exist"),
    ("leaderboard", "{demos_json} --metric loss", "--metric must be one of"),
    ("leaderboard", "{demos_json} --steps -5", "--steps must be a comma list of integers >= 0"),
    ("leaderboard", "{demos_json} {demos_json}", "results file given twice"),
    ("leaderboard", "{demos_json} --out {file}", "is an existing file"),
    # ------------------------------------------------------------------ smoothness_probe
    ("smoothness_probe", "--optimizers zoo:nope", "--optimizers: zoo:nope: no zoo entry 'nope'; entries: ["),
    ("smoothness_probe", "--optimizers {missing}", "--optimizers: no such file"),
    ("smoothness_probe", "--optimizers {text}", "text file"),
    ("smoothness_probe", "--optimizers zoo:mlrsnet/authors-cifar10", "is not a single shipped optimizer"),
    ("smoothness_probe", "--optimizers {dm_opt},{dm_opt}", "--optimizers must be a comma list of distinct"),
    ("smoothness_probe", "--sigmas 1,-2", "--sigmas must be"),
    ("smoothness_probe", "--sigmas 1,1", "--sigmas must not repeat a value"),
    ("smoothness_probe", "--eps 0", "--eps must be"),
    ("smoothness_probe", "--pgd-steps 0", "--pgd-steps must be >= 1, got 0"),
    ("smoothness_probe", "--steps 50 --sweep-step 60", "--sweep-step must be <= --steps (50), got 60"),
    ("smoothness_probe", "--sweep-range nan", "--sweep-range must be a positive number"),
    ("smoothness_probe", "--task resnet", "--task must be one of"),
    ("smoothness_probe", "--data-dir {missing}", "--data-dir: no such folder"),
    ("smoothness_probe", "--out {file}", "is an existing file"),
    # ------------------------------------------------------------------ figures
    ("fig_learning_curves", "{bad_json} --out {tmp}/f.png", "is not valid JSON"),
    ("fig_learning_curves", "{not_results} --out {tmp}/f.png", "not an l2l_zoo results file"),
    ("fig_learning_curves", "{missing} --out {tmp}/f.png", "does not exist"),
    ("fig_learning_curves", "{demos_json} --out {tmp}/f.png", "written by benchmark 'hypergradient_demos'"),
    ("fig_learning_curves", "{demos_json} --out {tmp}/f.gif", "--out must end in one of"),
    ("fig_learning_curves", "{demos_json} --metrics loss", "--metrics must be"),
    ("fig_marthe", "", "give --mnist and/or --demos"),
    ("fig_marthe", "--mnist {bad_json}", "is not valid JSON"),
    ("fig_marthe", "--mnist {demos_json}", "expected 'lr_schedules_mnist'"),
    ("fig_marthe", "--demos {demos_json} --format gif", "--format must be"),
    ("fig_marthe", "--demos {dir}", "is a folder"),
    ("fig_mlrsnet", "{bad_json}", "is not valid JSON"),
    ("fig_mlrsnet", "{not_results}", "not an l2l_zoo results file"),
    ("fig_mlrsnet", "{demos_json}", "written by benchmark 'hypergradient_demos'"),
    ("fig_mlrsnet", "{demos_json} --out {tmp}/f.gif", "--out must end in one of"),
    ("fig_smoothness", "{bad_json} --out {tmp}/f.png", "is not valid JSON"),
    ("fig_smoothness", "{missing} --out {tmp}/f.png", "does not exist"),
    ("fig_smoothness", "{demos_json} --out {tmp}/f.png", "written by benchmark 'hypergradient_demos'"),
    ("fig_smoothness", "{probe_json} --out {tmp}/f.gif", "--out must end in one of"),
    ("fig_smoothness", "{probe_json} --metric val_loss", "--metric must be one of"),
    ("fig_smoothness", "{probe_json} --sigmas 3", "--sigmas: ['3'] not in"),
    ("fig_smoothness", "{probe_json} --out {file}/f.png", "cannot write"),
]


def call(name, args, capsys):
    mod = load(name)
    argv0 = sys.argv
    sys.argv = [SCRIPTS[name], *args]
    try:
        with pytest.raises(SystemExit) as e:
            run_main(lambda: mod.main(args))
    finally:
        sys.argv = argv0
    return e.value.code, capsys.readouterr().err


def _check(code, err, name, message):
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code not in (0, None), f"{name}: exit status {code}"
    assert len(lines) == 1, f"{name}: expected one line on stderr, got:\n{err}"
    assert "Traceback" not in err
    assert lines[0].startswith(f"{os.path.basename(SCRIPTS[name])}: error: "), lines[0]
    assert message in lines[0], f"{name}: {message!r} not in {lines[0]!r}"


@pytest.mark.parametrize("name,args,message", CASES, ids=[f"{c[0]}:{c[1][:40]}" for c in CASES])
def test_bad_input_is_one_line_and_a_non_zero_exit(name, args, message, files, capsys, monkeypatch):
    monkeypatch.chdir(files["tmp"])  # default output folders land in the temporary folder
    argv = [a.format(**files) for a in args.split()]
    if "--out" not in args and name not in ("fig_learning_curves", "fig_marthe", "fig_mlrsnet", "fig_smoothness"):
        argv += ["--out", os.path.join(files["tmp"], "out", name + (".json" if "overhead" in name or name in (
            "metatrain_speed", "unroll_backends", "metastep_vs_commit") else ""))]
    code, err = call(name, argv, capsys)
    _check(code, err, name, message)


def test_every_script_is_probed():
    assert {c[0] for c in CASES} == set(SCRIPTS)
    on_disk = {os.path.splitext(f)[0] for d in ("benchmarks", "paper_figs") for f in os.listdir(os.path.join(ROOT, d))
               if f.endswith(".py")}
    assert on_disk == set(SCRIPTS), "a script without bad-input probes (add it to SCRIPTS and CASES)"


def test_a_busy_output_folder_is_refused(files, capsys):
    out = os.path.join(files["tmp"], "busy")
    with runs.OutputLock.for_folder(out):
        code, err = call("mnist_mlp", ["--opt", "sgd", "--out", out], capsys)
    _check(code, err, "mnist_mlp", "is in use by another run")


def test_resume_with_a_corrupt_checkpoint_or_run_cache_is_one_line(data_dir, files, capsys):
    mod = load("mnist_mlp")
    out = os.path.join(files["tmp"], "corrupt")
    args = ["--opt", "simple", "--meta-steps", "1", "--horizon", "2", "--unroll", "2", "--baselines", "none",
            "--out", out, "--resume", "--no-progress"]
    cfg = mod.parse_config(args)
    os.makedirs(out, exist_ok=True)
    ckpt = os.path.join(out, f"metatrain-{runs.config_hash(mod.meta_identity(cfg))}.ckpt")
    open(ckpt, "wb").write(b"\x80\x02garbage")
    code, err = call("mnist_mlp", args, capsys)
    _check(code, err, "mnist_mlp", "meta-training checkpoint")
    torch.save({"something": "else"}, ckpt)   # a torch file, but not a checkpoint
    code, err = call("mnist_mlp", args, capsys)
    _check(code, err, "mnist_mlp", "is not an l2l_zoo meta-training checkpoint")
    os.remove(ckpt)
    # a corrupt run-cache entry of a baseline run
    out2 = os.path.join(files["tmp"], "corrupt_cache")
    args2 = ["--opt", "sgd", "--lr-grid", "0.1", "--eval-steps", "2", "--out", out2, "--no-progress"]
    assert call("mnist_mlp", args2, capsys)[0] == 0
    (entry,) = [p for p in os.listdir(os.path.join(out2, "runs")) if p.startswith("sgd_lr0.1-seed0")]
    open(os.path.join(out2, "runs", entry), "w").write("{ not json")
    code, err = call("mnist_mlp", [*args2, "--resume"], capsys)
    _check(code, err, "mnist_mlp", "run-cache file")


@pytest.mark.parametrize("name,args,message", [
    ("mnist_mlp", ["--opt", "lion"], "--opt must be one of"),
    ("lr_schedules_mnist", ["--mus", "2"], "--mus must lie in"),
    ("fig_mlrsnet", ["/nonexistent.json"], "does not exist"),
])
def test_entry_points_as_subprocesses(name, args, message, tmp_path):
    r = subprocess.run([sys.executable, SCRIPTS[name], *args, *(["--out", str(tmp_path / "o")] if name != "fig_mlrsnet"
                                                               else [])],
                       capture_output=True, text=True, timeout=300)
    _check(r.returncode, r.stderr, name, message)
