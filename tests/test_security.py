"""A checkpoint's metadata never runs code: ``module:function`` names recorded in a file are refused
unless the user names them (``--arch``/``--data``) or passes ``--trust``.

Every attack writes a marker file when its code runs; the marker must not appear.
"""

import json
import sys
import textwrap
import uuid

import pytest
import torch
from clitools import assert_input_error, invoke
from torch import nn

from landscape.checkpoint import load_checkpoint, save_checkpoint
from landscape.errors import LandscapeError
from landscape.models import build_model
from landscape.objective import load_objective

FAST_HESSIAN = ("--top-k", "1", "--subset", "16", "--device", "cpu")


def save(path, model, arch="cnn", arch_kwargs=None, dataset="digits"):
    """An own-format checkpoint of ``model`` whose metadata says ``arch``/``arch_kwargs``/``dataset``."""
    save_checkpoint(path, model, arch=arch, arch_kwargs=arch_kwargs if arch_kwargs is not None else
                    {"num_classes": 10, "input_shape": [1, 8, 8], "width": 2},
                    dataset=dataset, optimizer="sgd", optimizer_hparams={}, metrics={}, seed=0)
    return path


@pytest.fixture
def cnn():
    torch.manual_seed(0)
    return build_model("cnn", 10, (1, 8, 8), width=2)


@pytest.fixture
def marker(tmp_path):
    return tmp_path / "code_ran"


@pytest.fixture
def shell_attack(tmp_path, cnn, marker):
    """The reported attack: ``arch = subprocess:getoutput`` with ``arch_kwargs = {"cmd": "touch MARKER"}``."""
    return save(tmp_path / "attack.pt", cnn, arch="subprocess:getoutput", arch_kwargs={"cmd": f"touch '{marker}'"})


@pytest.fixture
def user_module(tmp_path, monkeypatch, marker):
    """A module in the current directory (as a user's would be) that writes the marker on import and
    when called; ``build()`` returns a model, ``load()`` a small digits-shaped dataset."""
    name = f"user_code_{uuid.uuid4().hex[:8]}"  # fresh, so the import really happens in each test
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(f"""
        import torch
        from torch import nn
        open({str(marker)!r}, "a").write("imported\\n")

        def build():
            open({str(marker)!r}, "a").write("build\\n")
            return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))

        def load():
            open({str(marker)!r}, "a").write("load\\n")
            return torch.randn(32, 1, 8, 8), torch.arange(32) % 10
    """))
    monkeypatch.chdir(tmp_path)
    yield name
    sys.modules.pop(name, None)


def test_info_shows_the_attack_without_running_it(shell_attack, marker):
    result = invoke("info", shell_attack, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["arch"] == "subprocess:getoutput" and summary["arch_kwargs"] == {"cmd": f"touch '{marker}'"}
    assert summary["parameters"] == sum(p.numel() for p in build_model("cnn", width=2).parameters())
    assert not marker.exists()


def test_analysis_refuses_code_named_in_the_arch_field(shell_attack, marker, tmp_path):
    result = invoke("hessian", shell_attack, *FAST_HESSIAN, "--out", tmp_path / "r.h5")
    assert_input_error(result, f"checkpoint '{shell_attack}' names code in its 'arch' field ('subprocess:getoutput')",
                   "pass --arch module:function yourself", "--trust")
    assert not marker.exists() and not (tmp_path / "r.h5").exists()


def test_trust_runs_the_code_the_file_names(shell_attack, marker, tmp_path):
    result = invoke("hessian", shell_attack, *FAST_HESSIAN, "--trust", "--out", tmp_path / "r.h5")
    assert marker.exists()  # the user trusted the file, so its code ran (and returned a string, not a model)
    assert_input_error(result, "returned str")


@pytest.mark.parametrize("command", [("interpolate", "{good}", "{attack}"),
                                     ("surface", "{good}", "--x-target", "{attack}", "--1d", "--x", "-1:1:3")])
def test_a_second_checkpoint_is_checked_too(command, shell_attack, marker, cnn, tmp_path):
    good = save(tmp_path / "good.pt", cnn)
    args = [arg.format(good=good, attack=shell_attack) for arg in command]
    assert_input_error(invoke(*args, "--subset", "16", "--out", tmp_path / "r.h5"), "'arch' field", "--trust")
    assert not marker.exists()


def test_python_api_refuses_recorded_code_unless_trusted(shell_attack, marker, cnn, tmp_path):
    from landscape.analysis.surface import interpolate
    from landscape.checkpoint import read_checkpoint

    with pytest.raises(LandscapeError, match="names code in its 'arch' field"):
        load_checkpoint(shell_attack)
    with pytest.raises(LandscapeError, match="names code in its 'arch' field"):
        load_objective(str(shell_attack), data="digits")
    objective = load_objective(str(save(tmp_path / "good.pt", cnn)), subset=16, device="cpu")
    with pytest.raises(LandscapeError, match="names code in its 'arch' field"):
        interpolate(objective, str(shell_attack))
    assert read_checkpoint(shell_attack).meta["arch"] == "subprocess:getoutput"  # reading is not running
    assert not marker.exists()
    with pytest.raises(LandscapeError, match="returned str"):
        load_checkpoint(shell_attack, trust=True)
    assert marker.exists()


def test_a_recorded_dataset_function_is_refused(user_module, marker, cnn, tmp_path):
    path = save(tmp_path / "data_attack.pt", cnn, dataset=f"{user_module}:load")
    assert invoke("info", path).exit_code == 0
    result = invoke("hessian", path, *FAST_HESSIAN, "--out", tmp_path / "r.h5")
    assert_input_error(result, f"names code in its 'dataset' field ('{user_module}:load')",
                   "pass --data module:function yourself", "--trust")
    with pytest.raises(LandscapeError, match="'dataset' field"):
        load_objective(str(path))
    assert not marker.exists()  # neither imported nor called
    assert invoke("hessian", path, *FAST_HESSIAN, "--data", "digits", "--out", tmp_path / "a.h5").exit_code == 0
    assert not marker.exists()


@pytest.mark.parametrize("permission", [["--data", "{module}:load"], ["--trust"]])
def test_a_dataset_function_runs_when_named_or_trusted(permission, user_module, marker, cnn, tmp_path):
    path = save(tmp_path / "data.pt", cnn, dataset=f"{user_module}:load")
    args = [arg.format(module=user_module) for arg in permission]
    result = invoke("hessian", path, *FAST_HESSIAN, *args, "--out", tmp_path / "r.h5")
    assert result.exit_code == 0, result.output
    assert marker.read_text().split() == ["imported", "load"]


@pytest.mark.parametrize("permission", [["--arch", "{module}:build"], ["--trust"]])
def test_a_user_model_runs_when_named_or_trusted(permission, user_module, marker, tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    path = save(tmp_path / "user.pt", model, arch=f"{user_module}:build", arch_kwargs={})
    assert_input_error(invoke("hessian", path, *FAST_HESSIAN, "--out", tmp_path / "r.h5"), "'arch' field")
    assert not marker.exists()
    args = [arg.format(module=user_module) for arg in permission]
    result = invoke("hessian", path, *FAST_HESSIAN, *args, "--out", tmp_path / "r.h5")
    assert result.exit_code == 0, result.output
    assert marker.read_text().split() == ["imported", "build"]


def test_reproduce_uses_its_own_arch_and_data_not_a_planted_checkpoints(user_module, marker, tmp_path):
    from landscape.reproduce import Settings, reproduce

    torch.manual_seed(0)
    planted = build_model("mlp", 10, (1, 8, 8), hidden=[8])
    save(tmp_path / "out" / "sgd.pt", planted, arch=f"{user_module}:build", arch_kwargs={},
         dataset=f"{user_module}:load")
    tiny = Settings(epochs=1, subset=16, surface_points=2, radius_points=2, radius_draws=1, lanczos_steps=4,
                    cosine_rhos=2, batches=1, minibatch=8)
    with pytest.raises(LandscapeError, match="do not fit arch 'cnn'"):  # reproduce's --arch, not the file's
        reproduce(tmp_path / "out", ["sgd"], arch="cnn", settings=tiny, device="cpu", log=lambda line: None)
    assert not marker.exists()
