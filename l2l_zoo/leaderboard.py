"""A leaderboard of optimizers on one evaluation setup, from results files of
``benchmarks/mnist_mlp.py`` (learned optimizers, tuned hand-designed ones, learning-rate-free ones).
It reads results and never trains.

Every entry is one run label of one file: its metric at each requested step, mean and population
std over its seeds (from the periodic full-split evaluations, ``eval``), how many seeds diverged
before the step, what it is (``kind``: learned, hand-designed, learning-rate-free) and what it cost
to set up (a learned optimizer's meta-training time; a tuned one's grid). Entries are ranked by the
mean at the last requested step (losses ascending, accuracies descending); an entry with a diverged
seed at that step ranks after every entry without one, since its mean covers fewer seeds.

Only like is compared with like: every file must share the evaluation setup (task, data, minibatch
size, mixed precision, fine-tuning), and every requested step must be an evaluated step of every
entry; otherwise :class:`LeaderboardError` names the file and the difference.
"""
from __future__ import annotations

import math
import os
from collections import Counter
from typing import Iterable, Sequence

from .zoo import LOAD_PREFIX

__all__ = ["LeaderboardError", "SETUP_KEYS", "build", "to_markdown"]

SETUP_KEYS = ("task", "batch_size", "autocast", "finetune")  # from each file's config; plus its "data"
LOWER_IS_BETTER = ("train_loss", "val_loss", "test_loss")
HIGHER_IS_BETTER = ("train_acc", "val_acc", "test_acc")
METRICS = LOWER_IS_BETTER + HIGHER_IS_BETTER


class LeaderboardError(ValueError):
    """Results that cannot be ranked together (names the file and the reason)."""


def _setup(res: dict) -> dict:
    cfg = res["config"]
    return {**{k: cfg.get(k) for k in SETUP_KEYS}, "data": res.get("data")}


def _at(record: dict, metric: str, step: int):
    """The record's metric at an evaluated step, or None when the run diverged before it."""
    ev = record.get("eval") or {}
    steps = ev.get("step") or []
    if step in steps:
        v = ev.get(metric, [None] * len(steps))[steps.index(step)]
        return v if v is not None and math.isfinite(v) else None
    return None


def _reaches(record: dict, step: int) -> bool:
    planned = record.get("steps")
    return planned is None or planned >= step


def build(results: Sequence[tuple[str, dict]], *, metric: str = "train_loss",
          steps: Iterable[int] = (1000,)) -> dict:
    """The leaderboard of ``results`` (pairs of a source name and a results object read with
    :func:`l2l_zoo.runs.read_results`), ranked by ``metric`` at the last of ``steps``."""
    import numpy as np

    if metric not in METRICS:
        raise LeaderboardError(f"metric must be one of {list(METRICS)}, got {metric!r}")
    steps = [int(s) for s in steps]
    if not steps or any(s < 0 for s in steps):
        raise LeaderboardError(f"steps must be a non-empty list of integers >= 0, got {steps}")
    if not results:
        raise LeaderboardError("no results to rank")
    first_src, first = results[0]
    setup = _setup(first)
    for src, res in results:  # every file's setup first, then the runs
        if res.get("benchmark") != "mnist_mlp":
            raise LeaderboardError(f"{src}: a {res.get('benchmark')!r} results file; the leaderboard reads "
                                   "benchmarks/mnist_mlp.py results")
        mine = _setup(res)
        diff = [k for k in setup if mine[k] != setup[k]]
        if diff:
            k = diff[0]
            raise LeaderboardError(f"{src}: evaluation setup differs from {first_src} in {k!r} "
                                   f"({mine[k]!r} vs {setup[k]!r}); rank only results of one setup")
        if res.get("methods") is None:
            raise LeaderboardError(f"{src}: no 'methods' record (written by mnist_mlp.py since 2026-12-02); "
                                   "re-run its command with --resume: its cached runs are reused")
    rows = []
    for src, res in results:
        methods = res["methods"]
        for label, recs in res["runs"].items():
            for s in steps:
                if not all(_reaches(r, s) for r in recs):
                    raise LeaderboardError(f"{src}: {label!r} was run for fewer than {s} steps")
                bad = [r.get("seed") for r in recs if r.get("diverged_at") is None and s not in r["eval"]["step"]]
                if bad:
                    raise LeaderboardError(f"{src}: step {s} is not an evaluated step of {label!r} (evaluated "
                                           f"every {res['config'].get('eval_every')} steps)")
            info = methods.get(label, {})
            row = {"label": label, "run": label, "source": src, "kind": info.get("kind"), "method": info.get("method"),
                   "seeds": [r.get("seed") for r in recs], "setup_cost": _cost(res, info), "at": {}}
            for s in steps:
                vals = [_at(r, metric, s) for r in recs]
                ok = [v for v in vals if v is not None]
                row["at"][str(s)] = {"mean": float(np.mean(ok)) if ok else None,
                                     "std": float(np.std(ok)) if ok else None,
                                     "n": len(ok), "diverged": len(vals) - len(ok)}
            rows.append(row)
    counts = Counter(r["label"] for r in rows)
    for r in rows:  # one label in several files: name the file's folder too
        if counts[r["label"]] > 1:
            r["label"] = f"{r['label']} [{os.path.basename(os.path.dirname(os.path.abspath(r['source'])))}]"
    last = str(steps[-1])
    sign = 1.0 if metric in LOWER_IS_BETTER else -1.0
    rows.sort(key=lambda r: (r["at"][last]["diverged"] > 0, r["at"][last]["mean"] is None,
                             sign * (r["at"][last]["mean"] if r["at"][last]["mean"] is not None else 0.0)))
    for i, r in enumerate(rows, 1):
        r["rank"] = i
    return {"format": "l2l_zoo.leaderboard", "version": 1, "metric": metric, "steps": steps, "setup": setup,
            "rows": rows}


def _cost(res: dict, info: dict) -> str:
    kind = info.get("kind")
    if kind == "learned":
        cfg, mt = res["config"], res.get("meta_training", {})
        if cfg.get("load"):
            saved = mt.get("meta_training") or {}
            return (f"loaded: meta-trained {saved.get('meta_steps', '?')} meta-steps on {mt.get('meta_task', '?')}"
                    f" ({cfg['load'] if cfg['load'].startswith(LOAD_PREFIX) else os.path.basename(cfg['load'])}, "
                    f"sha256 {str(mt.get('sha256', '?'))[:12]})")
        wall = mt.get("wall_s")
        return (f"meta-trained {cfg.get('meta_steps')} meta-steps on {cfg.get('meta_task')}"
                + (f", {wall:.0f} s" if wall else ""))
    if kind == "hand-designed":
        t = res.get("tuning", {}).get(info.get("tuned") or "", {})
        grid = t.get("grid") or res["config"].get("lr_grid")
        return f"lr tuned over {grid} on {t.get('criterion', res['config'].get('tune_criterion'))}"
    if kind == "learning-rate-free":
        return "none (authors' settings)"
    return "?"


def _fmt(v) -> str:
    return "—" if v is None else f"{v:.3g}"


def to_markdown(board: dict) -> str:
    """The leaderboard as a Markdown table."""
    steps = [str(s) for s in board["steps"]]
    head = ["rank", "optimizer", "kind", *[f"{board['metric']} @ {s}" for s in steps], "seeds", "set-up cost", "source"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in board["rows"]:
        cells = []
        for s in steps:
            a = r["at"][s]
            c = _fmt(a["mean"]) + (f" ± {a['std']:.2g}" if a["n"] > 1 else "")
            if a["diverged"]:
                c += f" ({a['diverged']} diverged)"
            cells.append(c)
        lines.append("| " + " | ".join([str(r["rank"]), r["label"], r["kind"] or "?", *cells, str(len(r["seeds"])),
                                        r["setup_cost"], os.fspath(r["source"])]) + " |")
    s = board["setup"]
    lines.append("")
    lines.append(f"Setup: task {s['task']}, minibatch {s['batch_size']}, autocast {s['autocast']}, "
                 f"fine-tuned {s['finetune']}; data: {(s.get('data') or {}).get('note', s.get('data'))}")
    return "\n".join(lines) + "\n"
