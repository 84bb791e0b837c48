"""Optimizer trajectories: snapshots along training (resumable), PCA directions against numpy's SVD, exact
projections, surfaces on the PCA plane against hand-built perturbed models, and the CLI's refusals."""

from __future__ import annotations

import copy
import json

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from clitools import assert_input_error, invoke
from ddp_worker import Interrupted, StepCounter
from helpers import assert_close, make_model

from landscape.analysis.surface import pca_surface
from landscape.checkpoint import load_checkpoint, save_checkpoint
from landscape.data import eval_subset
from landscape.errors import LandscapeError
from landscape.models import build_model
from landscape.objective import Objective
from landscape.store import read_group
from landscape.train import state_path, train_model
from landscape.trajectory import GROUP, Trajectory, TrajectoryWriter, load_trajectory, parse_schedule, pca_plane

SHAPES = {"a.weight": (6, 5), "a.bias": (6,), "b.weight": (4, 6)}  # 30 + 6 + 24 entries; a.bias is 1-D


def synthetic(rows: np.ndarray, names=tuple(SHAPES), label: str = "path") -> Trajectory:
    """An in-memory trajectory of the float32 ``rows`` (n, d) laid out as ``SHAPES``."""
    return Trajectory(label, list(names), [SHAPES[n] for n in names], np.arange(len(rows)), {"label": label},
                      rows.astype(np.float32))


def reference(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=generator, dtype=torch.float64) for n, s in SHAPES.items()}


def flat(tensors) -> np.ndarray:
    return np.concatenate([np.asarray(t, dtype=np.float64).reshape(-1) for t in tensors])


def moving_columns(include_biasbn: bool) -> np.ndarray:
    """Which flat columns take part in the PCA: weights with two or more dimensions (and biases if asked)."""
    return flat([np.full(s, include_biasbn or len(s) >= 2, dtype=float) for s in SHAPES.values()]).astype(bool)


def numpy_pca(rows: np.ndarray, ref: np.ndarray, columns: np.ndarray):
    """The reference: centred PCA of rows - ref on ``columns`` by numpy.linalg.svd; (directions (2, d), ratios,
    least-squares coordinates (n, 2))."""
    differences = (rows.astype(np.float32).astype(np.float64) - ref)[:, columns]
    centred = differences - differences.mean(axis=0)
    _, singular, vt = np.linalg.svd(centred, full_matrices=False)
    directions = np.zeros((2, len(ref)))
    directions[:, columns] = vt[:2]
    coordinates = np.linalg.lstsq(vt[:2].T, differences.T, rcond=None)[0].T
    return directions, singular[:2] ** 2 / np.sum(singular ** 2), coordinates


def path_rows(ref: np.ndarray, count: int, seed: int) -> np.ndarray:
    """A path towards ``ref``: large moves along two random directions and small ones along every other."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.normal(size=(len(ref), 3)))[0].T
    scales = np.array([4.0, 1.5, 0.3])
    coefficients = rng.normal(size=(count, 3)) * scales + np.linspace(3, 0, count)[:, None]
    return ref + coefficients @ basis + 1e-3 * rng.normal(size=(count, len(ref)))


@pytest.mark.parametrize("include_biasbn", [False, True])
def test_pca_directions_and_projections_match_numpy_svd(include_biasbn):
    ref = reference()
    base = flat(ref.values())
    first, second = path_rows(base, 9, seed=1), path_rows(base, 7, seed=2)
    plane = pca_plane([synthetic(first, label="sgd"), synthetic(second, label="sam")], ref, include_biasbn)
    columns = moving_columns(include_biasbn)
    stacked = np.vstack([first, second])
    directions, ratio, coordinates = numpy_pca(stacked, base, columns)
    ours = np.stack([flat(d.values()) for d in plane.directions])
    for k in range(2):
        sign = np.sign(ours[k] @ directions[k])
        assert_close(ours[k], sign * directions[k], 1e-9, f"direction {k + 1}", atol=1e-12)
        assert_close(np.concatenate(plane.coordinates)[:, k], sign * coordinates[:, k], 1e-9,
                     f"coordinate {k + 1}", atol=1e-12)
    assert_close(np.linalg.norm(ours, axis=1), 1.0, 1e-12, "unit directions (not filter-normalised)")
    assert not ours[:, ~columns].any(), "parameters that do not take part stay put"
    assert_close(plane.explained_variance_ratio, ratio, 1e-9, "explained variance ratio")
    assert [len(c) for c in plane.coordinates] == [9, 7]
    assert (plane.coordinates[0][0] <= 0).all(), "the first path starts at negative x and y"
    assert plane.digests[0] != plane.digests[1]


def test_projection_of_points_in_the_plane_is_exact():
    ref = reference(3)
    base = flat(ref.values())
    rng = np.random.default_rng(0)
    e1, e2 = (np.where(moving_columns(False), rng.integers(-4, 5, len(base)) / 8, 0.0) for _ in range(2))
    a, b = rng.integers(-8, 9, 12) / 4, rng.integers(-8, 9, 12) / 4  # dyadic: exact in float32
    rows = np.round(base * 64) / 64 + a[:, None] * e1 + b[:, None] * e2
    exact = {n: torch.from_numpy(v) for n, v in zip(SHAPES, np.split(np.round(base * 64) / 64, [30, 36]))}
    exact = {n: exact[n].view(SHAPES[n]) for n in SHAPES}
    plane = pca_plane([synthetic(rows)], exact)
    (coordinates,) = plane.coordinates
    d1, d2 = (flat(d.values()) for d in plane.directions)
    rebuilt = flat(exact.values()) + coordinates[:, :1] * d1 + coordinates[:, 1:] * d2
    assert_close(rebuilt, rows, 0, "w + x d1 + y d2 rebuilds every snapshot", atol=1e-12)


def test_snapshots_spanning_one_direction_and_mismatched_trajectories_are_refused():
    ref = reference()
    base = flat(ref.values())
    line = base + np.linspace(0, 1, 5)[:, None] * np.where(moving_columns(False), 1.0, 0.0)
    with pytest.raises(LandscapeError, match="fewer than two directions"):
        pca_plane([synthetic(line)], ref)
    other = Trajectory("mlp", ["a.weight", "c.weight"], [(6, 5), (4, 6)], np.arange(3), {"path": "x.h5"},
                       np.zeros((3, 54), np.float32))
    with pytest.raises(LandscapeError, match=r"missing: a.bias, b.weight; not in the model: c.weight"):
        pca_plane([other], ref)


# -- surfaces on the PCA plane ----------------------------------------------------------------------------

def perturbed(model: torch.nn.Module, moves: dict[str, torch.Tensor]) -> torch.nn.Module:
    """An independent float64 copy of ``model`` with ``moves`` added to its parameters."""
    moved = copy.deepcopy(model).double()
    state = moved.state_dict()
    moved.load_state_dict({n: t + moves[n] if n in moves else t for n, t in state.items()})
    return moved.eval()


def plain_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        out = model(x)
    return float(F.cross_entropy(out, y)), float((out.argmax(1) == y).double().mean())


def test_pca_surface_equals_hand_built_perturbed_models(digits):
    x, y, _ = eval_subset(*digits.split("train"), 96, 0)
    x = x.double()
    model = make_model("cnn")
    objective = Objective(model, x, y, dtype=torch.float64, batch_size=32)
    names = list(objective.params)
    base = flat(p.detach() for p in objective.params.values())
    rng = np.random.default_rng(5)
    rows = base + np.linspace(0.6, 0, 8)[:, None] * rng.normal(size=(1, len(base))) * 0.3 \
        + 0.05 * rng.normal(size=(8, len(base)))
    shapes = [tuple(p.shape) for p in objective.params.values()]
    path = Trajectory("sgd", names, shapes, np.arange(8) * 3, {"label": "sgd"}, rows.astype(np.float32))
    xs, ys = np.array([-1.5, -0.4, 0.5]), np.array([-0.3, 0.2])
    result = pca_surface(objective, [path], xs, ys)

    columns = flat(np.full(s, len(s) >= 2, dtype=float) for s in shapes).astype(bool)
    directions, ratio, coordinates = numpy_pca(rows, base, columns)
    stored = np.stack([np.asarray(result["xdirection"], np.float64), np.asarray(result["ydirection"], np.float64)])
    signs = np.sign(np.sum(stored * directions, axis=1))
    d1, d2 = (dict(zip(names, np.split(signs[k] * directions[k], np.cumsum([int(np.prod(s)) for s in shapes])[:-1])))
              for k in range(2))

    def moves(a: float, b: float) -> dict[str, torch.Tensor]:
        return {n: torch.from_numpy(a * d1[n] + b * d2[n]).view(s) for n, s in zip(names, shapes)}
    expected = np.array([[plain_loss(perturbed(model, moves(a, b)), x, y) for b in ys] for a in xs])
    assert_close(result["train_loss"], expected[..., 0], 1e-9, "loss on the PCA plane (x along axis 0)")
    assert_close(result["train_acc"], expected[..., 1], 1e-12, "accuracy on the PCA plane")
    assert_close(result["trajectory_x"], signs[0] * coordinates[:, 0], 1e-9, "projected x")
    assert_close(result["trajectory_y"], signs[1] * coordinates[:, 1], 1e-9, "projected y")
    at_path = [plain_loss(perturbed(model, moves(a, b)), x, y)[0]
               for a, b in zip(result["trajectory_x"], result["trajectory_y"])]
    assert_close(result["trajectory_loss"], at_path, 1e-9, "loss at the projected points")
    assert list(result["trajectory_path"]) == [0] * 8 and list(result["trajectory_step"]) == list(range(0, 24, 3))
    assert result.attrs["trajectory_labels"] == ["sgd"]
    assert_close(result.attrs["explained_variance_ratio"], ratio, 1e-9, "explained variance ratio")
    assert "explained variance ratio" in result.summary()
    figure = result.plot()   # the plane's axes name the components and the share of variance each explains
    labels = {ax.get_xlabel() for ax in figure.axes} | {ax.get_ylabel() for ax in figure.axes}
    assert f"x (PC1, {100 * ratio[0]:.1f}% of variance)" in labels
    assert f"y (PC2, {100 * ratio[1]:.1f}% of variance)" in labels


def test_covering_grid_spans_every_path_and_the_origin_with_a_margin(digits):
    x, y, _ = eval_subset(*digits.split("train"), 32, 0)
    objective = Objective(make_model("mlp"), x, y)
    base = flat(p.detach() for p in objective.params.values())
    rng = np.random.default_rng(1)
    shapes = [tuple(p.shape) for p in objective.params.values()]
    paths = [Trajectory(label, list(objective.params), shapes, np.arange(6), {"label": label},
                        (base + rng.normal(size=(6, len(base))) * scale).astype(np.float32))
             for label, scale in (("sgd", 0.2), ("sam", 0.05))]
    result = pca_surface(objective, paths, 5, 4)
    points = np.column_stack([result["trajectory_x"], result["trajectory_y"]])
    low, high = np.minimum(points.min(axis=0), 0), np.maximum(points.max(axis=0), 0)
    span = 1.4 * np.max(high - low)
    for axis, name, count in ((0, "xcoordinates", 5), (1, "ycoordinates", 4)):
        grid = result[name]
        assert len(grid) == count
        assert_close([grid[0], grid[-1]], [(low[axis] + high[axis] - span) / 2, (low[axis] + high[axis] + span) / 2],
                     1e-12, name, atol=1e-12)
    assert list(result["trajectory_path"]) == [0] * 6 + [1] * 6 and result.attrs["trajectory_labels"] == ["sgd", "sam"]


def test_an_interrupted_pca_surface_resumes_to_the_same_bits_and_refuses_another_trajectory(digits, tmp_path):
    x, y, _ = eval_subset(*digits.split("train"), 64, 0)
    objective = Objective(make_model("mlp"), x, y)
    base = flat(p.detach() for p in objective.params.values())
    shapes = [tuple(p.shape) for p in objective.params.values()]
    rng = np.random.default_rng(2)
    path, other = (Trajectory("sgd", list(objective.params), shapes, np.arange(5), {"label": "sgd"},
                              (base + rng.normal(size=(5, len(base))) * 0.1).astype(np.float32)) for _ in range(2))
    options = {"evaluator_options": {"stack_points": 2}, "flush_seconds": 0}
    whole = pca_surface(objective, [path], 4, 3, out=tmp_path / "whole.h5", **options)

    def stop(done: int, total: int) -> None:
        if 0 < done < total:
            raise Interrupted
    with pytest.raises(Interrupted):
        pca_surface(objective, [path], 4, 3, out=tmp_path / "part.h5", progress=stop, **options)
    with pytest.raises(LandscapeError, match=r"cannot resume .* options differ \(trajectories, x, y\)"):
        pca_surface(objective, [other], 4, 3, out=tmp_path / "part.h5", resume=True, **options)
    resumed = pca_surface(objective, [path], 4, 3, out=tmp_path / "part.h5", resume=True, **options)
    assert whole.arrays.keys() == resumed.arrays.keys()
    for name, values in whole.arrays.items():
        assert np.array_equal(values, resumed.arrays[name], equal_nan=True), name


# -- recording along training -----------------------------------------------------------------------------

def read_rows(path) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    with h5py.File(path, "r") as handle:
        group = handle[GROUP]
        return group["weights"][()], group["step"][()], group["done"][()], dict(group.attrs)


def initial_weights(width: int = 4) -> np.ndarray:
    torch.manual_seed(0)
    model = build_model("cnn", num_classes=10, input_shape=[1, 8, 8], width=width)
    return flat(p.detach() for p in model.parameters())


def test_schedules():
    assert parse_schedule(1).steps(6, 18) == [0, 6, 12, 18]
    assert parse_schedule("2epochs").steps(6, 18) == [0, 12, 18]
    assert parse_schedule("4steps").steps(6, 18) == [0, 4, 8, 12, 16, 18]
    assert str(parse_schedule(" 50Steps")) == "50steps" and str(parse_schedule("1epoch")) == "1epoch"


def test_a_killed_and_resumed_run_records_every_snapshot_once(tmp_path, digits):
    options = {"epochs": 3, "batch_size": 256, "arch_kwargs": {"width": 4}}  # 6 steps per epoch
    whole = tmp_path / "whole_trajectory.h5"
    uninterrupted = train_model(digits, "cnn", "sgd", callbacks=[TrajectoryWriter(whole, "4steps")], **options)
    weights, steps, done, attrs = read_rows(whole)
    assert list(steps) == [0, 4, 8, 12, 16, 18] and done.all() and attrs["rows"] == 6
    assert_close(weights[0], initial_weights(), 0, "snapshot 0: the initial weights")
    assert_close(weights[-1], flat(p.detach() for p in uninterrupted.model.parameters()), 0, "the final weights")
    with pytest.raises(LandscapeError, match="already exists; pass --overwrite"):
        train_model(digits, "cnn", "sgd", callbacks=[TrajectoryWriter(whole, "4steps")], **options)

    out, path = tmp_path / "run.pt", tmp_path / "run_trajectory.h5"
    with pytest.raises(Interrupted):  # dies at step 9, after the snapshot of step 8, in epoch 2
        train_model(digits, "cnn", "sgd", out=str(out), **options,
                    callbacks=[TrajectoryWriter(path, "4steps"), StepCounter(interrupt_at=9)])
    assert list(read_rows(path)[2]) == [True, True, True, False, False, False]  # steps 0, 4, 8
    assert torch.load(state_path(out), weights_only=True)["callbacks"][0] == {"rows": 2}  # state of epoch 1
    with pytest.raises(LandscapeError, match=r"every 4steps of 18 steps, this run takes them every 3steps of 18; "
                                             r"rerun with --save-every 4steps"):
        train_model(digits, "cnn", "sgd", out=str(out), resume=True, **options,
                    callbacks=[TrajectoryWriter(path, "3steps", resume=True), StepCounter()])
    with pytest.raises(Interrupted):  # resumed from step 6, dies again at step 7: step 8's row is not the run's
        train_model(digits, "cnn", "sgd", out=str(out), resume=True, **options,
                    callbacks=[TrajectoryWriter(path, "4steps", resume=True), StepCounter(interrupt_at=7)])
    assert list(read_rows(path)[2]) == [True, True, False, False, False, False]
    train_model(digits, "cnn", "sgd", out=str(out), resume=True, **options,
                callbacks=[TrajectoryWriter(path, "4steps", resume=True), StepCounter()])
    resumed_weights, resumed_steps, resumed_done, _ = read_rows(path)
    assert list(resumed_steps) == list(steps) and resumed_done.all(), "no duplicate, no missing snapshot"
    assert np.array_equal(resumed_weights, weights), "the resumed trajectory is the uninterrupted one, bit for bit"
    loaded = load_trajectory(path, dict(load_checkpoint(out).model.named_parameters()))
    assert loaded.rows == 6 and loaded.label == "run_trajectory" and list(loaded.steps) == list(steps)


# -- the command line ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny digits cnn runs (width 2, 2 epochs of 12 steps) with a snapshot every 6 steps, and an mlp run."""
    folder = tmp_path_factory.mktemp("runs")
    for name, optimizer, arch in (("sgd", "sgd", "cnn"), ("sam", "sam", "cnn"), ("mlp", "sgd", "mlp")):
        kwargs = '{"width": 2}' if arch == "cnn" else '{"hidden": [8]}'
        result = invoke("train", "--optimizer", optimizer, "--arch", arch, "--arch-kwargs", kwargs, "--epochs", 2,
                        "--save-every", "6steps", "--out", folder / f"{name}.pt")
        assert result.exit_code == 0, result.output
        assert f"trajectory: 5 snapshots (every 6steps) -> {folder / name}_trajectory.h5" in result.output
    return folder


def test_trajectory_command_draws_both_paths_on_one_plane_and_refuses_another_on_resume(runs, tmp_path):
    out = tmp_path / "paths.h5"
    arguments = ["trajectory", runs / "sgd_trajectory.h5", runs / "sam_trajectory.h5", "--labels", "SGD,SAM",
                 "--x", "auto:3", "--y", "auto:3", "--subset", 64, "--out", out]
    result = invoke(*arguments)
    assert result.exit_code == 0, result.output
    assert "PCA directions of SGD, SAM: explained variance ratio" in result.output and "2 paths" in result.output
    arrays, attrs = read_group(out, "surface")
    assert attrs["checkpoint"] == str(runs / "sgd.pt"), "the first trajectory's final checkpoint is the origin"
    assert list(arrays["trajectory_path"]) == [0] * 5 + [1] * 5 and attrs["trajectory_labels"] == ["SGD", "SAM"]
    assert list(arrays["trajectory_step"]) == [0, 6, 12, 18, 24] * 2
    assert abs(arrays["trajectory_x"][4]) < 1e-6 and abs(arrays["trajectory_y"][4]) < 1e-6, "SGD ends at the origin"
    assert arrays["trajectory_x"][0] == arrays["trajectory_x"][5], "both runs start from the same initial weights"
    assert [t["path"] for t in attrs["config"]["trajectories"]] == \
        [str(runs / f"{n}_trajectory.h5") for n in ("sgd", "sam")]
    again = invoke(*arguments, "--resume")
    assert again.exit_code == 0 and again.output.splitlines()[-1] == result.output.splitlines()[-1]
    swapped = invoke("trajectory", runs / "sam_trajectory.h5", runs / "sgd_trajectory.h5", "--final", runs / "sgd.pt",
                     "--labels", "SGD,SAM", "--x", "auto:3", "--y", "auto:3", "--subset", 64, "--out", out, "--resume")
    assert_input_error(swapped, "cannot resume", "trajectories")


def test_surface_with_pca_directions_of_a_glob_of_foreign_checkpoints(runs, tmp_path):
    with h5py.File(runs / "sgd_trajectory.h5", "r") as handle:
        weights = handle[GROUP]["weights"][()]
        names = json.loads(handle[GROUP].attrs["names"])
    model = load_checkpoint(runs / "sgd.pt").model
    folder = tmp_path / "ckpts"
    folder.mkdir()
    shapes = [p.shape for p in model.parameters()]
    for row, epoch in zip(weights, (0, 2, 5, 9, 10)):  # natural order: epoch_9 before epoch_10
        tensors = np.split(row, np.cumsum([int(np.prod(s)) for s in shapes])[:-1])
        state = {**{f"module.{n}": torch.from_numpy(t.copy()).view(s) for n, t, s in zip(names, tensors, shapes)},
                 **{f"module.{n}": b for n, b in model.named_buffers()}}
        torch.save({"state_dict": state}, folder / f"epoch_{epoch}.pt")
    from_file = invoke("surface", runs / "sgd.pt", "--directions", f"pca:{runs / 'sgd_trajectory.h5'}",
                       "--x", "auto:3", "--y", "auto:3", "--subset", 64, "--out", tmp_path / "file.h5")
    from_glob = invoke("surface", runs / "sgd.pt", "--directions", f"pca:{folder}/epoch_*.pt",
                       "--x", "auto:3", "--y", "auto:3", "--subset", 64, "--out", tmp_path / "glob.h5")
    assert from_file.exit_code == 0 and from_glob.exit_code == 0, from_file.output + from_glob.output
    (file_arrays, file_attrs), (glob_arrays, glob_attrs) = (read_group(tmp_path / n, "surface")
                                                            for n in ("file.h5", "glob.h5"))
    for name in ("trajectory_x", "trajectory_y", "train_loss", "xdirection", "ydirection"):
        assert np.array_equal(file_arrays[name], glob_arrays[name]), name
    assert list(glob_arrays["trajectory_step"]) == [-1] * 5
    assert glob_attrs["config"]["trajectories"][0]["checkpoints"][-2:] == [str(folder / "epoch_9.pt"),
                                                                            str(folder / "epoch_10.pt")]
    assert glob_attrs["config"]["trajectories"][0]["sha256"] == file_attrs["config"]["trajectories"][0]["sha256"]


def test_bad_trajectories_are_one_line_with_exit_code_2(runs, tmp_path):
    checkpoint = runs / "sgd.pt"
    wide = tmp_path / "wide.pt"
    kwargs = {"num_classes": 10, "input_shape": [1, 8, 8], "width": 3}
    save_checkpoint(wide, build_model("cnn", **kwargs), arch="cnn", arch_kwargs=kwargs, dataset="digits",
                    optimizer="sgd", optimizer_hparams={}, metrics={}, seed=0)
    common = ["--x", "auto:3", "--y", "auto:3", "--subset", 32, "--out", tmp_path / "bad.h5"]
    assert_input_error(invoke("trajectory", checkpoint, "--final", checkpoint, *common), "is one checkpoint",
                       "quote a glob")
    assert_input_error(invoke("trajectory", f"{checkpoint},{wide}", "--final", checkpoint, *common),
                       f"checkpoint {wide}", "not of the model's architecture")
    assert_input_error(invoke("trajectory", runs / "mlp_trajectory.h5", "--final", checkpoint, *common),
                       "does not match the parameters of the model of", "missing: 0.weight")
    assert_input_error(invoke("trajectory", runs / "sgd_trajectory.h5", runs / "sam_trajectory.h5", "--labels", "a",
                              *common), "--labels gives 1 label(s) for 2 trajectories")
    assert_input_error(invoke("trajectory", f"{checkpoint},{checkpoint},{checkpoint}", "--final", checkpoint, *common),
                       "span fewer than two directions")
    assert_input_error(invoke("trajectory", tmp_path / "nothing*.pt", "--final", checkpoint, *common),
                       "no checkpoint found")
    assert_input_error(invoke("trajectory", tmp_path / "bad.h5", "--final", checkpoint, *common), "no checkpoint found")
    pca = f"pca:{runs / 'sgd_trajectory.h5'}"
    assert_input_error(invoke("surface", checkpoint, "--directions", pca, "--orthogonal", *common),
                       "--orthogonal does not apply to PCA directions")
    assert_input_error(invoke("surface", checkpoint, "--directions", "pcb", *common),
                       "--directions takes random or pca")
    assert_input_error(invoke("train", "--save-every", "0", "--out", tmp_path / "x.pt"), "--save-every takes N")
    assert_input_error(invoke("train", "--save-every", "2days", "--out", tmp_path / "x.pt"), "--save-every takes N")
    assert_input_error(invoke("train", "--trajectory", tmp_path / "t.h5", "--out", tmp_path / "x.pt"),
                       "pass --save-every K too")
    results = tmp_path / "results.h5"
    results.write_bytes((runs / "sgd_trajectory.h5").read_bytes())
    with h5py.File(results, "a") as handle:
        handle.move(GROUP, "other")
    assert_input_error(invoke("trajectory", results, "--final", checkpoint, *common), "is not a trajectory file")
