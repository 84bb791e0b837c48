"""load_objective: checkpoint + dataset spec -> Objective, with a recoverable evaluation set."""

import numpy as np
import pytest
import torch

from landscape.checkpoint import save_checkpoint
from landscape.data import eval_subset, load_dataset
from landscape.errors import LandscapeError
from landscape.models import build_model
from landscape.objective import indices_digest, load_objective


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    model = build_model("cnn", num_classes=10, input_shape=(1, 8, 8))
    path = tmp_path / "cnn.pt"
    save_checkpoint(path, model, arch="cnn", arch_kwargs={"num_classes": 10, "input_shape": [1, 8, 8]},
                    dataset="digits", optimizer="sgd", optimizer_hparams={}, metrics={}, seed=0)
    return path, model


def test_evaluation_set_is_recoverable_from_recorded_provenance(checkpoint):
    path, model = checkpoint
    objective = load_objective(str(path), subset=100, subset_seed=7, split="test", device="cpu")
    recipe = objective.provenance()["eval_set"]
    assert recipe == {"split": "test", "subset": 100, "subset_seed": 7, "n": 100,
                      "indices_sha256": recipe["indices_sha256"]}
    # rebuild the evaluation set from the recorded recipe alone
    dataset = load_dataset(objective.provenance()["dataset"])
    x, y = dataset.split(recipe["split"])
    x_sub, y_sub, indices = eval_subset(x, y, recipe["subset"], recipe["subset_seed"])
    assert indices_digest(indices) == recipe["indices_sha256"]
    assert torch.equal(objective.inputs, x_sub) and torch.equal(objective.targets, y_sub)
    assert objective.provenance()["checkpoint_sha256"] and objective.provenance()["dataset"] == "digits"
    # and the objective evaluates the checkpoint's weights
    model.eval()
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(model(x_sub), y_sub).item()
    assert objective.loss() == pytest.approx(expected, rel=1e-5)


def test_full_split_and_float64(checkpoint):
    path, _ = checkpoint
    objective = load_objective(str(path), dtype="float64", device="cpu")
    assert objective.num_examples == len(load_dataset("digits").split("train")[0])
    assert all(p.dtype == torch.float64 for p in objective.params.values())
    assert np.isfinite(objective.loss())


def test_bad_options_are_input_errors(checkpoint, tmp_path):
    path, _ = checkpoint
    with pytest.raises(LandscapeError, match="--split"):
        load_objective(str(path), split="valid")
    with pytest.raises(LandscapeError, match="--dtype"):
        load_objective(str(path), dtype="float16")
    weights = tmp_path / "bare.pt"
    torch.save(build_model("mlp").state_dict(), weights)
    with pytest.raises(LandscapeError, match="--arch"):
        load_objective(str(weights), data="digits")
    assert load_objective(str(weights), data="digits", arch="mlp", device="cpu").num_params > 0
