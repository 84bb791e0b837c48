"""The base type of a curvature operator, an explicit-matrix operator, and Rademacher probes.

A curvature operator is a symmetric ``d x d`` matrix known only through its products. Users write
``op @ v`` for a vector ``(d,)`` or a block ``(d, K)`` whose columns are vectors (the convention of
scipy and curvlinops). Internally a block is ``(K, d)``, one vector per row: a row is one contiguous
vector, which is how the solvers store Lanczos bases and probes and how a Hessian-vector product
splits a vector into parameters, so the solvers hand their blocks over without copies.
``op @ V`` is ``op.apply(V.T).T`` (two views).

Under torchrun an operator of a data-parallel objective (``sharded``) computes each product over this
rank's share of the evaluation set (batches weighted by rows over the whole set) and :meth:`apply`
sums the products over the ranks, in one collective per pass: this is the only place curvature is
reduced. Every rank then holds the same product, so the solvers run identically on every rank from
the same seed and hold the same vectors.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from landscape import distributed
from landscape.errors import LandscapeError

if TYPE_CHECKING:
    from scipy.sparse.linalg import LinearOperator

CACHE_BYTES = 2 * 2**30      # CPU memory an operator may keep between products (on CUDA: a quarter of the free memory)


def cache_budget(device: torch.device) -> int:
    """Memory an operator may keep between products (cached graphs, per-example gradients): ``CACHE_BYTES``
    on the CPU, a quarter of the free GPU memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] // 4
    return CACHE_BYTES


class CurvatureOperator:
    """A symmetric ``d x d`` matrix ``A`` known through its products.

    Subclasses implement :meth:`_apply` for blocks of at most ``batch`` rows (the most vectors per
    pass; memory grows with it, and Hutchinson draws its probes in blocks of this size).
    ``products`` counts the matrix-vector products, one per vector whichever way they are computed;
    ``progress(n)`` is called after every pass with the number ``n`` of new products. ``sharded``: each
    :meth:`_apply` gives this rank's part of the product, which :meth:`apply` sums over the ranks.
    """

    def __init__(self, dim: int, dtype: torch.dtype, device: torch.device, *, batch: int = 4,
                 progress: Callable[[int], Any] | None = None, sharded: bool = False) -> None:
        self.dim = int(dim)
        self.dtype, self.device = dtype, torch.device(device)
        self.batch = max(1, int(batch))
        self.progress = progress
        self.sharded = sharded
        self.products = 0

    @property
    def shape(self) -> tuple[int, int]:
        return self.dim, self.dim

    def __matmul__(self, x: Tensor) -> Tensor:
        """``A x`` for a vector ``(d,)``, or ``A X`` for a block ``(d, K)`` of column vectors."""
        if not isinstance(x, Tensor) or x.ndim not in (1, 2) or x.shape[0] != self.dim:
            raise LandscapeError(f"a {self.dim}x{self.dim} operator multiplies a ({self.dim},) vector or a "
                                 f"({self.dim}, K) block, got {tuple(x.shape) if isinstance(x, Tensor) else type(x)}")
        if x.dtype != self.dtype or x.device != self.device:
            raise LandscapeError(f"the operator works in {self.dtype} on {self.device}, got {x.dtype} on {x.device}; "
                                 "convert with x.to(op.device, op.dtype)")
        if x.ndim == 1:
            return self.apply(x[None])[0]
        return self.apply(x.T).T

    def apply(self, rows: Tensor) -> Tensor:
        """``A`` applied to every row of ``rows`` ``(K, d)``: ``(K, d)`` (``rows @ A``; ``A`` is symmetric),
        ``batch`` rows per pass (summed over the ranks when ``sharded``)."""
        if not len(rows):
            return rows.clone()
        out = []
        for chunk in rows.split(self.batch):
            product = self._apply(chunk)
            out.append(distributed.all_reduce_sum_(product) if self.sharded else product)
            self.record(len(chunk))
        return torch.cat(out)

    def _apply(self, rows: Tensor) -> Tensor:
        """``(K, d) -> (K, d)`` for ``1 <= K <= batch``; uncounted (:meth:`apply` counts)."""
        raise NotImplementedError

    def record(self, count: int) -> None:
        """Count ``count`` products (also those computed outside, e.g. by PyHessian) and report progress."""
        self.products += count
        if self.progress is not None:
            self.progress(count)

    def to_scipy(self) -> LinearOperator:
        """This operator for scipy (``eigsh``, ``cg``, ...): float64 numpy ``(d,)`` or ``(d, K)`` in and out."""
        from scipy.sparse.linalg import LinearOperator

        def product(x: np.ndarray) -> np.ndarray:
            return (self @ torch.tensor(x, dtype=self.dtype, device=self.device)).double().cpu().numpy()

        return LinearOperator(self.shape, matvec=product, rmatvec=product, matmat=product, rmatmat=product,
                              dtype=np.float64)


class DenseOperator(CurvatureOperator):
    """An explicit symmetric matrix ``(d, d)`` as an operator (tests; curvature small enough to hold)."""

    def __init__(self, matrix: Tensor, *, batch: int = 4, progress: Callable[[int], Any] | None = None) -> None:
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or not len(matrix) or not matrix.is_floating_point():
            raise LandscapeError(f"DenseOperator needs a non-empty square floating-point matrix, got {matrix.dtype} "
                                 f"of shape {tuple(matrix.shape)}")
        scale = float(matrix.abs().max())
        if float((matrix - matrix.T).abs().max()) > math.sqrt(torch.finfo(matrix.dtype).eps) * scale:
            raise LandscapeError("DenseOperator needs a symmetric matrix; pass (A + A.T) / 2")
        super().__init__(len(matrix), matrix.dtype, matrix.device, batch=batch, progress=progress)
        self.matrix = matrix

    def _apply(self, rows: Tensor) -> Tensor:
        return rows @ self.matrix


def rademacher(count: int, operator: CurvatureOperator, generator: torch.Generator) -> Tensor:
    """``(count, d)`` random signs, drawn on the CPU (device-independent) in the operator's dtype and device."""
    signs = torch.randint(0, 2, (count, operator.dim), generator=generator, dtype=torch.int8)
    return signs.to(operator.device, operator.dtype).mul_(2).sub_(1)
