"""Meta-batches (``MetaTrainConfig(meta_batch=B)``): B optimizee instances unrolled together through
``torch.func.vmap`` give exactly the mean of the B instances' sequential meta-gradients (float64, for
every registered optimizer, with and without second-order terms and the smoothness regularizer);
training with a meta-batch resumes bit-for-bit; what cannot be batched is refused in one line."""
import copy

import pytest
import torch
from torch import nn

import l2l_zoo
from l2l_zoo.meta import MetaTrainConfig, MetaTrainer
from l2l_zoo.regularizers import SmoothnessConfig
from l2l_zoo.tasks import MLP, DataSplits, Task

from conftest import LOPT_OPTIONS

ALL = l2l_zoo.available()


def toy_task(dtype=torch.float64, seed=0, model=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 6, generator=g, dtype=dtype)
    y = (x[:, 0] + x[:, 1] > 0).long()
    d = DataSplits("toy", x, y, x, y, x, y, 2, "synthetic")
    return Task("toy_mlp", model or (lambda: MLP(6, (5,), 2).to(dtype)), d, batch_size=16)


def make(name, B, *, second_order=False, smooth=None, unroll=4, horizon=8, **kw):
    torch.manual_seed(0)
    lopt = l2l_zoo.create(name, **LOPT_OPTIONS.get(name, {})).to(torch.float64)
    cfg = MetaTrainConfig(unroll=unroll, horizon=horizon, seed=0, meta_batch=B, second_order=second_order,
                          smooth=smooth, **kw)
    return MetaTrainer(lopt, toy_task(), cfg, log=lambda s: None)


def flat(grads):
    return torch.cat([g.reshape(-1) for g in grads])


@pytest.mark.parametrize("mode", ["vmap", "loop"])
@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("second_order,smooth", [(False, None), (True, None),
                                                 (False, SmoothnessConfig(eps=0.1, lam=1.0, steps=2, subsample=7))])
def test_meta_batch_equals_the_mean_of_sequential_meta_gradients(name, second_order, smooth, mode):
    B = 3
    if mode == "vmap" and not type(l2l_zoo.create(name, **LOPT_OPTIONS.get(name, {}))).vmappable:
        # MLR-SNet computes γ from float(loss) at step 0: refused in one line, not mis-batched
        with pytest.raises(ValueError, match="cannot run under torch.func.vmap"):
            make(name, B, meta_batch_mode="vmap")
        return
    tr = make(name, B, second_order=second_order, smooth=smooth, meta_batch_mode=mode)
    assert tr.loop == (mode == "loop")
    batch = tr._new_batch()
    assert len({float(r.x.sum()) for r in batch}) == B, "instances must start from different initialisations"
    saved = {k: g.get_state() for k, g in tr.gens.items()}
    runs = [copy.copy(r) for r in batch]
    ml, grads = tr.meta_gradient(batch)
    params = list(tr.lopt.parameters())
    seq_ml, seq = [], []
    for b in range(B):  # the same instance alone, on the plain (B = 1) code path with its generators
        tr.gens["data"].set_state(saved[f"data/{b}"])
        tr.gens["reg"].set_state(saved[f"reg/{b}"])
        m, *_ = tr._truncation(runs[b], tr.cfg.unroll)
        g = torch.autograd.grad(m, params, allow_unused=True)
        seq_ml.append(m.detach())
        seq.append(flat([torch.zeros_like(p) if x is None else x for x, p in zip(g, params)]))
    ref = torch.stack(seq).mean(0)
    torch.testing.assert_close(ml, torch.stack(seq_ml).mean(), rtol=1e-10, atol=0)
    got = flat(grads)
    rel = float((got - ref).norm() / ref.norm())
    assert ref.norm() > 0 and rel < 1e-6, f"relative difference {rel:.2e}"
    # and the instances really differ (the mean is not B copies of one meta-gradient)
    assert float((seq[0] - seq[1]).norm()) > 1e-6 * float(ref.norm())


def test_meta_batch_training_resumes_bit_for_bit(tmp_path):
    def trainer(path):
        torch.manual_seed(0)
        lopt = l2l_zoo.create("simple").to(torch.float64)
        cfg = MetaTrainConfig(meta_steps=5, unroll=2, horizon=4, seed=3, meta_batch=2, checkpoint_every=1,
                              smooth=SmoothnessConfig(eps=0.1, steps=1))
        return MetaTrainer(lopt, toy_task(), cfg, checkpoint_path=path, log=lambda s: None)

    full = trainer(str(tmp_path / "a.ckpt"))
    full.train(progress=False)

    class Kill(Exception):
        pass

    def kill(step, rec):
        if step == 3:
            raise Kill

    t = trainer(str(tmp_path / "b.ckpt"))
    with pytest.raises(Kill):
        t.train(progress=False, callback=kill)
    resumed = trainer(str(tmp_path / "b.ckpt"))  # a fresh process would build it like this
    resumed.train(resume=True, progress=False)
    assert resumed.meta_step == 5 and len(resumed.history) == 5
    for p, q in zip(full.lopt.parameters(), resumed.lopt.parameters()):
        assert torch.equal(p, q)
    assert [h["meta_loss"] for h in full.history] == [h["meta_loss"] for h in resumed.history]
    assert full.history[0]["run_step"] == 2 and full.history[2]["run"] != full.history[0]["run"]


def test_what_cannot_be_batched_is_refused():
    with pytest.raises(ValueError, match="meta_batch must be >= 1"):
        MetaTrainConfig(meta_batch=0)
    with pytest.raises(ValueError, match="meta_batch_mode must be one of"):
        MetaTrainConfig(meta_batch_mode="scan")
    with pytest.raises(ValueError, match="vmap needs backend='func'"):
        make("simple", 2, backend="higher", meta_batch_mode="vmap")
    assert make("simple", 2, backend="higher").loop  # auto: what vmap cannot do, the loop does
    lopt = l2l_zoo.create("simple").to(torch.float64)
    bn = toy_task(model=lambda: nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).double())
    with pytest.raises(ValueError, match="cannot update buffers"):
        MetaTrainer(lopt, bn, MetaTrainConfig(meta_batch=2, meta_batch_mode="vmap"), log=lambda s: None)
    with pytest.raises(ValueError, match="would share the buffers of task 'toy_mlp'"):  # one task, one set of buffers
        MetaTrainer(lopt, bn, MetaTrainConfig(meta_batch=2), log=lambda s: None)
    with pytest.raises(ValueError, match="one optimizee at a time"):
        make("simple", 2).finetune(repeats=1, max_steps=2, progress=False)


def test_the_default_leaves_configs_and_checkpoint_identities_unchanged():
    assert "meta_batch" not in MetaTrainConfig().to_dict()
    assert "meta_batch_mode" not in MetaTrainConfig(meta_batch=4).to_dict()
    assert MetaTrainConfig(meta_batch=4, meta_batch_mode="loop").to_dict()["meta_batch_mode"] == "loop"
    assert MetaTrainConfig(meta_batch=4).to_dict()["meta_batch"] == 4


def test_a_looped_meta_batch_works_on_the_higher_backend():
    """What vmap cannot run is looped: the higher backend's meta-batch equals the func backend's
    (the same instances, seeds and meta-gradient formula; float64)."""
    a, b = make("simple", 2, backend="higher"), make("simple", 2, meta_batch_mode="loop")
    assert a.loop and b.loop
    (ma, ga), (mb, gb) = a.meta_gradient(), b.meta_gradient()
    torch.testing.assert_close(ma, mb, rtol=1e-10, atol=0)
    torch.testing.assert_close(flat(ga), flat(gb), rtol=1e-8, atol=1e-12)


def test_auto_loops_large_instances_on_cpu(monkeypatch):
    """``meta_batch_mode="auto"`` on CPU: small optimizees vmap, ones of at least
    LOOP_MIN_COORDINATES parameters loop (faster there, measured); "vmap" still forces vmap."""
    import l2l_zoo.meta.trainer as T
    assert not make("simple", 2).loop
    monkeypatch.setattr(T, "LOOP_MIN_COORDINATES", 10)  # the toy MLP has 47 parameters
    assert make("simple", 2).loop and not make("simple", 2, meta_batch_mode="vmap").loop
    # a separable optimizer (DM) has its own, lower size (its step costs more per coordinate)
    assert not make("dm", 2).loop
    monkeypatch.setattr(T, "SEPARABLE_LOOP_MIN_COORDINATES", 10)
    assert make("dm", 2).loop and not make("dm", 2, meta_batch_mode="vmap").loop
    monkeypatch.setattr(T, "LOOP_MIN_COORDINATES", 10 ** 9)
    assert make("dm", 2).loop and not make("simple", 2).loop
