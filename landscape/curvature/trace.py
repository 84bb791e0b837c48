"""Trace estimates of any curvature operator from Rademacher probes, with a standard error:
Hutchinson, and Hutch++ (Meyer et al. 2021).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from landscape.curvature.operator import CurvatureOperator, rademacher


def hutchinson_trace(operator: CurvatureOperator, samples: int, seed: int = 0) -> tuple[float, float]:
    """Hutchinson's ``mean(z^T A z)`` over ``samples`` Rademacher probes, and its standard error."""
    generator = torch.Generator().manual_seed(seed)
    values = []
    for first in range(0, samples, operator.batch):
        z = rademacher(min(operator.batch, samples - first), operator, generator)
        values.append((z * operator.apply(z)).sum(1).double().cpu().numpy())
    return _mean_and_stderr(np.concatenate(values))


def hutchpp_trace(operator: CurvatureOperator, budget: int, seed: int = 0) -> tuple[float, float]:
    """Hutch++ with ``budget`` products, and the standard error of its Hutchinson part.

    A third of the budget sketches ``Q = orth(A S)``, a third gives ``tr(Q^T A Q)`` exactly, the
    rest runs Hutchinson on the deflated ``(I - QQ^T) A (I - QQ^T)``.
    """
    generator = torch.Generator().manual_seed(seed)
    sketch = budget // 3
    q = torch.linalg.qr(operator.apply(rademacher(sketch, operator, generator)).T).Q.T
    head = float((q * operator.apply(q)).sum())
    g = rademacher(budget - 2 * sketch, operator, generator)
    g = g - (g @ q.T) @ q
    mean, stderr = _mean_and_stderr((g * operator.apply(g)).sum(1).double().cpu().numpy())
    return head + mean, stderr


def _mean_and_stderr(values: np.ndarray) -> tuple[float, float]:
    return float(values.mean()), float(values.std(ddof=1) / math.sqrt(len(values)))

