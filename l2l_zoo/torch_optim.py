"""A trained learned optimizer as a drop-in ``torch.optim.Optimizer``.

    lopt = l2l_zoo.load("simple.pt")
    opt = l2l_zoo.LearnedOptimizerAdapter(model.parameters(), lopt)
    for x, y in loader:
        opt.zero_grad(); F.cross_entropy(model(x), y).backward(); opt.step()

This is the thin stateful shell around the pure ``LearnedOptimizer.update``: it gathers all gradients
into one flat vector (so cross-coordinate aggregation such as SimpleOptimizer's mean embedding sees the
whole model, as during meta-training), calls ``update`` without autograd, and adds the updates to the
parameters in place.

* Every parameter handed to the adapter is one block of coordinates; a parameter whose ``.grad`` is
  ``None`` at a step is fed a zero gradient (its hidden state still advances), so that the coordinate
  layout stays fixed.
* Each param group's ``lr`` multiplies the learned update (1.0, the default, is the update as trained),
  so ``torch.optim.lr_scheduler`` schedulers can warm up or decay a learned optimizer.
* ``state_dict``/``load_state_dict`` include the hidden states and feature statistics, split per
  parameter like any torch optimizer's state, so checkpoints resume exactly.
* Optimizers that need the loss (``lopt.needs_loss``, e.g. MLR-SNet) get it from ``step(closure)`` or
  ``step(loss=...)``.
"""
from __future__ import annotations

import copy

import torch

from .base import LearnedOptimizer, OptState

__all__ = ["LearnedOptimizerAdapter"]


class LearnedOptimizerAdapter(torch.optim.Optimizer):
    def __init__(self, params, lopt: LearnedOptimizer, *, lr: float = 1.0):
        if not isinstance(lopt, LearnedOptimizer):
            raise TypeError(f"lopt must be a LearnedOptimizer, got {type(lopt).__name__}")
        if lr < 0:
            raise ValueError(f"lr (update multiplier) must be >= 0, got {lr!r}")
        super().__init__(params, dict(lr=lr))
        plist = self._params()
        if not plist:
            raise ValueError("LearnedOptimizerAdapter got an empty parameter list")
        # A private, frozen copy: stepping never trains or moves the caller's module.
        self.lopt = copy.deepcopy(lopt).requires_grad_(False).eval().to(plist[0].device)
        self._flat: OptState | None = None

    # ------------------------------------------------------------------ helpers
    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _numels(self) -> list[int]:
        return [p.numel() for p in self._params()]

    def _init_flat(self, ref: torch.Tensor) -> OptState:
        return self.lopt.init_state(sum(self._numels()), device=ref.device, dtype=ref.dtype)

    # ------------------------------------------------------------------ stepping
    @torch.no_grad()
    def step(self, closure=None, *, loss: torch.Tensor | float | None = None):
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = self._params()
        grads = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                           for p in params])
        if self._flat is None:
            self._flat = self._init_flat(grads)
        kwargs = {}
        if self.lopt.needs_params:
            kwargs["params"] = torch.cat([p.reshape(-1) for p in params])
        if self.lopt.needs_loss:
            if loss is None:
                raise ValueError(f"{self.lopt.name!r} needs the loss: call step(closure) or step(loss=...)")
            kwargs["loss"] = torch.as_tensor(loss, dtype=grads.dtype, device=grads.device).detach()
        updates, self._flat = self.lopt.update(grads, self._flat, **kwargs)
        offset = 0
        for group in self.param_groups:
            scale = group["lr"]
            for p in group["params"]:
                u = updates[offset:offset + p.numel()].view_as(p)
                p.add_(u if scale == 1.0 else u * scale)
                offset += p.numel()
        return loss

    # ------------------------------------------------------------------ (de)serialisation
    def _split_to_param_state(self) -> None:
        """Write the flat state into ``self.state[p]`` (per-parameter slices, plus tensors that are
        not per-coordinate, e.g. MLR-SNet's hidden state, on the first parameter)."""
        if self._flat is None:
            return
        params, n = self._params(), sum(self._numels())
        parts = {}
        for kind in ("stats", "hidden"):
            for j, t in enumerate(getattr(self._flat, kind)):
                parts[(kind, j)] = t.split(self._numels()) if t.dim() > 0 and t.shape[0] == n else None
        for i, p in enumerate(params):
            st = {"step": torch.tensor(float(self._flat.step))}
            for (kind, j), chunks in parts.items():
                key = f"{kind}_{j}"
                if chunks is not None:
                    st[key] = chunks[i].clone()
                elif i == 0:
                    st["global_" + key] = getattr(self._flat, kind)[j].clone()
            self.state[p] = st

    def state_dict(self):
        self._split_to_param_state()
        return super().state_dict()

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        params = self._params()
        if not params or params[0] not in self.state or "step" not in self.state[params[0]]:
            self._flat = None
            return
        # Rebuild in the memory layout the optimizer itself allocates (so resumed steps are
        # bit-identical to uninterrupted ones).
        template = self._init_flat(params[0])
        first = self.state[params[0]]

        def gather(kind, j):
            key = f"{kind}_{j}"
            out = getattr(template, kind)[j]
            src = first["global_" + key] if "global_" + key in first else \
                torch.cat([self.state[p][key] for p in params], dim=0)
            return out.copy_(src)

        stats = tuple(gather("stats", j) for j in range(len(template.stats)))
        hidden = tuple(gather("hidden", j) for j in range(len(template.hidden)))
        self._flat = OptState(int(first["step"].item()), stats, hidden)
