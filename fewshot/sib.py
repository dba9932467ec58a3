"""SIB, the synthetic information bottleneck (Hu et al. 2020, "Empirical Bayes transductive
meta-learning with synthetic gradients", ICLR), on features of a frozen backbone
(:mod:`fewshot.backbones`), and its smoothed variant (the smoothness paper, Algorithm 2).

For one N-way episode with support features x^l (labels y^l) and query features x (unlabelled):

* the initialisation network (Hu et al. 2020, θ⁰ = λ(d^l), Fig. 1c): the mean of the L2-normalised
  support features of each class, times a learnable diagonal (``LinearDiag``, initialised to 1):
  θ⁰ of shape (N, D), the classifier weights (θ in Hu et al. 2020; ``params`` in the code, where, as
  everywhere in this library, they are the optimizee's parameters and "meta-parameters" are SIB's own);
* the classifier: logits = scale·(bias + cos(x_q, θ_c)), shape (Q, N), scale (init 10) and bias
  (init 0) learnable;
* the synthetic-gradient network ξ (:class:`SyntheticGradient`: Linear(N→8N)-ReLU-BN,
  Linear(8N→8N)-ReLU-BN, Linear(8N→N)) maps the query logits to a synthetic ∂loss/∂logits, and K
  synthetic gradient steps (Hu et al. 2020, eq. 10)
  θᵏ⁺¹ = θᵏ − η·(∂logits/∂θ)ᵀ·ξ(logits(θᵏ)),  η = 1e-3, K = 3,
  are taken with ``create_graph``, so the query cross-entropy at θᴷ back-propagates into ξ, the
  diagonal, scale and bias (the meta-parameters: this module's parameters). ξ's BatchNorm always
  normalises over the query set (the released code keeps the network in train mode at test: SIB is
  transductive by design); it keeps no running statistics, so ``eval()`` changes nothing.
* K = 0 with the initial diagonal (1) is the nearest-class-mean classifier (NCM,
  :func:`nearest_class_mean`) on the backbone: logits = scale·(bias + cos), the same predictions.

Meta-training (:class:`SIBStepper`, one episode per step, for :func:`l2l_zoo.runs.train`): SGD with
Nesterov momentum 0.9, weight decay 5e-4 and lr 1e-3 on SIB's parameters only (the backbone is
frozen and its features cached), 15 queries per class, as the released configurations.

Smoothed SIB (the smoothness paper's Algorithm 2 with SIB as the update rule): the objective is the
query loss at θᴷ plus λ·Σ_k R_k over the K inner steps, R_k the PGD penalty
(:class:`l2l_zoo.regularizers.SmoothnessRegularizer`, unchanged) of ξ at step k's input. Which input
state to smooth is not said by that paper; ours is the query logits ξ reads, shape (Q, N) (one row
per query example, so the regularizer's ``(n, d_in)`` layout), and SIB exposes what the regularizer
uses of the ``LearnedOptimizer`` contract: ``coordinatewise = False`` (the rows are coupled by
BatchNorm, so no row subsampling) and ``network(feats, hidden) -> (ξ(feats), hidden)`` with no
hidden state (``hidden = ()``).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from l2l_zoo import runs
from l2l_zoo.meta.distributed import SYNC_CHECK_EVERY, all_mean, check_in_sync, dist_world
from l2l_zoo.regularizers import SmoothnessConfig, SmoothnessRegularizer

from .data.episodes import Episode

__all__ = ["LinearDiag", "SyntheticGradient", "SIB", "SIBResult", "SIBStepper", "nearest_class_mean",
           "class_means", "evaluate", "evaluate_ncm"]


def _check_int(name, v, lo):
    if not isinstance(v, int) or isinstance(v, bool) or v < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")


def _check_pos(name, v):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {v!r}")


def class_means(support_x: torch.Tensor, support_y: torch.Tensor, ways: int) -> torch.Tensor:
    """Per-class means of the L2-normalised support features, shape (ways, D). Raises ``ValueError``
    when a label is outside 0..ways−1 or a class has no support example."""
    if support_y.dim() != 1 or support_y.shape[0] != support_x.shape[0]:
        raise ValueError(f"support_y must have shape ({support_x.shape[0]},), got {tuple(support_y.shape)}")
    if support_y.numel() and (int(support_y.min()) < 0 or int(support_y.max()) >= ways):
        raise ValueError(f"support labels must lie in 0..{ways - 1}, got {int(support_y.min())}.."
                         f"{int(support_y.max())}")
    onehot = F.one_hot(support_y, ways).to(support_x.dtype)            # (S, N)
    counts = onehot.sum(0)
    if bool((counts == 0).any()):
        raise ValueError(f"every class needs a support example; classes without one: "
                         f"{(counts == 0).nonzero().flatten().tolist()}")
    return onehot.t() @ F.normalize(support_x, dim=1) / counts[:, None]


def nearest_class_mean(support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor,
                       ways: int) -> torch.Tensor:
    """Cosine similarity of each query feature to each class mean of L2-normalised support features,
    shape (Q, ways): the NCM classifier on the backbone (SIB with K = 0, Hu et al. 2020). (The
    authors' pretraining validator averages unnormalised features instead; the two agree in
    1-shot.)"""
    means = class_means(support_x, support_y, ways)
    return F.normalize(query_x, dim=1) @ F.normalize(means, dim=1).t()


class LinearDiag(nn.Module):
    """x ↦ x ⊙ w with a learnable vector w of shape (D,), initialised to 1 (identity); input (..., D)."""

    def __init__(self, features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(features))

    def forward(self, x):
        return x * self.weight


class SyntheticGradient(nn.Module):
    """ξ: (Q, N) logits → (Q, N) synthetic ∂loss/∂logits (Hu et al. 2020; the decoupled neural
    interface of Jaderberg et al. 2017): Linear(N→hN)-ReLU-BN1d, Linear(hN→hN)-ReLU-BN1d,
    Linear(hN→N), h = ``hidden_factor`` (8). BatchNorm uses the batch (query-set) statistics always
    (``track_running_stats=False``); it needs at least 2 rows."""

    def __init__(self, ways: int, hidden_factor: int = 8):
        super().__init__()
        h = hidden_factor * ways
        self.layer1 = nn.Sequential(nn.Linear(ways, h), nn.ReLU(), nn.BatchNorm1d(h, track_running_stats=False))
        self.layer2 = nn.Sequential(nn.Linear(h, h), nn.ReLU(), nn.BatchNorm1d(h, track_running_stats=False))
        self.layer3 = nn.Linear(h, ways)

    def forward(self, logits):
        return self.layer3(self.layer2(self.layer1(logits)))


class SIBResult(NamedTuple):
    """``logits`` (Q, N) at θᴷ; ``params`` θᴷ (N, D); ``penalties``: R_0..R_{K−1}, one 0-d tensor per
    inner step (empty without a regularizer)."""

    logits: torch.Tensor
    params: torch.Tensor
    penalties: list


class SIB(nn.Module):
    """SIB for ``ways``-way episodes on ``feature_dim``-d features (module docstring). ``steps``: K;
    ``inner_lr``: η; ``scale``: the initial logit scale; ``dni_init``: ``"random"`` (PyTorch's default
    initialisation of ξ, as the released code) or ``"zero"`` (ξ's output layer zeroed: an ablation in
    which SIB starts as the nearest class mean). Parameters: ``scale`` (1,), ``bias`` (1,),
    ``init_diag`` (LinearDiag, D), ``dni`` (:class:`SyntheticGradient`)."""

    coordinatewise = False  # the smoothness regularizer's contract: rows are coupled (BatchNorm)
    vmappable = True  # ξ runs under torch.func.vmap (batch statistics only, no running buffers)

    def __init__(self, ways: int, feature_dim: int, *, steps: int = 3, inner_lr: float = 1e-3, scale: float = 10.0,
                 hidden_factor: int = 8, dni_init: str = "random"):
        super().__init__()
        _check_int("ways", ways, 2)
        _check_int("feature_dim", feature_dim, 1)
        _check_int("steps", steps, 0)
        _check_int("hidden_factor", hidden_factor, 1)
        _check_pos("inner_lr", inner_lr)
        _check_pos("scale", scale)
        self.ways, self.feature_dim, self.steps, self.inner_lr = ways, feature_dim, steps, float(inner_lr)
        self.scale = nn.Parameter(torch.tensor([float(scale)]))
        self.bias = nn.Parameter(torch.zeros(1))
        self.init_diag = LinearDiag(feature_dim)
        self.dni = SyntheticGradient(ways, hidden_factor)
        if dni_init not in ("random", "zero"):
            raise ValueError(f"dni_init must be 'random' or 'zero', got {dni_init!r}")
        if dni_init == "zero":  # ablation: ξ ≡ 0 at first, so the K steps leave θ⁰ and SIB starts as NCM
            nn.init.zeros_(self.dni.layer3.weight)
            nn.init.zeros_(self.dni.layer3.bias)

    @property
    def config(self) -> dict:
        """Constructor arguments (enough to rebuild this module without its weights)."""
        return {"ways": self.ways, "feature_dim": self.feature_dim, "steps": self.steps, "inner_lr": self.inner_lr,
                "hidden_factor": self.dni.layer1[0].out_features // self.ways}

    # ------------------------------------------------------------------ the pieces
    def initial_params(self, support_x: torch.Tensor, support_y: torch.Tensor) -> torch.Tensor:
        """θ⁰ = diag(w)·(class means of L2-normalised support features), shape (N, D)."""
        return self.init_diag(class_means(support_x, support_y, self.ways))

    def logits(self, query_x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """scale·(bias + cos(x_q, θ_c)), shape (Q, N)."""
        return self.scale * (self.bias + F.normalize(query_x, dim=1) @ F.normalize(params, dim=1).t())

    def network(self, feats: torch.Tensor, hidden: tuple = ()) -> tuple[torch.Tensor, tuple]:
        """The learned map of the ``LearnedOptimizer`` contract (what the smoothness regularizer
        perturbs): input state ``feats`` = query logits (Q, N) → synthetic gradient ξ(feats) (Q, N);
        no hidden state."""
        return self.dni(feats), hidden

    def inner_step(self, params: torch.Tensor, query_x: torch.Tensor, *, create_graph: bool = True):
        """One synthetic gradient step (Hu et al. 2020, eq. 10): returns (θ − η·(∂logits/∂θ)ᵀ·ξ(logits),
        logits, ξ(logits)), the logits (Q, N) and synthetic gradient at the input θ. With
        ``create_graph=False`` (evaluation) the result is detached; the values are the same."""
        if not create_graph or not params.requires_grad:
            params = params.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = self.logits(query_x, params)
            synthetic = self.network(logits)[0]
            (grad,) = torch.autograd.grad(logits, params, grad_outputs=synthetic, create_graph=create_graph)
        new = params - self.inner_lr * grad
        return (new if create_graph else new.detach()), logits, synthetic

    # ------------------------------------------------------------------ an episode
    def _check(self, support_x, query_x):
        for k, x in (("support_x", support_x), ("query_x", query_x)):
            if x.dim() != 2 or x.shape[1] != self.feature_dim:
                raise ValueError(f"{k} must be features of shape (n, {self.feature_dim}), got {tuple(x.shape)}")
        if query_x.shape[0] < 2:
            raise ValueError(f"query_x must hold at least 2 examples (the synthetic-gradient network normalises "
                             f"over the query set), got {query_x.shape[0]}")

    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor, *,
              steps: int | None = None, regularizer: SmoothnessRegularizer | None = None,
              generator: torch.Generator | None = None, create_graph: bool = True) -> SIBResult:
        """θ⁰ from the support set, then ``steps`` (default K) synthetic gradient steps on the query
        features; with ``regularizer``, R_k = regularizer(self, logits_k, ()) at each step's logits
        (PGD noise from ``generator``; the K PGD problems run together after the inner loop,
        :meth:`~l2l_zoo.regularizers.SmoothnessRegularizer.penalties`, the same values). Features: (S, D) and (Q, D); labels (S,) in 0..N−1."""
        self._check(support_x, query_x)
        K = self.steps if steps is None else steps
        _check_int("steps", K, 0)
        params = self.initial_params(support_x, support_y)
        prepared = []
        for _ in range(K):
            params, logits, _ = self.inner_step(params, query_x, create_graph=create_graph)
            if regularizer is not None:  # its random draws now, its PGD for all K steps at once below
                prepared.append(regularizer.prepare(self, logits, (), generator))
        penalties = []
        if prepared:
            with torch.enable_grad():
                penalties = list(regularizer.penalties(self, prepared).unbind())
        return SIBResult(self.logits(query_x, params), params, penalties)

    def forward(self, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor) -> torch.Tensor:
        """Query logits (Q, N) after K steps."""
        return self.adapt(support_x, support_y, query_x).logits

    def check_episode(self, episode: Episode) -> None:
        if episode.ways != self.ways:
            raise ValueError(f"this SIB is built for {self.ways}-way episodes, got a {episode.ways}-way episode")


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def evaluate(sib: SIB, episodes: Sequence[Episode]) -> list[float]:
    """Query accuracy of ``sib`` (K synthetic gradient steps, no meta-graph) on each feature episode:
    a list of floats in [0, 1], one per episode (e.g. :func:`fewshot.data.mean_ci` of it)."""
    device, accs = _device(sib), []
    for ep in episodes:
        sib.check_episode(ep)
        ep = ep.to(device)
        with torch.no_grad():
            out = sib.adapt(ep.support_x, ep.support_y, ep.query_x, create_graph=False)
        accs.append(float((out.logits.argmax(1) == ep.query_y).float().mean()))
    return accs


def evaluate_ncm(episodes: Sequence[Episode]) -> list[float]:
    """Query accuracy of the nearest-class-mean classifier (:func:`nearest_class_mean`) on each feature
    episode, one float per episode."""
    accs = []
    for ep in episodes:
        with torch.no_grad():
            cos = nearest_class_mean(ep.support_x, ep.support_y, ep.query_x, ep.ways)
        accs.append(float((cos.argmax(1) == ep.query_y).float().mean()))
    return accs


class SIBStepper:
    """One SIB meta-training iteration per :meth:`step` (a stepper for :func:`l2l_zoo.runs.train`): the
    episode's query cross-entropy at θᴷ (+ λ·Σ_k R_k with ``smooth``) is back-propagated through the K
    synthetic gradient steps and SGD (Nesterov ``momentum``, ``weight_decay``, ``lr``) updates SIB's
    parameters (:class:`l2l_zoo.runs.OptimizerStepper` does the step: a non-finite objective or
    gradient stops the run before the parameters move). ``seed`` seeds the generator of the PGD
    random starts (checkpointed with the stepper).

    ``step(episode)`` returns ``loss`` (the query loss), ``acc`` (query accuracy), ``lr`` and, smoothed,
    ``penalty`` (λ·Σ_k R_k) and ``meta_loss`` (what is minimised). Feed it feature episodes, e.g.
    ``lambda aux: [sampler.episode(seed, i) for i in stepper.episode_indices()]`` (episode index =
    steps taken, so a resumed run sees the same episodes) or ``sampler.sample(gen)`` with
    ``generators={"episodes": gen}``.

    ``meta_batch`` B: episodes per iteration, the objective their mean (both authors' codes: 1).
    ``distributed=True`` under ``torch.distributed`` (``torchrun``): every process takes its share
    of the B episodes (B a multiple of the number of processes), the gradients and the reported
    numbers are means over the processes, so every process holds the same parameters (checked every
    ``SYNC_CHECK_EVERY`` iterations). Episode b of iteration t is training episode t·B + b
    (:meth:`episode_indices`), and with B > 1 or several processes its PGD noise comes from a
    generator seeded by (``seed``, t·B + b) instead of one running stream, so that the run is the
    same on any number of processes and the checkpoint holds no per-process state (a run resumes on
    another number of processes). B = 1 in one process is the authors' one-episode iteration,
    unchanged.
    """

    def __init__(self, sib: SIB, *, lr: float = 1e-3, momentum: float = 0.9, weight_decay: float = 5e-4,
                 smooth: SmoothnessConfig | None = None, seed: int = 0, meta_batch: int = 1,
                 distributed: bool = False):
        _check_pos("lr", lr)
        if isinstance(momentum, bool) or not (0 <= momentum < 1):
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        if isinstance(weight_decay, bool) or not (weight_decay >= 0 and math.isfinite(weight_decay)):
            raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
        if smooth is not None and not isinstance(smooth, SmoothnessConfig):
            raise TypeError(f"smooth must be a SmoothnessConfig or None, got {type(smooth).__name__}")
        _check_int("meta_batch", meta_batch, 1)
        world, rank = dist_world() if distributed else (1, 0)
        if meta_batch % world:
            raise ValueError(f"meta_batch {meta_batch} must be a multiple of the number of processes, {world}")
        self.model, self.smooth, self.seed = sib, smooth, int(seed)
        self.meta_batch, self.world = meta_batch, world
        per = meta_batch // world
        self.slots = range(rank * per, (rank + 1) * per)  # this process's episodes of each iteration
        self.batched = meta_batch > 1 or world > 1
        self.optimizer = torch.optim.SGD(sib.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay,
                                         nesterov=momentum > 0)
        self.regularizer = SmoothnessRegularizer(smooth) if smooth is not None else None
        self.generator = torch.Generator().manual_seed(int(seed))
        self._inner = runs.OptimizerStepper(sib, self.optimizer, self._objective, distributed=world > 1)
        self._parts: dict = {}

    @property
    def t(self) -> int:
        """Meta-training iterations taken."""
        return self._inner.t

    def episode_indices(self) -> list[int]:
        """Indices of the training episodes this process feeds to the next :meth:`step`: t·B + b
        for the slots b of its share (t = iterations taken; [t] for B = 1 in one process)."""
        return [self.t * self.meta_batch + b for b in self.slots]

    def _noise(self, index: int) -> torch.Generator:
        if not self.batched:
            return self.generator
        return torch.Generator().manual_seed((self.seed * 1_000_003 + 7_000_003 * (index + 1)) % 2**63)

    def _objective(self, sib: SIB, batch) -> torch.Tensor:
        terms, parts = [], []
        for index, episode in batch:
            out = sib.adapt(episode.support_x, episode.support_y, episode.query_x, regularizer=self.regularizer,
                            generator=self._noise(index))
            loss = F.cross_entropy(out.logits, episode.query_y)
            acc = (out.logits.detach().argmax(1) == episode.query_y).float().mean()
            term, penalty = loss, loss.new_zeros(())
            if self.regularizer is not None:
                penalty = self.smooth.lam * (torch.stack(out.penalties).sum() if out.penalties else loss.new_zeros(()))
                term = loss + penalty
            terms.append(term)
            parts.append(torch.stack([loss.detach(), acc.to(loss.dtype), penalty.detach()]))
        mean_parts = parts[0] if len(parts) == 1 else torch.stack(parts).mean(0)
        if self.world > 1:  # what is reported: the means over every process's episodes
            mean_parts = mean_parts.double()
            all_mean([mean_parts])
        loss_v, acc_v, pen_v = (float(v) for v in mean_parts)
        self._parts = {"loss": loss_v, "acc": acc_v}
        if self.regularizer is not None:
            self._parts["penalty"] = pen_v
        return terms[0] if len(terms) == 1 else torch.stack(terms).mean()

    def step(self, episodes) -> dict:
        """One iteration on this process's episodes: an :class:`Episode` (B = 1 in one process) or
        a list of them, those of :meth:`episode_indices` in order."""
        indices = self.episode_indices()
        episodes = [episodes] if isinstance(episodes, Episode) else list(episodes)
        if len(episodes) != len(indices):
            raise ValueError(f"this process takes {len(indices)} episode(s) per iteration (meta_batch "
                             f"{self.meta_batch} over {self.world} process(es)), got {len(episodes)}")
        device = _device(self.model)
        batch = []
        for i, ep in zip(indices, episodes):
            self.model.check_episode(ep)
            batch.append((i, ep.to(device)))
        r = self._inner.step(batch)
        out = {**self._parts, "lr": r.get("lr")}
        if self.regularizer is not None:
            out["meta_loss"] = r["loss"]
        if r.get("error"):
            out["error"] = r["error"]
        elif not math.isfinite(r["loss"]):
            out["error"] = f"non-finite meta-loss {r['loss']}"
        if self.world > 1 and "error" not in out and self.t % SYNC_CHECK_EVERY == 0:
            check_in_sync(list(self.model.parameters()), "SIB parameters", f"iteration {self.t}")
        return out

    def evaluate(self, episodes: Sequence[Episode]) -> list[float]:
        """Per-episode query accuracies (:func:`evaluate`)."""
        return evaluate(self.model, episodes)

    def state_dict(self) -> dict:
        return {"stepper": self._inner.state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, sd: dict) -> None:
        self._inner.load_state_dict(sd["stepper"])
        self.generator.set_state(sd["generator"])
