"""Interactive surfaces (plotly): ``landscape plot --html`` pages, the Jupyter display of a surface
result, and optimizer trajectories on the static and the interactive figures.

The figure data is read back from what was written (the JSON inside the page, the Jupyter bundle,
matplotlib's drawn lines) and compared with the arrays the test stored."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys

import numpy as np
import pytest

from clitools import invoke
from landscape.errors import LandscapeError
from landscape.store import read_group, write_group

X = np.linspace(-1.0, 1.0, 6)
Y = np.array([-0.5, 0.0, 0.25, 0.75])   # 6 x 4: a transposed grid cannot pass
PATHS = {"sgd": (np.array([0.9, 0.5, 0.2, 0.05]), np.array([0.7, 0.4, 0.1, 0.0])),
         "sam": (np.array([-0.8, -0.3, 0.0]), np.array([0.6, 0.2, 0.05]))}


def surface_arrays(two_d: bool = True, paths: bool = True) -> dict[str, np.ndarray]:
    """A /surface with a NaN point and (for 2-D) the two optimizer paths of ``PATHS`` (interleaved)."""
    if not two_d:
        return {"xcoordinates": X, "train_loss": 1.0 + X ** 2, "train_acc": 1.0 - X ** 2 / 2}
    gx, gy = np.meshgrid(X, Y, indexing="ij")
    loss = 0.1 + gx ** 2 + 2.0 * gy ** 2 + 0.3 * gx * gy
    loss[2, 3] = np.nan
    arrays = {"xcoordinates": X, "ycoordinates": Y, "train_loss": loss, "train_acc": 1.0 - loss / 4}
    if paths:
        order = [("sgd", 0), ("sam", 0), ("sgd", 1), ("sgd", 2), ("sam", 1), ("sam", 2), ("sgd", 3)]
        arrays["trajectory_x"] = np.array([PATHS[name][0][k] for name, k in order])
        arrays["trajectory_y"] = np.array([PATHS[name][1][k] for name, k in order])
        arrays["trajectory_path"] = np.array([0 if name == "sgd" else 1 for name, _ in order])
        arrays["trajectory_loss"] = np.linspace(1.0, 0.1, len(order))
    return arrays


@pytest.fixture
def surface_file(tmp_path):
    path = tmp_path / "sam.h5"
    write_group(path, "surface", surface_arrays(), {"trajectory_labels": ["sgd", "sam"], "checkpoint": "runs/sam.pt"})
    return path


def plotly_array(value) -> np.ndarray:
    """A plotly JSON array: a (nested) list with null gaps, or plotly's typed array {"dtype", "bdata", "shape"}."""
    if isinstance(value, dict):
        flat = np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"]).astype(np.float64)
        shape = value.get("shape")
        return flat.reshape([int(s) for s in str(shape).split(",")]) if shape else flat
    return np.array([[np.nan if v is None else v for v in row] for row in value] if value and isinstance(value[0], list)
                    else [np.nan if v is None else v for v in value], dtype=np.float64)


def page_figure(html: str) -> tuple[list[dict], dict]:
    """The traces and layout that the page passes to ``Plotly.newPlot(id, data, layout, config)``."""
    call = re.search(r'Plotly\.newPlot\(\s*"[^"]+",\s*', html)
    assert call, "no Plotly.newPlot call in the page"
    decoder = json.JSONDecoder()
    data, end = decoder.raw_decode(html, call.end())
    layout, _ = decoder.raw_decode(html, end + html[end:].index("{"))
    return data, layout


def check_figure(traces: list[dict], arrays: dict[str, np.ndarray]) -> None:
    """The surface and contour hold the stored loss ((len(y), len(x)) rows, gaps at NaN); each path's
    2-D and 3-D lines hold its stored coordinates, in its own colour."""
    from landscape.plotting.interactive import LIFT
    kinds = [trace["type"] for trace in traces]
    surface, contour = traces[kinds.index("surface")], traces[kinds.index("contour")]
    for trace in (surface, contour):
        np.testing.assert_array_equal(plotly_array(trace["x"]), X)
        np.testing.assert_array_equal(plotly_array(trace["y"]), Y)
        np.testing.assert_array_equal(plotly_array(trace["z"]), arrays["train_loss"].T)
    assert surface["contours"]["z"]["project"]["z"] is True
    limits = (np.nanmin(arrays["train_loss"]), np.nanmax(arrays["train_loss"]))
    assert (surface["cmin"], surface["cmax"]) == (contour["zmin"], contour["zmax"]) == limits   # one colour scale
    colors = set()
    for label, (x, y) in PATHS.items():
        drawn = {t["type"]: t for t in traces if t.get("name") == label and t["type"] in ("scatter", "scatter3d")}
        assert set(drawn) == {"scatter", "scatter3d"}, label
        for trace in drawn.values():
            np.testing.assert_array_equal(plotly_array(trace["x"]), x)
            np.testing.assert_array_equal(plotly_array(trace["y"]), y)
            assert "markers" in trace["mode"] and "lines" in trace["mode"]
        assert drawn["scatter"]["marker"]["symbol"][1:] == ["arrow"] * (len(x) - 1)
        assert drawn["scatter"].get("showlegend", True) and drawn["scatter3d"]["showlegend"] is False
        colors.add(drawn["scatter"]["line"]["color"])
        # the 3-D path lies on the drawn surface (bilinear in the grid cell holding each point), lifted a little
        z = plotly_array(drawn["scatter3d"]["z"])
        for k, (px, py) in enumerate(zip(x, y)):
            i, j = np.searchsorted(X, px, "right") - 1, np.searchsorted(Y, py, "right") - 1
            tx, ty = (px - X[i]) / (X[i + 1] - X[i]), (py - Y[j]) / (Y[j + 1] - Y[j])
            cell = arrays["train_loss"][i:i + 2, j:j + 2]
            expected = ((1 - tx) * (1 - ty) * cell[0, 0] + tx * (1 - ty) * cell[1, 0] + (1 - tx) * ty * cell[0, 1]
                        + tx * ty * cell[1, 1])
            lift = LIFT * (np.nanmax(arrays["train_loss"]) - np.nanmin(arrays["train_loss"]))
            assert z[k] == pytest.approx(expected + lift, rel=1e-12) or (np.isnan(z[k]) and np.isnan(expected))
    assert len(colors) == len(PATHS)


def test_html_page_holds_the_surface_and_paths_and_plotly_js_inline(surface_file, tmp_path):
    result = invoke("plot", surface_file, "--html", "--out-dir", tmp_path / "figures")
    page = tmp_path / "figures" / "sam_surface.html"
    assert result.exit_code == 0 and result.output.strip() == str(page), result.output
    html = page.read_text()
    assert not re.search(r"<script[^>]*\bsrc\s*=", html), "the page loads a script from elsewhere"
    assert "plotly.js v" in html and len(html) > 1_000_000, "plotly.js is not inside the page"
    traces, layout = page_figure(html)
    check_figure(traces, read_group(surface_file, "surface")[0])
    surface = next(t for t in traces if t["type"] == "surface")
    assert surface["colorbar"]["title"]["text"] == layout["scene"]["zaxis"]["title"]["text"] == "train loss"
    assert not list(tmp_path.glob("figures/*.png"))


def test_html_of_a_1d_surface_and_with_log_loss(tmp_path):
    path = tmp_path / "line.h5"
    write_group(path, "surface", surface_arrays(two_d=False), {})
    assert invoke("plot", path, "--html", "--log-loss").exit_code == 0
    traces, layout = page_figure((tmp_path / "line_surface.html").read_text())
    loss = next(t for t in traces if t["xaxis"] == "x" and t["name"] == "train")
    np.testing.assert_array_equal(plotly_array(loss["x"]), X)
    np.testing.assert_array_equal(plotly_array(loss["y"]), 1.0 + X ** 2)
    assert layout["yaxis"]["type"] == "log"


def test_html_without_plotly_is_one_line_and_exit_2(surface_file, tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "plotly" or m.startswith(("plotly.", "landscape.plotting.interactive"))]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "plotly", None)   # `import plotly` now fails as if it were not installed
    result = invoke("plot", surface_file, "--html", "--out-dir", tmp_path)
    assert result.exit_code == 2, result.output
    assert result.output.strip() == "Error: --html needs plotly: pip install 'landscape[interactive]'"
    assert not list(tmp_path.glob("*.html"))
    from landscape.plotting import plot_html
    with pytest.raises(LandscapeError, match=r"need plotly: pip install 'landscape\[interactive\]'"):
        plot_html(surface_file)


def test_html_refuses_other_groups_files_without_a_surface_and_divergent_surfaces(surface_file, tmp_path):
    write_group(tmp_path / "spectrum.h5", "hessian", {"eigenvalues": np.ones(2)}, {})
    write_group(tmp_path / "nan.h5", "surface", {**surface_arrays(paths=False), "train_loss": np.full((6, 4), np.nan)},
                {})
    for args, words in (((surface_file, "--html", "--group", "hessian"), "--html draws /surface only"),
                        ((tmp_path / "spectrum.h5", "--html"), "no /surface"),
                        ((tmp_path / "nan.h5", "--html"), "every point of the surface is divergent")):
        result = invoke("plot", *args)
        assert result.exit_code == 2 and words in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1


def test_jupyter_shows_the_interactive_figure_or_the_static_one(surface_file, monkeypatch):
    import plotly.io as pio

    from landscape.analysis.surface import SurfaceResult
    result = SurfaceResult.load(surface_file)
    monkeypatch.setattr(pio.renderers, "default", "plotly_mimetype")   # what plotly picks inside JupyterLab
    bundle = result._repr_mimebundle_()
    check_figure(bundle["application/vnd.plotly.v1+json"]["data"], result.arrays)
    for name in [m for m in sys.modules if m == "plotly" or m.startswith(("plotly.", "landscape.plotting.interactive"))]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "plotly", None)
    import matplotlib.pyplot as plt
    open_before = plt.get_fignums()
    bundle = result._repr_mimebundle_()
    assert list(bundle) == ["image/png"] and bundle["image/png"].startswith(b"\x89PNG\r\n\x1a\n")
    assert plt.get_fignums() == open_before, "the static figure was left open (the inline backend would show it twice)"


def test_importing_landscape_and_the_surface_result_imports_neither_plotly_nor_matplotlib():
    code = ("import sys, landscape, landscape.results, landscape.plotting, landscape.analysis.surface as s; "
            "assert callable(s.SurfaceResult({}, {})._repr_mimebundle_); "
            "print(sorted(m for m in ('plotly', 'matplotlib') if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "[]"


# ---------------------------------------------------------------------------------- static figure

def test_static_contours_draw_each_path_in_its_own_colour_with_a_legend(surface_file):
    import matplotlib.pyplot as plt

    from landscape.plotting import plot_group
    from landscape.plotting.surface import compare_surface
    arrays, attrs = read_group(surface_file, "surface")
    figure = plot_group(arrays, attrs, "surface")
    compared = compare_surface([("A", arrays, attrs), ("B", arrays, attrs)])
    try:
        axes = [ax for ax in figure.axes if ax.get_title() in ("contours", "filled contours")] + \
               [ax for ax in compared.axes if ax.get_title() in ("A", "B")]
        assert len(axes) == 4
        for ax in axes:
            lines = {line.get_label(): line for line in ax.get_lines() if line.get_label() in PATHS}
            assert set(lines) == set(PATHS)
            for label, (x, y) in PATHS.items():
                np.testing.assert_array_equal(lines[label].get_xdata(), x)
                np.testing.assert_array_equal(lines[label].get_ydata(), y)
                assert lines[label].get_marker() == "o"
            assert lines["sgd"].get_color() != lines["sam"].get_color()
            assert [t.get_text() for t in ax.get_legend().get_texts()] == list(PATHS)
            arrows = [a for a in ax.texts if getattr(a, "arrow_patch", None) is not None]
            assert sorted(tuple(a.xy) for a in arrows) == sorted((x[-1], y[-1]) for x, y in PATHS.values())
    finally:
        plt.close(figure)
        plt.close(compared)


def test_surfaces_without_paths_draw_no_legend_and_bad_paths_are_refused(tmp_path):
    import matplotlib.pyplot as plt

    from landscape.plotting import plot_group
    figure = plot_group(surface_arrays(paths=False), {}, "surface")
    assert all(ax.get_legend() is None for ax in figure.axes)
    plt.close(figure)
    arrays = surface_arrays()
    for change, words in (({"trajectory_y": arrays["trajectory_y"][:-1]}, "differ in length"),
                          ({"trajectory_path": arrays["trajectory_path"] + 1}, "for 2 trajectory_labels")):
        with pytest.raises(LandscapeError, match=words):
            plot_group({**arrays, **change}, {"trajectory_labels": ["sgd", "sam"]}, "surface")
