"""Gradient cosine stability and perturbed loss (R-SAM Figs. 1-2) and the inner-maximisation gap.

Cosine stability: cos(g(ŵ), g(ŵ + ε)) with ε = ρ g(ŵ)/‖g(ŵ)‖ (SAM's ascent), ŵ = w + δ0, δ0 R-SAM's
kernel-wise noise (or isotropic N(0, γ² I)); γ² = 0 is vanilla SAM. Inner-maximisation gap:
the loss reached on the ρ-ball by SAM's one-step ascent, by R-SAM's randomised ascent, and by
k-step projected gradient ascent (the near-optimal reference). Every quantity is measured per
minibatch, with both gradients of a pair on the same batch, and every perturbation comes from
:mod:`landscape.optimizers`, so it is exactly the optimizers' own.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from landscape import distributed, optimizers
from landscape.analysis.gradients import (MINIBATCH, batch_loss, cosine, loss_and_grad, minibatches, optimizer_default,
                                          seeded_generator, shifted, with_bn)
from landscape.errors import LandscapeError
from landscape.objective import Objective
from landscape.params import global_norm, random_like
from landscape.results import Result
from landscape.store import provenance

DEFAULT_RHOS = tuple(float(r) for r in np.linspace(0.0, 1.0, 21))
DEFAULT_GAMMAS2 = (0.0, 0.0075, 0.01, 0.0125)
NOISE_KINDS = ("kernel", "isotropic")
# seeded_generator stream keys
_COSINE_NOISE, _RSAM_NOISE = 1, 2


class CosineResult(Result):
    """``/cosine``: cosine stability, perturbed loss and inner-maximisation losses and gaps versus ρ."""

    group = "cosine"


def start_noise(weights: Sequence[Tensor], gamma: float, kind: str, generator: torch.Generator) -> list[Tensor]:
    """The random start δ0: R-SAM's kernel-wise noise (``kernel``) or N(0, γ² I) (``isotropic``)."""
    if kind == "kernel":
        return optimizers.rsam_noise(weights, gamma, generator)
    if kind == "isotropic":
        draws = random_like(dict(enumerate(weights)), generator)
        return [gamma * z for z in draws.values()]
    raise LandscapeError(f"unknown noise {kind!r}; use {' or '.join(NOISE_KINDS)}")


def project_to_ball(delta: Sequence[Tensor], rho: float) -> list[Tensor]:
    """Euclidean projection of ``delta`` on the ball ‖δ‖ <= ρ (global L2 norm)."""
    norm = float(global_norm(delta))
    return list(delta) if norm <= rho else [d * (rho / norm) for d in delta]


def projected_ascent(objective: Objective, x: Tensor, y: Tensor, rho: float, start: Sequence[Tensor],
                     steps: int, step: float) -> list[float]:
    """Projected gradient ascent of the batch loss on the ρ-ball around the objective's weights.

    Each step moves ``step * rho`` along the normalised gradient (SAM's ascent,
    ``sam_perturbation(g, step * rho)``) and projects back on the ball:
    δ ← Π(δ + step ρ g(w + δ)/‖g(w + δ)‖). Returns the batch loss at ``start`` and at each of the
    ``steps`` iterates (``steps + 1`` values, nats).
    """
    delta, losses = list(start), []
    for _ in range(steps):
        loss, grads = loss_and_grad(objective, shifted(objective.params, delta), x, y)
        losses.append(loss)
        ascent = optimizers.sam_perturbation(grads, step * rho)
        delta = project_to_ball([d + a for d, a in zip(delta, ascent)], rho)
    losses.append(batch_loss(objective, shifted(objective.params, delta), x, y))
    return losses


def _check(rhos: Sequence[float], gammas2: Sequence[float], noise: str, draws: int, pga_steps: int,
           pga_step: float, rsam_gamma: float, rsam_grad_weight: float) -> None:
    if not rhos or not all(math.isfinite(r) and r >= 0 for r in rhos):
        raise LandscapeError(f"rhos must be finite and >= 0, got {list(rhos)}; e.g. --rhos 0:1:21")
    if not gammas2 or not all(math.isfinite(g) and g >= 0 for g in gammas2):
        raise LandscapeError(f"gammas2 must be finite and >= 0, got {list(gammas2)}; e.g. --gammas2 0,0.01")
    if noise not in NOISE_KINDS:
        raise LandscapeError(f"unknown noise {noise!r}; use {' or '.join(NOISE_KINDS)}")
    if draws < 1 or pga_steps < 1:
        raise LandscapeError(f"draws and pga_steps must be >= 1, got {draws} and {pga_steps}")
    if not (pga_step > 0 and rsam_gamma >= 0 and rsam_grad_weight >= 0):
        raise LandscapeError(f"pga_step must be > 0 and rsam_gamma, rsam_grad_weight >= 0; got {pga_step}, "
                             f"{rsam_gamma}, {rsam_grad_weight}")


def _summary(samples: np.ndarray, axes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (population) standard deviation over ``axes``, ignoring NaN padding."""
    return np.nanmean(samples, axis=axes), np.nanstd(samples, axis=axes)


def _stability_samples(objective: Objective, data: list[tuple[Tensor, Tensor]], mine: range, rhos: list[float],
                       gammas2: list[float], noise: str, draws: int, seed: int,
                       tick: Callable[[], Any]) -> tuple[np.ndarray, np.ndarray]:
    """Cosine and perturbed loss per (γ², batch, draw, ρ) on the batches ``mine``; NaN-padded where γ² = 0
    needs one draw only (and at the other batches)."""
    weights = list(objective.params.values())
    shape = (len(gammas2), len(data), draws, len(rhos))
    cosines, perturbed = np.full(shape, np.nan), np.full(shape, np.nan)
    for gi, gamma2 in enumerate(gammas2):
        for b in mine:
            x, y = data[b]
            for d in range(draws if gamma2 > 0 else 1):
                base = objective.params
                if gamma2 > 0:
                    generator = seeded_generator(seed, _COSINE_NOISE, b, d)
                    base = shifted(base, start_noise(weights, math.sqrt(gamma2), noise, generator))
                _, grads = loss_and_grad(objective, base, x, y)
                for ri, rho in enumerate(rhos):
                    ascent = optimizers.sam_perturbation(grads, rho)
                    perturbed[gi, b, d, ri], moved = loss_and_grad(objective, shifted(base, ascent), x, y)
                    cosines[gi, b, d, ri] = cosine(grads, moved)
                tick()
    return cosines, perturbed


def _inner_max_samples(objective: Objective, data: list[tuple[Tensor, Tensor]], mine: range, rhos: list[float],
                       draws: int, pga_steps: int, pga_step: float, rsam_gamma: float, rsam_grad_weight: float,
                       seed: int, tick: Callable[[], Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Batch losses on the batches ``mine`` (NaN at the others): unperturbed (B), projected-ascent iterates
    from SAM's point (B x R x k+1), R-SAM (B x D x R)."""
    weights = list(objective.params.values())
    base_losses = np.full(len(data), np.nan)
    pga = np.full((len(data), len(rhos), pga_steps + 1), np.nan)
    rsam = np.full((len(data), draws, len(rhos)), np.nan)
    for b in mine:
        x, y = data[b]
        base_losses[b], grads = loss_and_grad(objective, objective.params, x, y)
        for ri, rho in enumerate(rhos):
            pga[b, ri] = projected_ascent(objective, x, y, rho, optimizers.sam_perturbation(grads, rho),
                                          pga_steps, pga_step)
        for d in range(draws):
            delta0 = optimizers.rsam_noise(weights, rsam_gamma, seeded_generator(seed, _RSAM_NOISE, b, d))
            _, noisy = loss_and_grad(objective, shifted(objective.params, delta0), x, y)
            for ri, rho in enumerate(rhos):
                ascent = optimizers.rsam_perturbation(delta0, noisy, rho, rsam_grad_weight)
                rsam[b, d, ri] = batch_loss(objective, shifted(objective.params, ascent), x, y)
        tick()
    return base_losses, pga, rsam


def cosine_stability(objective: Objective, rhos: Sequence[float] = DEFAULT_RHOS,
                     gammas2: Sequence[float] = DEFAULT_GAMMAS2, *, noise: str = "kernel", batches: int = 4,
                     draws: int = 4, batch_size: int | None = MINIBATCH, bn: str | None = "train", pga_steps: int = 10,
                     pga_step: float = 1.0, rsam_gamma: float | None = None,
                     rsam_grad_weight: float | None = None, seed: int = 0,
                     progress: Callable[..., Any] | None = None) -> CosineResult:
    """Cosine stability, perturbed loss and inner-maximisation gap versus ρ.

    Args:
        objective: model, loss and evaluation set; never modified.
        rhos: radii ρ (global L2, weight units), R values.
        gammas2: noise variances γ² (G values); 0 is vanilla SAM (no noise, one draw per batch).
        noise: ``kernel`` (R-SAM's ``rsam_noise``, std γ sqrt(‖w_j‖) per filter j) or ``isotropic`` (std γ).
        batches: number of disjoint minibatches, drawn from the evaluation set by ``seed``.
        draws: noise draws per minibatch (per γ² > 0, and for R-SAM's ascent).
        batch_size: minibatch size (default 128, as the CLI's); it changes the result.
        bn: BatchNorm mode for this measurement: ``train`` (batch statistics, the paper's), ``eval``,
            or ``None`` for the objective's own.
        pga_steps: steps k of projected gradient ascent, started from SAM's point.
        pga_step: ascent step length as a fraction of ρ (see :func:`projected_ascent`).
        rsam_gamma, rsam_grad_weight: R-SAM's γ (noise std scale of ``rsam_noise``) and the weight of the
            gradient in its ascent (``grad_weight`` of ``rsam_perturbation``, the paper's λ) for its randomised
            ascent; default: the registered ``rsam`` optimizer's.
        seed: selects the minibatches and every noise draw (common random numbers across γ² and ρ).
        progress: optional ``progress(total, desc, unit)`` returning a bar with ``update``/``close``.

    Returns:
        :class:`CosineResult` with, per γ² and ρ (G x R), ``cosine``, ``perturbed_loss`` (nats) and
        their standard deviations over batches x draws; per ρ, the batch losses ``loss_sam``,
        ``loss_rsam``, ``loss_pga`` (best over the ascent iterates, so ``gap_sam`` >= 0), the gaps
        ``gap_sam`` = pga - sam and ``gap_rsam`` = pga - rsam, their standard deviations, and
        ``loss_pga_steps`` (R x k+1, mean loss per ascent iterate).
    """
    rhos, gammas2 = [float(r) for r in rhos], [float(g) for g in gammas2]
    rsam_gamma = optimizer_default("rsam", "gamma") if rsam_gamma is None else float(rsam_gamma)
    rsam_grad_weight = (optimizer_default("rsam", "grad_weight") if rsam_grad_weight is None
                        else float(rsam_grad_weight))
    _check(rhos, gammas2, noise, draws, pga_steps, pga_step, rsam_gamma, rsam_grad_weight)
    objective = with_bn(objective, bn)
    data = minibatches(objective, batches, batch_size, seed)
    mine = distributed.share(batches)  # (under torchrun each rank measures its share of the minibatches)
    num_draws = [1 if g2 == 0 else draws for g2 in gammas2]
    bar = progress(sum(num_draws) * len(mine) + len(mine), "cosine", "point") if progress else None
    tick = bar.update if bar else lambda: None
    cosines, perturbed = _stability_samples(objective, data, mine, rhos, gammas2, noise, draws, seed, tick)
    base_losses, pga, rsam = _inner_max_samples(objective, data, mine, rhos, draws, pga_steps, pga_step, rsam_gamma,
                                                rsam_grad_weight, seed, tick)
    if bar:
        bar.close()
    cosines, perturbed, base_losses, pga, rsam = distributed.gather_shares([cosines, perturbed, base_losses, pga,
                                                                            rsam], axes=[1, 1, 0, 0, 0])
    sam, best = pga[:, :, 0], pga.max(axis=2)

    cosine_mean, cosine_std = _summary(cosines, (1, 2))
    perturbed_mean, perturbed_std = _summary(perturbed, (1, 2))
    arrays = {
        "rhos": np.array(rhos), "gammas2": np.array(gammas2), "gammas": np.sqrt(gammas2),
        "cosine": cosine_mean, "cosine_std": cosine_std,
        "perturbed_loss": perturbed_mean, "perturbed_loss_std": perturbed_std,
        "samples": np.array([n * batches for n in num_draws]),
        "loss_sam": sam.mean(0), "loss_sam_std": sam.std(0),
        "loss_rsam": rsam.mean((0, 1)), "loss_rsam_std": rsam.std((0, 1)),
        "loss_pga": best.mean(0), "loss_pga_std": best.std(0),
        "gap_sam": (best - sam).mean(0), "gap_sam_std": (best - sam).std(0),
        "gap_rsam": (best[:, None] - rsam).mean((0, 1)), "gap_rsam_std": (best[:, None] - rsam).std((0, 1)),
        "loss_pga_steps": pga.mean(0),
    }
    config = {"rhos": rhos, "gammas2": gammas2, "noise": noise, "batches": batches, "draws": draws,
              "batch_size": len(data[0][1]), "bn": objective.bn, "pga_steps": pga_steps, "pga_step": pga_step,
              "rsam_gamma": rsam_gamma, "rsam_grad_weight": rsam_grad_weight}
    attrs = {**provenance(config, objective.provenance(), seed, objective.device),
             "base_loss": float(base_losses.mean()), "base_loss_std": float(base_losses.std()),
             "num_params": objective.num_params}
    return CosineResult(arrays, attrs)
