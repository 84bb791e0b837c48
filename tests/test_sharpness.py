"""Sharpness (Andriushchenko et al.): closed forms on quadratics, rescaling invariance, m-sharpness, BN, CLI."""

import copy
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from clitools import invoke
from torch import nn

from landscape.analysis import sharpness as sharpness_module
from landscape.analysis.sharpness import sharpness
from landscape.errors import LandscapeError
from landscape.objective import Objective
from landscape.results import Result

ROOT = Path(__file__).resolve().parents[1]


def half_mse(outputs, targets):
    return 0.5 * F.mse_loss(outputs, targets)


def quadratic(hessian: np.ndarray, w_star: np.ndarray) -> Objective:
    """L(w) = ½ (w - w*)ᵀ H (w - w*) exactly: a linear model, targets X w*, loss ½ mean((Xw - y)²), XᵀX/d = H."""
    d = len(w_star)
    x = torch.from_numpy(np.sqrt(d) * np.linalg.cholesky(hessian).T)
    model = nn.Sequential(nn.Linear(d, 1, bias=False), nn.Flatten(0)).double()
    with torch.no_grad():
        model[0].weight.copy_(torch.from_numpy(w_star).view(1, d))
    return Objective(model, x, model(x).detach(), loss_fn=half_mse)


def spd(eigenvalues, seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((len(eigenvalues), len(eigenvalues))))
    return q @ np.diag(eigenvalues) @ q.T


W_STAR = np.array([0.8, -1.5, 0.3, 2.0, -0.6])
H = spd([3.0, 1.0, 0.5, 0.2, 0.1], seed=0)
RHOS = np.array([0.05, 0.5, 2.0])


@pytest.mark.parametrize("adaptive", [False, True])
def test_worst_l2_at_a_quadratic_minimum_is_rho2_lambda1_over_2(adaptive):
    # max over ‖δ/c‖ <= ρ of ½ δᵀHδ = ρ² λ1(C H C)/2, C = diag(c): c = 1, or |w*| when adaptive.
    c = np.abs(W_STAR) if adaptive else np.ones(5)
    closed = RHOS**2 * np.linalg.eigvalsh(np.diag(c) @ H @ np.diag(c))[-1] / 2
    objective = quadratic(H, W_STAR)
    reached = sharpness(objective, RHOS, adaptive=adaptive, start="random", steps=60)
    np.testing.assert_allclose(reached["worst"], closed, rtol=1e-9)
    assert reached["loss_base"] == 0.0
    few = sharpness(objective, RHOS, adaptive=adaptive, start="random", steps=2)["worst"]
    assert np.all(few <= closed * (1 + 1e-12)) and np.all(few < closed * (1 - 1e-4)), "2 steps fall short"
    stuck = sharpness(objective, RHOS, adaptive=adaptive, start="zero", steps=5)["worst"]
    np.testing.assert_array_equal(stuck, 0.0)  # the gradient vanishes at the minimum: zero start cannot move


@pytest.mark.parametrize(("norm", "adaptive"), [("l2", False), ("l2", True), ("linf", True)])
def test_average_at_a_quadratic_minimum_is_half_the_trace_within_three_standard_errors(norm, adaptive):
    # E ½ δᵀHδ with δ = ρ c ⊙ ξ: ½ ρ² Σ c_i² H_ii E ξ_i², E ξ_i² = 1 (Gaussian) or 1/3 (uniform on [-1, 1]).
    c = np.abs(W_STAR) if adaptive else np.ones(5)
    closed = RHOS**2 * (c**2 * np.diag(H)).sum() / 2 / (3.0 if norm == "linf" else 1.0)
    result = sharpness(quadratic(H, W_STAR), RHOS, kind="average", norm=norm, adaptive=adaptive, draws=400, seed=3)
    se = result["average_se"]
    assert np.all(np.abs(result["average"] - closed) <= 3 * se), (result["average"], closed, se)
    assert np.all(se < 0.1 * closed), "the test has power: the standard error is a small fraction of the value"


def test_linf_worst_case_on_quadratics_against_the_exact_box_maximum():
    rho = 0.3
    # Diagonal H: the box maximum ρ² Σ c_i² h_i / 2 sits at every vertex; sign ascent reaches one exactly.
    h = np.array([2.0, 0.5, 1.0, 0.1, 3.0])
    for adaptive, c in ((False, np.ones(5)), (True, np.abs(W_STAR))):
        result = sharpness(quadratic(np.diag(h), W_STAR), [rho], norm="linf", adaptive=adaptive, start="random")
        np.testing.assert_allclose(result["worst"], rho**2 * (c**2 * h).sum() / 2, rtol=1e-12)
    # Dense H: a convex quadratic takes its box maximum and minimum over vertices at vertices; the ascent
    # is feasible (<= the maximum) and its first step (2ρ sign) lands on a vertex (>= the smallest vertex value).
    dense = spd([2.0, 1.0, 0.7, 0.3, 0.05], seed=1)
    vertices = [rho**2 * np.array(v) @ dense @ np.array(v) / 2 for v in itertools.product((-1.0, 1.0), repeat=5)]
    value = sharpness(quadratic(dense, W_STAR), [rho], norm="linf", adaptive=False, start="random")["worst"][0]
    assert min(vertices) - 1e-12 <= value <= max(vertices) + 1e-12, (min(vertices), value, max(vertices))


def relu_net(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    return model, torch.randn(48, 5, dtype=torch.float64), torch.randint(0, 3, (48,))


def rescaled(model: nn.Module, alpha: float) -> nn.Module:
    """Layer 0's weights and biases times α, layer 2's weights divided by α: the same function for α > 0."""
    other = copy.deepcopy(model)
    with torch.no_grad():
        other[0].weight.mul_(alpha)
        other[0].bias.mul_(alpha)
        other[2].weight.div_(alpha)
    return other


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_adaptive_sharpness_is_invariant_to_relu_rescaling_and_plain_sharpness_is_not(norm):
    model, x, y = relu_net()
    other = rescaled(model, 4.0)
    np.testing.assert_allclose(other(x).detach(), model(x).detach(), rtol=0, atol=1e-12)
    rhos = [0.05, 0.3]
    values = {}
    for adaptive in (True, False):
        for name, net in (("base", model), ("rescaled", other)):
            result = sharpness(Objective(net, x, y), rhos, kind="both", norm=norm, adaptive=adaptive, draws=6, seed=5)
            values[adaptive, name] = np.concatenate([result["worst"], result["average"]])
    assert np.all(np.abs(values[True, "base"]) > 1e-5)
    np.testing.assert_allclose(values[True, "rescaled"], values[True, "base"], rtol=0, atol=1e-10)
    changed = np.abs(values[False, "rescaled"] - values[False, "base"]) / np.abs(values[False, "base"])
    assert np.all(changed > 0.05), f"plain sharpness should change under rescaling: {changed}"


@pytest.mark.parametrize("start", ["zero", "random"])
def test_m_sharpness_is_the_size_weighted_mean_of_per_batch_sharpness(start):
    model, x, y = relu_net(1)
    objective = Objective(model, x, y, batch_size=7)
    options = {"kind": "both", "start": start, "draws": 4, "seed": 2, "steps": 8}
    rhos = [0.1, 0.4]
    whole = sharpness(objective, rhos, **options)
    same = sharpness(objective, rhos, m=len(x), **options)
    for key in ("worst", "average", "average_se"):
        np.testing.assert_array_equal(same[key], whole[key], err_msg=key)
    for m in (12, 20):  # 4 batches of 12; 20, 20 and 8
        parts = [sharpness(Objective(model, x[s:s + m], y[s:s + m], batch_size=7), rhos, **options)
                 for s in range(0, len(x), m)]
        share = np.array([len(x[s:s + m]) for s in range(0, len(x), m)]) / len(x)
        batched = sharpness(objective, rhos, m=m, **options)
        for key in ("worst", "average"):
            np.testing.assert_allclose(batched[key], share @ np.array([p[key] for p in parts]), rtol=1e-12,
                                       atol=1e-15, err_msg=f"{key}, m={m}")
        np.testing.assert_allclose(batched["loss_base"], share @ [p["loss_base"] for p in parts], rtol=1e-12)
    assert not np.allclose(batched["worst"], whole["worst"]), "m-sharpness differs from whole-set sharpness"


def test_recomputed_batchnorm_matches_update_bn_and_the_model_is_untouched():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).double()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2.0)
    model.eval()
    x, y = torch.randn(30, 4, dtype=torch.float64), torch.randint(0, 3, (30,))
    before = copy.deepcopy(model.state_dict())
    result = sharpness(Objective(model, x, y), [0.2], kind="both", draws=2, m=15, bn_recompute=True, seed=1)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), f"{name} changed"
    assert not model.training

    def recomputed_loss(rows: slice, delta: dict[str, torch.Tensor] | None) -> float:
        """Loss on ``rows`` at w + δ with BatchNorm statistics from torch's update_bn (cumulative) over them."""
        net = copy.deepcopy(model)
        with torch.no_grad():
            for name, parameter in net.named_parameters():
                parameter.add_(delta[name] if delta else 0.0)
        net[1].momentum = None
        torch.optim.swa_utils.update_bn([x[rows]], net)
        net.eval()
        with torch.no_grad():
            return float(F.cross_entropy(net(x[rows]), y[rows]))

    # the draws: ρ |w| ⊙ ξ_j with ξ from the documented stream (the module's own noise rule)
    weights = [p.detach() for p in model.parameters()]
    generator = sharpness_module.seeded_generator(1, sharpness_module._NOISE)
    names = [n for n, _ in model.named_parameters()]
    draws = [dict(zip(names, [0.2 * w.abs() * z for w, z in zip(weights, sharpness_module.standard_normal(
        weights, generator))])) for _ in range(2)]
    for b, rows in enumerate((slice(0, 15), slice(15, 30))):
        np.testing.assert_allclose(result["average_base"][b, 0], recomputed_loss(rows, None), rtol=1e-10)
        np.testing.assert_allclose(result["worst_base"][b, 0], recomputed_loss(rows, None), rtol=1e-10)
        np.testing.assert_allclose(result["draw_loss"][b, 0], [recomputed_loss(rows, d) for d in draws], rtol=1e-10)
    assert result.attrs["config"]["bn_recompute"] is True


def test_in_memory_results_come_from_the_point_runner_with_every_unit_done(monkeypatch):
    from landscape.engine import runner
    model, x, y = relu_net()
    evaluated = []
    evaluate_points = runner.evaluate_points
    monkeypatch.setattr(runner, "evaluate_points", lambda *args: evaluated.append(args[2]) or evaluate_points(*args))
    result = sharpness(Objective(model, x, y), [0.1, 0.2], kind="average", m=16, draws=2)
    assert evaluated == [[(b, i)] for b in range(3) for i in range(2)], "one (batch, rho) unit at a time, in order"
    assert result["done"].shape == (3, 2) and result["done"].all()


def test_bad_options_are_one_line_errors():
    model, x, y = relu_net()
    objective = Objective(model, x, y)
    for options, message in (({"rhos": [-0.1]}, "positive"), ({"rhos": []}, "positive"),
                             ({"rhos": [float("nan")]}, "positive"), ({"m": 49}, "m = 49"), ({"m": 0}, "m = 0"),
                             ({"kind": "max"}, "kind"), ({"norm": "l1"}, "norm"), ({"start": "sam"}, "start"),
                             ({"steps": 0}, "steps"), ({"draws": 0}, "draws"), ({"step_size": 0.0}, "step_size"),
                             ({"bn_recompute": True}, "no BatchNorm")):
        with pytest.raises(LandscapeError, match=message) as error:
            sharpness(objective, **{"rhos": [0.1], **options})
        assert "\n" not in str(error.value)
    with pytest.raises(LandscapeError, match="eval mode"):
        sharpness(Objective(model, x, y, bn="train"), [0.1], bn_recompute=True)


def test_resume_computes_only_the_missing_units_and_refuses_other_options(tmp_path, monkeypatch):
    model, x, y = relu_net()
    objective = Objective(model, x, y)
    options = {"kind": "both", "m": 16, "draws": 3, "steps": 4}
    out, reference = tmp_path / "run.h5", tmp_path / "reference.h5"
    calls = []
    ascent = sharpness_module.worst_case_ascent
    monkeypatch.setattr(sharpness_module, "worst_case_ascent", lambda *a: calls.append(1) or ascent(*a))

    def crash(done: int, total: int) -> None:
        if done == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sharpness(objective, [0.1, 0.2], out=out, progress=crash, **options)
    assert not out.exists() and Path(f"{out}.sharpness.partial").exists() and len(calls) == 4
    with pytest.raises(LandscapeError, match="options differ"):
        sharpness(objective, [0.1, 0.2], out=out, resume=True, **{**options, "draws": 4})
    calls.clear()
    resumed = sharpness(objective, [0.1, 0.2], out=out, resume=True, **options)
    assert len(calls) == 2, "3 batches x 2 radii: only the two missing units are computed"
    fresh = sharpness(objective, [0.1, 0.2], out=reference, **options)
    for key in ("worst", "average", "average_se", "ascent_loss", "draw_loss", "worst_base"):
        np.testing.assert_array_equal(resumed[key], fresh[key], err_msg=key)
    assert resumed["loss_base"] == fresh["loss_base"] and not Path(f"{out}.sharpness.partial").exists()
    with pytest.raises(LandscapeError, match="already holds /sharpness"):
        sharpness(objective, [0.1, 0.2], out=out, **options)


CHECKPOINT = ROOT / "data" / "cnn_digits_sgd.pt"


def test_cli_writes_the_group_prints_the_table_and_plots(tmp_path):
    out = tmp_path / "s.h5"
    run_args = ("sharpness", CHECKPOINT, "--subset", 64, "--rhos", "0.01,0.1", "--kind", "both", "--m", 32,
                "--steps", 3, "--draws", 3, "--device", "cpu", "--out", out)
    run = invoke(*run_args)
    assert run.exit_code == 0, run.output
    result = Result.load(out, "sharpness")
    assert result["worst"].shape == (2,) and result["average_se"].shape == (2,)
    assert result.attrs["config"]["m"] == 32 and result.attrs["eval_set"]["n"] == 64
    from landscape.analysis.sharpness import SharpnessResult
    assert SharpnessResult.load(out).summary() in run.output
    lines = run.stdout.splitlines()  # the time estimate goes to stderr
    assert lines[-1] == f"wrote {out} /sharpness" and lines[-3].split()[:3] == ["0.01", f"{result['worst'][0]:.6g}",
                                                                              f"{result['average'][0]:.6g}"]
    again = invoke(*run_args, "--resume")
    assert again.exit_code == 0 and again.stdout == run.stdout, again.output
    for extra, message in ((["--resume", "--draws", 4], "options differ"), ([], "already holds /sharpness")):
        refused = invoke(*run_args, *extra)
        assert refused.exit_code == 2 and message in refused.output, refused.output
    drawn = invoke("plot", out, "--group", "sharpness")
    assert drawn.exit_code == 0, drawn.output
    assert (tmp_path / "s_sharpness.png").read_bytes().startswith(b"\x89PNG")
    both = invoke("plot", out, out, "--group", "sharpness", "--labels", "a,b", "--out-dir", tmp_path)
    assert both.exit_code == 0 and (tmp_path / "compare_sharpness.png").exists(), both.output


@pytest.mark.parametrize(("options", "message"), [
    (["--rhos", "0.1,-0.05"], "rhos must be positive"),
    (["--m", 65], "m = 65 examples per batch is impossible"),
    (["--m", 0], "--m"),
    (["--kind", "max"], "--kind"),
    (["--norm", "l1"], "--norm"),
    (["--step-size", "0"], "step_size must be a positive"),
])
def test_cli_bad_options_exit_2_with_one_line(tmp_path, options, message):
    run = invoke("sharpness", CHECKPOINT, "--subset", 64, "--device", "cpu", "--out", tmp_path / "s.h5", *options)
    assert run.exit_code == 2, run.output
    assert message in run.output and len(run.output.strip().splitlines()) == 1, run.output
    assert not (tmp_path / "s.h5").exists()
