"""A trained learned optimizer as a drop-in ``torch.optim.Optimizer``.

    lopt = l2l_zoo.load("simple.pt")
    opt = l2l_zoo.LearnedOptimizerAdapter(model.parameters(), lopt)
    for x, y in loader:
        opt.zero_grad(); F.cross_entropy(model(x), y).backward(); opt.step()

This is the thin stateful shell around the pure ``LearnedOptimizer.update``: it gathers the gradients
into one flat vector (so cross-coordinate aggregation such as SimpleOptimizer's mean embedding sees the
whole model, as during meta-training), calls ``update`` without autograd, and adds the updates to the
parameters in place. Every parameter handed to the adapter is one block of coordinates of the flat
optimizer state, in ``param_groups`` order.

* **Parameters without a gradient** (``.grad is None``; a frozen layer, an unused branch) are skipped,
  as by every torch optimizer (``none_grad="skip"``, the default): at each step the learned optimizer
  runs on the coordinates of the parameters that have a gradient only, as if the others were not in
  the optimizer for that step; a skipped parameter is not changed and its hidden state and
  statistics stay exactly as they were. Cross-coordinate aggregation therefore sees only the
  parameters with a gradient: SimpleOptimizer's mean embedding (Chen et al. 2020, §3.3) is the mean
  of the hidden states of those coordinates, MLR-SNet's global LSTM state advances once. A gradient
  that is present but zero is a real gradient and is not skipped. ``none_grad="zero"`` instead feeds
  such parameters a zero gradient (their state advances, the update is applied, and the mean
  embedding is over all coordinates). The step counter (``OptState.step``, read e.g. by RNNProp's
  bias correction) is one per optimizer: it counts the steps taken and is the same for every
  parameter, including skipped ones and ones added later.
* **Dtypes.** The learned network runs, and its state is kept, in ``compute_dtype`` (default: the
  learned optimizer's own dtype, float32 for every optimizer from ``l2l_zoo.create``/``load``),
  whatever the parameters' dtypes: gradients are cast to it, and each update is added to its
  parameter in the wider of the two dtypes and rounded once to the parameter's dtype (so float64,
  bfloat16, float16 and mixed-dtype models work; bfloat16 on CUDA is the common case). Nothing here
  is device-specific: the network and the state follow the parameters' device.
* **Learning rate and weight decay.** Each param group's ``lr`` multiplies the learned update (1.0,
  the default, is the update as trained), so ``torch.optim.lr_scheduler`` schedulers can warm up or
  decay a learned optimizer; it is a number or a tensor with exactly one element. A group's
  ``weight_decay`` (default 0) is *decoupled* weight decay as in AdamW (Loshchilov & Hutter 2019,
  Algorithm 2): ``p <- p - lr * weight_decay * p`` is applied before the learned update, which
  is computed from the gradients (and, for optimizers that read them, the parameters) as they were
  before the decay.
* **Non-finite gradients** are detected before anything is modified: ``nonfinite="raise"`` (default)
  raises ``FloatingPointError`` naming the parameter and the step; ``nonfinite="skip"`` skips the
  whole step (parameters and state untouched), counts it in :attr:`nonfinite_skips` and warns once.
* **State.** ``self.state[p]`` holds, after the first step, views of the parameter's rows of the flat
  state (``step``, ``stats_<j>``, ``hidden_<j>``; entries that are not per coordinate, e.g. MLR-SNet's
  hidden state, as ``global_<kind>_<j>`` on the first parameter), refreshed after every step; the
  adapter never writes a state tensor in place, so a ``state_dict()`` keeps the values it had when
  it was taken. ``state_dict`` also records which learned optimizer (``name``, ``config``) wrote it,
  and ``load_state_dict`` rejects the state of another optimizer or of a different parameter layout
  with a message; resumed steps are bit-identical to uninterrupted ones. ``copy.deepcopy``,
  ``pickle`` and ``torch.save`` of the adapter itself give a fully working copy.
* Optimizers that need the loss (``lopt.needs_loss``, e.g. MLR-SNet) get it from ``step(closure)`` or
  ``step(loss=...)``.
"""
from __future__ import annotations

import copy
import math
import numbers
import warnings
from collections import defaultdict
from itertools import chain

import torch

from .base import LearnedOptimizer, OptState

__all__ = ["LearnedOptimizerAdapter", "NONE_GRAD_MODES", "NONFINITE_MODES"]

NONE_GRAD_MODES = ("skip", "zero")
NONFINITE_MODES = ("raise", "skip")
# Options every built-in torch.optim optimizer keeps in its param groups and this adapter has not:
# their presence identifies the state dict of a torch optimizer even when its state is empty.
_TORCH_OPTIM_FLAGS = ("foreach", "maximize", "fused", "capturable")
_KINDS = ("stats", "hidden")


def _check_lr(lr, where: str = "lr"):
    """``lr`` must be a finite number >= 0 or a tensor with exactly one such element."""
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise ValueError(f"{where} must be a number or a tensor with exactly one element, got a tensor "
                             f"of shape {tuple(lr.shape)}")
        if lr.is_complex():
            raise ValueError(f"{where} must be real, got a {lr.dtype} tensor")
        value = float(lr.detach().reshape(()))
    elif isinstance(lr, numbers.Real) and not isinstance(lr, bool):
        value = float(lr)
    else:
        raise ValueError(f"{where} must be a number or a tensor with exactly one element, got {lr!r}")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{where} must be a finite number >= 0, got {lr!r} (it multiplies the learned update)")


def _check_weight_decay(wd, where: str = "weight_decay"):
    if isinstance(wd, bool) or not isinstance(wd, numbers.Real) or not (math.isfinite(wd) and wd >= 0):
        raise ValueError(f"{where} must be a finite number >= 0, got {wd!r}")


def _plain(x):
    """Config values as saved (tuples may come back as lists): compare structurally."""
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    return x


class LearnedOptimizerAdapter(torch.optim.Optimizer):
    """``torch.optim.Optimizer`` over a :class:`~l2l_zoo.base.LearnedOptimizer` (module docstring).

    ``lr``: default multiplier of the learned update; ``weight_decay``: default decoupled weight
    decay; ``compute_dtype``: floating dtype of the network and its state (None: the learned
    optimizer's dtype); ``none_grad``: ``"skip"`` or ``"zero"``; ``nonfinite``: ``"raise"`` or
    ``"skip"``.
    """

    # Attributes that pickling/deepcopy carry beyond torch's (defaults, param_groups); ``state`` is
    # rebuilt from ``_flat`` so that its entries stay views of one buffer.
    _OWN = ("lopt", "_flat", "_compute_dtype", "_device", "_percoord", "_none_grad", "_nonfinite",
            "nonfinite_skips", "_warned_nonfinite")

    def __init__(self, params, lopt: LearnedOptimizer, *, lr: float | torch.Tensor = 1.0,
                 weight_decay: float = 0.0, compute_dtype: torch.dtype | None = None,
                 none_grad: str = "skip", nonfinite: str = "raise"):
        if not isinstance(lopt, LearnedOptimizer):
            raise TypeError(f"lopt must be a LearnedOptimizer, got {type(lopt).__name__}")
        _check_lr(lr)
        _check_weight_decay(weight_decay)
        if none_grad not in NONE_GRAD_MODES:
            raise ValueError(f"none_grad must be one of {NONE_GRAD_MODES}, got {none_grad!r}")
        if nonfinite not in NONFINITE_MODES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_MODES}, got {nonfinite!r}")
        if compute_dtype is None:
            compute_dtype = next((p.dtype for p in lopt.parameters() if p.is_floating_point()), torch.float32)
        if not (isinstance(compute_dtype, torch.dtype) and compute_dtype.is_floating_point):
            raise ValueError(f"compute_dtype must be a floating-point torch.dtype, got {compute_dtype!r}")
        # Set before torch's __init__, which calls add_param_group.
        self._flat: OptState | None = None
        self._device: torch.device | None = None
        self._compute_dtype = compute_dtype
        self._none_grad = none_grad
        self._nonfinite = nonfinite
        self.nonfinite_skips = 0  # steps skipped because of non-finite gradients (nonfinite="skip")
        self._warned_nonfinite = False
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))
        plist = self._params()
        if not plist:
            raise ValueError("LearnedOptimizerAdapter got an empty parameter list")
        # A private, frozen copy: stepping never trains or moves the caller's module.
        self.lopt = copy.deepcopy(lopt).requires_grad_(False).eval().to(device=self._device,
                                                                         dtype=compute_dtype)
        self._percoord = self._state_layout()

    # ------------------------------------------------------------------ helpers
    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _state_layout(self) -> tuple[tuple[bool, ...], tuple[bool, ...]]:
        """Which ``stats``/``hidden`` entries have one row per coordinate (found by comparing fresh
        states for 2 and 3 coordinates; the others, e.g. MLR-SNet's (h, c, γ), are global)."""
        a, b = self.lopt.init_state(2), self.lopt.init_state(3)

        def rows(ta, tb):
            return tuple(x.dim() > 0 and y.dim() > 0 and x.shape[0] == 2 and y.shape[0] == 3
                         and x.shape[1:] == y.shape[1:] for x, y in zip(ta, tb))
        return rows(a.stats, b.stats), rows(a.hidden, b.hidden)

    def _fresh(self, n: int) -> OptState:
        """A fresh state for ``n`` coordinates in the layout the optimizer allocates itself (every
        state tensor the adapter builds starts from one, so steps are bit-identical however the
        state was obtained)."""
        return self.lopt.init_state(n, device=self._device, dtype=self._compute_dtype)

    def _keys(self) -> list[tuple[str, int, str]]:
        """(kind, j, key in ``self.state[p]``) for every state entry."""
        return [(kind, j, (f"{kind}_{j}" if per else f"global_{kind}_{j}"))
                for kind, flags in zip(_KINDS, self._percoord) for j, per in enumerate(flags)]

    def _refresh_state(self) -> None:
        """Point ``self.state[p]`` at the parameter's rows of the current flat state (views)."""
        if self._flat is None:
            return
        params = self._params()
        numels = [p.numel() for p in params]
        step = torch.tensor(float(self._flat.step))
        per, glob = [], {}
        for kind, j, key in self._keys():
            t = getattr(self._flat, kind)[j]
            if key.startswith("global_"):
                glob[key] = t
            else:
                per.append((key, t.split(numels)))
        for i, p in enumerate(params):
            st = {"step": step}
            for key, chunks in per:
                st[key] = chunks[i]
            if i == 0:
                st.update(glob)
            self.state[p] = st

    def _move_to(self, device: torch.device) -> None:
        """Follow the parameters when they were moved after construction (``model.to(device)``)."""
        self._device = device
        self.lopt.to(device)
        if self._flat is not None:
            self._flat = self._flat.to(device)
            self._refresh_state()

    @property
    def opt_state(self) -> OptState:
        """The learned optimizer's state over all parameters' coordinates (the flat vector the
        network reads, in parameter order), a fresh one before the first step. Read-only use:
        e.g. to measure the optimizer at the state a training run has reached
        (``l2l_zoo.regularizers.measure_smoothness``)."""
        return self._flat if self._flat is not None else self._fresh(sum(p.numel() for p in self._params()))

    # ------------------------------------------------------------------ param groups
    def add_param_group(self, param_group: dict) -> None:
        """As ``torch.optim.Optimizer.add_param_group``; after the first step the new parameters'
        coordinates start from a fresh state while the existing ones keep theirs exactly."""
        if isinstance(param_group, dict):
            if "lr" in param_group:
                _check_lr(param_group["lr"], "param group lr")
            if "weight_decay" in param_group:
                _check_weight_decay(param_group["weight_decay"], "param group weight_decay")
        n_old = sum(p.numel() for p in self._params())
        super().add_param_group(param_group)
        try:
            for k, p in enumerate(param_group["params"]):
                where = f"parameter {k} (shape {tuple(p.shape)}) of param group {len(self.param_groups) - 1}"
                if p.is_complex():
                    raise ValueError(f"{where} is complex ({p.dtype}); LearnedOptimizerAdapter supports real "
                                     f"floating-point parameters only (optimize torch.view_as_real(p) instead)")
                if not p.is_floating_point():
                    raise ValueError(f"{where} has dtype {p.dtype}; LearnedOptimizerAdapter supports "
                                     f"floating-point parameters only")
                if self._device is None:
                    self._device = p.device
                elif p.device != self._device:
                    raise ValueError(f"{where} is on {p.device}, the others on {self._device}; "
                                     f"LearnedOptimizerAdapter needs all parameters on one device")
        except ValueError:
            self.param_groups.pop()
            if not self.param_groups:
                self._device = None
            raise
        if self._flat is not None:
            self._flat = self._grow(self._flat, n_old)
            self._refresh_state()

    def _grow(self, flat: OptState, n_old: int) -> OptState:
        n = sum(p.numel() for p in self._params())
        fresh = self._fresh(n)

        def grow(kind):
            out = []
            for j, (t, new) in enumerate(zip(getattr(flat, kind), getattr(fresh, kind))):
                if self._percoord[_KINDS.index(kind)][j]:
                    new[:n_old].copy_(t)
                    out.append(new)
                else:
                    out.append(t)
            return tuple(out)
        return OptState(flat.step, grow("stats"), grow("hidden"))

    # ------------------------------------------------------------------ stepping
    @torch.no_grad()
    def step(self, closure=None, *, loss: torch.Tensor | float | None = None):
        """One optimizer step; ``closure`` re-evaluates the model and returns the loss (needed, or
        ``loss=``, by optimizers that read it). Returns the loss."""
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = self._params()
        device = params[0].device
        if device != self._device:
            self._move_to(device)
        cd = self._compute_dtype
        skip_missing = self._none_grad == "skip"
        # (index, param, grad) of every parameter the learned optimizer sees at this step, by group
        active, groups_active = [], []
        i = 0
        for group in self.param_groups:
            members = []
            for p in group["params"]:
                g = p.grad
                if g is not None and g.layout is not torch.strided:
                    raise RuntimeError(f"parameter {i} (shape {tuple(p.shape)}) has a sparse gradient "
                                       f"({g.layout}); LearnedOptimizerAdapter supports dense gradients only")
                if g is not None or not skip_missing:
                    members.append((i, p, g))
                i += 1
            active += members
            if members:
                groups_active.append((group, members))
        if not active:
            return loss  # no parameter has a gradient: nothing to do, as for torch optimizers
        everything = len(active) == len(params)
        grads = torch.cat([(g.reshape(-1) if g is not None else p.new_zeros(p.numel(), dtype=cd)).to(cd)
                           for _, p, g in active])
        step_no = 0 if self._flat is None else self._flat.step
        if not bool(torch.isfinite(grads).all()):
            bad = next((i, p) for i, p, g in active if g is not None and not bool(torch.isfinite(g).all()))
            if self._nonfinite == "raise":
                raise FloatingPointError(
                    f"non-finite gradient in parameter {bad[0]} (shape {tuple(bad[1].shape)}) at step "
                    f"{step_no}; nothing was modified (nonfinite='skip' skips such steps)")
            self.nonfinite_skips += 1
            if not self._warned_nonfinite:
                self._warned_nonfinite = True
                warnings.warn(f"LearnedOptimizerAdapter: skipped step {step_no} because of a non-finite "
                              f"gradient in parameter {bad[0]}; further skips are counted in "
                              f"nonfinite_skips without a warning", RuntimeWarning, stacklevel=3)
            return loss
        kwargs = {}
        if self.lopt.needs_params:  # before the decoupled weight decay (module docstring)
            kwargs["params"] = torch.cat([p.reshape(-1).to(cd) for _, p, _ in active])
        if self.lopt.needs_loss:
            if loss is None:
                raise ValueError(f"{self.lopt.name!r} needs the loss: call step(closure) or step(loss=...)")
            kwargs["loss"] = torch.as_tensor(loss, dtype=cd, device=device).detach()
        lrs = [self._group_lr(group, device) for group, _ in groups_active]
        # Everything checked: from here on the step runs to the end.
        if self._flat is None:
            self._flat = self._fresh(sum(p.numel() for p in params))
        if everything:  # fast path: the whole state, no copies
            updates, self._flat = self.lopt.update(grads, self._flat, **kwargs)
        else:
            ranges = self._active_ranges(params, [i for i, _, _ in active])
            sub = self._gather(self._flat, ranges, grads.numel())
            updates, sub = self.lopt.update(grads, sub, **kwargs)
            self._flat = self._scatter(self._flat, sub, ranges)
        offset = 0
        for (group, members), lr in zip(groups_active, lrs):
            size = sum(p.numel() for _, p, _ in members)
            u = updates[offset:offset + size]
            if isinstance(lr, torch.Tensor) or lr != 1.0:
                u = u * lr  # the same numbers for a float lr and a one-element tensor lr
            wd = group.get("weight_decay", 0.0)
            o = 0
            for _, p, _ in members:
                if wd != 0:
                    p.mul_(1 - lr * wd)
                p.add_(u[o:o + p.numel()].view(p.shape))
                o += p.numel()
            offset += size
        self._refresh_state()
        return loss

    @staticmethod
    def _group_lr(group: dict, device: torch.device):
        """The group's ``lr`` as a float or a 0-d tensor (schedulers may have written either)."""
        lr = group["lr"]
        if not isinstance(lr, torch.Tensor):
            return lr
        if lr.numel() != 1:
            raise ValueError(f"param group lr must be a number or a tensor with exactly one element, got a "
                             f"tensor of shape {tuple(lr.shape)}")
        lr = lr.detach().reshape(())
        # a 0-d CPU tensor acts as a scalar on any device; one on another accelerator is moved
        return lr if lr.device == device or lr.device.type == "cpu" else lr.to(device)

    @staticmethod
    def _active_ranges(params, active_idx) -> list[tuple[int, int]]:
        """Coordinate ranges [a, b) of the flat state covered by the active parameters, with
        neighbouring parameters merged."""
        starts, o = [], 0
        for p in params:
            starts.append(o)
            o += p.numel()
        ranges = []
        for i in active_idx:
            a, b = starts[i], starts[i] + params[i].numel()
            if ranges and ranges[-1][1] == a:
                ranges[-1] = (ranges[-1][0], b)
            else:
                ranges.append((a, b))
        return ranges

    def _gather(self, flat: OptState, ranges, m: int) -> OptState:
        """The state of the coordinates in ``ranges`` (global entries as they are), in a fresh
        allocation of the optimizer's own layout."""
        sub = self._fresh(m)

        def take(kind):
            out = []
            for j, (t, s) in enumerate(zip(getattr(flat, kind), getattr(sub, kind))):
                if not self._percoord[_KINDS.index(kind)][j]:
                    out.append(t)
                    continue
                o = 0
                for a, b in ranges:
                    s[o:o + b - a].copy_(t[a:b])
                    o += b - a
                out.append(s)
            return tuple(out)
        return OptState(flat.step, take("stats"), take("hidden"))

    def _scatter(self, flat: OptState, sub: OptState, ranges) -> OptState:
        """``flat`` with the rows in ``ranges`` replaced by ``sub``'s (a new tensor: the old one may be
        referenced by an earlier ``state_dict()``) and the global entries taken from ``sub``."""
        def put(kind):
            out = []
            for j, (t, s) in enumerate(zip(getattr(flat, kind), getattr(sub, kind))):
                if not self._percoord[_KINDS.index(kind)][j]:
                    out.append(s)
                    continue
                t = t.clone()
                o = 0
                for a, b in ranges:
                    t[a:b].copy_(s[o:o + b - a])
                    o += b - a
                out.append(t)
            return tuple(out)
        return OptState(sub.step, put("stats"), put("hidden"))

    # ------------------------------------------------------------------ copies
    def __getstate__(self):
        state = super().__getstate__()
        state["state"] = {}  # views of _flat: rebuilt by __setstate__ instead of pickled one by one
        state.update({k: self.__dict__[k] for k in self._OWN})
        return state

    def __setstate__(self, state):
        had_differentiable = "differentiable" in state["defaults"]
        super().__setstate__(state)
        if not had_differentiable:  # torch adds it; it is not an option of this optimizer
            self.defaults.pop("differentiable", None)
        self.state = defaultdict(dict)
        self._refresh_state()

    # ------------------------------------------------------------------ (de)serialisation
    def state_dict(self):
        """torch's state dict (per-parameter views of the flat state, see the module docstring) plus
        ``"learned_optimizer": {"name", "config"}`` of the optimizer that wrote it."""
        sd = super().state_dict()
        sd["learned_optimizer"] = {"name": self.lopt.name, "config": self.lopt.config}
        return sd

    def load_state_dict(self, state_dict) -> None:
        """Load a state written by :meth:`state_dict` (also by older versions without the
        ``learned_optimizer`` record). Everything is checked before anything is changed: the learned
        optimizer that wrote it, the keys and shape of every per-parameter entry, the step and the
        param-group options. Hooks run as in ``torch.optim.Optimizer.load_state_dict``; unlike there,
        the state is not cast to the parameters' dtype but kept in ``compute_dtype``."""
        state_dict = state_dict.copy()
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        groups = self.param_groups
        saved_groups = copy.deepcopy(state_dict["param_groups"])
        if len(groups) != len(saved_groups):
            raise ValueError(f"loaded state dict has {len(saved_groups)} parameter groups, this optimizer "
                             f"{len(groups)}")
        for k, (g, s) in enumerate(zip(groups, saved_groups)):
            if len(g["params"]) != len(s["params"]):
                raise ValueError(f"loaded state dict's parameter group {k} has {len(s['params'])} "
                                 f"parameters, this optimizer's {len(g['params'])}")
        name = self.lopt.name
        for k, s in enumerate(saved_groups):
            flags = sorted(set(s) & set(_TORCH_OPTIM_FLAGS))
            if flags:
                raise ValueError(f"loaded state dict's parameter group {k} has the torch.optim options {flags}: "
                                 f"it is the state of a torch.optim optimizer (SGD, Adam, ...), not of a "
                                 f"LearnedOptimizerAdapter running {name!r}")
            if "lr" in s:
                _check_lr(s["lr"], f"loaded parameter group {k}: lr")
            if "weight_decay" in s:
                _check_weight_decay(s["weight_decay"], f"loaded parameter group {k}: weight_decay")
        record = state_dict.get("learned_optimizer")
        if record is not None and (record.get("name") != name
                                   or _plain(record.get("config")) != _plain(self.lopt.config)):
            raise ValueError(f"loaded state dict was written for learned optimizer {record.get('name')!r} with "
                             f"config {record.get('config')}, this adapter runs {name!r} with config "
                             f"{self.lopt.config}")
        saved_ids = list(chain.from_iterable(s["params"] for s in saved_groups))
        flat = self._flat_from_state(state_dict["state"], saved_ids)

        param_groups = []
        for g, s in zip(groups, saved_groups):
            s["params"] = g["params"]
            if "param_names" in g and "param_names" not in s:
                s["param_names"] = g["param_names"]
            for key, default in self.defaults.items():  # e.g. weight_decay, absent in older state dicts
                s.setdefault(key, default)
            param_groups.append(s)
        self.param_groups = param_groups
        self.state = defaultdict(dict)
        self._flat = flat
        self._refresh_state()
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _flat_from_state(self, saved_state: dict, saved_ids: list) -> OptState | None:
        """Validate the per-parameter entries of a loaded state and assemble the flat state (None for
        an empty state: the optimizer has not stepped)."""
        if not saved_state:
            return None
        params = self._params()
        name = self.lopt.name
        unknown = sorted(set(saved_state) - set(saved_ids), key=repr)
        if unknown:
            raise ValueError(f"loaded state dict has state for parameter ids {unknown} that are in none of its "
                             f"parameter groups {saved_ids}")
        missing = [i for i, sid in enumerate(saved_ids) if sid not in saved_state]
        if missing:
            raise ValueError(f"loaded state dict has no state for parameters {missing} (of {len(params)}); a "
                             f"LearnedOptimizerAdapter keeps state for every parameter once it has stepped")
        flat = self._fresh(sum(p.numel() for p in params))
        keys = self._keys()
        steps = []
        offset = 0
        for i, (p, sid) in enumerate(zip(params, saved_ids)):
            st = saved_state[sid]
            expected = {"step"} | {key for _, _, key in keys if i == 0 or not key.startswith("global_")}
            found = set(st) if isinstance(st, dict) else set()
            if found != expected:
                raise ValueError(f"state of parameter {i} has keys {sorted(found, key=str)}; a "
                                 f"LearnedOptimizerAdapter running {name!r} expects {sorted(expected)} (is this "
                                 f"the state of another optimizer?)")
            step = st["step"]
            if isinstance(step, torch.Tensor) and step.numel() == 1:
                step = step.item()
            if isinstance(step, bool) or not isinstance(step, numbers.Real) or not (
                    math.isfinite(step) and step >= 0 and float(step).is_integer()):
                raise ValueError(f"state of parameter {i}: step must be an integer >= 0 (a number or a "
                                 f"one-element tensor), got {st['step']!r}")
            steps.append(int(step))
            for kind, j, key in keys:
                if key not in st:
                    continue
                target = getattr(flat, kind)[j]
                per = not key.startswith("global_")
                dest = target[offset:offset + p.numel()] if per else target
                v = st[key]
                if not isinstance(v, torch.Tensor) or tuple(v.shape) != tuple(dest.shape):
                    got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                    raise ValueError(f"state entry {key!r} of parameter {i} (shape {tuple(p.shape)}, "
                                     f"{p.numel()} coordinates) has shape {got}, expected {tuple(dest.shape)}")
            offset += p.numel()
        if len(set(steps)) != 1:
            raise ValueError(f"the parameters' states have different steps {sorted(set(steps))}; a "
                             f"LearnedOptimizerAdapter has one step counter")
        # All checked: copy into the fresh allocation (cast to compute_dtype, moved to the device).
        offset = 0
        for p, sid in zip(params, saved_ids):
            st = saved_state[sid]
            for kind, j, key in keys:
                if key in st:
                    target = getattr(flat, kind)[j]
                    (target if key.startswith("global_") else target[offset:offset + p.numel()]).copy_(st[key])
            offset += p.numel()
        return OptState(steps[0], flat.stats, flat.hidden)
