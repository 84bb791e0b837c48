"""Every analysis under torchrun (gloo, CPU, one thread per rank) against single-process references.

Three torchrun launches: the scenarios of ``analysis_worker.py`` on 2 ranks, ending with a surface that rank 1
SIGKILLs itself in; the same on 3 ranks (uneven shares of 101/100/100 rows), starting with the resume of the
killed run and ending with a bad input to the command line, which must end every rank with exit code 2 and
one line; and ``landscape surface`` from the command line on 2 ranks. References are the same scenarios run
in this process.

Tolerances: grid analyses (surfaces, interpolation, radius, sharpness) and mini-batch ones (λ1 per batch,
cosine, ratio) share out whole points or batches, so they must be bit-identical; data-parallel quantities
(loss, gradient, curvature products, and the spectra built on them) differ from one process only in the
order of the sums over ranks: 1e-10 relative in float64.
"""

from __future__ import annotations

import pickle
import shutil
import subprocess
from pathlib import Path

import click
import h5py
import numpy as np
import pytest
import torch
from clitools import invoke

import analysis_worker as worker
from helpers import assert_close
from torchrun import exit_codes, rank_logs, torchrun

SCRIPT = Path(worker.__file__)
SGD = SCRIPT.parents[1] / "data" / "cnn_digits_sgd.pt"
BOTH = ("surface", "radius", "spectrum", "spectrum_host", "spectrum_bn_train", "sharpness")
TWO = (*BOTH, "per_batch", "cosine", "ratio", "cli", "main_only", "kill")   # "kill" ends the launch
THREE = ("resume", *BOTH, "bad_input")   # "bad_input" ends the launch
RTOL = 1e-10


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("two")
    worker.write_checkpoints(folder)
    run = torchrun(2, SCRIPT, folder, *TWO, logs=folder / "logs")
    assert run.returncode != 0 and exit_codes(run.stderr).get(1) == -9, run.stderr[-3000:]   # the kill
    assert all((folder / f"{name}.rank{rank}.pkl").exists() for name in TWO[:-1] for rank in range(2)), \
        rank_logs(folder / "logs")
    return folder


@pytest.fixture(scope="module")
def killed_done(two_ranks) -> np.ndarray:
    """The ``done`` mask the killed 2-rank surface left in its sidecar."""
    with h5py.File(two_ranks / "killed.h5.surface.partial") as handle:
        return handle["done"][()].reshape(-1)


@pytest.fixture(scope="module")
def three_ranks_run(tmp_path_factory, two_ranks, killed_done) -> tuple[Path, subprocess.CompletedProcess]:
    folder = tmp_path_factory.mktemp("three")
    worker.write_checkpoints(folder)
    shutil.copy(two_ranks / "killed.h5.surface.partial", folder)
    run = torchrun(3, SCRIPT, folder, *THREE, logs=folder / "logs", timeout=180)
    assert all((folder / f"{name}.rank{rank}.pkl").exists() for name in THREE[:-1] for rank in range(3)), \
        rank_logs(folder / "logs")
    return folder, run


@pytest.fixture(scope="module")
def three_ranks(three_ranks_run) -> Path:
    return three_ranks_run[0]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """Every scenario (and the killed surface, uninterrupted) in this process."""
    folder = tmp_path_factory.mktemp("one")
    worker.write_checkpoints(folder)
    results = {name: worker.SCENARIOS[name](folder) for name in (*BOTH, "per_batch", "cosine", "ratio")
               if name != "spectrum_host"}
    results["spectrum_host"] = worker.spectrum(folder, full=False)   # the host path's reference: on the device
    results["killed"] = worker.killed_surface(folder, resume=False).arrays
    return results


def load(folder: Path, name: str, ranks: int) -> list:
    out = []
    for rank in range(ranks):
        with open(folder / f"{name}.rank{rank}.pkl", "rb") as handle:
            out.append(pickle.load(handle))
    return out


def assert_identical(got, expected, what: str = "") -> None:
    """Bit-identical nested dicts/lists of arrays and numbers (NaN where NaN)."""
    if isinstance(expected, dict):
        assert set(got) == set(expected), what
        for key in expected:
            assert_identical(got[key], expected[key], f"{what}/{key}")
    else:
        got, expected = np.asarray(got), np.asarray(expected)
        assert got.shape == expected.shape and np.array_equal(got, expected, equal_nan=expected.dtype.kind == "f"), \
            (what, got, expected)


@pytest.mark.parametrize("ranks", [2, 3])
@pytest.mark.parametrize("name", ["surface", "radius", "sharpness"])
def test_grid_analyses_are_bit_identical_to_one_process_on_every_rank(name, ranks, two_ranks, three_ranks, reference):
    for result in load(two_ranks if ranks == 2 else three_ranks, name, ranks):
        assert_identical(result, reference[name], name)


@pytest.mark.parametrize("name", ["per_batch", "cosine", "ratio"])
def test_minibatch_analyses_share_batches_and_are_bit_identical(name, two_ranks, reference):
    for result in load(two_ranks, name, 2):
        assert_identical(result, reference[name], name)


@pytest.mark.parametrize("ranks", [2, 3])
@pytest.mark.parametrize("name", ["spectrum", "spectrum_host", "spectrum_bn_train"])
def test_data_parallel_objective_and_curvature_match_one_process(name, ranks, two_ranks, three_ranks, reference):
    results = load(two_ranks if ranks == 2 else three_ranks, name, ranks)
    expected, got = reference[name], results[0]
    assert set(got) == set(expected)
    for result in results[1:]:   # every rank holds the same vectors, so the same values
        for key in set(expected) - {"local_examples"}:
            assert_identical(result[key], got[key], key)
    assert_close(got["loss"], expected["loss"], RTOL, "loss and accuracy")
    assert_close(got["gradient"], expected["gradient"], RTOL, "gradient", atol=1e-14)
    for key in expected["hessian"].keys() & {"eigenvalues", "slq_nodes", "slq_weights", "density"}:
        assert_close(got["hessian"][key], expected["hessian"][key], RTOL if key != "slq_weights" else 1e-8, key,
                     atol=1e-12)
    for key in {"trace", "ggn", "fisher", "fisher_trace", "blocks"} & set(expected):
        assert_close(got[key], expected[key], RTOL, key)
    if "saved" in expected:
        assert_identical(got["saved"], got["hessian"]["eigenvalues"])   # rank 0 wrote it, every rank read it
    shares = [result["local_examples"] for result in results]
    assert sum(shares) == worker.EXAMPLES
    if name == "spectrum_bn_train":   # whole batches of 64 per rank: every batch's statistics as in one process
        assert all(share % worker.BATCH == 0 for share in shares[:-1]) and shares[0] > 0
    else:
        assert max(shares) - min(shares) == 1   # rows shared as evenly as they go


def test_a_surface_killed_on_one_rank_resumes_on_another_world_size_losing_and_recomputing_nothing(
        two_ranks, three_ranks, killed_done, reference):
    assert 0 < killed_done.sum() < killed_done.size
    recomputed = set()
    for rank in range(3):
        units = (three_ranks / f"resume.units.rank{rank}").read_text().split()
        recomputed.update(int(unit) for unit in units)
        assert units, f"rank {rank} evaluated nothing"
    assert recomputed == set(np.flatnonzero(~killed_done))   # exactly what was not written, each once
    assert sum(len((three_ranks / f"resume.units.rank{r}").read_text().split()) for r in range(3)) == len(recomputed)
    for result in load(three_ranks, "resume", 3):
        assert_identical(result, reference["killed"], "resumed surface")
    assert not (three_ranks / "killed.h5.surface.partial").exists()


def test_cli_hessian_and_radius_under_torchrun_write_the_single_process_results(two_ranks, tmp_path):
    worker.write_checkpoints(tmp_path)
    for arguments in worker.cli_commands(tmp_path):
        result = invoke(*arguments)
        assert result.exit_code == 0, result.output
    with h5py.File(two_ranks / "cli.h5") as got, h5py.File(tmp_path / "cli.h5") as expected:
        assert_close(got["hessian/eigenvalues"][()], expected["hessian/eigenvalues"][()], 1e-6, "float32 eigenvalues")
        assert_close(got["hessian"].attrs["trace"], expected["hessian"].attrs["trace"], 1e-6, "float32 trace")
        for key in expected["radius"]:
            assert_identical(got["radius"][key][()], expected["radius"][key][()], key)


def test_commands_that_compute_nothing_run_on_rank_0_while_the_others_wait(two_ranks):
    logs = rank_logs(two_ranks / "logs")
    assert "sha256" in logs[0][0] and "resnet18" in logs[0][0]   # landscape info, landscape models
    assert logs[1][0] == ""


def test_cli_surface_under_torchrun_writes_the_single_process_file_and_only_rank_0_speaks(tmp_path):
    arguments = ["surface", SGD, "--x", "-1:1:5", "--y", "-1:1:3", "--subset", "200", "--split", "both"]
    assert invoke(*arguments, "--out", tmp_path / "one.h5").exit_code == 0
    run = torchrun(2, "-m", "landscape", *arguments, "--out", tmp_path / "two.h5", logs=tmp_path / "logs",
                   env={"LANDSCAPE_PROGRESS": "1"})
    logs = rank_logs(tmp_path / "logs")
    assert run.returncode == 0, logs
    assert "wrote" in logs[0][0] and "%" in logs[0][1]   # rank 0 prints and shows its progress bar
    assert logs[1] == ("", "")
    with h5py.File(tmp_path / "two.h5") as got, h5py.File(tmp_path / "one.h5") as expected:
        for key in expected["surface"]:
            assert_identical(got["surface"][key][()], expected["surface"][key][()], key)


def test_bad_input_under_torchrun_ends_every_rank_with_rank_0s_one_line(three_ranks_run):
    # the last scenario of the 3-rank launch asked for /surface in a file that holds it: only rank 0 reads it
    folder, run = three_ranks_run
    logs = rank_logs(folder / "logs")
    assert exit_codes(run.stderr) == {0: 2, 1: 2, 2: 2}, run.stderr[-2000:]
    lines = logs[0][1].strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and "already holds /surface" in lines[0], logs
    assert all(logs[rank][1].strip() == "" for rank in (1, 2)), logs
    assert not any("Traceback" in out + err for out, err in logs.values())


def test_every_option_of_a_computing_command_has_a_spelling_that_torchrun_passes_on():
    # torchrun's argparse takes an option that is (a prefix of) one of its own, wherever it stands
    from torch.distributed.run import get_args_parser

    from landscape.cli.main import COMMANDS, MAIN_ONLY, cli
    own = list(get_args_parser()._option_string_actions)

    def passed_on(option: str) -> bool:
        return option not in own and not (option.startswith("--") and any(o.startswith(option) for o in own))
    for name in set(COMMANDS) - set(MAIN_ONLY) - {"reproduce"}:
        command = cli.get_command(None, name)
        for param in command.params:
            if isinstance(param, click.Option):
                assert any(passed_on(option) for option in param.opts + param.secondary_opts), (name, param.opts)
