"""Interactive figures (plotly) of a stored ``/surface``: a rotatable 3-D surface with its contours
projected on the floor, the 2-D contour map beside it, and the stored optimizer trajectories drawn
on both; a 1-D surface as loss and accuracy curves. Importing this module imports plotly (the
``interactive`` extra); :func:`landscape.plotting.interactive_module` imports it only when plotly is there.

HTML pages are self-contained: plotly.js is written into the page, so they open without a network.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots
from scipy.interpolate import RegularGridInterpolator

from landscape.errors import LandscapeError
from landscape.plotting import surface_data as data


def _finite_or_none(values: np.ndarray) -> list[Any]:
    """Values as a (nested) list with None where not finite: plotly's gaps, valid JSON."""
    return np.where(np.isfinite(values), values, None).tolist()


LIFT = 0.01  # 3-D paths float this fraction of the surface's height range above it, so it does not hide them


def _on_surface(arrays: Mapping[str, Any], z: np.ndarray, path: data.Trajectory) -> np.ndarray:
    """The drawn surface's height at each point of ``path`` (bilinear in the grid; NaN outside it)
    plus ``LIFT``, so the 3-D path lies on the surface whatever metric is drawn."""
    grid = (np.asarray(arrays["xcoordinates"], dtype=np.float64), np.asarray(arrays["ycoordinates"], dtype=np.float64))
    interpolate = RegularGridInterpolator(grid, z, bounds_error=False, fill_value=np.nan)
    return interpolate(np.column_stack([path.x, path.y])) + LIFT * (np.nanmax(z) - np.nanmin(z))


def _hover(path: data.Trajectory) -> list[str]:
    steps = [f"{path.label} point {i}" for i in range(len(path.x))]
    if path.loss is None:
        return steps
    return [f"{step}<br>stored loss {loss:.6g}" for step, loss in zip(steps, path.loss)]


def _curves(arrays: Mapping[str, Any], attrs: Mapping[str, Any], log_loss: bool) -> go.Figure:
    """1-D: loss and accuracy along x, one line per split."""
    figure = make_subplots(rows=1, cols=2, subplot_titles=("loss", "accuracy"))
    x = np.asarray(arrays["xcoordinates"], dtype=np.float64)
    for split, color in zip(data.splits(arrays), ("#1f77b4", "#ff7f0e", "#2ca02c")):
        for col, what in ((1, "loss"), (2, "acc")):
            values = np.asarray(arrays[f"{split}_{what}"], dtype=np.float64)
            figure.add_trace(go.Scatter(x=x, y=_finite_or_none(values), mode="lines", name=split, legendgroup=split,
                                        showlegend=col == 1, line={"color": color}), row=1, col=col)
    figure.update_xaxes(title_text=data.axis_labels(attrs)[0])
    figure.update_yaxes(type="log" if log_loss else "linear", row=1, col=1)
    figure.update_layout(title=f"1-D loss slice: {data.subtitle(attrs)}")
    return figure


def surface_figure(arrays: Mapping[str, Any], attrs: Mapping[str, Any], log_loss: bool = False,
                   metric: str | None = None) -> go.Figure:
    """The interactive figure of a stored surface (``metric``: default the first stored loss;
    ``log_loss``: log10 of losses). Non-finite points are gaps. Trajectory points outside the grid
    appear on the contour map only."""
    if "ycoordinates" not in arrays:
        return _curves(arrays, attrs, log_loss)
    name = data.metric(arrays, metric)
    z = data.values(arrays, name, log_loss).filled(np.nan)  # (len(x), len(y))
    if not np.isfinite(z).any():
        raise LandscapeError("every point of the surface is divergent (inf/NaN); nothing to draw")
    x, y = (np.asarray(arrays[a], dtype=np.float64) for a in ("xcoordinates", "ycoordinates"))
    title = data.label(name, log_loss)
    figure = make_subplots(rows=1, cols=2, specs=[[{"type": "scene"}, {"type": "xy"}]], column_widths=[0.55, 0.45],
                           subplot_titles=("surface", "contours"))
    rows_along_y = _finite_or_none(z.T)  # plotly: z[i][j] is the value at (x[j], y[i])
    low, high = float(np.nanmin(z)), float(np.nanmax(z))  # one colour scale for both views
    figure.add_trace(go.Surface(x=x, y=y, z=rows_along_y, colorscale="Viridis", cmin=low, cmax=high, name=title,
                                colorbar={"title": {"text": title}, "x": -0.1},
                                contours={"z": {"show": True, "usecolormap": True, "project": {"z": True}}}),
                     row=1, col=1)
    figure.add_trace(go.Contour(x=x, y=y, z=rows_along_y, colorscale="Viridis", zmin=low, zmax=high, name=title,
                                showscale=False, ncontours=20, line={"width": 0.5}), row=1, col=2)
    figure.add_trace(go.Scatter(x=[0.0], y=[0.0], mode="markers", name="origin", showlegend=False,
                                marker={"symbol": "cross-thin", "size": 12, "line": {"color": "red", "width": 2}}),
                     row=1, col=2)
    for k, path in enumerate(data.trajectories(arrays, attrs)):
        color = data.PATH_COLORS[k % len(data.PATH_COLORS)]
        hover = _hover(path)
        figure.add_trace(go.Scatter3d(x=path.x, y=path.y, z=_finite_or_none(_on_surface(arrays, z, path)),
                                      mode="lines+markers", name=path.label, legendgroup=path.label, showlegend=False,
                                      line={"color": color, "width": 5}, marker={"color": color, "size": 3},
                                      text=hover, hoverinfo="text"), row=1, col=1)
        symbols = ["circle"] + ["arrow"] * (len(path.x) - 1)  # each later point points along its step
        figure.add_trace(go.Scatter(x=path.x, y=path.y, mode="lines+markers", name=path.label,
                                    legendgroup=path.label, line={"color": color, "width": 2},
                                    marker={"color": color, "size": 9, "symbol": symbols, "angleref": "previous"},
                                    text=hover, hoverinfo="text"), row=1, col=2)
    xlabel, ylabel = data.axis_labels(attrs)
    figure.update_layout(title=f"{title}: {data.subtitle(attrs)}", height=600,
                         scene={"xaxis_title": xlabel, "yaxis_title": ylabel,
                                "zaxis_title": title, "camera": {"eye": {"x": -1.3, "y": -1.5, "z": 1.6}}},
                         legend={"title": {"text": "trajectories"}, "x": 1.02, "y": 1.0})
    figure.update_xaxes(title_text=xlabel, row=1, col=2)
    figure.update_yaxes(title_text=ylabel, scaleanchor="x", scaleratio=1, row=1, col=2)
    return figure


def write_html(arrays: Mapping[str, Any], attrs: Mapping[str, Any], out: str | Path, **options: Any) -> Path:
    """Write the surface's interactive figure to ``out`` as one self-contained HTML page."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    surface_figure(arrays, attrs, **options).write_html(out, include_plotlyjs=True, full_html=True)
    return out
