"""The shared numeric test helpers: a failed comparison names its mismatching entries."""

import math

import numpy as np
import pytest
import torch
from helpers import assert_close, make_model


def test_assert_close_names_every_mismatching_entry_and_passes_within_tolerance():
    expected = np.arange(12.0).reshape(3, 4)
    actual = expected.copy()
    actual[1, 2], actual[2, 0] = 6.1, math.nan
    with pytest.raises(AssertionError) as info:
        assert_close(actual, expected, 1e-3, "grid")
    message = str(info.value)
    assert message.startswith("grid: 2 of 12 entries differ beyond rtol=0.001, atol=0")
    assert "(1, 2): 6.1 vs 6.0" in message and "(2, 0): nan vs 8.0" in message
    assert_close(torch.tensor(expected) + 1e-4, expected, 0.0, "shifted", atol=2e-4)
    assert_close(expected[1, 1] * (1 + 1e-9), 5.0, 1e-8, "scalar")
    with pytest.raises(AssertionError, match="shape"):
        assert_close(expected, expected.ravel(), 1.0, "reshaped")


def test_make_model_is_seeded_and_has_non_trivial_batchnorm_statistics():
    first, again, other = make_model("cnn"), make_model("cnn"), make_model("cnn", seed=1)
    for (name, a), b, c in zip(first.state_dict().items(), again.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b), name
    assert not torch.equal(first[0].weight, other[0].weight)
    bn = first[1]
    assert not first.training and bn.running_mean.abs().min() > 0 and not torch.allclose(bn.running_var, torch.ones(1))
    assert make_model("mlp", dtype=torch.float64)[1].weight.shape == (12, 64)
