"""Cosine stability, perturbed loss and inner-maximisation gap against closed forms on a quadratic.

The "model" is linear, θ = [W, b], and the loss 0.5 mean((Aθ - y)^2) with A = [X, 1] is quadratic
in the weights: g(θ) = A^T(Aθ - y)/N and H = A^T A/N exactly. All reference values below are
re-derived from these formulas in numpy float64.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import landscape
from landscape import optimizers
from landscape.analysis import cosine as cosine_module
from landscape.analysis.cosine import cosine_stability, projected_ascent, start_noise
from landscape.errors import LandscapeError
from landscape.objective import Objective
from clitools import invoke
from helpers import assert_close

N, D = 40, 4
SCALES = (3.0, 1.0, 0.7, 0.5)   # separates the top Hessian eigenvalue, so projected ascent converges fast


def half_mse(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((outputs.squeeze(-1) - targets) ** 2).mean()


@pytest.fixture
def quadratic():
    """(objective, model, A, y, θ) for the linear model with a quadratic loss, float64, one batch = all data."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=generator, dtype=torch.float64) * torch.tensor(SCALES, dtype=torch.float64)
    y = torch.randn(N, generator=generator, dtype=torch.float64)
    torch.manual_seed(0)
    model = nn.Linear(D, 1).double()
    objective = Objective(model, x, y, loss_fn=half_mse, batch_size=N)
    a = np.concatenate([x.numpy(), np.ones((N, 1))], axis=1)
    theta = np.concatenate([model.weight.detach().numpy().ravel(), model.bias.detach().numpy()])
    return objective, model, a, y.numpy(), theta


class Quadratic:
    """Closed forms for L(θ) = 0.5 mean((Aθ - y)^2)."""

    def __init__(self, a: np.ndarray, y: np.ndarray) -> None:
        self.a, self.y, self.hessian = a, y, a.T @ a / len(y)

    def loss(self, theta: np.ndarray) -> float:
        return 0.5 * float(np.mean((self.a @ theta - self.y) ** 2))

    def grad(self, theta: np.ndarray) -> np.ndarray:
        return self.a.T @ (self.a @ theta - self.y) / len(self.y)

    def cosine_and_loss(self, theta: np.ndarray, rho: float) -> tuple[float, float]:
        """cos(g, g + ρ H u) and L(θ + ρ u), u = g/‖g‖ (the gradient is affine in θ)."""
        g = self.grad(theta)
        u = g / np.linalg.norm(g)
        moved = g + rho * self.hessian @ u
        return float(g @ moved / (np.linalg.norm(g) * np.linalg.norm(moved))), self.loss(theta + rho * u)

    def ball_maximum(self, theta: np.ndarray, rho: float) -> float:
        """max_{‖ε‖<=ρ} L(θ + ε): on the sphere, ε = (μI - H)^{-1} g, μ > λ_max solving ‖ε‖ = ρ."""
        eigenvalues, vectors = np.linalg.eigh(self.hessian)
        c = vectors.T @ self.grad(theta)
        low, high = eigenvalues[-1], eigenvalues[-1] + np.abs(c).sum() / rho + 1.0
        for _ in range(200):   # bisection on the decreasing secular function
            mu = 0.5 * (low + high)
            low, high = (mu, high) if np.sum(c**2 / (mu - eigenvalues) ** 2) > rho**2 else (low, mu)
        return self.loss(theta + vectors @ (c / (mu - eigenvalues)))


def flat(tensors) -> np.ndarray:
    return np.concatenate([t.detach().numpy().ravel() for t in tensors])


RHOS = [0.0, 0.1, 0.5, 1.0]


def test_vanilla_cosine_and_perturbed_loss_equal_closed_form(quadratic):
    objective, _, a, y, theta = quadratic
    result = cosine_stability(objective, RHOS, [0.0], batches=1, batch_size=N, pga_steps=1)
    closed = np.array([Quadratic(a, y).cosine_and_loss(theta, rho) for rho in RHOS])
    assert_close(result["cosine"][0], closed[:, 0], rtol=1e-7, atol=1e-10, what="cosine")
    assert_close(result["perturbed_loss"][0], closed[:, 1], rtol=1e-7, atol=1e-10, what="perturbed loss")
    assert_close(result["cosine"][0, 0], 1.0, rtol=1e-12, atol=1e-10, what="cosine at rho = 0")
    assert result["samples"][0] == 1 and np.all(result["cosine_std"] == 0)


def test_noisy_cosine_equals_closed_form_at_each_recorded_start(quadratic, monkeypatch):
    """Mean and std over draws equal the closed forms evaluated at the very δ0 that were drawn."""
    objective, _, a, y, theta = quadratic
    drawn: dict[float, list[np.ndarray]] = {}

    def recording(weights, gamma, kind, generator):
        delta = start_noise(weights, gamma, kind, generator)
        drawn.setdefault(round(gamma**2, 12), []).append(flat(delta))
        return delta

    monkeypatch.setattr(cosine_module, "start_noise", recording)
    gammas2 = [0.0, 0.01, 0.04]
    result = cosine_stability(objective, RHOS, gammas2, noise="isotropic", batches=1, draws=3, batch_size=N,
                              pga_steps=1)
    quad = Quadratic(a, y)
    for gi, gamma2 in enumerate(gammas2[1:], start=1):
        assert len(drawn[gamma2]) == 3
        closed = np.array([[quad.cosine_and_loss(theta + delta, rho) for rho in RHOS] for delta in drawn[gamma2]])
        assert_close(result["cosine"][gi], closed[..., 0].mean(0), rtol=1e-7, atol=1e-10,
                     what=f"cosine gamma2={gamma2}")
        assert_close(result["cosine_std"][gi], closed[..., 0].std(0), rtol=1e-7, atol=1e-9, what="cosine std")
        assert_close(result["perturbed_loss"][gi], closed[..., 1].mean(0), rtol=1e-7, atol=1e-10, what="perturbed loss")
        assert_close(result["perturbed_loss_std"][gi], closed[..., 1].std(0), rtol=1e-7, atol=1e-9, what="loss std")
    assert np.all(result["cosine"][:, 0] == pytest.approx(1.0, rel=1e-12))


def test_start_noise_is_the_optimizers_kernel_noise_or_isotropic(quadratic):
    objective = quadratic[0]
    weights = list(objective.params.values())
    kernel = start_noise(weights, 0.3, "kernel", torch.Generator().manual_seed(5))
    reference = optimizers.rsam_noise(weights, 0.3, torch.Generator().manual_seed(5))
    for got, want in zip(kernel, reference):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    big = [torch.zeros(200_000, dtype=torch.float64)]
    iso = start_noise(big, 0.3, "isotropic", torch.Generator().manual_seed(0))[0]
    assert abs(float(iso.std()) - 0.3) < 0.01 and abs(float(iso.mean())) < 0.01   # 10+ standard errors
    with pytest.raises(LandscapeError, match="unknown noise"):
        start_noise(weights, 0.3, "pink", torch.Generator())


def test_inner_max_losses_and_gaps_equal_closed_forms(quadratic, monkeypatch):
    objective, _, a, y, theta = quadratic
    original = optimizers.rsam_noise
    drawn: list[np.ndarray] = []

    def spy(weights, gamma, generator):
        delta = original(weights, gamma, generator)
        drawn.append(flat(delta))
        return delta

    monkeypatch.setattr(optimizers, "rsam_noise", spy)
    rhos, gamma, grad_weight = [0.1, 0.5, 1.0], 0.2, 0.7
    result = cosine_stability(objective, rhos, [0.0], batches=1, draws=2, batch_size=N, pga_steps=20,
                              rsam_gamma=gamma, rsam_grad_weight=grad_weight)
    quad = Quadratic(a, y)
    g = quad.grad(theta)
    sam = [quad.loss(theta + rho * g / np.linalg.norm(g)) for rho in rhos]
    assert_close(result["loss_sam"], sam, rtol=1e-7, atol=1e-10, what="SAM one-step loss")
    assert_close(result["loss_sam"], result["perturbed_loss"][0], rtol=1e-12, atol=1e-10,
                 what="SAM loss vs vanilla curve")

    assert len(drawn) == 2
    rsam = []
    for delta in drawn:
        direction = delta + grad_weight * quad.grad(theta + delta)
        rsam.append([quad.loss(theta + rho * direction / np.linalg.norm(direction)) for rho in rhos])
    assert_close(result["loss_rsam"], np.mean(rsam, axis=0), rtol=1e-7, atol=1e-10, what="R-SAM loss")
    assert_close(result["loss_rsam_std"], np.std(rsam, axis=0), rtol=1e-7, atol=1e-9, what="R-SAM loss std")

    best = [quad.ball_maximum(theta, rho) for rho in rhos]
    assert_close(result["loss_pga"], best, rtol=1e-8, atol=1e-10, what="projected ascent vs the maximum on the ball")
    assert_close(result["gap_sam"], np.array(best) - sam, rtol=1e-6, atol=1e-8, what="gap SAM")
    assert_close(result["gap_rsam"], np.array(best) - np.mean(rsam, axis=0), rtol=1e-6, atol=1e-8,
                 what="gap R-SAM")
    assert result["loss_pga_steps"].shape == (3, 21)
    assert np.all(result["gap_sam"] >= 0)


def test_projected_ascent_reaches_top_eigenvector_maximum():
    """Pure quadratic 0.5 εᵀHε (minimum at w): the maximum on the ρ-sphere is 0.5 ρ² λ_max."""
    hessian = torch.diag(torch.tensor([5.0, 1.0, 0.5], dtype=torch.float64))

    class Bowl(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.zeros(3, dtype=torch.float64))

        def forward(self, x):
            return (0.5 * self.w @ hessian @ self.w).expand(len(x))

    objective = Objective(Bowl(), torch.zeros(2, 1, dtype=torch.float64), torch.zeros(2),
                          loss_fn=lambda out, _: out.mean())
    start = [torch.tensor([0.3, 0.5, 0.4], dtype=torch.float64)]
    rho = 0.7
    start = [start[0] * rho / start[0].norm()]
    losses = projected_ascent(objective, objective.inputs, objective.targets, rho, start, steps=40, step=1.0)
    assert len(losses) == 41
    assert max(losses) == pytest.approx(0.5 * rho**2 * 5.0, rel=1e-10)


def test_the_ascent_is_the_optimizers_own_function(quadratic, monkeypatch):
    """Replacing optimizers.sam_perturbation by a zero ascent makes every cosine 1 and every loss flat."""
    objective = quadratic[0]
    calls = []

    def zero_ascent(grads, rho, *args, **kwargs):
        calls.append(rho)
        return [torch.zeros_like(g) for g in grads]

    before = cosine_stability(objective, RHOS, [0.0], batches=1, batch_size=N, pga_steps=1)
    monkeypatch.setattr(optimizers, "sam_perturbation", zero_ascent)
    after = cosine_stability(objective, RHOS, [0.0], batches=1, batch_size=N, pga_steps=1)
    assert calls, "cosine_stability did not call optimizers.sam_perturbation"
    assert before["cosine"][0, -1] < 0.99
    assert_close(after["cosine"][0], 1.0, rtol=1e-12, atol=1e-10, what="cosine without ascent")
    assert_close(after["perturbed_loss"][0], after["base_loss"], rtol=1e-12, atol=1e-10, what="loss without ascent")


def test_deterministic_per_seed_and_model_untouched(quadratic):
    objective, model, *_ = quadratic
    state = {k: v.clone() for k, v in model.state_dict().items()}
    params = {k: v.clone() for k, v in objective.params.items()}
    options = dict(rhos=[0.0, 0.3], gammas2=[0.0, 0.01], batches=2, draws=2, batch_size=16, pga_steps=2)
    first = cosine_stability(objective, **options, seed=3)
    second = cosine_stability(objective, **options, seed=3)
    other = cosine_stability(objective, **options, seed=4)
    for key, value in first.arrays.items():
        np.testing.assert_array_equal(value, second.arrays[key], err_msg=key)
    assert not np.array_equal(first["cosine"], other["cosine"])
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)
    for key, value in objective.params.items():
        torch.testing.assert_close(value, params[key], rtol=0, atol=0)
    assert objective.bn == "eval" and first["config"]["bn"] == "train"


def test_batchnorm_uses_batch_statistics_by_default():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).double()
    with torch.no_grad():
        model[1].running_mean.fill_(3.0)   # running statistics far from the batch's
    x, y = torch.randn(32, 3, dtype=torch.float64), torch.randint(0, 2, (32,))
    objective = Objective(model, x, y, batch_size=32)
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    train = cosine_stability(objective, [0.0, 0.5], [0.0], batches=1, batch_size=32, pga_steps=1)
    evaluated = cosine_stability(objective, [0.0, 0.5], [0.0], batches=1, batch_size=32, pga_steps=1, bn="eval")
    batch_mode = Objective(model, x, y, batch_size=32, bn="train")
    assert train["base_loss"] == pytest.approx(batch_mode.loss(), rel=1e-12)
    assert evaluated["base_loss"] == pytest.approx(objective.loss(), rel=1e-12)
    assert train["base_loss"] != pytest.approx(evaluated["base_loss"])
    for key, value in model.named_buffers():
        torch.testing.assert_close(value, buffers[key], rtol=0, atol=0)


@pytest.mark.parametrize("options, message", [
    (dict(rhos=[-0.1]), "rhos"), (dict(gammas2=[math.nan]), "gammas2"), (dict(noise="pink"), "noise"),
    (dict(draws=0), "draws"), (dict(pga_step=0.0), "pga_step"), (dict(batches=3, batch_size=20), "need 60 examples"),
    (dict(bn="frozen"), "bn"),
])
def test_bad_options_raise_one_line_errors(quadratic, options, message):
    with pytest.raises(LandscapeError, match=message) as info:
        cosine_stability(quadratic[0], **{"rhos": [0.1], "gammas2": [0.0], **options})
    assert "\n" not in str(info.value)


def test_result_saves_loads_and_plots(quadratic, tmp_path):
    result = landscape.cosine_stability(quadratic[0], [0.0, 0.5], [0.0, 0.01], batches=1, draws=2, batch_size=N,
                                        pga_steps=2)
    path = result.save(tmp_path / "r.h5")
    loaded = cosine_module.CosineResult.load(path)
    for key in ("rhos", "gammas", "gammas2", "cosine", "cosine_std", "perturbed_loss", "perturbed_loss_std",
                "loss_sam", "loss_rsam", "loss_pga", "gap_sam", "gap_rsam"):
        np.testing.assert_array_equal(loaded[key], result[key], err_msg=key)
    assert loaded["cosine"].shape == (2, 2) and loaded["seed"] == 0 and loaded["config"]["pga_steps"] == 2
    figure = loaded.plot(tmp_path / "cosine.png")
    assert (tmp_path / "cosine.png").stat().st_size > 0 and len(figure.axes) == 3


def test_cli_cosine_writes_the_group_and_prints_tables(checkpoint, tmp_path):
    out = tmp_path / "d.h5"
    args = ("cosine", checkpoint, "--rhos", "0:0.5:3", "--gammas2", "0,0.01", "--batches", "1", "--draws", "2",
            "--pga-steps", "2", "--batch-size", "32", "--dtype", "float64", "--out", out)
    run = invoke(*args)
    assert run.exit_code == 0, run.output
    assert "PGA-SAM" in run.output and "γ²=0.01" in run.output
    stored = cosine_module.CosineResult.load(out)
    np.testing.assert_allclose(stored["rhos"], [0.0, 0.25, 0.5])
    assert stored["config"]["batch_size"] == 32 and stored["config"]["bn"] == "train"
    assert stored["checkpoint"] == str(checkpoint) and stored["dataset"] == "digits"
    python = cosine_stability(landscape.load_objective(str(checkpoint), batch_size=32, dtype="float64"),
                              [0.0, 0.25, 0.5], [0.0, 0.01], batches=1, draws=2, batch_size=32, pga_steps=2)
    np.testing.assert_array_equal(python["cosine"], stored["cosine"])
    again = invoke(*args)
    assert again.exit_code == 2 and "--overwrite" in again.output
    assert invoke(*args, "--resume").exit_code == 0


@pytest.mark.parametrize("args, message", [
    (("--rhos", "a,b"), "--rhos"), (("--rhos", "0:1"), "LO:HI:N"), (("--rhos=-1,0.5",), "rhos"),
    (("--gammas2", "x"), "--gammas2"), (("--batches", "20", "--batch-size", "128"), "need 2560 examples"),
    (("--noise", "pink"), "noise"), (("--rsam-lam", "0.5"), "--rsam-lam is now called --rsam-grad-weight"),
])
def test_cli_cosine_bad_input_is_one_line_exit_2(checkpoint, tmp_path, args, message):
    run = invoke("cosine", checkpoint, "--out", tmp_path / "x.h5", "--batches", "1", *args)
    assert run.exit_code == 2, run.output
    assert message in run.output and "Traceback" not in run.output


def test_cli_cosine_missing_checkpoint_exits_2(tmp_path):
    run = invoke("cosine", tmp_path / "missing.pt")
    assert run.exit_code == 2 and "does not exist" in run.output
