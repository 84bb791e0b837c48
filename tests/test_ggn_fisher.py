"""GGN and empirical-Fisher operators and spectra against dense float64 matrices built here.

Ground truth, written in this file from the model itself (``functional_call`` on a copy, BatchNorm set
up by hand as in test_hessian, whose models, with non-trivial running statistics, are reused):
- the GGN ``sum_b (B_b/N) (1/B_b) sum_i J_i^T (diag(p_i) - p_i p_i^T) J_i`` with ``J`` the Jacobian of each
  batch's outputs by ``torch.autograd.functional.jacobian`` (under batch statistics an output depends on
  its whole batch, so ``J`` is taken per batch) and the closed-form softmax Hessian;
- the empirical Fisher ``(1/N) sum_i g_i g_i^T`` from a plain loop of ``torch.autograd.grad``, one example
  at a time, BatchNorm on running statistics;
- eigenvalues by ``torch.linalg.eigvalsh``; Hessians by ``torch.autograd.functional.hessian``.
"""

from __future__ import annotations

import copy

import clitools
import h5py
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close
from torch import nn
from torch.func import functional_call

from landscape.analysis.hessian import HessianResult, hessian_spectrum, parameter_blocks
from landscape.curvature.fisher import EmpiricalFisherOperator
from landscape.curvature.ggn import GGNOperator
from landscape.errors import LandscapeError
from landscape.objective import Objective, empirical_fisher
from test_hessian import case_model, sub_block

N = 48
CASES = {"mlp": ("eval", 20), "cnn-bn-eval": ("eval", 20), "cnn-bn-train": ("train", 20)}   # bn mode, batch size
# batches of 20 + 20 + 8; under bn="train" each normalises by its own statistics


@pytest.fixture(scope="module")
def data(digits):
    return digits.x_train[:N].double(), digits.y_train[:N]


def reference_model(model: nn.Module, bn: str) -> nn.Module:
    """A copy in eval mode; with ``bn="train"`` its BatchNorm layers normalise by batch statistics."""
    model = copy.deepcopy(model).eval()
    for module in model.modules():
        if bn == "train" and isinstance(module, nn.BatchNorm2d):
            module.train()
            module.track_running_stats = False
    return model


def flat_call(model: nn.Module):
    """``(flat weights (d,), f(flat, x) -> outputs)`` over ``named_parameters`` in order."""
    params = dict(model.named_parameters())
    shapes, sizes = [p.shape for p in params.values()], [p.numel() for p in params.values()]

    def outputs(flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return functional_call(model, {n: t.view(s) for n, t, s in zip(params, flat.split(sizes), shapes)}, (x,))

    return torch.cat([p.detach().reshape(-1) for p in params.values()]), outputs


def dense_ggn(model: nn.Module, x: torch.Tensor, y: torch.Tensor, bn: str, batch_size: int) -> torch.Tensor:
    flat, outputs = flat_call(reference_model(model, bn))
    total = torch.zeros(len(flat), len(flat), dtype=torch.float64)
    for start in range(0, len(x), batch_size):
        xb = x[start:start + batch_size]
        jacobian = torch.autograd.functional.jacobian(lambda w: outputs(w, xb), flat)   # (B, C, d)
        p = torch.softmax(outputs(flat, xb), dim=1).detach()
        h = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]                        # (B, C, C)
        total += torch.einsum("ncd,nce,nef->df", jacobian, h, jacobian) / len(x)      # (B/N) (1/B) sum_i
    return total


def example_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``(N, d)``: one ``torch.autograd.grad`` per example, BatchNorm on running statistics."""
    flat, outputs = flat_call(reference_model(model, "eval"))
    rows = []
    for i in range(len(x)):
        w = flat.clone().requires_grad_()
        rows.append(torch.autograd.grad(F.cross_entropy(outputs(w, x[i:i + 1]), y[i:i + 1]), w)[0])
    return torch.stack(rows)


def dense_fisher(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    g = example_gradients(model, x, y)
    return g.T @ g / len(x)


_DENSE: dict[tuple[str, str], torch.Tensor] = {}


def setup(case: str, curvature: str, data) -> tuple[nn.Module, Objective, torch.Tensor]:
    bn, batch_size = CASES[case]
    model = case_model(case)
    if (case, curvature) not in _DENSE:
        _DENSE[case, curvature] = (dense_ggn(model, *data, bn, batch_size) if curvature == "ggn"
                                   else dense_fisher(model, *data))
    return model, Objective(model, *data, batch_size=batch_size, bn=bn), _DENSE[case, curvature]


def random_rows(count: int, dim: int) -> torch.Tensor:
    return torch.randn(count, dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


@pytest.mark.parametrize("vectorize", [False, True])
@pytest.mark.parametrize("case", list(CASES))
def test_ggn_products_equal_dense_jt_h_j(case, vectorize, data):
    model, objective, dense = setup(case, "ggn", data)
    state = copy.deepcopy(model.state_dict())
    rows = random_rows(5, len(dense))
    passes: list[int] = []
    operator = GGNOperator(objective, batch=3, progress=passes.append, vectorize=vectorize)
    scale = float(dense.abs().max())
    assert_close(operator.apply(rows), rows @ dense, 1e-10, "G v for a block of rows", atol=1e-12 * scale)
    assert_close(operator @ rows[0], dense @ rows[0], 1e-10, "G v for one vector", atol=1e-12 * scale)
    assert passes == [3, 2, 1] and operator.products == 6
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items()), "the model changed"


@pytest.mark.parametrize("case", ["mlp", "cnn-bn-eval"])
def test_ggn_spectrum_equals_dense_and_is_positive_semi_definite(case, data):
    _, objective, dense = setup(case, "ggn", data)
    # the GGN's rank is at most N (C - 1) < d: its smallest eigenvalue is a zero of high multiplicity, whose
    # Ritz value Lanczos approaches (from above, as for any matrix) but never flags as converged
    with pytest.warns(RuntimeWarning, match="some GGN eigenpairs did not reach tol"):
        result = hessian_spectrum(objective, 4, bottom_k=1, tol=1e-10, max_hvps=120, curvature="ggn")
    eigenvalues = torch.linalg.eigvalsh(dense).numpy()
    assert_close(result["eigenvalues"], eigenvalues[::-1][:4], 1e-8, what="GGN top-4")
    assert all(result["converged"]) and result.group == "ggn" and result["curvature"] == "ggn"
    lambda1, bottom = result["lambda1"], result["bottom_eigenvalues"][0]
    assert -1e-10 * lambda1 <= bottom <= 1e-6 * lambda1, f"bottom eigenvalue {bottom} of a PSD matrix with zeros"
    assert abs(eigenvalues[0]) <= 1e-12 * lambda1   # the dense GGN is PSD and singular too


def test_ggn_of_a_linear_model_with_cross_entropy_is_the_hessian(data):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).double()
    x, y = data
    objective = Objective(model, x, y, batch_size=20)
    flat, outputs = flat_call(model)
    hessian = torch.autograd.functional.hessian(lambda w: F.cross_entropy(outputs(w, x), y), flat)
    rows = random_rows(3, len(flat))
    assert_close(GGNOperator(objective).apply(rows), rows @ hessian, 1e-10,
                 "G v against H v for a linear model", atol=1e-12 * float(hessian.abs().max()))


def test_ggn_of_another_loss_takes_its_output_hessian_from_autograd(data):
    model, objective, dense = setup("mlp", "ggn", data)
    rows = random_rows(3, len(dense))
    scale = float(dense.abs().max())
    same_loss = Objective(model, *data, batch_size=20, loss_fn=lambda out, y: F.cross_entropy(out, y))
    assert_close(GGNOperator(same_loss).apply(rows), rows @ dense, 1e-10, "cross-entropy by autograd",
                 atol=1e-12 * scale)

    def squared_error(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(out, F.one_hot(y, 10).to(out.dtype))

    mse = Objective(model, *data, batch_size=20, loss_fn=squared_error)
    flat, outputs = flat_call(reference_model(model, "eval"))
    jacobian = torch.autograd.functional.jacobian(lambda w: outputs(w, data[0]), flat)       # (N, C, d)
    expected = 2 / (N * 10) * torch.einsum("ncd,nce->de", jacobian, jacobian)   # H_L = 2 I / (B C) per batch
    for vectorize in (False, True):
        assert_close(GGNOperator(mse, vectorize=vectorize).apply(rows), rows @ expected, 1e-10,
                     f"mean squared error, vectorize={vectorize}", atol=1e-12 * float(expected.abs().max()))


@pytest.mark.parametrize("case", ["mlp", "cnn-bn-eval"])
def test_empirical_fisher_equals_mean_of_gradient_outer_products(case, data):
    model, objective, dense = setup(case, "fisher", data)
    rows = random_rows(5, len(dense))
    scale = float(dense.abs().max())
    cached = EmpiricalFisherOperator(objective, batch=2)
    streamed = EmpiricalFisherOperator(objective, batch=2, cache_bytes=0, chunk=7)   # 20 = 7 + 7 + 6 per batch
    for operator in (cached, streamed, cached):   # the cached one twice: the second pass reuses the gradients
        assert_close(operator.apply(rows), rows @ dense, 1e-10, f"F v, cached={operator.cached}", atol=1e-12 * scale)
    assert cached.gradients is not None and cached.gradients.shape == (N, len(dense))
    assert streamed.gradients is None and (cached.products, streamed.products) == (10, 5)
    result = hessian_spectrum(objective, 3, tol=1e-10, curvature="fisher")
    assert_close(result["eigenvalues"], torch.linalg.eigvalsh(dense).numpy()[::-1][:3], 1e-8, what="Fisher top-3")
    assert result.group == "fisher"


def test_optimizer_fisher_diagonal_is_the_operator_diagonal(data):
    model, objective, dense = setup("cnn-bn-eval", "fisher", data)
    diagonal = torch.diagonal(EmpiricalFisherOperator(objective).apply(torch.eye(len(dense), dtype=torch.float64)))
    ssam = torch.cat([t.reshape(-1) for t in empirical_fisher(model, dict(model.named_parameters()), *data,
                                                              chunk_size=7).values()])
    assert_close(diagonal, torch.diagonal(dense), 1e-10, "operator diagonal", atol=1e-14)
    assert_close(ssam, torch.diagonal(dense), 1e-10, "SSAM-F's diagonal", atol=1e-14)


def test_empirical_fisher_refuses_batch_statistics(data):
    _, objective, _ = setup("cnn-bn-train", "ggn", data)
    with pytest.raises(LandscapeError, match="--bn eval") as info:
        hessian_spectrum(objective, 1, curvature="fisher")
    assert "\n" not in str(info.value)
    no_bn = Objective(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).double(), *data, bn="train")
    assert hessian_spectrum(no_bn, 1, curvature="fisher")["lambda1"] > 0   # without BatchNorm, train is eval


@pytest.mark.parametrize("curvature", ["ggn", "fisher"])
def test_parameter_subsets_and_blocks_are_dense_sub_blocks(curvature, data):
    model, objective, dense = setup("cnn-bn-eval", curvature, data)
    result = hessian_spectrum(objective, 3, params="7.*,8.*", tol=1e-10, curvature=curvature)
    sub = sub_block(model, dense, ["7.weight", "8.weight", "8.bias"])
    assert result["num_params"] == len(sub)
    assert_close(result["eigenvalues"], torch.linalg.eigvalsh(sub).numpy()[::-1][:3], 1e-8, what="conv 7 + bn 8")
    blocks = hessian_spectrum(objective, 2, per_block=True, tol=1e-10, curvature=curvature)
    assert blocks["blocks"] == list(parameter_blocks(objective))
    for name, members, values in zip(blocks["blocks"], parameter_blocks(objective).values(),
                                     blocks["block_eigenvalues"]):
        expected = torch.linalg.eigvalsh(sub_block(model, dense, members)).numpy()[::-1]
        k = min(2, len(expected))
        assert_close(values[:k], expected[:k], 1e-8, f"block {name}", atol=1e-12 * float(dense.abs().max()))


@pytest.mark.parametrize("curvature", ["ggn", "fisher"])
def test_hutchpp_trace_within_three_standard_errors(curvature, data):
    _, objective, dense = setup("mlp", curvature, data)
    result = hessian_spectrum(objective, 0, trace=True, trace_hvps=30, seed=1, curvature=curvature)
    truth = float(torch.trace(dense))
    assert result["hvp_count"] == 30 and result["trace_stderr"] > 0
    assert abs(result["trace"] - truth) <= 3 * result["trace_stderr"], f"{result['trace']} vs {truth}"


@pytest.mark.parametrize("kwargs, message", [
    ({"curvature": "fim"}, "unknown curvature 'fim'"),
    ({"curvature": "ggn", "backend": "pyhessian"}, "computes the Hessian only"),
])
def test_bad_curvature_options_are_one_line_errors(kwargs, message, data):
    _, objective, _ = setup("mlp", "ggn", data)
    with pytest.raises(LandscapeError, match=message) as info:
        hessian_spectrum(objective, 1, **kwargs)
    assert "\n" not in str(info.value)


def invoke(*args):
    return clitools.invoke("hessian", *args)


def test_cli_keeps_one_group_per_curvature_and_plots_them(checkpoint, tmp_path):
    out = tmp_path / "c.h5"
    common = ("--top-k", 2, "--subset", 32, "--dtype", "float64", "--out", out)
    for curvature, title, products in (("hessian", "Hessian", "HVPs"), ("ggn", "GGN", "GGN products"),
                                       ("fisher", "empirical Fisher", "Fisher products")):
        result = invoke(checkpoint, "--curvature", curvature, "--trace", "--trace-hvps", 9, *common)
        assert result.exit_code == 0, result.output
        stored = HessianResult.load(out, curvature)
        assert stored.summary() in result.output and f"saved /{curvature} in" in result.output
        assert stored.summary().startswith(title) and products in stored.summary()
        assert stored["curvature"] == stored["config"]["curvature"] == curvature
    with h5py.File(out) as handle:
        assert {"hessian", "ggn", "fisher"} <= set(handle)
    again = invoke(checkpoint, "--curvature", "ggn", *common)
    assert again.exit_code == 2 and "/ggn" in again.output and "--overwrite" in again.output
    plotted = clitools.invoke("plot", out, "--out-dir", tmp_path)
    assert plotted.exit_code == 0, plotted.output
    assert all((tmp_path / f"c_{group}.png").stat().st_size > 0 for group in ("hessian", "ggn", "fisher"))


@pytest.mark.parametrize("args, message", [
    (["--curvature", "fisher", "--bn", "train"], "--bn eval"),
    (["--curvature", "ggn", "--backend", "pyhessian"], "computes the Hessian only"),
    (["--curvature", "gnn"], "--curvature"),
])
def test_cli_bad_curvature_options_exit_2(checkpoint, tmp_path, args, message):
    result = invoke(checkpoint, "--subset", 16, "--top-k", 1, "--out", tmp_path / "x.h5", *args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "x.h5").exists()


def test_cli_help_says_the_empirical_fisher_is_not_the_fisher():
    text = " ".join(invoke("--help").output.split())
    assert "EMPIRICAL Fisher" in text and "NOT the Fisher" in text and "--per-batch" in text
