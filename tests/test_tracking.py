"""Sharpness tracked during training (``landscape.tracking``, ``landscape train --track``).

Ground truth: dense float64 Hessians of the tracking subset's loss written here (batch statistics per
training-sized batch, or running ones), eigenvalues by ``eigvalsh``; a cold (random-start) Lanczos at
the same weights; the stability threshold 2(1+β)/η and the cosine learning rate from their formulas;
an uninterrupted run's group for a killed and resumed one.
"""

from __future__ import annotations

import copy
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from clitools import assert_input_error, invoke
from helpers import assert_close
from torch import nn
from torch.func import functional_call

import landscape.store
import landscape.train
from landscape.curvature.hessian import HessianOperator
from landscape.curvature.lanczos import extreme_eigenpairs
from landscape.curvature.operator import DenseOperator
from landscape.data import Dataset
from landscape.errors import LandscapeError
from landscape.objective import Objective
from landscape.plotting.training import THRESHOLD_LABEL
from landscape.store import read_group, sidecar
from landscape.tracking import SharpnessTracker, Tracking, TrainingResult
from landscape.train import train_model


class Snapshots:
    """A callback (before the tracker) keeping a copy of the model at the steps in ``steps``."""

    def __init__(self, steps):
        self.steps, self.models = set(steps), {}

    def __call__(self, *, step, epoch, model, optimizer, lr):
        if step in self.steps:
            self.models[step] = copy.deepcopy(model)

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def float64_digits(digits, count: int) -> Dataset:
    return Dataset(f"digits[:{count}]", "digits", digits.x_train[:count].double(), digits.y_train[:count],
                   digits.x_test[:50].double(), digits.y_test[:50], digits.num_classes, digits.input_shape)


def subset_loss(model: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, batch: int,
                bn: str) -> torch.Tensor:
    """sum_b (|b|/N) CE(model(x_b), y_b) over consecutive batches of ``batch`` rows at ``params``, BatchNorm on each
    batch's statistics (``train``, running statistics not updated) or the running ones (``eval``)."""
    model.train(bn == "train")
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.track_running_stats = False   # in train mode: batch statistics, buffers untouched
    total = x.new_zeros(())
    for start in range(0, len(x), batch):
        rows = slice(start, start + batch)
        total = total + F.cross_entropy(functional_call(model, params, (x[rows],)), y[rows]) * len(x[rows]) / len(x)
    return total


def dense_hessian(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int, bn: str) -> torch.Tensor:
    """The Hessian of :func:`subset_loss` in the parameters (in order), by double backward, row by row
    (``torch.func.hessian`` gives an asymmetric matrix under BatchNorm's batch statistics, torch 2.13)."""
    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]

    def loss(flat: torch.Tensor) -> torch.Tensor:
        return subset_loss(model, {n: t.view(s) for n, t, s in zip(names, flat.split(sizes), shapes)}, x, y, batch, bn)

    return torch.autograd.functional.hessian(loss, torch.cat([p.detach().reshape(-1) for p in model.parameters()]))


# -- the Lanczos start vector ------------------------------------------------------------------

def test_lanczos_started_at_an_eigenvector_converges_at_once_and_a_block_start_is_summed():
    generator = torch.Generator().manual_seed(0)
    q = torch.linalg.qr(torch.randn(40, 40, generator=generator, dtype=torch.float64)).Q
    values = torch.linspace(-1.0, 3.0, 40, dtype=torch.float64)
    operator = DenseOperator((q * values) @ q.T)
    pairs = extreme_eigenpairs(operator, 1, tol=1e-10, start=q[:, -1])
    assert operator.products == 2   # one Lanczos product, one residual check
    assert_close(pairs["top"], [3.0], 1e-12, "λ1")
    operator.products = 0
    pairs = extreme_eigenpairs(operator, 2, tol=1e-10, start=torch.stack([q[:, -1], q[:, -2]]))
    assert operator.products == 4   # the span of the two rows is invariant: two products, two checks
    assert_close(pairs["top"], values[-2:].flip(0), 1e-12, "λ1, λ2")
    for bad, words in [(torch.zeros(40, dtype=torch.float64), "norm 0.0"), (torch.ones(39), "(40,) vector")]:
        with pytest.raises(LandscapeError, match=words.replace("(", r"\(").replace(")", r"\)")):
            extreme_eigenpairs(operator, 1, start=bad)


# -- the tracked values ----------------------------------------------------------------------

@pytest.mark.parametrize("arch, arch_kwargs, bn, steps", [("mlp", {"hidden": [12]}, "train", [2, 4]),
                                                          ("cnn", {"width": 2}, "train", [2, 4]),
                                                          ("cnn", {"width": 2}, "eval", [4])])
def test_tracked_eigenvalues_equal_a_dense_float64_hessians(arch, arch_kwargs, bn, steps, digits, monkeypatch):
    build = landscape.train.build_model
    monkeypatch.setattr(landscape.train, "build_model", lambda *a, **k: build(*a, **k).double())
    data = float64_digits(digits, 200)   # 4 steps of 64, 64, 64, 8
    snapshots = Snapshots(steps)
    tracking = Tracking("lambda1,loss", every=steps[0], subset=70, top_k=2, tol=1e-7, bn=bn)  # batches of 64 and 6
    result = train_model(data, arch, "sgd", epochs=1, batch_size=64, arch_kwargs=arch_kwargs, callbacks=[snapshots],
                         track=tracking).tracking
    rows = torch.as_tensor(result["subset_indices"])
    x, y = data.x_train[rows], data.y_train[rows]
    assert np.array_equal(result["steps"], steps) and result["done"].all()
    for index, step in enumerate(steps):   # the first measurement starts cold, the second warm
        model = copy.deepcopy(snapshots.models[step])
        exact = torch.linalg.eigvalsh(dense_hessian(model, x, y, 64, bn)).numpy()[::-1][:2]
        assert_close(result["eigenvalues"][index], exact, 1e-6, f"λ1, λ2 at step {step}")
        assert result["residuals"][index].max() <= 1e-6 and result["converged"][index].all()
        with torch.no_grad():
            loss = subset_loss(model, dict(model.named_parameters()), x, y, 64, bn)
        assert_close(result["loss"][index], loss, 1e-12, f"loss at step {step}")


def test_warm_started_tracking_equals_cold_lanczos_with_fewer_products(digits):
    snapshots = Snapshots(range(3, 25, 3))
    tracking = Tracking("lambda1", every=3, subset=128)
    result = train_model(digits, "cnn", "sgd", epochs=2, callbacks=[snapshots], track=tracking).tracking
    x, y = digits.x_train[torch.as_tensor(result["subset_indices"])], digits.y_train[result["subset_indices"]]
    cold_values, cold_products = [], 0
    for step in result["steps"]:
        operator = HessianOperator(Objective(snapshots.models[step], x, y, batch_size=128, bn="train"))
        cold_values.append(extreme_eigenpairs(operator, 1, tol=tracking.tol)["top"][0])
        cold_products += operator.products
    warm = result["eigenvalues"][:, 0]
    assert_close(warm, cold_values, tracking.tol, "warm against cold λ1")
    assert result["hvps"].sum() < cold_products, (result["hvps"], cold_products)


def test_tracking_leaves_training_bit_identical_and_the_model_flags_and_buffers_alone(digits):
    options = {"epochs": 1, "batch_size": 256, "arch_kwargs": {"width": 4}, "opt_args": {"rho": 0.1}}
    plain = train_model(digits, "cnn", "sam", **options)
    tracked = train_model(digits, "cnn", "sam", track=Tracking("lambda1,trace,loss", every=2, trace_hvps=6),
                          **options)
    for name, tensor in plain.model.state_dict().items():
        assert torch.equal(tensor, tracked.model.state_dict()[name]), name
    assert tracked.tracking["done"].all() and np.isfinite(tracked.tracking["trace"]).all()

    model, optimizer = tracked.model.train(), tracked.optimizer
    model[0].eval()   # a mixed state must come back as it was
    flags = [module.training for module in model.modules()]
    buffers = {name: tensor.clone() for name, tensor in model.named_buffers()}
    tracker = SharpnessTracker(Tracking("lambda1,loss", every=1), digits, steps_per_epoch=6, total_steps=6,
                               batch_size=256)
    values = tracker.measure(model, optimizer, 0.1, 1)
    assert [module.training for module in model.modules()] == flags
    for name, tensor in model.named_buffers():
        assert torch.equal(tensor, buffers[name]), name
    assert values["threshold"] == 2 * (1 + 0.9) / 0.1 and values["eigenvalues"][0] > 0


# -- crash safety and resume --------------------------------------------------------------------

KILL_AFTER_WRITE = """
import os, signal, sys
import landscape.store as store
write = store.IncrementalGroup.write
def write_then_die(self, start, values):
    write(self, start, values)
    if self.group == "training" and start == int(sys.argv[1]):
        os.kill(os.getpid(), signal.SIGKILL)
store.IncrementalGroup.write = write_then_die
from landscape.cli.main import cli
cli(sys.argv[2:])
"""


def test_a_killed_run_resumes_with_no_measurement_lost_or_written_twice(tmp_path, monkeypatch):
    command = ["train", "--epochs", "3", "--arch-kwargs", '{"width": 4}', "--track", "lambda1,loss",
               "--track-every", "4", "--track-subset", "64"]   # 12 steps an epoch; measurements at 4, 8, ..., 36
    assert invoke(*command, "--out", tmp_path / "whole.pt").exit_code == 0
    killed = subprocess.run([sys.executable, "-c", KILL_AFTER_WRITE, "4", *command, "--out", str(tmp_path / "run.pt")],
                            capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr   # SIGKILL after the measurement of step 20, in epoch 2
    assert (tmp_path / "run.pt.state").exists() and not (tmp_path / "run.h5").exists()
    with h5py_file(sidecar(tmp_path / "run.h5", "training")) as partial:
        assert partial["done"][()].tolist() == [True] * 5 + [False] * 4

    written = []
    write = landscape.store.IncrementalGroup.write
    monkeypatch.setattr(landscape.store.IncrementalGroup, "write",
                        lambda self, start, values: (written.append(start), write(self, start, values))[1])
    refused = invoke(*command, "--out", tmp_path / "run.pt")
    assert_input_error(refused, "--resume")
    resumed = invoke(*command, "--out", tmp_path / "run.pt", "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert written == [5, 6, 7, 8]   # steps 16 and 20 are measured again (the warm start) but not rewritten
    assert not sidecar(tmp_path / "run.h5", "training").exists()
    arrays, attrs = read_group(tmp_path / "run.h5", "training")
    expected, expected_attrs = read_group(tmp_path / "whole.h5", "training")
    assert np.array_equal(arrays["steps"], np.arange(4, 37, 4)) and arrays["done"].all()
    assert arrays.keys() == expected.keys() and attrs["config"] == expected_attrs["config"]
    for name in arrays.keys() - {"seconds"}:
        assert np.array_equal(arrays[name], expected[name]), name   # bit for bit


def h5py_file(path: Path):
    import h5py
    return h5py.File(path, "r")


# -- the figure and the summary -----------------------------------------------------------------

@pytest.mark.parametrize("momentum", [0.9, 0.0])
def test_the_threshold_line_is_2_1_plus_beta_over_the_stored_cosine_lr(momentum, digits, tmp_path):
    lr, epochs, batch = 0.05, 2, 256   # 6 steps an epoch, 12 in all
    result = train_model(digits, "cnn", "sgd", epochs=epochs, batch_size=batch, lr=lr, momentum=momentum,
                         arch_kwargs={"width": 2}, track=Tracking("lambda1", every=3, subset=64),
                         out=str(tmp_path / "run.pt")).tracking
    steps = np.arange(3, 13, 3)
    cosine = lr * (1 + np.cos(np.pi * (steps - 1) / 12)) / 2   # the rate of step t: t - 1 decays before it
    assert_close(result["lr"], cosine, 1e-12, "stored learning rate")
    assert np.array_equal(result["momentum"], np.full(4, momentum))
    saved = TrainingResult.load(tmp_path / "run.h5")
    figure = saved.plot(tmp_path / "figure.png")
    lines = [line for line in figure.axes[0].lines if line.get_label().endswith(THRESHOLD_LABEL)]
    assert len(lines) == 1
    assert np.array_equal(lines[0].get_xdata(), steps)
    assert_close(lines[0].get_ydata(), 2 * (1 + momentum) / saved["lr"], 1e-12, "the threshold line")
    assert (tmp_path / "figure.png").stat().st_size > 0
    assert f"{steps[-1]:>7d}" in saved.summary() and "λ1 >= 2(1+β)/η at 0 of 4 measurements" in saved.summary()


def test_the_plot_command_draws_one_run_and_compares_two(tmp_path, digits):
    for name in ("sgd", "sam"):
        train_model(digits, "cnn", name, epochs=1, batch_size=256, arch_kwargs={"width": 2},
                    track=Tracking("lambda1,loss,trace", every=3, subset=32, trace_hvps=6), out=str(tmp_path / f"{name}.pt"))
    single = invoke("plot", tmp_path / "sgd.h5")
    assert single.exit_code == 0 and (tmp_path / "sgd_training.png").exists(), single.output
    both = invoke("plot", tmp_path / "sgd.h5", tmp_path / "sam.h5", "--labels", "SGD,SAM", "--group", "training")
    assert both.exit_code == 0 and (tmp_path / "compare_training.png").exists(), both.output


# -- bad input -------------------------------------------------------------------------------------

@pytest.mark.parametrize("arguments, words", [
    (["--track", "lambda2"], "unknown --track metric 'lambda2'"),
    (["--track", "lambda1", "--track-every", "0"], "--track-every takes N steps or Ne epochs"),
    (["--track", "lambda1", "--track-every", "3x"], "got '3x'"),
    (["--track", "lambda1", "--track-every", "2e"], "more than the run's 12"),
    (["--track", "trace", "--track-top-k", "3"], "needs lambda1 in --track"),
    (["--track", "lambda1", "--track-every", "1", "--track-subset", "5000"], "more than the 1437 training examples"),
    (["--track", "lambda1", "--track-tol", "2"], "--track-tol must be in (0, 1)"),
    (["--track-every", "5"], "add --track METRICS"),
])
def test_bad_tracking_options_are_one_line_with_exit_code_2(arguments, words, tmp_path):
    result = invoke("train", "--epochs", "1", "--out", tmp_path / "x.pt", *arguments)
    assert_input_error(result, words)
    assert not (tmp_path / "x.pt").exists() and not (tmp_path / "x.h5").exists()


def test_an_existing_training_group_needs_overwrite_and_a_diverged_run_keeps_its_measurements(tmp_path):
    command = ["train", "--epochs", "1", "--arch", "mlp", "--track", "lambda1", "--track-every", "1",
               "--track-out", tmp_path / "t.h5", "--out", tmp_path / "x.pt"]
    assert invoke(*command, "--arch-kwargs", '{"hidden": [8]}').exit_code == 0
    assert_input_error(invoke(*command, "--arch-kwargs", '{"hidden": [8]}'), "already holds /training", "--overwrite")
    diverged = invoke(*command, "--lr", "1000", "--overwrite")
    assert_input_error(diverged, "training diverged at epoch 1, step 5")
    result = TrainingResult.load(tmp_path / "t.h5")
    assert result.attrs["stopped_early"] and result["done"].tolist() == [True] * 4 + [False] * 8
    assert np.isnan(result["eigenvalues"][4:]).all() and result["eigenvalues"][0, 0] > 0
    assert not sidecar(tmp_path / "t.h5", "training").exists()


def test_python_tracking_options_are_checked_up_front():
    for options, words in [({"metrics": ""}, "unknown --track metric"), ({"every": True}, "--track-every"),
                           ({"bn": "frozen"}, "--track-bn"), ({"trace_hvps": 3}, "--track-trace-hvps")]:
        with pytest.raises(LandscapeError, match=words):
            Tracking(**options)
