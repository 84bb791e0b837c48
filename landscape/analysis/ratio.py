"""SAM/SGD gradient-ratio histograms (SSAM Fig. 1).

Per parameter entry, r = log10|(g_SAM - g_SGD) / g_SGD|, where g_SGD = ∇L_B(w) and
g_SAM = ∇L_B(w + ε) on the same minibatch B, and ε is the optimizer's own perturbation
(SAM, ASAM or R-SAM, from :mod:`landscape.optimizers`). r < 0 means the perturbation changes
that gradient entry by less than its size. Histograms have fixed bin edges and accumulate over
minibatches, globally and per parameter tensor. Two cases have no finite r and are counted
apart, never binned: g_SGD = 0 (``zero_gradient_count``) and g_SAM = g_SGD exactly
(r = -inf, ``equal_count``; these count as r < 0).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from landscape import distributed, optimizers
from landscape.analysis.gradients import (MINIBATCH, loss_and_grad, minibatches, optimizer_default, seeded_generator,
                                          shifted, with_bn)
from landscape.errors import LandscapeError
from landscape.objective import Objective
from landscape.results import Result
from landscape.store import provenance

DEFAULT_RHOS = (0.01, 0.05, 0.1)
DEFAULT_BIN_EDGES = tuple(float(e) for e in np.linspace(-8.0, 4.0, 121))
PERTURBATIONS = ("sam", "asam", "rsam")
# per-rho counters kept for every tensor (besides the histogram ``counts``)
_COUNTERS = ("entries", "zero_gradient_count", "equal_count", "below_zero", "below_range", "above_range")
_RSAM_NOISE = 3  # seeded_generator stream key


class RatioResult(Result):
    """``/ratio``: histograms of r = log10|(g_SAM - g_SGD)/g_SGD| per ρ, globally and per layer."""

    group = "ratio"


def log_ratio(sgd: Tensor, perturbed: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """r = log10|(perturbed - sgd)/sgd| where defined, and the masks of the two undefined cases.

    Returns ``(r, zero, equal)``: ``r`` (1-D, finite) over the entries with sgd != 0 and
    perturbed != sgd; ``zero`` marks sgd == 0; ``equal`` marks perturbed == sgd with sgd != 0.
    Computed as log10|Δ| - log10|sgd| in float64, so tiny or huge entries cannot overflow.
    """
    sgd, perturbed = sgd.double().reshape(-1), perturbed.double().reshape(-1)
    change = perturbed - sgd
    zero = sgd == 0
    equal = (change == 0) & ~zero
    valid = ~(zero | equal)
    return torch.log10(change[valid].abs()) - torch.log10(sgd[valid].abs()), zero, equal


def _perturbation_rule(kind: str, objective: Objective, x: Tensor, y: Tensor, grads: list[Tensor],
                       asam_eta: float, rsam_gamma: float, rsam_grad_weight: float,
                       generator: torch.Generator) -> Callable[[float], list[Tensor]]:
    """ρ -> ε, the optimizer's perturbation at the objective's weights on the batch ``(x, y)``."""
    weights = list(objective.params.values())
    if kind == "sam":
        return lambda rho: optimizers.sam_perturbation(grads, rho)
    if kind == "asam":
        return lambda rho: optimizers.sam_perturbation(grads, rho, weights=weights, adaptive=True, eta=asam_eta)
    delta0 = optimizers.rsam_noise(weights, rsam_gamma, generator)
    _, noisy = loss_and_grad(objective, shifted(objective.params, delta0), x, y)
    return lambda rho: optimizers.rsam_perturbation(delta0, noisy, rho, rsam_grad_weight)


def _fractions(layer: dict[str, np.ndarray]) -> np.ndarray:
    """Fraction of entries with r < 0 (r = -inf included) among those with g_SGD != 0, per ρ."""
    defined = layer["entries"] - layer["zero_gradient_count"]
    return np.divide(layer["below_zero"], defined, out=np.full(defined.shape, np.nan), where=defined > 0)


def gradient_ratio(objective: Objective, rhos: Sequence[float] = DEFAULT_RHOS, *, perturbation: str = "sam",
                   batches: int = 4, batch_size: int | None = MINIBATCH, bin_edges: Sequence[float] = DEFAULT_BIN_EDGES,
                   bn: str | None = "train", asam_eta: float | None = None, rsam_gamma: float | None = None,
                   rsam_grad_weight: float | None = None, seed: int = 0,
                   progress: Callable[..., Any] | None = None) -> RatioResult:
    """Histograms of r = log10|(g_SAM - g_SGD)/g_SGD| per ρ, accumulated over minibatches.

    Args:
        objective: model, loss and evaluation set; never modified.
        rhos: radii ρ of the perturbation (R values).
        perturbation: whose ε to use: ``sam`` (``sam_perturbation``), ``asam`` (its adaptive form,
            with ``asam_eta``) or ``rsam`` (``rsam_noise`` + ``rsam_perturbation`` with ``rsam_gamma``,
            ``rsam_grad_weight``; g_SGD stays the gradient at w). Unset hyper-parameters default to the
            registered ``asam``/``rsam`` optimizer's.
        batches: number of disjoint minibatches, drawn from the evaluation set by ``seed``.
        batch_size: minibatch size (default 128, as the CLI's).
        bin_edges: increasing histogram edges in log10 units (B + 1 values); values outside are
            counted in ``below_range``/``above_range``, not binned.
        bn: BatchNorm mode: ``train`` (batch statistics, as in training), ``eval``, or ``None`` (the objective's).
        seed: selects the minibatches and R-SAM's noise.
        progress: optional ``progress(total, desc, unit)`` returning a bar with ``update``/``close``.

    Returns:
        :class:`RatioResult` with ``rhos``, ``bin_edges``, ``counts`` (R x B), ``fraction_below_zero``,
        ``zero_gradient_count``, ``equal_count``, ``below_range``, ``above_range``, ``entries``
        (per ρ, summed over batches), and ``layers`` {parameter name: the same per tensor}.
    """
    rhos = [float(r) for r in rhos]
    edges = np.asarray(bin_edges, dtype=np.float64)
    if not rhos or not all(math.isfinite(r) and r > 0 for r in rhos):
        raise LandscapeError(f"rhos must be finite and > 0, got {rhos}; e.g. --rhos 0.01,0.05,0.1")
    if perturbation not in PERTURBATIONS:
        raise LandscapeError(f"unknown perturbation {perturbation!r}; use one of {', '.join(PERTURBATIONS)}")
    if edges.ndim != 1 or len(edges) < 2 or not np.all(np.isfinite(edges)) or np.any(np.diff(edges) <= 0):
        raise LandscapeError("bin edges must be at least two finite, increasing numbers; e.g. --bins -8:4:120")
    asam_eta = optimizer_default("asam", "eta") if asam_eta is None else float(asam_eta)
    rsam_gamma = optimizer_default("rsam", "gamma") if rsam_gamma is None else float(rsam_gamma)
    rsam_grad_weight = (optimizer_default("rsam", "grad_weight") if rsam_grad_weight is None
                        else float(rsam_grad_weight))
    objective = with_bn(objective, bn)
    data = minibatches(objective, batches, batch_size, seed)
    edges_t = torch.as_tensor(edges, device=objective.device)
    num_bins, num_rhos = len(edges) - 1, len(rhos)
    layers = {name: {"counts": torch.zeros((num_rhos, num_bins), dtype=torch.int64, device=objective.device),
                     **{c: torch.zeros(num_rhos, dtype=torch.int64, device=objective.device) for c in _COUNTERS}}
              for name in objective.params}
    mine = distributed.share(batches)  # (under torchrun each rank measures its share of the minibatches)
    bar = progress(len(mine) * num_rhos, "ratio", "grad") if progress else None

    for b in mine:
        x, y = data[b]
        _, grads = loss_and_grad(objective, objective.params, x, y)
        rule = _perturbation_rule(perturbation, objective, x, y, grads, asam_eta, rsam_gamma, rsam_grad_weight,
                                  seeded_generator(seed, _RSAM_NOISE, b))
        for ri, rho in enumerate(rhos):
            _, moved = loss_and_grad(objective, shifted(objective.params, rule(rho)), x, y)
            for (name, layer), sgd, sam in zip(layers.items(), grads, moved):
                r, zero, equal = log_ratio(sgd, sam)
                inside = (r >= edges_t[0]) & (r <= edges_t[-1])
                bins = (torch.bucketize(r[inside], edges_t, right=True) - 1).clamp_(max=num_bins - 1)
                layer["counts"][ri] += torch.bincount(bins, minlength=num_bins)
                for key, count in (("entries", sgd.numel()), ("zero_gradient_count", zero.sum()),
                                   ("equal_count", equal.sum()), ("below_zero", (r < 0).sum() + equal.sum()),
                                   ("below_range", (r < edges_t[0]).sum()), ("above_range", (r > edges_t[-1]).sum())):
                    layer[key][ri] += count
            if bar:
                bar.update(1)
    if bar:
        bar.close()
    distributed.all_reduce_sum_many_([count for layer in layers.values() for count in layer.values()])

    per_layer = {name: {k: v.cpu().numpy() for k, v in layer.items()} for name, layer in layers.items()}
    totals = {k: sum(layer[k] for layer in per_layer.values()) for k in ("counts", *_COUNTERS)}
    for layer in (*per_layer.values(), totals):
        layer["fraction_below_zero"] = _fractions(layer)
    arrays = {"rhos": np.array(rhos), "bin_edges": edges, **totals, "layers": per_layer}
    config = {"rhos": rhos, "perturbation": perturbation, "batches": batches, "batch_size": len(data[0][1]),
              "bin_edges": edges.tolist(), "bn": objective.bn, "asam_eta": asam_eta, "rsam_gamma": rsam_gamma,
              "rsam_grad_weight": rsam_grad_weight}
    return RatioResult(arrays, provenance(config, objective.provenance(), seed, objective.device))
