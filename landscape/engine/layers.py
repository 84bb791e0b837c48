"""The layers that the evaluator's rewrites put into its private copy of a model.

- :class:`CachedFirstLayer` stands in for a Linear/Conv first layer, whose output is linear in its
  weights: W(c) x = W0 x + Σ_i c_i D_i x from outputs computed once per evaluation batch.
- :class:`StackedLinear` stands in for a Linear layer whose weights move, for P points in one call.

The evaluator sets their ``coefficients`` (and the cache's ``key``) before each forward.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class CachedFirstLayer(nn.Module):
    """Stands in for a Linear/Conv first layer: W0 x + Σ_i c_i D_i x from outputs computed once.

    ``key = (split, batch)`` and ``coefficients`` are set by the evaluator before each forward; the
    input must be that batch's first-layer input or a prefix of it (the rows returned). Coefficients
    as a (P, k) tensor give P stacked blocks of rows, one per point.

    Args:
        base_outputs: ``{split: [W0 x per batch]}``, each (rows, ...).
        direction_outputs: ``{split: [D x per batch]}``, each (len(columns), rows, ...).
        columns: the directions (coefficient positions) that move this layer.
    """

    def __init__(self, base_outputs: dict[str, list[Tensor]], direction_outputs: dict[str, list[Tensor]],
                 columns: list[int]) -> None:
        super().__init__()
        self.base_outputs, self.direction_outputs, self.columns = base_outputs, direction_outputs, columns
        self.key: tuple[str, int] = ("", 0)
        self.coefficients: Sequence[float] | Tensor = ()

    def forward(self, x: Tensor) -> Tensor:
        split, batch = self.key
        rows = len(x)
        base_output = self.base_outputs[split][batch][:rows]
        steps, c = self.direction_outputs[split][batch][:, :rows], self.coefficients
        if isinstance(c, Tensor):
            out = torch.addmm(base_output.reshape(1, -1), c[:, self.columns],
                              steps.reshape(len(self.columns), base_output.numel()))
            return out.view(-1, *base_output.shape[1:])
        out = None
        for column, step in zip(self.columns, steps):
            if c[column] != 0.0:
                out = torch.add(base_output, step, alpha=c[column]) if out is None else out.add_(step, alpha=c[column])
        return base_output.clone() if out is None else out


class StackedLinear(nn.Module):
    """Stands in for a Linear layer whose weights move, for P points in one call.

    The input rows come as P equal blocks; block p sees the weights base + Σ_i c_pi D_i with
    ``coefficients`` (a (P, k) tensor) set by the evaluator before each forward. ``pad`` zero
    output features are computed and dropped (CPU GEMMs run narrow outputs such as 10 classes
    twice as fast at a multiple of 8). With ``points_first`` (a head whose output is the model's)
    the output is (P, rows, out), a view of a (P, out, rows) product: reductions over the features,
    such as a loss's, then run along contiguous rows.

    Args:
        base_weight, base_bias: the layer's weight (out, in) and bias (out,) or ``None`` at the origin.
        weight_directions, bias_directions: (k, out, in) and (k, out) or ``None`` (a fixed bias).
    """

    def __init__(self, base_weight: Tensor, base_bias: Tensor | None, weight_directions: Tensor,
                 bias_directions: Tensor | None, pad: int = 0, points_first: bool = False) -> None:
        super().__init__()
        self.features, self.points_first = len(base_weight), points_first
        rows = (0, 0, 0, pad)  # zero rows appended to (.., out, in) tensors
        self.shape = (len(base_weight) + pad, base_weight.shape[1])
        self.base_weight = F.pad(base_weight, rows).reshape(1, -1)  # (1, out * in)
        self.weight_directions = F.pad(weight_directions, rows).flatten(1)  # (k, out * in)
        self.base_bias = None if base_bias is None else F.pad(base_bias, (0, pad)).reshape(1, -1)  # (1, out)
        self.bias_directions = None if bias_directions is None else F.pad(bias_directions, (0, pad))  # (k, out)
        self.coefficients = torch.zeros(1, len(weight_directions), dtype=base_weight.dtype, device=base_weight.device)

    def forward(self, x: Tensor) -> Tensor:
        c = self.coefficients
        weight = torch.addmm(self.base_weight, c, self.weight_directions).view(len(c), *self.shape)  # (P, out, in)
        blocks = x.reshape(len(c), -1, x.shape[-1])
        bias = None
        if self.base_bias is not None:  # (P, out)
            moved = self.bias_directions is not None
            bias = torch.addmm(self.base_bias, c, self.bias_directions) if moved else self.base_bias.expand(len(c), -1)
        if self.points_first:
            columns = blocks.transpose(1, 2)
            out = torch.bmm(weight, columns) if bias is None else torch.baddbmm(bias.unsqueeze(2), weight, columns)
            return out.transpose(1, 2)
        out = (torch.bmm(blocks, weight.transpose(1, 2)) if bias is None
               else torch.baddbmm(bias.unsqueeze(1), blocks, weight.transpose(1, 2)))
        return out[..., :self.features].reshape(*x.shape[:-1], -1)
