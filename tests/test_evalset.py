"""The evaluation set held in host memory (streamed to the device batch by batch) against one held on the device."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from clitools import assert_input_error, invoke
from helpers import make_model

from landscape.analysis.surface import loss_surface
from landscape.curvature.fisher import EmpiricalFisherOperator
from landscape.curvature.ggn import GGNOperator
from landscape.curvature.hessian import HessianOperator
from landscape.errors import LandscapeError
from landscape.evalset import DEVICE_SHARE, EvalSet
from landscape.objective import Objective


def objective(digits, data_on: str, bn: str = "eval") -> Objective:
    """A cnn with BatchNorm on 150 digits in float64, batches of 32 (the last one of 22)."""
    return Objective(make_model("cnn"), digits.x_train[:150], digits.y_train[:150], batch_size=32, bn=bn,
                     dtype=torch.float64, data_on=data_on)


@pytest.mark.parametrize("bn", ["eval", "train"])
def test_host_placement_gives_the_device_placements_values_bit_for_bit(digits, bn):
    host, device = objective(digits, "host", bn), objective(digits, "device", bn)
    assert (host.data.placement, device.data.placement) == ("host", "device")
    assert host.loss_and_accuracy() == device.loss_and_accuracy()
    for name, g in host.gradient().items():
        assert torch.equal(g, device.gradient()[name]), name
    vectors = torch.randn(3, host.num_params, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    operators = [HessianOperator, GGNOperator] + ([EmpiricalFisherOperator] if bn == "eval" else [])
    for operator in operators:
        assert torch.equal(operator(host).apply(vectors), operator(device).apply(vectors)), operator.__name__
    grid = [loss_surface(o, x=np.linspace(-1, 1, 3), y=np.linspace(-1, 1, 2), bn_recompute=bn == "eval")
            for o in (host, device)]
    assert np.array_equal(grid[0]["train_loss"], grid[1]["train_loss"])


def test_streamed_batches_cover_a_share_once_in_order_weighted_over_the_whole_set(digits):
    x, y = digits.x_train[:100], digits.y_train[:100]
    share = EvalSet(x, y, device=torch.device("cpu"), dtype=torch.float64, batch_size=16, placement="host",
                    rows=(30, 71))
    batches = list(share.batches())
    assert [len(b[0]) for b in batches] == [16, 16, 9]
    assert torch.equal(torch.cat([b[0] for b in batches]), x[30:71].double())
    assert torch.equal(torch.cat([b[1] for b in batches]), y[30:71])
    assert [b[2] for b in batches] == [0.16, 0.16, 0.09]   # rows / 100, the whole set's size
    assert len(share.whole()) == 100 and share.whole().whole() is share.whole()


def test_auto_keeps_the_set_on_a_gpu_while_it_takes_at_most_half_its_free_memory(digits, monkeypatch):
    x, y = digits.x_train[:100], digits.y_train[:100]
    needed = 100 * (64 * 8 + 8)   # float64 inputs of 1x8x8 and int64 labels
    for free, expected in ((needed / DEVICE_SHARE, "device"), (needed / DEVICE_SHARE - 1, "host")):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device, free=free: (int(free), 2 * int(free)))
        evalset = EvalSet(x, y, device=torch.device("cuda", 0), dtype=torch.float64, batch_size=16)
        assert evalset.nbytes() == needed and evalset.placement == expected
    assert EvalSet(x, y, device=torch.device("cpu"), dtype=torch.float32, batch_size=16).placement == "device"


def test_an_unknown_placement_is_refused_in_one_line(digits, checkpoint):
    with pytest.raises(LandscapeError, match="--data-on"):
        objective(digits, "disk")
    assert_input_error(invoke("hessian", checkpoint, "--data-on", "disk"), "--data-on")
