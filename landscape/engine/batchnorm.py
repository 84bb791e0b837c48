"""BatchNorm running statistics recomputed at a point of weight space (the evaluator's ``bn_recompute``)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from landscape.errors import LandscapeError
from landscape.objective import batchnorm_mode

_BATCHNORM = nn.modules.batchnorm._BatchNorm


class RecomputedStatistics:
    """Sets every BatchNorm layer's running mean and (unbiased) variance of ``model`` to the exact
    statistics of its inputs over an evaluation set, with batch statistics upstream (as
    ``torch.optim.swa_utils.update_bn`` with ``momentum=None``). Sums are kept in float64.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.layers = [m for m in model.modules() if isinstance(m, _BATCHNORM) and m.running_mean is not None]
        if not self.layers:
            raise LandscapeError("the model has no BatchNorm layers with running statistics; drop --bn-recompute")
        for layer in self.layers:
            layer.register_forward_pre_hook(self._observe)
        self._sums: dict[nn.Module, list] | None = None

    def _observe(self, module: nn.Module, inputs: tuple) -> None:
        if self._sums is None:
            return
        x = inputs[0].double()
        dims = [0, *range(2, x.ndim)]
        sums = self._sums[module]
        sums[0] += x.sum(dims)
        sums[1] += x.square().sum(dims)
        sums[2] += x.numel() // x.shape[1]

    def recompute(self, forward_all: Callable[[], None]) -> None:
        """Run ``forward_all()`` (the model on every batch of the evaluation set) in train mode and
        store the statistics it saw as the running statistics."""
        self._sums = {m: [0.0, 0.0, 0] for m in self.layers}
        with batchnorm_mode(self.model, "train"):
            forward_all()
        for layer, (total, squares, count) in self._sums.items():
            mean = total / count
            layer.running_mean.copy_(mean)
            layer.running_var.copy_((squares / count - mean.square()) * (count / max(count - 1, 1)))
        self._sums = None
