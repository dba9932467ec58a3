"""Test a trained few-shot model on seeded test episodes.

    python -m fewshot.evaluate results/fewshot/omniglot-small_metalstm_5w1s/model.pt
    python -m fewshot.evaluate model.pt --episodes 2000 --shots 5 --dataset omniglot-small

``CHECKPOINT`` is the ``model.pt`` that ``python -m fewshot.train`` writes (Meta-LSTM: an
``l2l_zoo.save`` file; SIB, NCM, fine-tuning: a ``weights_only`` torch file). The test episodes are
the same seeded list as training's (episode ``i`` of the test seed), so numbers are comparable
across methods and runs. ``--ways`` must equal the trained one for Meta-LSTM (the learner's output
layer is part of c₀) and SIB (the synthetic-gradient network reads N logits); ``--shots`` may differ
(Ravi & Larochelle test 1-shot with the 5-shot meta-learner). Prints the mean and 95 % CI and writes
a results JSON (``--out``, default ``<checkpoint folder>/evaluate_<N>w<K>s.json``).
"""
from __future__ import annotations

import os
import sys
import time

import l2l_zoo
from l2l_zoo import runs
from l2l_zoo.cli import ArgumentParser, UsageError, output_file, resolve_device, run_main

from . import metalstm as mlstm
from .data import DATASETS, EpisodeSampler, load_fewshot, mean_ci
from .train import TEST_SEED


def parse(argv=None):
    p = ArgumentParser(prog="python -m fewshot.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="model.pt written by python -m fewshot.train")
    p.add_argument("--episodes", type=int, default=600, help="seeded test episodes")
    p.add_argument("--ways", type=int, default=None, help="N (default: as trained)")
    p.add_argument("--shots", type=int, default=None, help="K (default: as trained)")
    p.add_argument("--queries", type=int, default=None, help="Q (default: as trained)")
    p.add_argument("--dataset", default=None, help=f"dataset of the test split (default: as trained), one of {list(DATASETS)}")
    p.add_argument("--data-dir", default=None, help="dataset folder (default: $L2L_ZOO_DATA)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--out", default=None, help="results JSON path")
    p.add_argument("--no-progress", action="store_true", help="no progress bar over the test episodes")
    a = p.parse_args(argv)
    if not os.path.isfile(a.checkpoint):
        raise UsageError(f"no such checkpoint {a.checkpoint!r}")
    for flag, v, lo in (("--episodes", a.episodes, 1), ("--ways", a.ways, 2), ("--shots", a.shots, 1),
                        ("--queries", a.queries, 1)):
        if v is not None and v < lo:
            raise UsageError(f"{flag} must be an integer >= {lo}, got {v}")
    if a.dataset is not None and a.dataset not in DATASETS:
        raise UsageError(f"--dataset must be one of {list(DATASETS)}, got {a.dataset!r}")
    if a.data_dir is not None and not os.path.isdir(a.data_dir):
        raise UsageError(f"--data-dir: no such folder {a.data_dir!r}")
    resolve_device(a.device)
    return a


def load_model(path: str):
    """(method, payload, info): a Meta-LSTM file or one of fewshot.train's torch files."""
    try:
        lopt, extra = l2l_zoo.load(path, with_extra=True)
    except l2l_zoo.LearnedOptimizerFileError:
        lopt = None
    if lopt is not None:
        info = extra.get("fewshot")
        if not isinstance(info, dict) or info.get("method") != "metalstm":
            raise UsageError(f"{path!r} holds a {lopt.name!r} learned optimizer, not a fewshot.train model")
        return "metalstm", lopt, info
    ck = runs.load_torch(path, what="few-shot model")
    if not isinstance(ck, dict) or ck.get("format") not in ("fewshot.sib", "fewshot.ncm", "fewshot.finetune"):
        raise UsageError(f"{path!r} is not a model written by python -m fewshot.train")
    return ck["format"].split(".")[1], ck, ck["fewshot"]


def main(argv=None) -> int:
    a = parse(argv)
    method, model, info = load_model(a.checkpoint)
    protocol = info.get("protocol") or (model.get("protocol", {}) if isinstance(model, dict) else {})
    trained = {"ways": info.get("ways", protocol.get("ways")), "shots": info.get("shots", protocol.get("shots")),
               "queries": info.get("queries", protocol.get("queries", 15))}
    ways, shots, queries = (a.ways or trained["ways"]), (a.shots or trained["shots"]), (a.queries or trained["queries"])
    if method in ("metalstm", "sib") and ways != trained["ways"]:
        raise UsageError(f"--ways {ways}: this {method} model was trained for {trained['ways']}-way episodes "
                         "(its output layer has that size)")
    dataset = a.dataset or info.get("dataset")
    out = a.out or os.path.join(os.path.dirname(os.path.abspath(a.checkpoint)), f"evaluate_{ways}w{shots}s.json")
    with output_file(out):
        device = resolve_device(a.device)
        splits = load_fewshot(dataset, a.data_dir)
        sampler = EpisodeSampler(splits["test"], ways, shots, queries)
        t0 = time.perf_counter()
        if method == "metalstm":
            mcfg = mlstm.MetaLSTMConfig(**{**protocol, "shots": shots, "queries": queries,
                                           "inner_batch_size": None})
            accs = mlstm.evaluate(model.to(device), mcfg, sampler, a.episodes, TEST_SEED, device=device,
                                  autocast=info.get("autocast"),  # as it was meta-trained
                                  progress=not a.no_progress)
        elif method == "finetune":
            from .finetune import evaluate_finetune
            mcfg = mlstm.MetaLSTMConfig(**{**model["protocol"], "ways": ways, "shots": shots, "queries": queries,
                                           "inner_batch_size": None})
            accs = evaluate_finetune(sampler, mlstm.learner_fn(mcfg, splits["train"].image_shape), mcfg.init_seed,
                                     lr=model["lr"], steps=model["steps"], n_episodes=a.episodes, seed=TEST_SEED,
                                     device=device, progress=not a.no_progress)
        else:
            from .backbones import cache_features, conv4_64, wrn28_10
            from .sib import SIB, evaluate, evaluate_ncm
            c, h, _ = splits["train"].image_shape
            info_b = model.get("backbone_info", {})
            net = wrn28_10() if info_b.get("backbone") == "wrn28_10" else conv4_64(in_channels=c, image_size=h)
            net.load_state_dict(model["backbone"])
            net = net.to(device).eval()
            fs = EpisodeSampler(cache_features(net, splits["test"]), ways, shots, queries)
            eps = fs.episodes(a.episodes, TEST_SEED)
            if method == "ncm":
                accs = evaluate_ncm(eps)
            else:
                sib = SIB(**model["sib_config"]).to(device)
                sib.load_state_dict(model["sib"])
                accs = evaluate(sib, [e.to(device) for e in eps])
        m, ci = mean_ci(accs)
        res = runs.new_results("fewshot.evaluate", {**vars(a), "method": method, "ways": ways, "shots": shots,
                                                    "queries": queries, "dataset": dataset},
                               data={"test": splits["test"].summary()})
        rec = runs.new_record(0, test_accs=accs)
        rec["final"] = {"test_acc": m, "test_ci": ci, "test_episodes": len(accs)}
        rec["wall_s"] = time.perf_counter() - t0
        res["runs"][method] = [rec]
        res["summary"][method] = runs.summarize([rec])
        res["checkpoint_sha256"] = runs.file_digest(a.checkpoint)
        runs.write_json(out, res)
    print(f"{method} on {dataset} test, {ways}-way {shots}-shot: {100 * m:.2f} ± {100 * ci:.2f} % over "
          f"{len(accs)} episodes  (results: {out})")
    return 0


if __name__ == "__main__":
    sys.argv[0] = "fewshot.evaluate"
    run_main(main)
