"""The torch.optim adapter: identical to the pure update, exact state_dict round trip, param groups,
missing gradients, and real training."""
import copy

import pytest
import torch
import torch.nn.functional as F

import l2l_zoo
from l2l_zoo.tasks import MLP

ALL = ["simple", "dm", "rnnprop"]


def model_and_batches(seed=0, n=4):
    torch.manual_seed(seed)
    model = MLP(10, (7,), 3)
    g = torch.Generator().manual_seed(seed)
    batches = [(torch.randn(16, 10, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(n)]
    return model, batches


def train(model, opt, batches):
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("name", ALL)
def test_adapter_equals_pure_update(name):
    torch.manual_seed(0)
    lopt = l2l_zoo.create(name)
    model, batches = model_and_batches()
    ref = copy.deepcopy(model)
    train(model, l2l_zoo.LearnedOptimizerAdapter(model.parameters(), lopt), batches)
    # functional reference: flat parameters threaded through lopt.update
    params = [p.detach().clone().requires_grad_(True) for p in ref.parameters()]
    state = lopt.init_state(sum(p.numel() for p in params))
    for x, y in batches:
        out = torch.func.functional_call(ref, dict(zip([n for n, _ in ref.named_parameters()], params)), (x,))
        grads = torch.autograd.grad(F.cross_entropy(out, y), params)
        with torch.no_grad():
            upd, state = lopt.update(torch.cat([g.reshape(-1) for g in grads]), state)
        params = [(p + u.view_as(p)).detach().requires_grad_(True)
                  for p, u in zip(params, upd.split([p.numel() for p in params]))]
    for p, q in zip(model.parameters(), params):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert all(p.requires_grad for p in lopt.parameters()), "the caller's module must be left untouched"


@pytest.mark.parametrize("name", ALL)
def test_state_dict_roundtrip_resumes_exactly(name):
    torch.manual_seed(0)
    lopt = l2l_zoo.create(name)
    model, batches = model_and_batches(n=6)
    opt = l2l_zoo.LearnedOptimizerAdapter(model.parameters(), lopt)
    train(model, opt, batches[:3])
    sd = copy.deepcopy(opt.state_dict())
    saved_model = copy.deepcopy(model)
    train(model, opt, batches[3:])

    model2 = saved_model
    opt2 = l2l_zoo.LearnedOptimizerAdapter(model2.parameters(), lopt)
    opt2.load_state_dict(sd)
    train(model2, opt2, batches[3:])
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    # state is split per parameter like any torch optimizer's
    assert len(sd["state"]) == len(list(model.parameters()))
    assert sd["state"][0]["step"] == 3


def test_param_group_lr_scales_the_learned_update_and_missing_grads_are_zero():
    torch.manual_seed(0)
    lopt = l2l_zoo.create("simple")
    a = torch.nn.Parameter(torch.ones(5))
    b = torch.nn.Parameter(torch.ones(5))
    unused = torch.nn.Parameter(torch.ones(3))
    opt = l2l_zoo.LearnedOptimizerAdapter([{"params": [a]}, {"params": [b], "lr": 0.5}, {"params": [unused]}], lopt)
    (a.sum() + b.sum()).backward()
    opt.step()
    g = torch.cat([torch.ones(10), torch.zeros(3)])
    upd, _ = lopt.update(g, lopt.init_state(13))
    torch.testing.assert_close(a.detach() - 1, upd[:5].detach())
    torch.testing.assert_close(b.detach() - 1, 0.5 * upd[5:10].detach())
    torch.testing.assert_close(unused.detach() - 1, upd[10:].detach())


def test_adapter_rejects_bad_input():
    with pytest.raises(TypeError, match="lopt must be a LearnedOptimizer, got SGD"):
        l2l_zoo.LearnedOptimizerAdapter([torch.nn.Parameter(torch.ones(1))],
                                        torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=1))
    with pytest.raises(ValueError, match="must be >= 0"):
        l2l_zoo.LearnedOptimizerAdapter([torch.nn.Parameter(torch.ones(1))], l2l_zoo.create("dm"), lr=-1)


def test_adapter_with_lr_scheduler():
    torch.manual_seed(0)
    model, batches = model_and_batches()
    opt = l2l_zoo.LearnedOptimizerAdapter(model.parameters(), l2l_zoo.create("dm"))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    train(model, opt, batches[:1])
    sched.step()
    assert opt.param_groups[0]["lr"] == 0.5


def test_untrained_simple_optimizer_trains_real_mnist(mnist_small):
    """The adapter drives an ordinary training loop on real data: loss falls."""
    from l2l_zoo.tasks import Task
    task = Task("mlp", lambda: MLP(784, (64,), 10), mnist_small, batch_size=128)
    torch.manual_seed(0)
    model = task.build_model(seed=0)
    opt = l2l_zoo.LearnedOptimizerAdapter(model.parameters(), l2l_zoo.create("simple"))
    before, _ = task.evaluate(model, "train")
    gen = torch.Generator().manual_seed(0)
    for _ in range(100):
        x, y = task.sample_batch(gen)
        opt.zero_grad()
        task.loss(model(x), y).backward()
        opt.step()
    after, acc = task.evaluate(model, "test")
    assert after < 0.7 * before, (before, after)
