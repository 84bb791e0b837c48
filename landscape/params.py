"""Parameter-vector helpers shared by the optimizers and the analyses.

Tensors travel as ``dict[str, Tensor]`` (the ``torch.func`` convention) or as plain
sequences in a fixed order. A *filter* is a slice along dim 0 of a tensor with two or
more dimensions (an output channel or neuron); a tensor with fewer dimensions counts as
one filter. Directions in weight space (Li et al. 2018): seeded, normalised per filter or layer,
orthogonalised, towards another checkpoint, and the pair of a loss surface with what a result
stores about it (:func:`surface_directions`, :func:`direction_attrs`).
"""

from __future__ import annotations

import fnmatch
import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from landscape.errors import LandscapeError

NORMALIZATIONS = ("filter", "layer", "none")


def is_filtered(tensor: Tensor) -> bool:
    """True for weight tensors with per-filter structure (ndim >= 2); biases and BN params are not."""
    return tensor.ndim >= 2


def filter_norms(tensor: Tensor) -> Tensor:
    """L2 norm of each filter, shaped to broadcast against ``tensor``.

    Returns shape ``(out, 1, ..., 1)`` for ``ndim >= 2`` and a 0-d tensor otherwise.
    """
    if tensor.ndim >= 2:
        return torch.linalg.vector_norm(tensor.flatten(1), dim=1).view(-1, *([1] * (tensor.ndim - 1)))
    return torch.linalg.vector_norm(tensor)


# Batched filter-wise arithmetic: every filter of every tensor laid end to end in one flat
# vector, so a step costs a few kernels instead of several per tensor. The filters are exactly
# those of landscape.params.filter_norms (tested equal); ``_filter_squares`` is its batched form.

@functools.lru_cache(maxsize=64)
def filter_layout(shapes: tuple[torch.Size, ...], device: torch.device) -> tuple[Tensor, tuple[int, ...]]:
    """(entries per filter, as a tensor on ``device``; filters per tensor) for tensors of ``shapes``."""
    lengths, counts = [], []
    for shape in shapes:
        rows = shape[0] if len(shape) >= 2 else 1
        lengths += [math.prod(shape) // max(rows, 1)] * rows
        counts.append(rows)
    return torch.tensor(lengths, dtype=torch.int64, device=device), tuple(counts)


def flat_cat(tensors: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def filter_square_sums(tensors: Sequence[Tensor]) -> Tensor:
    """Sum of squares of each filter of each tensor, one flat vector (= filter_norms(t)**2, concatenated)."""
    lengths, _ = filter_layout(tuple(t.shape for t in tensors), tensors[0].device)
    flat = flat_cat(tensors)
    return torch.segment_reduce(flat * flat, "sum", lengths=lengths, unsafe=True)


def per_filter(values: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Split a flat per-filter vector into tensors shaped like ``filter_norms`` of each of ``like``."""
    _, counts = filter_layout(tuple(t.shape for t in like), like[0].device)
    return [v.view(-1, *([1] * (t.ndim - 1))) if is_filtered(t) else v.view(())
            for v, t in zip(values.split(counts), like)]


def per_entry(values: Tensor, like: Sequence[Tensor]) -> Tensor:
    """Repeat each filter's value over its entries: a flat vector as long as all of ``like``."""
    lengths, _ = filter_layout(tuple(t.shape for t in like), like[0].device)
    return values.repeat_interleave(lengths, output_size=sum(t.numel() for t in like))


def split_like(flat: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    return [z.view_as(t) for z, t in zip(flat.split([t.numel() for t in like]), like)]


def global_norm(tensors: Sequence[Tensor], p: float = 2.0) -> Tensor:
    """p-norm over all entries of all tensors, as a 0-d tensor (no host synchronisation)."""
    if not tensors:
        return torch.zeros(())
    norms = torch._foreach_norm(list(tensors), p)
    return torch.linalg.vector_norm(torch.stack(norms), p)


def flatten(tensors: Mapping[str, Tensor] | Sequence[Tensor]) -> Tensor:
    """Concatenate tensors (in dict/sequence order) into one flat vector."""
    values = tensors.values() if isinstance(tensors, Mapping) else tensors
    return torch.cat([t.reshape(-1) for t in values])


def unflatten(vector: Tensor, like: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Split a flat vector into tensors shaped like ``like`` (same key order)."""
    total = sum(t.numel() for t in like.values())
    if vector.numel() != total:
        raise LandscapeError(f"vector has {vector.numel()} entries but the parameters have {total}; "
                             "use a direction made for this architecture")
    out, offset = {}, 0
    for name, t in like.items():
        out[name] = vector[offset:offset + t.numel()].view_as(t)
        offset += t.numel()
    return out


def select(names: Sequence[str], patterns: str | Sequence[str] | None) -> list[str]:
    """Names matching any of the glob ``patterns`` (comma-separated string or list); all if None."""
    if patterns is None:
        return list(names)
    if isinstance(patterns, str):
        patterns = [p.strip() for p in patterns.split(",") if p.strip()]
    chosen = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    if not chosen:
        shown = ", ".join(list(names)[:8])
        raise LandscapeError(f"no parameter matches {list(patterns)}; names look like: {shown} ...")
    return chosen


def random_like(tensors: Mapping[str, Tensor], generator: torch.Generator) -> dict[str, Tensor]:
    """Standard normal tensors shaped like ``tensors``, drawn from ``generator`` in key order."""
    return {n: torch.randn(t.shape, generator=generator, device=generator.device, dtype=t.dtype).to(t.device)
            for n, t in tensors.items()}


def normalize_direction(direction: Mapping[str, Tensor], weights: Mapping[str, Tensor],
                        normalization: str = "filter", include_biasbn: bool = False) -> dict[str, Tensor]:
    """Rescale a direction to the scale of ``weights`` (Li et al. 2018).

    - ``filter``: each filter j of a tensor with ndim >= 2 gets d_j * ||w_j|| / ||d_j||.
    - ``layer``: each tensor gets d * ||w|| / ||d||.
    - ``none``: unchanged.
    Tensors with ndim < 2 (biases, BatchNorm) get zero unless ``include_biasbn``; then they are
    treated as one filter (filter/layer) or left unchanged (none).
    """
    if normalization not in NORMALIZATIONS:
        raise LandscapeError(f"unknown normalization {normalization!r}; choose one of {', '.join(NORMALIZATIONS)}")
    out = {}
    for name, d in direction.items():
        w = weights[name]
        if not is_filtered(w) and not include_biasbn:
            out[name] = torch.zeros_like(d)
        elif normalization == "none":
            out[name] = d.clone()
        elif normalization == "layer" or not is_filtered(w):
            out[name] = d * (torch.linalg.vector_norm(w) / torch.linalg.vector_norm(d).clamp_min(1e-12))
        else:
            out[name] = d * (filter_norms(w) / filter_norms(d).clamp_min(1e-12))
    return out


def random_direction(weights: Mapping[str, Tensor], seed: int, normalization: str = "filter",
                     include_biasbn: bool = False) -> dict[str, Tensor]:
    """A seeded Gaussian direction, normalised to ``weights`` (see :func:`normalize_direction`)."""
    generator = torch.Generator().manual_seed(seed)
    raw = {n: torch.randn(t.shape, generator=generator, dtype=torch.float64).to(t.device, t.dtype)
           for n, t in weights.items()}
    return normalize_direction(raw, weights, normalization, include_biasbn)


def dot(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> Tensor:
    """Inner product of two tensor dicts over their shared keys, as a 0-d tensor."""
    return sum((a[n].flatten() @ b[n].flatten()) for n in a)


def orthogonalize(first: Mapping[str, Tensor], second: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``second`` minus its projection on ``first``, rescaled to its original global norm."""
    coef = dot(first, second) / dot(first, first).clamp_min(1e-30)
    out = {n: second[n] - coef * first[n] for n in second}
    scale = math.sqrt(float(dot(second, second))) / max(math.sqrt(float(dot(out, out))), 1e-30)
    return {n: t * scale for n, t in out.items()}


def difference(target: Mapping[str, Tensor], base: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The direction ``target - base`` (e.g. towards another checkpoint)."""
    missing = [n for n in base if n not in target]
    if missing:
        raise LandscapeError(f"the other checkpoint lacks {missing[:3]}; both must share an architecture")
    return {n: target[n].to(base[n]) - base[n] for n in base}


def surface_directions(params: Mapping[str, Tensor], dims: int = 2, *, seed: int = 0, normalization: str = "filter",
                       include_biasbn: bool = False, orthogonal: bool = False,
                       x_target: Mapping[str, Tensor] | None = None) -> list[dict[str, Tensor]]:
    """The ``dims`` (1 or 2) directions of a loss surface (Li et al. 2018).

    x is a seeded Gaussian direction (seed stream ``2*seed``) normalised to ``params`` (see
    :func:`normalize_direction`), or ``x_target - params`` when ``x_target`` is given
    (unnormalised, so x = 1 lands on the target). y uses seed stream ``2*seed + 1``; with
    ``orthogonal`` it is made orthogonal to x, keeping its global norm.
    """
    if dims not in (1, 2):
        raise LandscapeError(f"a surface has 1 or 2 directions, not {dims}")
    x = (difference(x_target, params) if x_target is not None
         else random_direction(params, 2 * seed, normalization, include_biasbn))
    if dims == 1:
        return [x]
    y = random_direction(params, 2 * seed + 1, normalization, include_biasbn)
    return [x, orthogonalize(x, y) if orthogonal else y]


def direction_attrs(directions: Sequence[Mapping[str, Tensor]], like: Mapping[str, Tensor]) -> dict[str, Any]:
    """What a result stores about its directions: their parameter names and shapes (the layout of
    the flat stored vectors), the global norm of each (``xdirection_norm``, ``ydirection_norm``) and,
    for two, the cosine between them."""
    names = list(directions[0])
    attrs: dict[str, Any] = {"direction_names": names, "direction_shapes": [list(like[n].shape) for n in names]}
    for axis, direction in zip("xy", directions):
        attrs[f"{axis}direction_norm"] = float(global_norm(list(direction.values())))
    if len(directions) == 2:
        x, y = (flatten(d).double() for d in directions)
        attrs["direction_cosine"] = float(x @ y / (x.norm() * y.norm()).clamp_min(1e-30))
    return attrs
