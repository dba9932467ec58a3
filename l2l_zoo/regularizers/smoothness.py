"""Smoothness-inducing regularizer for learned optimizers ("Learning to learn with smooth
regularization", §4.2-4.3, eqs. 3-7, Algorithm 1).

    R(s) = max_{s' ∈ B∞(s, ε)} ‖u(s) − u(s')‖²,   hidden state h held fixed,

approximated by projected sign-gradient ascent (eq. 7): s' ← s + noise·N(0, I) (Alg. 1 line 8),
then K times s' ← Π_{B∞(s,ε)}(s' + η sign ∇_{s'} ‖u(s) − u(s')‖²). The per-step meta-loss becomes
ℓ_t + λ R_t (eq. 4).

The regularizer only uses the ``LearnedOptimizer`` contract (``network(feats, hidden)``), so it applies
to every optimizer unchanged. Design choices (documented because the paper is silent):

* ‖·‖² is averaged over coordinates (not summed), so λ does not depend on the optimizee's size.
* The input state s and hidden state h enter as data (detached): R is a property of the map
  (s, h) ↦ u, and its gradient reaches the meta-parameters through the network weights only.
* For coordinate-wise optimizers the ball is a product of per-coordinate intervals, so the maximisation
  decouples by coordinate and R is a mean over coordinates: a uniform random subsample of
  ``subsample`` coordinates per step estimates it without bias (DM, RNNProp). With cross-coordinate
  terms (SimpleOptimizer's mean embedding) the embedding is recomputed on the subsample, an
  approximation. ``subsample=0`` uses every coordinate. ``benchmarks/smooth_subsample.py`` measures
  the effect of the default.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass

import torch

from ..base import LearnedOptimizer

__all__ = ["SmoothnessConfig", "SmoothnessRegularizer", "parse_smooth", "PerturbedInput", "measure_smoothness",
           "response_curve", "input_noise_seed", "STARTS", "sample_without_replacement"]


@dataclass(frozen=True)
class SmoothnessConfig:
    """``eps``: ball radius ε (L∞). ``lam``: λ. ``steps``: K PGD steps (public code: 10).
    ``step_size``: η1 (default ε/5, public code). ``noise``: std of the random start (paper 0.05).
    ``subsample``: coordinates per step (0: all). ``corners``: 1 runs PGD also from the two corners
    s ± ε (every input moved the same way) and keeps the largest penalty per step; 0 (default) is
    the paper's random start alone, which can miss that worst case for an optimizer that couples
    coordinates (SimpleOptimizer's mean embedding: ``benchmarks/smoothness_probe.py``); 3× the PGD work."""

    eps: float = 0.1
    lam: float = 1.0
    steps: int = 10
    step_size: float | None = None
    noise: float = 0.05
    subsample: int = 4096
    corners: int = 0

    def __post_init__(self):
        for k in ("steps", "subsample"):
            v = getattr(self, k)
            if not (isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 0):
                raise ValueError(f"SmoothnessConfig: {k} must be an integer >= 0, got {v!r}")
        for k, bound in (("eps", "> 0"), ("lam", ">= 0"), ("noise", ">= 0"), ("step_size", "> 0")):
            v = getattr(self, k)
            if k == "step_size" and v is None:
                continue
            if not (isinstance(v, numbers.Real) and not isinstance(v, bool)
                    and (v >= 0 if bound == ">= 0" else v > 0)):  # NaN fails both comparisons
                raise ValueError(f"SmoothnessConfig: {k} must be {bound}, got {v!r}")
            if not math.isfinite(v):
                raise ValueError(f"SmoothnessConfig: {k} must be finite, got {v!r}")
        if self.corners not in (0, 1) or isinstance(self.corners, bool):
            raise ValueError(f"SmoothnessConfig: corners must be 0 or 1, got {self.corners!r}")
        if self.steps > 0 and self.noise == 0:
            raise ValueError("SmoothnessConfig: noise must be > 0 when steps > 0 (the gradient of "
                             "|u(s) - u(s')|^2 vanishes at s' = s, so PGD cannot leave a zero-noise start)")

    @property
    def eta(self) -> float:
        return self.eps / 5.0 if self.step_size is None else self.step_size

    def to_dict(self) -> dict:
        d = {**asdict(self), "step_size": self.eta}
        if not self.corners:  # added later: left out at its default, so earlier identities hold
            del d["corners"]
        return d


_TYPES = {"eps": float, "lam": float, "steps": int, "step_size": float, "noise": float, "subsample": int,
          "corners": int}


def parse_smooth(spec: str) -> SmoothnessConfig:
    """Parse ``"eps=0.1[,lam=1,steps=10,step_size=0.02,noise=0.05,subsample=4096,corners=0]"``.

    Raises ``ValueError`` with a one-line message, prefixed ``--smooth:`` (the spec is what a user
    typed), naming the bad or repeated key or value and what is allowed.
    """
    if not isinstance(spec, str):
        raise ValueError(f"--smooth: expected a string of key=value pairs, got {type(spec).__name__}")
    kwargs = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        if "=" not in item:
            raise ValueError(f"--smooth: expected key=value, got {item!r}; keys: {sorted(_TYPES)}")
        key, val = (s.strip() for s in item.split("=", 1))
        if key not in _TYPES:
            raise ValueError(f"--smooth: unknown key {key!r}; allowed: {sorted(_TYPES)}")
        if key in kwargs:
            raise ValueError(f"--smooth: key {key!r} given more than once in {spec!r}")
        try:
            num = float(val)
            if _TYPES[key] is int:
                if not math.isfinite(num) or num != int(num):
                    raise ValueError
                num = int(num)
        except ValueError:
            kind = "an integer" if _TYPES[key] is int else "a number"
            raise ValueError(f"--smooth: {key} must be {kind}, got {val!r}") from None
        kwargs[key] = num
    if "eps" not in kwargs:
        raise ValueError(f"--smooth: eps is required (e.g. eps=0.1), got {spec!r}")
    try:
        return SmoothnessConfig(**kwargs)
    except ValueError as e:
        raise ValueError(f"--smooth: {str(e).removeprefix('SmoothnessConfig: ')}") from None


class SmoothnessRegularizer:
    """Computes R_t for one optimizer step; see the module docstring."""

    def __init__(self, config: SmoothnessConfig | None = None, **kwargs):
        self.config = config if config is not None else SmoothnessConfig(**kwargs)

    def select(self, lopt: LearnedOptimizer, feats: torch.Tensor, hidden: tuple,
               generator: torch.Generator | None = None):
        """The (sub)sample of coordinates the penalty is evaluated on: (feats, hidden) detached."""
        k = self.config.subsample
        n = feats.shape[0]
        feats, hidden = feats.detach(), tuple(h.detach() for h in hidden)
        if lopt.coordinatewise and 0 < k < n:
            idx = sample_without_replacement(n, k, generator).to(feats.device)
            feats = feats[idx]
            hidden = tuple(h[idx] if h.dim() > 0 and h.shape[0] == n else h for h in hidden)
        return feats, hidden

    def perturb(self, lopt: LearnedOptimizer, feats: torch.Tensor, hidden: tuple, u_ref: torch.Tensor,
                generator: torch.Generator | None = None, start: torch.Tensor | None = None,
                network=None) -> torch.Tensor:
        """PGD (eq. 7): the worst-case s' in B∞(feats, ε), detached. Starts from ``start`` if given,
        else from s + noise·N(0, I) (Alg. 1 line 8), projected into the ball. ``network`` replaces
        ``lopt.network`` (:meth:`penalties` passes a batched one)."""
        c = self.config
        network = network or lopt.network
        lo, hi = feats - c.eps, feats + c.eps
        if start is None:
            noise = torch.randn(feats.shape, generator=generator, dtype=feats.dtype).to(feats.device)
            start = feats + c.noise * noise
        s_adv = torch.maximum(torch.minimum(start, hi), lo)
        u_ref = u_ref.detach()
        for _ in range(c.steps):
            s_adv = s_adv.detach().requires_grad_(True)
            with torch.enable_grad():
                d = (network(s_adv, hidden)[0] - u_ref).pow(2).sum()
                (grad,) = torch.autograd.grad(d, s_adv)
            s_adv = torch.maximum(torch.minimum(s_adv.detach() + c.eta * grad.sign(), hi), lo)
        return s_adv.detach()

    def __call__(self, lopt: LearnedOptimizer, feats: torch.Tensor, hidden: tuple,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """R = mean over (sampled) coordinates of (u(s) − u(s'))², differentiable in the
        meta-parameters. ``feats``/``hidden`` are the step's input state and the hidden state
        *before* the step."""
        return self.penalties(lopt, [self.prepare(lopt, feats, hidden, generator)])[0]

    # ------------------------------------------------------------------ deferred, batched penalties
    def prepare(self, lopt: LearnedOptimizer, feats: torch.Tensor, hidden: tuple,
                generator: torch.Generator | None = None) -> tuple:
        """The part of ``__call__`` that draws random numbers (the coordinate sample, then the PGD
        start), in the same order and from the same generator: ``penalties([prepare(...) for each
        step])`` equals ``[__call__(...) for each step]``. Since s and h enter as data, R_t does not
        depend on later steps, so the PGD of a whole truncation can run once at its end."""
        feats, hidden = self.select(lopt, feats, hidden, generator)
        noise = torch.randn(feats.shape, generator=generator, dtype=feats.dtype).to(feats.device)
        return feats, hidden, feats + self.config.noise * noise

    def penalties(self, lopt: LearnedOptimizer, prepared: list, batched: bool = True) -> torch.Tensor:
        """R_t for every prepared step, shape (T,), differentiable in the meta-parameters.

        The T PGD problems are independent, so they run together: K network evaluations over all
        T steps instead of T·K small ones (on CPU the small ones are dominated by per-call overhead).
        A separable optimizer (rows independent) evaluates the T·k stacked coordinates in one
        ordinary call; one with a ``network_segments(feats (T, k, F), hidden) -> u (T, k)`` method
        (SimpleOptimizer) through that; another vmappable one through ``torch.func.vmap`` over the steps (its
        cross-coordinate terms stay per step); otherwise, or when the steps' shapes differ, one step
        at a time (also for an object without the ``vmappable`` flag: the regularizer needs only
        ``network`` and ``coordinatewise``, or with ``batched=False``: the reference)."""
        if not prepared:
            return torch.zeros(0)
        shapes = {(f.shape, tuple(h.shape for h in hd)) for f, hd, _ in prepared}
        if not batched or len(prepared) == 1 or len(shapes) > 1 or not getattr(lopt, "vmappable", False):
            out = []
            for f, hd, start in prepared:
                u = lopt.network(f, hd)[0]
                r = [(u - lopt.network(self.perturb(lopt, f, hd, u, start=s0), hd)[0]).pow(2).mean()
                     for s0 in self._starts(f, start)]
                out.append(r[0] if len(r) == 1 else torch.stack(r).max())
            return torch.stack(out)
        T = len(prepared)
        F = torch.stack([f for f, _, _ in prepared])
        S0 = torch.stack([s for _, _, s in prepared])
        H = tuple(torch.stack(hs) for hs in zip(*(hd for _, hd, _ in prepared)))
        if getattr(lopt, "separable", False) and all(h.dim() >= 2 for h in H):
            k = F.shape[1]

            def network(f, hd):
                fold = lambda t: t.reshape(T * k, *t.shape[2:])  # noqa: E731
                u, _ = lopt.network(fold(f), tuple(map(fold, hd)))
                return u.reshape(T, k), None
        elif callable(getattr(lopt, "network_segments", None)):  # the optimizer's own stacked form

            def network(f, hd):
                return lopt.network_segments(f, hd), None
        else:
            vnet = torch.func.vmap(lambda f, hd: lopt.network(f, hd)[0])

            def network(f, hd):
                return vnet(f, hd), None

        u = network(F, H)[0]
        r = [(u - network(self.perturb(lopt, F, H, u, start=s0, network=network), H)[0]).pow(2).reshape(T, -1).mean(1)
             for s0 in self._starts(F, S0)]
        return r[0] if len(r) == 1 else torch.stack(r).max(0).values

    def _starts(self, feats: torch.Tensor, noisy: torch.Tensor) -> list:
        """PGD's starting points: the random one, and with ``corners`` the two corners s ± ε."""
        eps = self.config.eps
        return [noisy, feats + eps, feats - eps] if self.config.corners else [noisy]


# ============================================================================ measuring smoothness

def sample_without_replacement(n: int, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``k`` distinct indices from ``range(n)``, every k-subset equally likely, in random order.

    For ``k <= n / 8`` it draws ``m`` indices with replacement (``m`` = k plus the expected number of
    repeats k²/2n plus a margin), keeps the distinct ones (given how many there are, a uniformly
    random subset of that size, since the draws are exchangeable) and takes a uniformly random ``k``
    of them, redrawing in the rare case that fewer than ``k`` are distinct: O(k log k) work instead of
    ``randperm(n)``'s O(n) (the flagship: 4,096 of 397,510 coordinates per step, where ``randperm``
    took 9 % of a smoothed truncation). Otherwise ``randperm(n)[:k]``."""
    if k * 8 > n:
        return torch.randperm(n, generator=generator)[:k]
    dup = k * k / (2 * n)
    m = k + int(math.ceil(dup + 6 * math.sqrt(dup) + 8))
    while True:
        distinct = torch.unique(torch.randint(n, (m,), generator=generator))
        if distinct.numel() >= k:
            return distinct[torch.randperm(distinct.numel(), generator=generator)[:k]]


def input_noise_seed(seed: int, step: int) -> int:
    """Seed of the noise drawn at optimizer step ``step`` of a run with noise seed ``seed``: one
    generator per step, so the noise depends only on (seed, step) and a resumed run draws exactly
    what an uninterrupted one would (nothing random lives in the optimizer's state)."""
    return (int(seed) << 32) | int(step)


class PerturbedInput(LearnedOptimizer):
    """``lopt`` with its input state perturbed at every step: s_t + σ_t·δ_t, δ_t ~ N(0, I), the
    hidden state and everything else unchanged ("Learning to learn with smooth regularization",
    appendix D, Fig. 7: loss_ps − loss_ns measures how much an optimizer's trajectory suffers from
    noise in what it reads). Used for evaluation through the ``torch.optim`` adapter; δ_t comes from
    a generator seeded by :func:`input_noise_seed` (``seed``, step), shape ``feats.shape``.

    σ_t = ``std``, or with ``relative=True`` ``std`` times the root mean square of s_t over all its
    entries. The paper perturbs a state normalised by the gradient's second moment (entries of order
    one) with N(0, I); an optimizer that reads the raw gradient (SimpleOptimizer here, entries of
    order 1e-3 on the MNIST MLP) sees the comparable perturbation with ``relative=True, std=1``.

    Works for every optimizer whose step is the contract's ``features`` then ``network`` (not
    MLR-SNet, whose network output is a learning rate combined with a base direction in its own
    ``step``)."""

    vmappable = False  # a seeded generator per step cannot run under vmap

    def __init__(self, lopt: LearnedOptimizer, *, std: float, relative: bool = False, seed: int = 0):
        if not isinstance(lopt, LearnedOptimizer):
            raise TypeError(f"PerturbedInput wraps a LearnedOptimizer, got {type(lopt).__name__}")
        if type(lopt).step is not LearnedOptimizer.step:
            raise ValueError(f"PerturbedInput: {lopt.name!r} overrides step() (its network output is not "
                             "the update), so its input state cannot be perturbed through the contract")
        if not (isinstance(std, numbers.Real) and not isinstance(std, bool) and math.isfinite(std) and std >= 0):
            raise ValueError(f"PerturbedInput: std must be a finite number >= 0, got {std!r}")
        super().__init__(std=float(std), relative=bool(relative), seed=int(seed))
        self.inner = lopt
        self.name = lopt.name
        for flag in ("coordinatewise", "separable", "needs_loss", "needs_params"):
            setattr(self, flag, getattr(lopt, flag))

    @property
    def config(self) -> dict:
        """The wrapped optimizer's configuration (what the adapter records) plus the noise's."""
        return {**self.inner.config, "input_noise": dict(self._config)}

    def init_state(self, n, *, device=None, dtype=None):
        return self.inner.init_state(n, device=device, dtype=dtype)

    def initial_params(self, params):
        return self.inner.initial_params(params)

    def features(self, grads, state, *, params=None, loss=None):
        feats, stats = self.inner.features(grads, state, params=params, loss=loss)
        std = self._config["std"]
        if std > 0:
            gen = torch.Generator().manual_seed(input_noise_seed(self._config["seed"], state.step))
            noise = torch.randn(feats.shape, generator=gen, dtype=feats.dtype).to(feats.device)
            if self._config["relative"]:
                std = std * feats.detach().pow(2).mean().sqrt()
            feats = feats + std * noise
        return feats, stats

    def network(self, feats, hidden):
        return self.inner.network(feats, hidden)


#: where :func:`measure_smoothness` starts PGD: the regularizer's own random start, and the two
#: corners that move every input by the same ±ε (``SmoothnessConfig(corners=1)``'s starts, in order)
STARTS = ("noise", "+eps", "-eps")


def measure_smoothness(lopt: LearnedOptimizer, feats: torch.Tensor, hidden: tuple, eps: float, *,
                       steps: int = 20, subsample: int = 0, noise: float = 0.05, starts=STARTS,
                       generator: torch.Generator | None = None) -> dict:
    """How non-smooth ``lopt`` is at one input state: R_ε(s) = max_{s' ∈ B∞(s, ε)} mean_i (u_i(s) −
    u_i(s'))² (eq. 3, with the regularizer's mean over coordinates), with the meta-parameters held
    fixed, by ``steps`` PGD steps (eq. 7; more than the training default of 10, since here it is
    the quantity measured) from each of ``starts``, the largest value kept (PGD finds a lower bound;
    several starts, as in adversarial-robustness evaluation, tighten it). The starts matter for an
    optimizer that couples coordinates: SimpleOptimizer's mean embedding makes moving every input
    the same way the worst case, which PGD from the regularizer's random start (``"noise"``: s +
    ``noise``·N(0, I), projected) does not find when ``noise`` ≫ ε, since each coordinate's
    sign-gradient then keeps its random direction; ``"+eps"``/``"-eps"`` start at s ± ε.
    ``subsample=0`` evaluates every coordinate (exact for the mean embedding too).

    Returns ``{"R": R_ε, "R_noise": R_ε from the regularizer's start alone (what training
    penalises), "u_rms": √mean_i u_i(s)², "rel": √R_ε / u_rms}``: ``rel`` is the worst-case change
    of the update within the ball relative to the update's own size (an optimizer that merely takes
    smaller steps has a smaller R but not a smaller ``rel``)."""
    bad = [x for x in starts if x not in STARTS]
    if bad or not starts:
        raise ValueError(f"starts must be a non-empty selection of {STARTS}, got {starts!r}")
    reg = SmoothnessRegularizer(SmoothnessConfig(eps=eps, lam=1.0, steps=steps, subsample=subsample, noise=noise,
                                                 corners=1))
    with torch.no_grad():
        u_rms = float(lopt.network(feats.detach(), tuple(h.detach() for h in hidden))[0].pow(2).mean().sqrt())
        f, h = reg.select(lopt, feats, hidden, generator)
        u = lopt.network(f, h)[0]
        noisy = f + noise * torch.randn(f.shape, generator=generator, dtype=f.dtype).to(f.device)
    candidates = dict(zip(STARTS, reg._starts(f, noisy)))  # the regularizer's own starts, in STARTS' order
    found = {}
    for name in starts:
        s_adv = reg.perturb(lopt, f, h, u, start=candidates[name])  # differentiates with respect to s' only
        with torch.no_grad():
            found[name] = float((u - lopt.network(s_adv, h)[0]).pow(2).mean())
    r = max(found.values())
    return {"R": r, "R_noise": found.get("noise"), "u_rms": u_rms,
            "rel": math.sqrt(r) / u_rms if u_rms > 0 else math.inf}


def response_curve(lopt: LearnedOptimizer, feats: torch.Tensor, hidden: tuple, coords, deltas) -> torch.Tensor:
    """The update of coordinates ``coords`` as their input state moves: row k holds
    u_i(s + δ_k·e) − u_i(s) for i in ``coords`` (e: 1 on the input features of ``coords``, 0
    elsewhere), the hidden state fixed; the smoothness paper's Fig. 2 ("an illustration of the
    non-smoothness in the neural optimizer") as a measurement. Shape (len(deltas), len(coords)).
    Every coordinate of ``feats`` takes part in each evaluation (cross-coordinate terms such as
    SimpleOptimizer's mean embedding see the moved coordinates too)."""
    idx = torch.as_tensor(list(coords), dtype=torch.long, device=feats.device)
    with torch.no_grad():
        u0 = lopt.network(feats, hidden)[0][idx]
        rows = []
        for d in deltas:
            f = feats.clone()
            f[idx] += float(d)
            rows.append(lopt.network(f, hidden)[0][idx] - u0)
    return torch.stack(rows)
