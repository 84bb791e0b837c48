"""Mean loss and correct predictions per point, from model outputs stacked by point.

Outputs come shaped (points, rows, ...): one block of rows per evaluated point (see
:class:`landscape.engine.evaluator.PointEvaluator`); ``targets`` are the evaluation set's labels
(class indices or class probabilities) for those rows.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from landscape.objective import accuracy_count


def point_losses(loss_fn: Callable[[Tensor, Tensor], Tensor], outputs: Tensor, targets: Tensor) -> Tensor:
    """(points,) float64 mean losses from ``outputs`` shaped (points, rows, ...) against ``targets``."""
    if len(outputs) == 1:
        return loss_fn(outputs[0], targets).double().view(1)
    if loss_fn is F.cross_entropy:  # one call for every point
        repeated = targets.repeat(len(outputs), *[1] * (targets.ndim - 1))
        losses = F.cross_entropy(outputs.flatten(0, 1), repeated, reduction="none").view(len(outputs), -1).double()
        if targets.is_floating_point():  # class probabilities
            return losses.mean(1)
        return losses.sum(1) / (targets != -100).sum()  # the mean over targets not ignored, as F.cross_entropy
    return torch.stack([loss_fn(out, targets) for out in outputs]).double()


def cross_entropy_and_correct(scores: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """(points,) float64 mean cross-entropy and correct argmax predictions from class ``scores``
    (points, rows, classes) against class indices ``targets`` (rows,), from one max over the classes."""
    top, predicted = scores.max(dim=-1)
    log_normaliser = (scores - top.unsqueeze(-1)).exp_().sum(-1).log_().add_(top)
    picked = scores.gather(-1, targets.expand(len(scores), -1).unsqueeze(-1)).squeeze(-1)
    return (log_normaliser - picked).double().mean(1), (predicted == targets).sum(1)


def point_correct(outputs: Tensor, targets: Tensor) -> Tensor:
    """(points,) correct argmax predictions from ``outputs`` shaped (points, rows, ...)."""
    if outputs.ndim == targets.ndim + 2:  # class scores: one argmax for every point
        return (outputs.argmax(dim=-1) == targets).flatten(1).sum(1)
    return torch.stack([accuracy_count(out, targets) for out in outputs])
