"""Objective against plain torch.autograd in float64 (independent of torch.func and of batching)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close
from torch import nn

from landscape.curvature.hessian import HessianOperator
from landscape.errors import LandscapeError
from landscape.objective import Objective, batchnorm_mode


def bn_net() -> nn.Module:
    """Linear, BatchNorm1d, tanh, dropout, linear: a float64 net whose BatchNorm and dropout modes matter."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Dropout(0.3), nn.Linear(5, 4)).double()


@pytest.fixture
def setup():
    model = bn_net()
    model.train()  # the objective must not depend on (or change) the model's mode
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(23, 6, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 4, (23,), generator=generator)
    return model, x, y


def reference_loss(model: nn.Module, x, y, bn: str, batch_size: int) -> torch.Tensor:
    """Exact mean loss by plain forwards of ``model`` (a throwaway copy; dropout off)."""
    model.eval()
    if bn == "eval":
        return F.cross_entropy(model(x), y)
    model[1].train()
    model[1].track_running_stats = False  # batch statistics, per batch of the fixed partition
    parts = [F.cross_entropy(model(x[i:i + batch_size]), y[i:i + batch_size]) * len(x[i:i + batch_size])
             for i in range(0, len(x), batch_size)]
    return torch.stack(parts).sum() / len(x)


def flat_reference(model, x, y, bn, batch_size):
    names = [n for n, _ in model.named_parameters()]
    base = copy.deepcopy(model)

    def loss_of(*tensors):
        copy_ = copy.deepcopy(base)
        for (name, _), t in zip(list(copy_.named_parameters()), tensors):
            module_name, _, attr = name.rpartition(".")
            module = copy_.get_submodule(module_name)
            delattr(module, attr)
            setattr(module, attr, t)
        return reference_loss(copy_, x, y, bn, batch_size)

    params = tuple(p.detach().clone() for p in model.parameters())
    return names, params, loss_of


@pytest.mark.parametrize("bn", ["eval", "train"])
def test_loss_gradient_hvp_match_autograd(setup, bn):
    model, x, y = setup
    objective = Objective(model, x, y, batch_size=7, bn=bn)  # 7 + 7 + 7 + 2: uneven last batch
    names, params, loss_of = flat_reference(model, x, y, bn, 7)

    expected_loss = loss_of(*params)
    loss, accuracy = objective.loss_and_accuracy()
    assert loss == pytest.approx(float(expected_loss), rel=1e-12)
    assert 0.0 <= accuracy <= 1.0

    expected_grads = torch.autograd.grad(loss_of(*(p.requires_grad_() for p in params)), params)
    gradient = objective.gradient()
    for name, expected in zip(names, expected_grads):
        assert_close(gradient[name], expected, rtol=1e-10, atol=1e-12, what=f"gradient {name}")

    vector = tuple(torch.randn_like(p) for p in params)
    _, expected_hv = torch.autograd.functional.hvp(loss_of, tuple(p.detach() for p in params), vector)
    flat, expected = torch.cat([v.reshape(-1) for v in vector]), torch.cat([e.reshape(-1) for e in expected_hv])
    for cache_bytes in (None, 0):   # double backward through cached graphs; forward-over-reverse
        operator = HessianOperator(objective, cache_bytes=cache_bytes)
        assert_close(operator @ flat, expected, rtol=1e-9, atol=1e-12, what=f"hvp, cache_bytes={cache_bytes}")
        batched = operator.apply(torch.stack([flat, 2 * flat]))
        assert_close(batched[1], 2 * expected, rtol=1e-9, atol=1e-12, what=f"batched hvp, cache_bytes={cache_bytes}")
        assert operator.products == 3


def test_delta_evaluates_shifted_weights(setup):
    model, x, y = setup
    objective = Objective(model, x, y, batch_size=10)
    delta = {n: 0.1 * torch.ones_like(p) for n, p in objective.params.items()}
    shifted = copy.deepcopy(model)
    with torch.no_grad():
        for p in shifted.parameters():
            p.add_(0.1)
    shifted.eval()
    with torch.no_grad():
        expected = float(F.cross_entropy(shifted(x), y))
    assert objective.loss(delta) == pytest.approx(expected, rel=1e-12)


def test_model_is_never_mutated(setup):
    model, x, y = setup
    state = copy.deepcopy(model.state_dict())
    modes = [m.training for m in model.modules()]
    for bn in ("eval", "train"):
        objective = Objective(model, x, y, batch_size=5, bn=bn)
        objective.loss_and_accuracy()
        objective.gradient()
        for cache_bytes in (None, 0):
            HessianOperator(objective, cache_bytes=cache_bytes) @ torch.ones(objective.num_params, dtype=torch.float64)
        objective.params["0.weight"].add_(1.0)  # the objective's copy, not the model's
    after = model.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state), "parameters or buffers changed"
    assert [m.training for m in model.modules()] == modes


def test_frozen_batchnorm_uses_batch_stats_without_updating_buffers(setup):
    model, x, _ = setup
    bn = model[1]
    running = (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
    with batchnorm_mode(model, "frozen"):
        hidden = model[1](model[0](x))
    assert torch.equal(bn.running_mean, running[0]) and torch.equal(bn.running_var, running[1])
    assert torch.equal(bn.num_batches_tracked, running[2])
    # batch statistics were used: each feature is standardised over the batch
    assert_close(hidden.mean(0), bn.bias.detach(), rtol=1e-10, atol=1e-10, what="batch mean")
    assert bn.track_running_stats and bn.training


def test_derived_params_give_the_exact_sub_block(setup):
    model, x, y = setup
    objective = Objective(model, x, y, batch_size=23)
    names, params, loss_of = flat_reference(model, x, y, "eval", 23)
    sub = objective.derive(params="4.*")
    assert list(sub.params) == ["4.weight", "4.bias"] and list(objective.params) == names
    assert sub.provenance()["params"] == "4.weight,4.bias" and "params" not in objective.provenance()
    vector = {n: torch.randn_like(t) for n, t in sub.params.items()}
    full_vector = tuple(vector.get(n, torch.zeros_like(p)) for n, p in zip(names, params))
    _, expected = torch.autograd.functional.hvp(loss_of, params, full_vector)
    hv = HessianOperator(sub, cache_bytes=0) @ torch.cat([v.reshape(-1) for v in vector.values()])
    assert_close(hv, torch.cat([e.reshape(-1) for n, e in zip(names, expected) if n in vector]), rtol=1e-9, atol=1e-12,
                 what="sub-block hvp")
    with pytest.raises(LandscapeError, match="no parameter matches"):
        objective.derive(params="nothing.*")


def test_derived_bn_mode_leaves_the_original_alone(setup):
    model, x, y = setup
    objective = Objective(model, x, y, batch_size=7)
    train = objective.derive(bn="train")
    both = objective.derive(params="0.*", bn="train")
    assert (objective.bn, train.bn, both.bn) == ("eval", "train", "train")
    assert list(both.params) == ["0.weight", "0.bias"]
    for bn, derived in (("eval", objective), ("train", train), ("train", both)):
        expected = float(reference_loss(copy.deepcopy(model), x, y, bn, 7).detach())
        assert derived.loss() == pytest.approx(expected, rel=1e-12), bn
    with pytest.raises(LandscapeError, match="unknown bn 'batch'"):
        objective.derive(bn="batch")


def test_bad_arguments_are_one_line_errors(setup):
    model, x, y = setup
    with pytest.raises(LandscapeError, match="--bn"):
        Objective(model, x, y, bn="batch")
    with pytest.raises(LandscapeError, match="--batch-size"):
        Objective(model, x, y, batch_size=0)
    with pytest.raises(LandscapeError, match="equal"):
        Objective(model, x, y[:3])
