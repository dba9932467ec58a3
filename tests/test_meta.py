"""Meta-training: backends agree, meta-gradients match float64 finite differences, meta-loss
weightings, resume is exact, non-finite meta-updates are skipped and eventually abort."""
import copy

import pytest
import torch
import torch.nn.functional as F

import l2l_zoo
from l2l_zoo.meta import MetaTrainConfig, MetaTrainer, MetaTrainingDiverged, adapt, meta_loss, step_weights
from l2l_zoo.regularizers import SmoothnessConfig
from l2l_zoo.tasks import MLP, DataSplits, QuadraticTask, Task

from conftest import LOPT_OPTIONS

# every registered optimizer gets these tests because it is registered
ALL = l2l_zoo.available()


def tiny_mlp_task(dtype=torch.float64, seed=0):
    """Synthetic 2-class problem for exact-math checks (quality claims use real data elsewhere)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 6, generator=g, dtype=dtype)
    y = (x[:, 0] + x[:, 1] > 0).long()
    d = DataSplits("toy", x, y, x, y, x, y, 2, "synthetic")
    return Task("toy_mlp", lambda: MLP(6, (5,), 2).to(dtype), d, batch_size=16)


def make_lopt(name, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return l2l_zoo.create(name, **LOPT_OPTIONS.get(name, {})).to(dtype)


def meta_grad(name, task, backend, second_order, smooth=None, seed=0, steps=4, theta=None, ckpt=False):
    lopt = make_lopt(name, seed)
    if theta is not None:
        torch.nn.utils.vector_to_parameters(theta, lopt.parameters())
    cfg = MetaTrainConfig(backend=backend, second_order=second_order, unroll=steps, horizon=steps,
                          seed=seed, smooth=smooth, checkpoint_network=ckpt)
    tr = MetaTrainer(lopt, task, cfg, log=lambda s: None)
    ml, grads = tr.meta_gradient()
    return ml, torch.cat([g.reshape(-1) for g in grads]), lopt


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("second_order", [False, True])
def test_backends_give_the_same_meta_gradient(name, second_order):
    task = tiny_mlp_task()
    ml_f, g_f, _ = meta_grad(name, task, "func", second_order)
    ml_h, g_h, _ = meta_grad(name, task, "higher", second_order)
    torch.testing.assert_close(ml_f, ml_h, rtol=1e-10, atol=0)
    rel = (g_f - g_h).norm() / g_f.norm()
    assert g_f.norm() > 0 and rel < 1e-6, f"relative difference {rel:.2e}"


@pytest.mark.parametrize("name", ALL)
def test_network_checkpointing_gives_the_same_meta_gradient(name):
    task = tiny_mlp_task()
    ml_a, g_a, _ = meta_grad(name, task, "func", False, smooth=SmoothnessConfig(eps=0.1, steps=2))
    ml_b, g_b, _ = meta_grad(name, task, "func", False, smooth=SmoothnessConfig(eps=0.1, steps=2), ckpt=True)
    torch.testing.assert_close(ml_a, ml_b, rtol=1e-12, atol=0)
    torch.testing.assert_close(g_a, g_b, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("name", ALL)
def test_meta_gradient_matches_finite_differences(name):
    """Exact (second-order) meta-gradient vs float64 central differences along random directions.
    Optimizers whose input is the loss (``needs_loss``, MLR-SNet) are left out: that input is data by
    design, detached as in MLR-SNet's Algorithm 1, so their meta-gradient is not the total
    derivative; tests/test_mlrsnet.py checks MLR-SNet's own against finite differences."""
    if l2l_zoo.REGISTRY[name].needs_loss:
        pytest.skip(f"{name} reads the (detached) loss: its meta-gradient is not the total derivative")
    task = QuadraticTask(5, seed=3, dtype=torch.float64, noise=0.1)
    ml, g, lopt = meta_grad(name, task, "func", second_order=True, steps=5)
    theta = torch.nn.utils.parameters_to_vector(lopt.parameters()).detach()
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        v = torch.randn(theta.shape, generator=gen, dtype=torch.float64)
        v /= v.norm()
        h = 1e-6
        fp, *_ = meta_grad(name, task, "func", True, steps=5, theta=theta + h * v)
        fm, *_ = meta_grad(name, task, "func", True, steps=5, theta=theta - h * v)
        fd = (fp - fm) / (2 * h)
        an = torch.dot(g, v)
        assert abs(fd - an) <= 1e-6 * max(1.0, abs(an)), f"{name}: FD {fd:.10g} vs autograd {an:.10g}"


def test_trainer_applies_mlrsnet_rate_times_base_direction():
    """MLR-SNet's network outputs a learning rate: the unrolled trajectory must follow
    ``lopt.update`` (−lr · momentum direction, checked against torch.optim in test_mlrsnet.py), not
    the raw network output."""
    task = QuadraticTask(5, seed=0, dtype=torch.float64)
    lopt = make_lopt("mlrsnet")
    tr = MetaTrainer(lopt, task, MetaTrainConfig(unroll=3, horizon=3, seed=0), log=lambda s: None)
    run = tr._new_run()
    x, st, loss, g = run.x.clone(), run.state, run.loss, run.grad
    _, losses, _, P, *_ = tr._truncation(run, 3)
    with torch.no_grad():
        for _ in range(3):
            upd, st = lopt.update(g, st, loss=loss)
            x = x + upd
            with torch.enable_grad():
                xr = x.clone().requires_grad_(True)
                loss = task.loss(task.w @ xr, task.y)
                g = torch.autograd.grad(loss, xr)[0]
    torch.testing.assert_close(x, P.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(loss, losses[-1].detach(), rtol=1e-10, atol=1e-12)


def test_first_order_meta_gradient_differs_from_exact():
    """Detaching optimizee gradients (the default) is an approximation: it must actually differ."""
    task = QuadraticTask(5, seed=3, dtype=torch.float64)
    _, g1, _ = meta_grad("dm", task, "func", second_order=False, steps=5)
    _, g2, _ = meta_grad("dm", task, "func", second_order=True, steps=5)
    assert (g1 - g2).norm() / g2.norm() > 1e-6  # identical code paths would agree to ~1e-15


def test_meta_loss_weightings():
    f = [torch.tensor(v, dtype=torch.float64) for v in (4.0, 3.0, 1.0, 0.5)]
    assert meta_loss("sum", f) == pytest.approx((3 + 1 + 0.5) / 3)
    assert meta_loss("last", f) == pytest.approx(0.5)
    w = [1, 4, 9]
    assert meta_loss("wdiff", f) == pytest.approx(sum(wi * d for wi, d in zip(w, (-1, -2, -0.5))) / 14)
    assert meta_loss("linear", f) == pytest.approx((1 * 3 + 2 * 1 + 3 * 0.5) / 6)
    pen = [torch.tensor(1.0, dtype=torch.float64)] * 3
    assert meta_loss("last", f, pen, lam=2.0) == pytest.approx(0.5 + 2.0)
    torch.testing.assert_close(step_weights("wdiff", 20).sum(), torch.tensor(1.0))
    with pytest.raises(KeyError, match="unknown meta-loss"):
        step_weights("mean", 3)


def test_config_validation_messages():
    with pytest.raises(ValueError, match="meta_loss must be one of"):
        MetaTrainConfig(meta_loss="avg")
    with pytest.raises(ValueError, match="unroll must be >= 1, got 0"):
        MetaTrainConfig(unroll=0)


def test_paper_defaults_are_used():
    tr = MetaTrainer(make_lopt("rnnprop", dtype=torch.float32), QuadraticTask(4), log=lambda s: None)
    assert (tr.cfg.meta_loss, tr.cfg.meta_lr, tr.cfg.random_scale) == ("last", 1e-4, 3.0)
    tr = MetaTrainer(make_lopt("simple", dtype=torch.float32), QuadraticTask(4), log=lambda s: None)
    assert (tr.cfg.meta_loss, tr.cfg.meta_lr, tr.cfg.horizon, tr.cfg.unroll) == ("wdiff", 1e-3, 200, 20)


def test_random_scaling_changes_the_problem_not_the_start():
    """Lv et al. §3.1: the optimizer sees x = θ/c and the loss is f(c·x): same starting loss."""
    task = QuadraticTask(6, seed=0)
    a = MetaTrainer(make_lopt("rnnprop", dtype=torch.float32), task,
                    MetaTrainConfig(random_scale=0.0), log=lambda s: None)._new_run()
    b = MetaTrainer(make_lopt("rnnprop", dtype=torch.float32), task,
                    MetaTrainConfig(random_scale=3.0), log=lambda s: None)._new_run()
    assert b.scale is not None and (b.scale.log().abs() <= 3.0).all() and b.scale.std() > 0
    torch.testing.assert_close(a.loss, b.loss)
    torch.testing.assert_close(b.x * b.scale, a.x)


def _trainer(tmp_path, lopt_seed=0, **kw):
    task = QuadraticTask(8, seed=1, noise=0.5)
    lopt = make_lopt("simple", seed=lopt_seed, dtype=torch.float32)
    cfg = MetaTrainConfig(meta_steps=7, horizon=5, unroll=2, checkpoint_every=2, seed=0,
                          smooth=SmoothnessConfig(eps=0.1, steps=2, subsample=4), **kw)
    return MetaTrainer(lopt, task, cfg, checkpoint_path=tmp_path / "ck.pt", log=lambda s: None)


def test_resume_after_kill_ends_with_identical_meta_parameters(tmp_path):
    ref = _trainer(tmp_path / "a")
    ref.train(progress=False)

    killed = _trainer(tmp_path / "b")

    def kill(step, rec):
        if step == 5:  # last checkpoint was at meta-step 4: meta-step 5 is lost and redone
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        killed.train(progress=False, callback=kill)
    resumed = _trainer(tmp_path / "b", lopt_seed=123)  # a fresh process: different initial weights
    resumed.train(resume=True, progress=False)
    assert resumed.meta_step == 7
    for p, q in zip(ref.lopt.parameters(), resumed.lopt.parameters()):
        assert torch.equal(p, q)
    assert [r["meta_loss"] for r in ref.history] == [r["meta_loss"] for r in resumed.history]


def test_resume_refuses_a_different_setup(tmp_path):
    a = _trainer(tmp_path)
    a.cfg.meta_steps = 2
    a.train(progress=False)
    b = _trainer(tmp_path, meta_loss="sum")
    with pytest.raises(ValueError, match="different setup"):
        b.train(resume=True, progress=False)


def test_non_finite_meta_loss_is_skipped_and_restored(tmp_path):
    tr = _trainer(tmp_path)
    tr.cfg.meta_steps = 3
    logs = []
    tr.log = logs.append
    real_loss = tr.task.loss
    calls = {"n": 0}

    def flaky(out, y):
        calls["n"] += 1
        v = real_loss(out, y)
        return v * float("nan") if calls["n"] == 6 else v  # poison one step of the 2nd truncation

    tr.task.loss = flaky
    tr.train(progress=False)
    assert tr.meta_step == 3 and tr.total_failures == 1
    assert any("non-finite meta-loss" in m and "restored" in m for m in logs)
    assert all(torch.isfinite(p).all() for p in tr.lopt.parameters())


def test_repeated_failures_abort_with_clear_message(tmp_path):
    tr = _trainer(tmp_path)
    tr.task.loss = lambda out, y: ((out - y) ** 2).sum() * float("inf")
    before = copy.deepcopy(tr.lopt.state_dict())
    with pytest.raises(MetaTrainingDiverged, match="5 consecutive non-finite meta-updates"):
        tr.train(progress=False)
    for k, v in tr.lopt.state_dict().items():
        assert torch.equal(v, before[k])


def test_meta_training_on_real_mnist_beats_the_untrained_optimizer(mnist_small):
    """A tiny end-to-end run: 20 meta-steps of SimpleOptimizer on a small MNIST MLP must train fresh
    models (unseen seeds) to a lower training loss than the optimizer it started from."""
    from l2l_zoo.evaluation import train_optimizee
    task = Task("mlp_small", lambda: MLP(784, (32,), 10), mnist_small, batch_size=64)
    torch.manual_seed(0)
    lopt = l2l_zoo.create("simple")
    untrained = copy.deepcopy(lopt)
    MetaTrainer(lopt, task, MetaTrainConfig(meta_steps=20, horizon=60, unroll=10, seed=0),
                log=lambda s: None).train(progress=False)

    def final(lo):
        runs = [train_optimizee(task, lambda p: l2l_zoo.LearnedOptimizerAdapter(p, lo), steps=150, seed=s,
                                eval_every=150, progress=False) for s in (100, 101)]
        return sum(r["final"]["train_loss"] for r in runs) / 2

    before, after = final(untrained), final(lopt)
    assert after < 0.9 * before, f"meta-training did not help: {before:.4f} -> {after:.4f}"


def test_finetune_scheme_runs_until_the_loss_halves(mnist_small):
    """Chen et al. §3.4: 5% subsample; each repeat trains a fresh optimizee until the mean loss of a
    truncation is below half the initial loss. With a budget far above what halving takes, every
    repeat must get there, stop at a truncation boundary, and the meta-parameters must change."""
    task = Task("mlp_small", lambda: MLP(784, (16,), 10), mnist_small, batch_size=32)
    torch.manual_seed(0)
    lopt = l2l_zoo.create("simple")
    before = copy.deepcopy(lopt.state_dict())
    tr = MetaTrainer(lopt, task, MetaTrainConfig(unroll=10, seed=0), log=lambda s: None)
    recs = tr.finetune(fraction=0.05, repeats=2, max_steps=2000, progress=False)
    assert [r["repeat"] for r in recs] == [0, 1]
    for r in recs:
        assert r["reached_threshold"], r
        assert r["final_mean_loss"] < 0.5 * r["initial_loss"] and r["steps"] < 2000 and r["steps"] % 10 == 0
    assert any(not torch.equal(v, lopt.state_dict()[k]) for k, v in before.items())
    assert tr.backend.task is task, "fine-tuning must restore the original task"


def test_finetune_aborts_on_repeated_non_finite_meta_updates(mnist_small, monkeypatch):
    """Each repeat used to break on its first failure and reset the failure count, so fine-tuning
    never aborted and returned an untuned optimizer labelled fine-tuned."""
    task = Task("mlp_small", lambda: MLP(784, (16,), 10), mnist_small, batch_size=32)
    torch.manual_seed(0)
    lopt = l2l_zoo.create("simple")
    before = copy.deepcopy(lopt.state_dict())
    tr = MetaTrainer(lopt, task, MetaTrainConfig(unroll=5, seed=0, max_failures=3), log=lambda s: None)
    # the fine-tuning subsample is a new Task: poison the loss of every Task
    monkeypatch.setattr(Task, "loss", staticmethod(lambda out, y: F.cross_entropy(out, y) * float("nan")))
    with pytest.raises(MetaTrainingDiverged, match="3 consecutive non-finite meta-updates"):
        tr.finetune(fraction=0.05, repeats=5, max_steps=50, progress=False)
    assert all(torch.equal(v, lopt.state_dict()[k]) for k, v in before.items())


# ----------------------------------------------------------------------------- task families, outer meta-loss

class LearnedInitGD(l2l_zoo.LearnedOptimizer):
    """Test optimizer: gradient descent with a learned log-rate and a learned initialisation c0
    (the initial_params hook), the smallest case of Meta-LSTM's c0."""

    name = "_test_learned_init_gd"
    meta_defaults = l2l_zoo.MetaDefaults(meta_loss="outer", lr=1e-2)

    def __init__(self, *, n: int = 5):
        super().__init__(n=n)
        self.log_lr = torch.nn.Parameter(torch.tensor(-4.0))
        self.c0 = torch.nn.Parameter(0.1 * torch.arange(n, dtype=torch.float32))

    def initial_params(self, params):
        return self.c0

    def init_state(self, n, *, device=None, dtype=None):
        return l2l_zoo.OptState(0, (), ())

    def features(self, grads, state, *, params=None, loss=None):
        return grads.reshape(-1, 1), ()

    def network(self, feats, hidden):
        return -self.log_lr.exp() * feats[:, 0], hidden


class QuadraticFamily:
    """Random quadratics, one per run (synthetic: exact-math checks only)."""

    def __init__(self, dim=5, noise=0.0):
        self.dim, self.noise = dim, noise
        self.template = QuadraticTask(dim, seed=0, dtype=torch.float64, noise=noise)
        self.name = f"quadratics{dim}"

    def sample(self, gen):
        return QuadraticTask(self.dim, seed=int(torch.randint(0, 2**31 - 1, (1,), generator=gen)),
                             dtype=torch.float64, noise=self.noise)


def test_outer_meta_loss_is_the_outer_objective_plus_the_summed_penalties():
    f = [torch.tensor(v, dtype=torch.float64) for v in (4.0, 3.0, 1.0)]
    pen = [torch.tensor(0.5, dtype=torch.float64), torch.tensor(0.25, dtype=torch.float64)]
    outer = torch.tensor(0.7, dtype=torch.float64)
    assert meta_loss("outer", f, pen, lam=2.0, outer=outer) == pytest.approx(0.7 + 2.0 * 0.75)
    with pytest.raises(ValueError, match="needs the outer objective"):
        meta_loss("outer", f)


@pytest.mark.parametrize("backend", ["func", "higher"])
def test_learned_initialisation_gets_the_exact_meta_gradient(backend):
    """Meta-loss F(θ_T) on a task sampled from a family, θ_0 = c0 (a meta-parameter): the
    meta-gradient w.r.t. (log-rate, c0) equals float64 central differences. Without the
    initial_params hook c0 would get no gradient at all."""
    def grad_at(theta=None):
        torch.manual_seed(0)
        lopt = LearnedInitGD().double()
        if theta is not None:
            torch.nn.utils.vector_to_parameters(theta, lopt.parameters())
        cfg = MetaTrainConfig(unroll=4, horizon=4, seed=3, second_order=True, backend=backend)
        tr = MetaTrainer(lopt, QuadraticFamily(), cfg, log=lambda s: None)
        ml, g = tr.meta_gradient()
        return ml, torch.cat([x.reshape(-1) for x in g]), lopt
    ml, g, lopt = grad_at()
    assert g[1:].abs().sum() > 0, "no meta-gradient reached the learned initialisation"
    theta = torch.nn.utils.parameters_to_vector(lopt.parameters()).detach()
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        v = torch.randn(theta.shape, generator=gen, dtype=torch.float64)
        v /= v.norm()
        h = 1e-6
        fd = (grad_at(theta + h * v)[0] - grad_at(theta - h * v)[0]) / (2 * h)
        assert abs(fd - torch.dot(g, v)) <= 1e-6 * max(1.0, abs(float(fd))), (float(fd), float(torch.dot(g, v)))


def test_each_run_samples_a_fresh_task_reproducibly():
    torch.manual_seed(0)
    tr = MetaTrainer(LearnedInitGD().double(), QuadraticFamily(), MetaTrainConfig(unroll=2, horizon=2, seed=1),
                     log=lambda s: None)
    a, b = tr._new_run(), tr._new_run()
    assert not torch.equal(a.task.w, b.task.w), "two runs trained the same task"
    tr2 = MetaTrainer(LearnedInitGD().double(), QuadraticFamily(), MetaTrainConfig(unroll=2, horizon=2, seed=1),
                      log=lambda s: None)
    assert torch.equal(tr2._new_run().task.w, a.task.w), "the same seed must give the same tasks"


def test_resume_in_the_middle_of_a_run_restores_its_sampled_task(tmp_path):
    """A run of 4 steps in truncations of 2 on a sampled noisy quadratic, killed between its two
    truncations: the resumed trainer re-samples the same task and ends bit-identical."""
    def make(path, seed=0):
        torch.manual_seed(seed)
        cfg = MetaTrainConfig(meta_steps=5, unroll=2, horizon=4, seed=2, checkpoint_every=1)
        return MetaTrainer(LearnedInitGD().double(), QuadraticFamily(noise=0.3), cfg, checkpoint_path=path,
                           log=lambda s: None)
    ref = make(tmp_path / "a.pt")
    ref.train(progress=False)
    killed = make(tmp_path / "b.pt")

    def kill(step, rec):
        if step == 3:  # mid-run: run 1 has done its first truncation
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        killed.train(progress=False, callback=kill)
    assert killed.run is not None and killed.run.step == 2
    resumed = make(tmp_path / "b.pt", seed=7)
    resumed.train(resume=True, progress=False)
    assert [r["meta_loss"] for r in resumed.history] == [r["meta_loss"] for r in ref.history]
    for p, q in zip(ref.lopt.parameters(), resumed.lopt.parameters()):
        assert torch.equal(p, q)


def test_adapt_runs_the_inner_loop_from_the_learned_initialisation():
    torch.manual_seed(0)
    lopt = LearnedInitGD().double()
    task = QuadraticTask(5, seed=4, dtype=torch.float64)
    x, losses = adapt(lopt, task, 3, gen=torch.Generator().manual_seed(0))
    ref = lopt.c0.detach().clone()
    lr = float(lopt.log_lr.exp())
    for _ in range(3):
        r = ref.clone().requires_grad_(True)
        g, = torch.autograd.grad(task.loss(task.w @ r, task.y), r)
        ref = ref - lr * g
    torch.testing.assert_close(x, ref, rtol=1e-12, atol=1e-12)
    assert len(losses) == 3 and losses[0] > losses[-1]


def test_attached_state_travels_in_the_checkpoint(tmp_path):
    """A callback's own state (e.g. best-on-validation selection) attached to the trainer is saved
    with each checkpoint, after the callback ran, and restored on resume."""
    class Counter:
        def __init__(self):
            self.seen = []

        def __call__(self, step, rec):
            self.seen.append(step)

        def state_dict(self):
            return {"seen": list(self.seen)}

        def load_state_dict(self, sd):
            self.seen = list(sd["seen"])

    a = _trainer(tmp_path)
    c = Counter()
    a.attach("counter", c)

    def dying(step, rec):
        c(step, rec)
        if step == 5:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        a.train(progress=False, callback=dying)
    b = _trainer(tmp_path)
    c2 = Counter()
    b.attach("counter", c2)
    b.train(resume=True, progress=False, callback=c2)
    assert c2.seen == [1, 2, 3, 4, 5, 6, 7], "steps up to the checkpoint at 4 restored, 5-7 redone"
    with pytest.raises(TypeError, match="needs state_dict"):
        b.attach("x", object())
