"""MLR-SNet of Shu et al. (TPAMI 2022), "MLR-SNet: Transferable LR Schedules for Heterogeneous
Tasks": a learned *learning-rate schedule*. An LSTM with a preprocessing MLP before its gates reads
the minibatch training loss and outputs one learning rate for the whole model (§3.2.1, eq. 8):

    (I, F, O, g)_t = (σ, σ, σ, tanh) W2 ReLU W1 (h_{t-1}, f_t)
    c_t = F ⊙ c_{t-1} + I ⊙ g,   h_t = O ⊙ tanh(c_t)
    p_t = σ(W3 h_t),             α_t = γ · p_t                                           (8)

Sizes follow the authors' released code and checkpoints (their public repository): the preprocessing
is two separate MLPs, ``fc_i2h = Linear(1→25)-ReLU-Linear(25→200)`` on the loss and
``fc_h2h = Linear(50→25)-ReLU-Linear(25→200)`` on h, their sum split into 4 gate chunks of 50, and
``layer3 = Linear(50→1)``: 11,776 meta-parameters.

γ = |√L0 · ln(L0·C) / C^¼| / 4 (§3.2.1 below eq. 8; the absolute value is the authors' meta-test
code), with L0 the mean training loss and C the number of classes; for language models L0 is the
training perplexity and C the vocabulary size, and the network input is loss / ln(vocabulary size)
(§4.1.2, "MLR-SNet Architecture").

**Gate layouts.** The authors' two code paths order the gate chunks differently: their meta-train
code uses (i, f, o, g̃) with a forget-gate bias of −1 (σ(f − 1)), their meta-test code (i, f, g̃, o)
without it, and the meta-test code loads meta-train checkpoints. The released checkpoints were used
with the meta-test layout for the published transfer results. Both are offered (``layout``):
``"meta-train"`` is the constructor default (what a new net is trained with),
``from_official_checkpoint`` defaults to ``"meta-test"``.

**As a LearnedOptimizer.** ``features`` returns the (1, 1) loss input (and the base optimizer's
buffers as statistics); ``network(feats, hidden)`` returns the learning rate α_t, shape (1,), so the
smoothness regularizer perturbs the loss input and compares rates without any MLR-SNet code.
``update`` is overridden: it returns −α_t · d_t, with d_t the direction of the base optimizer chosen
by ``base`` (eq. 7 for SGD; SGD with momentum and Adam as in §5.5, "the base optimizer's direction,
MLR-SNet's rate"). The hidden state is ``(h, c, γ)``: γ travels with the state because Algorithm 2
recomputes it whenever the schedule network is switched.

This module holds the network only. The Algorithm 2 controller over any ``torch.optim`` optimizer
is :class:`l2l_zoo.schedules.mlrsnet.MLRSNetController` (beside the HD/MARTHE controllers); the
Algorithm 1 online meta-trainer is :class:`l2l_zoo.meta.mlrsnet.MLRSNetMetaTrainer`.
"""
from __future__ import annotations

import math
import os

import torch
from torch import nn

from ..base import LearnedOptimizer, MetaDefaults, OptState, Step

__all__ = ["MLRSNet", "mlrsnet_gamma", "LAYOUTS", "BASES", "OBJECTIVES"]

# chunk index of (input, forget, candidate, output) gates in the 4·H pre-activation, forget bias
LAYOUTS = {"meta-train": ((0, 1, 3, 2), -1.0), "meta-test": ((0, 1, 2, 3), 0.0)}
BASES = ("sgd", "adam")
OBJECTIVES = ("classification", "language_model")
INITS = ("pytorch", "official")

_OFFICIAL_KEYS = ("layer1.fc_i2h.0.weight", "layer1.fc_i2h.0.bias", "layer1.fc_i2h.2.weight",
                  "layer1.fc_i2h.2.bias", "layer1.fc_h2h.0.weight", "layer1.fc_h2h.0.bias",
                  "layer1.fc_h2h.2.weight", "layer1.fc_h2h.2.bias", "layer3.weight", "layer3.bias")


def mlrsnet_gamma(L0: float, num_classes: int) -> float:
    """γ = |√L0 · ln(L0·C) / C^¼| / 4 (§3.2.1 below eq. 8), the upper bound of the learning rate.

    ``L0``: mean training loss (language models: training perplexity), > 0; ``num_classes``: C
    (language models: vocabulary size), >= 2.
    """
    L0 = float(L0)
    if not (math.isfinite(L0) and L0 > 0):
        raise ValueError(f"gamma: L0 must be a finite loss > 0, got {L0!r}")
    if int(num_classes) != num_classes or num_classes < 2:
        raise ValueError(f"gamma: num_classes must be an integer >= 2, got {num_classes!r}")
    C = float(num_classes)
    return abs(math.sqrt(L0) * math.log(L0 * C) / C ** 0.25) / 4.0


class _Cell(nn.Module):
    """Holds the two preprocessing MLPs under the official names (``layer1.fc_i2h``/``fc_h2h``)."""

    def __init__(self, num_inputs: int, hidden_size: int, mlp_size: int):
        super().__init__()
        self.fc_i2h = nn.Sequential(nn.Linear(num_inputs, mlp_size), nn.ReLU(),
                                    nn.Linear(mlp_size, 4 * hidden_size))
        self.fc_h2h = nn.Sequential(nn.Linear(hidden_size, mlp_size), nn.ReLU(),
                                    nn.Linear(mlp_size, 4 * hidden_size))


class MLRSNet(LearnedOptimizer):
    """Options:

    * ``hidden_size`` (d' = 50, §4.1.1) and ``mlp_size`` (25, the released checkpoints);
    * ``layout``: ``"meta-train"`` or ``"meta-test"`` gate order (module docstring);
    * ``base``: ``"sgd"`` (with torch.optim.SGD's ``momentum``, ``dampening``, ``nesterov``) or
      ``"adam"`` (``betas``, ``eps``); ``weight_decay`` is added to the gradient (L2) in both, as in
      torch.optim. These only matter for :meth:`update` (the adapter path); a controller or the
      meta-trainer takes the direction from the real ``torch.optim`` optimizer;
    * ``objective``: ``"classification"`` (input: the loss) or ``"language_model"`` (input:
      loss / ln C; γ from the perplexity); ``num_classes``: C (required for language models);
    * ``gamma``: fixed γ for :meth:`init_state`; None: computed from the first loss seen (needs
      ``num_classes``), see :meth:`update`;
    * ``init``: ``"pytorch"`` (the paper, §4.1.1: PyTorch's default initialisation) or
      ``"official"`` (the authors' meta-train code: weights U(−0.1, 0.1), biases PyTorch's default).
    """

    name = "mlrsnet"
    meta_defaults = MetaDefaults(meta_loss="last", lr=1e-3, random_scale=0.0)  # Adam 1e-3 (§4.1.1)
    coordinatewise = False
    vmappable = False  # step 0 computes γ from float(loss): data-dependent control flow
    needs_loss = True

    def __init__(self, *, hidden_size: int = 50, mlp_size: int = 25, layout: str = "meta-train",
                 base: str = "sgd", momentum: float = 0.0, dampening: float = 0.0, nesterov: bool = False,
                 betas: tuple = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 objective: str = "classification", num_classes: int | None = None,
                 gamma: float | None = None, init: str = "pytorch"):
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {sorted(LAYOUTS)}, got {layout!r}")
        if base not in BASES:
            raise ValueError(f"base must be one of {BASES}, got {base!r}")
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        for k, v in (("hidden_size", hidden_size), ("mlp_size", mlp_size)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{k} must be an integer >= 1, got {v!r}")
        for k, v in (("momentum", momentum), ("dampening", dampening), ("weight_decay", weight_decay)):
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{k} must be >= 0, got {v!r}")
        betas = tuple(float(b) for b in betas)
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps!r}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError(f"nesterov needs momentum > 0 and dampening = 0, got momentum={momentum!r}, "
                             f"dampening={dampening!r}")
        if num_classes is not None and (int(num_classes) != num_classes or num_classes < 2):
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        if objective == "language_model" and num_classes is None:
            raise ValueError("objective='language_model' needs num_classes (the vocabulary size) for "
                             "the loss / ln(C) input")
        if gamma is not None and not (math.isfinite(gamma) and gamma > 0):
            raise ValueError(f"gamma must be a finite number > 0 or None, got {gamma!r}")
        super().__init__(hidden_size=hidden_size, mlp_size=mlp_size, layout=layout, base=base,
                         momentum=float(momentum), dampening=float(dampening), nesterov=bool(nesterov),
                         betas=betas, eps=float(eps), weight_decay=float(weight_decay),
                         objective=objective, num_classes=None if num_classes is None else int(num_classes),
                         gamma=None if gamma is None else float(gamma), init=init)
        self.layer1 = _Cell(1, hidden_size, mlp_size)
        self.layer3 = nn.Linear(hidden_size, 1)
        if init == "official":
            with torch.no_grad():
                for m in (*self.layer1.fc_i2h, *self.layer1.fc_h2h):
                    if isinstance(m, nn.Linear):
                        m.weight.uniform_(-0.1, 0.1)
        self._gate_idx, self._forget_bias = LAYOUTS[layout]
        # The base optimizer's direction d_t is the library's one (torch.optim's SGD / Adam formulas,
        # tested against them in the schedules). Imported here, not at the top: the controller in
        # l2l_zoo.schedules.mlrsnet imports this module, so once the schedules package exports it a
        # top-level import would be circular (l2l_zoo -> optimizers -> schedules -> optimizers).
        from ..schedules.core import AdamDynamics, SGDDynamics
        self._dynamics = (AdamDynamics(betas=betas, eps=float(eps), weight_decay=float(weight_decay))
                          if base == "adam" else
                          SGDDynamics(momentum=float(momentum), dampening=float(dampening),
                                      nesterov=bool(nesterov), weight_decay=float(weight_decay)))
        # The adapter concatenates the parameters every step only when weight decay needs them.
        self.needs_params = weight_decay != 0

    # ------------------------------------------------------------------ checkpoints of the authors
    @classmethod
    def from_official_checkpoint(cls, path: str | os.PathLike, layout: str = "meta-test",
                                 **options) -> "MLRSNet":
        """Load one of the authors' released state dicts (``mlr_snet {1,100,200}.pth``: keys
        ``layer1.fc_i2h.{0,2}``, ``layer1.fc_h2h.{0,2}``, ``layer3``), read with
        ``weights_only=True``. Sizes are taken from the tensors; ``options`` are the other
        constructor options (e.g. ``objective``, ``num_classes``)."""
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {sorted(LAYOUTS)}, got {layout!r}")
        sd = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(sd, dict):
            raise ValueError(f"{os.fspath(path)!r}: expected a state dict, got {type(sd).__name__}")
        missing = [k for k in _OFFICIAL_KEYS if k not in sd]
        extra = sorted(set(sd) - set(_OFFICIAL_KEYS))
        if missing or extra:
            raise ValueError(f"{os.fspath(path)!r} is not a one-layer MLR-SNet checkpoint: missing keys "
                             f"{missing}, unexpected keys {extra}")
        mlp_size, num_inputs = sd["layer1.fc_i2h.0.weight"].shape
        hidden_size = sd["layer3.weight"].shape[1]
        if num_inputs != 1:
            raise ValueError(f"{os.fspath(path)!r}: the network input must be the scalar loss, got "
                             f"{num_inputs} inputs")
        for k in ("hidden_size", "mlp_size", "layout"):
            options.pop(k, None)
        net = cls(hidden_size=int(hidden_size), mlp_size=int(mlp_size), layout=layout, **options)
        net.load_state_dict({k: v.float() for k, v in sd.items()})
        return net

    # ------------------------------------------------------------------ γ and the input
    def gamma_for(self, loss: float) -> float:
        """γ for a mean training loss (language models: of the perplexity exp(loss))."""
        C = self._config["num_classes"]
        if C is None:
            raise ValueError("MLR-SNet: computing gamma needs num_classes (pass num_classes= or gamma=)")
        loss = float(loss)
        return mlrsnet_gamma(math.exp(loss) if self._config["objective"] == "language_model" else loss, C)

    def loss_input(self, loss: torch.Tensor | float) -> torch.Tensor:
        """The network input x_t of shape (1, 1): the minibatch loss f_t (eq. 7), divided by
        ln(vocabulary size) for language models (§4.1.2). Detached, in the network's dtype."""
        if loss is None:
            raise ValueError("MLR-SNet needs the minibatch loss: pass loss= (the adapter does it from "
                             "step(closure) or step(loss=...))")
        w = self.layer3.weight
        x = torch.as_tensor(loss, dtype=w.dtype, device=w.device).detach().reshape(1, 1)
        if self._config["objective"] == "language_model":
            x = x / math.log(self._config["num_classes"])
        return x

    # ------------------------------------------------------------------ the contract
    def init_hidden(self, *, device=None, gamma: float | None = None) -> tuple:
        """``(h, c, γ)``: zeros of shape (1, H) and γ of shape (1,) (NaN when not known yet), in the
        network's dtype."""
        w = self.layer3.weight
        device = w.device if device is None else device
        g = gamma if gamma is not None else self._config["gamma"]
        H = self._config["hidden_size"]
        z = torch.zeros(1, H, device=device, dtype=w.dtype)
        return z, z.clone(), torch.full((1,), math.nan if g is None else float(g), device=device, dtype=w.dtype)

    def init_state(self, n, *, device=None, dtype=None, gamma: float | None = None) -> OptState:
        """Fresh state for ``n`` coordinates: base-optimizer buffers of shape (n,) as ``stats``
        (SGD with momentum: (buf,); Adam: (m, v); SGD: ()) and ``(h, c, γ)`` as ``hidden``."""
        c = self._config
        if c["base"] == "adam":
            z = torch.zeros(n, device=device, dtype=dtype)
            stats = (z, z.clone())
        elif c["momentum"] != 0:
            stats = (torch.zeros(n, device=device, dtype=dtype),)
        else:
            stats = ()
        return OptState(0, stats, self.init_hidden(device=device, gamma=gamma))

    def base_direction(self, grads: torch.Tensor, state: OptState, *, params: torch.Tensor | None = None):
        """Direction d_t of shape (n,) of the base optimizer (the step is −α_t·d_t) and its new
        buffers (the layout of :meth:`init_state`): ``SGDDynamics`` / ``AdamDynamics.direction`` of
        :mod:`l2l_zoo.schedules.core`, i.e. torch.optim.SGD / Adam with learning rate α_t."""
        if self._config["weight_decay"] != 0 and params is None:
            raise ValueError("MLR-SNet with weight_decay > 0 needs params=")
        return self._dynamics.direction(grads, params, state.stats, state.step)

    def features(self, grads, state, *, params=None, loss=None):
        """Input state (1, 1) (the loss, :meth:`loss_input`) and the base optimizer's new buffers."""
        _, stats = self.base_direction(grads, state, params=params)
        return self.loss_input(loss), stats

    def network(self, feats: torch.Tensor, hidden: tuple) -> tuple[torch.Tensor, tuple]:
        """Eq. (8): learning rate α_t = γ·σ(W3 h_t), shape (B,) for input ``feats`` of shape (B, 1)
        (B = 1 in use) and ``hidden = (h, c, γ)`` with h, c of shape (1 or B, H), γ of shape (1,)."""
        h, c, gamma = hidden
        pre = self.layer1.fc_i2h(feats) + self.layer1.fc_h2h(h)
        chunks = pre.chunk(4, dim=1)
        ii, fi, gi, oi = self._gate_idx
        c = torch.sigmoid(chunks[fi] + self._forget_bias) * c + torch.sigmoid(chunks[ii]) * torch.tanh(chunks[gi])
        h = torch.sigmoid(chunks[oi]) * torch.tanh(c)
        p = torch.sigmoid(self.layer3(h)).squeeze(1)
        return gamma * p, (h, c, gamma)

    def step(self, grads, state, *, params=None, loss=None, network=None) -> Step:
        """One step −α_t · d_t (eq. 7 / 13 with the base optimizer's direction), shape (n,).

        If γ is not known at step 0 (NaN in the state: no ``gamma`` given), it is computed from this
        first minibatch loss (:meth:`gamma_for`), as the authors compute it from the initial loss.
        """
        x = self.loss_input(loss)
        hidden = state.hidden
        if state.step == 0 and bool(torch.isnan(hidden[2]).any()):
            hidden = (*hidden[:2], torch.full_like(hidden[2], self.gamma_for(float(loss))))
        direction, stats = self.base_direction(grads, state, params=params)
        lr, new_hidden = (network or self.network)(x, hidden)
        return Step(-lr.to(direction.dtype) * direction, OptState(state.step + 1, stats, new_hidden), x, hidden)

    # ------------------------------------------------------------------ inspection
    def trace(self, losses, *, hidden: tuple | None = None) -> torch.Tensor:
        """Sigmoid outputs p_t (before γ) of shape (T,) for a sequence of network inputs ``losses``
        (shape (T,); already normalised for language models), the LSTM state carried from step to
        step as in the authors' meta-test code, starting from zeros (or ``hidden``)."""
        w = self.layer3.weight
        x = torch.as_tensor(losses, dtype=w.dtype).to(w.device).reshape(-1, 1)
        h, c = (self.init_hidden()[:2] if hidden is None else hidden[:2])
        one = torch.ones(1, device=w.device, dtype=w.dtype)
        out = []
        for t in range(x.shape[0]):
            p, (h, c, _) = self.network(x[t:t + 1], (h, c, one))
            out.append(p)
        return torch.cat(out) if out else x.new_zeros(0)


def __getattr__(name):
    # Kept for one release: MLRSNetController moved to l2l_zoo.schedules.mlrsnet (controllers are
    # filed with the other controllers). Resolved lazily because that module imports this one.
    if name == "MLRSNetController":
        from ..schedules.mlrsnet import MLRSNetController
        return MLRSNetController
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
