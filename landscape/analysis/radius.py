"""Perturbed loss versus radius: adversarial (SAM's direction) against random (RWP's filter-wise noise).

- AWP: L(w + r ε/‖ε‖), ε = :func:`landscape.optimizers.sam_perturbation` at the full-set gradient.
- RWP: mean ± std over n draws of L(w + r ξ/‖ξ‖), ξ = :func:`landscape.optimizers.filterwise_noise`.
‖·‖ is the global L2 norm, so both move the weights by exactly r; the same n draws serve every
radius. The RWP/AWP radius ratio at equal loss increase comes from log-linear interpolation of the
two curves (the RWP paper's Fig. 1 finds about 100×). Under torchrun the (radius, direction) points
are shared out among the ranks (:mod:`landscape.engine.runner`), each rank computing the full-set
gradient itself, so the curves are bit-identical to a single-process run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from landscape.engine.evaluator import PointEvaluator
from landscape.engine.runner import Progress, check_room, run_group
from landscape.errors import LandscapeError
from landscape.objective import Objective
from landscape.optimizers import filterwise_noise, sam_perturbation
from landscape.params import global_norm
from landscape.results import Result
from landscape.store import provenance

DEFAULT_RADII = np.geomspace(1e-3, 10.0, 25)


class RadiusResult(Result):
    """``/radius``: ``radii``; ``loss_awp``, ``acc_awp``; ``loss_rwp`` ± ``loss_rwp_std``, ``acc_rwp``,
    ``loss_rwp_draws`` (radii × draws); ``ratio_levels`` (loss increases) and ``ratio_values`` (RWP/AWP
    radius at each, see :func:`radius_ratio`); the raw ``eval_loss``, ``eval_acc`` (radii × [AWP,
    draw 1..n]) and ``done``; attributes ``loss_base``, ``acc_base``, ``radius_ratio`` (geometric mean)."""

    group = "radius"

    def summary(self) -> str:
        """What ``landscape radius`` prints: L_AWP and L_RWP (mean ± std over draws) per radius, the
        unperturbed loss and the RWP/AWP radius ratio at equal loss increase with its levels."""
        a = self.arrays
        lines = [f"{'radius':>10}  {'L_AWP':>10}  {'L_RWP (mean ± std)':>22}"]
        for r, awp, rwp, std in zip(a["radii"], a["loss_awp"], a["loss_rwp"], a["loss_rwp_std"]):
            lines.append(f"{r:>10.4g}  {awp:>10.4g}  {rwp:>12.4g} ± {std:<9.3g}")
        lines.append(f"unperturbed loss {self['loss_base']:.4g}; RWP/AWP radius ratio at equal loss increase: "
                     f"{self['radius_ratio']:.3g}x (levels {', '.join(f'{v:.3g}' for v in a['ratio_levels'])} nats)")
        return "\n".join(lines)


def _unit(tensors: Sequence[Tensor]) -> list[Tensor]:
    """``tensors`` scaled to global L2 norm 1 (unchanged if zero)."""
    return torch._foreach_div(list(tensors), global_norm(tensors).clamp_min(1e-30))


def crossing_radius(radii: np.ndarray, increase: np.ndarray, level: float) -> float:
    """Smallest radius where ``increase`` reaches ``level``, log-linear between neighbouring radii.

    NaN when the curve never reaches it, or already exceeds it at the first radius.
    """
    above = np.nonzero(increase >= level)[0]
    if len(above) == 0 or above[0] == 0:
        return float("nan")
    i = above[0]
    t = (level - increase[i - 1]) / (increase[i] - increase[i - 1])
    return float(np.exp(np.log(radii[i - 1]) + t * (np.log(radii[i]) - np.log(radii[i - 1]))))


def radius_ratio(radii: np.ndarray, loss_awp: np.ndarray, loss_rwp: np.ndarray, loss_base: float,
                 levels: Sequence[float] | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """RWP/AWP radius ratio needed for the same loss increase.

    ``levels`` are loss increases in nats; by default 5 spaced geometrically inside
    [max(1e-3, both curves' first increases), min(1, both curves' largest finite increases)]
    (the ratio grows towards small increases, where AWP's first-order term dominates).
    Returns ``(levels, ratio at each level, geometric mean of the finite ratios or NaN)``.
    """
    radii = np.asarray(radii, dtype=np.float64)
    increase_awp, increase_rwp = np.asarray(loss_awp) - loss_base, np.asarray(loss_rwp) - loss_base
    if levels is None:
        finite_awp, finite_rwp = increase_awp[np.isfinite(increase_awp)], increase_rwp[np.isfinite(increase_rwp)]
        top = min(finite_awp.max(initial=-np.inf), finite_rwp.max(initial=-np.inf), 1.0)
        bottom = max(increase_awp[0], increase_rwp[0], 1e-3)
        levels = np.geomspace(bottom, top, 7)[1:-1] if top > bottom else np.zeros(0)
    levels = np.asarray(levels, dtype=np.float64).reshape(-1)
    ratios = np.array([crossing_radius(radii, increase_rwp, g) / crossing_radius(radii, increase_awp, g)
                       for g in levels])
    finite = ratios[np.isfinite(ratios)]
    return levels, ratios, float(np.exp(np.log(finite).mean())) if finite.size else float("nan")


def radius_curve(objective: Objective, radii: Any = DEFAULT_RADII, *, draws: int = 10, rho_p: float = 2.0,
                 seed: int = 0, ratio_levels: Sequence[float] | None = None,
                 evaluator_options: Mapping[str, Any] | None = None, out: str | Path | None = None,
                 resume: bool = False, overwrite: bool = False, progress: Progress | None = None,
                 flush_seconds: float = 1.0) -> RadiusResult:
    """Adversarial and random perturbed loss at each radius (see the module docstring).

    Args:
        objective: the model and evaluation set; the gradient is the exact full-set gradient.
        radii: positive radii r (global L2 norm of the weight change); default 25 log-spaced in [1e-3, 10].
        draws: random directions n for RWP (the same ones at every radius).
        rho_p: the p of SAM's p-norm ball that shapes ε (2: the gradient direction; inf: its sign).
        seed: seed of the random directions.
        ratio_levels: loss increases (nats) at which to compare radii (see :func:`radius_ratio`).
        evaluator_options: speed-up switches of :class:`~landscape.engine.evaluator.PointEvaluator`
            (same values up to rounding).
        out, resume, overwrite: write ``/radius`` of this HDF5 file incrementally, one (radius,
            direction) point at a time (``eval_loss``, ``eval_acc``: radii × [AWP, draw 1..n]);
            ``resume`` continues an interrupted run (same options required), ``overwrite`` starts over.
        progress: called as ``progress(points_done, points_total)``; there are len(radii) × (draws + 1) points.
        flush_seconds: finished points are written at least this often.
    """
    radii = np.asarray(radii, dtype=np.float64).reshape(-1)
    if radii.size == 0 or not np.all(np.isfinite(radii) & (radii > 0)):
        raise LandscapeError("radii must be positive finite numbers, e.g. 1e-3:10:25 (log-spaced)")
    if draws < 1:
        raise LandscapeError(f"draws must be >= 1, got {draws}")
    # the n + 1 directions, held about three times (drawn, the evaluator's copy, its stacked copy)
    directions = 3 * (draws + 1) * objective.num_params * torch.finfo(objective.dtype).bits // 8
    check_room(out, (len(radii), draws + 1), ["eval_loss", "eval_acc"],
               f"radius with {len(radii):,} radii x {draws + 1:,} directions", memory=directions)
    objective = objective.whole()  # (the ranks share out points: each computes the gradient as one process does)
    names = list(objective.params)
    weights = [objective.params[n] for n in names]
    gradient = objective.gradient()
    awp = _unit(sam_perturbation([gradient[n] for n in names], rho=1.0, p=rho_p))
    generator = torch.Generator().manual_seed(seed)
    noise = [_unit(filterwise_noise(weights, 1.0, generator)) for _ in range(draws)]
    evaluator = PointEvaluator({"eval": objective}, [dict(zip(names, d)) for d in [awp, *noise]],
                               **(evaluator_options or {}))
    origin = evaluator.evaluate([[0.0] * (draws + 1)])
    loss_base, acc_base = float(origin["eval_loss"][0]), float(origin["eval_acc"][0])
    config = {"radii": radii.tolist(), "draws": draws, "rho_p": rho_p, "bn": objective.bn, "seed": seed,
              "ratio_levels": None if ratio_levels is None else [float(v) for v in ratio_levels],
              "dtype": str(objective.dtype).replace("torch.", "")}
    attrs = {**provenance(config, objective.provenance(), seed, objective.device), "loss_base": loss_base,
             "acc_base": acc_base, "gradient_norm": float(global_norm(list(gradient.values()))),
             "speedups": evaluator.speedups}

    def point(index: tuple[int, ...]) -> list[float]:
        radius, direction = index
        return [float(radii[radius]) if k == direction else 0.0 for k in range(draws + 1)]

    def curves(points: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        loss, acc = points["eval_loss"], points["eval_acc"]
        levels, ratios, ratio = radius_ratio(radii, loss[:, 0], loss[:, 1:].mean(1), loss_base, ratio_levels)
        return ({"loss_awp": loss[:, 0], "acc_awp": acc[:, 0], "loss_rwp": loss[:, 1:].mean(1),
                 "loss_rwp_std": loss[:, 1:].std(1, ddof=1 if draws > 1 else 0), "acc_rwp": acc[:, 1:].mean(1),
                 "loss_rwp_draws": loss[:, 1:], "ratio_levels": levels, "ratio_values": ratios},
                {"radius_ratio": ratio})

    arrays, derived = run_group(out, RadiusResult.group, {"eval_loss": (), "eval_acc": ()}, (len(radii), draws + 1),
                                attrs, {"radii": radii}, evaluator, point, resume=resume, overwrite=overwrite,
                                progress=progress, flush_seconds=flush_seconds, derive=curves)
    return RadiusResult(arrays, {**attrs, **derived})
