"""Curvature operators and the solvers that take any of them, against dense float64 ground truth.

Two operators: a :class:`DenseOperator` built as ``Q diag(lambda) Q^T`` from a random orthogonal ``Q``
and CHOSEN eigenvalues (negative, clustered and repeated ones among them), and the
:class:`HessianOperator` of a tiny float64 MLP, whose dense Hessian comes from
``torch.autograd.functional.hessian`` of the full-set loss written here. Eigenvalues are the chosen
ones or ``eigvalsh``; moments and traces come from the dense matrices; the probe streams are
re-drawn here from their documented recipe (random signs, ``torch.randint`` on a CPU generator seeded
by ``seed``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close
from scipy.sparse.linalg import eigsh
from torch import nn
from torch.func import functional_call

from landscape.curvature import lanczos as lanczos_module
from landscape.curvature.hessian import HessianOperator
from landscape.curvature.lanczos import extreme_eigenpairs
from landscape.curvature.operator import CurvatureOperator, DenseOperator
from landscape.curvature.pyhessian_backend import pyhessian_hessian
from landscape.curvature.slq import broadened_density, slq
from landscape.curvature.trace import hutchinson_trace, hutchpp_trace
from landscape.errors import LandscapeError
from landscape.objective import Objective

# top: one outlier and a cluster (gaps 1e-3); bottom: a cluster and an outlier; bulk with a repeated value
TOP, BOTTOM = [50.0, 20.0, 19.999, 19.998], [-12.0, -5.0, -4.999, -4.998]
CHOSEN = np.sort(np.r_[TOP, BOTTOM, np.linspace(-1.0, 3.0, 150), [1.0, 1.0, 0.0]])


@dataclass
class Case:
    """A way to build a fresh operator, its dense matrix and its eigenvalues (ascending)."""

    build: Callable[..., CurvatureOperator]
    matrix: torch.Tensor
    eigenvalues: np.ndarray


def known_spectrum() -> Case:
    generator = torch.Generator().manual_seed(0)
    q = torch.linalg.qr(torch.randn(len(CHOSEN), len(CHOSEN), generator=generator, dtype=torch.float64)).Q
    matrix = (q * torch.as_tensor(CHOSEN)) @ q.T
    matrix = (matrix + matrix.T) / 2
    return Case(lambda **options: DenseOperator(matrix, **options), matrix, CHOSEN)


def tiny_objective() -> Objective:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(30, 5, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (30,), generator=generator)
    return Objective(model, x, y, batch_size=7)   # 7 x 4 + 2: uneven last batch


def dense_hessian(objective: Objective) -> torch.Tensor:
    """The full-set mean cross-entropy's Hessian by double backward, parameters in order."""
    names = list(objective.params)
    shapes = [p.shape for p in objective.params.values()]
    sizes = [p.numel() for p in objective.params.values()]

    def loss(flat: torch.Tensor) -> torch.Tensor:
        chosen = {n: t.view(s) for n, t, s in zip(names, flat.split(sizes), shapes)}
        return F.cross_entropy(functional_call(objective.model, chosen, (objective.inputs,)), objective.targets)

    flat = torch.cat([p.reshape(-1) for p in objective.params.values()])
    return torch.autograd.functional.hessian(loss, flat).detach()


def tiny_hessian() -> Case:
    objective = tiny_objective()
    matrix = dense_hessian(objective)
    return Case(lambda **options: HessianOperator(objective, **options), matrix,
                torch.linalg.eigvalsh(matrix).numpy())


@pytest.fixture(scope="module", params=["dense", "hessian"])
def case(request) -> Case:
    return known_spectrum() if request.param == "dense" else tiny_hessian()


def signs(count: int, dim: int, seed: int) -> torch.Tensor:
    """The documented probe stream: ``count`` rows of random signs from a CPU generator seeded by ``seed``."""
    drawn = torch.randint(0, 2, (count, dim), generator=torch.Generator().manual_seed(seed), dtype=torch.int8)
    return drawn.double() * 2 - 1


@pytest.mark.parametrize("restarts", [False, True])
def test_extreme_eigenpairs_match_the_spectrum(case, restarts, monkeypatch):
    if restarts:
        monkeypatch.setattr(lanczos_module, "MAX_BASIS", 20)   # 7 wanted: restarts keep 13 and grow to 20
    operator = case.build()
    pairs = extreme_eigenpairs(operator, 4, 3, tol=1e-12, max_products=5000, eigenvectors=True)
    scale = np.abs(case.eigenvalues).max()
    assert_close(pairs["top"], case.eigenvalues[::-1][:4], 1e-10, "top-4", atol=1e-12 * scale)
    assert_close(pairs["bottom"], case.eigenvalues[:3], 1e-10, "bottom-3", atol=1e-12 * scale)
    assert pairs["top_converged"].all() and pairs["bottom_converged"].all()
    for side in ("top", "bottom"):
        vectors, values = pairs[f"{side}_vectors"], torch.as_tensor(pairs[side])
        residual = torch.linalg.vector_norm(vectors @ case.matrix - values[:, None] * vectors, dim=1).numpy()
        assert_close(residual, np.zeros(len(values)), 0.0, f"{side} residuals ||Av - lambda v||", atol=1e-9 * scale)
        assert_close(pairs[f"{side}_residuals"] * np.abs(pairs[side]), residual, 0.0,
                      f"{side} measured residuals", atol=1e-12 * scale)
    if restarts and isinstance(operator, DenseOperator):
        assert operator.products > 20, "the restart path did not run"


def test_to_scipy_eigsh_equals_own_top_k(case):
    operator = case.build()
    top = extreme_eigenpairs(operator, 4, tol=1e-12, max_products=5000)["top"]
    linear = case.build().to_scipy()
    assert linear.shape == (len(case.matrix),) * 2 and linear.dtype == np.float64
    values = eigsh(linear, k=4, which="LA", tol=1e-12, return_eigenvectors=False,
                   v0=np.random.default_rng(0).standard_normal(linear.shape[0]))
    assert_close(np.sort(values)[::-1], top, 1e-10, "eigsh against extreme_eigenpairs", atol=1e-12 * np.abs(top).max())
    block = np.random.default_rng(1).standard_normal((linear.shape[0], 3))
    dense = case.matrix.numpy()
    assert_close(linear.matmat(block), dense @ block, 1e-10, "to_scipy matmat", atol=1e-12)
    assert_close(linear.matvec(block[:, 0]), dense @ block[:, 0], 1e-10, "to_scipy matvec", atol=1e-12)


def test_slq_quadrature_reproduces_start_moments_and_trace_moments(case):
    n_v, steps, seed = 8, 10, 3
    operator = case.build()
    nodes, weights = slq(operator, n_v, steps, seed)
    assert nodes.shape == weights.shape == (n_v, steps) and operator.products == n_v * steps
    d = len(case.matrix)
    values, vectors = torch.linalg.eigh(case.matrix)
    starts = signs(n_v, d, seed) / math.sqrt(d)
    overlaps = ((starts @ vectors) ** 2).numpy()   # (n_v, d): squared components of each unit start u
    for j in range(2 * steps):   # Gauss quadrature with `steps` nodes is exact up to degree 2 steps - 1
        got = (weights * nodes**j).sum(1)
        expected = overlaps @ values.numpy() ** j   # u^T A^j u
        scale = (weights * np.abs(nodes) ** j).sum(1)
        assert_close(got, expected, 0.0, f"u^T A^{j} u", atol=1e-9 * scale)
    for j in (1, 2):   # averaged over the starts: tr(A^j) / d within 3 standard errors
        power = torch.linalg.matrix_power(case.matrix, j)
        # Var(z^T B z) for Rademacher z is 2 (||B||_F^2 - sum_i B_ii^2); the start is z / sqrt(d)
        stderr = math.sqrt(2 * float((power**2).sum() - (torch.diagonal(power) ** 2).sum()) / n_v) / d
        got, expected = float((weights * nodes**j).sum(1).mean()), float(torch.trace(power)) / d
        assert abs(got - expected) <= 3 * stderr, f"moment {j}: {got} vs {expected} ± {stderr}"
    grid, density, sigma = broadened_density(nodes, weights)
    assert abs(np.trapezoid(density, grid) - 1) < 1e-8
    assert_close(np.trapezoid(grid * density, grid), (weights * nodes).sum(1).mean(), 1e-8,
                 "mean of the broadened density", atol=1e-10 * sigma)


def test_traces_within_three_standard_errors(case):
    truth = float(torch.trace(case.matrix))
    off_diagonal = float((case.matrix**2).sum() - (torch.diagonal(case.matrix) ** 2).sum())
    budget, seed = 60, 1
    hutchinson = hutchinson_trace(case.build(batch=4), budget, seed)
    hutchpp = hutchpp_trace(case.build(), budget, seed)
    exact_stderr = math.sqrt(2 * off_diagonal / budget)
    assert 0.5 * exact_stderr < hutchinson[1] < 2 * exact_stderr, f"Hutchinson stderr {hutchinson[1]} vs {exact_stderr}"
    for name, (estimate, stderr) in (("hutchinson", hutchinson), ("hutch++", hutchpp)):
        assert abs(estimate - truth) <= 3 * stderr, f"{name}: {estimate} vs {truth} ± {stderr}"
    # the probes: one draw of `batch` rows per pass from the seeded CPU generator
    generator = torch.Generator().manual_seed(seed)
    rows = [torch.randint(0, 2, (min(4, budget - i), len(case.matrix)), generator=generator, dtype=torch.int8)
            for i in range(0, budget, 4)]
    z = torch.cat(rows).double() * 2 - 1
    assert_close(hutchinson[0], float(((z @ case.matrix) * z).sum(1).mean()), 1e-10, what="Hutchinson's probe stream")


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")   # PyHessian's own HVP
def test_hessian_products_counted_once_per_vector_whatever_the_strategy():
    objective = tiny_objective()
    exact = dense_hessian(objective)
    d = len(exact)
    generator = torch.Generator().manual_seed(0)
    v, block = torch.randn(d, generator=generator, dtype=torch.float64), torch.randn(d, 7, generator=generator,
                                                                                      dtype=torch.float64)
    for cache_bytes, cached in ((None, True), (0, False)):   # double backward; forward-over-reverse (vmapped)
        passes: list[int] = []
        operator = HessianOperator(objective, batch=3, progress=passes.append, cache_bytes=cache_bytes)
        assert operator.shape == (d, d) and (operator.dtype, operator.device) == (torch.float64, torch.device("cpu"))
        assert_close(operator @ v, exact @ v, 1e-10, f"one vector, cached={cached}", atol=1e-12)
        assert_close(operator @ block, exact @ block, 1e-10, f"(d, K) block, cached={cached}", atol=1e-12)
        assert_close(operator.apply(block.T), (exact @ block).T, 1e-10, f"(K, d) rows, cached={cached}", atol=1e-12)
        linear = operator.to_scipy()
        linear.matvec(v.numpy())
        linear.matmat(block.numpy())
        assert bool(operator.graphs) == cached
        assert passes == [1, 3, 3, 1, 3, 3, 1, 1, 3, 3, 1], passes
        assert operator.products == 1 + 7 + 7 + 1 + 7
    pyhessian = pyhessian_hessian(operator)
    pyhessian.dataloader_hv_product([p.clone() for p in objective.params.values()])
    assert operator.products == 24, "PyHessian's HVP is counted once too"


def test_dense_operator_counts_and_checks_its_input():
    passes: list[int] = []
    operator = DenseOperator(torch.diag(torch.arange(1.0, 6.0)), batch=2, progress=passes.append)
    assert operator @ torch.ones(5, 3) is not None and operator.products == 3 and passes == [2, 1]
    assert torch.equal(operator @ torch.ones(5), torch.arange(1.0, 6.0))
    with pytest.raises(LandscapeError, match="symmetric"):
        DenseOperator(torch.triu(torch.ones(3, 3)))
    with pytest.raises(LandscapeError, match="square"):
        DenseOperator(torch.ones(3, 4))
    with pytest.raises(LandscapeError, match=r"\(5, K\) block"):
        operator @ torch.ones(4)
    with pytest.raises(LandscapeError, match="float32"):
        operator @ torch.ones(5, dtype=torch.float64)
    single = DenseOperator(torch.eye(3)).to_scipy()
    assert single.matvec(np.ones(3)).dtype == np.float64   # float32 operator, float64 numpy out
