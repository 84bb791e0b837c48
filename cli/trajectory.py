"""``landscape trajectory``: several optimizers' paths on one PCA plane, over its loss surface."""

from __future__ import annotations

from typing import Any

import click
from landscape.cli.surface import run_pca_surface, surface_options


@click.command()
@click.argument("trajectories", nargs=-1, required=True)
@click.option("--final", default=None, metavar="CKPT",
              help="The plane's origin, around which the surface is computed [default: the first trajectory's "
                   "final checkpoint: the one its training wrote, or its last checkpoint].")
@click.option("--labels", default=None, metavar="A,B,...",
              help="One label per trajectory, for the figures [default: each trajectory's optimizer].")
@click.option("--x", "x_axis", default="auto:51", show_default=True, metavar="auto:N|LO:HI:N",
              help="Coordinates along the first principal direction: auto:N is N points covering every path and "
                   "the origin with 20% to spare on each side, both axes over the same length; or N points from LO "
                   "to HI, or a list.")
@click.option("--y", "y_axis", default="auto:51", show_default=True, metavar="auto:N|LO:HI:N",
              help="Coordinates along the second principal direction, as --x.")
@click.option("--include-biasbn", is_flag=True, default=False,
              help="Biases and BatchNorm weights take part in the PCA and move (Li et al.'s default without "
                   "--ignore biasbn); by default they do not.")
@click.option("--bn-recompute", is_flag=True, default=False,
              help="Recompute BatchNorm running statistics at every point (one extra pass per point).")
@surface_options
def trajectory(trajectories: tuple[str, ...], final: str | None, labels: str | None, x_axis: str, y_axis: str,
               include_biasbn: bool, bn_recompute: bool, split: str, out: str, overwrite: bool, resume: bool,
               seed: int, **options: Any) -> None:
    """Draw optimizer trajectories on one PCA plane and compute its loss surface (Li et al. 2018, Sec. 7).

    Each TRAJECTORY is a file written by `landscape train --save-every`, or the checkpoints of a run of
    any trainer: a folder, a quoted glob or comma-separated files, in natural order (epoch_9 before
    epoch_10; foreign weights: --arch). The plane is fitted to all paths jointly: the top two principal
    components of every snapshot's weights minus the origin's (--final), rows centred on their mean as
    in Li et al.'s code, so the directions do not depend on the origin; each snapshot is projected on
    them by least squares. Writes /surface of --out (as `landscape surface`, plus trajectory_x,
    trajectory_y, trajectory_path, trajectory_step, trajectory_loss and the labels) and prints the
    explained variance ratio of each direction; `landscape plot` draws the paths on the contours,
    `landscape plot --html` on the 3-D surface. Every path must be of the origin's architecture.

    \b
    Examples:
      landscape train --optimizer sgd --save-every 1 --out runs/sgd.pt
      landscape train --optimizer sam --save-every 1 --out runs/sam.pt
      landscape trajectory runs/sgd_trajectory.h5 runs/sam_trajectory.h5 --out runs/paths.h5
      landscape trajectory 'ckpts/sgd/*.pt' 'ckpts/sam/*.pt' --final ckpts/sam/epoch_200.pt --arch resnet18
    Python:
      objective = landscape.load_objective("runs/sgd.pt")
      paths = [landscape.load_trajectory(f"runs/{n}_trajectory.h5", objective.params) for n in ("sgd", "sam")]
      landscape.pca_surface(objective, paths, out="runs/paths.h5")
    """
    from landscape.trajectory import final_checkpoint

    names = [part.strip() for part in labels.split(",")] if labels else None
    run_pca_surface(final or final_checkpoint(trajectories[0]), list(trajectories), names, x_axis, y_axis,
                    include_biasbn, bn_recompute, split, out, overwrite, resume, seed, options)
