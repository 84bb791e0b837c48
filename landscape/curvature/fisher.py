"""The empirical Fisher of an :class:`~landscape.objective.Objective` as a curvature operator.

``F = (1/N) sum_i g_i g_i^T`` with ``g_i`` the gradient of example ``i``'s loss at its TRUE label. It
is not the Fisher ``E_{y ~ p(y|x)}[g g^T]``, which samples the labels from the model (for softmax
cross-entropy that Fisher equals the GGN, :class:`~landscape.curvature.ggn.GGNOperator`); it is the
matrix whose diagonal SSAM-F ranks (:func:`~landscape.objective.empirical_fisher`), and both take
their per-example gradients from :func:`~landscape.objective.per_example_gradients`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from landscape.curvature.operator import CurvatureOperator, cache_budget
from landscape.objective import Objective

CHUNK_BYTES = 256 * 2**20    # per-example gradients held at once while they are computed


class EmpiricalFisherOperator(CurvatureOperator):
    """The empirical Fisher of ``objective``'s loss at its weights, over its parameters in order, ``d x d``.

    ``F V = ((V G^T) G) / N`` for the per-example gradients ``G`` ``(N, d)``: kept after the first product
    when ``N d`` values fit in ``cache_bytes`` (default :func:`~landscape.curvature.operator.cache_budget`;
    then a product is two matrix products), otherwise recomputed for every pass, ``chunk`` examples at a
    time (default: as many as ``CHUNK_BYTES`` hold, at most the objective's batch size), so a block of
    ``batch`` vectors costs one pass. Needs BatchNorm on running statistics (``bn="eval"``): a
    per-example gradient normalises each example by itself otherwise. The objective is never modified.
    """

    def __init__(self, objective: Objective, batch: int = 4, progress: Callable[[int], Any] | None = None,
                 cache_bytes: int | None = None, chunk: int | None = None) -> None:
        super().__init__(objective.num_params, objective.dtype, objective.device, batch=batch, progress=progress,
                         sharded=objective.sharded)
        self.objective = objective
        self.cache_bytes = cache_budget(self.device) if cache_bytes is None else cache_bytes
        value_bytes = torch.finfo(self.dtype).bits // 8
        self.chunk = chunk or max(1, min(objective.batch_size, CHUNK_BYTES // (self.dim * value_bytes)))
        self.cached = objective.num_local_examples * self.dim * value_bytes <= self.cache_bytes
        self.gradients: Tensor | None = None   # (N, d) once computed, when cached

    def _apply(self, rows: Tensor) -> Tensor:
        chunks: Iterable[Tensor]
        if self.cached:
            if self.gradients is None:
                self.gradients = torch.cat([rows.new_zeros(0, self.dim), *self.objective.example_gradients(self.chunk)])
            chunks = [self.gradients]
        else:
            chunks = self.objective.example_gradients(self.chunk)
        total = torch.zeros_like(rows)
        for gradients in chunks:
            total.addmm_(rows @ gradients.T, gradients)
        return total / self.objective.num_examples
