"""Hessian spectrum against the exact Hessian of tiny float64 models on digits.

Ground truth: the dense Hessian of the full-set cross-entropy, written here from the model itself
(``functional_call`` on a copy, BatchNorm set up by hand), by double backward
(``torch.autograd.functional.hessian``), and ``torch.linalg.eigvalsh``. Not ``torch.func.hessian``:
in torch 2.13 its vmapped batch rules give a wrong, asymmetric Hessian (errors ~5% of the largest
entry) for BatchNorm on batch statistics; for the other cases both agree to 1e-15.
Estimator errors (SLQ moments, traces) are re-derived from the exact Hessian.
"""

from __future__ import annotations

import copy
import math

import clitools
import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, make_model
from torch import nn
from torch.func import functional_call

from landscape.analysis.hessian import HessianResult, hessian_spectrum, parameter_blocks
from landscape.curvature import lanczos as lanczos_module
from landscape.curvature.hessian import HessianOperator
from landscape.errors import LandscapeError
from landscape.objective import Objective

N = 128
CASES = {  # name -> (architecture kwargs, bn mode, batch size)
    "mlp": ({"name": "mlp", "hidden": (12,)}, "eval", 48),              # uneven batches: 48 + 48 + 32
    "cnn-bn-eval": ({"name": "cnn", "width": 2}, "eval", 48),
    "cnn-bn-train": ({"name": "cnn", "width": 2}, "train", N),   # one batch: BN statistics of the full set
    "cnn-nobn": ({"name": "cnn", "width": 2, "bn": False}, "eval", 48),
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest (and steadiest on a busy machine) on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def case_model(case: str) -> nn.Module:
    """The float64 model of ``case`` (its architecture options in ``CASES``), from :func:`helpers.make_model`."""
    return make_model(**CASES[case][0], dtype=torch.float64)


@pytest.fixture(scope="module")
def data(digits):
    return digits.x_train[:N].double(), digits.y_train[:N]


def exact_hessian(model: nn.Module, x: torch.Tensor, y: torch.Tensor, bn: str) -> torch.Tensor:
    """Dense Hessian of the full-set mean cross-entropy, parameters in ``named_parameters`` order."""
    model = copy.deepcopy(model).eval()
    if bn == "train":
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.train()
                module.track_running_stats = False
    params = dict(model.named_parameters())
    shapes = [p.shape for p in params.values()]
    sizes = [p.numel() for p in params.values()]

    def loss(flat: torch.Tensor) -> torch.Tensor:
        chosen = {n: t.view(s) for n, t, s in zip(params, flat.split(sizes), shapes)}
        return F.cross_entropy(functional_call(model, chosen, (x,)), y)

    flat = torch.cat([p.detach().reshape(-1) for p in params.values()])
    return torch.autograd.functional.hessian(loss, flat).detach()


def sub_block(model: nn.Module, hessian: torch.Tensor, names: list[str]) -> torch.Tensor:
    """The rows and columns of ``hessian`` belonging to the parameters ``names``."""
    offsets, start = {}, 0
    for name, p in model.named_parameters():
        offsets[name] = range(start, start + p.numel())
        start += p.numel()
    index = torch.tensor([i for name in names for i in offsets[name]])
    return hessian[index][:, index]


_EXACT: dict[str, torch.Tensor] = {}


def case_setup(case: str, data) -> tuple[nn.Module, Objective, torch.Tensor]:
    _, bn, batch_size = CASES[case]
    model = case_model(case)
    if case not in _EXACT:
        _EXACT[case] = exact_hessian(model, *data, bn)
    return model, Objective(model, *data, batch_size=batch_size, bn=bn), _EXACT[case]


def snapshot(model: nn.Module) -> tuple[dict, list, list]:
    return ({k: v.clone() for k, v in model.state_dict().items()}, [m.training for m in model.modules()],
            [(p.requires_grad, p.grad) for p in model.parameters()])


def assert_unchanged(model: nn.Module, before) -> None:
    state, modes, grads = before
    after_state, after_modes, after_grads = snapshot(model)
    changed = [k for k in state if not torch.equal(state[k], after_state[k])]
    assert not changed, f"the analysis changed {changed}"
    assert modes == after_modes, "train/eval flags changed"
    assert [(r, g is None) for r, g in grads] == [(r, g is None) for r, g in after_grads], "requires_grad/.grad changed"


@pytest.mark.parametrize("case", list(CASES))
def test_extreme_eigenpairs_match_exact_hessian(case, data):
    model, objective, exact = case_setup(case, data)
    before, passes = snapshot(model), []
    result = hessian_spectrum(objective, 5, bottom_k=3, eigenvectors=True, tol=1e-10, progress=passes.append)
    assert_unchanged(model, before)
    eigenvalues = torch.linalg.eigvalsh(exact).numpy()
    scale = np.abs(eigenvalues).max()
    assert_close(result["eigenvalues"], eigenvalues[::-1][:5], 1e-6, "top-5", atol=1e-10 * scale)
    assert_close(result["bottom_eigenvalues"], eigenvalues[:3], 1e-6, "bottom-3", atol=1e-10 * scale)
    assert all(result["converged"]) and all(result["bottom_converged"]) and result["all_converged"]
    for key, values in (("eigenvectors", result["eigenvalues"]), ("bottom_eigenvectors", result["bottom_eigenvalues"])):
        vectors = torch.as_tensor(result[key])
        assert_close(torch.linalg.vector_norm(vectors, dim=1), np.ones(len(vectors)), 1e-10, what="norms")
        residual = torch.linalg.vector_norm(vectors @ exact - torch.as_tensor(values)[:, None] * vectors, dim=1)
        assert_close(residual, np.zeros(len(vectors)), 0.0, f"{key} residuals", atol=1e-6 * scale)
        reported = result["residuals" if key == "eigenvectors" else "bottom_residuals"]
        assert_close(np.asarray(reported) * np.abs(values), residual, 0.0, f"{key} reported residuals",
                     atol=1e-12 * scale)
    assert result["lambda1_over_lambda5"] == pytest.approx(eigenvalues[-1] / eigenvalues[-5], rel=1e-6)
    assert result["hvp_count"] == result["hvp_count_eigen"] == sum(passes)


def test_operator_matches_exact_hessian_with_and_without_cached_graphs(data):
    _, objective, exact = case_setup("cnn-bn-eval", data)   # batches of 48, 48, 32
    vectors = torch.randn(3, exact.shape[0], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = vectors @ exact
    full = HessianOperator(objective)
    operators = [full, HessianOperator(objective, cache_bytes=0)]
    for operator in operators:
        for _ in range(2):   # the second round reuses whatever the first cached
            got = torch.cat([operator.apply(v[None]) for v in vectors])
            assert_close(got, expected, 1e-10, "single-vector HVPs", atol=1e-12)
    partial = HessianOperator(objective, cache_bytes=full.graph_bytes // 2)   # too little: nothing cached
    for v, e in zip(vectors, expected):
        assert_close(partial.apply(v[None])[0], e, 1e-10, "HVPs when the graphs do not fit", atol=1e-12)
    assert (len(full.graphs), len(operators[1].graphs), len(partial.graphs)) == (3, 0, 0)
    assert_close(full.apply(vectors), expected, 1e-10, "several vectors through the cached graphs (CPU)", atol=1e-12)
    assert_close(operators[1].apply(vectors), expected, 1e-10, "batched forward-over-reverse HVPs", atol=1e-12)
    assert [o.products for o in (*operators, partial)] == [2 * 3 + 3, 2 * 3 + 3, 3]   # every HVP counted once


def test_thick_restart_converges_to_exact(data, monkeypatch):
    monkeypatch.setattr(lanczos_module, "MAX_BASIS", 14)   # forces several restarts (5 wanted + 4 spare kept)
    _, objective, exact = case_setup("cnn-bn-eval", data)
    result = hessian_spectrum(objective, 5, tol=1e-10)
    eigenvalues = torch.linalg.eigvalsh(exact).numpy()
    assert result["hvp_count"] > 14
    assert_close(result["eigenvalues"], eigenvalues[::-1][:5], 1e-6, what="top-5 with restarts")


def test_unconverged_pairs_are_flagged_and_warned(data):
    _, objective, _ = case_setup("mlp", data)
    with pytest.warns(RuntimeWarning, match="did not reach tol"):
        result = hessian_spectrum(objective, 5, tol=1e-12, max_hvps=8)
    assert not result["all_converged"] and not all(result["converged"])
    assert max(result["residuals"]) > 1e-12


def test_slq_density_integrates_to_one_and_matches_moments(data):
    model, objective, exact = case_setup("cnn-bn-eval", data)
    before = snapshot(model)
    n_v, steps = 8, 30
    result = hessian_spectrum(objective, 0, density=True, n_v=n_v, lanczos_steps=steps, seed=3)
    assert_unchanged(model, before)
    nodes, weights = result["slq_nodes"], result["slq_weights"]
    assert nodes.shape == weights.shape == (n_v, steps)
    assert_close(weights.sum(1), np.ones(n_v), 1e-10, what="quadrature weights")
    grid, density, sigma = result["density_grid"], result["density"], result["density_sigma"]
    assert np.all(np.diff(grid) > 0) and np.all(density >= 0)
    assert abs(np.trapezoid(density, grid) - 1) < 1e-8
    d = exact.shape[0]
    square = exact @ exact
    for moment, matrix, measured in (
            (1, exact, np.trapezoid(grid * density, grid)),
            (2, square, np.trapezoid(grid**2 * density, grid) - sigma**2)):
        expected = float(torch.trace(matrix)) / d
        # Var(z^T A z) for Rademacher z is 2 (||A||_F^2 - sum_i A_ii^2); the start is z / sqrt(d)
        stderr = math.sqrt(2 * float((matrix**2).sum() - (torch.diagonal(matrix) ** 2).sum()) / n_v) / d
        assert abs(measured - expected) <= 3 * stderr, f"moment {moment}: {measured} vs {expected} ± {stderr}"


def test_trace_estimators_within_three_standard_errors(data):
    _, objective, exact = case_setup("cnn-nobn", data)
    truth = float(torch.trace(exact))
    off_diagonal = float((exact**2).sum() - (torch.diagonal(exact) ** 2).sum())
    budget = 60
    hutchinson = hessian_spectrum(objective, 0, trace=True, trace_method="hutchinson", trace_hvps=budget, seed=1)
    hutchpp = hessian_spectrum(objective, 0, trace=True, trace_hvps=budget, seed=1)
    exact_stderr = math.sqrt(2 * off_diagonal / budget)
    assert 0.5 * exact_stderr < hutchinson["trace_stderr"] < 2 * exact_stderr
    for result in (hutchinson, hutchpp):
        assert result["hvp_count"] == result["hvp_count_trace"] == budget
        assert abs(result["trace"] - truth) <= 3 * result["trace_stderr"], \
            f"{result['trace_method']}: {result['trace']} vs {truth} ± {result['trace_stderr']}"


@pytest.mark.filterwarnings("ignore:some Hessian eigenpairs did not reach tol")   # power iteration rarely does
@pytest.mark.parametrize("case", ["mlp", "cnn-bn-train"])
def test_pyhessian_backend_agrees_on_lambda1(case, data):
    model, objective, exact = case_setup(case, data)
    before, rng = snapshot(model), torch.random.get_rng_state()
    result = hessian_spectrum(objective, 2, backend="pyhessian", tol=1e-6, trace=True, trace_hvps=20)
    assert_unchanged(model, before)
    assert torch.equal(rng, torch.random.get_rng_state()), "the global RNG state changed"
    eigenvalues = torch.linalg.eigvalsh(exact).numpy()
    lambda1, theta, residual = eigenvalues[-1], result["eigenvalues"][0], result["residuals"][0]
    # an approximate eigenpair with residual r is within r of an eigenvalue; PyHessian's tol bounds the rest
    assert abs(theta - lambda1) <= max(residual * abs(theta), 1e-3 * lambda1), f"{theta} vs {lambda1}"
    assert result["trace_method"] == "pyhessian-hutchinson" and np.isfinite(result["trace"])


def test_per_layer_spectra_equal_exact_sub_blocks(data):
    model, objective, exact = case_setup("cnn-bn-eval", data)
    before = snapshot(model)
    result = hessian_spectrum(objective, 3, params="7.*,8.*", tol=1e-10)   # third conv and its BatchNorm
    sub = sub_block(model, exact, ["7.weight", "8.weight", "8.bias"])
    assert result["num_params"] == sub.shape[0]
    assert_close(result["eigenvalues"], torch.linalg.eigvalsh(sub).numpy()[::-1][:3], 1e-6, what="conv 7 + bn 8")

    blocks = hessian_spectrum(objective, 2, per_block=True, tol=1e-10)
    assert_unchanged(model, before)
    groups = parameter_blocks(objective)
    assert blocks["blocks"] == list(groups)
    for name, members, values in zip(blocks["blocks"], groups.values(), blocks["block_eigenvalues"]):
        expected = torch.linalg.eigvalsh(sub_block(model, exact, members)).numpy()[::-1]
        k = min(2, len(expected))
        assert_close(values[:k], expected[:k], 1e-6, f"block {name}", atol=1e-12)


def test_blocks_split_top_level_containers():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Linear(2, 2)
            self.layers = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))
            self.head = nn.Linear(2, 1)

        def forward(self, x):
            return self.head(self.layers(self.stem(x)))

    objective = Objective(Net(), torch.zeros(1, 2), torch.zeros(1, dtype=torch.long))
    assert parameter_blocks(objective) == {
        "stem": ["stem.weight", "stem.bias"], "layers.0": ["layers.0.weight", "layers.0.bias"],
        "layers.2": ["layers.2.weight", "layers.2.bias"], "head": ["head.weight", "head.bias"]}


def test_result_saves_loads_and_plots(data, tmp_path):
    _, objective, _ = case_setup("mlp", data)
    result = hessian_spectrum(objective, 5, bottom_k=1, density=True, trace=True, n_v=2, lanczos_steps=10,
                              trace_hvps=12)
    path = result.save(tmp_path / "r.h5")
    loaded = HessianResult.load(path)
    np.testing.assert_array_equal(loaded["eigenvalues"], result["eigenvalues"])
    assert np.all(np.diff(loaded["eigenvalues"]) <= 0)
    assert loaded["hvp_count"] == result["hvp_count"] > 0 and loaded["config"]["top_k"] == 5
    assert loaded.summary() == result.summary()
    with h5py.File(path) as handle:
        assert {"eigenvalues", "slq_nodes", "slq_weights", "density_grid", "density"} <= set(handle["hessian"])
        assert {"trace", "trace_stderr", "hvp_count", "checkpoint", "config"} <= set(handle["hessian"].attrs)
    figure = loaded.plot(tmp_path / "r.png")
    assert (tmp_path / "r.png").stat().st_size > 0 and figure.axes[0].get_yscale() == "log"


@pytest.mark.parametrize("kwargs, message", [
    ({"top_k": 0}, "nothing to compute"),
    ({"backend": "pyhessian", "bottom_k": 1}, "no smallest eigenvalues"),
    ({"params": "nothing.*"}, "no parameter matches"),
    ({"tol": 2.0}, "tol must be in"),
    ({"backend": "scipy"}, "unknown backend"),
    ({"top_k": 10**6}, "at most"),
])
def test_bad_input_raises_one_line_landscape_error(kwargs, message, data):
    _, objective, _ = case_setup("mlp", data)
    with pytest.raises(LandscapeError, match=message) as info:
        hessian_spectrum(objective, **kwargs)
    assert "\n" not in str(info.value)


def invoke(*args):
    """``landscape hessian ARGS...`` (the tiny cnn ``checkpoint`` fixture comes from conftest)."""
    return clitools.invoke("hessian", *args)


def test_cli_prints_table_and_saves(checkpoint, tmp_path):
    out = tmp_path / "h.h5"
    options = ("--top-k", 5, "--density", "--trace", "--subset", 64, "--dtype", "float64", "--n-v", 2,
               "--lanczos-steps", 12, "--trace-hvps", 12)
    result = invoke(checkpoint, *options, "--out", out)
    assert result.exit_code == 0, result.output
    for text in ("λ1", "λ5", "λ1/λ5", "trace", "HVPs", "time"):
        assert text in result.output
    stored = HessianResult.load(out)
    assert stored["config"]["dtype"] == "float64" and stored["eval_set"]["n"] == 64
    again = invoke(checkpoint, "--out", out)
    assert again.exit_code == 2 and "--overwrite" in again.output and "Traceback" not in again.output
    resumed = invoke(checkpoint, *options, "--out", out, "--resume")  # the same options: reused
    assert resumed.exit_code == 0 and stored.summary() in resumed.output


def test_cli_flags_unconverged_pairs(checkpoint, tmp_path):
    result = invoke(checkpoint, "--top-k", 3, "--subset", 32, "--max-hvps", 4, "--tol", 1e-9,
                    "--out", tmp_path / "u.h5")
    assert result.exit_code == 0, result.output
    assert "NO" in result.output and "warning: some Hessian eigenpairs did not reach tol=1e-09" in result.output
    assert "DeprecationWarning" not in result.output


@pytest.mark.parametrize("args, message", [
    (["--params", "nothing.*"], "no parameter matches"),
    (["--top-k", "0"], "nothing to compute"),
    (["--backend", "pyhessian", "--bottom-k", "1"], "no smallest eigenvalues"),
    (["--tol", "5"], "--tol"),
])
def test_cli_bad_input_exits_2_with_one_line(checkpoint, tmp_path, args, message):
    result = invoke(checkpoint, "--subset", 16, "--out", tmp_path / "x.h5", *args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "x.h5").exists()


def test_cli_help_shows_examples_and_python():
    result = invoke("--help")
    assert result.exit_code == 0
    assert "landscape hessian runs/sam.pt" in result.output and "landscape.hessian_spectrum(" in result.output
