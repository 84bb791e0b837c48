"""``landscape surface``, ``landscape interpolate`` and ``landscape radius``: the loss around a checkpoint."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

import click
import numpy as np
from landscape.cli.common import (
    already_done,
    arch_options,
    data_option,
    device_option,
    eval_options,
    objective_from_options,
    out_option,
    overwrite_options,
    parse_grid,
    progress,
    seed_option,
)

from landscape import distributed
from landscape.errors import LandscapeError

_with_both_splits = eval_options(
    splits=("train", "test", "both"),
    split_help="Which split's loss and accuracy: train, test, or both at the same points.")


def surface_options(function: Callable) -> Callable:
    """The options of every command that evaluates a grid around a checkpoint (surface, interpolate, trajectory)."""
    for decorator in reversed((data_option, _with_both_splits, arch_options, device_option, seed_option,
                               out_option("landscape.h5"), overwrite_options)):
        function = decorator(function)
    return function


def _objectives(checkpoint: str, split: str, seed: int, options: dict[str, Any]) -> tuple[Any, Any]:
    """The (first, test-or-None) objectives that ``--split`` asks for."""
    first = objective_from_options(checkpoint, split="train" if split == "both" else split, seed=seed, **options)
    test = objective_from_options(checkpoint, split="test", seed=seed, **options) if split == "both" else None
    return first, test


def _other_checkpoint(path: str, options: dict[str, Any]) -> Any:
    from landscape.checkpoint import load_checkpoint
    return load_checkpoint(path, arch=options["arch"], arch_kwargs=options["arch_kwargs"], trust=options["trust"])


ESTIMATE_FROM_S = 5.0  # the time the rest will take is said when it is at least this long


class _Bar:
    """Adapts a progress bar to the analyses' ``progress(done, total)`` callback, and after the first
    written block says on stderr how long the rest will take (``~40.2 h for 1,000,000 points at
    0.14 s/point``), shown or not, unless that is under :data:`ESTIMATE_FROM_S`."""

    def __init__(self, desc: str, unit: str) -> None:
        self.bar = progress(None, desc, unit)
        self.start: tuple[float, int] | None = None  # (time, points done) at the first call
        self.estimated = False

    def __call__(self, done: int, total: int) -> None:
        from tqdm.auto import tqdm

        from landscape.resources import estimate
        now = time.perf_counter()
        if self.start is None:
            self.start = (now, done)
        elif not self.estimated and self.start[1] < done < total:
            per_point = (now - self.start[0]) / (done - self.start[1])
            if per_point * (total - done) >= ESTIMATE_FROM_S:
                tqdm.write(f"remaining: {estimate(total - done, per_point)}", file=sys.stderr)
            self.estimated = True
        self.bar.total = total
        self.bar.n = done
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def _run_with_bar(desc: str, unit: str, function: Callable[..., Any], **kwargs: Any) -> Any:
    bar = _Bar(desc, unit)
    try:
        return function(progress=bar, **kwargs)
    finally:
        bar.close()


PATH_POINTS = 51  # grid points per axis covering projected paths, unless --x/--y say otherwise


def path_axis(text: str | None, name: str) -> Any:
    """A PCA grid axis: ``auto`` or ``auto:N`` (N points covering the projected paths; the default, N = 51),
    or coordinates as :func:`parse_grid` reads them."""
    if text is None or text == "auto":
        return PATH_POINTS
    if text.startswith("auto:"):
        try:
            return int(text[5:])
        except ValueError:
            raise click.UsageError(f"{name} auto:N needs a whole number of points, e.g. auto:51; "
                                   f"got {text!r}") from None
    return parse_grid(text, name)


def run_pca_surface(checkpoint: str, specs: list[str], labels: list[str] | None, x_axis: str | None,
                    y_axis: str | None, include_biasbn: bool, bn_recompute: bool, split: str, out: str,
                    overwrite: bool, resume: bool, seed: int, options: dict[str, Any]) -> None:
    """The surface on the PCA plane of the trajectories ``specs`` around ``checkpoint``, printed and written."""
    from landscape.analysis.surface import pca_surface
    from landscape.engine import tune_allocator
    from landscape.trajectory import load_trajectory

    if labels is not None and len(labels) != len(specs):
        raise LandscapeError(f"--labels gives {len(labels)} label(s) for {len(specs)} trajectories; give one each")
    x, y = path_axis(x_axis, "--x"), path_axis(y_axis, "--y")
    first, test = _objectives(checkpoint, split, seed, options)
    trajectories = [load_trajectory(spec, first.params, label=labels[k] if labels else None, trust=options["trust"],
                                    model=f"the model of {checkpoint}") for k, spec in enumerate(specs)]
    tune_allocator()
    result = _run_with_bar("surface", "pt", pca_surface, objective=first, trajectories=trajectories, x=x, y=y,
                           test_objective=test, include_biasbn=include_biasbn, bn_recompute=bn_recompute, out=out,
                           resume=resume, overwrite=overwrite)
    click.echo(result.summary())
    shape = "x".join(str(n) for n in np.shape(result[f"{result.attrs['config']['splits'][0]}_loss"]))
    click.echo(f"wrote {out} /surface ({shape} grid, {len(specs)} path{'s' if len(specs) > 1 else ''})")


@click.command()
@click.argument("checkpoint")
@click.option("--directions", default="random", show_default=True, metavar="random|pca:TRAJ",
              help="random: seeded Gaussian directions (Li et al.); pca:TRAJ: the top two principal components of "
                   "the trajectory TRAJ (a file of `landscape train --save-every`, or quoted globs, folders or "
                   "comma-separated checkpoints), which is drawn projected on the plane.")
@click.option("--x", "x_axis", default=None, metavar="LO:HI:N",
              help="Coordinates along direction 1: N points from LO to HI, or a comma-separated list "
                   "[default: -1:1:51; with pca: auto:51, 51 points covering the path and the origin with 20% "
                   "to spare on each side, both axes over the same length].")
@click.option("--y", "y_axis", default=None, metavar="LO:HI:N",
              help="Coordinates along direction 2 (ignored with --1d) [default: as --x].")
@click.option("--1d", "one_d", is_flag=True, default=False, help="A 1-D slice along direction 1 only.")
@click.option("--norm", default=None, type=click.Choice(["filter", "layer", "none"]),
              help="Direction normalisation of random directions: per filter (Li et al.; the default), per layer, "
                   "or none. PCA directions are unit vectors, not normalised (as Li et al.).")
@click.option("--include-biasbn", is_flag=True, default=False,
              help="Also move biases and BatchNorm weights (they get zero direction by default); with pca they "
                   "also take part in the PCA.")
@click.option("--orthogonal", is_flag=True, default=False, help="Make direction 2 orthogonal to direction 1.")
@click.option("--x-target", default=None, metavar="CKPT",
              help="Direction 1 points to this checkpoint (x = 1 lands on it), unnormalised.")
@click.option("--bn-recompute", is_flag=True, default=False,
              help="Recompute BatchNorm running statistics at every point (stale statistics inflate the loss "
                   "away from the origin); costs one extra pass per point.")
@surface_options
def surface(checkpoint: str, directions: str, x_axis: str | None, y_axis: str | None, one_d: bool, norm: str | None,
            include_biasbn: bool, orthogonal: bool, x_target: str | None, bn_recompute: bool, split: str, out: str,
            overwrite: bool, resume: bool, seed: int, **options: Any) -> None:
    """Loss and accuracy on L(w + a d1 + b d2) with filter-normalised random directions (Li et al. 2018),
    or the top two principal components of an optimizer's trajectory (--directions pca:TRAJ, Li et al. Sec. 7).

    Writes /surface of --out point by point (Li et al.'s names: xcoordinates, ycoordinates,
    train_loss, train_acc, test_loss, test_acc, shaped (len(x), len(y)); plus the directions and a
    done mask). A killed run continues with --resume; divergent points are stored as inf/NaN.
    With pca:TRAJ, CHECKPOINT (usually the trajectory's final weights) is the origin, and the path
    projected on the plane is stored too (trajectory_x, trajectory_y, ...) and drawn by `landscape plot`;
    several paths on one plane: `landscape trajectory`.

    \b
    Examples:
      landscape surface runs/sam.pt --out runs/sam.h5
      landscape surface runs/sgd.pt --x -1:1:101 --1d --split both --subset 1000
      landscape surface runs/sgd.pt --x-target runs/sam.pt --y -0.5:0.5:21 --orthogonal --resume
      landscape surface runs/sgd.pt --directions pca:runs/sgd_trajectory.h5 --out runs/sgd_pca.h5
      landscape surface ckpts/epoch_200.pt --arch resnet18 --directions 'pca:ckpts/epoch_*.pt' --data cifar10:data
    Python:
      landscape.loss_surface(landscape.load_objective("runs/sam.pt"), out="runs/sam.h5")
      landscape.pca_surface(objective, [landscape.load_trajectory("runs/sam_trajectory.h5", objective.params)])
    """
    from landscape.analysis.surface import loss_surface
    from landscape.engine import tune_allocator

    if directions.startswith("pca:"):
        given = [flag for flag, value in (("--1d", one_d), ("--norm", norm), ("--orthogonal", orthogonal),
                                          ("--x-target", x_target)) if value]
        if given:
            raise LandscapeError(f"{', '.join(given)} {'does' if len(given) == 1 else 'do'} not apply to PCA "
                                 "directions (a plane of unit vectors); drop it, or use --directions random")
        run_pca_surface(checkpoint, [directions[4:]], None, x_axis, y_axis, include_biasbn, bn_recompute, split, out,
                        overwrite, resume, seed, options)
        return
    if directions != "random":
        raise click.UsageError(f"--directions takes random or pca:TRAJ (e.g. pca:runs/sgd_trajectory.h5); "
                               f"got {directions!r}")
    x = parse_grid(x_axis or "-1:1:51", "--x")
    y = None if one_d else parse_grid(y_axis or "-1:1:51", "--y")
    if orthogonal and one_d:
        raise LandscapeError("--orthogonal needs two directions; drop --1d or --orthogonal")
    first, test = _objectives(checkpoint, split, seed, options)
    target = _other_checkpoint(x_target, options) if x_target else None
    tune_allocator()
    result = _run_with_bar("surface", "pt", loss_surface, objective=first, x=x, y=y, test_objective=test,
                           normalization=norm or "filter", include_biasbn=include_biasbn, orthogonal=orthogonal,
                           x_target=target, bn_recompute=bn_recompute, seed=seed, out=out, resume=resume,
                           overwrite=overwrite)
    click.echo(result.summary())
    shape = "x".join(str(n) for n in np.shape(result[f"{result.attrs['config']['splits'][0]}_loss"]))
    click.echo(f"wrote {out} /surface ({shape} grid)")


@click.command()
@click.argument("checkpoint_a")
@click.argument("checkpoint_b")
@click.option("--alphas", default="-0.5:1.5:41", show_default=True, metavar="LO:HI:N",
              help="Coefficients α of w_a + α (w_b - w_a): N points from LO to HI, or a list.")
@click.option("--move-buffers", is_flag=True, default=False,
              help="Interpolate BatchNorm running statistics too (otherwise A's are used throughout).")
@click.option("--bn-recompute", is_flag=True, default=False,
              help="Recompute BatchNorm running statistics at every α instead.")
@surface_options
def interpolate(checkpoint_a: str, checkpoint_b: str, alphas: str, move_buffers: bool, bn_recompute: bool,
                split: str, out: str, overwrite: bool, resume: bool, seed: int, **options: Any) -> None:
    """Loss and accuracy along the line from CHECKPOINT_A (α = 0) to CHECKPOINT_B (α = 1).

    Writes /interpolation of --out (alphas, train_loss, train_acc, ...) point by point; --resume
    continues a killed run. Prints the loss barrier: the largest excess over the chord on [0, 1].

    \b
    Examples:
      landscape interpolate runs/sgd.pt runs/sam.pt --out runs/sgd_sam.h5
      landscape interpolate runs/sgd.pt runs/sam.pt --alphas 0:1:21 --move-buffers --split both
    Python:
      landscape.interpolate(landscape.load_objective("runs/sgd.pt"), "runs/sam.pt").save("runs/sgd_sam.h5")
    """
    from landscape.analysis.surface import interpolate as run_interpolation
    from landscape.engine import tune_allocator

    values = parse_grid(alphas, "--alphas")
    first, test = _objectives(checkpoint_a, split, seed, options)
    target = _other_checkpoint(checkpoint_b, options)
    tune_allocator()
    result = _run_with_bar("interpolate", "pt", run_interpolation, objective=first, target=target, alphas=values,
                           move_buffers=move_buffers, test_objective=test, bn_recompute=bn_recompute, out=out,
                           resume=resume, overwrite=overwrite)
    click.echo(result.summary())
    click.echo(f"wrote {out} /interpolation ({len(values)} points)")


@click.command()
@click.argument("checkpoint")
@click.option("--radii", default="1e-3:10:25", show_default=True, metavar="LO:HI:N",
              help="Radii r (global L2 norm of the weight change): N log-spaced from LO to HI, or a list.")
@click.option("--draws", default=10, show_default=True, type=click.IntRange(min=1),
              help="Random directions for RWP (the same ones at every radius).")
@click.option("--rho-p", default=2.0, show_default=True, type=click.FloatRange(min=1),
              help="p of SAM's ascent direction (2: the gradient; inf: its sign).")
@click.option("--ratio-levels", default=None, metavar="LIST",
              help="Loss increases (nats) at which to compare the radii [default: 5 inside both curves, <= 1].")
@data_option
@eval_options()
@arch_options
@device_option
@seed_option
@out_option("landscape.h5")
@overwrite_options
def radius(checkpoint: str, radii: str, draws: int, rho_p: float, ratio_levels: str | None, out: str,
           overwrite: bool, resume: bool, seed: int, **options: Any) -> None:
    """Perturbed loss versus radius: adversarial (AWP, SAM's direction) against random (RWP) weight perturbations.

    AWP: L(w + r ε/‖ε‖) with ε SAM's ascent at the full-set gradient. RWP: mean ± std of
    L(w + r ξ/‖ξ‖) over --draws filter-wise noise draws (RWP's noise). Prints the RWP/AWP radius
    ratio needed for the same loss increase (the RWP paper finds about 100×). Writes /radius of --out
    point by point; a killed run continues with --resume.

    \b
    Examples:
      landscape radius runs/sgd.pt --out runs/sgd.h5
      landscape radius runs/sgd.pt --radii 1e-2:100:31 --draws 20 --subset 1000 --resume
    Python:
      landscape.radius_curve(landscape.load_objective("runs/sgd.pt")).save("runs/sgd.h5")
    """
    from landscape.analysis.radius import RadiusResult, radius_curve
    from landscape.engine import tune_allocator

    values = parse_grid(radii, "--radii", log=True, example="1e-3:10:25")
    levels = parse_grid(ratio_levels, "--ratio-levels") if ratio_levels else None
    objective = objective_from_options(checkpoint, seed=seed, **options)
    asked = {"radii": values.tolist(), "draws": draws, "rho_p": rho_p, "bn": options["bn"], "seed": seed,
             "ratio_levels": None if levels is None else levels.tolist(), "dtype": options["dtype"]}
    if already_done(out, RadiusResult.group, overwrite, resume, objective, seed, asked):
        result = distributed.on_main(lambda: RadiusResult.load(out))
    else:
        tune_allocator()
        result = _run_with_bar("radius", "point", radius_curve, objective=objective, radii=values, draws=draws,
                               rho_p=rho_p, seed=seed, ratio_levels=levels, out=out, resume=resume,
                               overwrite=overwrite)
    click.echo(result.summary())
    click.echo(f"wrote {out} /radius")
