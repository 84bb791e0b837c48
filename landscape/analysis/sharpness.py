"""Worst-case and average-case (adaptive) sharpness, after Andriushchenko et al. (ICML 2023).

With c = |w| (adaptive) or c = 1, a radius ρ and p = 2 or ∞:

- worst case: S_max = max over ‖δ/c‖_p <= ρ of L_B(w + δ) - L_B(w);
- average case: S_avg = E_ξ L_B(w + ρ c ⊙ ξ) - L_B(w), ξ ~ N(0, I) (ℓ2) or uniform on [-1, 1]^d (ℓ∞),
  i.e. δ has covariance ρ² diag(c²) (ℓ2) or ρ² diag(c²)/3 (ℓ∞): σ = ρ per coordinate, not ρ/√d;

each on batches B of m consecutive examples of the evaluation set (m-sharpness; ``m=None``: one batch,
the whole set), then averaged over the batches weighted by their size (the last batch holds the
remainder; with m dividing N this is the plain mean of the authors' definition).

Facts from the authors' code (tml-epfl/sharpness-vs-generalization, ``sharpness.py``) and what this
module does:

- Adaptive scaling: c = |w| for every parameter that is perturbed (weights, biases, BatchNorm affine
  parameters alike: their code loops over ``model.parameters()``), with no η. ASAM's
  :func:`landscape.optimizers.asam_scale` (|w| + η on kernels, 1 on biases and norms) is not used:
  both differences would break the exact invariance to rescaling a ReLU layer by α and the next by
  1/α, which is the point of adaptive sharpness. Entries with w = 0 do not move.
- Worst case: they run Auto-PGD (zero start by default; step 2ρ, momentum 0.75, step halved at
  APGD checkpoints when the loss stalls; ℓ2: steps along c ⊙ g/‖g‖ then an exact projection on the
  ellipsoid by bisection; ℓ∞: steps c ⊙ sign(g), clipped to ±ρc) and keep the best iterate, starting
  the maximum from L_B(w), so sharpness >= 0. Here: projected gradient ascent in u = δ/c, where the
  constraint is the plain ball ‖u‖_p <= ρ and the projection is exact (rescaling for ℓ2, clipping for
  ℓ∞). Each step is SAM's ascent rule in u (:func:`landscape.optimizers.sam_perturbation` of the
  gradient in u, c ⊙ ∇L, with radius η_k: the normalised gradient for ℓ2, its sign for ℓ∞),
  η_k = step_size · ρ · (1 + cos(π k / steps)) / 2 (cosine decay from step_size · ρ), no momentum.
  The maximum is over u = 0 and every iterate (``steps`` gradients and one last forward). ``start``
  ``zero`` is the authors' default; at an exact critical point (zero gradient) the ascent cannot
  leave 0, so use ``random``: one seeded point, u0 = ρ z/‖z‖ with z ~ N(0, I) (ℓ2) or u0 = ρ z with
  z uniform on [-1, 1]^d (ℓ∞), the same z for every batch and ρ.
- Average case: they draw fresh noise per batch and per run; here the same ``draws`` noise vectors
  serve every batch and every ρ (common random numbers: the expectation is the same, the curve over
  ρ smoother). The standard error is that of the mean over draws of the batch-weighted increase.
- BatchNorm: their code evaluates in eval mode (the checkpoint's running statistics, not recomputed
  at w + δ). That is the default here (with the objective's ``bn``); ``bn_recompute`` recomputes the
  running statistics over the batch's examples at each evaluated point, through
  :class:`landscape.engine.evaluator.PointEvaluator`; the worst-case ascent still follows the
  gradients under the checkpoint's statistics and the maximum is then taken over {0, δ*} (its best
  iterate) under recomputed statistics.
- Not implemented: their logit normalisation and random restarts.

Under torchrun the (batch, ρ) units are shared out among the ranks (:mod:`landscape.engine.runner`),
each computed on its batch's rows of the whole evaluation set: the same values as in one process.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from landscape import distributed
from landscape.analysis.cosine import project_to_ball
from landscape.analysis.gradients import loss_and_grad, seeded_generator, shifted
from landscape.engine.evaluator import PointEvaluator
from landscape.engine.runner import OneByOne, Progress, run_group
from landscape.errors import LandscapeError
from landscape.objective import Objective
from landscape.optimizers import sam_perturbation, standard_normal
from landscape.params import global_norm, split_like
from landscape.results import Result
from landscape.store import provenance, read_group

DEFAULT_RHOS = (0.01, 0.05, 0.1)
KINDS = ("worst", "average", "both")
NORMS = {"l2": 2.0, "linf": math.inf}
STARTS = ("zero", "random")
_START, _NOISE = 1, 2  # seeded_generator stream keys


class SharpnessResult(Result):
    """``/sharpness``: per ρ (``rhos``, R values), ``worst`` and/or ``average`` (+ ``average_se``) in nats;
    per (batch, ρ) unit the raw batch losses ``worst_base``, ``worst_loss``, ``ascent_loss`` (…, steps + 1),
    ``average_base``, ``draw_loss`` (…, draws); ``batch_sizes`` (B,); ``done`` (B, R); attribute
    ``loss_base`` = L(w)."""

    group = "sharpness"

    def summary(self) -> str:
        """The table printed by ``landscape sharpness``: one row per ρ."""
        config, a = self.attrs["config"], self.arrays
        kinds = [k for k in ("worst", "average") if k in a]
        batches = np.asarray(a["batch_sizes"])
        how = (f"{'adaptive' if config['adaptive'] else 'plain'} {config['norm']}, "
               f"m = {config['m'] or 'all'} ({len(batches)} batch{'es' if len(batches) > 1 else ''} of "
               f"{int(batches.max())}{f', last {int(batches[-1])}' if batches[-1] != batches[0] else ''}), "
               f"BN {config['bn']}{' recomputed' if config['bn_recompute'] else ''}")
        lines = [f"sharpness, {how}; L(w) = {self.attrs['loss_base']:.6g} over {int(batches.sum())} examples"]
        if "worst" in kinds:
            lines.append(f"worst case: best of {config['steps']} ascent steps from {config['start']} "
                         f"(step {config['step_size']:g}ρ, cosine decay)")
        if "average" in kinds:
            lines.append(f"average case: {config['draws']} noise draws, ± one standard error")
        header = ["rho", *(f"{k}-case" for k in kinds)]
        rows = [[f"{rho:g}", *(f"{a['worst'][i]:.6g}" if k == "worst" else
                               f"{a['average'][i]:.6g} ± {a['average_se'][i]:.2g}" for k in kinds)]
                for i, rho in enumerate(np.asarray(a["rhos"]))]
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
        lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in (header, *rows)]
        return "\n".join(lines)


def _loss_and_gradient(objective: Objective, delta: Sequence[Tensor]) -> tuple[float, list[Tensor]]:
    """Mean loss over the objective's evaluation set at w + δ and its gradient, batch by batch."""
    at, total, gradient = shifted(objective.params, delta), 0.0, None
    for x, y, weight in objective.batches():
        loss, grads = loss_and_grad(objective, at, x, y)
        total += weight * loss
        if gradient is None:
            gradient = torch._foreach_mul(grads, weight)
        else:
            torch._foreach_add_(gradient, grads, alpha=weight)
    return total, gradient


def _project(u: list[Tensor], rho: float, p: float) -> list[Tensor]:
    """Euclidean projection on the ball ‖u‖_p <= ρ (p = 2: rescale; p = ∞: clip every entry)."""
    if p == 2.0:
        return project_to_ball(u, rho)
    return [t.clamp(-rho, rho) for t in u]


def worst_case_ascent(objective: Objective, scale: Sequence[Tensor], rho: float, p: float, steps: int,
                      step_size: float, start: Sequence[Tensor] | None) -> tuple[list[float], list[Tensor]]:
    """Projected gradient ascent of L(w + c ⊙ u) over ‖u‖_p <= ρ (see the module docstring).

    Args:
        objective: the loss L over its evaluation set (one m-batch).
        scale: c, one tensor per parameter (``|w|`` or ones).
        rho, p: the radius and the norm (2.0 or ``math.inf``).
        steps: gradient steps; step k moves η_k = step_size ρ (1 + cos(π k/steps))/2.
        start: u0 (inside the ball), or ``None`` for 0.

    Returns:
        The loss at u0 and at each of the ``steps`` iterates (``steps + 1`` values, nats), and the
        δ = c ⊙ u of the iterate with the largest loss.
    """
    u = [torch.zeros_like(c) for c in scale] if start is None else list(start)
    losses: list[float] = []
    best, best_u = -math.inf, u
    for k in range(steps + 1):
        delta = torch._foreach_mul(u, list(scale))
        if k == steps:
            loss = objective.loss(params=shifted(objective.params, delta))
        else:
            loss, grads = _loss_and_gradient(objective, delta)
        losses.append(loss)
        if loss > best:
            best, best_u = loss, u
        if k < steps:
            eta = step_size * rho * 0.5 * (1.0 + math.cos(math.pi * k / steps))
            step = sam_perturbation(torch._foreach_mul(grads, list(scale)), eta, p)
            u = _project(torch._foreach_add(u, step), rho, p)
    return losses, torch._foreach_mul(best_u, list(scale))


def _unit_noise(weights: Sequence[Tensor], p: float, generator: torch.Generator) -> list[Tensor]:
    """ξ shaped like ``weights``: N(0, I) for p = 2, uniform on [-1, 1] per entry for p = ∞."""
    if p == 2.0:
        return standard_normal(weights, generator)
    flat = torch.rand(sum(w.numel() for w in weights), generator=generator, dtype=weights[0].dtype)
    return split_like(flat.mul_(2.0).sub_(1.0).to(weights[0].device), weights)


def _check(objective: Objective, rhos: np.ndarray, kind: str, norm: str, m: int | None, steps: int,
           step_size: float, start: str, draws: int, bn_recompute: bool) -> None:
    if rhos.size == 0 or not np.all(np.isfinite(rhos) & (rhos > 0)):
        raise LandscapeError(f"rhos must be positive finite radii, got {rhos.tolist()}; e.g. --rhos 0.01,0.05,0.1")
    if kind not in KINDS:
        raise LandscapeError(f"unknown sharpness kind {kind!r}; use {', '.join(KINDS)}")
    if norm not in NORMS:
        raise LandscapeError(f"unknown norm {norm!r}; use l2 or linf")
    if start not in STARTS:
        raise LandscapeError(f"unknown start {start!r}; use zero or random")
    if m is not None and not (isinstance(m, (int, np.integer)) and 1 <= m <= objective.num_examples):
        raise LandscapeError(f"m = {m} examples per batch is impossible with an evaluation set of "
                             f"{objective.num_examples}; choose --m between 1 and {objective.num_examples} or omit it")
    if steps < 1 or draws < 1:
        raise LandscapeError(f"steps and draws must be >= 1, got {steps} and {draws}")
    if not (math.isfinite(step_size) and step_size > 0):
        raise LandscapeError(f"step_size must be a positive multiple of rho, got {step_size}")
    if bn_recompute and objective.bn != "eval":
        raise LandscapeError("recomputing BatchNorm statistics is for eval mode (running statistics); "
                             "use --bn eval with --bn-recompute, or drop --bn-recompute")


def sharpness(objective: Objective, rhos: Sequence[float] = DEFAULT_RHOS, *, kind: str = "worst", norm: str = "l2",
              adaptive: bool = True, m: int | None = None, steps: int = 20, step_size: float = 2.0,
              start: str = "zero", draws: int = 10, bn_recompute: bool = False, seed: int = 0,
              out: str | Path | None = None, resume: bool = False, overwrite: bool = False,
              progress: Progress | None = None) -> SharpnessResult:
    """Worst-case and/or average-case sharpness at each radius ρ (see the module docstring).

    Args:
        objective: model, loss and evaluation set (N examples); never modified. Its parameters are the
            ones perturbed (``objective.restrict(...)`` to perturb fewer); its ``bn`` mode applies.
        rhos: radii ρ > 0, in units of c (so relative to |w| when ``adaptive``).
        kind: ``worst``, ``average`` or ``both`` (stored in one group, drawn in one figure).
        norm: ``l2`` or ``linf``: the ball of the worst case, Gaussian or uniform noise for the average.
        adaptive: c = |w| (Kwon et al.'s and the paper's adaptive sharpness) or c = 1.
        m: examples per batch for m-sharpness; ``None``: the whole set as one batch.
        steps, step_size, start: the worst-case ascent (:func:`worst_case_ascent`): gradient steps, the
            first step as a multiple of ρ (cosine decay after), ``zero`` or ``random`` start.
        draws: noise draws of the average case (the same draws for every batch and ρ).
        bn_recompute: recompute BatchNorm running statistics at every evaluated point (eval mode only).
        seed: the random start and the noise draws.
        out, resume, overwrite: write ``/sharpness`` of this HDF5 file one (batch, ρ) unit at a time;
            ``resume`` continues an interrupted run (same options), ``overwrite`` starts over.
        progress: called as ``progress(units_done, units_total)``.

    Returns:
        :class:`SharpnessResult`; ``result["worst"]``, ``result["average"]`` are arrays over ``rhos``.
    """
    rhos = np.asarray(rhos, dtype=np.float64).reshape(-1)
    objective = objective.whole()  # (under torchrun the ranks share out the units, each on its batch's rows)
    _check(objective, rhos, kind, norm, m, steps, step_size, start, draws, bn_recompute)
    p, n = NORMS[norm], objective.num_examples
    size = n if m is None else int(m)
    bounds = [(s, min(s + size, n)) for s in range(0, n, size)]
    batch_sizes = np.array([stop - s for s, stop in bounds], dtype=np.int64)
    weights = list(objective.params.values())
    scale = torch._foreach_abs(weights) if adaptive else [torch.ones_like(w) for w in weights]
    worst, average = kind in ("worst", "both"), kind in ("average", "both")

    direction = None  # the random start at ρ = 1: u0 = ρ z/‖z‖ (ℓ2) or ρ z (ℓ∞)
    if worst and start == "random":
        z = _unit_noise(weights, p, seeded_generator(seed, _START))
        direction = torch._foreach_div(z, global_norm(z)) if p == 2.0 else z
    noise = []  # c ⊙ ξ_j, the directions of the average case
    if average:
        generator = seeded_generator(seed, _NOISE)
        noise = [dict(zip(objective.params, torch._foreach_mul(_unit_noise(weights, p, generator), scale)))
                 for _ in range(draws)]

    datasets: dict[str, tuple[int, ...]] = {}
    if worst:
        datasets.update(worst_base=(), worst_loss=(), ascent_loss=(steps + 1,))
    if average:
        datasets.update(average_base=(), draw_loss=(draws,))
    config = {"rhos": rhos.tolist(), "kind": kind, "norm": norm, "adaptive": adaptive, "m": m, "steps": steps,
              "step_size": step_size, "start": start, "draws": draws, "bn": objective.bn,
              "bn_recompute": bn_recompute, "dtype": str(objective.dtype).replace("torch.", ""),
              "params": list(objective.params), "checkpoint_sha256": str(objective.source.get("checkpoint_sha256", "")),
              "eval_set": objective.source.get("eval_set", {})}
    attrs = {**provenance(config, objective.provenance(), seed, objective.device), "num_params": objective.num_params,
             "num_examples": n}
    static = {"rhos": rhos, "batch_sizes": batch_sizes}
    part: tuple[int, Objective, PointEvaluator | None] | None = None  # the batch being measured

    def unit(index: tuple[int, int]) -> dict[str, Any]:
        """The values of the (batch, ρ) unit ``index``."""
        nonlocal part
        b, i = index
        if part is None or part[0] != b:
            batch = objective.derive(examples=np.arange(*bounds[b]))
            part = (b, batch, PointEvaluator({"batch": batch}, noise, bn_recompute=bn_recompute) if average else None)
        values: dict[str, Any] = {}
        rho = float(rhos[i])
        if worst:
            values.update(_worst_unit(part[1], scale, rho, p, steps, step_size, direction, bn_recompute))
        if average:
            values.update(_average_unit(part[2], rho, draws))
        return values

    # one unit per block, each written as soon as it is done
    arrays, derived_attrs = run_group(out, SharpnessResult.group, datasets, (len(bounds), len(rhos)), attrs, static,
                                      OneByOne(unit), lambda index: index, resume=resume, overwrite=overwrite,
                                      progress=progress, flush_seconds=0.0,
                                      derive=lambda finished: _per_rho(finished, batch_sizes))
    if out is not None:
        return SharpnessResult(*distributed.on_main(lambda: read_group(out, SharpnessResult.group)))
    return SharpnessResult(arrays, {**attrs, **derived_attrs})


def _worst_unit(batch: Objective, scale: list[Tensor], rho: float, p: float, steps: int, step_size: float,
                direction: list[Tensor] | None, bn_recompute: bool) -> dict[str, Any]:
    """One batch at one ρ: the ascent's losses, L_B(w) and the maximum (recomputed BN if asked)."""
    start = None if direction is None else torch._foreach_mul(direction, rho)
    losses, delta = worst_case_ascent(batch, scale, rho, p, steps, step_size, start)
    if bn_recompute:
        evaluator = PointEvaluator({"batch": batch}, [dict(zip(batch.params, delta))], bn_recompute=True)
        base, perturbed = evaluator.evaluate([[0.0], [1.0]])["batch_loss"]
    else:
        base = losses[0] if start is None else batch.loss()
        perturbed = max(losses)
    return {"worst_base": base, "worst_loss": max(base, perturbed), "ascent_loss": np.asarray(losses)}


def _average_unit(evaluator: PointEvaluator, rho: float, draws: int) -> dict[str, Any]:
    """One batch at one ρ: L_B(w) and L_B(w + ρ c ⊙ ξ_j) for every draw j."""
    points = [[0.0] * draws] + [[rho if k == j else 0.0 for k in range(draws)] for j in range(draws)]
    losses = evaluator.evaluate(points)["batch_loss"]
    return {"average_base": losses[0], "draw_loss": losses[1:]}


def _per_rho(arrays: Mapping[str, Any], batch_sizes: np.ndarray) -> tuple[dict[str, Any], dict[str, Any]]:
    """Sharpness per ρ from the (batch, ρ) units: batch means weighted by batch size."""
    share = batch_sizes / batch_sizes.sum()
    derived: dict[str, Any] = {}
    bases = []
    if "worst_loss" in arrays:
        derived["worst"] = share @ (arrays["worst_loss"] - arrays["worst_base"])
        bases.append(arrays["worst_base"])
    if "draw_loss" in arrays:
        increase = np.einsum("b,brd->rd", share, arrays["draw_loss"] - arrays["average_base"][..., None])
        derived["average"] = increase.mean(1)
        draws = increase.shape[1]
        derived["average_se"] = (increase.std(1, ddof=1) / math.sqrt(draws) if draws > 1
                                 else np.full(len(increase), np.nan))
        bases.append(arrays["average_base"])
    return derived, {"loss_base": float(share @ bases[0][:, 0])}
