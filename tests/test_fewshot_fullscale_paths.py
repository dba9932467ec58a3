"""The full-scale settings (the README's commands for the smoothness paper's Tables 1-2) run end to end
through ``python -m fewshot.train`` and ``fewshot.evaluate`` on tiny files in each dataset's real
on-disk layout: miniImageNet (84x84, the cache pickles), tieredImageNet (84x84, the BGR npz), CIFAR-FS
(32x32, per-class PNG folders), including SIB on a WRN-28-10 checkpoint in the authors' layout.

The datasets themselves are not on this machine, so these runs only show that every stage of those
commands (reader, 84x84 Conv-4 learner, backbone, feature cache, meta-training, selection, test,
evaluate) works at the real image sizes; their accuracies mean nothing (2-way episodes of random
images)."""
import json

import torch

from test_fewshot_cli import call, one_thread  # noqa: F401  (one_thread: the autouse fixture, shared)
from test_fewshot_data import (CIFAR, MINI, TIERED, cifar_source, source, write_cifar_png, write_mini_pkl,
                               write_tiered)

TINY = ["--ways", "2", "--shots", "1", "--queries", "2", "--val-episodes", "2", "--test-episodes", "3",
        "--no-progress"]


def _run(args, out, capsys, evaluate=True):
    code, cap = call("fewshot.train", [*args, *TINY, "--out", str(out)], capsys)
    assert code == 0, cap.err
    res = json.loads((out / "results.json").read_text())
    (rec,) = next(iter(res["runs"].values()))
    assert rec["final"]["test_episodes"] == 3 and 0.0 <= rec["final"]["test_acc"] <= 1.0
    if evaluate:
        data_dir = args[args.index("--data-dir") + 1]
        code, cap = call("fewshot.evaluate", [str(out / "model.pt"), "--episodes", "3", "--data-dir", data_dir,
                                              "--no-progress"], capsys)
        assert code == 0, cap.err
        ev = json.loads((out / "evaluate_2w1s.json").read_text())
        assert ev["runs"][next(iter(ev["runs"]))][0]["test_accs"] == rec["test_accs"]
    return res


def test_metalstm_on_miniimagenet_pickles_at_84_pixels(tmp_path, capsys):
    write_mini_pkl(tmp_path / "data" / "miniimagenet", source(MINI))
    res = _run(["--method", "metalstm", "--dataset", "miniimagenet", "--data-dir", str(tmp_path / "data"),
                "--episodes", "2", "--val-every", "1", "--filters", "4", "--inner-steps", "2",
                "--smooth", "eps=0.1,lam=1,steps=1"], tmp_path / "ml", capsys)
    assert res["data"]["train"]["image_shape"] == [3, 84, 84]
    (rec,) = res["runs"]["metalstm+smooth"]
    assert rec["num_meta_parameters"] > 0 and len(rec["step_log"]["meta_loss"]) == 2


def test_sib_on_tieredimagenet_npz_at_84_pixels_with_a_pretrained_conv4(tmp_path, capsys):
    write_tiered(tmp_path / "data" / "tieredimagenet", source(TIERED, n=22), which=("npz",))  # pretraining: batch 64
    res = _run(["--method", "sib", "--dataset", "tieredimagenet", "--data-dir", str(tmp_path / "data"),
                "--episodes", "3", "--val-every", "3", "--pretrain-steps", "2"], tmp_path / "sib", capsys)
    assert res["data"]["train"]["image_shape"] == [3, 84, 84]


def test_sib_on_cifarfs_with_a_wrn_28_10_checkpoint_in_the_authors_layout(tmp_path, capsys):
    from fewshot.backbones import wrn28_10
    tr, te = cifar_source()
    write_cifar_png(tmp_path / "data" / "cifar-fs", tr, te)
    torch.manual_seed(0)
    sd = wrn28_10().state_dict()
    torch.save({"netFeat": {"module." + k: v for k, v in sd.items()}}, tmp_path / "netSIBBest.pth")
    del sd
    res = _run(["--method", "sib", "--dataset", "cifarfs", "--data-dir", str(tmp_path / "data"), "--backbone", "wrn",
                "--backbone-checkpoint", str(tmp_path / "netSIBBest.pth"), "--episodes", "2", "--val-every", "2"],
               tmp_path / "wrn", capsys)
    assert res["data"]["train"]["image_shape"] == [3, 32, 32]
    (rec,) = res["runs"]["sib"]
    assert rec["backbone"]["backbone"] == "wrn28_10"
    assert len(CIFAR["test"]) == 2
