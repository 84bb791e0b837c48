"""Perturbed loss versus radius: closed forms on a quadratic, hand-built perturbations on digits, the radius ratio."""

import copy
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from clitools import kill_after_progress
from torch import nn

from landscape.analysis.radius import radius_curve, radius_ratio
from landscape.data import eval_subset
from landscape.errors import LandscapeError
from landscape.models import build_model
from landscape.objective import Objective
from landscape.optimizers import filterwise_noise
from landscape.results import Result


def assert_close(actual, expected, rtol, what):
    actual, expected = np.asarray(actual, dtype=float), np.asarray(expected, dtype=float)
    bad = ~np.isclose(actual, expected, rtol=rtol, atol=0)
    assert not bad.any(), f"{what}: mismatches at {np.argwhere(bad).tolist()}: {actual[bad]} vs {expected[bad]}"


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


RESUMABLE = textwrap.dedent("""
    import sys, time
    import numpy as np, torch
    from torch import nn
    from landscape.analysis import radius, surface
    from landscape.objective import Objective

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double().eval()
    x, y = torch.randn(40, 6, dtype=torch.float64), torch.randint(0, 3, (40,))
    evaluated = []
    evaluate = surface.PointEvaluator.evaluate
    surface.PointEvaluator.evaluate = lambda self, points: evaluated.extend(points) or evaluate(self, points)
    stop = int(sys.argv[3])

    def report(done, total):
        print(done, total, flush=True)
        if stop and done >= stop:
            time.sleep(600)  # killed here, after a flushed write

    radius.radius_curve(Objective(model, x, y, batch_size=16), np.geomspace(0.01, 10, 6), draws=4, seed=3,
                        out=sys.argv[1], resume=sys.argv[2] == "resume", flush_seconds=0, progress=report)
    print("evaluated", len(evaluated) - 1, flush=True)  # less the unperturbed point of every run
""")


def test_radius_resumes_after_sigkill_with_nothing_lost_or_recomputed(tmp_path):
    script = tmp_path / "run_radius.py"
    script.write_text(RESUMABLE)

    def run(out, mode, stop=0):
        return subprocess.Popen([sys.executable, str(script), str(out), mode, str(stop)], stdout=subprocess.PIPE,
                                text=True)

    out, reference = tmp_path / "killed.h5", tmp_path / "reference.h5"
    worker = run(out, "fresh", stop=9)
    kill_after_progress(worker, 9)
    partial = tmp_path / "killed.h5.radius.partial"
    assert partial.exists() and not out.exists()
    resumed = run(out, "resume")
    lines = resumed.communicate()[0].split("\n")
    assert resumed.returncode == 0, lines
    done_before = int(lines[0].split()[0])
    assert 9 <= done_before < 30 and lines[0].endswith(" 30"), lines[0]
    assert f"evaluated {30 - done_before}" in lines, f"only the missing points are computed: {lines}"
    plain = run(reference, "fresh")
    assert plain.communicate()[0] and plain.returncode == 0
    final, expected = Result.load(out, "radius"), Result.load(reference, "radius")
    for name in ("radii", "eval_loss", "eval_acc", "loss_awp", "loss_rwp", "loss_rwp_std", "ratio_values", "done"):
        np.testing.assert_array_equal(final[name], expected[name], err_msg=name)
    assert final["radius_ratio"] == expected["radius_ratio"] and not partial.exists()
    again = run(out, "resume")
    assert again.communicate()[0].split("\n")[-2] == "evaluated 0", "a finished run resumes to nothing"


def test_radius_resume_refuses_another_seed(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 3)).double().eval()
    objective = Objective(model, torch.randn(20, 6, dtype=torch.float64), torch.randint(0, 3, (20,)))
    radius_curve(objective, [0.1, 1.0], draws=2, seed=1, out=tmp_path / "r.h5")
    with pytest.raises(LandscapeError, match="options differ"):
        radius_curve(objective, [0.1, 1.0], draws=2, seed=2, out=tmp_path / "r.h5", resume=True)
    again = radius_curve(objective, [0.1, 1.0], draws=2, seed=1, out=tmp_path / "r.h5", resume=True)
    assert np.isfinite(again["loss_rwp"]).all() and "radius_ratio" in Result.load(tmp_path / "r.h5", "radius").attrs
