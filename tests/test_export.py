"""``landscape export --format tg``: files that Li et al.'s loss-landscape scripts read.

Their reading rules are written out here (tomgoldstein/loss-landscape): ``plot_2D.py`` reads
``xcoordinates``, ``ycoordinates`` and the surface at the file's root and pairs it with
``X, Y = np.meshgrid(x, y)``; ``h52vtp.py`` ravels that meshgrid and the values side by side;
``plot_1D.py`` reads ``xcoordinates``, ``train_loss``, ``train_acc`` (percent) and optionally
``test_*``; ``h5_util.read_list`` reads a direction as the datasets ``"0"``, ``"1"``, ... of a group,
and ``net_plotter.set_weights`` moves each parameter (in ``net.parameters()`` order) by
``d0 * x + d1 * y``. The values they see are checked against losses recomputed at those weights.
"""

from __future__ import annotations

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
    assert "tg" in FORMATS
    result = invoke("export", "--help")
    assert result.exit_code == 0 and "landscape export " in result.output and "Python:" in result.output
    assert "tg:" in result.output
