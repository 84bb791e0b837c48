"""SAM/SGD gradient-ratio histograms against analytic ratios.

Model: out = [X Wᵀ + b, s] with loss 0.5 mean((X Wᵀ + b - y)^2) + c·s. The loss is quadratic in
(W, b), so g(θ + ε) - g(θ) = H ε exactly (H = AᵀA/n, A = [X, 1]), and linear in s, so the gradient
of s never changes (r = -inf). Column ZERO_COLUMN of X is zero, so that entry of W has g_SGD = 0.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import landscape
from landscape import optimizers
from landscape.analysis.gradients import minibatches
from landscape.analysis.ratio import RatioResult, gradient_ratio, log_ratio
from landscape.errors import LandscapeError
from landscape.objective import Objective
from clitools import invoke

N, D, ZERO_COLUMN, BATCHES = 48, 5, 2, 2
EDGES = np.linspace(-6.0, 3.0, 91)
SHIFT_WEIGHTS = np.array([0.3, -0.2])


class LinearWithShift(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(D, 1)
        self.shift = nn.Parameter(torch.tensor([0.5, -1.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.linear(x), self.shift.expand(len(x), 2)], dim=1)


def loss_fn(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    fit = 0.5 * ((outputs[:, 0] - targets) ** 2).mean()
    return fit + outputs[:, 1:].mean(0) @ torch.as_tensor(SHIFT_WEIGHTS, dtype=outputs.dtype)


@pytest.fixture
def setup():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=generator, dtype=torch.float64)
    x[:, ZERO_COLUMN] = 0.0
    y = torch.randn(N, generator=generator, dtype=torch.float64)
    torch.manual_seed(0)
    model = LinearWithShift().double()
    return Objective(model, x, y, loss_fn=loss_fn, batch_size=N // BATCHES), model


def analytic_ratios(objective: Objective, eps_rule, rhos, seed: int = 0):
    """Per ρ: finite analytic r (all batches), #zero, #unchanged; derived from g and H of each batch."""
    w = objective.params["linear.weight"].numpy().ravel()
    theta = np.concatenate([w, objective.params["linear.bias"].numpy()])
    shift = objective.params["shift"].numpy()
    out = {rho: ([], 0, 0) for rho in rhos}
    for b, (x, y) in enumerate(minibatches(objective, BATCHES, N // BATCHES, seed)):
        a = np.concatenate([x.numpy(), np.ones((len(x), 1))], axis=1)
        hessian = a.T @ a / len(x)
        grad = np.concatenate([a.T @ (a @ theta - y.numpy()) / len(x), SHIFT_WEIGHTS])
        for rho in rhos:
            eps = eps_rule(grad, np.concatenate([theta, shift]), rho, hessian, b)
            change = hessian @ eps[:D + 1]
            defined = grad[:D + 1] != 0
            values, zero, same = out[rho]
            values.extend(np.log10(np.abs(change[defined] / grad[:D + 1][defined])))
            out[rho] = (values, zero + int((~defined).sum()), same + len(SHIFT_WEIGHTS))
    return out


def check_against(result, expected, rhos):
    for ri, rho in enumerate(rhos):
        values, zero, same = expected[rho]
        values = np.array(values)
        assert np.min(np.abs(values[:, None] - EDGES[None])) > 1e-9, "test data lands on a bin edge"
        inside = values[(values >= EDGES[0]) & (values <= EDGES[-1])]
        counts = np.histogram(inside, EDGES)[0]
        bad = np.flatnonzero(result["counts"][ri] != counts)
        assert bad.size == 0, f"rho={rho}: bins {bad} hold {result['counts'][ri][bad]}, expected {counts[bad]}"
        assert result["zero_gradient_count"][ri] == zero == BATCHES
        assert result["equal_count"][ri] == same
        assert result["below_range"][ri] == np.sum(values < EDGES[0])
        assert result["above_range"][ri] == np.sum(values > EDGES[-1])
        defined = len(values) + same
        assert result["fraction_below_zero"][ri] == pytest.approx((np.sum(values < 0) + same) / defined, rel=1e-12)
        assert result["entries"][ri] == BATCHES * (D + 1 + 2)


def sam_eps(grad, weights, rho, hessian, batch):
    return rho * grad / np.linalg.norm(grad)


RHOS = [0.05, 0.5, 5.0]


def test_sam_ratio_matches_analytic_histogram(setup):
    objective, _ = setup
    result = gradient_ratio(objective, RHOS, batches=BATCHES, batch_size=N // BATCHES, bin_edges=EDGES)
    check_against(result, analytic_ratios(objective, sam_eps, RHOS), RHOS)
    assert np.isfinite(result["counts"]).all() and result["counts"].dtype.kind == "i"
    layers = result["layers"]
    assert set(layers) == {"linear.weight", "linear.bias", "shift"}
    assert list(layers["linear.weight"]["zero_gradient_count"]) == [BATCHES] * 3
    assert list(layers["shift"]["equal_count"]) == [2 * BATCHES] * 3
    assert np.all(layers["shift"]["counts"] == 0) and np.all(layers["shift"]["fraction_below_zero"] == 1.0)
    total = sum(layer["counts"] for layer in layers.values())
    np.testing.assert_array_equal(total, result["counts"])


def test_asam_ratio_uses_the_adaptive_rule(setup):
    objective, _ = setup
    eta = 0.05

    def asam_eps(grad, weights, rho, hessian, batch):
        scale = np.ones_like(weights)
        scale[:D] = np.abs(weights[:D]) + eta    # only the 2-D weight is rescaled
        return rho * scale**2 * grad / np.linalg.norm(scale * grad)

    result = gradient_ratio(objective, RHOS, perturbation="asam", asam_eta=eta, batches=BATCHES, batch_size=N // BATCHES,
                            bin_edges=EDGES)
    check_against(result, analytic_ratios(objective, asam_eps, RHOS), RHOS)


def test_rsam_ratio_uses_the_recorded_noise(setup, monkeypatch):
    objective, _ = setup
    original, drawn = optimizers.rsam_noise, []

    def spy(weights, gamma, generator):
        delta = original(weights, gamma, generator)
        by_name = dict(zip(objective.params, delta))   # same order as the objective's parameters
        drawn.append(np.concatenate([by_name[n].numpy().ravel() for n in ("linear.weight", "linear.bias", "shift")]))
        return delta

    monkeypatch.setattr(optimizers, "rsam_noise", spy)
    gamma, grad_weight = 0.1, 0.8
    result = gradient_ratio(objective, RHOS, perturbation="rsam", rsam_gamma=gamma, rsam_grad_weight=grad_weight,
                            batches=BATCHES, batch_size=N // BATCHES, bin_edges=EDGES)

    def rsam_eps(grad, weights, rho, hessian, batch):
        delta = drawn[batch]
        noisy = grad.copy()
        noisy[:D + 1] += hessian @ delta[:D + 1]
        direction = delta + grad_weight * noisy
        return rho * direction / np.linalg.norm(direction)

    assert len(drawn) == BATCHES
    check_against(result, analytic_ratios(objective, rsam_eps, RHOS), RHOS)
    assert result["config"]["rsam_gamma"] == gamma


def test_replacing_the_optimizer_rule_changes_the_diagnostic(setup, monkeypatch):
    """With a zero ascent every defined entry is unchanged: nothing is binned, all count as r < 0."""
    objective, _ = setup
    monkeypatch.setattr(optimizers, "sam_perturbation",
                        lambda grads, rho, *args, **kwargs: [torch.zeros_like(g) for g in grads])
    result = gradient_ratio(objective, RHOS, batches=BATCHES, batch_size=N // BATCHES, bin_edges=EDGES)
    assert np.all(result["counts"] == 0)
    np.testing.assert_array_equal(result["equal_count"], result["entries"] - result["zero_gradient_count"])
    np.testing.assert_array_equal(result["fraction_below_zero"], 1.0)


def test_log_ratio_never_overflows_and_separates_special_entries():
    sgd = torch.tensor([1e-300, 2.0, 0.0, 3.0, -4.0], dtype=torch.float64)
    sam = torch.tensor([1e300, 2.0, 5.0, 3.3, -4.0004], dtype=torch.float64)
    r, zero, equal = log_ratio(sgd, sam)
    assert torch.isfinite(r).all()
    np.testing.assert_allclose(r.numpy(), [600.0, np.log10(0.3 / 3.0), np.log10(0.0004 / 4.0)], rtol=1e-9)
    assert zero.tolist() == [False, False, True, False, False]
    assert equal.tolist() == [False, True, False, False, False]


def test_deterministic_per_seed_and_model_untouched(setup):
    objective, model = setup
    state = {k: v.clone() for k, v in model.state_dict().items()}
    first = gradient_ratio(objective, [0.1], perturbation="rsam", batches=2, batch_size=N // BATCHES, seed=1)
    second = gradient_ratio(objective, [0.1], perturbation="rsam", batches=2, batch_size=N // BATCHES, seed=1)
    other = gradient_ratio(objective, [0.1], perturbation="rsam", batches=2, batch_size=N // BATCHES, seed=2)
    np.testing.assert_array_equal(first["counts"], second["counts"])
    for name, layer in first["layers"].items():
        np.testing.assert_array_equal(layer["counts"], second["layers"][name]["counts"], err_msg=name)
    assert not np.array_equal(first["counts"], other["counts"])
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)


@pytest.mark.parametrize("options, message", [
    (dict(rhos=[0.0]), "rhos"), (dict(perturbation="ssam"), "perturbation"), (dict(bin_edges=[1.0, 0.0]), "bin edges"),
    (dict(bin_edges=[0.0]), "bin edges"), (dict(batches=5), "need"),
])
def test_bad_options_raise_one_line_errors(setup, options, message):
    with pytest.raises(LandscapeError, match=message) as info:
        gradient_ratio(setup[0], **{"rhos": [0.1], **options})
    assert "\n" not in str(info.value)


def test_result_saves_loads_and_plots(setup, tmp_path):
    result = landscape.gradient_ratio(setup[0], RHOS, batches=BATCHES, batch_size=N // BATCHES, bin_edges=EDGES)
    path = result.save(tmp_path / "r.h5")
    loaded = RatioResult.load(path)
    np.testing.assert_array_equal(loaded["counts"], result["counts"])
    np.testing.assert_array_equal(loaded["layers"]["shift"]["equal_count"], result["layers"]["shift"]["equal_count"])
    assert loaded["config"]["perturbation"] == "sam" and loaded["counts"].shape == (3, len(EDGES) - 1)
    loaded.plot(tmp_path / "rho.png")
    loaded.plot(tmp_path / "layer.png", by="layer", rho_index=0)
    assert (tmp_path / "rho.png").stat().st_size > 0 and (tmp_path / "layer.png").stat().st_size > 0


@pytest.mark.parametrize("perturbation", ["sam", "rsam"])
def test_cli_ratio_writes_global_and_per_layer_histograms(checkpoint, tmp_path, perturbation):
    out = tmp_path / "d.h5"
    run = invoke("ratio", checkpoint, "--rhos", "0.01,0.1", "--perturbation", perturbation, "--batches", "2",
                 "--batch-size", "32", "--bins", "-8:4:60", "--out", out)
    assert run.exit_code == 0, run.output
    assert "fraction with r < 0 per parameter tensor" in run.output
    stored = RatioResult.load(out)
    assert stored["counts"].shape == (2, 60) and len(stored["bin_edges"]) == 61
    assert stored["config"]["perturbation"] == perturbation and "0.weight" in stored["layers"]
    assert np.all(stored["counts"].sum(1) + stored["below_range"] + stored["above_range"] + stored["equal_count"]
                  + stored["zero_gradient_count"] == stored["entries"])


@pytest.mark.parametrize("args, message", [
    (("--bins", "4:-8:10"), "bin edges"), (("--bins", "1:2"), "LO:HI:N"), (("--rhos", "0"), "rhos"),
    (("--perturbation", "ssam"), "perturbation"), (("--rsam-grad-weight=-1", "--perturbation", "rsam"), "grad_weight"),
    (("--rsam-lam=0.5", "--perturbation", "rsam"), "--rsam-lam is now called --rsam-grad-weight"),
])
def test_cli_ratio_bad_input_is_one_line_exit_2(checkpoint, tmp_path, args, message):
    run = invoke("ratio", checkpoint, "--out", tmp_path / "x.h5", "--batches", "1", *args)
    assert run.exit_code == 2, run.output
    assert message in run.output and "Traceback" not in run.output
