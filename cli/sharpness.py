"""``landscape sharpness``: worst- and average-case (adaptive) sharpness versus ρ (Andriushchenko et al.)."""

from __future__ import annotations

from typing import Any

import click
from landscape.cli.common import (
    arch_options,
    data_option,
    device_option,
    eval_options,
    objective_from_options,
    out_option,
    overwrite_options,
    parse_grid,
    seed_option,
)
from landscape.cli.surface import _run_with_bar


@click.command()
@click.argument("checkpoint")
@click.option("--rhos", default="0.01,0.05,0.1", show_default=True, metavar="LIST|LO:HI:N",
              help="Radii ρ > 0 in units of c (|w| when adaptive): a list, or N log-spaced from LO to HI.")
@click.option("--kind", default="worst", show_default=True, type=click.Choice(["worst", "average", "both"]),
              help="Worst case (max over the ball, by projected ascent), average case (mean over noise), or both.")
@click.option("--norm", default="l2", show_default=True, type=click.Choice(["l2", "linf"]),
              help="Ball of the worst case; Gaussian (l2) or uniform (linf) noise of the average case.")
@click.option("--adaptive/--no-adaptive", default=True, show_default=True,
              help="c = |w| for every perturbed parameter (adaptive sharpness) or c = 1.")
@click.option("--m", "--m-sharpness", "m", default=None, type=click.IntRange(min=1),
              help="m-sharpness: batches of m examples, sharpness per batch, averaged [default: the whole set]. "
                   "Under torchrun write --m-sharpness (torchrun's parser takes --m for its own options).")
@click.option("--steps", default=20, show_default=True, type=click.IntRange(min=1), help="Worst case: ascent steps.")
@click.option("--step-size", default=2.0, show_default=True, type=float,
              help="Worst case: the first step as a multiple of ρ, decayed by a cosine over the steps.")
@click.option("--start", "--ascent-start", "start", default="zero", show_default=True,
              type=click.Choice(["zero", "random"]),
              help="Worst case: ascent start (random: one seeded point in the ball; needed at an exact minimum). "
                   "Under torchrun write --ascent-start.")
@click.option("--draws", default=10, show_default=True, type=click.IntRange(min=1),
              help="Average case: noise draws (the same for every batch and ρ).")
@click.option("--bn-recompute", is_flag=True, default=False,
              help="Recompute BatchNorm statistics over the batch at every evaluated point (with --bn eval).")
@data_option
@eval_options()
@arch_options
@device_option
@seed_option
@out_option("landscape.h5")
@overwrite_options
def sharpness(checkpoint: str, rhos: str, kind: str, norm: str, adaptive: bool, m: int | None, steps: int,
              step_size: float, start: str, draws: int, bn_recompute: bool, out: str, overwrite: bool, resume: bool,
              seed: int, **options: Any) -> None:
    """Worst-case and average-case sharpness L(w + δ) - L(w) per ρ, after Andriushchenko et al. (2023).

    Worst case: max over ‖δ/c‖_p <= ρ, by projected gradient ascent (SAM's step rule, best iterate).
    Average case: δ = ρ c ⊙ ξ, ξ ~ N(0, I) (l2) or uniform on [-1, 1] (linf), mean over --draws ± its
    standard error. Adaptive: c = |w|, invariant to rescaling a ReLU layer by α and the next by 1/α.
    Writes /sharpness of --out one (batch, ρ) unit at a time; a killed run continues with --resume
    (which refuses other options, and reprints a finished run).
    Prints one row per ρ.

    \b
    Examples:
      landscape sharpness runs/sgd.pt --rhos 0.01,0.05,0.1 --out runs/sgd.h5
      landscape sharpness runs/sam.pt --kind both --norm linf --rhos 1e-3:1e-2:4 --m 128 --subset 1024
      landscape sharpness runs/sgd.pt --no-adaptive --kind average --draws 50 --bn-recompute
      torchrun --standalone --nproc-per-node 4 -m landscape sharpness runs/sgd.pt --m-sharpness 128
    Python:
      landscape.sharpness(landscape.load_objective("runs/sgd.pt"), [0.01, 0.05, 0.1], out="runs/sgd.h5")
    """
    from landscape.analysis.sharpness import sharpness as measure
    from landscape.engine import tune_allocator

    values = parse_grid(rhos, "--rhos", log=True, example="0.01:1:5")
    objective = objective_from_options(checkpoint, seed=seed, **options)
    tune_allocator()
    result = _run_with_bar("sharpness", "unit", measure, objective=objective, rhos=values, kind=kind, norm=norm,
                           adaptive=adaptive, m=m, steps=steps, step_size=step_size, start=start, draws=draws,
                           bn_recompute=bn_recompute, seed=seed, out=out, resume=resume, overwrite=overwrite)
    click.echo(result.summary())
    click.echo(f"wrote {out} /sharpness")
