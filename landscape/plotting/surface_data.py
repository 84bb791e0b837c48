"""What a surface figure draws, read from a stored ``/surface`` with numpy only (the matplotlib and
the plotly figures, and the ParaView export, share it): the metric and its values, axis labels,
and the optimizer trajectories projected on the plane with their colours.

Trajectories are stored in ``/surface`` as ``trajectory_x``, ``trajectory_y`` (float, one entry per
point, in the plane's coordinates), ``trajectory_path`` (int, the path of each point, 0..P-1; all 0
when absent), ``trajectory_loss`` (float, optional: the loss at each projected point) and the
attribute ``trajectory_labels`` (P strings, e.g. ``["sgd", "sam"]``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from landscape.errors import LandscapeError

PATH_COLORS = ("#d62728", "#ff7f0e", "#e377c2", "#000000", "#8c564b", "#ff00ff")  # trajectories; stand out on viridis


def splits(arrays: Mapping[str, Any]) -> list[str]:
    """The stored splits, in the order train, test, eval."""
    return [s for s in ("train", "test", "eval") if f"{s}_loss" in arrays]


def metric(arrays: Mapping[str, Any], name: str | None) -> str:
    """The array to draw on a surface: ``name`` or the first stored loss."""
    stored = splits(arrays)
    chosen = name or (f"{stored[0]}_loss" if stored else "train_loss")
    if chosen not in arrays:
        choices = ", ".join(k for k in arrays if k.endswith(("_loss", "_acc"))) or "none stored"
        raise LandscapeError(f"the surface has no {chosen}; choose one of: {choices}")
    return chosen


def values(arrays: Mapping[str, Any], name: str, log_loss: bool) -> np.ma.MaskedArray:
    """``arrays[name]`` with non-finite points masked; log10 of losses with ``log_loss``."""
    array = np.asarray(arrays[name], dtype=np.float64)
    if log_loss and name.endswith("_loss"):
        with np.errstate(divide="ignore", invalid="ignore"):
            array = np.log10(np.where(array > 0, array, np.nan))
    return np.ma.masked_invalid(array)


def label(name: str, log_loss: bool) -> str:
    """Axis label of a stored metric, e.g. ``"log10 train loss"``."""
    split, _, what = name.partition("_")
    text = f"{split} {'loss' if what == 'loss' else 'accuracy'}"
    return f"log10 {text}" if log_loss and what == "loss" else text


def subtitle(attrs: Mapping[str, Any]) -> str:
    """Checkpoint name and direction options, for a figure's title."""
    config = attrs.get("config", {})
    parts = [str(attrs.get("checkpoint", "")).rsplit("/", 1)[-1] or None,
             f"{config['normalization']}-normalised" if config.get("normalization") else None,
             "orthogonal" if config.get("orthogonal") else None,
             "BN recomputed" if config.get("bn_recompute") else None]
    return ", ".join(p for p in parts if p)


def axis_labels(attrs: Mapping[str, Any]) -> tuple[str, str]:
    """Labels of the plane's two axes: the principal components with their explained variance ratio
    for a PCA plane (``explained_variance_ratio`` attribute), the directions otherwise."""
    ratio = attrs.get("explained_variance_ratio")
    if ratio is None:
        return "x (direction 1)", "y (direction 2)"
    return tuple(f"{axis} (PC{k + 1}, {100 * float(r):.1f}% of variance)"
                 for k, (axis, r) in enumerate(zip("xy", ratio)))


@dataclass(frozen=True)
class Trajectory:
    """One optimizer's path on the plane: its label, coordinates (n,) and stored losses (n,) or None."""

    label: str
    x: np.ndarray
    y: np.ndarray
    loss: np.ndarray | None


def trajectories(arrays: Mapping[str, Any], attrs: Mapping[str, Any]) -> list[Trajectory]:
    """The stored paths in label order, their points in stored order; [] when the surface holds none."""
    if "trajectory_x" not in arrays:
        return []
    x = np.asarray(arrays["trajectory_x"], dtype=np.float64).reshape(-1)
    y = np.asarray(arrays.get("trajectory_y", np.zeros(0)), dtype=np.float64).reshape(-1)
    path = np.asarray(arrays.get("trajectory_path", np.zeros(len(x), dtype=np.int64))).reshape(-1)
    loss = arrays.get("trajectory_loss")
    loss = None if loss is None else np.asarray(loss, dtype=np.float64).reshape(-1)
    lengths = {len(x), len(y), len(path)} | ({len(loss)} if loss is not None else set())
    if len(lengths) != 1:
        raise LandscapeError("the stored trajectory arrays (trajectory_x, _y, _path, _loss) differ in length; "
                             "the results file is inconsistent: store the trajectory again")
    names = [v.decode() if isinstance(v, bytes) else str(v)
             for v in np.atleast_1d(np.asarray(attrs.get("trajectory_labels", []), dtype=object))]
    count = int(path.max()) + 1 if path.size else len(names)
    if path.size and (path.min() < 0 or (names and count > len(names))):
        raise LandscapeError(f"trajectory_path holds indices {int(path.min())}..{count - 1} for "
                             f"{len(names)} trajectory_labels; the results file is inconsistent: store the trajectory again")
    names = names or [f"path {k}" for k in range(count)]
    return [Trajectory(name, x[path == k], y[path == k], None if loss is None else loss[path == k])
            for k, name in enumerate(names)]
