"""bfloat16 autocast for the optimizee (``MetaTrainConfig(autocast="bfloat16")``, the steppers'
``autocast=``, ``mnist_mlp.py --autocast bfloat16``): the optimizee's matrix products run in bfloat16
while parameters, gradients, the learned optimizer and the meta-gradient stay float32; the
meta-gradient stays close to the float32 one (bfloat16 has 8 bits of mantissa), training still
reduces the loss, and a bad name is refused in one line. Run on CPU here (no GPU was lent)."""
import pytest
import torch

import l2l_zoo
from l2l_zoo import runs
from l2l_zoo.meta import MetaTrainConfig, MetaTrainer
from l2l_zoo.meta.unroll import autocast
from l2l_zoo.tasks import MLP

from test_meta_batch import flat, toy_task


def trainer(name, ac, B=1):
    torch.manual_seed(0)
    lopt = l2l_zoo.create(name)
    cfg = MetaTrainConfig(unroll=4, horizon=8, seed=0, autocast=ac, meta_batch=B)
    return MetaTrainer(lopt, toy_task(dtype=torch.float32, model=lambda: MLP(6, (32,), 2)), cfg, log=lambda s: None)


@pytest.mark.parametrize("name", ["simple", "dm"])
@pytest.mark.parametrize("B", [1, 2])
def test_bfloat16_autocast_meta_gradient_is_float32_and_close(name, B):
    ml32, g32 = trainer(name, None, B).meta_gradient()
    tr = trainer(name, "bfloat16", B)
    seen = []
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda m, i, o: seen.append(o.dtype) if isinstance(m, torch.nn.Linear) else None)
    try:
        ml16, g16 = tr.meta_gradient()
    finally:
        handle.remove()
    if B == 1:  # module hooks do not fire under functional_call + vmap's batching of the same module
        assert torch.bfloat16 in seen, "the optimizee's linear layers ran in bfloat16"
    assert ml16.dtype == torch.float32 and all(g.dtype == torch.float32 for g in g16)
    a, b = flat(g16), flat(g32)
    assert torch.isfinite(a).all()
    assert float((a - b).norm() / b.norm()) < 0.1  # bfloat16 rounding, not a different computation
    assert abs(float(ml16) - float(ml32)) < 0.05 * abs(float(ml32)) + 1e-3


def test_stepper_autocast_trains_in_bfloat16():
    torch.manual_seed(0)
    model = MLP(6, (32,), 2)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 6, generator=g)
    y = (x[:, 0] > 0).long()
    dtypes = []

    def loss_fn(m, b):
        out = m(b[0])
        dtypes.append(out.dtype)
        return torch.nn.functional.cross_entropy(out, b[1])

    st = runs.OptimizerStepper(model, torch.optim.SGD(model.parameters(), lr=0.5), loss_fn, autocast="bfloat16")
    first = st.step((x, y))["loss"]
    for _ in range(30):
        last = st.step((x, y))["loss"]
    assert dtypes[0] == torch.bfloat16 and all(p.dtype == torch.float32 for p in model.parameters())
    assert last < 0.5 * first


def test_bad_autocast_names_are_refused():
    with pytest.raises(ValueError, match="autocast must be None or one of"):
        MetaTrainConfig(autocast="float8")
    with pytest.raises(ValueError, match="autocast must be None or one of"):
        runs.OptimizerStepper(MLP(2, (2,), 2), torch.optim.SGD(MLP(2, (2,), 2).parameters(), lr=1.0),
                              lambda m, b: 0, autocast="half")
    with pytest.raises(ValueError, match="autocast must be None or one of"):
        autocast("cpu", "float16")
    assert "autocast" not in MetaTrainConfig().to_dict()
    assert MetaTrainConfig(autocast="bfloat16").to_dict()["autocast"] == "bfloat16"


def test_metalstm_meta_training_and_evaluation_under_autocast():
    """Meta-LSTM on episodes (Conv-4 with BatchNorm): the convolutions run in bfloat16 in
    meta-training and in the evaluation's inner loop, the meta-parameters stay float32, and the
    first meta-loss is within bfloat16 rounding of the float32 one."""
    from fewshot.data import EpisodeSampler
    from fewshot.metalstm import evaluate, meta_train, preset_config
    from test_fewshot_metalstm import synthetic_split
    cfg = preset_config("official", 1, filters=4, inner_steps=2)
    split = synthetic_split()
    ref = meta_train(cfg, {"train": split}, episodes=2, seed=0, progress=False)
    seen = []
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda m, i, o: seen.append(o.dtype) if isinstance(m, torch.nn.Conv2d) else None)
    try:
        tr = meta_train(cfg, {"train": split}, episodes=2, seed=0, progress=False, autocast="bfloat16")
        n = len(seen)
        accs = evaluate(tr.lopt, cfg, EpisodeSampler(split, 5, 1, 15), 2, seed=3, autocast="bfloat16")
    finally:
        handle.remove()
    assert torch.bfloat16 in seen[:n] and torch.bfloat16 in seen[n:], "conv layers ran in bfloat16"
    assert all(p.dtype == torch.float32 for p in tr.lopt.parameters()) and len(accs) == 2
    assert tr.history[0]["meta_loss"] == pytest.approx(ref.history[0]["meta_loss"], rel=0.05)
    assert tr.history[0]["meta_loss"] != ref.history[0]["meta_loss"]


def test_mlrsnet_online_meta_training_under_autocast():
    """MLRSNetMetaTrainer(autocast="bfloat16"): the model's linear layers run in bfloat16 in the real
    and the virtual step; MLR-SNet's meta-parameters, rates and the meta-gradient stay float32; the
    trajectory stays within bfloat16 rounding of the float32 one; a bad name is refused."""
    import torch.nn.functional as F
    from l2l_zoo import MLRSNet
    from l2l_zoo.meta.mlrsnet import MLRSNetMetaTrainer, MLRSNetTrainConfig

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, generator=g)
    y = (x[:, 0] > 0).long()

    def run(ac):
        torch.manual_seed(0)
        model = MLP(6, (32,), 2)
        net = MLRSNet(num_classes=2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        tr = MLRSNetMetaTrainer(net, model, opt, loss_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1]),
                                val_batch_fn=lambda: (x[32:], y[32:]), gamma=1.0,
                                config=MLRSNetTrainConfig(t_val=2, autocast=ac))
        out = [tr.step((x[:32], y[:32])) for _ in range(4)]
        return out, tr

    ref, _ = run(None)
    seen = []
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda m, i, o: seen.append(o.dtype) if isinstance(m, torch.nn.Linear) and o.shape[-1] in (32, 2) else None)
    try:
        got, tr = run("bfloat16")
    finally:
        handle.remove()
    assert torch.bfloat16 in seen and torch.float32 not in seen, set(seen)
    assert all(p.dtype == torch.float32 for p in tr.net.parameters())
    for a, b in zip(got, ref):
        assert a["loss"] == pytest.approx(b["loss"], rel=0.05) and a["lr"] == pytest.approx(b["lr"], rel=0.05)
    assert got[0]["meta_loss"] is not None and got[0]["meta_loss"] != ref[0]["meta_loss"]
    with pytest.raises(ValueError, match="autocast must be None or one of"):
        MLRSNetTrainConfig(autocast="fp8")


def test_mlrsnet_ptb_takes_autocast(tmp_path):
    """``mlrsnet_ptb.py --autocast bfloat16`` reaches its config (MLR-SNet's trainer, the controller
    and the baselines' steppers take it, as in mlrsnet_cifar.py); absent by default."""
    import importlib.util
    import os
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("_ac_ptb", os.path.join(root, "benchmarks", "mlrsnet_ptb.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    assert mod.parse_config(["--out", str(tmp_path / "a")]).autocast is None
    assert mod.parse_config(["--autocast", "bfloat16", "--out", str(tmp_path / "b")]).autocast == "bfloat16"
