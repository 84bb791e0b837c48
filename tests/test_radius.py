"""Perturbed loss versus radius: closed forms on a quadratic, hand-built perturbations on digits, the radius ratio."""

import copy

import crashtools
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close
from torch import nn

from landscape.analysis.radius import RadiusResult, radius_curve, radius_ratio
from landscape.data import eval_subset
from landscape.errors import LandscapeError
from landscape.models import build_model
from landscape.objective import Objective
from landscape.optimizers import filterwise_noise
from landscape.results import Result


def test_awp_is_the_closed_form_and_beats_every_random_draw_on_an_isotropic_quadratic():
    # L(w) = mean_i (w_i - t_i)^2 = ||w - t||^2 / d: Hessian (2/d) I, gradient g = 2 (w - t) / d.
    # L(w + r u) = L(w) + r g.u + r^2/d for unit u, largest along u = g/||g|| (AWP).
    d = 12
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d, 1, bias=False), nn.Flatten(0)).double()
    targets = torch.randn(d, dtype=torch.float64)
    objective = Objective(model, torch.eye(d, dtype=torch.float64), targets, loss_fn=F.mse_loss)
    radii = np.geomspace(1e-3, 10, 9)
    result = radius_curve(objective, radii, draws=6, seed=4)
    w = model[0].weight.detach().reshape(-1)
    base = float(((w - targets) ** 2).mean())
    gradient_norm = float((2 * (w - targets) / d).norm())
    assert_close(result["loss_awp"], base + radii * gradient_norm + radii**2 / d, 1e-9, "AWP loss")
    assert (result["loss_awp"][:, None] >= result["loss_rwp_draws"] - 1e-12).all()
    assert (result["loss_awp"] >= result["loss_rwp"]).all()
    assert_close(result["loss_base"], base, 1e-12, "unperturbed loss")


def test_summary_is_the_table_the_cli_prints():
    result = RadiusResult({"radii": np.array([0.01, 1.0]), "loss_awp": np.array([0.5, 2.25]),
                           "loss_rwp": np.array([0.25, 0.75]), "loss_rwp_std": np.array([0.0, 0.125]),
                           "ratio_levels": np.array([0.1, 0.2])}, {"loss_base": 0.25, "radius_ratio": 42.0})
    assert result.summary().splitlines() == [
        "    radius       L_AWP      L_RWP (mean ± std)",
        "      0.01         0.5          0.25 ± 0        ",
        "         1        2.25          0.75 ± 0.125    ",
        "unperturbed loss 0.25; RWP/AWP radius ratio at equal loss increase: 42x (levels 0.1, 0.2 nats)"]


def test_radius_ratio_recovers_a_known_factor():
    radii = np.geomspace(1e-4, 10, 41)
    awp = 1.0 + np.maximum(0.0, np.log(radii / 1e-3))  # linear in log r: interpolation is exact
    rwp = 1.0 + np.maximum(0.0, np.log(radii / 1e-1))
    levels, ratios, summary = radius_ratio(radii, awp, rwp, 1.0, levels=[0.1, 0.5, 2.0])
    assert_close(ratios, [100.0] * 3, 1e-9, "ratios")
    assert_close(summary, 100.0, 1e-9, "geometric mean")
    levels, ratios, summary = radius_ratio(radii, awp, rwp, 1.0)
    assert len(levels) == 5 and levels.max() <= 1.0 and np.isfinite(ratios).all()
    assert np.isnan(radius_ratio(radii, awp, np.ones_like(radii), 1.0)[2]), "RWP never rises: no ratio"


@pytest.mark.parametrize("rho_p", [2.0, float("inf")])
def test_curves_equal_hand_built_perturbations(digits, rho_p):
    x, y, _ = eval_subset(*digits.split("train"), 120, 0)
    x = x.double()
    torch.manual_seed(0)
    model = build_model("mlp", 10, (1, 8, 8), hidden=(10,)).double().eval()
    objective = Objective(model, x, y, batch_size=50)
    radii = np.array([0.05, 0.5, 5.0])
    result = radius_curve(objective, radii, draws=3, rho_p=rho_p, seed=7)

    names = [n for n, _ in model.named_parameters()]
    weights = [p.detach() for p in model.parameters()]
    loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    direction = [g.sign() for g in grads] if rho_p == float("inf") else list(grads)
    generator = torch.Generator().manual_seed(7)
    draws = [direction] + [filterwise_noise(weights, 1.0, generator) for _ in range(3)]

    def loss_at(move: list[torch.Tensor], r: float) -> float:
        norm = torch.sqrt(sum((m**2).sum() for m in move))
        copy_ = copy.deepcopy(model)
        state = copy_.state_dict()
        copy_.load_state_dict({**state, **{n: state[n] + r * m / norm for n, m in zip(names, move)}})
        with torch.no_grad():
            return float(F.cross_entropy(copy_(x), y))

    expected = np.array([[loss_at(move, r) for move in draws] for r in radii])
    assert_close(result["loss_awp"], expected[:, 0], 1e-9, "AWP")
    assert_close(result["loss_rwp_draws"], expected[:, 1:], 1e-9, "RWP draws")
    assert_close(result["loss_rwp"], expected[:, 1:].mean(1), 1e-9, "RWP mean")
    assert_close(result["loss_rwp_std"], expected[:, 1:].std(1, ddof=1), 1e-7, "RWP std")


def test_a_kill_at_any_write_resumes_to_the_same_bits(tmp_path):
    """Killed at every write of creating the sidecar, writing its two blocks and moving it into the
    results file: the sidecar always opens, no done point is NaN, nothing finished is recomputed,
    and the curves and their ratio are bit-identical to an uninterrupted run (see crashtools)."""
    run = crashtools.analysis(tmp_path, "radius")
    events = crashtools.kill_everywhere(run, tmp_path)
    assert sum(e.file == "r.h5.radius.partial" and e.syscall == "pwrite64" for e in events) == 2 * 3


def test_radius_resume_refuses_another_seed(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 3)).double().eval()
    objective = Objective(model, torch.randn(20, 6, dtype=torch.float64), torch.randint(0, 3, (20,)))
    radius_curve(objective, [0.1, 1.0], draws=2, seed=1, out=tmp_path / "r.h5")
    with pytest.raises(LandscapeError, match="options differ"):
        radius_curve(objective, [0.1, 1.0], draws=2, seed=2, out=tmp_path / "r.h5", resume=True)
    again = radius_curve(objective, [0.1, 1.0], draws=2, seed=1, out=tmp_path / "r.h5", resume=True)
    assert np.isfinite(again["loss_rwp"]).all() and "radius_ratio" in Result.load(tmp_path / "r.h5", "radius").attrs
