"""Broken checkpoints and bad architecture options through the CLI: one line naming the fix, exit code 2."""

import pytest
import torch
from clitools import assert_input_error, invoke

from landscape.checkpoint import save_checkpoint
from landscape.cli.main import COMMANDS, cli
from landscape.models import build_model
from test_checkpoint import flip_byte

FAST_HESSIAN = ("--top-k", "1", "--subset", "16", "--device", "cpu")


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "cnn.pt"
    save_checkpoint(path, build_model("cnn", 10, (1, 8, 8), width=2), arch="cnn",
                    arch_kwargs={"num_classes": 10, "input_shape": [1, 8, 8], "width": 2}, dataset="digits",
                    optimizer="sgd", optimizer_hparams={}, metrics={}, seed=0)
    return path


def rewrite(path, out, **changes):
    """``path``'s own-format payload with fields changed (``None`` removes one), saved as ``out``."""
    payload = torch.load(path, weights_only=True)
    payload.update({key: value for key, value in changes.items() if value is not None})
    for key in [key for key, value in changes.items() if value is None]:
        del payload[key]
    torch.save(payload, out)
    return out


def test_missing_arch(checkpoint, tmp_path):
    path = rewrite(checkpoint, tmp_path / "no_arch.pt", arch=None)
    assert_input_error(invoke("hessian", path, *FAST_HESSIAN, "--out", tmp_path / "r.h5"),
                       "records no 'arch' field; pass --arch NAME")
    assert invoke("hessian", path, *FAST_HESSIAN, "--arch", "cnn", "--out", tmp_path / "r.h5").exit_code == 0
    result = invoke("info", path)  # info shows what the file holds
    assert result.exit_code == 0 and not any(line.startswith("arch ") for line in result.output.splitlines())


@pytest.mark.parametrize("changes", [{"arch": 5}, {"arch_kwargs": [1]}, {"state_dict": [1]}, {"metrics": "good"},
                                     {"dataset": 7}])
@pytest.mark.parametrize("command", ["info", "hessian"])
def test_ill_typed_metadata(checkpoint, tmp_path, changes, command):
    path = rewrite(checkpoint, tmp_path / "bad.pt", **changes)
    extra = (*FAST_HESSIAN, "--out", tmp_path / "r.h5") if command == "hessian" else ()
    assert_input_error(invoke(command, path, *extra), f"checkpoint '{path}'", f"'{next(iter(changes))}' field",
                       "re-save it with landscape.save_checkpoint")


ARCH_KWARGS_COMMANDS = sorted(name for name in COMMANDS
                              if any(p.name == "arch_kwargs" for p in cli.get_command(None, name).params))


def test_every_command_with_arch_kwargs_is_covered():
    assert set(ARCH_KWARGS_COMMANDS) >= {"train", "hessian", "surface", "interpolate", "radius", "cosine", "ratio"}


@pytest.mark.parametrize("command", ARCH_KWARGS_COMMANDS)
@pytest.mark.parametrize("value", ["[1, 2]", '"width"', "16", "null"])
def test_arch_kwargs_json_that_is_not_an_object(checkpoint, tmp_path, command, value):
    arguments = {"interpolate": [checkpoint, checkpoint], "train": []}.get(command, [checkpoint])
    result = invoke(command, *arguments, "--arch", "cnn", "--arch-kwargs", value, "--out", tmp_path / "x")
    assert_input_error(result, "--arch-kwargs", "must be a JSON object")


@pytest.mark.parametrize(("command", "arch", "kwargs", "message"), [
    ("hessian", "cnn", '{"width": -3}', "option 'width' of model 'cnn' must be an integer >= 1, got -3"),
    ("hessian", "cnn", '{"width": "big"}', "option 'width' of model 'cnn' must be an integer >= 1, got \"big\""),
    ("hessian", "cnn", '{"num_classes": 0}', "model 'cnn' needs num_classes >= 1, got 0"),
    ("hessian", "wrn", '{"depth": 5}', "wrn depth 5 is invalid"),
    ("train", "mlp", '{"hidden": [-1]}', "option 'hidden' of model 'mlp' must be a list of integers >= 1"),
    ("train", "cnn", '{"width": -3}', "option 'width' of model 'cnn' must be an integer >= 1, got -3"),
])
def test_bad_architecture_options(checkpoint, tmp_path, command, arch, kwargs, message):
    arguments = (checkpoint, *FAST_HESSIAN) if command == "hessian" else ("--epochs", "1")
    result = invoke(command, *arguments, "--arch", arch, "--arch-kwargs", kwargs, "--out", tmp_path / "r.out")
    assert_input_error(result, message)
    assert not (tmp_path / "r.out").exists()


def test_tampered_archive(checkpoint, tmp_path):
    tampered = tmp_path / "tampered.pt"
    entry = flip_byte(checkpoint, "/data/0", 5, tampered)
    expected = f"checkpoint '{tampered}' is damaged (entry '{entry}' fails its CRC check); re-save or re-download it"
    assert_input_error(invoke("info", tampered), expected)
    assert_input_error(invoke("hessian", tampered, *FAST_HESSIAN, "--out", tmp_path / "r.h5"), expected)
