"""Online meta-training of MLR-SNet: Algorithm 1 of Shu et al. (TPAMI 2022), "MLR-SNet:
Transferable LR Schedules for Heterogeneous Tasks", §3.2.2 (1).

The model trains with its ``torch.optim`` base optimizer whose learning rate is set every step by
MLR-SNet (eq. 12). Every ``t_val`` steps (paper: 100; authors' code: 300), before the real step:

    ŵ_{t+1}(φ) = w_t − A(f_t, θ_t; φ) · d_t                                              (11)
    φ_{t+1}    = φ_t + Adam(∇_φ f^Val(D_t^(v); ŵ_{t+1}(φ)))   (lr 1e-3, weight decay 1e-4)  (10)

with D_t the step's own training minibatch, d_t the base optimizer's direction, θ_t = (h, c) the
LSTM state before the step, held fixed (it is detached every step, as in the authors' code) and
D_t^(v) one minibatch of held-out clean meta-data. The real step (eq. 12) then uses φ_{t+1} with the
same f_t and θ_t. Snapshots of φ are kept every ``snapshot_every`` steps (the paper: every epoch).

**The virtual step** (:func:`virtual_step_loss`) is functional, like the rest of the library: the
optimizer's parameters form one flat vector w_t, the model is evaluated at w_t and at ŵ_{t+1}(φ)
with ``torch.func.functional_call``, and d_t is ``dynamics_from_optimizer(optimizer).direction``
(:mod:`l2l_zoo.schedules.core`) with the real optimizer's current state (momentum buffer, Adam
moments and step count, weight decay). So ŵ_{t+1} is exactly the real step with rate A(·; φ)
(tested to 1e-10 in float64 for SGD, momentum, Nesterov and Adam), and neither the model, its
buffers (BatchNorm statistics) nor the optimizer are touched.

Choices where the sources are silent or disagree:

* The authors' code advances the LSTM state twice on meta-update steps (once for the virtual rate,
  once for the real one); by default both use θ_t, as eqs. (11)-(12) are written
  (``MLRSNetTrainConfig.lstm_state``: ``"paper"`` or ``"authors-code"``).
* ŵ depends on φ only through the rate, so ∇_φ f^Val = −(∇f^Val(ŵ) · d_t) ∇_φ A: the training
  gradient g_t is computed without a second-order graph (the authors' create-graph gradient adds
  nothing to ∇_φ).
* Gradient-norm clipping (language models: 0.25, §4.1.2) is applied to the real and the virtual step
  alike, over the optimizer's parameters, as ``torch.nn.utils.clip_grad_norm_`` does.
* BatchNorm running statistics: the virtual forward passes update copies (the authors ran them on a
  separate copy of the model); the model's own buffers are unchanged.

**Meta-testing (Algorithm 2)** is :class:`~l2l_zoo.schedules.mlrsnet.MLRSNetController` with k
saved nets chosen by :func:`select_snapshots` (⌈N·l/k⌉, §4.2.1), each used for a consecutive k-th of
training, γ recomputed from the current mean training loss at each switch.
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
from torch import nn

from ..optimizers.mlrsnet import MLRSNet
from ..schedules.core import dynamics_from_optimizer, read_state
from ..runs import _autocast
from .distributed import SYNC_CHECK_EVERY, all_mean, check_in_sync, dist_world, mean_over_processes
from .unroll import AUTOCAST_DTYPES
from .trainer import MetaTrainingDiverged

__all__ = ["MLRSNetTrainConfig", "MLRSNetMetaTrainer", "MetaUpdateFailed", "virtual_step_loss",
           "meta_gradient", "select_snapshots"]


class MetaUpdateFailed(MetaTrainingDiverged):
    """Raised after ``max_meta_failures`` consecutive non-finite meta-losses or meta-gradients
    (a :class:`~l2l_zoo.meta.MetaTrainingDiverged`: scripts report it as one line, exit status 4)."""


def _split(out) -> tuple[torch.Tensor, Any]:
    """``loss_fn`` returns the loss or ``(loss, aux)``."""
    return (out[0], out[1]) if isinstance(out, tuple) else (out, None)


def _optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for g in optimizer.param_groups for p in g["params"]]


def _clip_coefficient(grads: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """The factor ``torch.nn.utils.clip_grad_norm_`` multiplies the gradients ``grads`` by:
    min(1, max_norm / (‖(‖g_1‖, …, ‖g_k‖)‖ + 1e-6)), a 0-d tensor, from the same total norm."""
    get_total_norm = getattr(torch.nn.utils, "get_total_norm", None)  # torch >= 2.6
    if get_total_norm is not None:
        total = get_total_norm(grads)
    else:
        total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    return torch.clamp(float(max_norm) / (total + 1e-6), max=1.0)


class _LossOf(nn.Module):
    """``loss_fn(model, batch)`` as a module whose only child is ``model``, so that
    ``torch.func.functional_call`` swaps the model's parameters and buffers for the whole loss
    computation (the loss function may call the model several times or use its submodules)."""

    def __init__(self, model: nn.Module, loss_fn: Callable):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch):
        return _split(self.loss_fn(self.model, batch))[0]


# --------------------------------------------------------------------------- the virtual step

def virtual_step_loss(net: MLRSNet, hidden: tuple, x: torch.Tensor, gamma: float, model: nn.Module,
                      optimizer: torch.optim.Optimizer, train_batch, val_batch,
                      loss_fn: Callable, *, grad_clip: float | None = None, return_hidden: bool = False,
                      all_reduce: bool = False, autocast: str | None = None):
    """Validation loss f^Val(D^(v); ŵ_{t+1}(φ)) of the virtual step ŵ_{t+1} = w_t − A(f_t, θ_t; φ)·d_t
    (eq. 11), differentiable in φ = ``net``'s parameters. Returns ``(val_loss, lr)`` (scalar
    tensors), plus the network's next (h, c), detached, with ``return_hidden``.

    ``hidden``: (h, c) of shape (1, H), the LSTM state θ_t (detached); ``x``: the (1, 1) network
    input of this step's loss f_t; ``gamma``: γ; ``train_batch``: D_t; ``val_batch``: D^(v);
    ``loss_fn(model, batch)`` returns the mean loss (or ``(loss, aux)``). ``optimizer``: a
    ``torch.optim`` SGD, Adam or AdamW over (some of) ``model``'s parameters; d_t is its direction
    (:func:`~l2l_zoo.schedules.core.dynamics_from_optimizer`) from its current state, the gradient
    g_t of ``loss_fn(model, train_batch)`` clipped first when ``grad_clip`` is set. Parameters
    without a gradient stay where they are (torch.optim skips them). ``model`` (parameters and
    buffers) and ``optimizer`` are not modified; works under ``torch.no_grad()`` too.
    ``all_reduce``: under torch.distributed each process holds its share of D_t, and g_t is the mean
    of the processes' gradients (as DistributedDataParallel averages them), before clipping.
    ``autocast="bfloat16"``: both forward passes under ``torch.autocast`` (parameters, gradients,
    the rate and the meta-gradient stay in their own dtype).
    """
    params = _optimizer_params(optimizer)
    names = {id(p): n for n, p in model.named_parameters()}
    missing = [i for i, p in enumerate(params) if id(p) not in names]
    if missing:
        raise ValueError(f"optimizer parameters {missing} (in param-group order) are not parameters of model")
    keys = ["model." + names[id(p)] for p in params]
    dynamics = dynamics_from_optimizer(optimizer)
    state, k = read_state(optimizer, dynamics, params)
    loss_of = _LossOf(model, loss_fn)
    # Copies of the buffers: training-mode BatchNorm updates its running statistics in place, here
    # on these copies (both forward passes share them, as they would share the model's own).
    buffers = {"model." + n: b.detach().clone() for n, b in model.named_buffers()}
    with torch.enable_grad():
        leaves = [p.detach().requires_grad_(True) for p in params]
        with _autocast(model, autocast):
            train_loss = torch.func.functional_call(loss_of, {**buffers, **dict(zip(keys, leaves))}, (train_batch,))
        grads = torch.autograd.grad(train_loss, leaves, allow_unused=True)
        if all_reduce:
            all_mean([g for g in grads if g is not None])
        used = [g is not None for g in grads]
        if grad_clip is not None and any(used):
            coef = _clip_coefficient([g for g in grads if g is not None], grad_clip)
            grads = [None if g is None else g * coef for g in grads]
        w = torch.cat([p.reshape(-1) for p in leaves]).detach()
        g = torch.cat([(torch.zeros_like(p) if gr is None else gr).reshape(-1) for gr, p in zip(grads, leaves)])
        d, _ = dynamics.direction(g, w, state, k)
        if not all(used):  # torch.optim leaves a parameter without a gradient untouched
            d = d * torch.cat([torch.full((p.numel(),), float(u), dtype=d.dtype, device=d.device)
                               for u, p in zip(used, leaves)])
        h, c = (t.detach() for t in hidden)
        one = torch.full((1,), float(gamma), device=h.device, dtype=h.dtype)
        lr, (h1, c1, _) = net.network(x.detach(), (h, c, one))
        lr = lr.reshape(()).to(device=w.device, dtype=w.dtype)
        w_hat = w - lr * d.detach()
        views = [v.view_as(p) for v, p in zip(w_hat.split([p.numel() for p in leaves]), leaves)]
        with _autocast(model, autocast):
            val_loss = torch.func.functional_call(loss_of, {**buffers, **dict(zip(keys, views))}, (val_batch,))
        val_loss = val_loss.float() if val_loss.dtype in (torch.bfloat16, torch.float16) else val_loss
    return (val_loss, lr, (h1.detach(), c1.detach())) if return_hidden else (val_loss, lr)


def meta_gradient(net: MLRSNet, *args, **kwargs) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``(val_loss, [∂ val_loss / ∂φ_i])`` for :func:`virtual_step_loss` (same arguments; with
    ``return_hidden`` the virtual step's next (h, c) comes third). With ``all_reduce=True`` the
    validation loss and its gradient are the means over the processes (each its share of D^(v))."""
    val_loss, _, *rest = virtual_step_loss(net, *args, **kwargs)
    params = list(net.parameters())
    grads = torch.autograd.grad(val_loss, params, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
    if kwargs.get("all_reduce"):
        val_loss = val_loss.detach().clone()
        all_mean([val_loss, *grads])  # one all-reduce per dtype
    return (val_loss.detach(), grads, *rest)


# --------------------------------------------------------------------------- the trainer

@dataclass
class MLRSNetTrainConfig:
    """Algorithm 1 settings: ``t_val`` (T_val), ``meta_lr`` and ``meta_weight_decay`` of the Adam
    meta-optimizer (§4.1.1), ``grad_clip`` (max gradient norm of the base optimizer, None: off;
    PTB: 0.25, §4.1.2), ``snapshot_every`` (steps between saved copies of φ; 0: none),
    ``max_meta_failures`` (consecutive non-finite meta-updates before giving up) and
    ``lstm_state``: on meta-update steps the real rate uses θ_t (``"paper"``, eqs. 11-12) or the
    state the virtual rate already advanced (``"authors-code"``, their meta-train script).
    ``autocast``: ``"bfloat16"`` runs the model's forward passes (real and virtual) under
    ``torch.autocast``; None (default): none."""

    t_val: int = 100
    meta_lr: float = 1e-3
    meta_weight_decay: float = 1e-4
    grad_clip: float | None = None
    snapshot_every: int = 0
    max_meta_failures: int = 10
    lstm_state: str = "paper"
    autocast: str | None = None

    def __post_init__(self):
        if self.autocast is not None and self.autocast not in AUTOCAST_DTYPES:
            raise ValueError(f"autocast must be None or one of {sorted(AUTOCAST_DTYPES)}, got {self.autocast!r}")
        if not (isinstance(self.t_val, int) and self.t_val >= 1):
            raise ValueError(f"t_val must be an integer >= 1, got {self.t_val!r}")
        if not (math.isfinite(self.meta_lr) and self.meta_lr > 0):
            raise ValueError(f"meta_lr must be > 0, got {self.meta_lr!r}")
        if not (math.isfinite(self.meta_weight_decay) and self.meta_weight_decay >= 0):
            raise ValueError(f"meta_weight_decay must be >= 0, got {self.meta_weight_decay!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0 or None, got {self.grad_clip!r}")
        if self.lstm_state not in ("paper", "authors-code"):
            raise ValueError(f"lstm_state must be 'paper' or 'authors-code', got {self.lstm_state!r}")
        if self.snapshot_every < 0 or self.max_meta_failures < 1:
            raise ValueError(f"snapshot_every must be >= 0 and max_meta_failures >= 1, got "
                             f"{self.snapshot_every!r}, {self.max_meta_failures!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.autocast is None:  # absent at its default, so older records compare equal
            del d["autocast"]
        return d


class MLRSNetMetaTrainer:
    """Algorithm 1 around a ``model`` and its ``torch.optim`` base ``optimizer`` (SGD with or
    without momentum, Adam or AdamW, hyperparameters shared by all param groups; its ``lr`` is
    overwritten every step).

    ``loss_fn(model, batch)``: mean training/validation loss (or ``(loss, aux)``; ``aux`` of the real
    step, e.g. a language model's carried state, is returned by :meth:`step`). ``val_batch_fn()``:
    the next minibatch of meta-data. ``gamma``: γ (None: from ``train_loss_fn()``, the mean training
    loss, at the first step). ``log``: one-line messages (NaN reports).

    Under ``torch.distributed`` (e.g. ``torchrun``; gloo on CPU, NCCL on CUDA) the trainer is
    data-parallel as ``DistributedDataParallel`` would make it, done here by hand because the
    virtual step is functional: every process holds the same model, optimizer and MLR-SNet and
    passes its own share of each training and meta-data minibatch; the training loss that MLR-SNet
    reads, γ's mean training loss, the gradients of the real and the virtual step (before
    clipping), the validation loss and the meta-gradient are means over the processes, and the
    model's buffers (BatchNorm statistics) are broadcast from rank 0 after each step (DDP's
    ``broadcast_buffers``). With equal shares this equals one process on the union of the shares
    (``tests/test_distributed.py``, float64), and every process holds bit-identical parameters
    (checked every ``SYNC_CHECK_EVERY`` meta-updates); only the caller's rank 0 should write files.
    """

    def __init__(self, net: MLRSNet, model: nn.Module, optimizer: torch.optim.Optimizer, *,
                 loss_fn: Callable, val_batch_fn: Callable[[], Any],
                 config: MLRSNetTrainConfig | None = None, gamma: float | None = None,
                 train_loss_fn: Callable[[], float] | None = None, log: Callable[[str], None] = print):
        if gamma is None and train_loss_fn is None:
            raise ValueError("MLRSNetMetaTrainer needs gamma= or train_loss_fn= (γ from the mean "
                             "training loss, §3.2.1)")
        dynamics_from_optimizer(optimizer)  # the virtual step needs a supported optimizer: fail now
        self.cfg = config or MLRSNetTrainConfig()
        self.net, self.model, self.optimizer = net, model, optimizer
        self.params = _optimizer_params(optimizer)
        self.loss_fn, self.val_batch_fn, self.train_loss_fn = loss_fn, val_batch_fn, train_loss_fn
        self.log = log
        dev = next(model.parameters()).device
        self.net.to(dev)
        self.meta_opt = torch.optim.Adam(self.net.parameters(), lr=self.cfg.meta_lr,
                                         weight_decay=self.cfg.meta_weight_decay)
        self.gamma = gamma
        self.hidden = self.net.init_hidden(device=dev, gamma=1.0)[:2]
        self.t = 0
        self.snapshots: list[tuple[int, dict]] = []
        self.meta_history: list[dict] = []
        self.failures = 0
        self.total_failures = 0
        self.world, self.rank = dist_world()

    def _global(self, value: float) -> float:
        """The mean of ``value`` over the processes (itself in one process)."""
        return mean_over_processes(value, next(self.model.parameters()).device)

    def _meta_update(self, x, batch) -> float | None:
        """Eq. (10)-(11); returns the validation loss, or None when it was skipped (non-finite)."""
        val_loss, grads, advanced = meta_gradient(self.net, self.hidden, x, self.gamma, self.model,
                                                  self.optimizer, batch, self.val_batch_fn(), self.loss_fn,
                                                  grad_clip=self.cfg.grad_clip, return_hidden=True,
                                                  all_reduce=self.world > 1, autocast=self.cfg.autocast)
        if self.cfg.lstm_state == "authors-code":
            self.hidden = advanced
        ok = bool(torch.isfinite(val_loss)) and all(bool(torch.isfinite(g).all()) for g in grads)
        if not ok:
            self.failures += 1
            self.total_failures += 1
            if self.total_failures == 1 or self.failures >= self.cfg.max_meta_failures:
                self.log(f"[mlrsnet] non-finite meta-loss or meta-gradient at step {self.t} "
                         f"(validation loss {float(val_loss):.4g}): meta-update skipped "
                         f"({self.failures} consecutive, {self.total_failures} in total)")
            if self.failures >= self.cfg.max_meta_failures:
                raise MetaUpdateFailed(f"{self.failures} consecutive non-finite meta-updates (last at step "
                                       f"{self.t}); try a smaller meta_lr or grad_clip")
            return None
        self.failures = 0
        self.meta_opt.zero_grad(set_to_none=True)
        for p, g in zip(self.net.parameters(), grads):
            p.grad = g
        self.meta_opt.step()
        self.meta_opt.zero_grad(set_to_none=True)
        if self.world > 1 and len(self.meta_history) % SYNC_CHECK_EVERY == 0:
            check_in_sync([*self.net.parameters(), *self.model.parameters()], "MLR-SNet and model parameters",
                          f"step {self.t}")
        return float(val_loss)

    def step(self, batch) -> dict:
        """One iteration of Algorithm 1 on minibatch ``batch``: ``{"loss", "lr", "meta_loss", "aux"}``
        (``meta_loss`` None on steps without a meta-update; ``loss`` non-finite: nothing changed)."""
        self.model.train()
        with _autocast(self.model, self.cfg.autocast):
            loss, aux = _split(self.loss_fn(self.model, batch))
        value = self._global(float(loss.detach()))  # the whole minibatch's loss: every process agrees
        if not math.isfinite(value):
            return {"loss": value, "lr": None, "meta_loss": None, "aux": aux}
        if self.gamma is None:
            self.gamma = self.net.gamma_for(self._global(self.train_loss_fn()))
            self.model.train()
        x = self.net.loss_input(value)
        meta_loss = None
        if self.t % self.cfg.t_val == 0:
            meta_loss = self._meta_update(x, batch)
            self.meta_history.append({"step": self.t, "val_loss": meta_loss})
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.world > 1:  # as DistributedDataParallel: the mean gradient, before clipping
            all_mean([p.grad for p in self.params if p.grad is not None])
        if self.cfg.grad_clip is not None:  # over the optimizer's parameters, as the virtual step
            nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        with torch.no_grad():
            one = torch.ones(1, device=x.device, dtype=x.dtype)
            p, (h, c, _) = self.net.network(x, (*self.hidden, one))
        self.hidden = (h, c)
        lr = self.gamma * float(p)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        if self.world > 1:
            for b in self.model.buffers():
                torch.distributed.broadcast(b, src=0)
        self.t += 1
        if self.cfg.snapshot_every and self.t % self.cfg.snapshot_every == 0:
            self.snapshots.append((self.t, {k: v.detach().cpu().clone() for k, v in self.net.state_dict().items()}))
        return {"loss": value, "lr": lr, "meta_loss": meta_loss, "aux": aux}

    def snapshot_nets(self, indices: list[int] | None = None, **options) -> list[MLRSNet]:
        """The saved φ's as MLRSNet copies (all, or the given snapshot indices)."""
        chosen = self.snapshots if indices is None else [self.snapshots[i] for i in indices]
        out = []
        for _, sd in chosen:
            n = copy.deepcopy(self.net).cpu()
            n.load_state_dict(sd)
            out.append(n)
        return out

    def state_dict(self) -> dict:
        """Tensors and plain containers only (``torch.load(weights_only=True)`` reads them)."""
        return {"t": self.t, "gamma": self.gamma, "hidden": [t.detach().clone() for t in self.hidden],
                "net": self.net.state_dict(), "meta_opt": self.meta_opt.state_dict(),
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "snapshots": [[t, s] for t, s in self.snapshots], "meta_history": self.meta_history,
                "failures": self.failures, "total_failures": self.total_failures}

    def load_state_dict(self, sd: dict) -> None:
        dev = next(self.model.parameters()).device
        self.t, self.gamma = int(sd["t"]), sd["gamma"]
        self.hidden = tuple(t.to(dev) for t in sd["hidden"])
        self.net.load_state_dict(sd["net"])
        self.meta_opt.load_state_dict(sd["meta_opt"])
        self.model.load_state_dict(sd["model"])
        self.optimizer.load_state_dict(sd["optimizer"])
        self.snapshots = [(int(t), s) for t, s in sd["snapshots"]]
        self.meta_history = list(sd["meta_history"])
        self.failures, self.total_failures = int(sd["failures"]), int(sd["total_failures"])


def select_snapshots(n: int, k: int = 3) -> list[int]:
    """0-based indices of the k nets kept for meta-testing out of n snapshots (one per epoch):
    the ⌈n·l/k⌉-th, l = 1..k (§4.2.1). (The released CIFAR-10 nets are epochs 1/100/200 of 200.)"""
    if n < 1 or k < 1:
        raise ValueError(f"select_snapshots needs n >= 1 snapshots and k >= 1, got n={n!r}, k={k!r}")
    return [max(1, math.ceil(n * l / k)) - 1 for l in range(1, k + 1)]
