"""Meta-training (Algorithm 1) and meta-testing (Algorithm 2) of MLR-SNet (Shu et al., TPAMI 2022,
§3.2.2), plus the hand-designed schedules it is compared with (§3.1, eq. 4).

**Meta-training, online (Algorithm 1).** The model trains with its ``torch.optim`` base optimizer
whose learning rate is set every step by MLR-SNet (eq. 12). Every ``t_val`` steps (paper: 100;
authors' code: 300), before the real step:

    ŵ_{t+1}(φ) = w_t − A(f_t, θ_t; φ) · d_t                                              (11)
    φ_{t+1}    = φ_t + Adam(∇_φ f^Val(D_t^(v); ŵ_{t+1}(φ)))   (lr 1e-3, weight decay 1e-4)  (10)

with D_t the step's own training minibatch, d_t the base optimizer's direction (its momentum buffer
and weight decay included: the virtual step is ``higher``'s differentiable copy of the real
optimizer, with the rate overridden by the differentiable A(·; φ)), θ_t = (h, c) the LSTM state
before the step, held fixed (it is detached every step, as in the authors' code) and D_t^(v) one
minibatch of held-out clean meta-data. The real step (eq. 12) then uses φ_{t+1} with the same f_t
and θ_t. Snapshots of φ are kept every ``snapshot_every`` steps (the paper: every epoch).

Choices where the sources are silent or disagree:

* The authors' code advances the LSTM state twice on meta-update steps (once for the virtual rate,
  once for the real one); by default both use θ_t, as eqs. (11)-(12) are written
  (``MLRSNetTrainConfig.lstm_state``: ``"paper"`` or ``"authors-code"``).
* Training gradients in the virtual step carry no second-order graph into φ: ŵ depends on φ only
  through the rate, so ∇_φ f^Val = −(∇f^Val(ŵ) · d_t) ∇_φ A. ``higher`` still builds the
  create-graph gradient (it needs ``track_higher_grads`` for the rate to reach ŵ); autograd prunes
  the unused second-order path.
* Gradient-norm clipping (language models: 0.25) is applied to the real and the virtual step alike.
* BatchNorm running statistics touched by the virtual forward pass are restored afterwards (the
  authors ran it on a separate copy of the model).
* ``higher`` 0.2.1's differentiable Adam places ε as torch < 1.5 did ((√v + ε)/√(1−β2^t) instead of
  √v/√(1−β2^t) + ε) and computes the bias corrections from torch's float32 step counter: for an
  Adam base the virtual step deviates from the real one by ~1e-5 relative (tested). The SGD and
  SGD-with-momentum virtual steps equal the real ones to rounding.

**Meta-testing (Algorithm 2)** is :class:`~l2l_zoo.optimizers.mlrsnet.MLRSNetController` with k
saved nets chosen by :func:`select_snapshots` (⌈N·l/k⌉, §4.2.1), each used for a consecutive k-th of
training, γ recomputed from the current mean training loss at each switch.

Everything here is a thin stateful shell (the pure parts are ``MLRSNet.network``/``update``): steppers
own a model and an optimizer and mutate them in place; :func:`train_loop` drives a stepper, evaluates,
checkpoints and stops on divergence.
"""
from __future__ import annotations

import copy
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..meta.trainer import MetaTrainingDiverged
from ..optimizers.mlrsnet import MLRSNet, MLRSNetController
from .baselines import make_baseline

__all__ = ["MLRSNetTrainConfig", "MLRSNetMetaTrainer", "ScheduledStepper", "virtual_step_loss",
           "meta_gradient", "select_snapshots", "hand_designed_scheduler", "HAND_DESIGNED", "train_loop",
           "resumable_train_loop", "MetaUpdateFailed"]

HAND_DESIGNED = ("fixed", "multistep", "exponential", "sgdr")


class MetaUpdateFailed(MetaTrainingDiverged):
    """Raised after ``max_meta_failures`` consecutive non-finite meta-losses or meta-gradients
    (a :class:`~l2l_zoo.meta.MetaTrainingDiverged`: scripts report it as one line, exit status 4)."""


def _split(out) -> tuple[torch.Tensor, Any]:
    """``loss_fn`` returns the loss or ``(loss, aux)``."""
    return (out[0], out[1]) if isinstance(out, tuple) else (out, None)


def _clip_callback(max_norm: float | None):
    """Gradient-norm clipping as ``torch.nn.utils.clip_grad_norm_`` (coefficient from detached norms)
    for ``higher``'s ``grad_callback``."""
    if max_norm is None:
        return None

    def clip(grads):
        norms = [g.detach().norm() for g in grads if g is not None]
        total = torch.stack(norms).norm()
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        return [None if g is None else g * coef for g in grads]

    return clip


# --------------------------------------------------------------------------- the virtual step

def virtual_step_loss(net: MLRSNet, hidden: tuple, x: torch.Tensor, gamma: float, model: nn.Module,
                      optimizer: torch.optim.Optimizer, train_batch, val_batch,
                      loss_fn: Callable, *, grad_clip: float | None = None, return_hidden: bool = False):
    """Validation loss f^Val(D^(v); ŵ_{t+1}(φ)) of the virtual step (eq. 11), differentiable in
    φ = ``net``'s parameters. Returns ``(val_loss, lr)`` (scalar tensors), plus the network's next
    (h, c), detached, with ``return_hidden``.

    ``hidden``: (h, c) of shape (1, H), the LSTM state θ_t (detached); ``x``: the (1, 1) network
    input of this step's loss f_t; ``gamma``: γ; ``train_batch``: D_t; ``val_batch``: D^(v);
    ``loss_fn(model, batch)`` returns the mean loss (or ``(loss, aux)``). ``model`` and ``optimizer``
    are not modified (the virtual step works on ``higher``'s functional copy).
    """
    import higher  # kept behind this function: the rest of the module does not need it

    dev = next(model.parameters()).device
    h, c = (t.detach() for t in hidden)
    one = torch.full((1,), float(gamma), device=h.device, dtype=h.dtype)
    buffers = [b.detach().clone() for b in model.buffers()]
    try:
        with torch.enable_grad(), warnings.catch_warnings():  # works under no_grad too
            # higher's Adam turns its 0-d step tensor into a float (math.sqrt): harmless warnings.
            warnings.filterwarnings("ignore", message=".*requires_grad.*to a scalar.*")
            warnings.filterwarnings("ignore", message=".*Consider using tensor.detach.*")
            lr, (h1, c1, _) = net.network(x.detach(), (h, c, one))
            lr = lr.reshape(()).to(dev)
            fmodel = higher.monkeypatch(model, copy_initial_weights=True, track_higher_grads=True)
            diffopt = higher.get_diff_optim(optimizer, model.parameters(), fmodel=fmodel,
                                            override={"lr": [lr]}, track_higher_grads=True,
                                            grad_callback=_clip_callback(grad_clip))
            diffopt.step(_split(loss_fn(fmodel, train_batch))[0])
            val_loss = _split(loss_fn(fmodel, val_batch))[0]
    finally:
        with torch.no_grad():
            for b, saved in zip(model.buffers(), buffers):
                b.copy_(saved)
    return (val_loss, lr, (h1.detach(), c1.detach())) if return_hidden else (val_loss, lr)


def meta_gradient(net: MLRSNet, *args, **kwargs) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``(val_loss, [∂ val_loss / ∂φ_i])`` for :func:`virtual_step_loss` (same arguments; with
    ``return_hidden`` the virtual step's next (h, c) comes third)."""
    val_loss, _, *rest = virtual_step_loss(net, *args, **kwargs)
    params = list(net.parameters())
    grads = torch.autograd.grad(val_loss, params, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
    return (val_loss.detach(), grads, *rest)


# --------------------------------------------------------------------------- steppers

@dataclass
class MLRSNetTrainConfig:
    """Algorithm 1 settings: ``t_val`` (T_val), ``meta_lr`` and ``meta_weight_decay`` of the Adam
    meta-optimizer (§4.1.1), ``grad_clip`` (max gradient norm of the base optimizer, None: off;
    PTB: 0.25, §4.1.2), ``snapshot_every`` (steps between saved copies of φ; 0: none),
    ``max_meta_failures`` (consecutive non-finite meta-updates before giving up) and
    ``lstm_state``: on meta-update steps the real rate uses θ_t (``"paper"``, eqs. 11-12) or the
    state the virtual rate already advanced (``"authors-code"``, their meta-train script)."""

    t_val: int = 100
    meta_lr: float = 1e-3
    meta_weight_decay: float = 1e-4
    grad_clip: float | None = None
    snapshot_every: int = 0
    max_meta_failures: int = 10
    lstm_state: str = "paper"

    def __post_init__(self):
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
        return asdict(self)


class MLRSNetMetaTrainer:
    """Algorithm 1 around a ``model`` and its ``torch.optim`` base ``optimizer`` (SGD, SGD with
    momentum or Adam; its ``lr`` is overwritten every step).

    ``loss_fn(model, batch)``: mean training/validation loss (or ``(loss, aux)``; ``aux`` of the real
    step, e.g. a language model's carried state, is returned by :meth:`step`). ``val_batch_fn()``:
    the next minibatch of meta-data. ``gamma``: γ (None: from ``train_loss_fn()``, the mean training
    loss, at the first step). ``log``: one-line messages (NaN reports).
    """

    def __init__(self, net: MLRSNet, model: nn.Module, optimizer: torch.optim.Optimizer, *,
                 loss_fn: Callable, val_batch_fn: Callable[[], Any],
                 config: MLRSNetTrainConfig | None = None, gamma: float | None = None,
                 train_loss_fn: Callable[[], float] | None = None, log: Callable[[str], None] = print):
        if gamma is None and train_loss_fn is None:
            raise ValueError("MLRSNetMetaTrainer needs gamma= or train_loss_fn= (γ from the mean "
                             "training loss, §3.2.1)")
        self.cfg = config or MLRSNetTrainConfig()
        self.net, self.model, self.optimizer = net, model, optimizer
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

    def _meta_update(self, x, batch) -> float | None:
        """Eq. (10)-(11); returns the validation loss, or None when it was skipped (non-finite)."""
        val_loss, grads, advanced = meta_gradient(self.net, self.hidden, x, self.gamma, self.model,
                                                  self.optimizer, batch, self.val_batch_fn(), self.loss_fn,
                                                  grad_clip=self.cfg.grad_clip, return_hidden=True)
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
        return float(val_loss)

    def step(self, batch) -> dict:
        """One iteration of Algorithm 1 on minibatch ``batch``: ``{"loss", "lr", "meta_loss", "aux"}``
        (``meta_loss`` None on steps without a meta-update; ``loss`` non-finite: nothing changed)."""
        self.model.train()
        loss, aux = _split(self.loss_fn(self.model, batch))
        value = float(loss.detach())
        if not math.isfinite(value):
            return {"loss": value, "lr": None, "meta_loss": None, "aux": aux}
        if self.gamma is None:
            self.gamma = self.net.gamma_for(self.train_loss_fn())
            self.model.train()
        x = self.net.loss_input(value)
        meta_loss = None
        if self.t % self.cfg.t_val == 0:
            meta_loss = self._meta_update(x, batch)
            self.meta_history.append({"step": self.t, "val_loss": meta_loss})
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        with torch.no_grad():
            one = torch.ones(1, device=x.device, dtype=x.dtype)
            p, (h, c, _) = self.net.network(x, (*self.hidden, one))
        self.hidden = (h, c)
        lr = self.gamma * float(p)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
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
        return {"t": self.t, "gamma": self.gamma, "hidden": [t.detach().clone() for t in self.hidden],
                "net": self.net.state_dict(), "meta_opt": self.meta_opt.state_dict(),
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "snapshots": self.snapshots, "meta_history": self.meta_history,
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


class ScheduledStepper:
    """A model trained by ``optimizer`` with a learning-rate ``policy``: an
    :class:`MLRSNetController` (needs the loss before ``optimizer.step()``; Algorithm 2), a
    ``torch.optim.lr_scheduler`` scheduler (stepped after every optimizer step) or None (fixed)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, loss_fn: Callable,
                 policy=None, grad_clip: float | None = None):
        self.model, self.optimizer, self.loss_fn, self.policy = model, optimizer, loss_fn, policy
        self.grad_clip = grad_clip
        self.t = 0

    def step(self, batch) -> dict:
        self.model.train()
        loss, aux = _split(self.loss_fn(self.model, batch))
        value = float(loss.detach())
        if not math.isfinite(value):
            return {"loss": value, "lr": None, "meta_loss": None, "aux": aux}
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        if isinstance(self.policy, MLRSNetController):
            self.policy.step(value)
        lr = float(self.optimizer.param_groups[0]["lr"])
        self.optimizer.step()
        if self.policy is not None and not isinstance(self.policy, MLRSNetController):
            self.policy.step()
        self.t += 1
        return {"loss": value, "lr": lr, "meta_loss": None, "aux": aux}

    def state_dict(self) -> dict:
        return {"t": self.t, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "policy": None if self.policy is None else self.policy.state_dict()}

    def load_state_dict(self, sd: dict) -> None:
        self.t = int(sd["t"])
        self.model.load_state_dict(sd["model"])
        self.optimizer.load_state_dict(sd["optimizer"])
        if self.policy is not None:
            self.policy.load_state_dict(sd["policy"])


# --------------------------------------------------------------------------- schedules

def select_snapshots(n: int, k: int = 3) -> list[int]:
    """0-based indices of the k nets kept for meta-testing out of n snapshots (one per epoch):
    the ⌈n·l/k⌉-th, l = 1..k (§4.2.1). (The released CIFAR-10 nets are epochs 1/100/200 of 200.)"""
    if n < 1 or k < 1:
        raise ValueError(f"select_snapshots needs n >= 1 snapshots and k >= 1, got n={n!r}, k={k!r}")
    return [max(1, math.ceil(n * l / k)) - 1 for l in range(1, k + 1)]


def hand_designed_scheduler(name: str, optimizer: torch.optim.Optimizer, total_steps: int):
    """The pre-defined schedules of eq. (4) as ``torch.optim.lr_scheduler`` objects stepped once per
    iteration, with the paper's CIFAR settings (§4.1.1, 200 epochs) rescaled to ``total_steps``:
    ``fixed`` (None), ``multistep`` (×0.1 at 30/60/90 % of training: epochs 60/120/180),
    ``exponential`` (×0.95 per 1/200 of training), ``sgdr`` (cosine restarts, α_min = 1e-5, first
    period 10/200 of training, T_mult = 2). α_0 is the optimizer's ``lr``."""
    if name not in HAND_DESIGNED:
        raise ValueError(f"unknown schedule {name!r}; choose from {list(HAND_DESIGNED)}")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps!r}")
    if name == "fixed":
        return None
    kw = {"exponential": {"gamma": 0.95 ** (200.0 / total_steps)}, "sgdr": {"eta_min": 1e-5}}.get(name, {})
    return make_baseline(name, optimizer, total_steps=total_steps, **kw)


# --------------------------------------------------------------------------- the loop

def train_loop(stepper, next_batch: Callable[[Any], Any], *, steps: int,
               evaluate: Callable[[], dict] | None = None, eval_every: int = 0,
               history: dict | None = None, checkpoint: Callable[[dict], None] | None = None,
               checkpoint_every: int = 0, divergence_loss: float = 1e4, progress: bool = True,
               desc: str = "") -> dict:
    """Run ``stepper.step(next_batch(aux))`` until ``steps`` steps are done (``aux``: what the previous
    step returned, e.g. a language model's state; None at first).

    Returns (and updates in place, so a checkpoint can store it) ``history``: per-step ``loss`` and
    ``lr``, ``meta`` (step, validation loss) records, ``eval`` records (``evaluate()`` at step 0,
    every ``eval_every`` steps and at the end), ``diverged_at`` (first step whose loss was non-finite
    or above ``divergence_loss``; training stops there) and ``wall_s``. ``checkpoint(history)`` is
    called every ``checkpoint_every`` steps and at the end; resuming passes the stored ``history``
    (with the stepper, data and RNG states restored by the caller)."""
    h = history if history is not None else {"loss": [], "lr": [], "meta": [], "eval": [],
                                             "diverged_at": None, "wall_s": 0.0, "aux": None}
    start = len(h["loss"])
    if evaluate is not None and start == 0 and not h["eval"]:
        h["eval"].append({"step": 0, **evaluate()})
    aux = h.pop("aux", None)
    bar = tqdm(total=steps, initial=start, desc=desc, disable=not progress, dynamic_ncols=True, leave=False)
    t0 = time.perf_counter()
    try:
        for t in range(start, steps):
            if h["diverged_at"] is not None:
                break
            rec = stepper.step(next_batch(aux))
            aux = rec["aux"]
            loss = rec["loss"]
            h["loss"].append(loss if math.isfinite(loss) else None)
            h["lr"].append(rec["lr"])
            if rec["meta_loss"] is not None:
                h["meta"].append({"step": t, "val_loss": rec["meta_loss"]})
            if not math.isfinite(loss) or loss > divergence_loss:
                h["diverged_at"] = t + 1
                bar.write(f"[{desc}] diverged at step {t + 1}: minibatch loss {loss!r}; run stopped")
                break
            done = t + 1
            if evaluate is not None and eval_every and (done % eval_every == 0 or done == steps):
                h["eval"].append({"step": done, **evaluate()})
            bar.update(1)
            if done % 25 == 0:
                bar.set_postfix(loss=f"{loss:.4g}", lr=f"{rec['lr']:.3g}")
            if checkpoint is not None and checkpoint_every and done % checkpoint_every == 0 and done < steps:
                h["wall_s"] += time.perf_counter() - t0
                t0 = time.perf_counter()
                h["aux"] = aux
                checkpoint(h)
                h.pop("aux")
    finally:
        bar.close()
        h["wall_s"] += time.perf_counter() - t0
    if evaluate is not None and h["diverged_at"] is None and (not h["eval"] or h["eval"][-1]["step"] != len(h["loss"])):
        h["eval"].append({"step": len(h["loss"]), **evaluate()})
    if checkpoint is not None:
        h["aux"] = aux
        checkpoint(h)
        h.pop("aux")
    return h


def resumable_train_loop(stepper, next_batch: Callable[[Any], Any], *, path: str | os.PathLike,
                         identity: dict, generators: dict[str, torch.Generator] | None = None,
                         resume: bool = False, checkpoint_every: int = 100, **loop_kwargs) -> dict:
    """:func:`train_loop` with an atomic checkpoint at ``path`` every ``checkpoint_every`` steps and at
    the end: the stepper's state, the ``generators``' states, torch's global RNG (dropout), the history
    and the carried ``aux``. With ``resume`` and an existing checkpoint whose ``identity`` (any
    JSON-like description of the run) matches, training continues exactly where it stopped; a
    finished run is returned without training. A mismatching identity raises ``ValueError``."""
    path = os.fspath(path)
    generators = generators or {}
    dev = next(stepper.model.parameters()).device
    history = None
    if resume and os.path.exists(path):
        ck = torch.load(path, map_location="cpu", weights_only=False)
        if ck["identity"] != identity:
            raise ValueError(f"checkpoint {path} was written by a different run ({ck['identity']}); "
                             f"refusing to resume {identity}")
        stepper.load_state_dict(ck["stepper"])  # each load_state_dict places its own tensors
        for k, g in generators.items():
            g.set_state(ck["generators"][k])
        torch.set_rng_state(ck["torch_rng"])
        if dev.type == "cuda" and ck.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(ck["cuda_rng"], dev)
        history = ck["history"]
        history["aux"] = _to_device(history.get("aux"), dev)

    def save(h):
        payload = {"identity": identity, "stepper": stepper.state_dict(), "history": h,
                   "generators": {k: g.get_state() for k, g in generators.items()},
                   "torch_rng": torch.get_rng_state(),
                   "cuda_rng": torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None}
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp"
        torch.save(payload, tmp)
        os.replace(tmp, path)

    return train_loop(stepper, next_batch, history=history, checkpoint=save,
                      checkpoint_every=checkpoint_every, **loop_kwargs)


def _to_device(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj
