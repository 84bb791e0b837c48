"""The Hessian of an :class:`~landscape.objective.Objective` as a curvature operator.

:class:`HessianOperator` is the one place a Hessian-vector product (HVP) is computed. It owns the
three ways of computing one and chooses among them per pass:

- double backward through every batch's first-order graph, built at the first product that runs
  sequentially and kept, when all of them fit in ``cache_bytes`` (default
  :func:`~landscape.curvature.operator.cache_budget`; 1.3-1.7x a forward+backward on CPU, against
  1.6-3x for forward-over-reverse): one vector, and every vector on the CPU (there a batched pass
  costs as much as its vectors one by one: cnn on 512 digits, 0.049 s per vector cached, 0.077 s
  batched, so batching does not pay);
- forward-over-reverse (``torch.func.jvp`` of ``grad``, recomputed for every product): one vector
  when the graphs do not fit;
- the same vmapped over a block: several vectors per data pass elsewhere (GPUs), and on the CPU
  when the graphs do not fit.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.func import grad, jvp, vmap

from landscape.curvature.operator import CurvatureOperator, cache_budget
from landscape.objective import Objective

class HessianOperator(CurvatureOperator):
    """The Hessian of ``objective``'s loss at its weights, over its parameters in order, ``d x d``.

    ``batch`` vectors at most go through one data pass (memory grows with it); ``cache_bytes`` bounds
    the cached first-order graphs (0: never cache). ``graphs`` holds them once decided (``[]``: they
    did not fit) and ``graph_bytes`` their estimated size. The objective is never modified.
    """

    def __init__(self, objective: Objective, batch: int = 4, progress: Callable[[int], Any] | None = None,
                 cache_bytes: int | None = None) -> None:
        super().__init__(objective.num_params, objective.dtype, objective.device, batch=batch, progress=progress,
                         sharded=objective.sharded)
        self.objective = objective
        self.shapes = {name: p.shape for name, p in objective.params.items()}
        self.sizes = [p.numel() for p in objective.params.values()]
        self.cache_bytes = cache_budget(self.device) if cache_bytes is None else cache_bytes
        self.leaves = [p.detach().requires_grad_() for p in objective.params.values()]
        self.graphs: list[tuple[list[Tensor | None], float]] | None = None   # decided at the first sequential pass
        self.graph_bytes = 0

    def _apply(self, rows: Tensor) -> Tensor:
        if len(rows) == 1 or self.device.type == "cpu":
            if self.graphs is None:
                self.graphs = self._cached_graphs()
            if self.graphs:
                return torch.stack([self._double_backward(vector) for vector in rows])
        return self._forward_over_reverse(rows)

    def _first_order(self, x: Tensor, y: Tensor, measure: bool = False) -> tuple[list[Tensor | None], int]:
        """The batch loss's gradients with their graph; with ``measure``, also the bytes that graph holds
        (counted by saved-tensor hooks, which would slow every later use of the graph: measure on a copy)."""
        held: dict[int, int] = {}

        def pack(tensor: Tensor) -> Tensor:
            held[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
            return tensor

        hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t) if measure else contextlib.nullcontext()
        with torch.enable_grad(), hooks:
            loss = self.objective.batch_loss(dict(zip(self.shapes, self.leaves)), x, y)
            grads = torch.autograd.grad(loss, self.leaves, create_graph=True, allow_unused=True)
        return list(grads), sum(held.values())

    def _cached_graphs(self) -> list[tuple[list[Tensor | None], float]]:
        """Every batch's first-order graph with its weight, or none if (by the first batch) they would
        not all fit in ``cache_bytes``."""
        batches = self.objective.batches()   # (streamed from host memory, they come one at a time)
        first = next(batches, None)
        if first is None:   # this rank holds no rows of a sharded objective: its part of every product is 0
            return []
        estimate = (self._first_order(first[0], first[1], measure=True)[1] * self.objective.num_local_examples
                    / len(first[0]))
        if estimate > self.cache_bytes:
            return []
        self.graph_bytes = int(estimate)
        return [(self._first_order(x, y)[0], weight) for x, y, weight in itertools.chain([first], batches)]

    def _double_backward(self, vector: Tensor) -> Tensor:
        """``H v`` for one vector ``(d,)`` through the cached graphs."""
        tangents = [t.reshape(s) for t, s in zip(vector.split(self.sizes), self.shapes.values())]
        total = [torch.zeros_like(t) for t in tangents]
        for grads, weight in self.graphs:
            live = [(g, t) for g, t in zip(grads, tangents) if g is not None and g.requires_grad]
            if not live:
                continue
            products = torch.autograd.grad([g for g, _ in live], self.leaves, grad_outputs=[t for _, t in live],
                                           retain_graph=True, allow_unused=True)
            for accumulated, product in zip(total, products):
                if product is not None:
                    accumulated.add_(product, alpha=weight)
        return torch.cat([t.reshape(-1) for t in total])

    def _forward_over_reverse(self, rows: Tensor) -> Tensor:
        """``H v`` for every row of ``rows`` ``(K, d)`` in one data pass: the forward-mode derivative of each
        batch's gradient, vmapped over the rows when there are several."""
        k, params, loss = len(rows), self.objective.params, self.objective.batch_loss
        tangents = {n: part.reshape(k, *s) for (n, s), part in zip(self.shapes.items(), rows.split(self.sizes, dim=1))}
        if k == 1:
            tangents = {n: t[0] for n, t in tangents.items()}
        total = {n: torch.zeros(t.shape, dtype=t.dtype, device=t.device) for n, t in tangents.items()}
        for x, y, weight in self.objective.batches():
            def single(v: dict[str, Tensor]) -> dict[str, Tensor]:
                return jvp(lambda p: grad(loss)(p, x, y), (params,), (v,))[1]
            for name, t in (single(tangents) if k == 1 else vmap(single)(tangents)).items():
                total[name].add_(t, alpha=weight)
        return torch.cat([total[n].reshape(k, -1) for n in self.shapes], dim=1)
