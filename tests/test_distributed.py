"""Data-parallel training under torchrun (gloo, CPU, one thread per rank) against single-process references.

Five torchrun launches: the scenarios of ``ddp_worker.py`` on 2 ranks, then on 4 ranks (continuing the
2-rank run that was interrupted; batches of 100 and 90 give shares of 25 and of 23, 23, 22, 22 rows), a
training run that must reach 95%, and two command lines (3 and 2 ranks) that must fail on every rank
with one line.
References are single-process runs of the same scenarios (in this process) or a plain-autograd replay.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import pytest
import torch
import torch.nn.functional as F

import ddp_worker
from helpers import assert_close
from landscape.checkpoint import load_checkpoint
from landscape.models import build_model
from landscape.store import read_group
from torchrun import WORKER, exit_codes, outputs, rank_logs, torchrun

TWO = ("sgd", "sam", "sam_global", "rsam_global", "ssamf", "ssamd", "mrwp_parallel", "marwp_parallel", "bn_sam", "bn_mrwp_parallel", "resume_start",
       "tracked")
FOUR = ("sgd", "sam", "sam_group", "resume_finish")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("two")
    run = torchrun(2, WORKER, folder, *TWO, logs=folder / "logs")
    assert run.returncode == 0, rank_logs(folder / "logs")
    return folder


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory, two_ranks) -> Path:
    folder = tmp_path_factory.mktemp("four")
    for name in ("resume.pt.state", "trajectory.h5"):  # the interrupted 2-rank run
        shutil.copy(two_ranks / name, folder / name)
    run = torchrun(4, WORKER, folder, *FOUR, logs=folder / "logs")
    assert run.returncode == 0, rank_logs(folder / "logs")
    return folder


def single_process(name: str, **changes) -> dict:
    """Scenario ``name`` trained in this process (one rank), with ``changes`` to its options."""
    return ddp_worker.train(**{**ddp_worker.SCENARIOS[name], **changes})


def assert_same_on_every_rank(results: list[dict]) -> None:
    for result in results[1:]:
        for name, tensor in results[0]["state"].items():
            assert torch.equal(tensor, result["state"][name]), name


def assert_states_close(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], tolerance: float) -> None:
    """Every tensor of ``expected`` equals ``got``'s to ``tolerance`` absolute."""
    for name, tensor in expected.items():
        assert_close(got[name], tensor, 0.0, name, atol=tolerance)


def shares(count: int, ranks: int) -> list[int]:
    """Rows of each rank's contiguous share of a batch of ``count``: the first ``count % ranks`` get one more."""
    return [count // ranks + (rank < count % ranks) for rank in range(ranks)]


def global_batches(count: int, batch_size: int, epochs: int) -> list[torch.Tensor]:
    """The single-process batch order: one seeded permutation per epoch, cut into batches."""
    generator = torch.Generator().manual_seed(0)
    return [batch for _ in range(epochs) for batch in torch.randperm(count, generator=generator).split(batch_size)]


@pytest.mark.parametrize("ranks", [2, 4])
def test_sgd_on_ranks_takes_the_single_process_steps_on_the_global_batches(ranks, two_ranks, four_ranks):
    results = outputs(two_ranks if ranks == 2 else four_ranks, "sgd", ranks)
    assert_same_on_every_rank(results)
    reference = single_process("sgd")
    assert_states_close(results[0]["state"], reference["state"], 1e-12)
    assert [h["train_loss"] for h in results[0]["history"]] == pytest.approx(
        [h["train_loss"] for h in reference["history"]], abs=1e-6)
    assert results[0]["metrics"] == pytest.approx(reference["metrics"], abs=1e-6)  # float32 sums in evaluate
    batches = [len(batch) for batch in global_batches(ddp_worker.EXAMPLES, 100, 2)]
    for rank, result in enumerate(results):  # every rank computed its own contiguous share only
        assert result["rows"] == [shares(size, ranks)[rank] for size in batches]


def replay_sam(ranks: int, group: int = 1, rho: float = 0.5, lr: float = 0.1, momentum: float = 0.9,
               decay: float = 5e-4) -> dict:
    """Data-parallel SAM written out with plain autograd: the ranks of each group of ``group`` consecutive
    ranks ascend along the gradient of their group's rows (their shares of the batch), the step averages
    the perturbed gradients over the batch; SGD with momentum."""
    data = ddp_worker.dataset()
    torch.manual_seed(0)
    model = build_model("mlp", 10, (1, 8, 8), **ddp_worker.MLP).double()
    names = [name for name, _ in model.named_parameters()]
    weights = [p.detach().clone() for p in model.parameters()]

    def loss(w: list[torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(data.x_train[rows].flatten(1) @ w[0].T + w[1])
        return F.cross_entropy(hidden @ w[2].T + w[3], data.y_train[rows])

    def gradient(w: list[torch.Tensor], rows: torch.Tensor) -> list[torch.Tensor]:
        w = [t.clone().requires_grad_() for t in w]
        return list(torch.autograd.grad(loss(w, rows), w))

    buffers = None
    for batch in global_batches(ddp_worker.EXAMPLES, 100, 1):
        total = [torch.zeros_like(w) for w in weights]
        sizes, start = shares(len(batch), ranks), 0
        for first in range(0, ranks, group):
            size = sum(sizes[first:first + group])
            rows = batch[start:start + size]
            start += size
            ascent = gradient(weights, rows)
            norm = torch.sqrt(sum((g ** 2).sum() for g in ascent))
            perturbed = gradient([w + rho * g / norm for w, g in zip(weights, ascent)], rows)
            total = [t + size / len(batch) * g for t, g in zip(total, perturbed)]
        steps = [g + decay * w for g, w in zip(total, weights)]
        buffers = steps if buffers is None else [momentum * b + d for b, d in zip(buffers, steps)]
        weights = [w - lr * b for w, b in zip(weights, buffers)]
    return dict(zip(names, weights))


@pytest.mark.parametrize("ranks", [2, 4])
def test_sam_perturbs_each_rank_by_the_gradient_of_its_own_share(ranks, two_ranks, four_ranks):
    results = outputs(two_ranks if ranks == 2 else four_ranks, "sam", ranks)
    assert_same_on_every_rank(results)
    assert_states_close(results[0]["state"], replay_sam(ranks), 1e-12)
    with pytest.raises(AssertionError):  # the global ascent direction is measurably different
        assert_states_close(results[0]["state"], replay_sam(1), 1e-6)


def test_group_sam_perturbs_each_group_of_ranks_by_the_gradient_of_its_rows(four_ranks):
    results = outputs(four_ranks, "sam_group", 4)
    assert_same_on_every_rank(results)
    assert_states_close(results[0]["state"], replay_sam(4, group=2), 1e-12)
    with pytest.raises(AssertionError):
        assert_states_close(results[0]["state"], replay_sam(4), 1e-6)


@pytest.mark.parametrize("name", ["sam_global", "rsam_global"])
def test_global_ascent_takes_the_single_process_step(name, two_ranks):
    results = outputs(two_ranks, name, 2)
    assert_same_on_every_rank(results)
    assert_states_close(results[0]["state"], single_process(name)["state"], 1e-12)


def test_ssam_masks_are_the_same_on_every_rank(two_ranks):
    # SSAM-F: one mask, at the initial weights, from the Fisher of 101 examples split 51/50 and all-reduced
    fisher = outputs(two_ranks, "ssamf", 2)
    assert_same_on_every_rank(fisher)
    reference = single_process("ssamf")["masks"]
    for masks in (fisher[0]["masks"], fisher[1]["masks"]):
        assert all(torch.equal(got, expected) for got, expected in zip(masks, reference))
    # SSAM-D: a drop by |gradient| and a random regrowth at every step; each rank's ascent gradient is its own
    dynamic = outputs(two_ranks, "ssamd", 2)
    assert_same_on_every_rank(dynamic)
    assert all(torch.equal(a, b) for a, b in zip(dynamic[0]["masks"], dynamic[1]["masks"]))


@pytest.mark.parametrize("name", ["mrwp_parallel", "marwp_parallel"])
def test_parallel_mrwp_takes_the_single_process_step_with_the_same_batches_and_noise(name, two_ranks):
    results = outputs(two_ranks, name, 2)
    assert_same_on_every_rank(results)
    options = ddp_worker.SCENARIOS[name]
    reference = single_process(name, opt_args={**options["opt_args"], "parallel": False})
    assert_states_close(results[0]["state"], reference["state"], 1e-12)
    # rank 0 computes the clean gradient on B2, rank 1 the perturbed one on B1: one pass per step each
    steps = len(results[0]["steps"])
    assert len(results[0]["rows"]) == len(results[1]["rows"]) == steps
    assert sorted(results[0]["rows"] + results[1]["rows"]) == sorted(reference["rows"])


@pytest.mark.parametrize("name", ["bn_sam", "bn_mrwp_parallel"])
def test_every_rank_ends_with_rank_0s_batchnorm_statistics(name, two_ranks):
    results = outputs(two_ranks, name, 2)
    assert_same_on_every_rank(results)  # parameters and buffers
    state = results[0]["state"]
    tracked = [value for key, value in state.items() if key.endswith("num_batches_tracked")]
    assert tracked and all(int(value) == len(results[0]["steps"]) for value in tracked)  # one pass at w per step
    assert all(state[key].abs().sum() > 0 for key in state if key.endswith("running_mean"))


def test_resume_on_four_ranks_continues_the_interrupted_two_rank_run(two_ranks, four_ranks):
    interrupted = outputs(two_ranks, "resume_start", 2)
    assert all(result["interrupted"] and result["calls"] == 3 for result in interrupted)
    results = outputs(four_ranks, "resume_finish", 4)
    assert_same_on_every_rank(results)
    reference = single_process("resume_finish", resume=False)
    assert_states_close(results[0]["state"], reference["state"], 1e-12)
    assert results[0]["steps"] == list(range(1, 10)) and results[0]["calls"] == 9  # the callback resumed too
    assert len(results[0]["rows"]) == 2 * 6  # epochs 2 and 3 only, two passes per step
    assert not (four_ranks / "resume.pt.state").exists()
    assert load_checkpoint(four_ranks / "resume.pt").meta["extra"]["world_size"] == 4
    with h5py.File(two_ranks / "trajectory.h5", "r") as handle:  # rank 0 wrote epochs 0 and 1, then the crash
        assert list(handle["trajectory/done"][()]) == [True, True, False, False]
    with h5py.File(four_ranks / "trajectory.h5", "r") as handle:
        weights, steps, done = (handle[f"trajectory/{name}"][()] for name in ("weights", "step", "done"))
    assert list(steps) == [0, 3, 6, 9] and done.all(), "one snapshot per epoch end, none twice, none missing"
    torch.manual_seed(0)
    initial = build_model("mlp", 10, (1, 8, 8), **ddp_worker.MLP).double()
    for row, model_state in ((0, dict(initial.named_parameters())), (3, results[0]["state"])):
        expected = torch.cat([model_state[n].detach().reshape(-1) for n, _ in initial.named_parameters()]).float()
        assert torch.equal(torch.from_numpy(weights[row]), expected), f"snapshot {row}"


def test_tracking_under_torchrun_measures_on_every_rank_and_rank_0_writes_the_single_process_values(two_ranks):
    results = outputs(two_ranks, "tracked", 2)
    reference = single_process("tracked")["tracking"]
    stored, _ = read_group(two_ranks / "tracked.h5", "training")
    assert stored["done"].all() and list(stored["steps"]) == [2, 4, 6]
    for arrays in (results[0]["tracking"], results[1]["tracking"], stored):
        for name in ("eigenvalues", "trace", "loss", "lr", "threshold"):
            assert torch.allclose(torch.as_tensor(arrays[name]), torch.as_tensor(reference[name]), rtol=1e-7), name


def test_parallel_mrwp_on_two_ranks_reaches_95_percent_on_digits(tmp_path):
    run = torchrun(2, "-m", "landscape", "train", "--optimizer", "mrwp", "--opt-args", "parallel=true",
                   "--epochs", "5", "--out", tmp_path / "mrwp.pt", logs=tmp_path / "logs")
    logs = rank_logs(tmp_path / "logs")
    assert run.returncode == 0, logs
    assert "test accuracy" in logs[0][0] and logs[1][0] == ""  # rank 0 prints, the others stay silent
    assert load_checkpoint(tmp_path / "mrwp.pt").meta["metrics"]["test_accuracy"] >= 0.95


@pytest.mark.parametrize("ranks, arguments, words", [
    (3, ["--optimizer", "mrwp", "--opt-args", "parallel=true"], "even number of ranks"),
    (2, ["--out", "FILE/model.pt"], "File exists"),   # only rank 0 writes, so only rank 0 fails
])
def test_bad_input_under_torchrun_fails_every_rank_with_one_line(ranks, arguments, words, tmp_path):
    (tmp_path / "FILE").write_text("a file, not a folder")
    arguments = [str(tmp_path / a) if a.startswith("FILE") else a for a in arguments]
    run = torchrun(ranks, "-m", "landscape", "train", "--epochs", "1", "--batch-size", "512", *arguments,
                   logs=tmp_path / "logs", timeout=120)
    logs = rank_logs(tmp_path / "logs")
    assert exit_codes(run.stderr) == {rank: 2 for rank in range(ranks)}, run.stderr[-2000:]
    lines = logs[0][1].strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and words in lines[0], logs
    assert all(logs[rank][1].strip() == "" for rank in range(1, ranks)), logs
    assert not any("Traceback" in out + err for out, err in logs.values())
