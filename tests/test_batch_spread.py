"""lambda1 over disjoint mini-batches (``minibatch_lambda1``, ``landscape hessian --per-batch``) and the
objective over an example subset (``Objective.derive(examples=...)``).

Ground truth: the batches re-drawn here from their documented recipe (the first ``batches * per_batch``
entries of ``torch.randperm(N)`` on a CPU generator seeded by ``seed``, each batch sorted), each batch's
dense Hessian by ``torch.autograd.functional.hessian`` of the cross-entropy written here (and its dense
GGN by ``torch.autograd.functional.jacobian``), ``eigvalsh``, and numpy's mean, std, histogram.
"""

from __future__ import annotations

import math

import clitools
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from landscape.analysis.hessian import BatchSpreadResult, minibatch_lambda1
from landscape.errors import LandscapeError
from landscape.objective import Objective
from test_ggn_fisher import flat_call

N, PER_BATCH, BATCHES, SEED = 60, 12, 4, 3


@pytest.fixture(scope="module")
def setup(digits):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.Tanh(), nn.Linear(8, 10)).double()
    x, y = digits.x_train[:N].double(), digits.y_train[:N]
    return model, x, y, Objective(model, x, y, batch_size=5)   # batches of 5 inside every mini-batch of 12


def dense_lambda1(model: nn.Module, x: torch.Tensor, y: torch.Tensor, curvature: str) -> float:
    flat, outputs = flat_call(model)
    if curvature == "hessian":
        matrix = torch.autograd.functional.hessian(lambda w: F.cross_entropy(outputs(w, x), y), flat)
    else:
        jacobian = torch.autograd.functional.jacobian(lambda w: outputs(w, x), flat)
        p = torch.softmax(outputs(flat, x), dim=1).detach()
        h = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        matrix = torch.einsum("ncd,nce,nef->df", jacobian, h, jacobian) / len(x)
    return float(torch.linalg.eigvalsh(matrix)[-1])


def documented_batches() -> np.ndarray:
    order = torch.randperm(N, generator=torch.Generator().manual_seed(SEED))[:PER_BATCH * BATCHES]
    return np.sort(order.numpy().reshape(BATCHES, PER_BATCH), axis=1)


def test_derived_examples_are_the_objective_on_those_rows(setup):
    model, x, y, objective = setup
    rows = np.array([7, 3, 41, 3, 59])
    derived = objective.derive(examples=rows)
    flat, outputs = flat_call(model)
    assert derived.num_examples == 5 and objective.num_examples == N
    assert derived.loss() == pytest.approx(float(F.cross_entropy(outputs(flat, x[rows]), y[rows])), rel=1e-12)
    assert derived.provenance()["examples"]["n"] == 5 and "examples" not in objective.provenance()
    both = objective.derive(examples=torch.tensor(rows), params="3.*")
    assert list(both.params) == ["3.weight", "3.bias"] and both.provenance()["params"] == "3.weight,3.bias"
    assert both.provenance()["examples"] == derived.provenance()["examples"]
    for bad in ([], [0, N], [-1], [[1, 2]], [0.5]):
        with pytest.raises(LandscapeError, match=r"non-empty 1-D array of integer indices in \[0, 60\)"):
            objective.derive(examples=np.array(bad))


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_batch_lambda1_equals_dense_top_eigenvalues_and_numpy_statistics(setup, curvature):
    model, x, y, objective = setup
    passes: list[int] = []
    result = minibatch_lambda1(objective, PER_BATCH, BATCHES, curvature=curvature, tol=1e-10, seed=SEED,
                               progress=passes.append)
    indices = documented_batches()
    np.testing.assert_array_equal(result["batch_indices"], indices)
    assert len(np.unique(indices)) == indices.size, "the batches overlap"
    expected = [dense_lambda1(model, x[rows], y[rows], curvature) for rows in indices]
    values = result["batch_lambda1"]
    np.testing.assert_allclose(values, expected, rtol=1e-8)
    assert result["batch_converged"].all() and result["all_converged"]
    assert result["mean"] == pytest.approx(np.mean(values), rel=1e-14)
    assert result["std"] == pytest.approx(np.std(values, ddof=1), rel=1e-14)
    assert result["stderr"] == pytest.approx(np.std(values, ddof=1) / math.sqrt(BATCHES), rel=1e-14)
    counts, edges = np.histogram(values, bins="sturges")
    np.testing.assert_array_equal(result["histogram_counts"], counts)
    np.testing.assert_array_equal(result["histogram_edges"], edges)
    assert result["hvp_count"] == sum(passes) and result.group == f"{curvature}_batches"


def test_result_saves_loads_and_plots(setup, tmp_path):
    _, _, _, objective = setup
    result = minibatch_lambda1(objective, 10, 3, seed=1)
    path = result.save(tmp_path / "b.h5")
    loaded = BatchSpreadResult.load(path, "hessian_batches")
    np.testing.assert_array_equal(loaded["batch_lambda1"], result["batch_lambda1"])
    assert loaded.summary() == result.summary() and loaded["config"]["per_batch"] == 10
    for text in ("mini-batches of 10", "batch 3", "mean", "std", "stderr", "max/min", "HVPs"):
        assert text in loaded.summary()
    loaded.plot(tmp_path / "b.png")
    assert (tmp_path / "b.png").stat().st_size > 0


@pytest.mark.parametrize("kwargs, message", [
    ({"per_batch": 20, "batches": 4}, "need 80 examples; the evaluation set has 60"),
    ({"per_batch": 10, "batches": 1}, "batches >= 2"),
    ({"per_batch": 10, "batches": 3, "curvature": "fim"}, "unknown curvature"),
    ({"per_batch": 10, "batches": 3, "tol": 0.0}, "tol must be in"),
])
def test_bad_input_is_a_one_line_error(setup, kwargs, message):
    with pytest.raises(LandscapeError, match=message) as info:
        minibatch_lambda1(setup[3], **kwargs)
    assert "\n" not in str(info.value)


def invoke(*args):
    return clitools.invoke("hessian", *args)


def test_cli_prints_the_summary_saves_and_plots(checkpoint, tmp_path):
    out = tmp_path / "s.h5"
    options = ("--per-batch", 8, "--batches", 3, "--curvature", "ggn", "--subset", 40, "--dtype", "float64")
    result = invoke(checkpoint, *options, "--out", out)
    assert result.exit_code == 0, result.output
    stored = BatchSpreadResult.load(out, "ggn_batches")
    assert stored.summary() in result.output and "saved /ggn_batches in" in result.output
    assert stored["batch_lambda1"].shape == (3,) and stored["batch_indices"].shape == (3, 8)
    assert stored["eval_set"]["n"] == 40
    resumed = invoke(checkpoint, *options, "--out", out, "--resume")  # the same options: reused
    assert resumed.exit_code == 0 and stored.summary() in resumed.output
    plotted = clitools.invoke("plot", out, "--out-dir", tmp_path)
    assert plotted.exit_code == 0 and (tmp_path / "s_ggn_batches.png").stat().st_size > 0


@pytest.mark.parametrize("args, message", [
    (["--batches", "4"], "--batches needs --per-batch"),
    (["--per-batch", "30", "--batches", "4"], "need 120 examples"),
    (["--per-batch", "4", "--density"], "drop --density"),
    (["--per-batch", "4", "--top-k", "3"], "drop --top-k"),
    (["--per-batch", "4", "--batches", "1"], "--batches"),
])
def test_cli_bad_per_batch_options_exit_2(checkpoint, tmp_path, args, message):
    result = invoke(checkpoint, "--subset", 16, "--out", tmp_path / "x.h5", *args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "x.h5").exists()
