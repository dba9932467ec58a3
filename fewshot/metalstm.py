"""Meta-LSTM (Ravi & Larochelle 2017, "Optimization as a model for few-shot learning"), its smoothed
variant (the smoothness paper, "Learning to learn with smooth regularization", §5.2 and
Algorithm 2), and the meta-training / meta-test protocol of the authors' code.

Notation: the paper's θ is the *learner's* parameters; in this library θ (``theta``) names the
meta-parameters of the optimizer, so the learner's parameters are ``params`` in the code and θ only
appears in the equations quoted from the paper.

The meta-learner (§3.1-3.2) is a two-layer coordinate-wise network over the learner's ``n``
parameters:

* layer 1: an LSTM(4 → 20) over the log/sign-preprocessed loss and gradient (Andrychowicz et al.
  2016, appendix A, p = 10; the loss is broadcast to every coordinate), hidden state (h, c);
* layer 2, the meta-learner cell, whose *cell state is the learner's parameters* (eq. 2):

      f_t = W_F·[h_t, θ_{t−1}, f_{t−1}] + b_F,    i_t = W_I·[h_t, θ_{t−1}, i_{t−1}] + b_I,
      θ_t = σ(f_t) ⊙ θ_{t−1} − σ(i_t) ⊙ ∇_t,

  with the recurrences on the pre-sigmoid values f, i (as both public codes do) and the raw
  gradient ∇_t; the cell starts at c₀, the learner's learned initial parameters (Algorithm 1:
  θ₀ ← c₀), a meta-parameter of ``n_params`` numbers.

In the library's contract (:class:`l2l_zoo.LearnedOptimizer`): ``features`` is the input state the
smoothness regularizer perturbs, ``network`` returns the update u = θ_t − θ_{t−1} (so the trainer's
``params + u`` is θ_t), ``initial_params`` returns c₀. Meta-training (Algorithm 1) is
:class:`l2l_zoo.meta.MetaTrainer` on an :class:`~fewshot.learners.EpisodeFamily`: one episode per
meta-step, ``horizon = unroll =`` the number of inner updates, meta-loss ``"outer"`` (the query loss
at θ_T), first-order (the learner's gradients are treated as constants: the paper's simplification,
which avoids second derivatives; both codes detach them), Adam and a meta-gradient-norm clip of
0.25. The smoothed Meta-LSTM is the same with
``smooth=SmoothnessConfig(...)``: λ·Σ_t R_t over the inner loop added to the query loss (Algorithm 2
lines 9-17); nothing here is specific to it.

Two public codes differ in details; both are named presets (:func:`preset_config` for the protocol,
the ``preset`` option for the initialisation): ``"official"`` (twitter/meta-learning-lstm, Lua) and
``"markdtw"`` (markdtw/meta-learning-lstm-pytorch, the port the smoothness paper used, Table 1).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
from dataclasses import asdict, dataclass
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

import l2l_zoo
from l2l_zoo import runs
from l2l_zoo.base import LearnedOptimizer, MetaDefaults, OptState
from l2l_zoo.meta import MetaTrainConfig, MetaTrainer, adapt
from l2l_zoo.optimizers.features import CoordLSTM, log_sign_preprocess
from l2l_zoo.regularizers import SmoothnessConfig

from .data.episodes import Episode, EpisodeSampler, FewShotSplit, mean_ci
from .learners import BN_MODES, Conv4, EpisodeFamily, EpisodeTask

__all__ = ["MetaLSTM", "PRESETS", "MetaLSTMConfig", "preset_config", "learner_fn", "build_metalstm",
           "episode_family", "meta_train", "evaluate", "BestOnValidation"]

PRESETS = ("official", "markdtw")


@l2l_zoo.register
class MetaLSTM(LearnedOptimizer):
    """The Meta-LSTM meta-learner (module docstring; Ravi & Larochelle 2017, §3.1-3.2, eq. 2).

    Options:

    * ``n_params``: size of the learned initialisation c₀ (the learner's parameter count); 0 means no
      learned initialisation (``initial_params`` returns the task's own initialisation, which makes
      the optimizer usable on any problem, e.g. the library's generic tests).
    * ``learn_init``: c₀ is a meta-parameter (True, the paper) or a fixed buffer (False: "freezing
      c₀"; it is still saved and loaded).
    * ``preset``: the initialisation of the meta-parameters. ``"official"`` (the Lua code): every
      weight U(−0.01, 0.01), layer 1 included, b_F ~ U(4, 5), b_I ~ U(−5, −4). The Lua LSTM has one
      bias vector, PyTorch's LSTMCell two: here b_ih ~ U(−0.01, 0.01) and b_hh = 0, so that their
      sum, the effective bias, has the official distribution. ``"markdtw"`` (the PyTorch port):
      layer 1 keeps PyTorch's LSTMCell initialisation, W_F, W_I ~ U(−0.01, 0.01), b_F ~ U(4, 6),
      b_I ~ U(−5, −4). Both start close to gradient descent with a small rate σ(b_I) ≈ 0.01 and a
      forget gate σ(b_F) ≈ 0.99 (a mild weight decay), as both codes intend ("want initial forget
      value to be high and input value to be low so that model starts with gradient descent"). c₀
      starts at
      U(−0.01, 0.01) until :meth:`set_initial_params` copies a learner initialisation into it (both
      codes do that before training).
    * ``hidden_size`` (20), ``p`` (10): layer-1 width and the preprocessing constant (the codes'
      variants of the preprocessing, a strict threshold in the Lua code and log(|x| + 1e-8) in the
      port, differ from Andrychowicz et al.'s by less than 1e-3 of a feature).
    * ``grad_divisor``: the gradient is divided by this before it is used (preprocessing and the
      update). Both public codes divide the learner's gradient by the batch size although the loss is
      already a batch mean (a "double division"); set ``grad_divisor`` to the inner batch size to
      reproduce that (:class:`MetaLSTMConfig` ``double_division``). Default 1: the plain gradient.

    Meta-parameter count: layer 1 4·80 + 20·80 + 2·80 = 2080 (both PyTorch bias vectors), the cell
    2·(22 + 1) = 46, plus ``n_params`` when c₀ is learned.
    """

    name = "metalstm"
    meta_defaults = MetaDefaults(meta_loss="outer", lr=1e-3, random_scale=0.0)
    coordinatewise = True
    separable = True  # network() treats rows independently (the loss is already a column of feats)
    needs_loss = True
    needs_params = True

    def __init__(self, *, n_params: int = 0, learn_init: bool = True, preset: str = "official",
                 hidden_size: int = 20, p: float = 10.0, grad_divisor: float = 1.0):
        if not (isinstance(n_params, int) and not isinstance(n_params, bool) and n_params >= 0):
            raise ValueError(f"n_params must be an integer >= 0, got {n_params!r}")
        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {list(PRESETS)}, got {preset!r}")
        if not (isinstance(hidden_size, int) and hidden_size >= 1):
            raise ValueError(f"hidden_size must be an integer >= 1, got {hidden_size!r}")
        if not (isinstance(p, (int, float)) and math.isfinite(p) and p > 0):
            raise ValueError(f"p must be a finite number > 0, got {p!r}")
        if not (isinstance(grad_divisor, (int, float)) and math.isfinite(grad_divisor) and grad_divisor > 0):
            raise ValueError(f"grad_divisor must be a finite number > 0, got {grad_divisor!r}")
        super().__init__(n_params=n_params, learn_init=learn_init, preset=preset, hidden_size=hidden_size,
                         p=p, grad_divisor=grad_divisor)
        H = hidden_size
        self.hidden_size = H
        self.lstm = CoordLSTM(4, H, num_layers=1)            # layer 1
        self.weight_f = nn.Parameter(torch.empty(H + 2, 1))  # W_F over [h, θ_{t-1}, f_{t-1}]
        self.weight_i = nn.Parameter(torch.empty(H + 2, 1))  # W_I over [h, θ_{t-1}, i_{t-1}]
        self.bias_f = nn.Parameter(torch.empty(1))
        self.bias_i = nn.Parameter(torch.empty(1))
        c0 = torch.empty(n_params)
        if n_params and learn_init:
            self.c0 = nn.Parameter(c0)
        elif n_params:
            self.register_buffer("c0", c0)
        else:
            self.c0 = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Draw the meta-parameters as the ``preset`` says (class docstring), from torch's global
        generator (as ``nn`` modules do)."""
        with torch.no_grad():
            if self._config["preset"] == "official":
                cell = self.lstm.cells[0]
                for w in (cell.weight_ih, cell.weight_hh, cell.bias_ih):
                    w.uniform_(-0.01, 0.01)
                cell.bias_hh.zero_()
                self.bias_f.uniform_(4.0, 5.0)
            else:  # markdtw: layer 1 as nn.LSTMCell initialised it
                self.bias_f.uniform_(4.0, 6.0)
            self.weight_f.uniform_(-0.01, 0.01)
            self.weight_i.uniform_(-0.01, 0.01)
            self.bias_i.uniform_(-5.0, -4.0)
            if self.c0 is not None:
                self.c0.uniform_(-0.01, 0.01)

    # ------------------------------------------------------------------ learned initialisation
    @property
    def n_params(self) -> int:
        return self._config["n_params"]

    def initial_params(self, params: torch.Tensor) -> torch.Tensor:
        """c₀, the learner's learned initial parameters (Ravi & Larochelle Algorithm 1, θ₀ ← c₀: the
        meta-learner's cell state starts at them), or ``params`` itself when ``n_params`` is 0. Differentiable: the meta-gradient reaches c₀
        through the unrolled inner loop."""
        if self.c0 is None:
            return params
        if params.numel() != self.n_params:
            raise ValueError(f"params has {params.numel()} coordinates but this MetaLSTM's learned "
                             f"initialisation c0 has n_params={self.n_params}; build it with "
                             f"n_params={params.numel()} for this learner")
        return self.c0.to(device=params.device, dtype=params.dtype)

    def set_initial_params(self, flat: torch.Tensor) -> None:
        """Copy a learner initialisation (flat, shape (n_params,)) into c₀ (not differentiable)."""
        if self.c0 is None:
            raise ValueError("set_initial_params: this MetaLSTM has no learned initialisation (n_params=0)")
        flat = torch.as_tensor(flat).reshape(-1)
        if flat.numel() != self.n_params:
            raise ValueError(f"set_initial_params: flat has {flat.numel()} values, n_params is {self.n_params}")
        with torch.no_grad():
            self.c0.copy_(flat)

    # ------------------------------------------------------------------ the contract
    def init_state(self, n, *, device=None, dtype=None) -> OptState:
        """Hidden state (h (n, H), c (n, H) of layer 1, f_{t−1} (n,), i_{t−1} (n,)), all zero, as
        both codes start every episode."""
        h, c = self.lstm.init_hidden(n, device, dtype)
        z = torch.zeros(n, device=device, dtype=dtype)
        return OptState(0, (), (h, c, z, z.clone()))

    def features(self, grads, state, *, params=None, loss=None):
        """The input state s_t, shape (n, 6): the preprocessed loss (2 columns, the same in every
        row), the preprocessed gradient (2), the current parameter θ_{t−1} and the raw gradient ∇_t
        (both divided by ``grad_divisor`` where a gradient is meant).

        This is what the smoothness regularizer perturbs. The issue asks for the preprocessed
        [loss, gradient] (layer 1's input, Ravi & Larochelle §3.2) plus the parameter; the
        smoothness paper's appendix B describes Meta-LSTM's state as DMOptimizer's (preprocessed
        gradient and parameter) "with an extra feature, the original gradient". Both enter the
        cell's update, so both are included (our documented choice)."""
        if params is None:
            raise ValueError("MetaLSTM.features needs params= (the learner's current parameters, its "
                             "cell state), got None")
        if loss is None:
            raise ValueError("MetaLSTM.features needs loss= (the learner's minibatch loss, layer 1's "
                             "input), got None")
        g = grads.reshape(-1)
        div = self._config["grad_divisor"]
        if div != 1:
            g = g / div
        n = g.shape[0]
        params = params.reshape(-1)
        if params.shape[0] != n:
            raise ValueError(f"params must have {n} coordinates (one per gradient entry), got {params.shape[0]}")
        p = self._config["p"]
        loss = torch.as_tensor(loss, dtype=g.dtype, device=g.device).reshape(1)
        loss_pre = log_sign_preprocess(loss, p).expand(n, 2)
        grad_pre = log_sign_preprocess(g, p)
        return torch.cat((loss_pre, grad_pre, params.to(g.dtype).unsqueeze(1), g.unsqueeze(1)), dim=1), ()

    def _cell_weights(self):
        """(W_h (H, 2), w_param (2,), w_prev (2,), b (2,)): columns (forget, input)."""
        H = self.hidden_size
        w = torch.cat((self.weight_f, self.weight_i), dim=1)
        return w[:H], w[H], w[H + 1], torch.cat((self.bias_f, self.bias_i))

    def network(self, feats, hidden):
        """u = θ_t − θ_{t−1} with θ_t = σ(f_t)⊙θ_{t−1} − σ(i_t)⊙∇_t (eq. 2), and the new hidden
        state (h, c, f_t, i_t). ``feats``: (n, 6) from :meth:`features`. Without autograd (the
        meta-test inner loop) a path with fewer temporaries computes the same numbers."""
        h, c, f_prev, i_prev = hidden
        x, params, grad = feats[:, :4], feats[:, 4], feats[:, 5]
        needs_graph = torch.is_grad_enabled() and (
            feats.requires_grad or any(t.requires_grad for t in hidden)
            or any(p.requires_grad for p in self.parameters()))
        if not needs_graph:
            with torch.no_grad():
                return self._network_no_grad(x, params, grad, h, c, f_prev, i_prev)
        h1, (h1, c1) = self.lstm(x, (h, c))
        w_h, w_param, w_prev, b = self._cell_weights()
        gates = torch.addmm(b, h1, w_h) + params.unsqueeze(1) * w_param \
            + torch.stack((f_prev, i_prev), dim=1) * w_prev
        f, i = gates[:, 0], gates[:, 1]
        new = torch.sigmoid(f) * params - torch.sigmoid(i) * grad
        return new - params, (h1, c1, f, i)

    def _network_no_grad(self, x, params, grad, h, c, f_prev, i_prev):
        h1, (h1, c1) = self.lstm(x, (h, c))   # CoordLSTM's chunked in-place kernel without autograd
        w_h, w_param, w_prev, b = self._cell_weights()
        gates = torch.addmm(b, h1, w_h)
        gates.addcmul_(params.unsqueeze(1), w_param)
        gates[:, 0].add_(f_prev * w_prev[0])
        gates[:, 1].add_(i_prev * w_prev[1])
        f, i = gates[:, 0].clone(), gates[:, 1].clone()
        s = gates.sigmoid_()
        upd = s[:, 0] * params
        upd.addcmul_(s[:, 1], grad, value=-1.0).sub_(params)
        return upd, (h1, c1, f, i)


# ============================================================================ the protocol


@dataclass(frozen=True)
class MetaLSTMConfig:
    """One Meta-LSTM setting: learner, inner loop, meta-training and evaluation protocol.

    ``preset``: the meta-learner initialisation (:class:`MetaLSTM`) and the code the protocol comes
    from. ``ways``/``shots``/``queries``: N-way K-shot episodes with Q queries per class.
    ``inner_steps``: learner updates per episode (T; the official code's "epochs" over the support
    set). ``inner_batch_size``: support examples per update; None is the whole support set, which is
    what both codes use in 5-way episodes (batch 25 in 5-shot, 5 in 1-shot). ``bn_momentum``:
    the learner's BatchNorm momentum (Torch7 and PyTorch share the convention). ``bn_mode``: how the
    query is normalised during meta-training (``"transductive"``: its own batch statistics, both
    codes); ``eval_bn_mode``: at meta-validation and meta-test (``"running"``: the statistics the
    inner loop accumulated, both codes). ``filters``: Conv-4 width. ``meta_lr``, ``meta_clip_norm``:
    Adam's rate and the meta-gradient-norm clip. ``first_order``: learner gradients are constants
    (the paper's simplification). ``double_division``: divide the gradient by the inner batch size (module docstring of
    :class:`MetaLSTM`; both codes do it; off by default). ``learn_init``: c₀ is learned.
    ``init_seed``: the learner initialisation c₀ starts from (and the fine-tuning baseline uses).
    ``episodes``: the papers' meta-training budget; ``val_episodes``/``val_every``: validation
    episodes and their period; ``test_episodes``: meta-test episodes (mean ± 1.96·std/√n).

    Data augmentation (the markdtw port trains with RandomResizedCrop, flips, colour jitter and
    ImageNet normalisation on miniImageNet) is the episode sampler's ``transform``, not part of this
    configuration.
    """

    preset: str = "official"
    ways: int = 5
    shots: int = 5
    queries: int = 15
    inner_steps: int = 8
    inner_batch_size: int | None = None
    bn_momentum: float = 0.95
    bn_mode: str = "transductive"
    eval_bn_mode: str = "running"
    filters: int = 32
    meta_lr: float = 1e-3
    meta_clip_norm: float | None = 0.25
    first_order: bool = True
    double_division: bool = False
    learn_init: bool = True
    init_seed: int = 0
    episodes: int = 50_000
    val_episodes: int = 100
    val_every: int = 1000
    test_episodes: int = 600

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {list(PRESETS)}, got {self.preset!r}")
        for k in ("ways", "shots", "queries", "inner_steps", "filters", "episodes", "val_episodes",
                  "val_every", "test_episodes"):
            v = getattr(self, k)
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
                raise ValueError(f"{k} must be an integer >= 1, got {v!r}")
        for k in ("first_order", "double_division", "learn_init"):
            if not isinstance(getattr(self, k), bool):
                raise ValueError(f"{k} must be True or False, got {getattr(self, k)!r}")
        if not (isinstance(self.init_seed, int) and self.init_seed >= 0):
            raise ValueError(f"init_seed must be an integer >= 0, got {self.init_seed!r}")
        if self.inner_batch_size is not None and not (isinstance(self.inner_batch_size, int)
                                                      and 1 <= self.inner_batch_size <= self.ways * self.shots):
            raise ValueError(f"inner_batch_size must be None (the whole support set) or an integer in "
                             f"1..{self.ways * self.shots} (ways*shots), got {self.inner_batch_size!r}")
        if not (isinstance(self.bn_momentum, (int, float)) and 0 < self.bn_momentum <= 1):
            raise ValueError(f"bn_momentum must be in (0, 1], got {self.bn_momentum!r}")
        for k in ("bn_mode", "eval_bn_mode"):
            if getattr(self, k) not in BN_MODES:
                raise ValueError(f"{k} must be one of {list(BN_MODES)}, got {getattr(self, k)!r}")
        if not (isinstance(self.meta_lr, (int, float)) and math.isfinite(self.meta_lr) and self.meta_lr > 0):
            raise ValueError(f"meta_lr must be a finite number > 0, got {self.meta_lr!r}")
        c = self.meta_clip_norm
        if c is not None and not (isinstance(c, (int, float)) and math.isfinite(c) and c > 0):
            raise ValueError(f"meta_clip_norm must be a finite number > 0 or None, got {c!r}")

    @property
    def batch_size(self) -> int:
        """Support examples per inner update."""
        return self.ways * self.shots if self.inner_batch_size is None else self.inner_batch_size

    def replace(self, **changes) -> "MetaLSTMConfig":
        """A copy with ``changes`` (unknown field names raise ``TypeError``)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)


def preset_config(name: str, shots: int, **overrides) -> MetaLSTMConfig:
    """The protocol of a public code for 5-way ``shots``-shot episodes (``overrides`` change fields).

    * ``"official"`` (twitter/meta-learning-lstm, config/lstm/train-imagenet-{1,5}shot.lua): 5-shot:
      8 inner updates of batch 25, BN momentum 0.95, 50,000 episodes; 1-shot: **12** inner updates of
      batch 5, BN momentum 0.9, 75,000 episodes. Both: 15 queries per class, Adam 1e-3, meta-gradient
      norm clip 0.25, first-order, 100 validation episodes every 1,000, 600 test episodes.
    * ``"markdtw"`` (markdtw/meta-learning-lstm-pytorch, scripts/train_5s_5c.sh): the same 5-shot
      protocol (the port ships only a 5-shot configuration; it reports 57.8-58.1 % on
      miniImageNet), with its own initialisation (:class:`MetaLSTM`).
    """
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {list(PRESETS)}, got {name!r}")
    if name == "official" and shots not in (1, 5):
        raise ValueError(f"the official code ships 1-shot and 5-shot configurations, got shots={shots!r}")
    if name == "markdtw" and shots != 5:
        raise ValueError(f"the markdtw port ships only a 5-shot configuration, got shots={shots!r}; "
                         "use preset 'official' for 1-shot")
    if shots == 5:
        base = MetaLSTMConfig(preset=name, shots=5, inner_steps=8, bn_momentum=0.95, episodes=50_000)
    else:
        base = MetaLSTMConfig(preset=name, shots=1, inner_steps=12, bn_momentum=0.9, episodes=75_000)
    return base.replace(**overrides)


def learner_fn(cfg: MetaLSTMConfig, image_shape: Sequence[int]) -> Callable[[], nn.Module]:
    """The learner of ``cfg`` for images of shape (C, H, W): Conv-4 (Ravi & Larochelle §5.1) with
    ``cfg.filters`` filters, BatchNorm eps 1e-3 and momentum ``cfg.bn_momentum``, ``cfg.ways``
    outputs."""
    c, h, w = (int(s) for s in image_shape)
    if h != w:
        raise ValueError(f"Conv-4 expects square images, got image_shape {tuple(image_shape)}")
    return lambda: Conv4(in_channels=c, num_classes=cfg.ways, filters=cfg.filters, image_size=h,
                         bn_momentum=cfg.bn_momentum)


def _sampler(cfg: MetaLSTMConfig, split: FewShotSplit | EpisodeSampler) -> EpisodeSampler:
    if isinstance(split, EpisodeSampler):
        if (split.ways, split.shots, split.queries) != (cfg.ways, cfg.shots, cfg.queries):
            raise ValueError(f"the sampler draws {split.ways}-way {split.shots}-shot episodes with "
                             f"{split.queries} queries, cfg asks for {cfg.ways}-way {cfg.shots}-shot with "
                             f"{cfg.queries}")
        return split
    return EpisodeSampler(split, cfg.ways, cfg.shots, cfg.queries)


#: configuration fields that do not change what a meta-training step computes (a run may be resumed
#: with another budget or evaluation protocol)
_NOT_TRAINING = ("episodes", "val_episodes", "val_every", "test_episodes", "eval_bn_mode")


def episode_family(cfg: MetaLSTMConfig, sampler: EpisodeSampler, *, device="cpu") -> EpisodeFamily:
    """Meta-training episodes of ``sampler`` as a task family. Its ``name`` (part of a meta-training
    checkpoint's identity) carries a hash of everything that shapes the episodes, the learner and the
    meta-training step (not the budget or the evaluation protocol), so a checkpoint is never resumed
    on another setup."""
    sp = sampler.split
    training = {k: v for k, v in cfg.to_dict().items() if k not in _NOT_TRAINING}
    ident = {"cfg": training, "split": sp.name, "classes": sp.class_names, "counts": sp.counts(),
             "image_shape": list(sp.image_shape), "mean": sp.mean.flatten().tolist(),
             "std": sp.std.flatten().tolist(),
             "transform": None if sampler.transform is None else repr(sampler.transform)}
    name = (f"{sp.name} {cfg.ways}-way {cfg.shots}-shot {cfg.queries}q episodes "
            f"[{runs.config_hash(ident)}]")
    return EpisodeFamily(sampler, learner_fn(cfg, sp.image_shape), name=name,
                         inner_batch_size=cfg.inner_batch_size, bn_mode=cfg.bn_mode, device=device)


def build_metalstm(cfg: MetaLSTMConfig, template: EpisodeTask, seed: int = 0) -> MetaLSTM:
    """A fresh meta-learner for ``template``'s learner: initialised with the ``cfg.preset`` from
    ``seed`` (torch's global generator is left as it was), c₀ set to the learner's initialisation
    with ``cfg.init_seed`` (as both codes do)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        lopt = MetaLSTM(n_params=template.num_params, learn_init=cfg.learn_init, preset=cfg.preset,
                        grad_divisor=float(cfg.batch_size) if cfg.double_division else 1.0)
    lopt.set_initial_params(template.flatten(template.init_params(cfg.init_seed)))
    return lopt.to(template.device)


def meta_train(cfg: MetaLSTMConfig, splits: Mapping[str, FewShotSplit] | FewShotSplit | EpisodeSampler, *,
               smooth: SmoothnessConfig | None = None, episodes: int | None = None, seed: int = 0,
               checkpoint_path: str | os.PathLike | None = None, checkpoint_every: int = 50,
               resume: bool = False, progress: bool = True, log: Callable[[str], None] | None = None,
               callback: Callable[[int, dict], None] | None = None, lopt: MetaLSTM | None = None,
               attach: Mapping[str, object] | None = None, device="cpu", meta_batch: int = 1,
               autocast: str | None = None) -> MetaTrainer:
    """Meta-train a Meta-LSTM (Ravi & Larochelle 2017, Algorithm 1; with ``smooth``, the smoothness
    paper's Algorithm 2) on the training split of ``splits`` (a dict with ``"train"``, a split, or
    an episode sampler) for ``episodes`` meta-steps (default ``cfg.episodes``), one episode each.

    ``seed`` seeds the meta-learner's initialisation and the trainer (episodes, PGD noise).
    ``lopt``: continue from this meta-learner instead of a fresh one. ``callback(meta_step,
    record)`` runs after every meta-step: periodic validation with best-on-validation selection is
    :class:`BestOnValidation`; ``attach`` ({name: object with state_dict/load_state_dict}, e.g. that
    selector) is kept in the trainer's checkpoints (:meth:`l2l_zoo.meta.MetaTrainer.attach`). With ``checkpoint_path`` the trainer checkpoints every
    ``checkpoint_every`` meta-steps and ``resume=True`` continues a killed run bit-for-bit
    (:class:`l2l_zoo.meta.MetaTrainer`). Returns the trainer: ``.lopt`` is the trained meta-learner,
    ``.history`` the per-meta-step records (``outer_loss`` is the query loss).

    ``meta_batch``: episodes per meta-step (both codes: 1); the meta-gradient is the mean of theirs
    (the episodes run one after another: the learner's BatchNorm rules out vmap). Under
    ``torch.distributed`` (``torchrun``) the episodes of a meta-step are shared out over the
    processes (``meta_batch`` a multiple of the world size), meta-gradients all-reduced; only rank 0
    writes checkpoints (:class:`l2l_zoo.meta.MetaTrainer`). ``autocast="bfloat16"``: the learner's
    forward passes under ``torch.autocast`` (:class:`l2l_zoo.meta.MetaTrainConfig`)."""
    if isinstance(splits, Mapping):
        if "train" not in splits:
            raise ValueError(f"splits must hold a 'train' split, got keys {sorted(splits)}")
        splits = splits["train"]
    sampler = _sampler(cfg, splits)
    family = episode_family(cfg, sampler, device=device)
    if lopt is None:
        lopt = build_metalstm(cfg, family.template, seed)
    elif not isinstance(lopt, MetaLSTM) or lopt.n_params not in (0, family.template.num_params):
        raise ValueError(f"lopt must be a MetaLSTM with n_params {family.template.num_params} (this learner) "
                         f"or 0, got {type(lopt).__name__} with n_params {getattr(lopt, 'n_params', None)!r}")
    mcfg = MetaTrainConfig(meta_steps=cfg.episodes if episodes is None else episodes,
                           horizon=cfg.inner_steps, unroll=cfg.inner_steps, meta_lr=cfg.meta_lr,
                           meta_loss="outer", second_order=not cfg.first_order,
                           meta_clip_norm=cfg.meta_clip_norm, checkpoint_every=checkpoint_every, seed=seed,
                           smooth=smooth, meta_batch=meta_batch, autocast=autocast)
    trainer = MetaTrainer(lopt, family, mcfg, checkpoint_path=checkpoint_path, log=log)
    for name, obj in (attach or {}).items():
        trainer.attach(name, obj)
    trainer.train(resume=resume, progress=progress, callback=callback)
    return trainer


def _episodes(sampler: EpisodeSampler, episodes: int | Sequence[Episode], seed: int):
    if isinstance(episodes, int) and not isinstance(episodes, bool):
        if episodes < 1:
            raise ValueError(f"episodes must be >= 1 (a number of episodes) or a list of episodes, got {episodes!r}")
        return (sampler.episode(seed, i) for i in range(episodes))
    return iter(episodes)


def evaluate(lopt: LearnedOptimizer, cfg: MetaLSTMConfig, sampler: EpisodeSampler | FewShotSplit,
             episodes: int | Sequence[Episode], seed: int, *, device="cpu", progress: bool = False,
             autocast: str | None = None) -> list[float]:
    """Meta-test: for each episode (``episodes`` of ``seed``, i.e. ``sampler.episode(seed, i)`` for
    i < episodes, or a given list), adapt the learner on the support set with ``cfg.inner_steps``
    updates of ``lopt`` from its initialisation (:func:`l2l_zoo.meta.adapt`; c₀, or the learner's
    ``cfg.init_seed`` initialisation for an optimizer without one), then classify the query set
    with ``cfg.eval_bn_mode`` BatchNorm statistics. Returns the per-episode query accuracies
    (fractions in [0, 1]; :func:`fewshot.data.mean_ci` gives the mean and 95 % half-width).
    ``autocast="bfloat16"``: the inner loop's forward passes in bfloat16 (the query in float32).
    Neither ``lopt`` nor torch's global random state is changed."""
    from tqdm.auto import tqdm

    sampler = _sampler(cfg, sampler)
    model_fn = learner_fn(cfg, sampler.split.image_shape)
    accs = []
    total = episodes if isinstance(episodes, int) else len(episodes)
    with torch.random.fork_rng(devices=[]):
        for k, ep in enumerate(tqdm(_episodes(sampler, episodes, seed), total=total, disable=not progress,
                                    desc="meta-test", leave=False)):
            task = EpisodeTask(ep, model_fn, inner_batch_size=cfg.inner_batch_size, bn_mode=cfg.eval_bn_mode,
                               device=device)
            params, _ = adapt(lopt, task, cfg.inner_steps, gen=torch.Generator().manual_seed(k),
                              init_seed=cfg.init_seed, autocast=autocast)
            accs.append(task.query_accuracy(params)[1])
    return accs


class BestOnValidation:
    """A :func:`meta_train` callback: every ``every`` meta-steps, :func:`evaluate` the meta-learner on
    the fixed validation episodes ``0..episodes-1`` of ``seed`` from ``sampler`` and keep a copy of
    the meta-parameters that scored best (both codes validate on 100 episodes every 1,000 meta-steps;
    the markdtw port reports the best validation accuracy).

    ``curve``: [{"meta_step", "val_acc", "val_ci"}]; ``best``: the best entry; ``best_state``: its
    ``lopt.state_dict()``. ``state_dict()``/``load_state_dict()`` let a caller save this beside the
    trainer's checkpoint so that a resumed run keeps its selection."""

    def __init__(self, lopt: LearnedOptimizer, cfg: MetaLSTMConfig, sampler: EpisodeSampler | FewShotSplit, *,
                 episodes: int, seed: int, every: int, device="cpu", log: Callable[[str], None] | None = None,
                 autocast: str | None = None):
        if not (isinstance(every, int) and every >= 1):
            raise ValueError(f"every must be an integer >= 1, got {every!r}")
        self.lopt, self.cfg, self.sampler = lopt, cfg, _sampler(cfg, sampler)
        self.episodes, self.seed, self.every, self.device, self.log = episodes, seed, every, device, log
        self.autocast = autocast
        self.curve: list[dict] = []
        self.best: dict | None = None
        self.best_state: dict | None = None

    def validate(self, meta_step: int) -> dict:
        accs = evaluate(self.lopt, self.cfg, self.sampler, self.episodes, self.seed, device=self.device,
                        autocast=self.autocast)
        m, ci = mean_ci(accs)
        entry = {"meta_step": meta_step, "val_acc": m, "val_ci": ci}
        self.curve.append(entry)
        if self.best is None or m > self.best["val_acc"]:
            self.best = entry
            self.best_state = {k: v.detach().clone() for k, v in self.lopt.state_dict().items()}
        if self.log is not None:
            self.log(f"[metalstm] meta-step {meta_step}: validation accuracy {100 * m:.2f} ± {100 * ci:.2f} % "
                     f"(best {100 * self.best['val_acc']:.2f} % at {self.best['meta_step']})")
        return entry

    def __call__(self, meta_step: int, record: dict) -> None:
        if meta_step % self.every == 0:
            self.validate(meta_step)

    def state_dict(self) -> dict:
        return {"curve": copy.deepcopy(self.curve), "best": copy.deepcopy(self.best),
                "best_state": self.best_state}

    def load_state_dict(self, sd: dict) -> None:
        self.curve, self.best, self.best_state = list(sd["curve"]), sd["best"], sd["best_state"]
