"""``train_model`` and the ``train``/``optimizers`` commands on the embedded digits data."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

import landscape.train
from landscape.checkpoint import load_checkpoint
from landscape.cli.main import cli
from landscape.cli.train import parse_opt_args
from landscape.train import evaluate, train_model


def test_sgd_on_digits_reaches_95_percent_and_the_checkpoint_reproduces_it(tmp_path, digits):
    result = train_model(digits, "cnn", "sgd", epochs=5, out=str(tmp_path / "sgd.pt"))
    assert result.metrics["test_accuracy"] >= 0.95, result.metrics
    checkpoint = load_checkpoint(tmp_path / "sgd.pt")
    assert checkpoint.meta["optimizer"] == "sgd" and checkpoint.meta["optimizer_hparams"]["lr"] == 0.1
    _, accuracy = evaluate(checkpoint.model, digits.x_test, digits.y_test)
    assert accuracy == result.metrics["test_accuracy"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sam", "marwp"])
def test_perturbation_methods_reach_95_percent_with_defaults(name, digits):
    metrics = train_model(digits, "cnn", name, epochs=5).metrics
    assert metrics["test_accuracy"] >= 0.95, metrics


def test_mrwp_feeds_two_different_batches_per_step(monkeypatch, digits):
    seen: list[torch.Tensor] = []
    build = landscape.train.build_model

    def recording_model(*args, **kwargs):
        model = build(*args, **kwargs)
        model.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].clone()) if module.training
                                        else None)
        return model
    monkeypatch.setattr(landscape.train, "build_model", recording_model)
    result = train_model(digits, "cnn", "mrwp", epochs=1, batch_size=256)
    steps = result.metrics["steps"]
    assert steps == 6 and len(seen) == 2 * steps
    for clean, perturbed in zip(seen[::2], seen[1::2]):
        assert clean.shape != perturbed.shape or not torch.equal(clean, perturbed)


def test_parse_opt_args():
    assert parse_opt_args(("rho=0.1 p=3", "adaptive=true,base=adamw", "m=none")) == \
        {"rho": 0.1, "p": 3, "adaptive": True, "base": "adamw", "m": None}


def test_train_command_writes_a_checkpoint_with_the_optimizer_settings(tmp_path):
    out = tmp_path / "sam.pt"
    result = CliRunner().invoke(cli, ["train", "--optimizer", "sam", "--opt-args", "rho=0.1 base=adamw",
                                      "--lr", "0.003", "--epochs", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "test accuracy" in result.output
    meta = load_checkpoint(out).meta
    assert meta["optimizer"] == "sam"
    assert {key: meta["optimizer_hparams"][key] for key in ("rho", "base", "lr")} == \
        {"rho": 0.1, "base": "adamw", "lr": 0.003}


@pytest.mark.parametrize("arguments, words", [
    (["--optimizer", "lion"], "unknown optimizer"),
    (["--opt-args", "rho"], "key=value"),
    (["--optimizer", "sam", "--opt-args", "rho=-1"], "rho"),
    (["--optimizer", "adamw", "--momentum", "0.9"], "momentum"),
    (["--arch-kwargs", "{bad"], "JSON"),
    (["--data", "nope"], "dataset"),
    (["--optimizer", "rwp", "--opt-args", "sigma_schedule=linear"], "sigma_schedule"),
    (["--optimizer", "rsam", "--opt-args", "lam=0.5"], "lam= is now called grad_weight="),
])
def test_train_command_bad_input_is_one_line_with_exit_code_2(tmp_path, arguments, words):
    result = CliRunner().invoke(cli, ["train", "--epochs", "1", "--out", str(tmp_path / "x.pt"), *arguments])
    assert result.exit_code == 2, result.output
    assert words in result.output and "Traceback" not in result.output
    assert not (tmp_path / "x.pt").exists()


def test_optimizers_command_lists_the_registry():
    result = CliRunner().invoke(cli, ["optimizers"])
    assert result.exit_code == 0
    for name in ("sgd", "adamw", "sam", "asam", "rsam", "rwp", "arwp", "mrwp", "marwp", "ssamf", "ssamd"):
        assert f"\n{name} " in "\n" + result.output
    filtered = CliRunner().invoke(cli, ["optimizers", "*rwp"])
    assert filtered.exit_code == 0 and "sam " not in filtered.output and "marwp" in filtered.output
    missing = CliRunner().invoke(cli, ["optimizers", "nothing*"])
    assert missing.exit_code == 2 and "landscape optimizers" in missing.output
