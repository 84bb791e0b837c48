"""Thick-restart Lanczos for the extreme eigenpairs of any curvature operator.

- :class:`Lanczos`: ``K`` processes in lockstep (one batched product per step), fully
  reorthogonalised, with thick restarts; shared with :mod:`~landscape.curvature.slq`.
- :func:`extreme_eigenpairs`: the top-k and bottom-k eigenvalues; every wanted Ritz pair is checked
  after every product and the run stops as soon as all meet the tolerance.
- :func:`measured_residuals`: ``||A v - lambda v|| / |lambda|`` from one more product per pair.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from landscape.curvature.operator import CurvatureOperator
from landscape.errors import LandscapeError

BASIS_BYTES = 2 * 2**30      # CPU memory allowed for Lanczos vectors (on CUDA: half the free memory)
MAX_BASIS = 256              # most Lanczos vectors kept for the extreme eigenvalues
_COLUMNS = 2**20             # basis columns transformed at once by a thick restart


def basis_bytes(device: torch.device) -> int:
    """Memory Lanczos vectors may take: ``BASIS_BYTES`` on the CPU, half the free memory on a GPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] // 2
    return BASIS_BYTES


class Lanczos:
    """``K`` Lanczos processes in lockstep, fully reorthogonalised (classical Gram-Schmidt, twice).

    ``basis[k, :size]`` is orthonormal and ``T[k, :size, :size] = V^T A V`` (symmetric, float64),
    with ``A V = V T + beta v e_last^T`` where ``v = basis[k, size]`` is the next vector.
    """

    def __init__(self, starts: Tensor, capacity: int, generator: torch.Generator) -> None:
        count, dim = starts.shape
        self.dim, self.capacity, self.generator = dim, capacity, generator
        self.basis = starts.new_zeros(count, capacity + 1, dim)
        self.basis[:, 0] = starts / torch.linalg.vector_norm(starts, dim=1, keepdim=True)
        self.T = np.zeros((count, capacity, capacity))
        self.beta = np.zeros(count)
        self.size = 0

    def _orthogonalize(self, w: Tensor, upto: int) -> tuple[Tensor, Tensor]:
        """``w`` minus its projection on ``basis[:, :upto]`` (twice), and the projection coefficients."""
        basis = self.basis[:, :upto]
        coefficients = torch.zeros(w.shape[0], upto, dtype=w.dtype, device=w.device)
        for _ in range(2):
            c = torch.bmm(basis, w.unsqueeze(2)).squeeze(2)
            w = w - torch.bmm(c.unsqueeze(1), basis).squeeze(1)
            coefficients += c
        return w, coefficients

    def step(self, operator: CurvatureOperator) -> None:
        """One product per process: extend the basis by one vector and ``T`` by one row and column."""
        j = self.size
        w, h = self._orthogonalize(operator.apply(self.basis[:, j]), j + 1)
        h = h.double().cpu().numpy()
        self.T[:, :j + 1, j] = h
        self.T[:, j, :j + 1] = h
        beta = torch.linalg.vector_norm(w, dim=1)
        scale = np.abs(self.T[:, :j + 1, :j + 1]).max(axis=(1, 2))
        for k in range(len(w)):
            if j + 1 == self.dim:            # the whole space is spanned: A V = V T exactly
                beta[k] = 0.0
            elif float(beta[k]) <= 100 * torch.finfo(w.dtype).eps * max(scale[k], 1e-300):
                w[k] = self._fresh(k, j + 1)  # invariant subspace found: continue in a new direction
                beta[k] = 0.0
            else:
                w[k] = w[k] / beta[k]
        if j + 1 < self.dim:
            self.basis[:, j + 1] = w
        self.beta = beta.double().cpu().numpy()
        self.size = j + 1

    def _fresh(self, k: int, upto: int) -> Tensor:
        """A random unit vector orthogonal to ``basis[k, :upto]``."""
        w = torch.randn(self.dim, generator=self.generator, dtype=torch.float64).to(self.basis)
        basis = self.basis[k, :upto]
        for _ in range(2):
            w = w - (basis @ w) @ basis
        return w / torch.linalg.vector_norm(w)

    def ritz(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Ritz values ``(K, size)`` ascending, eigenvectors of ``T`` ``(K, size, size)``, residual norms."""
        values, vectors = np.linalg.eigh(self.T[:, :self.size, :self.size])
        return values, vectors, self.beta[:, None] * np.abs(vectors[:, -1, :])

    def ritz_vectors(self, coefficients: np.ndarray) -> Tensor:
        """``V S`` for ``S`` of shape ``(K, size, l)``: the Ritz vectors ``(K, l, d)``."""
        s = torch.as_tensor(coefficients, dtype=self.basis.dtype, device=self.basis.device)
        return torch.bmm(s.transpose(1, 2), self.basis[:, :self.size])

    def restart(self, coefficients: np.ndarray, values: np.ndarray) -> None:
        """Thick restart: keep the Ritz vectors ``V S`` (values ``(K, l)``) and the next vector."""
        keep = values.shape[1]
        s = torch.as_tensor(coefficients, dtype=self.basis.dtype, device=self.basis.device).transpose(1, 2)
        for start in range(0, self.dim, _COLUMNS):
            columns = slice(start, start + _COLUMNS)
            self.basis[:, :keep, columns] = torch.bmm(s, self.basis[:, :self.size, columns])
        self.basis[:, keep] = self.basis[:, self.size]
        self.T[:] = 0.0
        self.T[:, np.arange(keep), np.arange(keep)] = values
        self.size = keep


def extreme_eigenpairs(operator: CurvatureOperator, top_k: int, bottom_k: int = 0, tol: float = 1e-4,
                       max_products: int = 1000, seed: int = 0, eigenvectors: bool = False,
                       start: Tensor | None = None) -> dict[str, Any]:
    """The ``top_k`` largest and ``bottom_k`` smallest eigenvalues of ``operator`` by thick-restart Lanczos.

    A Ritz pair ``(theta, v)`` is converged when Lanczos' residual estimate ``beta |s_last|`` of
    ``||Av - theta v||`` is at most ``tol * max(|theta|, sqrt(eps) * |theta|_max)`` (``eps``: machine epsilon
    of the compute dtype; the floor keeps eigenvalues near zero reachable), which bounds the
    eigenvalue error by the same amount. The run stops when every wanted pair is converged (or
    after ``max_products``); ``top_k + bottom_k`` more products (one batched pass) then *measure* the residuals.

    ``start`` (a vector ``(d,)``, or a block ``(m, d)`` whose rows are summed, e.g. the previous top
    eigenvectors) is the first Lanczos vector instead of a random one drawn with ``seed`` (which still
    seeds any fresh direction after an invariant subspace); a warm start from nearby eigenvectors
    converges in few products.

    Returns ``top``/``bottom`` (eigenvalues, descending / ascending), ``top_residuals``/``bottom_residuals``
    (measured ``||Av - theta v|| / |theta|``), ``top_converged``/``bottom_converged`` and, on request,
    ``top_vectors``/``bottom_vectors`` ``(k, d)``.
    """
    wanted = top_k + bottom_k
    vector_bytes = operator.dim * torch.finfo(operator.dtype).bits // 8
    capacity = min(operator.dim, MAX_BASIS, max(wanted + 16, basis_bytes(operator.device) // vector_bytes))
    generator = torch.Generator().manual_seed(seed)
    if start is None:
        start = torch.randn(1, operator.dim, generator=generator, dtype=torch.float64)
    else:
        start = _start_vector(start, operator.dim)
    lanczos = Lanczos(start.to(operator.device, operator.dtype), capacity, generator)
    floor = math.sqrt(torch.finfo(operator.dtype).eps)
    begin = operator.products
    while True:
        lanczos.step(operator)
        size = lanczos.size
        if size < wanted:
            continue
        values, vectors, residuals = (a[0] for a in lanczos.ritz())
        pick = np.r_[np.arange(size - 1, size - 1 - top_k, -1), np.arange(bottom_k)].astype(int)
        picked = values[pick]
        converged = residuals[pick] <= tol * np.maximum(np.abs(picked), floor * np.abs(values).max())
        if converged.all() or size == operator.dim or operator.products - begin >= max_products:
            break
        if size == capacity:
            keep = _restart_selection(size, top_k, bottom_k)
            lanczos.restart(vectors[None][:, :, keep], values[None, keep])
    ritz = lanczos.ritz_vectors(vectors[None][:, :, pick])[0]
    relative = measured_residuals(operator, picked, ritz)
    out = {"top": picked[:top_k], "bottom": picked[top_k:], "top_residuals": relative[:top_k],
           "bottom_residuals": relative[top_k:], "top_converged": converged[:top_k],
           "bottom_converged": converged[top_k:]}
    if eigenvectors:
        out["top_vectors"], out["bottom_vectors"] = ritz[:top_k], ritz[top_k:]
    return out


def measured_residuals(operator: CurvatureOperator, values: np.ndarray, vectors: Tensor) -> np.ndarray:
    """``||A v - lambda v|| / |lambda|`` for unit ``vectors`` ``(k, d)``, from ``k`` more products."""
    products = operator.apply(vectors) - torch.as_tensor(values).to(vectors)[:, None] * vectors
    norms = torch.linalg.vector_norm(products, dim=1).double().cpu().numpy()
    return norms / np.maximum(np.abs(values), np.finfo(float).tiny)


def _start_vector(start: Tensor, dim: int) -> Tensor:
    """The sum of the rows of ``start`` (``(d,)`` or ``(m, d)``) as one start ``(1, d)``; refuses a wrong shape
    and a zero or non-finite sum."""
    rows = start.detach().reshape(1, -1) if start.ndim == 1 else start.detach()
    if rows.ndim != 2 or rows.shape[1] != dim or not len(rows):
        raise LandscapeError(f"a Lanczos start for a {dim}x{dim} operator is a ({dim},) vector or an (m, {dim}) "
                             f"block, got shape {tuple(start.shape)}")
    total = rows.sum(0, keepdim=True)
    norm = float(torch.linalg.vector_norm(total))
    if not math.isfinite(norm) or norm == 0.0:
        raise LandscapeError(f"the Lanczos start vector has norm {norm}; give a finite, non-zero start "
                             "(or none for a random one)")
    return total


def _restart_selection(size: int, top_k: int, bottom_k: int) -> np.ndarray:
    """Indices (into ascending Ritz values) kept at a thick restart: the wanted ones plus half the
    spare room, shared between the two ends in proportion to ``top_k`` and ``bottom_k``."""
    spare = (size - top_k - bottom_k) // 2
    extra_top = spare * top_k // (top_k + bottom_k)
    keep_top, keep_bottom = top_k + extra_top, bottom_k + spare - extra_top
    return np.r_[np.arange(keep_bottom), np.arange(size - keep_top, size)].astype(int)

