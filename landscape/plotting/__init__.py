"""Figures, drawn from stored results only. One module per family of analyses.

Each module exposes ``FIGURES = {group_name: draw(arrays, attrs, **options) -> Figure}`` and
``COMPARE`` (several results of a group in one figure). Figures are pyplot figures in whatever
backend the process uses (inline in Jupyter); importing this package never changes it. Programs
that only save figures, like the CLI, call :func:`use_file_backend` first.

Surfaces also have an interactive figure (plotly, the optional ``interactive`` extra):
:func:`plot_html` writes it as a self-contained page, and :func:`display_bundle` shows it in Jupyter
(the static figure when plotly is missing). This package imports neither matplotlib nor plotly.
"""

from __future__ import annotations

import importlib
import io
import sys
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

from landscape.curvature import NAMES as CURVATURES
from landscape.errors import LandscapeError

MODULES = {
    **{group: "landscape.plotting.hessian" for name in CURVATURES for group in (name, f"{name}_batches")},
    "surface": "landscape.plotting.surface",
    "interpolation": "landscape.plotting.surface",
    "radius": "landscape.plotting.surface",
    "cosine": "landscape.plotting.diagnostics",
    "ratio": "landscape.plotting.diagnostics",
    "sharpness": "landscape.plotting.sharpness",
    "training": "landscape.plotting.training",
}


def use_file_backend() -> None:
    """Draw with matplotlib's non-interactive Agg backend, unless pyplot is already imported (then
    the running program, e.g. a notebook that invoked the CLI, keeps its backend)."""
    if "matplotlib.pyplot" not in sys.modules:
        import matplotlib
        matplotlib.use("agg")


def plot_group(arrays: Mapping[str, Any], attrs: Mapping[str, Any], group: str, **options: Any):
    """Draw the figure for one stored analysis group."""
    if group not in MODULES:
        raise LandscapeError(f"no figure is defined for /{group}; plottable groups: {', '.join(MODULES)}")
    module = importlib.import_module(MODULES[group])
    return module.FIGURES[group](arrays, attrs, **options)


def save_figure(figure, out: str | Path) -> Path:
    """Write ``figure`` to ``out`` (format by suffix, any backend) and close it."""
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


def plot_compare(paths: list[str | Path], group: str, out: str | Path, labels: list[str] | None = None,
                 **options: Any) -> Path:
    """One figure with ``group`` from several results files side by side (e.g. SGD vs SAM)."""
    from landscape.store import read_group
    labels = labels or [Path(p).stem for p in paths]
    if len(labels) != len(paths):
        raise LandscapeError(f"--labels has {len(labels)} entries for {len(paths)} files; give one label per file")
    entries = [(label, *read_group(p, group)) for label, p in zip(labels, paths)]
    if group not in MODULES:
        raise LandscapeError(f"no figure is defined for /{group}; plottable groups: {', '.join(MODULES)}")
    return save_figure(importlib.import_module(MODULES[group]).COMPARE[group](entries, **options), out)


def interactive_module() -> ModuleType | None:
    """:mod:`landscape.plotting.interactive`, or None when plotly is not installed."""
    try:
        return importlib.import_module("landscape.plotting.interactive")
    except ImportError as exc:
        if (exc.name or "").partition(".")[0] != "plotly":
            raise
        return None


def plot_html(path: str | Path, out_dir: str | Path | None = None, **options: Any) -> Path:
    """Write the interactive figure of ``path``'s /surface to ``<out_dir>/<stem>_surface.html``
    (default: next to the file); ``options``: ``log_loss``, ``metric``. Needs plotly."""
    from landscape.store import read_group
    interactive = interactive_module()
    if interactive is None:
        raise LandscapeError("interactive figures need plotly: pip install 'landscape[interactive]'")
    path = Path(path)
    arrays, attrs = read_group(path, "surface")
    out = (Path(out_dir) if out_dir else path.parent) / f"{path.stem}_surface.html"
    return interactive.write_html(arrays, attrs, out, **options)


def display_bundle(arrays: Mapping[str, Any], attrs: Mapping[str, Any], include=None, exclude=None) -> dict[str, Any]:
    """Jupyter's MIME bundle for a stored surface: plotly's (interactive, as plotly's renderer
    settings say) when plotly is installed, else the static figure as a PNG."""
    interactive = interactive_module()
    if interactive is not None:
        return interactive.surface_figure(arrays, attrs)._repr_mimebundle_(include, exclude)
    figure = plot_group(arrays, attrs, "surface")
    png = io.BytesIO()
    figure.savefig(png, format="png", dpi=100, bbox_inches="tight")
    import matplotlib.pyplot as plt
    plt.close(figure)  # shown once, through this bundle, not again by the inline backend
    return {"image/png": png.getvalue()}
