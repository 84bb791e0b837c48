"""`landscape info`, `landscape models` and `landscape datasets` through CliRunner (clitools.invoke)."""

import hashlib
import json

import numpy as np
import pytest
import torch
from clitools import assert_input_error, invoke

from landscape import store
from landscape.checkpoint import save_checkpoint
from landscape.models import build_model


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    model = build_model("cnn", num_classes=10, input_shape=(1, 8, 8), bn=False)
    path = tmp_path / "a.pt"
    save_checkpoint(path, model, arch="cnn", arch_kwargs={"num_classes": 10, "input_shape": (1, 8, 8), "bn": False},
                    dataset="digits", optimizer="sgd", optimizer_hparams={"lr": 0.1, "momentum": 0.9},
                    metrics={"test_accuracy": 0.97}, seed=5)
    return path, model


def test_info_shows_checkpoint_metadata(checkpoint):
    path, model = checkpoint
    result = invoke("info", path)
    assert result.exit_code == 0
    lines = dict(line.split(None, 1) for line in result.output.strip().splitlines())
    assert lines["arch"] == "cnn" and lines["dataset"] == "digits" and lines["optimizer"] == "sgd"
    assert json.loads(lines["arch_kwargs"]) == {"num_classes": 10, "input_shape": [1, 8, 8], "bn": False}
    assert json.loads(lines["optimizer_hparams"]) == {"lr": 0.1, "momentum": 0.9}
    assert json.loads(lines["metrics"]) == {"test_accuracy": 0.97} and lines["seed"] == "5"
    assert int(lines["parameters"]) == sum(p.numel() for p in model.parameters())
    assert lines["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert json.loads(lines["versions"])["torch"] == torch.__version__


def test_info_json(checkpoint):
    path, model = checkpoint
    result = invoke("info", path, "--json")
    assert result.exit_code == 0
    summary = json.loads(result.output)
    assert summary["format"] == "landscape-checkpoint/1" and summary["seed"] == 5
    assert summary["parameters"] == sum(p.numel() for p in model.parameters())


def test_info_foreign_checkpoint_shows_what_it_holds_without_arch(tmp_path):
    torch.manual_seed(0)
    model = build_model("cnn", num_classes=10, input_shape=(1, 8, 8), width=4)  # with BatchNorm statistics
    path = tmp_path / "foreign.pth"
    torch.save({"model_state_dict": model.state_dict()}, path)
    result = invoke("info", path, "--json")
    assert result.exit_code == 0
    summary = json.loads(result.output)
    assert summary["format"] == "state_dict under 'model_state_dict'" and "arch" not in summary
    assert summary["parameters"] == sum(p.numel() for p in model.parameters())
    assert_input_error(invoke("info", path, "--arch", "cnn"), "--arch")  # info builds nothing, so takes no --arch


def test_info_pickled_module_needs_trust(tmp_path, checkpoint):
    _, model = checkpoint
    path = tmp_path / "module.pt"
    torch.save(model, path)
    assert_input_error(invoke("info", path), "--trust")
    result = invoke("info", path, "--trust")
    assert result.exit_code == 0 and "pickled module" in result.output


def test_info_results_file(tmp_path):
    path = tmp_path / "r.h5"
    store.write_group(path, "hessian", {"eigenvalues": np.arange(5.0), "density": {"grid": np.zeros((2, 3))}},
                      {"config": {"top_k": 5}, "seed": 1, "checkpoint": "a.pt"})
    store.write_group(path, "surface", {"loss": np.zeros((3, 4), dtype=np.float32)}, {"seed": 2})
    result = invoke("info", path)
    assert result.exit_code == 0
    output = result.output
    assert "/hessian" in output and "/surface" in output and '{"top_k": 5}' in output
    assert "eigenvalues  (5,) float64" in output and "loss  (3, 4) float32" in output and "(2, 3) float64" in output
    summary = json.loads(invoke("info", path, "--json").output)
    assert summary["groups"]["surface"]["attrs"] == {"seed": 2}
    assert summary["groups"]["hessian"]["datasets"]["density"] == {"grid": "(2, 3) float64"}


@pytest.mark.parametrize("content", [b"", b"garbage bytes, not a checkpoint"])
def test_info_bad_files_exit_2_without_traceback(tmp_path, content):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    assert_input_error(invoke("info", path), "corrupt")
    assert_input_error(invoke("info", tmp_path / "missing.pt"), "not found")


def test_models_listing_and_filter():
    result = invoke("models")
    assert result.exit_code == 0
    for name in ("mlp", "cnn", "resnet18", "wrn", "vgg16bn"):
        assert any(line.startswith(name + " ") for line in result.output.splitlines()), name
    assert "depth=16, width=4, dropout=0.0, bn=true" in result.output
    filtered = invoke("models", "vgg*")
    assert filtered.exit_code == 0 and "vgg16bn" in filtered.output and "resnet18" not in filtered.output
    assert_input_error(invoke("models", "transformer*"), "no model matches")


def test_datasets_listing():
    result = invoke("datasets")
    assert result.exit_code == 0
    for form in ("digits", "cifar10:PATH", "cifar100:PATH", "npz:PATH", "module:function"):
        assert form in result.output
    filtered = invoke("datasets", "cifar*")
    assert filtered.exit_code == 0 and [line.split()[0] for line in filtered.output.splitlines()] == [
        "cifar10:PATH", "cifar100:PATH"]
    assert_input_error(invoke("datasets", "imagenet*"), "no dataset matches 'imagenet*'")


@pytest.mark.parametrize("command", ["info", "models", "datasets"])
def test_help_shows_an_example_and_the_python_equivalent(command):
    result = invoke(command, "--help")
    assert result.exit_code == 0 and "landscape " in result.output and "Python:" in result.output
