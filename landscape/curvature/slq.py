"""Stochastic Lanczos quadrature (Ghorbani et al. 2019) of any curvature operator, and its density.

:func:`slq` runs its ``n_v`` Lanczos processes in lockstep, so that one pass of the operator serves
several starts; :func:`broadened_density` turns the quadrature nodes and weights into a
Gaussian-broadened spectral density on a grid.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from landscape.curvature.lanczos import Lanczos, basis_bytes
from landscape.curvature.operator import CurvatureOperator, rademacher
from landscape.errors import LandscapeError

DENSITY_SIGMA = 1e-3         # default Gaussian width, relative to the width of the Ritz spectrum
GRID_PER_SIGMA = 4           # density grid points per sigma
GRID_TAILS = 8               # grid reaches this many sigmas beyond the outermost Ritz values
MAX_GRID = 2_000_000


def slq(operator: CurvatureOperator, n_v: int, steps: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Stochastic Lanczos quadrature: Ritz nodes and weights ``(n_v, steps)`` from Rademacher starts.

    Each run's weights are the squared first components of the eigenvectors of its ``T`` and sum
    to one; ``sum(w * node**j)`` is ``u^T A^j u`` for the unit start ``u`` (exact for ``j <= 2 * steps - 1``).
    Runs go in lockstep (one batched pass per step) as far as :func:`basis_bytes` allows.
    """
    steps = min(steps, operator.dim)
    vector_bytes = operator.dim * torch.finfo(operator.dtype).bits // 8
    per_pass = max(1, min(n_v, basis_bytes(operator.device) // ((steps + 1) * vector_bytes)))
    generator = torch.Generator().manual_seed(seed)
    nodes, weights = [], []
    for first in range(0, n_v, per_pass):
        starts = rademacher(min(per_pass, n_v - first), operator, generator)
        lanczos = Lanczos(starts, steps, generator)
        for _ in range(steps):
            lanczos.step(operator)
        values, vectors, _ = lanczos.ritz()
        nodes.append(values)
        weights.append(vectors[:, 0, :] ** 2)
    return np.concatenate(nodes), np.concatenate(weights)


def broadened_density(nodes: np.ndarray, weights: np.ndarray,
                      sigma: float | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """Average of Gaussian-broadened quadratures on a uniform grid: ``(grid, density, sigma)``.

    ``sigma`` (eigenvalue units) defaults to ``DENSITY_SIGMA`` times the width of the Ritz
    spectrum. The grid spacing is ``sigma / GRID_PER_SIGMA`` and it extends ``GRID_TAILS`` sigmas past
    the outermost nodes, so the density integrates to one and decays to ~1e-14 at the ends (log-y plots).
    """
    low, high = float(nodes.min()), float(nodes.max())
    if sigma is None:
        sigma = DENSITY_SIGMA * ((high - low) or max(abs(high), 1.0))
    if not sigma > 0:
        raise LandscapeError(f"density sigma must be positive, got {sigma}; omit it for the default")
    step = sigma / GRID_PER_SIGMA
    count = math.ceil((high - low + 2 * GRID_TAILS * sigma) / step) + 1
    if count > MAX_GRID:
        raise LandscapeError(f"density sigma {sigma:.3g} is too small for a spectrum {high - low:.3g} wide "
                             f"({count} grid points); use at least {(high - low) / (MAX_GRID / GRID_PER_SIGMA):.3g}")
    grid = low - GRID_TAILS * sigma + step * np.arange(count)
    density = np.zeros(count)
    for node_row, weight_row in zip(nodes, weights):
        z = (grid[:, None] - node_row[None, :]) / sigma
        density += np.exp(-0.5 * z**2) @ weight_row
    return grid, density / (len(nodes) * sigma * math.sqrt(2 * math.pi)), float(sigma)

