"""Numeric helpers shared by the tests: one tolerance comparison and one small digits model.

(``clitools`` runs the CLI, ``crashtools`` kills runs mid-write.)
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from landscape.models import build_model

SHOWN = 10   # mismatching entries printed on failure

# small models for exact float64 references: options per architecture when none are given
SMALL = {"mlp": {"hidden": (12,)}, "cnn": {"width": 4}}


def _array(values) -> np.ndarray:
    """``values`` (numbers, lists, numpy arrays or tensors on any device) as a float64 numpy array."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().double().numpy()
    return np.asarray(values, dtype=float)


def assert_close(actual, expected, rtol: float, what: str = "", *, atol: float = 0.0) -> None:
    """Assert ``|actual - expected| <= atol + rtol |expected|`` entry by entry (``numpy.isclose``: NaN never
    matches, inf only itself); ``expected`` has ``actual``'s shape or is a scalar.

    On failure the message names ``what``, how many entries differ and the first mismatching entries with
    their indices, actual and expected values.
    """
    actual, expected = _array(actual), _array(expected)
    assert expected.ndim == 0 or actual.shape == expected.shape, \
        f"{what}: shape {actual.shape}, expected {expected.shape}"
    bad = ~np.isclose(actual, expected, rtol=rtol, atol=atol)
    if bad.any():
        expected = np.broadcast_to(expected, actual.shape)
        where = np.argwhere(bad)[:SHOWN]
        rows = "; ".join(f"{tuple(int(i) for i in index)}: {float(actual[tuple(index)])!r} vs "
                         f"{float(expected[tuple(index)])!r}" for index in where)
        more = " ..." if bad.sum() > SHOWN else ""
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.size} entries differ beyond rtol={rtol:g}, "
                             f"atol={atol:g} (index: actual vs expected) {rows}{more}")


def make_model(name: str, seed: int = 0, dtype: torch.dtype = torch.float32, **options) -> nn.Module:
    """The built-in architecture ``name`` for digits (1x8x8 inputs, 10 classes) in eval mode and ``dtype``.

    Weights come from ``torch.manual_seed(seed)``; ``options`` default to the small ones of ``SMALL``.
    BatchNorm running statistics are non-trivial (means 0.3 N(0, 1), variances 0.5 + 1.5 U(0, 1), drawn
    from a generator seeded by ``seed``), so running and batch statistics differ.
    """
    torch.manual_seed(seed)
    model = build_model(name, 10, (1, 8, 8), **(options or SMALL.get(name, {})))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.copy_(0.3 * torch.randn(module.num_features, generator=generator))
                module.running_var.copy_(0.5 + 1.5 * torch.rand(module.num_features, generator=generator))
    return model.to(dtype).eval()
