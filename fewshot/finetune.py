"""Baselines that Meta-LSTM is compared with on the same episodes (Ravi & Larochelle 2017, §5).

* **Fine-tuning** ("Baseline-finetune"): the same learner, from the same initialisation, trained on
  the episode's support set by SGD (optionally with momentum) for ``steps`` updates at rate ``lr``,
  then classifying the query set. ``lr`` and ``steps`` are chosen on *validation* episodes with
  :func:`l2l_zoo.runs.tune` (criterion ``val_acc``, the mean query accuracy over the validation
  episodes), never on test episodes. The paper fine-tunes a network pre-trained on the
  meta-training classes; here the initialisation is whatever the caller passes: a seed (the
  learner's own initialisation, which is also where Meta-LSTM's c₀ starts, so both methods start
  from the same point) or a flat parameter vector (e.g. a pre-trained network). The official code
  (model/baselines/pre-trained-SGD.lua) searches lr ∈ {0.5, 0.1, 0.01, 0.001, 1e-4, 1e-5} (and a
  rate decay, not offered here) with 15 updates on the whole support set and classifies the query
  in evaluation mode (BatchNorm running statistics): :data:`LR_GRID`, ``bn_mode="running"``.
* **Nearest neighbour on pixels**: each query gets the label of its nearest support image in pixel
  space, L2 distance (the official code's pixel-nearest-neighbor baseline uses cosine similarity,
  ``metric="cosine"``).

Every fine-tuning run goes through the library's one training loop (:func:`l2l_zoo.runs.train`
with :class:`~l2l_zoo.runs.OptimizerStepper`), so a learning rate that makes the loss non-finite is
stopped before the weights move and recorded as diverged (such a setting is never selected).
"""
from __future__ import annotations

import math
from functools import reduce
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from l2l_zoo import runs

from .data.episodes import Episode, EpisodeSampler, mean_ci
from .learners import BN_MODES, EpisodeTask

__all__ = ["LR_GRID", "STEPS_GRID", "finetune_episode", "evaluate_finetune", "tune_finetune",
           "pixel_nn_predict", "pixel_nn_accuracy", "evaluate_pixel_nn"]

#: learning rates of the official baseline's grid search
LR_GRID = (0.5, 0.1, 0.01, 0.001, 1e-4, 1e-5)
#: numbers of updates searched (the official code uses 15 only)
STEPS_GRID = (5, 10, 15, 20, 50, 100)


def _ce(model: nn.Module, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def _check(lr, steps, momentum, bn_mode):
    if not (isinstance(lr, (int, float)) and not isinstance(lr, bool) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    if not (isinstance(steps, int) and not isinstance(steps, bool) and steps >= 0):
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    if not (isinstance(momentum, (int, float)) and 0.0 <= momentum < 1.0):
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
    if bn_mode not in BN_MODES:
        raise ValueError(f"bn_mode must be one of {list(BN_MODES)}, got {bn_mode!r}")


def _initial(task: EpisodeTask, init: int | torch.Tensor) -> list[torch.Tensor]:
    """The learner's starting parameters: its initialisation with seed ``init``, or the flat vector."""
    if isinstance(init, int) and not isinstance(init, bool):
        return task.init_params(init)
    flat = torch.as_tensor(init).detach().reshape(-1)
    if flat.numel() != task.num_params:
        raise ValueError(f"init must be a seed or a flat vector of the learner's {task.num_params} parameters, "
                         f"got a vector of {flat.numel()}")
    return [t.clone() for t in task.unflatten(flat.to(task.device)).values()]


def finetune_episode(episode: Episode, model_fn: Callable[[], nn.Module], init: int | torch.Tensor, *,
                     lr: float, steps: int, momentum: float = 0.0, inner_batch_size: int | None = None,
                     bn_mode: str = "running", eval_every: int = 0, seed: int = 0, device="cpu") -> dict:
    """Fine-tune the learner ``model_fn()`` from ``init`` (a seed or a flat vector) on the support set
    of ``episode``: ``steps`` updates of ``torch.optim.SGD(lr=lr, momentum=momentum)`` on minibatches
    of ``inner_batch_size`` support examples (None: the whole support set, drawn with ``seed``
    otherwise); BatchNorm statistics start fresh. The query set is classified with ``bn_mode``
    statistics (``"running"``: accumulated over the updates; ``"transductive"``: the query's own) at
    step 0, every ``eval_every`` updates and at the end.

    Returns the :func:`l2l_zoo.runs.train` record: ``eval`` columns ``step``, ``query_loss``,
    ``query_acc``; ``final`` (None if the run diverged); plus ``at_stop``: the query metrics of the
    learner where training stopped (the end, or the last finite parameters of a diverged run)."""
    _check(lr, steps, momentum, bn_mode)
    if not (isinstance(eval_every, int) and eval_every >= 0):
        raise ValueError(f"eval_every must be an integer >= 0, got {eval_every!r}")
    task = EpisodeTask(episode, model_fn, inner_batch_size=inner_batch_size, bn_mode=bn_mode, device=device)
    model = task.build_model(params=_initial(task, init))
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    gen = torch.Generator().manual_seed(seed)
    qx, qy = task.outer_batch(gen)

    def query() -> dict:
        was = model.training
        model.train(task.outer_train_mode)
        try:
            with torch.no_grad():
                out = model(qx)
        finally:
            model.train(was)
        return {"query_loss": float(F.cross_entropy(out, qy)), "query_acc": float((out.argmax(1) == qy).float().mean())}

    rec = runs.train(runs.OptimizerStepper(model, opt, _ce), lambda aux: task.inner_batch(gen), steps=steps,
                     evaluate=query, eval_every=eval_every, progress=False, desc="finetune", log=lambda s: None)
    rec["at_stop"] = query()
    return rec


def _episodes(source: EpisodeSampler | Iterable[Episode], n_episodes: int | None, seed: int | None):
    if isinstance(source, EpisodeSampler):
        if not (isinstance(n_episodes, int) and n_episodes >= 1) or seed is None:
            raise ValueError(f"with a sampler, n_episodes must be an integer >= 1 and seed given, got "
                             f"n_episodes={n_episodes!r}, seed={seed!r}")
        return [source.episode(seed, i) for i in range(n_episodes)]
    return list(source)


def evaluate_finetune(episodes: EpisodeSampler | Iterable[Episode], model_fn: Callable[[], nn.Module],
                      init: int | torch.Tensor, *, lr: float, steps: int, momentum: float = 0.0,
                      n_episodes: int | None = None, seed: int | None = None, inner_batch_size: int | None = None,
                      bn_mode: str = "running", device="cpu", progress: bool = False) -> list[float]:
    """Query accuracy of :func:`finetune_episode` on each episode (a list, or ``n_episodes`` episodes
    of ``seed`` from a sampler). A run that diverged counts with the accuracy of the learner where it
    stopped (its last finite parameters). ``progress``: a progress bar over the episodes."""
    from tqdm.auto import tqdm
    _check(lr, steps, momentum, bn_mode)
    accs = []
    for k, ep in enumerate(tqdm(_episodes(episodes, n_episodes, seed), desc="finetune test", disable=not progress,
                                leave=False)):
        rec = finetune_episode(ep, model_fn, init, lr=lr, steps=steps, momentum=momentum,
                               inner_batch_size=inner_batch_size, bn_mode=bn_mode, seed=k, device=device)
        accs.append((rec["final"] or rec["at_stop"])["query_acc"])
    return accs


def tune_finetune(val_episodes: EpisodeSampler | Iterable[Episode], model_fn: Callable[[], nn.Module],
                  init: int | torch.Tensor, *, lrs: Sequence[float] = LR_GRID, steps: Sequence[int] = STEPS_GRID,
                  momentum: float = 0.0, n_episodes: int | None = None, seed: int | None = None,
                  inner_batch_size: int | None = None, bn_mode: str = "running", device="cpu",
                  progress: bool = False) -> runs.TuneResult:
    """Choose (lr, steps) for the fine-tuning baseline on validation episodes: the grid is every pair
    of ``lrs`` × ``steps``, the criterion ``val_acc`` the mean query accuracy over ``val_episodes``
    (:func:`l2l_zoo.runs.tune`; ``best`` is an ``(lr, steps)`` pair, ``records`` hold ``val_acc`` and
    ``val_ci`` per pair). One run of max(steps) updates per episode and learning rate serves every
    number of steps (the trajectory of fewer steps is its prefix). A pair for which any episode's run
    diverged within its number of steps gets no score and is never chosen. ``progress``: a progress
    bar over the validation episodes of each learning rate."""
    from tqdm.auto import tqdm
    lrs, steps = list(lrs), list(steps)
    if not lrs or not steps:
        raise ValueError(f"lrs and steps must be non-empty, got lrs={lrs!r}, steps={steps!r}")
    for lr in lrs:
        _check(lr, 0, momentum, bn_mode)
    for s in steps:
        if not (isinstance(s, int) and not isinstance(s, bool) and s >= 1):
            raise ValueError(f"steps must hold integers >= 1, got {s!r}")
    eps = _episodes(val_episodes, n_episodes, seed)
    if not eps:
        raise ValueError("tune_finetune needs at least one validation episode")
    every = reduce(math.gcd, steps)
    cache: dict = {}

    def curves(lr):
        if lr not in cache:
            cache[lr] = [finetune_episode(ep, model_fn, init, lr=lr, steps=max(steps), momentum=momentum,
                                          inner_batch_size=inner_batch_size, bn_mode=bn_mode, eval_every=every,
                                          seed=k, device=device)
                        for k, ep in enumerate(tqdm(eps, desc=f"finetune tune lr={lr:g}", disable=not progress,
                                                    leave=False))]
        return cache[lr]

    def run(value):
        lr, s = value
        accs = []
        for rec in curves(lr):
            ev = rec["eval"]
            diverged = rec["diverged_at"] is not None and rec["diverged_at"] <= s
            if diverged or s not in ev["step"] or ev["query_acc"][ev["step"].index(s)] is None:
                return {"final": None, "diverged_at": rec["diverged_at"]}
            accs.append(ev["query_acc"][ev["step"].index(s)])
        m, ci = mean_ci(accs)
        return {"final": {"val_acc": m, "val_ci": ci}, "diverged_at": None}

    grid = [(lr, s) for lr in lrs for s in steps]
    return runs.tune(grid, run, criterion="val_acc",
                     note=f"fine-tuning baseline: SGD momentum {momentum}, {len(eps)} validation episodes")


# ============================================================================ pixel nearest neighbour

def pixel_nn_predict(episode: Episode, metric: str = "l2") -> torch.Tensor:
    """Labels (Q,) of the query images: the label of the nearest support image by ``metric``
    (``"l2"``: Euclidean distance between pixel vectors; ``"cosine"``: largest cosine similarity).
    Ties go to the first support image (class-major order). The episode's pixels are used as given;
    the samplers' normalisation is one affine map per channel, which leaves the L2 ranking of
    single-channel images (Omniglot) unchanged."""
    if metric not in ("l2", "cosine"):
        raise ValueError(f"metric must be 'l2' or 'cosine', got {metric!r}")
    s = episode.support_x.reshape(len(episode.support_y), -1).double()
    q = episode.query_x.reshape(len(episode.query_y), -1).double()
    if metric == "l2":
        nearest = torch.cdist(q, s, compute_mode="donot_use_mm_for_euclid_dist").argmin(1)
    else:
        nearest = (F.normalize(q, dim=1) @ F.normalize(s, dim=1).T).argmax(1)
    return episode.support_y[nearest]


def pixel_nn_accuracy(episode: Episode, metric: str = "l2") -> float:
    """Query accuracy of :func:`pixel_nn_predict`."""
    return float((pixel_nn_predict(episode, metric) == episode.query_y).double().mean())


def evaluate_pixel_nn(episodes: EpisodeSampler | Iterable[Episode], *, n_episodes: int | None = None,
                      seed: int | None = None, metric: str = "l2") -> list[float]:
    """:func:`pixel_nn_accuracy` of each episode (a list, or ``n_episodes`` of ``seed`` from a sampler)."""
    return [pixel_nn_accuracy(ep, metric) for ep in _episodes(episodes, n_episodes, seed)]
