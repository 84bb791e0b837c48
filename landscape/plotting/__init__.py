"""Figures, drawn from stored results only. One module per family of analyses.

Each module exposes ``FIGURES = {group_name: draw(arrays, attrs, **options) -> Figure}``.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

from landscape.errors import LandscapeError  # noqa: E402

MODULES = {
    "hessian": "landscape.plotting.hessian",
    "surface": "landscape.plotting.surface",
    "interpolation": "landscape.plotting.surface",
    "radius": "landscape.plotting.surface",
    "cosine": "landscape.plotting.diagnostics",
    "ratio": "landscape.plotting.diagnostics",
}


def plot_group(arrays: Mapping[str, Any], attrs: Mapping[str, Any], group: str, **options: Any):
    """Draw the figure for one stored analysis group."""
    if group not in MODULES:
        raise LandscapeError(f"no figure is defined for /{group}; plottable groups: {', '.join(MODULES)}")
    module = importlib.import_module(MODULES[group])
    return module.FIGURES[group](arrays, attrs, **options)


def save_figure(figure, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=150, bbox_inches="tight")
    import matplotlib.pyplot as plt
    plt.close(figure)
    return out


def plot_file(path: str | Path, out_dir: str | Path | None = None, groups: list[str] | None = None,
              fmt: str = "png", **options: Any) -> list[Path]:
    """Draw every plottable group of a results file (or only ``groups``); returns the files written."""
    from landscape.store import list_groups, read_group
    path = Path(path)
    available = [g for g in list_groups(path) if g in MODULES]
    wanted = groups or available
    unknown = [g for g in wanted if g not in available]
    if unknown:
        raise LandscapeError(f"{path} has no plottable /{unknown[0]}; it holds: {', '.join(available) or 'nothing'}")
    out_dir = Path(out_dir) if out_dir else path.parent
    written = []
    for group in wanted:
        arrays, attrs = read_group(path, group)
        written.append(save_figure(plot_group(arrays, attrs, group, **options), out_dir / f"{path.stem}_{group}.{fmt}"))
    return written
