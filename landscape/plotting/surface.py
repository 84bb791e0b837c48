"""Figures for loss surfaces, interpolations and perturbed loss versus radius.

``FIGURES`` draws one stored result: 2-D surfaces as labelled contours, filled contours and a 3-D
surface, with the stored optimizer trajectories (if any) on the contours; 1-D slices and
interpolations as loss and accuracy curves; radius curves on a log x axis.
``COMPARE`` draws several results (e.g. SGD vs SAM) side by side on shared levels, or overlaid.
Non-finite (divergent) points are left blank, never filled in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np

from landscape.errors import LandscapeError
from landscape.plotting import surface_data as data

Entry = tuple[str, Mapping[str, Any], Mapping[str, Any]]  # (label, arrays, attrs)
KINDS = ("all", "contour", "filled", "3d")
_COLORS = plt.get_cmap("tab10").colors


def _levels(values: Sequence[np.ma.MaskedArray], count: int) -> np.ndarray:
    finite = np.concatenate([v.compressed() for v in values])
    if finite.size == 0:
        raise LandscapeError("every point of the surface is divergent (inf/NaN); nothing to draw")
    low, high = float(finite.min()), float(finite.max())
    return np.linspace(low, high if high > low else low + 1e-12, count)


def _grid(arrays: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Meshgrids with x along axis 0, matching the stored (len(x), len(y)) arrays."""
    return np.meshgrid(np.asarray(arrays["xcoordinates"]), np.asarray(arrays["ycoordinates"]), indexing="ij")


def _contour(ax, arrays: Mapping[str, Any], attrs: Mapping[str, Any], values: np.ma.MaskedArray,
             levels: np.ndarray, filled: bool, line_color: str | None = None):
    x, y = _grid(arrays)
    if filled:
        drawn = ax.contourf(x, y, values, levels=levels, cmap="viridis", extend="both")
    else:
        colors = {"colors": line_color} if line_color else {"cmap": "viridis"}
        drawn = ax.contour(x, y, values, levels=levels, linewidths=0.7 if line_color else 0.9, **colors)
        ax.clabel(drawn, drawn.levels[::2], inline=True, fontsize=7, fmt="%.3g")
    ax.plot(0, 0, "+", color="red", ms=9)
    xlabel, ylabel = data.axis_labels(attrs)
    ax.set(xlabel=xlabel, ylabel=ylabel, aspect="equal")
    return drawn


def _trajectories(ax, arrays: Mapping[str, Any], attrs: Mapping[str, Any]) -> None:
    """Each stored optimizer path as a line with markers in its own colour, its last step an arrow,
    labelled in a legend (nothing when the surface holds no trajectory)."""
    paths = data.trajectories(arrays, attrs)
    for k, path in enumerate(paths):
        color = data.PATH_COLORS[k % len(data.PATH_COLORS)]
        ax.plot(path.x, path.y, "-o", color=color, ms=3, lw=1.3, label=path.label, zorder=4)
        if len(path.x) > 1:
            ax.annotate("", xy=(path.x[-1], path.y[-1]), xytext=(path.x[-2], path.y[-2]), zorder=5,
                        arrowprops={"arrowstyle": "-|>", "color": color, "lw": 1.3, "shrinkA": 0, "shrinkB": 0})
    if paths:
        ax.legend(fontsize=8, loc="best")


def _curves(loss_ax, acc_ax, arrays: Mapping[str, Any], x: np.ndarray, label: str, style: int, log_loss: bool,
            color_by_split: bool) -> None:
    for i, split in enumerate(data.splits(arrays)):
        color = _COLORS[(i if color_by_split else style) % len(_COLORS)]
        line = ("-", "--", "-.", ":")[(style if color_by_split else i) % 4]
        name = f"{label}{split}" if label else split
        loss_ax.plot(x, np.ma.masked_invalid(np.asarray(arrays[f"{split}_loss"], dtype=float)), line, color=color,
                     label=name)
        acc_ax.plot(x, np.asarray(arrays[f"{split}_acc"], dtype=float), line, color=color, label=name)
    if log_loss:
        loss_ax.set_yscale("log")


def _curve_figure(entries: Sequence[Entry], x_name: str, xlabel: str, log_loss: bool):
    """Loss and accuracy versus one coordinate, one line per split (and per file)."""
    figure, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    single = len(entries) == 1
    for k, (label, arrays, _) in enumerate(entries):
        _curves(loss_ax, acc_ax, arrays, np.asarray(arrays[x_name]), "" if single else f"{label}: ", k, log_loss,
                single)
    loss_ax.set(xlabel=xlabel, ylabel="loss")
    acc_ax.set(xlabel=xlabel, ylabel="accuracy")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return figure, loss_ax, acc_ax


def draw_surface(arrays: Mapping[str, Any], attrs: Mapping[str, Any], log_loss: bool = False,
                 metric: str | None = None, kind: str = "all", levels: int = 20):
    """2-D: labelled contours, filled contours and a 3-D surface of ``metric`` (``kind`` picks one);
    1-D: loss and accuracy along x."""
    if "ycoordinates" not in arrays:
        figure, loss_ax, _ = _curve_figure([("", arrays, attrs)], "xcoordinates", data.axis_labels(attrs)[0],
                                           log_loss)
        figure.suptitle(f"1-D loss slice: {data.subtitle(attrs)}", fontsize=10)
        figure.tight_layout()
        return figure
    if kind not in KINDS:
        raise LandscapeError(f"unknown surface plot kind {kind!r}; choose one of {', '.join(KINDS)}")
    name = data.metric(arrays, metric)
    values = data.values(arrays, name, log_loss)
    steps = _levels([values], levels)
    kinds = ["contour", "filled", "3d"] if kind == "all" else [kind]
    figure = plt.figure(figsize=(5.2 * len(kinds), 4.6))
    for i, which in enumerate(kinds, start=1):
        if which == "3d":
            ax = figure.add_subplot(1, len(kinds), i, projection="3d")
            x, y = _grid(arrays)
            ax.plot_surface(x, y, values.filled(np.nan), cmap="viridis", vmin=steps[0], vmax=steps[-1],
                            rstride=1, cstride=1, linewidth=0, antialiased=False)
            ax.set(xlabel="x", ylabel="y", zlabel=data.label(name, log_loss))
        else:
            ax = figure.add_subplot(1, len(kinds), i)
            drawn = _contour(ax, arrays, attrs, values, steps, filled=which == "filled")
            _trajectories(ax, arrays, attrs)
            if which == "filled":
                figure.colorbar(drawn, ax=ax, label=data.label(name, log_loss))
        ax.set_title({"contour": "contours", "filled": "filled contours", "3d": "surface"}[which])
    figure.suptitle(f"{data.label(name, log_loss)}: {data.subtitle(attrs)}", fontsize=10)
    figure.tight_layout()
    return figure


def compare_surface(entries: Sequence[Entry], log_loss: bool = False, metric: str | None = None,
                    levels: int = 20):
    """2-D: filled contours with labelled lines side by side on shared levels; 1-D: curves overlaid."""
    two_d = ["ycoordinates" in arrays for _, arrays, _ in entries]
    if any(two_d) and not all(two_d):
        raise LandscapeError("some files hold 1-D and others 2-D surfaces; compare like with like")
    if not all(two_d):
        figure, _, _ = _curve_figure(entries, "xcoordinates", "x (direction 1)", log_loss)
        figure.tight_layout()
        return figure
    names = [data.metric(arrays, metric) for _, arrays, _ in entries]
    values = [data.values(arrays, n, log_loss) for (_, arrays, _), n in zip(entries, names)]
    steps = _levels(values, levels)
    figure, axes = plt.subplots(1, len(entries), figsize=(4.6 * len(entries) + 1, 4.4), squeeze=False)
    for k, (ax, (label, arrays, attrs), value) in enumerate(zip(axes[0], entries, values)):
        drawn = _contour(ax, arrays, attrs, value, steps, filled=True)
        _contour(ax, arrays, attrs, value, steps, filled=False, line_color="k")
        _trajectories(ax, arrays, attrs)
        ax.set_title(label)
        if k:
            ax.set_ylabel("")
    figure.colorbar(drawn, ax=list(axes[0]), label=data.label(names[0], log_loss))
    return figure


def draw_interpolation(arrays: Mapping[str, Any], attrs: Mapping[str, Any], log_loss: bool = False):
    """Loss and accuracy versus α; α = 0 and 1 (the two checkpoints) marked."""
    return compare_interpolation([("", arrays, attrs)], log_loss)


def compare_interpolation(entries: Sequence[Entry], log_loss: bool = False):
    figure, loss_ax, acc_ax = _curve_figure(entries, "alphas", "α (0: A, 1: B)", log_loss)
    for ax in (loss_ax, acc_ax):
        for alpha in (0.0, 1.0):
            ax.axvline(alpha, color="0.5", lw=0.8, ls=":")
    attrs = entries[0][2]
    if len(entries) == 1:
        a = str(attrs.get("checkpoint", "A")).rsplit("/", 1)[-1]
        b = str(attrs.get("target", "B")).rsplit("/", 1)[-1]
        moved = ", buffers moved" if attrs.get("config", {}).get("move_buffers") else ""
        figure.suptitle(f"interpolation {a} → {b}{moved}", fontsize=10)
    figure.tight_layout()
    return figure


def draw_radius(arrays: Mapping[str, Any], attrs: Mapping[str, Any], log_loss: bool = False):
    """Perturbed loss (and accuracy) versus radius on a log axis: AWP, RWP mean ± std, unperturbed loss."""
    return compare_radius([("", arrays, attrs)], log_loss)


def compare_radius(entries: Sequence[Entry], log_loss: bool = False):
    figure, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    single = len(entries) == 1
    rwp_top = 0.0
    for k, (label, arrays, attrs) in enumerate(entries):
        radii = np.asarray(arrays["radii"])
        prefix = "" if single else f"{label}: "
        awp_color, rwp_color = (_COLORS[3], _COLORS[0]) if single else (_COLORS[k % 10], _COLORS[k % 10])
        mean, std = np.asarray(arrays["loss_rwp"]), np.asarray(arrays["loss_rwp_std"])
        loss_ax.plot(radii, np.ma.masked_invalid(arrays["loss_awp"]), "-", color=awp_color, label=f"{prefix}AWP (SAM)")
        loss_ax.plot(radii, np.ma.masked_invalid(mean), "--", color=rwp_color, label=f"{prefix}RWP mean ± std")
        loss_ax.fill_between(radii, mean - std, mean + std, color=rwp_color, alpha=0.18, lw=0)
        finite = (mean + std)[np.isfinite(mean + std)]
        rwp_top = max(rwp_top, float(finite.max(initial=0.0)))
        loss_ax.axhline(attrs.get("loss_base", np.nan), color=awp_color if not single else "0.5", lw=0.8, ls=":")
        acc_ax.plot(radii, arrays["acc_awp"], "-", color=awp_color, label=f"{prefix}AWP (SAM)")
        acc_ax.plot(radii, arrays["acc_rwp"], "--", color=rwp_color, label=f"{prefix}RWP mean")
    loss_ax.set(xscale="log", xlabel="radius r = ‖δ‖₂", ylabel="perturbed loss")
    acc_ax.set(xscale="log", xlabel="radius r = ‖δ‖₂", ylabel="perturbed accuracy")
    if log_loss:
        loss_ax.set_yscale("log")
    elif rwp_top > 0:  # AWP leaves the plot where RWP's curve ends: both rises stay visible
        loss_ax.set_ylim(0.0, 1.1 * rwp_top)
    ratios = ", ".join(f"{label + ' ' if label else ''}{attrs.get('radius_ratio', float('nan')):.3g}×"
                       for label, _, attrs in entries)
    loss_ax.set_title(f"RWP/AWP radius at equal loss increase: {ratios}", fontsize=9)
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    figure.tight_layout()
    return figure


FIGURES = {"surface": draw_surface, "interpolation": draw_interpolation, "radius": draw_radius}
COMPARE = {"surface": compare_surface, "interpolation": compare_interpolation, "radius": compare_radius}
