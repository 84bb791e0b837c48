"""``train_model`` and the ``train``/``optimizers`` commands on the embedded digits data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from ddp_worker import Interrupted, StepCounter
from torch import nn

import landscape.train
from landscape.checkpoint import load_checkpoint
from landscape.cli.main import cli
from landscape.cli.train import parse_opt_args
from landscape.train import evaluate, state_path, train_model


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
    (["--optimizer", "mrwp", "--opt-args", "parallel=true"], "even number of ranks"),  # one process
    (["--optimizer", "rwp", "--opt-args", "parallel=true"], "perturbed_weight < 1"),
    (["--optimizer", "sam", "--opt-args", "ascent_scope=group:2"], "invalid ascent_scope: 'group:2'"),
    (["--optimizer", "ssamd", "--opt-args", "ascent_scope=everyone"], "invalid ascent_scope: 'everyone'"),
    (["--resume", "--overwrite"], "pass one of them"),
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


# -- training state and resume ----------------------------------------------------------------

def assert_same(got, expected, where: str = "") -> None:
    """Exact equality of nested dicts/lists of tensors and plain values."""
    if isinstance(expected, torch.Tensor):
        assert torch.equal(got, expected), where
    elif isinstance(expected, dict):
        assert got.keys() == expected.keys(), where
        for key in expected:
            assert_same(got[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(got) == len(expected), where
        for index, (a, b) in enumerate(zip(got, expected)):
            assert_same(a, b, f"{where}[{index}]")
    else:
        assert got == expected, where


@pytest.mark.parametrize("name, opt_args", [("marwp", None), ("ssamd", {"refresh": 2}), ("adamw", None)])
def test_a_resumed_run_is_bit_identical_to_an_uninterrupted_one(name, opt_args, tmp_path, digits, monkeypatch):
    build = landscape.train.build_model
    monkeypatch.setattr(landscape.train, "build_model",  # dropout: torch's global generator must resume too
                        lambda *args, **kwargs: nn.Sequential(nn.Dropout(0.2), build(*args, **kwargs)))
    options = {"epochs": 3, "batch_size": 256, "arch_kwargs": {"width": 4}, "opt_args": opt_args}
    whole = train_model(digits, "cnn", name, callbacks=[StepCounter()], **options)
    out = tmp_path / "run.pt"
    with pytest.raises(Interrupted):  # a crash in epoch 2, after the state of epoch 1 was written
        train_model(digits, "cnn", name, out=str(out), callbacks=[StepCounter(interrupt_at=8)], **options)
    state = torch.load(state_path(out), weights_only=True)
    assert (state["epoch"], state["step"], state["world_size"]) == (1, 6, 1) and not out.exists()
    assert {"model", "optimizer", "scheduler", "batch_order", "generators", "callbacks"} <= state.keys()
    counter = StepCounter()
    resumed = train_model(digits, "cnn", name, out=str(out), resume=True, callbacks=[counter], **options)
    assert_same(resumed.model.state_dict(), whole.model.state_dict(), "model")
    assert_same(resumed.optimizer.state_dict(), whole.optimizer.state_dict(), "optimizer")
    assert resumed.history == whole.history
    assert {k: v for k, v in resumed.metrics.items() if k != "seconds"} == \
        {k: v for k, v in whole.metrics.items() if k != "seconds"}
    assert counter.steps == list(range(1, 19))
    assert out.exists() and not state_path(out).exists()


def test_resume_refuses_another_run_and_a_left_state_needs_resume_or_overwrite(tmp_path, monkeypatch):
    data, out = tmp_path / "data.npz", tmp_path / "run.pt"
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 1, 8, 8)).astype(np.float32), np.arange(40) % 3
    np.savez(data, x=x, y=y)
    command = ["train", "--data", f"npz:{data}", "--arch-kwargs", '{"width": 2}', "--epochs", "2",
               "--batch-size", "16", "--out", str(out)]

    def run(*extra):
        return CliRunner().invoke(cli, [*command, *extra])

    batches, draw = [], landscape.train.BatchOrder.__next__

    def crash_at_step_5(order):  # 3 steps per epoch: a crash in epoch 2
        batches.append(1)
        if len(batches) == 5:
            raise Interrupted
        return draw(order)
    monkeypatch.setattr(landscape.train.BatchOrder, "__next__", crash_at_step_5)
    assert run().exit_code == 1 and state_path(out).exists() and not out.exists()
    monkeypatch.undo()

    for extra, words in [((), "pass --resume"), (("--resume", "--lr", "0.05"), "differs from the interrupted one (lr)"),
                         (("--resume", "--epochs", "3"), "(epochs)")]:
        result = run(*extra)
        assert result.exit_code == 2 and words in result.output and "Traceback" not in result.output, result.output
    np.savez(data, x=x + 1, y=y)  # the same spec, other contents
    result = run("--resume")
    assert result.exit_code == 2 and "(the data)" in result.output, result.output
    np.savez(data, x=x, y=y)
    assert run("--resume").exit_code == 0 and out.exists() and not state_path(out).exists()

    state_path(out).write_bytes(b"not a training state")
    result = run("--resume")
    assert result.exit_code == 2 and "damaged" in result.output and "--overwrite" in result.output, result.output
    assert run("--overwrite").exit_code == 0 and not state_path(out).exists()
