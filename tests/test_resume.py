"""Every --resume refuses another checkpoint, evaluation set or options; absurd sizes are refused before any work."""

import re
import tracemalloc

import clitools
import pytest
import torch

from landscape import resources
from landscape.analysis.radius import radius_curve
from landscape.checkpoint import save_checkpoint
from landscape.models import build_model
from landscape.objective import load_objective

COMMANDS = {  # command -> (its arguments, an option changed, the config key it changes)
    "hessian": (["hessian", "{a}", "--top-k", "1"], ["--top-k", "2"], "top_k"),
    "surface": (["surface", "{a}", "--x", "-1:1:3", "--1d"], ["--x", "-1:1:4"], "x"),
    "interpolate": (["interpolate", "{a}", "{b}", "--alphas", "0:1:3"], ["--alphas", "0:1:4"], "alphas"),
    "radius": (["radius", "{a}", "--radii", "0.1,1", "--draws", "2"], ["--draws", "3"], "draws"),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    kwargs = {"num_classes": 10, "input_shape": [1, 8, 8], "hidden": [12]}
    for name, seed in (("a", 0), ("b", 1)):
        torch.manual_seed(seed)
        save_checkpoint(folder / f"{name}.pt", build_model("mlp", **kwargs), arch="mlp", arch_kwargs=kwargs,
                        dataset="digits", optimizer="none", optimizer_hparams={}, metrics={}, seed=seed)
    return {"a": str(folder / "a.pt"), "b": str(folder / "b.pt")}


def refused(result, *named: str) -> str:
    """The one-line refusal of ``result`` (exit code 2), which must name each of ``named``."""
    assert result.exit_code == 2, result.output
    line = result.output.strip()
    assert "\n" not in line and line.startswith("Error: cannot resume"), line
    assert all(part in line for part in named), line
    return line


@pytest.mark.parametrize("command", COMMANDS)
def test_resume_refuses_another_checkpoint_evaluation_set_or_options(checkpoints, tmp_path, command):
    args, changed, key = COMMANDS[command]
    out = tmp_path / "r.h5"

    def run(*extra, a="a", b="b"):
        return clitools.invoke(*(arg.format(a=checkpoints[a], b=checkpoints[b]) for arg in args),
                               "--subset", 64, "--out", out, *extra)

    first = run()
    assert first.exit_code == 0, first.output
    stored = out.read_bytes()
    refused(run("--resume", a="b", b="a"), "another checkpoint")
    refused(run("--resume", "--subset", 32), "another evaluation set")
    refused(run("--resume", "--seed", 1), "another")  # the seed and, through the subset, the evaluation set
    refused(run("--resume", *changed), f"options differ ({key})")
    assert out.read_bytes() == stored, "a refused resume changed the results file"
    again = run("--resume")
    assert again.exit_code == 0, again.output


def test_resume_of_an_interrupted_radius_run_refuses_another_checkpoint(checkpoints, tmp_path):
    out = tmp_path / "r.h5"

    def stop(done, total):
        if done:
            raise KeyboardInterrupt

    objective = load_objective(checkpoints["a"], subset=64)
    with pytest.raises(KeyboardInterrupt):
        radius_curve(objective, [0.1, 1.0], draws=2, out=out, progress=stop, evaluator_options={"stack_points": 2})
    assert (tmp_path / "r.h5.radius.partial").exists() and not out.exists()
    args = ["radius", "--radii", "0.1,1", "--draws", "2", "--subset", 64, "--out", out, "--resume"]
    refused(clitools.invoke(args[0], checkpoints["b"], *args[1:]), "another checkpoint", "r.h5.radius.partial")
    resumed = clitools.invoke(args[0], checkpoints["a"], *args[1:])
    assert resumed.exit_code == 0, resumed.output


@pytest.fixture
def small_machine(monkeypatch):
    """4 GB of memory and 100 MB of disk, whatever this machine has."""
    monkeypatch.setattr(resources, "available_memory", lambda: 4e9)
    monkeypatch.setattr(resources, "free_disk", lambda path: 100e6)


@pytest.mark.parametrize("args, message", [
    (["surface", "{a}", "--x", "-1:1:100000", "--y", "-1:1:100000"],
     "a 100000x100000 surface (10,000,000,000 points) needs ~170.0 GB of memory and 4.0 GB is available"),
    (["surface", "{a}", "--x", "-1:1:10000000000"], "--x with 10,000,000,000 points needs ~640.0 GB of memory"),
    (["radius", "{a}", "--draws", "100000000"],
     "radius with 25 radii x 100,000,001 directions (2,500,000,025 points) needs ~1.1 TB of memory"),
    (["radius", "{a}", "--radii", "1e-3:10:1000000"],
     "radius with 1,000,000 radii x 11 directions (11,000,000 points) needs ~374.0 MB of disk"),
    (["interpolate", "{a}", "{b}", "--alphas", "0:1:10000000"],
     "a 10000000 interpolation (10,000,000 points) needs ~340.0 MB of disk"),
])
def test_absurd_sizes_are_refused_in_one_line_before_anything_is_allocated(checkpoints, tmp_path, small_machine,
                                                                            args, message):
    tracemalloc.start()
    try:
        result = clitools.invoke(*(arg.format(**checkpoints) for arg in args), "--subset", 64,
                                 "--out", tmp_path / "r.h5")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert result.exit_code == 2, result.output
    assert result.output.strip().count("\n") == 0 and message in result.output, result.output
    assert peak < 200e6, f"{peak / 1e6:.0f} MB allocated before refusing"
    assert list(tmp_path.iterdir()) == []


def test_the_time_the_rest_will_take_is_said_after_the_first_block(checkpoints, tmp_path, monkeypatch):
    from landscape.cli import surface
    monkeypatch.setattr(surface, "ESTIMATE_FROM_S", 0.0)  # this run is short; say it all the same
    result = clitools.invoke("surface", checkpoints["a"], "--x", "-1:1:12", "--y", "-1:1:12", "--subset", 64,
                             "--out", tmp_path / "r.h5")
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("remaining: ")]
    assert len(lines) == 1, result.stderr
    assert re.fullmatch(r"remaining: ~\d+\.\d (s|min|h|days) for [\d,]+ points at [\d.e-]+ s/point", lines[0]), lines
