"""Bad input that reaches the model: a dataset it cannot take, NaN/inf weights or data, bad training settings.

Each gives one line and exit code 2 (LandscapeError), except a surface or radius curve at NaN weights: a
valid measurement, stored as NaN with one warning line.
"""

from __future__ import annotations

import re
import types

import numpy as np
import pytest
import torch
from clitools import invoke

import landscape.train
from landscape.checkpoint import load_checkpoint, save_checkpoint
from landscape.data import Dataset
from landscape.engine.evaluator import PointEvaluator
from landscape.errors import LandscapeError
from landscape.models import build_model
from landscape.objective import Objective
from landscape.params import surface_directions
from landscape.store import read_group
from landscape.train import train_model

ANALYSES = {
    "surface": ["--1d", "--x", "-1:1:3"],
    "radius": ["--radii", "0.1:1:2", "--draws", "1"],
    "hessian": ["--top-k", "1"],
    "cosine": ["--rhos", "0,0.1", "--gammas2", "0", "--batches", "1", "--draws", "1", "--pga-steps", "1",
               "--batch-size", "16"],
    "ratio": ["--rhos", "0.1", "--batches", "1", "--batch-size", "16"],
}


@pytest.fixture(scope="module")
def files(tmp_path_factory, checkpoint):
    """npz datasets (40 examples each) and checkpoints: ``cnn`` (conftest's, digits), ``mlp`` (digits),
    ``nan`` (the cnn with one NaN weight)."""
    folder = tmp_path_factory.mktemp("bad")
    rng = np.random.default_rng(0)

    def images(*shape: int) -> np.ndarray:
        return rng.normal(size=(40, *shape)).astype(np.float32)

    labels = np.arange(40) % 10
    with_nan = images(1, 8, 8)
    with_nan[3, 0, 2, 2] = np.nan
    datasets = {"rgb": (images(3, 32, 32), labels), "flat": (images(64), labels), "big": (images(1, 16, 16), labels),
                "labels12": (images(1, 8, 8), np.arange(40) % 12), "nan": (with_nan, labels),
                "single": (images(1, 8, 8), np.zeros(40, dtype=np.int64))}
    paths = {"cnn": str(checkpoint)}
    for name, (x, y) in datasets.items():
        paths[name] = f"npz:{folder / name}.npz"
        np.savez(folder / f"{name}.npz", x=x, y=y)
    kwargs = {"num_classes": 10, "input_shape": [1, 8, 8], "hidden": [8]}
    paths["mlp"] = str(folder / "mlp.pt")
    save_checkpoint(paths["mlp"], build_model("mlp", **kwargs), arch="mlp", arch_kwargs=kwargs, dataset="digits",
                    optimizer="sgd", optimizer_hparams={}, metrics={}, seed=0)
    own = load_checkpoint(checkpoint)
    with torch.no_grad():
        own.model[0].weight[0, 0, 1, 1] = float("nan")
    paths["nan_weights"] = str(folder / "nan.pt")
    save_checkpoint(paths["nan_weights"], own.model, arch="cnn", arch_kwargs=own.meta["arch_kwargs"],
                    dataset="digits", optimizer="sgd", optimizer_hparams={}, metrics={}, seed=0)
    return paths


def one_line_error(result, out) -> str:
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1 and "Internal error" not in result.output, result.output
    assert not out.exists()
    return result.output


# -------------------------------------------------------------------------- a dataset the model cannot take

@pytest.mark.parametrize("command", list(ANALYSES))
@pytest.mark.parametrize("model, data, words", [
    ("cnn", "rgb", "the model (arch cnn, input_shape (1, 8, 8)) cannot take inputs of shape (3, 32, 32) from "
                   "dataset 'npz:"),
    ("cnn", "flat", "cannot take inputs of shape (64,)"),
    ("mlp", "big", "the model (arch mlp, input_shape (1, 8, 8)) cannot take inputs of shape (1, 16, 16)"),
    ("cnn", "labels12", "go from 0 to 11 but the model (arch cnn, input_shape (1, 8, 8)) has 10 outputs"),
])
def test_a_dataset_that_does_not_match_the_model_is_refused_in_one_line(files, tmp_path, command, model, data,
                                                                       words):
    out = tmp_path / "r.h5"
    result = invoke(command, files[model], "--data", files[data], *ANALYSES[command], "--out", out)
    message = one_line_error(result, out)
    assert words in message and "--arch" in message


def test_images_of_another_size_that_the_model_takes_are_accepted(files, tmp_path):
    result = invoke("surface", files["cnn"], "--data", files["big"], *ANALYSES["surface"], "--out", tmp_path / "r.h5")
    assert result.exit_code == 0, result.output  # the cnn pools adaptively: any image size fits


def test_objective_checks_its_evaluation_set_against_the_model():
    model = build_model("cnn", 10, (1, 8, 8), width=2)
    with pytest.raises(LandscapeError, match=r"the model cannot take inputs of shape \(3, 8, 8\) from the evaluation"):
        Objective(model, torch.zeros(4, 3, 8, 8), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(LandscapeError, match="labels of the evaluation set go from -1 to 3 but the model has 10"):
        Objective(model, torch.zeros(4, 1, 8, 8), torch.tensor([-1, 0, 1, 3]))
    ignored = torch.tensor([-100, 0, 1, 9])  # cross-entropy's ignore index is no class
    assert Objective(model, torch.zeros(4, 1, 8, 8), ignored).num_examples == 4


# -------------------------------------------------------------------------- NaN/inf weights or data

@pytest.mark.parametrize("command, key", [("surface", "train_loss"), ("radius", "loss_awp")])
def test_surface_and_radius_at_nan_weights_store_nan_with_one_warning(files, tmp_path, command, key):
    out = tmp_path / "r.h5"
    result = invoke(command, files["nan_weights"], *ANALYSES[command], "--subset", "64", "--out", out)
    assert result.exit_code == 0, result.output
    warnings = result.stderr.strip().splitlines()
    assert warnings == [f"warning: the weights of {files['nan_weights']} hold 1 NaN value (first in 0.weight): the "
                        "losses that depend on them are NaN and are stored as NaN; use a checkpoint saved before "
                        "training diverged"], result.stderr
    arrays, _ = read_group(out, command)
    assert arrays[key].size and np.isnan(arrays[key]).all()


def test_interpolating_towards_nan_weights_warns_once_and_keeps_the_start(files, tmp_path):
    out = tmp_path / "r.h5"
    result = invoke("interpolate", files["cnn"], files["nan_weights"], "--alphas", "0:1:3", "--subset", "64",
                    "--out", out)
    assert result.exit_code == 0, result.output
    assert result.stderr.strip().splitlines() == [
        "warning: the directions hold 1 NaN value (first in direction 1 0.weight): the losses that depend on them "
        "are NaN and are stored as NaN; use checkpoints without NaN/inf weights"], result.stderr
    loss = read_group(out, "interpolation")[0]["train_loss"]
    assert np.isfinite(loss[0]) and np.isnan(loss[1:]).all()


def test_surface_on_data_with_a_nan_pixel_warns_and_keeps_the_nan(files, tmp_path):
    out = tmp_path / "r.h5"
    result = invoke("surface", files["cnn"], "--data", files["nan"], *ANALYSES["surface"], "--out", out)
    assert result.exit_code == 0, result.output
    assert result.stderr.startswith("warning: the inputs of dataset 'npz:") and "hold 1 NaN value" in result.stderr
    arrays, _ = read_group(out, "surface")
    assert np.isnan(arrays["train_loss"]).all() and np.isfinite(arrays["train_acc"]).all()


@pytest.mark.parametrize("command", ["hessian", "cosine", "ratio"])
@pytest.mark.parametrize("source, words", [
    (["{nan_weights}"], "hold 1 NaN value (first in 0.weight), so"),
    (["{cnn}", "--data", "{nan}"], "the inputs of dataset 'npz:"),
])
def test_hessian_and_gradient_diagnostics_refuse_nan(files, tmp_path, command, source, words):
    out = tmp_path / "r.h5"
    result = invoke(command, *(arg.format(**files) for arg in source), *ANALYSES[command], "--out", out)
    message = one_line_error(result, out)
    assert words in message and "would be NaN" in message


def cnn_objective(x: torch.Tensor, y: torch.Tensor, nan_weight: bool = False) -> Objective:
    torch.manual_seed(0)
    model = build_model("cnn", 10, (1, 8, 8), width=2).eval()
    if nan_weight:
        with torch.no_grad():
            model[0].weight[0, 0, 1, 1] = float("nan")
    return Objective(model, x, y)


def evaluator(objective: Objective, **options) -> PointEvaluator:
    return PointEvaluator({"train": objective}, surface_directions(objective.params, 2), **options)


PLAIN = dict(fold_batchnorm=False, channels_last=False, micro_batch=False, linear_first_layer=False,
             stack_points=False, inplace_activations=False)


def test_speedup_probe_compares_finite_outputs_and_requires_nan_where_the_reference_has_it(digits):
    x, y = digits.x_train[:16].clone(), digits.y_train[:16]
    clean = evaluator(cnn_objective(x, y))
    x[1, 0, 3, 3] = float("nan")  # one probe row is NaN: the other rows still decide
    with pytest.warns(RuntimeWarning, match="hold 1 NaN value"):
        fast = evaluator(cnn_objective(x, y))
    assert fast.speedups == clean.speedups and fast.speedups["channels_last"]
    with pytest.warns(RuntimeWarning):
        plain = evaluator(cnn_objective(x, y), **PLAIN)
    points = [[0.0, 0.0], [0.3, -0.2]]
    values, expected = fast.evaluate(points), plain.evaluate(points)
    assert np.isnan(values["train_loss"]).all() and np.isnan(expected["train_loss"]).all()
    np.testing.assert_array_equal(values["train_acc"], expected["train_acc"])

    reference = clean._probe()
    for candidate_nan, reference_nan, agrees in ((True, False, False), (False, True, False), (True, True, True)):
        candidate, expected_outputs = reference.clone(), reference.clone()
        candidate[0, 0, 0] = float("nan") if candidate_nan else candidate[0, 0, 0]
        expected_outputs[0, 0, 0] = float("nan") if reference_nan else expected_outputs[0, 0, 0]
        clean._probe = lambda candidate=candidate: candidate
        assert clean._agrees(expected_outputs) is agrees, (candidate_nan, reference_nan)


def test_a_probe_that_is_all_nan_keeps_the_plain_evaluator(digits):
    x, y = digits.x_train[:16], digits.y_train[:16]
    with pytest.warns(RuntimeWarning, match=r"hold 1 NaN value \(first in 0.weight\)"):
        nan_weights = evaluator(cnn_objective(x, y, nan_weight=True))
    assert not any(nan_weights.speedups[key] for key in PLAIN if key != "stack_points")
    assert nan_weights.speedups["stack_points"] == 1
    assert np.isnan(nan_weights.evaluate([[0.0, 0.0], [0.5, 0.5]])["train_loss"]).all()


# -------------------------------------------------------------------------- landscape train

@pytest.mark.parametrize("arguments, words", [
    (["--data", "{nan}"], "the train inputs of dataset 'npz:"),
    (["--data", "{single}"], "hold a single class (0)"),
    (["--data", "{labels12}", "--arch-kwargs", '{{"num_classes": 10}}'], "go from 0 to 11 but the model"),
    (["--data", "{rgb}", "--arch", "mlp", "--arch-kwargs", '{{"input_shape": [1, 8, 8]}}'],
     "cannot take inputs of shape (3, 32, 32)"),
    (["--lr", "nan"], "--lr is nan"),
    (["--lr", "-1"], "--lr must be >= 0"),
    (["--weight-decay", "inf"], "--weight-decay is inf"),
    (["--momentum", "nan"], "--momentum is nan"),
    (["--optimizer", "sam", "--opt-args", "rho=1e400"], "--opt-args rho is inf"),
])
def test_train_refuses_bad_data_and_settings_up_front(files, tmp_path, arguments, words):
    out = tmp_path / "model.pt"
    result = invoke("train", "--epochs", "1", "--out", out, *(arg.format(**files) for arg in arguments))
    assert words in one_line_error(result, out)


def test_train_refuses_negative_labels_of_a_dataset_object(digits):
    labels = digits.y_train.clone()
    labels[5] = -1
    dataset = Dataset("mine:data", "mine", digits.x_train, labels, None, None, 10, (1, 8, 8))
    with pytest.raises(LandscapeError, match="labels of dataset 'mine:data' \\(train split\\) go from -1 to 9"):
        train_model(dataset, "cnn", "sgd", epochs=1)


def test_a_diverging_run_stops_at_the_first_nonfinite_step_and_keeps_the_weights_before_it(digits, tmp_path,
                                                                                         monkeypatch):
    models: list[torch.nn.Module] = []
    before_step: list[dict[str, torch.Tensor]] = []  # the model's state before each optimizer step
    build, create = landscape.train.build_model, landscape.train.create

    def recording(*args, **options):
        optimizer = create(*args, **options)
        step = optimizer.step

        def recorded_step(self, closure):
            before_step.append({name: t.detach().clone() for name, t in models[0].state_dict().items()})
            return step(closure)
        optimizer.step = types.MethodType(recorded_step, optimizer)  # a method, as the LR scheduler expects
        return optimizer
    monkeypatch.setattr(landscape.train, "build_model", lambda *args, **kwargs: models.append(build(*args, **kwargs))
                        or models[-1])
    monkeypatch.setattr(landscape.train, "create", recording)
    out = tmp_path / "diverged.pt"
    with pytest.raises(LandscapeError, match=r"training diverged at epoch 1, step (\d+) of 12: .*lower --lr") as error:
        train_model(digits, "cnn", "sgd", epochs=2, lr=1e6, out=str(out))
    step = int(re.search(r"step (\d+) of", str(error.value)).group(1))
    assert step == len(before_step)  # it stopped at the first step that went non-finite
    saved = load_checkpoint(out)
    assert saved.meta["extra"]["stopped_early"]["step"] == step and saved.meta["metrics"]["steps"] == step - 1
    state = saved.model.state_dict()
    assert all(torch.isfinite(t).all() for t in state.values())
    assert state.keys() == before_step[-1].keys()
    for name, expected in before_step[-1].items():
        assert torch.equal(state[name], expected), name


def test_train_command_on_a_diverging_loss_exits_2_naming_the_step_and_the_fix(tmp_path):
    out = tmp_path / "model.pt"
    result = invoke("train", "--epochs", "1", "--lr", "1e6", "--out", out)
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert re.search(r"training diverged at epoch 1, step \d+ of 12: .* lower --lr", result.output), result.output
    assert "stopped_early" in load_checkpoint(out).meta["extra"]
