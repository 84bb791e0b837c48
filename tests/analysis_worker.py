"""Analysis scenarios for ``test_distributed_analyses.py``: run on every rank by torchrun, or in-process as references.

    torchrun --standalone --nproc-per-node N tests/analysis_worker.py FOLDER SCENARIO...

Each scenario runs one or more analyses of a small digits cnn with BatchNorm (``FOLDER/cnn.pt``, from
:func:`write_checkpoints`) on a float64 objective of 301 training examples (shares of 151/150 rows on 2
ranks, 101/100/100 on 3) and writes what the tests compare to ``FOLDER/<scenario>.rank<r>.pkl``; results
files go to ``FOLDER/<scenario>.h5``. ``kill`` makes rank 1 kill itself (SIGKILL) in the middle of a
surface; ``resume`` continues that run. Both record the grid units each rank evaluates in
``FOLDER/<scenario>.units.rank<r>``. ``bad_input`` ends every rank with exit code 2.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

import landscape
from landscape import distributed
from landscape.engine import runner

torch.set_num_threads(1)

EXAMPLES, BATCH = 301, 64
KILL_GRID = (np.linspace(-1.0, 1.0, 12), np.linspace(-1.0, 1.0, 12))
KILL_AFTER = 20   # units rank 1 evaluates before it kills itself
CNN = {"num_classes": 10, "input_shape": (1, 8, 8), "width": 4}


def write_checkpoints(folder: Path) -> None:
    """``cnn.pt`` and ``other.pt`` (the interpolation's target): the same small cnn at two seeds."""
    from helpers import make_model

    from landscape.checkpoint import save_checkpoint
    for name, seed in (("cnn", 0), ("other", 1)):
        save_checkpoint(folder / f"{name}.pt", make_model("cnn", seed=seed), arch="cnn", arch_kwargs=CNN,
                        dataset="digits", optimizer="sgd", optimizer_hparams={}, metrics={}, seed=0)


def objective(folder: Path, split: str = "train", **options: Any) -> landscape.Objective:
    return landscape.load_objective(str(folder / "cnn.pt"), split=split, subset=EXAMPLES, dtype="float64",
                                    device="cpu", batch_size=BATCH, **options)


def surface(folder: Path) -> dict[str, Any]:
    grid = landscape.loss_surface(objective(folder), x=np.linspace(-1, 1, 5), y=np.linspace(-0.5, 0.5, 4),
                                  test_objective=objective(folder, "test"), out=folder / "surface.h5", overwrite=True)
    line = landscape.interpolate(objective(folder), str(folder / "other.pt"), alphas=np.linspace(-0.5, 1.5, 7),
                                 out=folder / "surface.h5", overwrite=True)
    in_memory = landscape.loss_surface(objective(folder), x=np.linspace(-1, 1, 4), y=None)   # (no file)
    return {"surface": grid.arrays, "interpolation": line.arrays, "in_memory": in_memory.arrays}


def radius(folder: Path) -> dict[str, Any]:
    result = landscape.radius_curve(objective(folder), radii=np.geomspace(1e-2, 3.0, 4), draws=3,
                                    out=folder / "radius.h5", overwrite=True)
    return {"arrays": result.arrays, "attrs": {k: result.attrs[k] for k in ("loss_base", "radius_ratio")}}


def spectrum(folder: Path, full: bool = True, **options: Any) -> dict[str, Any]:
    """Loss, gradient, Hessian top-2 + Hutch++ and GGN top-1; ``full``: also SLQ, per-block top-1, and
    empirical-Fisher top-2 and trace, and the saved eigenvalues read back on every rank."""
    data = objective(folder, **options)
    gradient = data.gradient()
    hessian = landscape.hessian_spectrum(data, top_k=2, density=full, n_v=2, lanczos_steps=8, trace=True,
                                         trace_hvps=6)
    result = {"loss": data.loss_and_accuracy(), "gradient": torch.cat([g.reshape(-1) for g in gradient.values()]),
              "hessian": hessian.arrays, "trace": hessian.attrs["trace"], "local_examples": data.num_local_examples,
              "ggn": landscape.hessian_spectrum(data, top_k=1, curvature="ggn").arrays["eigenvalues"]}
    if full:
        fisher = landscape.hessian_spectrum(data, top_k=2, trace=True, trace_method="hutchinson", trace_hvps=8,
                                            curvature="fisher")
        hessian.save(folder / "spectrum.h5", overwrite=True)
        result.update(fisher=fisher.arrays["eigenvalues"], fisher_trace=fisher.attrs["trace"],
                      blocks=landscape.hessian_spectrum(data, top_k=1, per_block=True, tol=1e-3).arrays[
                          "block_eigenvalues"],
                      saved=landscape.Result.load(folder / "spectrum.h5", "hessian").arrays["eigenvalues"])
    return result


def spectrum_host(folder: Path) -> dict[str, Any]:
    """:func:`spectrum` with the evaluation set in host memory, streamed batch by batch."""
    return spectrum(folder, full=False, data_on="host")


def spectrum_bn_train(folder: Path) -> dict[str, Any]:
    """:func:`spectrum` with BatchNorm on batch statistics: shares of whole batches."""
    return spectrum(folder, full=False, bn="train")


def per_batch(folder: Path) -> dict[str, Any]:
    return landscape.minibatch_lambda1(objective(folder), 32, 3).arrays


def cosine(folder: Path) -> dict[str, Any]:
    return landscape.cosine_stability(objective(folder), [0.05, 0.2], [0.0, 0.01], batches=3, draws=2, batch_size=32,
                                      pga_steps=2).arrays


def ratio(folder: Path) -> dict[str, Any]:
    return landscape.gradient_ratio(objective(folder), [0.05, 0.5], batches=3, batch_size=32).arrays


def sharpness(folder: Path) -> dict[str, Any]:
    return landscape.sharpness(objective(folder), [0.05, 0.2], kind="both", m=100, steps=3, draws=2,
                               out=folder / "sharpness.h5", overwrite=True).arrays


@contextlib.contextmanager
def record_units(folder: Path, name: str, then: Callable[[int], None] = lambda count: None) -> Iterator[None]:
    """While inside: append the flat grid units every point evaluation of this rank computes to
    ``<name>.units.rank<r>``, and call ``then(units so far)`` after each."""
    evaluate, log, count = runner.evaluate_points, folder / f"{name}.units.rank{distributed.rank()}", [0]

    def recorded(evaluator, point_of, indices):
        values = evaluate(evaluator, point_of, indices)
        flat = np.ravel_multi_index(tuple(np.array(indices).T), tuple(len(axis) for axis in KILL_GRID))
        with open(log, "a") as handle:
            handle.write("".join(f"{unit}\n" for unit in flat))
        count[0] += len(flat)
        then(count[0])
        return values
    runner.evaluate_points = recorded
    try:
        yield
    finally:
        runner.evaluate_points = evaluate


def killed_surface(folder: Path, resume: bool) -> landscape.Result:
    return landscape.loss_surface(objective(folder), *KILL_GRID, out=folder / "killed.h5", resume=resume,
                                  flush_seconds=0.0)


def kill(folder: Path) -> dict[str, Any]:
    """A surface that rank 1 SIGKILLs itself in, once it has evaluated :data:`KILL_AFTER` units."""
    def die(count: int) -> None:
        if distributed.rank() == 1 and count >= KILL_AFTER:
            os.kill(os.getpid(), signal.SIGKILL)
    with record_units(folder, "kill", die):
        return killed_surface(folder, resume=False).arrays


def resume(folder: Path) -> dict[str, Any]:
    with record_units(folder, "resume"):
        return killed_surface(folder, resume=True).arrays


def cli(folder: Path) -> dict[str, Any]:
    """The commands ``landscape hessian`` and ``landscape radius`` run in this process (float32, the CLI's default)."""
    from landscape.cli.main import cli as command
    for arguments in cli_commands(folder):
        command.main(arguments, prog_name="landscape", standalone_mode=False)
    return {}


def main_only(folder: Path) -> dict[str, Any]:
    """``landscape info`` and ``landscape models``: rank 0 runs them, the other ranks wait for it."""
    from landscape.cli.main import cli as command
    for arguments in (["info", str(folder / "cnn.pt")], ["models"]):
        command.main(arguments, prog_name="landscape", standalone_mode=False)
    return {}


def bad_input(folder: Path) -> dict[str, Any]:
    """``landscape surface`` into ``surface.h5``, which holds /surface already: only rank 0 reads the file, every
    rank must exit with code 2 (this ends the process)."""
    from landscape.cli.main import cli as command
    command.main(["surface", str(folder / "cnn.pt"), "--1d", "--x", "-1:1:3", "--out", str(folder / "surface.h5")],
                 prog_name="landscape", standalone_mode=False)
    return {}


def cli_commands(folder: Path) -> list[list[str]]:
    subset = ["--subset", str(EXAMPLES), "--out", str(folder / "cli.h5")]
    return [["hessian", str(folder / "cnn.pt"), "--top-k", "5", "--trace", "--trace-hvps", "12", *subset],
            ["radius", str(folder / "cnn.pt"), "--radii", "1e-2:3:4", "--draws", "2", *subset]]
SCENARIOS = {f.__name__: f for f in (surface, radius, spectrum, spectrum_host, spectrum_bn_train, per_batch, cosine,
                                     ratio, sharpness, kill, resume, cli, main_only, bad_input)}


def main(folder: str, names: list[str]) -> None:
    distributed.setup()   # (load_objective would too, but record_units needs the rank before it)
    for name in names:
        result = SCENARIOS[name](Path(folder))
        with open(Path(folder) / f"{name}.rank{distributed.rank()}.pkl", "wb") as handle:
            pickle.dump(result, handle)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
