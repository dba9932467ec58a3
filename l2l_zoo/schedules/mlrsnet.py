"""MLR-SNet as a learning-rate controller over any ``torch.optim`` optimizer: the meta-test stage,
Algorithm 2 of Shu et al. (TPAMI 2022), "MLR-SNet: Transferable LR Schedules for Heterogeneous
Tasks", §3.2.2 (2):

    u_{t+1} = u_t − A(f^Tr(D_t, u_t), θ_t; φ_s) · d_t                                    (13)

with the rate A(·; φ_s) = γ·p_t of the schedule network (:class:`~l2l_zoo.optimizers.MLRSNet`,
eq. 8) and d_t the direction of the wrapped optimizer (its momentum, weight decay, Adam moments:
§5.5 "the base optimizer's direction, MLR-SNet's rate"). k saved nets φ_s serve consecutive parts of
training (§4.2.1).

The controller follows the protocol of the hypergradient controllers (HD, MARTHE): one
``ctl.step(loss)`` replaces ``loss.backward(); optimizer.step()``::

    ctl = MLRSNetController(opt, nets, total_steps=T, train_loss_fn=mean_train_loss)
    for x, y in loader:
        ctl.step(F.cross_entropy(model(x), y))

``ctl.rate(loss)`` only sets the rate, for a loop that does its own backward and step. The network
is the pure part; this is the thin stateful shell (the LSTM state, γ, the step counter).
"""
from __future__ import annotations

import copy
import math
from typing import Callable, Sequence

import torch

from ..optimizers.mlrsnet import MLRSNet
from .controller import ScheduleDiverged

__all__ = ["MLRSNetController"]


class MLRSNetController:
    """Each step feeds the minibatch loss to the current schedule network and sets every param
    group's ``lr`` to α_t = γ·p_t; the optimizer supplies the direction.

    ``nets``: one MLRSNet or k of them (Algorithm 2, §4.2.1: the k saved nets are used for
    consecutive parts of training); with k > 1 either ``total_steps`` (net l serves steps
    [⌊T·l/k⌋, ⌊T·(l+1)/k⌋)) or explicit ``switch_steps`` (k − 1 increasing steps) is needed.
    ``gamma``: γ for the first part (None: from ``train_loss_fn()`` or else the first minibatch
    loss). At each switch γ is recomputed (``recompute_gamma``) from ``train_loss_fn()`` (the mean
    training loss, as the authors' meta-test code does in eval mode) or else the minibatch loss.
    The LSTM state is carried across switches and detached every step, as in their meta-test code.
    ``grad_clip``: max gradient norm applied by :meth:`step` (``torch.nn.utils.clip_grad_norm_``
    over the optimizer's parameters; None: off). ``divergence_loss``: :meth:`step` raises
    :class:`~l2l_zoo.schedules.ScheduleDiverged` on a loss above it (or non-finite).

    The nets are copied, frozen and kept on ``device`` (CPU by default: a scalar-input net is faster
    there than as GPU kernel launches; only the loss value crosses).

    Satisfies :class:`~l2l_zoo.schedules.LRController`. Attributes: ``optimizer``; ``lr``, the
    rate in the optimizer's param groups (after :meth:`rate` the one the coming ``optimizer.step()``
    uses; MLR-SNet's next rate depends on the next loss, so after :meth:`step` it is the rate that
    step used); ``t`` (steps taken); ``last`` (``loss``, ``lr``, ``gamma`` and ``net`` index of the
    last step, plus ``grad_norm`` before clipping when :meth:`step` clips; empty before the first
    step); ``gamma``; ``gammas``, the (step, γ) of each (re)computation.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, nets: MLRSNet | Sequence[MLRSNet], *,
                 total_steps: int | None = None, switch_steps: Sequence[int] | None = None,
                 gamma: float | None = None, train_loss_fn: Callable[[], float] | None = None,
                 recompute_gamma: bool = True, grad_clip: float | None = None,
                 divergence_loss: float = math.inf, device="cpu"):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        nets = [nets] if isinstance(nets, MLRSNet) else list(nets)
        if not nets or not all(isinstance(n, MLRSNet) for n in nets):
            raise TypeError(f"nets must be an MLRSNet or a non-empty sequence of them, got {nets!r}")
        sizes = {n.config["hidden_size"] for n in nets}
        if len(sizes) != 1:
            raise ValueError(f"all nets must have the same hidden_size to carry the LSTM state, got {sizes}")
        k = len(nets)
        if switch_steps is None:
            if k > 1 and total_steps is None:
                raise ValueError(f"{k} nets need total_steps (or switch_steps) to know when to switch")
            switch_steps = [total_steps * l // k for l in range(1, k)] if k > 1 else []
        switch_steps = [int(s) for s in switch_steps]
        if len(switch_steps) != k - 1 or any(b <= a for a, b in zip([0] + switch_steps, switch_steps)):
            raise ValueError(f"switch_steps must be {k - 1} increasing steps > 0, got {switch_steps}")
        if gamma is not None and not (math.isfinite(gamma) and gamma > 0):
            raise ValueError(f"gamma must be a finite number > 0 or None, got {gamma!r}")
        if grad_clip is not None and not (math.isfinite(grad_clip) and grad_clip > 0):
            raise ValueError(f"grad_clip must be None or a finite number > 0, got {grad_clip!r}")
        if not (isinstance(divergence_loss, (int, float)) and divergence_loss > 0):
            raise ValueError(f"divergence_loss must be > 0, got {divergence_loss!r}")
        self.optimizer = optimizer
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.device = torch.device(device)
        self.nets = [copy.deepcopy(n).requires_grad_(False).eval().to(self.device) for n in nets]
        self.switch_steps = switch_steps
        self.train_loss_fn = train_loss_fn
        self.recompute_gamma = recompute_gamma
        self.grad_clip = None if grad_clip is None else float(grad_clip)
        self.divergence_loss = float(divergence_loss)
        self.t = 0
        self.gamma = gamma
        self.gammas: list[tuple[int, float]] = []  # (step, γ) at each (re)computation
        self.hidden = self.nets[0].init_hidden(device=self.device, gamma=1.0)[:2]
        lr = optimizer.param_groups[0]["lr"]
        self.lr = float(lr)
        self.last: dict = {}

    def net_index(self, t: int | None = None) -> int:
        """Index of the net that serves step ``t`` (default: the coming step)."""
        t = self.t if t is None else t
        return sum(t >= s for s in self.switch_steps)

    def _reference_loss(self, loss) -> float:
        return float(self.train_loss_fn()) if self.train_loss_fn is not None else float(loss)

    @torch.no_grad()
    def rate(self, loss: torch.Tensor | float) -> float:
        """Set the learning rate for the coming ``optimizer.step()`` from this step's minibatch
        ``loss`` (a number or tensor; it is detached) and count the step; returns α_t."""
        value = float(loss)
        k = self.net_index()
        net = self.nets[k]
        if self.t == 0 or (self.recompute_gamma and self.t in self.switch_steps):
            if self.gamma is None or self.t > 0:
                self.gamma = net.gamma_for(self._reference_loss(value))
            self.gammas.append((self.t, self.gamma))
        x = net.loss_input(value)
        one = torch.ones(1, device=self.device, dtype=x.dtype)
        p, (h, c, _) = net.network(x, (*self.hidden, one))
        lr = self.gamma * float(p)
        if not math.isfinite(lr):
            raise FloatingPointError(f"MLR-SNet produced a non-finite learning rate {lr!r} at step {self.t} "
                                     f"(input loss {value!r})")
        self.hidden = (h, c)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.lr = lr
        self.last = {"loss": value, "lr": lr, "gamma": self.gamma, "net": k}
        self.t += 1
        return lr

    def step(self, loss: torch.Tensor) -> float:
        """One training step (eq. 13): back-propagate the scalar minibatch ``loss`` (the optimizer's
        gradients are zeroed first), clip the gradient norm (``grad_clip``), set α_t from this loss
        (:meth:`rate`) and take ``optimizer.step()``. Returns the loss value.

        A non-finite loss (or one above ``divergence_loss``), or a non-finite gradient norm when
        clipping, raises :class:`~l2l_zoo.schedules.ScheduleDiverged` with the parameters, the
        optimizer state and the controller as they were."""
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise TypeError(f"step() needs the scalar training-loss tensor of this step, got {loss!r}")
        value = float(loss.detach())
        if not math.isfinite(value) or value > self.divergence_loss:
            raise ScheduleDiverged(f"training diverged at step {self.t}: minibatch loss {value!r} "
                                   f"(lr={self.lr:.4g})", step=self.t, lr=self.lr, loss=value)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = None
        if self.grad_clip is not None:
            norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip))
            if not math.isfinite(norm):
                raise ScheduleDiverged(f"training diverged at step {self.t}: gradient norm {norm!r} with a "
                                       f"finite loss {value!r}", step=self.t, lr=self.lr, loss=value)
        self.rate(value)
        if norm is not None:
            self.last["grad_norm"] = norm
        self.optimizer.step()
        return value

    def state_dict(self) -> dict:
        """Plain containers and tensors only (``torch.load(weights_only=True)`` reads them)."""
        return {"t": self.t, "gamma": self.gamma, "gammas": [list(g) for g in self.gammas],
                "hidden": [t.clone() for t in self.hidden], "lr": self.lr, "last": dict(self.last),
                "switch_steps": list(self.switch_steps)}

    def load_state_dict(self, sd: dict) -> None:
        if list(sd["switch_steps"]) != self.switch_steps:
            raise ValueError(f"controller state has switch_steps {sd['switch_steps']}, this controller "
                             f"{self.switch_steps}")
        self.t, self.gamma, self.lr = int(sd["t"]), sd["gamma"], float(sd["lr"])
        self.gammas = [(int(s), float(g)) for s, g in sd["gammas"]]
        self.hidden = tuple(t.to(self.device) for t in sd["hidden"])
        self.last = dict(sd["last"])
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
