"""Per-minibatch gradients for the gradient diagnostics (cosine stability, SAM/SGD ratio).

The diagnostics compare gradients at two points on the *same* minibatch, as an optimizer
step does. This module draws those minibatches reproducibly, evaluates loss and gradient on
one batch with ``torch.func``, and derives seeded generators for the noise draws.

Under torchrun the minibatches are shared out whole among the ranks
(:func:`landscape.distributed.share`): every rank draws the same minibatches from the whole
evaluation set, computes its own, and the per-batch results are gathered (cosine) or summed
(ratio's histogram counts). Each minibatch is computed as in one process, so the results are too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.func import grad_and_value

from landscape import optimizers
from landscape.errors import LandscapeError
from landscape.objective import Objective


def with_bn(objective: Objective, bn: str | None) -> Objective:
    """The same objective with BatchNorm mode ``bn`` (``train``: batch statistics; ``None``: unchanged)."""
    if bn is None or bn == objective.bn:
        return objective
    return objective.derive(bn=bn)


def seeded_generator(seed: int, *keys: int) -> torch.Generator:
    """A CPU generator for stream ``keys`` of ``seed``: independent streams, identical on every device."""
    if seed < 0:
        raise LandscapeError(f"seed must be >= 0, got {seed}")
    state = np.random.SeedSequence([seed, *keys]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state >> np.uint64(1)))


MINIBATCH = 128  # the diagnostics' default minibatch size (the CLI's too)


def minibatches(objective: Objective, count: int, batch_size: int | None, seed: int) -> list[tuple[Tensor, Tensor]]:
    """``count`` disjoint minibatches of ``batch_size`` examples (None: :data:`MINIBATCH`), drawn by ``seed``.

    Refuses weights or inputs that hold NaN/inf: every gradient diagnostic would be NaN.
    """
    objective.require_finite("the gradient diagnostics")
    batch_size = MINIBATCH if batch_size is None else int(batch_size)
    if count < 1 or batch_size < 1:
        raise LandscapeError(f"batches and batch size must be >= 1, got {count} and {batch_size}")
    needed = count * batch_size
    if needed > objective.num_examples:
        raise LandscapeError(f"{count} batches of {batch_size} need {needed} examples but the evaluation set has "
                             f"{objective.num_examples}; lower --batches or --batch-size, or enlarge --subset")
    order = torch.randperm(objective.num_examples, generator=seeded_generator(seed, 0))
    return [objective.examples(chunk) for chunk in order[:needed].split(batch_size)]


def loss_and_grad(objective: Objective, at: Mapping[str, Tensor], x: Tensor, y: Tensor) -> tuple[float, list[Tensor]]:
    """Mean loss on the batch ``(x, y)`` at weights ``at`` and its gradient (one tensor per parameter, in order)."""
    grads, loss = grad_and_value(objective.batch_loss)(dict(at), x, y)
    return float(loss), list(grads.values())


def batch_loss(objective: Objective, at: Mapping[str, Tensor], x: Tensor, y: Tensor) -> float:
    """Mean loss on the batch ``(x, y)`` at weights ``at``."""
    with torch.no_grad():
        return float(objective.batch_loss(dict(at), x, y))


def shifted(weights: Mapping[str, Tensor], delta: Sequence[Tensor]) -> dict[str, Tensor]:
    """``weights`` plus ``delta`` (one tensor per entry, in order), as a new dict."""
    return {name: weight + d for (name, weight), d in zip(weights.items(), delta, strict=True)}


def cosine(first: Sequence[Tensor], second: Sequence[Tensor]) -> float:
    """cos(first, second) over all entries, computed in float64 (NaN if either is zero)."""
    a = torch.cat([t.reshape(-1) for t in first]).double()
    b = torch.cat([t.reshape(-1) for t in second]).double()
    return float(a @ b / (torch.linalg.vector_norm(a) * torch.linalg.vector_norm(b)))


def optimizer_default(name: str, option: str) -> float:
    """The registered optimizer ``name``'s default for ``option``, so a diagnostic matches the optimizer."""
    return optimizers.list_optimizers(name)[0].defaults[option]
