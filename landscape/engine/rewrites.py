"""The speed-up rewrites of the evaluator's private model copy, one small function each.

Each rewrite takes the private copy (``work``) and what it needs, changes the copy in place and
returns what it did, which :class:`landscape.engine.evaluator.PointEvaluator` records in its
``speedups``. They run in this order, each switched by the evaluator option of the same name:

- :func:`channels_last`: NHWC memory layout for a model with 2-D convolutions;
- :func:`micro_batch_rows`: rows per forward that keep the largest activation cache-sized;
- :func:`fold_batchnorm`: eval-mode BatchNorm folded into the Conv/Linear layer before it;
- :func:`cache_first_layer`: the first layer replaced by W0 x + Σ_i c_i D_i x computed once;
- :func:`stack_linear_points`: moving Linear layers that take many points in one forward;
- :func:`run_in_place`: activations that overwrite a fresh tensor nothing else reads.

Where a rewrite needs to know the model's structure it is given what :mod:`landscape.engine.graph`
read from the ``torch.fx`` graph of the unmodified copy. The values stay equal up to
floating-point rounding; the evaluator checks that on a probe and builds without a rewrite that
raises (see its docstring). A rewrite that does not apply says why at DEBUG level.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from landscape.engine.layers import CachedFirstLayer, StackedLinear

log = logging.getLogger(__name__)

# on the CPU, rows per forward keep the largest activation within these bytes (a cache-sized working
# set: ResNet-18 on 1,000 CIFAR images runs 1.3x faster in chunks of 32 than in one batch)
MICRO_BATCH_BYTES = 8 * 2**20


@dataclass
class MovingWeights:
    """The tensors that the directions move, index-aligned with ``names``: the private copy's own
    ``tensors`` (set in place for every point), their ``base_weights`` at the origin, and
    ``directions[i][j]``, direction i's part for tensor j. Folding rescales the last two."""

    names: list[str]
    tensors: list[Tensor]
    base_weights: list[Tensor]
    directions: list[list[Tensor]]

    def index(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.names)}


def swap(work: nn.Module, path: str, module: nn.Module) -> nn.Module:
    """Put ``module`` at ``path`` of ``work``; returns the module it replaces."""
    parent, _, child = path.rpartition(".")
    owner = work.get_submodule(parent) if parent else work
    previous = getattr(owner, child)
    setattr(owner, child, module)
    return previous


def channels_last(work: nn.Module) -> bool:
    """Convert ``work`` to the channels-last layout if it has a Conv2d layer; returns whether it did."""
    if not any(isinstance(m, nn.Conv2d) for m in work.modules()):
        return False
    work.to(memory_format=torch.channels_last)
    return True


def micro_batch_rows(work: nn.Module, example: Tensor, largest_batch: int) -> int | None:
    """Rows per forward that keep the largest module output within :data:`MICRO_BATCH_BYTES`,
    measured on one ``example`` (1, ...), or ``None`` when batches of ``largest_batch`` rows already
    do, or when the model cannot take a single example."""
    largest = [0]

    def measure(module: nn.Module, inputs: tuple, output: Any) -> None:
        if isinstance(output, Tensor):
            largest[0] = max(largest[0], output.numel() * output.element_size())

    handles = [m.register_forward_hook(measure) for m in work.modules() if not list(m.children())]
    try:
        work(example)
    except Exception as error:  # noqa: BLE001 - a model that cannot take a single example keeps its batches
        log.debug("no micro-batches: the model cannot take a single example (%s: %s)", type(error).__name__, error)
        return None
    finally:
        for handle in handles:
            handle.remove()
    rows = max(1, MICRO_BATCH_BYTES // max(largest[0], 1))
    return rows if rows < largest_batch else None


def fold_batchnorm(work: nn.Module, pairs: Sequence[tuple[str, str]], moving: MovingWeights) -> int:
    """Fold each eval-mode BatchNorm of the (layer, BatchNorm) ``pairs`` that no direction moves into
    its Conv/Linear layer: W s, (b - mean) s + beta with s = gamma/sqrt(var + eps). Moving weights get
    folded base weights and directions (still linear in the coefficients). Returns how many."""
    index = moving.index()
    folded = 0
    for layer_path, norm_path in pairs:
        layer, norm = work.get_submodule(layer_path), work.get_submodule(norm_path)
        if any(f"{norm_path}.{key}" in index for key, _ in (*norm.named_parameters(), *norm.named_buffers())):
            log.debug("BatchNorm %s is not folded: a direction moves it", norm_path)
            continue
        scale = torch.rsqrt(norm.running_var + norm.eps)
        scale = scale * norm.weight if norm.affine else scale
        shift = (norm.bias if norm.affine else 0.0) - norm.running_mean * scale
        if layer.bias is None:
            layer.bias = nn.Parameter(torch.zeros_like(shift), requires_grad=False)
        for key, factor, offset in (("weight", scale.view(-1, *[1] * (layer.weight.ndim - 1)), 0.0),
                                    ("bias", scale, shift)):
            tensor, i = getattr(layer, key), index.get(f"{layer_path}.{key}")
            if i is None:
                tensor.copy_(tensor * factor + offset)
                continue
            moving.base_weights[i] = moving.base_weights[i] * factor + offset
            for direction in moving.directions:
                direction[i] = direction[i] * factor
        swap(work, norm_path, nn.Identity())
        folded += 1
    return folded


class _Stop(Exception):
    """Raised by a hook to end a forward pass early."""


def _layer_input(work: nn.Module, layer: nn.Module, x: Tensor) -> Tensor:
    """The input that ``layer`` gets when ``work`` runs on ``x`` (the forward stops there)."""
    found: list[Tensor] = []

    def stop(module: nn.Module, inputs: tuple) -> None:
        found.append(inputs[0])
        raise _Stop

    handle = layer.register_forward_pre_hook(stop)
    try:
        work(x)
    except _Stop:
        pass
    finally:
        handle.remove()
    return found[0]


def cache_first_layer(work: nn.Module, path: str, moving: MovingWeights,
                      batches: Mapping[str, Sequence[tuple[Tensor, Tensor, float]]], examples: int,
                      budget: float) -> CachedFirstLayer | None:
    """Replace the layer at ``path`` (see :func:`landscape.engine.graph.cacheable_first_layer`) by a
    :class:`CachedFirstLayer` holding W0 x and each moving D_i x for every batch of ``batches``
    (``{split: [(x, y, weight)]}``), if those outputs for ``examples`` examples fit ``budget`` bytes
    (measured on the first rows of the first batch)."""
    layer = work.get_submodule(path)
    index = moving.index()
    own = dict(layer.named_parameters())
    parts = [{key: d[index[f"{path}.{key}"]] if f"{path}.{key}" in index else torch.zeros_like(p)
              for key, p in own.items()} if any(f"{path}.{key}" in index for key in own) else None
             for d in moving.directions]
    probe_input = _layer_input(work, layer, next(iter(batches.values()))[0][0][:8])
    per_example = layer(probe_input[:1]).numel() * probe_input.element_size()
    needed = per_example * examples * (1 + sum(1 for part in parts if part))
    if needed > budget:
        log.debug("no first-layer cache: its outputs would take %.0f MiB, more than the %.0f MiB allowed",
                  needed / 2**20, budget / 2**20)
        return None
    columns = [i for i, part in enumerate(parts) if part]
    base_outputs: dict[str, list[Tensor]] = {}
    direction_outputs: dict[str, list[Tensor]] = {}
    for split, split_batches in batches.items():
        inputs = [_layer_input(work, layer, x) for x, _, _ in split_batches]
        base_outputs[split] = [layer(x) for x in inputs]
        direction_outputs[split] = [torch.stack([functional_call(layer, parts[i], (x,)) for i in columns]) if columns
                                    else layer(x).new_zeros(0, *base_outputs[split][0].shape[1:]) for x in inputs]
    cache = CachedFirstLayer(base_outputs, direction_outputs, columns)
    swap(work, path, cache)
    return cache


def linear_owners(work: nn.Module, moving: MovingWeights, cache: nn.Module | None) -> dict[str, dict[str, int]] | None:
    """``{Linear path: {"weight"/"bias": index in moving}}`` when every moving tensor (but the
    first-layer ``cache``'s) sits in a plain ``nn.Linear``; ``None`` otherwise."""
    owners: dict[str, dict[str, int]] = {}
    for i, name in enumerate(moving.names):
        path, _, key = name.rpartition(".")
        module = work.get_submodule(path)
        if module is cache:
            continue
        if type(module) is not nn.Linear:
            log.debug("no stacked points: %s moves and is not in a Linear layer", name)
            return None
        owners.setdefault(path, {})[key] = i
    return owners


def output_layer(work: nn.Module, paths: Sequence[str], forward: Callable[[], Any]) -> str | None:
    """The one of the layers ``paths`` whose output ``forward()`` (a run of ``work``) returns unchanged, if any."""
    outputs: dict[str, Any] = {}

    def record(path: str) -> Callable:
        return lambda module, inputs, output: outputs.__setitem__(path, output)

    handles = [work.get_submodule(path).register_forward_hook(record(path)) for path in paths]
    try:
        result = forward()
    finally:
        for handle in handles:
            handle.remove()
    return next((path for path, output in outputs.items() if output is result), None)


def stack_linear_points(work: nn.Module, moving: MovingWeights, owners: Mapping[str, Mapping[str, int]],
                        head: str | None, pad_narrow: bool) -> list[StackedLinear]:
    """Swap each Linear layer of ``owners`` (see :func:`linear_owners`) for a :class:`StackedLinear`;
    ``head`` (a layer whose output is the model's) gives its output points first; ``pad_narrow``
    pads 9..63 output features to a multiple of 8 (CPU GEMMs). Returns the new layers."""
    stacked = []
    for path, indices in owners.items():
        layer = work.get_submodule(path)
        tensors, directions = {}, {}
        for key in ("weight", "bias"):
            i, own = indices.get(key), getattr(layer, key)
            tensors[key] = own if i is None else moving.base_weights[i]
            directions[key] = None if i is None else torch.stack([d[i] for d in moving.directions])
        if directions["weight"] is None:
            directions["weight"] = torch.zeros(len(moving.directions), *layer.weight.shape, dtype=layer.weight.dtype,
                                               device=layer.weight.device)
        features = layer.out_features
        pad = -features % 8 if pad_narrow and 8 < features < 64 and path != head else 0
        replacement = StackedLinear(tensors["weight"], tensors["bias"], directions["weight"], directions["bias"], pad,
                                    points_first=path == head)
        swap(work, path, replacement)
        stacked.append(replacement)
    return stacked


def run_in_place(work: nn.Module, paths: Sequence[str]) -> int:
    """Make the activation modules at ``paths`` (see
    :func:`landscape.engine.graph.activations_on_fresh_tensors`) overwrite their input; returns how many."""
    for path in paths:
        work.get_submodule(path).inplace = True
    return len(paths)
