"""PyHessian 0.1 on an objective, for comparison with papers: eigenvalues by power iteration and a
Hutchinson trace, run on a throw-away module holding a copy of the weights, so the user's model is
never touched. Its HVPs are PyHessian's own (the comparison is the point); the
:class:`~landscape.curvature.hessian.HessianOperator` given counts them and measures the residuals.
Under torchrun every rank runs PyHessian on the whole evaluation set (no speed-up, the same result).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from landscape.curvature.hessian import HessianOperator
from landscape.curvature.lanczos import measured_residuals
from landscape.objective import Objective


class _WeightsModule(nn.Module):
    """The objective's weights as fresh parameters of a module that PyHessian may mutate freely."""

    def __init__(self, objective: Objective) -> None:
        super().__init__()
        self.names = list(objective.params)
        self.weights = nn.ParameterList([nn.Parameter(p.clone()) for p in objective.params.values()])
        self.objective = objective

    def forward(self, x: Tensor) -> Tensor:
        return self.objective.outputs(dict(zip(self.names, self.weights)), x)


def pyhessian_hessian(operator: HessianOperator):
    """A ``pyhessian.hessian`` over the batches of ``operator.objective`` whose HVPs ``operator`` counts."""
    import pyhessian

    objective = operator.objective

    class Counted(pyhessian.hessian):
        def dataloader_hv_product(self, v):
            operator.record(1)
            return super().dataloader_hv_product(v)

    batches = [(x, y) for x, y, _ in objective.whole().batches()]  # (its HVPs cannot be summed over ranks)
    return Counted(_WeightsModule(objective), objective.loss_fn, dataloader=batches,
                   cuda=objective.device.type == "cuda")


@contextlib.contextmanager
def _quiet_pyhessian(seed: int, device: torch.device) -> Iterator[None]:
    """Seed PyHessian's global-RNG draws without disturbing the caller's RNG state; mute its graph warning."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
        torch.manual_seed(seed)
        yield


def pyhessian_eigenpairs(operator: HessianOperator, top_k: int, tol: float, seed: int = 0,
                         eigenvectors: bool = False) -> dict[str, Any]:
    """PyHessian's ``eigenvalues(top_n=top_k, tol=tol)`` (power iteration, at most 100 HVPs each).

    Residuals are measured afterwards with ``top_k`` HVPs of our own; ``converged`` means the measured
    residual passes the tolerance test of :func:`~landscape.curvature.lanczos.extreme_eigenpairs`.
    """
    with _quiet_pyhessian(seed, operator.device):
        values, vectors = pyhessian_hessian(operator).eigenvalues(maxIter=100, tol=tol, top_n=top_k)
    values = np.asarray(values, dtype=float)
    order = np.argsort(-values, kind="stable")
    flat = torch.stack([_flat(vectors[i], operator) for i in order])
    flat = flat / torch.linalg.vector_norm(flat, dim=1, keepdim=True)
    values = values[order]
    relative = measured_residuals(operator, values, flat)
    floor = math.sqrt(torch.finfo(operator.dtype).eps) * np.abs(values).max()
    out = {"top": values, "bottom": np.zeros(0), "top_residuals": relative,
           "bottom_residuals": np.zeros(0), "top_converged": relative * np.abs(values) <= tol * np.maximum(
               np.abs(values), floor), "bottom_converged": np.zeros(0, dtype=bool)}
    if eigenvectors:
        out["top_vectors"], out["bottom_vectors"] = flat, flat[:0]
    return out


def pyhessian_trace(operator: HessianOperator, samples: int, tol: float, seed: int = 0) -> tuple[float, float]:
    """PyHessian's Hutchinson ``trace(maxIter=samples, tol=tol)`` (it may stop early), with our standard error."""
    with _quiet_pyhessian(seed, operator.device):
        values = np.asarray(pyhessian_hessian(operator).trace(maxIter=samples, tol=tol), dtype=float)
    return float(values.mean()), float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else math.nan



def _flat(tensors: Sequence[Tensor], operator: HessianOperator) -> Tensor:
    """PyHessian's per-parameter tensors (in parameter order) as one ``(d,)`` vector in the operator's dtype."""
    return torch.cat([t.reshape(-1) for t in tensors]).to(operator.device, operator.dtype)
