"""``landscape export --format tg``: files that Li et al.'s loss-landscape scripts read.

Their reading rules are written out here (tomgoldstein/loss-landscape): ``plot_2D.py`` reads
``xcoordinates``, ``ycoordinates`` and the surface at the file's root and pairs it with
``X, Y = np.meshgrid(x, y)``; ``h52vtp.py`` ravels that meshgrid and the values side by side;
``plot_1D.py`` reads ``xcoordinates``, ``train_loss``, ``train_acc`` (percent) and optionally
``test_*``; ``h5_util.read_list`` reads a direction as the datasets ``"0"``, ``"1"``, ... of a group,
and ``net_plotter.set_weights`` moves each parameter (in ``net.parameters()`` order) by
``d0 * x + d1 * y``. The values they see are checked against losses recomputed at those weights.

``vtp``, ``csv``, ``npz``: parsed back (XML, csv, numpy) and compared with the arrays the test stored.
"""

from __future__ import annotations

import csv
import xml.etree.ElementTree as ET

import h5py
import numpy as np
import pytest
import torch

from clitools import invoke
from landscape.analysis.surface import loss_surface
from landscape.errors import LandscapeError
from landscape.export import FORMATS, default_path, export
from landscape.objective import load_objective
from landscape.store import read_group, write_group

X = np.linspace(-1.0, 1.0, 5)
Y = np.array([-0.4, 0.1, 0.7])      # 5 x 3: a transposed or mis-shaped grid cannot pass


def read_list(handle: h5py.File, name: str) -> list[np.ndarray]:
    """Their ``h5_util.read_list``: the group's datasets "0" .. len - 1, in that order."""
    group = handle[name]
    return [group[str(i)][()] for i in range(len(group))]


def read_like_plot_2d(path, surf_name: str):
    """Their ``plot_2D.plot_2d_contour``: root datasets, ``np.meshgrid(x, y)`` and Z as stored."""
    with h5py.File(path, "r") as f:
        x, y = np.array(f["xcoordinates"][:]), np.array(f["ycoordinates"][:])
        X_, Y_ = np.meshgrid(x, y)
        Z = np.array(f[surf_name][:])
    assert Z.shape == X_.shape, "plt.contour(X, Y, Z) needs Z shaped like the meshgrid"
    return X_, Y_, Z


def moved(objective, directions: list[list[np.ndarray]], step: list[float]) -> dict[str, torch.Tensor]:
    """Their ``net_plotter.set_weights``: w + sum_k d_k * step_k per parameter, in parameter order."""
    changes = [sum(d[i] * s for d, s in zip(directions, step)) for i in range(len(directions[0]))]
    return {name: w + torch.as_tensor(np.asarray(c), dtype=w.dtype).reshape(w.shape)
            for (name, w), c in zip(objective.params.items(), changes)}


@pytest.fixture(scope="module")
def objectives(checkpoint):
    train = load_objective(str(checkpoint), subset=48, device="cpu", dtype="float64")
    test = load_objective(str(checkpoint), split="test", subset=32, device="cpu", dtype="float64")
    return train, test


@pytest.fixture(scope="module")
def surfaces(objectives, tmp_path_factory):
    """A 5 x 3 surface (train and test) and a 1-D one (train only), stored in results files."""
    train, test = objectives
    folder = tmp_path_factory.mktemp("export")
    loss_surface(train, X, Y, test_objective=test, include_biasbn=True, seed=3, out=folder / "plane.h5")
    loss_surface(train, X, None, seed=4, out=folder / "line.h5")
    return folder / "plane.h5", folder / "line.h5"


def test_a_non_square_surface_reads_the_way_their_plot_2d_and_h52vtp_read_it(objectives, surfaces, tmp_path):
    train, test = objectives
    out = export(surfaces[0], "tg", tmp_path / "plane_tg.h5")
    ours, _ = read_group(surfaces[0], "surface")
    with h5py.File(out, "r") as f:
        assert set(f) == {"xcoordinates", "ycoordinates", "train_loss", "train_acc", "test_loss", "test_acc",
                          "xdirection", "ydirection"}
        directions = [read_list(f, "xdirection"), read_list(f, "ydirection")]
    for key, direction in zip(("xdirection", "ydirection"), directions):       # rebuild our flat vectors
        assert [d.shape for d in direction] == [tuple(w.shape) for w in train.params.values()]
        assert np.array_equal(np.concatenate([d.reshape(-1) for d in direction]), ours[key])
    for split, objective in (("train", train), ("test", test)):
        X_, Y_, Z = read_like_plot_2d(out, f"{split}_loss")
        _, _, A = read_like_plot_2d(out, f"{split}_acc")
        assert Z.shape == (len(Y), len(X))
        for i in range(len(Y)):
            for j in range(len(X)):
                assert (X_[i, j], Y_[i, j]) == (X[j], Y[i])
                loss, accuracy = objective.loss_and_accuracy(params=moved(objective, directions, [X[j], Y[i]]))
                assert Z[i, j] == pytest.approx(loss, rel=1e-5), (split, i, j)
                assert A[i, j] == pytest.approx(100 * accuracy, abs=100 / objective.num_examples), (split, i, j)
                assert A[i, j] == 100 * ours[f"{split}_acc"][j, i]
        # h52vtp.py: x, y from the raveled meshgrid and z from the raveled values form each point
        points = np.c_[X_.ravel(), Y_.ravel(), Z.ravel()]
        assert all(z == Z[list(Y).index(y), list(X).index(x)] for x, y, z in points)


def test_a_1d_surface_reads_the_way_their_plot_1d_and_load_directions_read_it(objectives, surfaces, tmp_path):
    train, _ = objectives
    out = export(surfaces[1], "tg", tmp_path / "line_tg.h5")
    ours, _ = read_group(surfaces[1], "surface")
    with h5py.File(out, "r") as f:
        x = f["xcoordinates"][:]
        train_loss, train_acc = f["train_loss"][:], f["train_acc"][:]
        assert "ydirection" not in f.keys() and "ycoordinates" not in f.keys() and "test_loss" not in f.keys()
        directions = [read_list(f, "xdirection")]
    assert np.array_equal(x, X) and train_loss.shape == train_acc.shape == (len(X),)
    assert np.array_equal(np.concatenate([d.reshape(-1) for d in directions[0]]), ours["xdirection"])
    for k, step in enumerate(x):
        loss, accuracy = train.loss_and_accuracy(params=moved(train, directions, [step]))
        assert train_loss[k] == pytest.approx(loss, rel=1e-5)
        assert train_acc[k] == pytest.approx(100 * accuracy, abs=100 / train.num_examples)


def test_bad_input_is_one_line_and_exit_2(surfaces, tmp_path):
    plane = surfaces[0]
    out = tmp_path / "tg.h5"
    result = invoke("export", plane, "--format", "tg", "--out", out)
    assert result.exit_code == 0 and result.output.strip() == str(out)
    for args, words in (((plane, "--format", "tg", "--out", out), "--overwrite"),
                        ((plane, "--format", "vtk", "--out", tmp_path / "a.h5"), "unknown export format 'vtk'"),
                        ((tmp_path / "missing.h5", "--format", "tg"), "does not exist")):
        result = invoke("export", *args)
        assert result.exit_code == 2 and words in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    write_group(tmp_path / "other.h5", "hessian", {"eigenvalues": np.ones(2)}, {})
    result = invoke("export", tmp_path / "other.h5", "--format", "tg")
    assert result.exit_code == 2 and "no /surface" in result.output and len(result.output.strip().splitlines()) == 1
    assert not default_path(tmp_path / "other.h5", "tg").exists()
    before = out.stat().st_mtime_ns
    assert invoke("export", plane, "--format", "tg", "--out", out, "--overwrite").exit_code == 0
    assert out.stat().st_mtime_ns >= before and list(tmp_path.glob(".*tmp*")) == []
    with pytest.raises(LandscapeError, match="results file itself"):
        export(plane, "tg", plane, overwrite=True)


def test_default_output_name_help_and_registry():
    assert default_path("runs/sam.h5", "tg").as_posix() == "runs/sam_tg.h5"
    assert default_path("runs/sam.h5", "vtp").as_posix() == "runs/sam.vtp"
    assert default_path("runs/sam.h5", "csv").as_posix() == "runs/sam.csv"
    assert {"tg", "vtp", "csv", "npz"} <= set(FORMATS)
    result = invoke("export", "--help")
    assert result.exit_code == 0 and "landscape export " in result.output and "Python:" in result.output
    assert all(f"{name}:" in result.output for name in ("tg", "vtp", "csv", "npz"))
    assert "--format vtp" in result.output and "Threshold" in result.output


# ------------------------------------------------------------------------------- vtp, csv, npz (synthetic)

PLANE_X = np.array([-1.0, -0.3, 0.1 / 3, 0.5, 1.0])      # 5 x 3, values not exact in decimal
PLANE_Y = np.array([-0.4, 0.2, 0.7])


@pytest.fixture
def stored(tmp_path):
    """A synthetic 5 x 3 /surface (train and test; a NaN and an inf point; trajectories; directions),
    a 1-D /surface and an /interpolation, with the arrays written into them."""
    rng = np.random.default_rng(0)
    shape = (len(PLANE_X), len(PLANE_Y))
    arrays = {"xcoordinates": PLANE_X, "ycoordinates": PLANE_Y,
              "train_loss": rng.uniform(0.01, 3.0, shape), "test_loss": rng.uniform(0.01, 3.0, shape),
              "train_acc": rng.uniform(0, 1, shape), "test_acc": rng.uniform(0, 1, shape).astype(np.float32),
              "done": np.ones(shape, dtype=bool), "xdirection": np.ones(7, np.float32),
              "ydirection": np.ones(7, np.float32), "trajectory_x": np.array([0.5, 0.2, 0.0, -0.5, 0.0]),
              "trajectory_y": np.array([0.4, 0.1, 0.0, 0.3, 0.0]), "trajectory_path": np.array([0, 0, 0, 1, 1]),
              "trajectory_loss": np.array([1.0, 0.5, 0.1, 0.9, 0.1])}
    arrays["train_loss"][1, 2] = np.nan
    arrays["train_loss"][3, 0] = np.inf
    arrays["test_loss"][1, 2] = np.nan
    plane = tmp_path / "plane.h5"
    write_group(plane, "surface", arrays, {"trajectory_labels": ["sgd", "sam"]})
    line = {"xcoordinates": PLANE_X, "train_loss": np.array([2.0, 1.0, 0.25, np.nan, 3.0]),
            "train_acc": np.array([0.1, 0.5, 0.9, 0.0, 0.2]), "xdirection": np.ones(5, np.float32)}
    write_group(tmp_path / "line.h5", "surface", line, {})
    interpolation = {"alphas": np.linspace(-0.5, 1.5, 9), "train_loss": rng.uniform(0, 2, 9),
                     "train_acc": rng.uniform(0, 1, 9), "done": np.ones(9, dtype=bool)}
    write_group(plane, "interpolation", interpolation, {})
    return plane, arrays, tmp_path / "line.h5", line, interpolation


def read_vtp(path) -> tuple[ET.Element, dict[str, np.ndarray]]:
    """The ``<Piece>`` and every ``<DataArray>`` (keyed "<parent tag>/<Name>") parsed back from ASCII."""
    root = ET.parse(path).getroot()
    assert root.tag == "VTKFile" and root.get("type") == "PolyData"
    piece = root.find("PolyData/Piece")
    arrays = {}
    for parent in piece:
        for element in parent.findall("DataArray"):
            assert element.get("format") == "ascii"
            cast = float if element.get("type").startswith("Float") else int
            arrays[f"{parent.tag}/{element.get('Name')}"] = np.array([cast(t) for t in element.text.split()])
    return piece, arrays


def test_vtp_holds_the_grid_as_quads_with_the_stored_arrays(stored, tmp_path):
    plane, arrays, *_ = stored
    out = export(plane, "vtp", tmp_path / "plane.vtp")
    piece, data = read_vtp(out)
    nx, ny = len(PLANE_X), len(PLANE_Y)
    assert int(piece.get("NumberOfPoints")) == nx * ny
    assert int(piece.get("NumberOfPolys")) == (nx - 1) * (ny - 1)
    assert [int(piece.get(f"NumberOf{k}")) for k in ("Verts", "Lines", "Strips")] == [0, 0, 0]
    points = data["Points/Points"].reshape(-1, 3)
    expected_xy = [(PLANE_X[i], PLANE_Y[j]) for i in range(nx) for j in range(ny)]   # stored (x, y) order
    assert [tuple(p) for p in points[:, :2]] == expected_xy
    loss = arrays["train_loss"]
    for k, (i, j) in enumerate((i, j) for i in range(nx) for j in range(ny)):
        top = np.nanmax(np.where(np.isfinite(loss), loss, np.nan))
        assert points[k, 2] == (loss[i, j] if np.isfinite(loss[i, j]) else top)
        assert data["PointData/z"][k] == points[k, 2]
        assert data["PointData/divergent"][k] == (0 if np.isfinite(loss[i, j]) else 1)
    for name in ("train_loss", "test_loss", "train_acc", "test_acc", "done"):
        np.testing.assert_array_equal(data[f"PointData/{name}"], arrays[name].ravel().astype(np.float64))
    assert not any(name.endswith(("direction", "trajectory_x")) for name in data)
    connectivity, offsets = data["Polys/connectivity"], data["Polys/offsets"]
    assert list(offsets) == [4 * (c + 1) for c in range((nx - 1) * (ny - 1))]
    assert connectivity.min() >= 0 and connectivity.max() < nx * ny
    cells = set()
    for quad in connectivity.reshape(-1, 4):
        corners = [divmod(int(p), ny) for p in quad]                       # (i, j) of each corner
        i, j = min(corners)
        assert corners == [(i, j), (i + 1, j), (i + 1, j + 1), (i, j + 1)], corners
        xy = points[quad, :2]                                             # counter-clockwise seen from +z
        assert 0.5 * np.sum(xy[:, 0] * np.roll(xy[:, 1], -1) - np.roll(xy[:, 0], -1) * xy[:, 1]) > 0
        cells.add((i, j))
    assert cells == {(i, j) for i in range(nx - 1) for j in range(ny - 1)}


def test_vtp_log_zmax_and_metric_follow_h52vtp(stored, tmp_path):
    plane, arrays, *_ = stored
    out = export(plane, "vtp", tmp_path / "plane.vtp", metric="test_loss", log=True, zmax=1.5)
    _, data = read_vtp(out)
    stored_z = arrays["test_loss"].ravel()
    clipped = np.where(np.isfinite(stored_z), np.minimum(stored_z, 1.5), 1.5)
    expected = np.log(clipped + 0.1)                    # h52vtp.py: z[z > zmax] = zmax; np.log(z + 0.1)
    np.testing.assert_allclose(data["Points/Points"].reshape(-1, 3)[:, 2], expected, rtol=1e-15, atol=0)
    assert list(data["PointData/divergent"]) == list((~np.isfinite(stored_z)).astype(int))
    np.testing.assert_array_equal(data["PointData/train_loss"], arrays["train_loss"].ravel())


def test_vtp_draws_a_1d_surface_as_one_line(stored, tmp_path):
    *_, line_file, line, _ = stored
    piece, data = read_vtp(export(line_file, "vtp", tmp_path / "line.vtp"))
    assert (piece.get("NumberOfPoints"), piece.get("NumberOfLines"), piece.get("NumberOfPolys")) == ("5", "1", "0")
    points = data["Points/Points"].reshape(-1, 3)
    np.testing.assert_array_equal(points[:, 0], PLANE_X)
    assert list(points[:, 1]) == [0.0] * 5 and list(points[:, 2]) == [2.0, 1.0, 0.25, 3.0, 3.0]
    assert list(data["Lines/connectivity"]) == [0, 1, 2, 3, 4] and list(data["Lines/offsets"]) == [5]
    np.testing.assert_array_equal(data["PointData/train_loss"], line["train_loss"])


def read_csv(path) -> tuple[list[str], np.ndarray]:
    with open(path, newline="") as handle:
        header, *rows = list(csv.reader(handle))
    return header, np.array([[float(cell) for cell in row] for row in rows])


def test_csv_rows_are_grid_points_with_every_stored_array_exactly(stored, tmp_path):
    plane, arrays, _, _, interpolation = stored
    header, table = read_csv(export(plane, "csv", tmp_path / "plane.csv"))
    values = ["done", "test_acc", "test_loss", "train_acc", "train_loss"]
    assert header[:2] == ["x", "y"] and sorted(header[2:]) == values
    nx, ny = len(PLANE_X), len(PLANE_Y)
    assert table.shape == (nx * ny, 2 + len(values))
    assert [tuple(row) for row in table[:, :2]] == [(PLANE_X[i], PLANE_Y[j]) for i in range(nx) for j in range(ny)]
    for name in values:
        column = table[:, header.index(name)]
        np.testing.assert_array_equal(column.astype(arrays[name].dtype).reshape(nx, ny), arrays[name])
    header, table = read_csv(export(plane, "csv", tmp_path / "interp.csv", group="interpolation"))
    assert header[0] == "alpha" and sorted(header[1:]) == ["done", "train_acc", "train_loss"]
    np.testing.assert_array_equal(table[:, 0], interpolation["alphas"])
    for name in header[1:]:
        np.testing.assert_array_equal(table[:, header.index(name)].astype(interpolation[name].dtype), interpolation[name])


def test_npz_holds_the_stored_arrays_under_their_names(stored, tmp_path):
    plane, arrays, _, _, interpolation = stored
    with np.load(export(plane, "npz", tmp_path / "plane.npz"), allow_pickle=False) as npz:
        assert set(npz.files) == set(arrays) - {"xdirection", "ydirection"} | {"trajectory_labels"}
        for name in set(arrays) - {"xdirection", "ydirection"}:
            assert npz[name].dtype == arrays[name].dtype and np.array_equal(npz[name], arrays[name], equal_nan=True)
        assert list(npz["trajectory_labels"]) == ["sgd", "sam"]
    assert (tmp_path / "plane.npz").exists() and not list(tmp_path.glob("*.npz.npz"))
    with np.load(export(plane, "npz", tmp_path / "interp.npz", group="interpolation")) as npz:
        assert set(npz.files) == set(interpolation)
        assert all(np.array_equal(npz[name], interpolation[name]) for name in interpolation)


def test_new_formats_refuse_bad_input_in_one_line(stored, tmp_path):
    plane, *_ = stored
    write_group(tmp_path / "other.h5", "hessian", {"eigenvalues": np.ones(2)}, {})
    nan_plane = tmp_path / "nan.h5"
    write_group(nan_plane, "surface", {"xcoordinates": PLANE_X, "ycoordinates": PLANE_Y,
                                       "train_loss": np.full((5, 3), np.nan)}, {})
    (tmp_path / "taken.vtp").write_text("keep")
    for args, words in (((tmp_path / "other.h5", "--format", "vtp"), "no /surface"),
                        ((tmp_path / "other.h5", "--format", "csv"), "no /surface"),
                        ((plane, "--format", "vtp", "--out", tmp_path / "taken.vtp"), "--overwrite"),
                        ((plane, "--format", "csv", "--log"), "--log does not apply to --format csv"),
                        ((plane, "--format", "vtp", "--group", "interpolation"), "--group does not apply"),
                        ((plane, "--format", "vtp", "--zmax", "-1"), "--zmax must be a positive"),
                        ((plane, "--format", "vtp", "--metric", "eval_loss"), "no eval_loss"),
                        ((nan_plane, "--format", "vtp"), "every point of the surface is divergent")):
        result = invoke("export", *args)
        assert result.exit_code == 2 and words in result.output, (args, result.output)
        assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert (tmp_path / "taken.vtp").read_text() == "keep"
    assert list(tmp_path.glob(".*tmp*")) == [] and not list(tmp_path.glob("other_*"))
