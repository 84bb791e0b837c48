"""Loss surfaces and interpolation, checked against hand-built perturbed models evaluated with a plain forward."""

import copy
import logging
import subprocess
import sys

import crashtools
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from helpers import assert_close, make_model
from torch import nn

from landscape.analysis.surface import InterpolationResult, SurfaceResult, interpolate, loss_surface
from landscape.checkpoint import save_checkpoint
from landscape.cli.main import cli
from landscape.data import eval_subset
from landscape.engine import evaluator as evaluator_module
from landscape.engine import graph, rewrites, runner
from landscape.engine.evaluator import PointEvaluator
from landscape.errors import LandscapeError
from landscape.objective import Objective
from landscape.params import surface_directions
from landscape.results import Result
from landscape.store import MemoryGroup


@pytest.fixture(scope="module")
def data(digits):
    x, y, _ = eval_subset(*digits.split("train"), 160, 0)
    return x.double(), y


def perturbed(model: nn.Module, moves: dict[str, torch.Tensor]) -> nn.Module:
    """An independent float64 copy of ``model`` with ``moves`` added to its state (load_state_dict)."""
    copy_ = copy.deepcopy(model).double()
    state = copy_.state_dict()
    copy_.load_state_dict({n: t + moves[n] if n in moves else t for n, t in state.items()})
    return copy_.eval()


def plain_metrics(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        out = model(x)
    return float(F.cross_entropy(out, y)), float((out.argmax(1) == y).double().mean())


def test_filter_normalised_directions_have_the_weights_filter_norms():
    params = {n: p.detach().double() for n, p in make_model("cnn").named_parameters()}
    for include_biasbn in (False, True):
        x, y = surface_directions(params, seed=5, include_biasbn=include_biasbn)
        for name, w in params.items():
            for d in (x, y):
                if w.ndim >= 2:
                    expected, actual = w.flatten(1).norm(dim=1), d[name].flatten(1).norm(dim=1)
                    assert_close(actual, expected, 1e-10, f"filter norms of {name}")
                elif include_biasbn:
                    assert_close(d[name].norm(), w.norm(), 1e-10, f"norm of {name}")
                else:
                    assert not d[name].any(), f"{name} should not move without include_biasbn"
    layer = surface_directions(params, 1, seed=5, normalization="layer")[0]
    for name, w in params.items():
        if w.ndim >= 2:
            assert_close(layer[name].norm(), w.norm(), 1e-10, f"layer norm of {name}")
    x, y = surface_directions(params, seed=5, orthogonal=True)
    dot = sum(float((x[n] * y[n]).sum()) for n in params)
    assert abs(dot) < 1e-10 * sum(float(x[n].norm() * y[n].norm()) for n in params)


PLAIN = {"fold_batchnorm": False, "channels_last": False, "micro_batch": False, "linear_first_layer": False,
         "stack_points": False, "inplace_activations": False}
FAST = dict.fromkeys(PLAIN, True)
STACKED = {**PLAIN, "stack_points": 4}  # stacked points without the first-layer cache, 15 points in 4 groups


@pytest.mark.parametrize("name,options", [("mlp", PLAIN), ("mlp", FAST), ("mlp", STACKED), ("cnn", PLAIN),
                                          ("cnn", FAST)])
def test_surface_equals_hand_built_perturbed_models_on_a_non_square_grid(data, name, options):
    x, y = data
    model = make_model(name)
    objective = Objective(model, x, y, dtype=torch.float64, batch_size=64)
    xs, ys = np.linspace(-0.6, 1.0, 5), np.array([-0.25, 0.0, 0.5])
    result = loss_surface(objective, xs, ys, seed=3, evaluator_options=options)
    used = result.attrs["speedups"]
    assert used["linear_first_layer"] == options["linear_first_layer"]
    assert (used["fold_batchnorm"] == 3, used["channels_last"]) == ((name == "cnn" and options is FAST),) * 2
    assert (used["stack_points"] > 1) == (name == "mlp" and options is not PLAIN), "only Linear layers move: stacked"
    assert result["train_loss"].shape == (5, 3) and result["train_acc"].shape == (5, 3) and result["done"].all()
    d1, d2 = surface_directions(objective.params, seed=3)
    expected = np.array([[plain_metrics(perturbed(model, {n: a * d1[n] + b * d2[n] for n in d1}), x, y)
                          for b in ys] for a in xs])
    assert_close(result["train_loss"], expected[..., 0], 1e-10, "loss (x along axis 0)")
    assert_close(result["train_acc"], expected[..., 1], 1e-12, "accuracy")
    stored = result.directions()
    for name_, tensor in d1.items():
        assert_close(stored[0][name_], tensor.float(), 1e-6, f"stored xdirection {name_}")
        assert_close(stored[1][name_], d2[name_].float(), 1e-6, f"stored ydirection {name_}")


def test_automatic_speedups_agree_with_the_plain_path_in_float32(data):
    x, y = data
    objective = Objective(make_model("cnn"), x.float(), y, batch_size=64)
    fast = loss_surface(objective, np.linspace(-1, 1, 3), np.linspace(-1, 1, 3), seed=4)
    plain = loss_surface(objective, np.linspace(-1, 1, 3), np.linspace(-1, 1, 3), seed=4, evaluator_options=PLAIN)
    assert fast.attrs["speedups"] == {"fold_batchnorm": 3, "channels_last": True, "micro_batch": 0,
                                      "linear_first_layer": True, "stack_points": 1, "inplace_activations": 3}
    assert_close(fast["train_loss"], plain["train_loss"], 1e-5, "float32 loss with and without speed-ups")


def test_micro_batches_keep_the_exact_mean_and_skip_batch_statistics_and_ignored_targets(data, monkeypatch):
    x, y = data
    model = make_model("cnn")
    widest = 8 * 8 * 8 * 8  # bytes per example of the cnn's widest output: 8 float64 channels of 8x8
    monkeypatch.setattr(rewrites, "MICRO_BATCH_BYTES", 5 * widest)
    objective = Objective(model, x, y, dtype=torch.float64, batch_size=64)
    xs, ys = np.array([-0.5, 0.75]), np.array([0.0, 1.0])
    result = loss_surface(objective, xs, ys, seed=2, evaluator_options={"micro_batch": True})
    assert result.attrs["speedups"]["micro_batch"] == 5
    d1, d2 = surface_directions(objective.params, seed=2)
    expected = np.array([[plain_metrics(perturbed(model, {n: a * d1[n] + b * d2[n] for n in d1}), x, y)
                          for b in ys] for a in xs])
    assert_close(result["train_loss"], expected[..., 0], 1e-10, "loss from 5-row chunks of 64-row batches")
    assert_close(result["train_acc"], expected[..., 1], 1e-12, "accuracy from 5-row chunks")
    batch_statistics = Objective(model, x, y, dtype=torch.float64, batch_size=64, bn="train")
    assert PointEvaluator({"train": batch_statistics}, [d1], micro_batch=True).speedups["micro_batch"] == 0
    ignored = y.clone()
    ignored[::5] = -100  # a chunk's mean over the rows it keeps would weight them differently
    with_ignored = Objective(model, x, ignored, dtype=torch.float64, batch_size=64)
    assert PointEvaluator({"train": with_ignored}, [d1], micro_batch=True).speedups["micro_batch"] == 0

    class NeedsRows(nn.Module):  # a model that cannot take a single example keeps whole batches
        def forward(self, inputs: torch.Tensor) -> torch.Tensor:
            assert len(inputs) > 1, "one example"
            return inputs

    picky = nn.Sequential(copy.deepcopy(model), NeedsRows())
    objective = Objective(picky, x, y, dtype=torch.float64, batch_size=64)
    evaluator = PointEvaluator({"train": objective}, surface_directions(objective.params, seed=2), micro_batch=True)
    assert evaluator.speedups["micro_batch"] == 0
    assert_close(evaluator.evaluate([[0.0, 0.0]])["train_loss"], [plain_metrics(perturbed(model, {}), x, y)[0]], 1e-10, "loss")


class Recorder:
    """A stand-in evaluator that stacks ``stack`` points per forward: records the points of every
    call; a point (i, j) is worth 10 i + j."""

    def __init__(self, stack: int) -> None:
        self.stack, self.calls = stack, []

    def evaluate(self, points):
        self.calls.append([tuple(point) for point in points])
        return {"train_loss": np.array([10.0 * i + j for i, j in points])}


def test_points_go_in_fixed_blocks_whatever_is_already_done():
    """Blocks start at multiples of the stack size in grid order and go whole into one call, so a
    resumed run stacks every point with the same others as an uninterrupted one."""
    sink = MemoryGroup(["train_loss"], (4, 3), {})
    sink.write(0, {"train_loss": [0.0, 1.0, 2.0]})  # block 0 done
    sink.write(6, {"train_loss": [20.0, 21.0, 22.0]})  # block 2 done
    sink.write(9, {"train_loss": [30.0]})  # block 3 partly marked (a kill inside its done write)
    recorder, progress = Recorder(stack=3), []
    runner.run_points(sink, recorder, lambda index: index, lambda *p: progress.append(p), flush_seconds=0)
    assert recorder.calls == [[(1, 0), (1, 1), (1, 2)], [(3, 0), (3, 1), (3, 2)]]
    np.testing.assert_array_equal(sink.values["train_loss"], 10.0 * np.arange(4)[:, None] + np.arange(3))
    assert sink.done.all() and progress == [(7, 12), (10, 12), (12, 12)]


def test_the_first_block_is_written_at_once_then_every_flush_interval():
    """An early write: a first time per point for the estimate of the rest, and early progress."""
    sink, recorder, progress = MemoryGroup(["train_loss"], (1, 5), {}), Recorder(stack=2), []
    runner.run_points(sink, recorder, lambda index: index, lambda *p: progress.append(p), flush_seconds=60.0)
    assert progress == [(0, 5), (2, 5), (5, 5)] and recorder.calls[0] == [(0, 0), (0, 1)]


def test_evaluate_blocks_evaluates_exactly_the_blocks_it_is_given():
    """The seam for sharing points out: any list of whole blocks, evaluated apart from the sink, in the
    same stacks as a whole run, coming back as (units, values) chunks: the first at once, the rest at the end."""
    recorder, done = Recorder(stack=3), np.zeros(12, dtype=bool)
    done[[0, 1, 2, 6, 7, 8, 9]] = True  # blocks 0 and 2 done, block 3 partly
    assert runner.pending_blocks(done, 3).tolist() == [3, 9]
    chunks = list(runner.evaluate_blocks(recorder, lambda index: index, (4, 3), [9, 3], flush_seconds=60.0))
    assert [units.tolist() for units, _ in chunks] == [[9, 10, 11], [3, 4, 5]]
    assert [values["train_loss"].tolist() for _, values in chunks] == [[30.0, 31.0, 32.0], [10.0, 11.0, 12.0]]
    assert recorder.calls == [[(3, 0), (3, 1), (3, 2)], [(1, 0), (1, 1), (1, 2)]]


def test_one_dimensional_slice_on_two_splits(data, digits):
    x, y = data
    x_test, y_test = digits.split("test")
    model = make_model("mlp")
    train = Objective(model, x, y, dtype=torch.float64)
    test = Objective(model, x_test[:50].double(), y_test[:50], dtype=torch.float64)
    xs = np.linspace(-1, 1, 7)
    result = loss_surface(train, xs, None, test_objective=test, seed=1)
    assert "ycoordinates" not in result and "ydirection" not in result
    d1 = surface_directions(train.params, 1, seed=1)[0]
    for split, (inputs, targets) in {"train": (x, y), "test": (x_test[:50].double(), y_test[:50])}.items():
        assert result[f"{split}_loss"].shape == (7,)
        expected = [plain_metrics(perturbed(model, {n: a * d1[n] for n in d1}), inputs, targets) for a in xs]
        assert_close(result[f"{split}_loss"], [e[0] for e in expected], 1e-10, f"{split} loss")


def test_bn_recompute_equals_torch_update_bn_at_each_point(data):
    x, y = data
    model = make_model("cnn")
    objective = Objective(model, x, y, dtype=torch.float64, batch_size=len(x))
    xs, ys = np.array([0.0, 0.8]), np.array([-0.5])
    result = loss_surface(objective, xs, ys, seed=2, bn_recompute=True)
    d1, d2 = surface_directions(objective.params, seed=2)
    for i, a in enumerate(xs):
        reference = perturbed(model, {n: a * d1[n] + ys[0] * d2[n] for n in d1})
        torch.optim.swa_utils.update_bn([(x,)], reference)  # one batch: exact statistics of the set
        assert_close(result["train_loss"][i, 0], plain_metrics(reference.eval(), x, y)[0], 1e-9, f"loss at x={a}")
    stale = loss_surface(objective, xs, ys, seed=2)
    assert not np.allclose(stale["train_loss"][1], result["train_loss"][1]), "recompute should change the loss"


def test_model_and_objective_unchanged_after_runs(data, tmp_path):
    x, y = data
    model = make_model("cnn")
    model.train()
    model.get_submodule("1").eval()
    flags = [m.training for m in model.modules()]
    state = {n: t.clone() for n, t in model.state_dict().items()}
    objective = Objective(model, x, y, dtype=torch.float64)
    params = {n: t.clone() for n, t in objective.params.items()}
    loss_surface(objective, np.linspace(-1, 1, 3), np.linspace(-1, 1, 2), bn_recompute=True, out=tmp_path / "s.h5")
    interpolate(objective, make_model("cnn", seed=1), [0.0, 0.5], move_buffers=True)
    assert [m.training for m in model.modules()] == flags
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state[name]), f"model {name} changed"
    for name, tensor in objective.params.items():
        assert torch.equal(tensor, params[name]), f"objective {name} changed"


def test_divergent_points_are_stored_as_they_come(data):
    x, y = data
    objective = Objective(make_model("mlp"), x.float(), y)
    result = loss_surface(objective, [0.0, 1e30, 1e38], None, normalization="none")
    loss = result["train_loss"]
    assert np.isfinite(loss[0]) and not np.isfinite(loss[1:]).any() and result["done"].all()


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_interpolation_ends_equal_each_checkpoint(data, tmp_path, name):
    x, y = data
    model_a, model_b = make_model(name, 0), make_model(name, 1)
    path_b = tmp_path / "b.pt"
    save_checkpoint(path_b, model_b, arch=name, arch_kwargs={"num_classes": 10, "input_shape": [1, 8, 8],
                    **({"hidden": [12]} if name == "mlp" else {"width": 4})}, dataset="digits", optimizer="none",
                    optimizer_hparams={}, metrics={}, seed=1)
    objective = Objective(model_a, x, y, dtype=torch.float64)
    alphas = [-0.5, 0.0, 0.5, 1.0]
    result = interpolate(objective, str(path_b), alphas, move_buffers=True)
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    floating = [n for n, t in state_a.items() if t.is_floating_point()]
    middle = perturbed(model_a, {n: 0.5 * (state_b[n].double() - state_a[n].double()) for n in floating})
    expected = [plain_metrics(model_a.double(), x, y)[0], plain_metrics(middle, x, y)[0],
                plain_metrics(model_b.double(), x, y)[0]]
    assert_close(result["train_loss"][1:], expected, 1e-9, "loss at alpha 0, 0.5, 1")
    assert result.attrs["target_sha256"] and result["alphas"].tolist() == alphas


class Residual(nn.Module):
    """An MLP that adds its input to its output: stacked points cannot run it (rows differ)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 16), nn.Linear(16, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1)
        return self.fc2(torch.relu(self.fc1(flat))) + flat


def test_models_that_cannot_stack_points_fall_back_without_losing_other_speedups(data):
    x, y = data
    torch.manual_seed(0)
    objective = Objective(Residual().double(), x, y, batch_size=64)
    directions = surface_directions(objective.params, seed=2)
    fast = PointEvaluator({"train": objective}, directions)
    assert fast.speedups["stack_points"] == 1 and fast.speedups["linear_first_layer"]
    plain = PointEvaluator({"train": objective}, directions, **PLAIN)
    points = [[0.3, -0.2], [1.0, 0.5], [-0.7, 0.0]]
    assert_close(fast.evaluate(points)["train_loss"], plain.evaluate(points)["train_loss"], 1e-12, "fallback loss")


def test_stacked_cross_entropy_skips_ignored_targets_like_torch(data):
    x, y = data
    y = y.clone()
    y[::5] = -100
    objective = Objective(make_model("mlp").double(), x, y, batch_size=64)
    directions = surface_directions(objective.params, seed=2)
    stacked = PointEvaluator({"train": objective}, directions, stack_points=3)
    plain = PointEvaluator({"train": objective}, directions, **PLAIN)
    assert stacked.speedups["stack_points"] == 3
    points = [[0.3, -0.2], [1.0, 0.5], [-0.7, 0.0], [0.1, 0.1]]
    assert_close(stacked.evaluate(points)["train_loss"], plain.evaluate(points)["train_loss"], 1e-12, "loss")


class LogSoftmaxOutput(nn.Module):
    """An MLP that returns log-probabilities: its last Linear layer's output is not the model's."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 16), nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.fc2(torch.relu(self.fc1(x.flatten(1)))), dim=1)


@pytest.mark.parametrize("head_is_output", [True, False])
def test_stacked_scores_by_point_only_when_the_head_gives_the_models_output(data, head_is_output):
    x, y = data
    torch.manual_seed(0)
    model = make_model("mlp").double() if head_is_output else LogSoftmaxOutput().double()
    objective = Objective(model, x, y, batch_size=64)
    directions = surface_directions(objective.params, seed=2)
    stacked = PointEvaluator({"train": objective}, directions, stack_points=3)
    assert stacked.speedups["stack_points"] == 3 and stacked.scores_by_point == head_is_output
    points = [[0.3, -0.2], [1.0, 0.5], [-0.7, 0.0], [0.1, 0.1]]
    got = stacked.evaluate(points)
    expected = np.array([plain_metrics(perturbed(model, {n: a * directions[0][n] + b * directions[1][n]
                                                        for n in directions[0]}), x, y) for a, b in points])
    assert_close(got["train_loss"], expected[:, 0], 1e-12, "loss")
    assert_close(got["train_acc"], expected[:, 1], 1e-12, "accuracy")


class SharedActivation(nn.Module):
    """``act`` runs on a fresh layer output and on one read again later; ``out_act`` on a fresh sum."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(64, 16), nn.Linear(16, 16), nn.Linear(16, 10)
        self.act, self.out_act = nn.ReLU(), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.fc1(x.flatten(1))
        mixed = self.fc2(self.act(self.act(hidden) + 0.5)) + hidden  # hidden is read after act
        return self.head(self.out_act(mixed))


def test_activations_overwrite_only_tensors_nothing_else_reads(data):
    x, y = data
    torch.manual_seed(0)
    model = SharedActivation().double().eval()
    assert graph.activations_on_fresh_tensors(model, graph.trace(model)) == ["out_act"]
    objective = Objective(model, x, y, batch_size=64)
    directions = surface_directions(objective.params, seed=2)
    fast = PointEvaluator({"train": objective}, directions)
    assert fast.speedups["inplace_activations"] == 1
    points = [[0.3, -0.2], [1.0, 0.5], [-0.7, 0.0]]
    got = fast.evaluate(points)
    expected = np.array([plain_metrics(perturbed(model, {n: a * directions[0][n] + b * directions[1][n]
                                                        for n in directions[0]}), x, y) for a, b in points])
    assert_close(got["train_loss"], expected[:, 0], 1e-12, "loss")
    assert not model.out_act.inplace, "the objective's own model is never changed"


class TwiceCalled(nn.Module):
    """Calls its first layer twice per forward, the second time on the pixels in reverse order."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.head = nn.Linear(64, 16), nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1)
        return self.head(torch.relu(self.fc(flat) + self.fc(flat.flip(1))))


class SharedAtTwoDepths(nn.Module):
    """One weight-shared 64 -> 64 layer used at two depths."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.head = nn.Linear(64, 64), nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc(torch.tanh(self.fc(x.flatten(1)))))


class ScaledInput(nn.Module):
    """The first layer's input is an expression of the model input, not the input."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.head = nn.Linear(64, 16), nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc(x.flatten(1) * 2)))


class ConcatenatedInput(nn.Module):
    """The first layer takes the input twice side by side."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.head = nn.Linear(128, 16), nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1)
        return self.head(torch.relu(self.fc(torch.cat([flat, flat], dim=1))))


class Untraceable(nn.Module):
    """An MLP with Python control flow on a tensor, which torch.fx cannot trace."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.head = nn.Linear(64, 16), nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.fc(x.flatten(1))
        return self.head(torch.relu(hidden) if x.shape[0] > 0 else hidden)


def debug_messages(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG
                     and r.name.startswith("landscape.engine"))


@pytest.mark.parametrize("model_class, reason", [
    (TwiceCalled, "the first layer fc is called 2 times per forward"),
    (SharedAtTwoDepths, "the first layer fc is called 2 times per forward"),
    (ScaledInput, "the input of the first layer fc is not the model input"),
    (ConcatenatedInput, "the input of the first layer fc is not the model input"),
    (Untraceable, "torch.fx cannot trace the Untraceable model"),
])
def test_the_first_layer_cache_is_refused_from_the_graph_with_a_logged_reason(data, caplog, model_class, reason):
    """A first layer called twice, fed by an expression of the input, or in a model fx cannot trace
    is never cached (even when asked for, and whatever a probe would say); the values stay exact."""
    x, y = data
    torch.manual_seed(0)
    model = model_class().double().eval()
    objective = Objective(model, x, y, batch_size=64)
    xs, ys = np.array([-0.5, 0.75]), np.array([0.0, 1.0])
    with caplog.at_level(logging.DEBUG, logger="landscape.engine"):
        result = loss_surface(objective, xs, ys, seed=2, evaluator_options={"linear_first_layer": True,
                                                                             "stack_points": False})
    assert result.attrs["speedups"]["linear_first_layer"] is False
    assert reason in debug_messages(caplog)
    assert "probe" not in debug_messages(caplog), "refused from the graph, not by the probe"
    d1, d2 = surface_directions(objective.params, seed=2)
    expected = np.array([[plain_metrics(perturbed(model, {n: a * d1[n] + b * d2[n] for n in d1}), x, y)
                          for b in ys] for a in xs])
    assert_close(result["train_loss"], expected[..., 0], 1e-10, "loss")
    assert_close(result["train_acc"], expected[..., 1], 1e-12, "accuracy")


def test_a_rewrite_that_raises_is_logged_and_dropped_alone(data, caplog, monkeypatch):
    x, y = data
    objective = Objective(make_model("cnn"), x, y, dtype=torch.float64, batch_size=64)
    directions = surface_directions(objective.params, seed=2)

    def broken(*args):
        raise RuntimeError("an unusual model")

    monkeypatch.setattr(evaluator_module, "fold_batchnorm", broken)
    with caplog.at_level(logging.DEBUG, logger="landscape.engine"):
        fast = PointEvaluator({"train": objective}, directions)
    assert "the fold_batchnorm rewrite raised RuntimeError: an unusual model" in debug_messages(caplog)
    assert fast.speedups == {"fold_batchnorm": 0, "channels_last": True, "micro_batch": 0,
                             "linear_first_layer": True, "stack_points": 1, "inplace_activations": 3}
    points = [[0.3, -0.2], [1.0, 0.5]]
    expected = [plain_metrics(perturbed(make_model("cnn"), {n: a * directions[0][n] + b * directions[1][n]
                                                            for n in directions[0]}), x, y)[0] for a, b in points]
    assert_close(fast.evaluate(points)["train_loss"], expected, 1e-10, "loss without folding")


def test_a_probe_that_disagrees_is_logged(data, caplog):
    x, y = data
    torch.manual_seed(0)
    objective = Objective(Residual().double(), x, y, batch_size=64)
    with caplog.at_level(logging.DEBUG, logger="landscape.engine"):
        fast = PointEvaluator({"train": objective}, surface_directions(objective.params, seed=2))
    assert fast.speedups["stack_points"] == 1
    assert "fail on the probe" in debug_messages(caplog) or "change the probe's outputs" in debug_messages(caplog)


def test_building_an_evaluator_leaves_the_allocator_alone_and_tune_allocator_sets_it():
    """glibc's malloc is tuned by an explicit call, never as a side effect of stacking points."""
    code = """
import ctypes, torch
opened, real = [], ctypes.CDLL
ctypes.CDLL = lambda name, *args, **kwargs: opened.append(name) or real(name, *args, **kwargs)
from landscape.engine import tune_allocator
from landscape.engine.evaluator import PointEvaluator
from landscape.models import build_model
from landscape.objective import Objective
from landscape.params import surface_directions
torch.manual_seed(0)
objective = Objective(build_model("mlp", 10, (1, 8, 8), hidden=(12,)), torch.randn(32, 1, 8, 8),
                      torch.randint(0, 10, (32,)))
assert PointEvaluator({"train": objective}, surface_directions(objective.params)).stack > 1
print(opened.count("libc.so.6"), end=" ")
tune_allocator()
tune_allocator()
print(opened.count("libc.so.6"))
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["0", "1"]


def test_interpolating_a_model_with_itself_is_flat(data):
    x, y = data
    model = make_model("mlp").double()
    result = interpolate(Objective(model, x, y), model, [-0.5, 0.0, 1.5])
    assert result.attrs["distance"] == 0.0
    assert_close(result["train_loss"], [plain_metrics(model, x, y)[0]] * 3, 1e-12, "loss of a zero direction")


@pytest.mark.parametrize("name", ["surface", "interpolation"])
def test_a_kill_at_any_write_resumes_to_the_same_bits(tmp_path, name):
    """Killed at every write of creating the sidecar, writing its two blocks (3 or 2 stacked points)
    and moving it into the results file: the sidecar always opens, no done point is NaN, nothing
    finished is recomputed, and the result is bit-identical to an uninterrupted run (see crashtools)."""
    run = crashtools.analysis(tmp_path, name)
    events = crashtools.kill_everywhere(run, tmp_path)
    assert sum(e.file == f"r.h5.{name}.partial" and e.syscall == "pwrite64" for e in events) == 2 * 3


def test_resume_refuses_other_options(data, tmp_path):
    x, y = data
    objective = Objective(make_model("mlp"), x, y)
    loss_surface(objective, [0.0, 1.0], None, out=tmp_path / "s.h5")
    with pytest.raises(LandscapeError, match="--overwrite"):
        loss_surface(objective, [0.0, 1.0], None, out=tmp_path / "s.h5")
    with pytest.raises(LandscapeError, match="options differ"):
        loss_surface(objective, [0.0, 2.0], None, out=tmp_path / "s.h5", resume=True)
    again = loss_surface(objective, [0.0, 1.0], None, out=tmp_path / "s.h5", resume=True)
    assert again["done"].all()


def test_evaluator_rejects_foreign_directions(data):
    x, y = data
    objective = Objective(make_model("mlp"), x, y)
    with pytest.raises(LandscapeError, match="not a floating parameter"):
        PointEvaluator({"train": objective}, [{"conv.weight": torch.zeros(1)}])


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    for name, seed in (("a", 0), ("b", 1)):
        save_checkpoint(folder / f"{name}.pt", make_model("mlp", seed), arch="mlp",
                        arch_kwargs={"num_classes": 10, "input_shape": [1, 8, 8], "hidden": [12]}, dataset="digits",
                        optimizer="none", optimizer_hparams={}, metrics={}, seed=seed)
    return folder


def test_summaries_say_the_origin_the_range_the_divergent_points_and_the_barrier():
    config = {"config": {"splits": ["train", "test"]}}
    surface = SurfaceResult({"xcoordinates": np.array([-1.0, 0.0, 1.0]), "ycoordinates": np.array([0.0, 0.5]),
                             "train_loss": np.array([[3.0, 4.0], [0.25, 0.5], [np.inf, 2.0]]),
                             "train_acc": np.array([[0.1, 0.2], [0.875, 0.8], [0.0, 0.3]]),
                             "test_loss": np.full((3, 2), np.nan), "test_acc": np.zeros((3, 2))}, config)
    assert surface.summary() == (
        "train: loss at the origin 0.2500 (acc 0.8750), min 0.2500, max 4; 1 of 6 points divergent (inf/NaN)\n"
        "test: loss at the origin nan (acc 0.0000), no finite value; 6 of 6 points divergent (inf/NaN)")
    # the loss barrier: the largest excess over the chord from alpha = 0 to 1, here 1.5 - (1 - 0.5) = 1
    line = InterpolationResult({"alphas": np.array([-0.5, 0.0, 0.5, 1.0]), "train_loss": np.array([2.0, 1.0, 1.5, 0.0]),
                                "train_acc": np.array([0.5, 0.6, 0.7, 0.8])}, {"config": {"splits": ["train"]}})
    assert line.summary() == ("train: loss at the origin 1.0000 (acc 0.6000), min 0.0000, max 2; "
                              "0 of 4 points divergent (inf/NaN)\ntrain: loss barrier on [0, 1] = 1")
    off_grid = InterpolationResult({**line.arrays, "alphas": np.array([0.1, 0.2, 0.3, 0.4])}, line.attrs)
    assert off_grid.summary() == "train: min 0.0000, max 2; 0 of 4 points divergent (inf/NaN)"


def test_evaluating_commands_tune_the_allocator_once(checkpoints, tmp_path, monkeypatch):
    import landscape.engine
    calls = []
    monkeypatch.setattr(landscape.engine, "tune_allocator", lambda: calls.append(1))
    result = CliRunner().invoke(cli, ["surface", str(checkpoints / "a.pt"), "--x", "-1:1:2", "--1d", "--subset", "32",
                                      "--out", str(tmp_path / "r.h5")])
    assert result.exit_code == 0, result.output
    assert calls == [1]


def test_cli_surface_interpolate_radius_and_plots(checkpoints, tmp_path):
    runner = CliRunner()
    out = str(tmp_path / "r.h5")
    a, b = str(checkpoints / "a.pt"), str(checkpoints / "b.pt")
    commands = [["surface", a, "--x", "-1:1:4", "--y", "-0.5:0.5:3", "--subset", "100", "--out", out],
                ["surface", a, "--x", "-1:1:5", "--1d", "--split", "both", "--out", out, "--overwrite"],
                ["surface", a, "--x", "-1:1:5", "--1d", "--split", "both", "--out", out, "--resume"],
                ["interpolate", a, b, "--alphas", "0:1:3", "--subset", "100", "--out", out],
                ["radius", a, "--radii", "1e-2:1:4", "--draws", "2", "--subset", "100", "--out", out]]
    for args in commands:
        result = runner.invoke(cli, args)
        assert result.exit_code == 0, (args, result.output)
    assert "RWP/AWP radius ratio" in result.output
    again = runner.invoke(cli, commands[-1])
    assert again.exit_code == 2 and "--overwrite" in again.output and len(again.output.strip().splitlines()) == 1
    resumed = runner.invoke(cli, [*commands[-1], "--resume"])
    assert resumed.exit_code == 0 and resumed.output.splitlines()[-2:] == result.output.splitlines()[-2:]
    surface = Result.load(out, "surface")
    assert surface["train_loss"].shape == (5,) and surface["test_loss"].shape == (5,)
    assert Result.load(out, "interpolation")["train_loss"].shape == (3,)
    figures = tmp_path / "figures"
    result = runner.invoke(cli, ["plot", out, "--out-dir", str(figures)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in figures.iterdir()) == ["r_interpolation.png", "r_radius.png", "r_surface.png"]


@pytest.mark.parametrize("args", [
    ["surface", "{a}", "--x", "-1:1"],
    ["surface", "{a}", "--y", "a:b:3"],
    ["surface", "{missing}"],
    ["surface", "{a}", "--1d", "--orthogonal"],
    ["interpolate", "{a}", "{missing}"],
    ["radius", "{a}", "--radii", "0:1:5"],
    ["radius", "{a}", "--radii", "1e-3:1:x"],
])
def test_cli_bad_input_is_one_line_and_exit_2(checkpoints, tmp_path, args):
    paths = {"a": str(checkpoints / "a.pt"), "missing": str(tmp_path / "missing.pt")}
    result = CliRunner().invoke(cli, [arg.format(**paths) for arg in args] + ["--out", str(tmp_path / "x.h5")])
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


def test_surface_figures_two_d_and_comparison(data, tmp_path):
    from landscape.plotting import plot_compare
    x, y = data
    paths = []
    for seed in (0, 1):
        path = tmp_path / f"s{seed}.h5"
        result = loss_surface(Objective(make_model("cnn", seed), x, y), np.linspace(-1, 1, 4), np.linspace(-1, 1, 3),
                              out=path)
        paths.append(path)
    result.plot(tmp_path / "s1.png", log_loss=True)
    plot_compare(paths, "surface", tmp_path / "compare.png", ["SGD", "SAM"])
    assert all((tmp_path / n).stat().st_size > 0 for n in ("s1.png", "compare.png"))
