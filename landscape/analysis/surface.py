"""Loss surfaces and interpolation: L(w + Σ_i c_i d_i) on a grid of coefficients, resumable.

- Directions (Li et al. 2018) come from :mod:`landscape.params`: seeded Gaussian, normalised per
  filter (default), per layer or not at all; optionally an orthogonalised pair, or the difference
  towards another checkpoint. They are stored with the result.
- :class:`PointEvaluator` evaluates many points fast. A private copy of the model holds the
  weights, which are set in place for each point from the objective's base with foreach ops; the
  evaluation sets stay on the device and run in inference mode. On CPU the first layer's output,
  linear in its weights, is computed once per direction: W(a, b) x = W0 x + a D1 x + b D2 x.
- :func:`evaluate_points` evaluates any list of grid indices (the unit a sharded run distributes).
  The run loop writes blocks of finished points through :class:`landscape.store.IncrementalGroup`,
  so a killed run resumes with no finished point lost and none recomputed.
"""

from __future__ import annotations

import copy
import hashlib
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call

from landscape.errors import LandscapeError
from landscape.objective import Objective, accuracy_count, batchnorm_mode
from landscape.params import difference, flatten, global_norm, orthogonalize, random_direction, unflatten
from landscape.results import Result
from landscape.store import IncrementalGroup, provenance, read_group

DEFAULT_AXIS = np.linspace(-1.0, 1.0, 51)
DEFAULT_ALPHAS = np.linspace(-0.5, 1.5, 41)
FIRST_LAYER_BUDGET = 512 * 2**20  # bytes of cached first-layer outputs the automatic choice allows
METRICS = ("loss", "acc")
_BATCHNORM = nn.modules.batchnorm._BatchNorm
Progress = Callable[[int, int], None]  # (points done, points in total)


class SurfaceResult(Result):
    """``/surface``: Li et al.'s names. ``xcoordinates`` (``ycoordinates``), ``<split>_loss`` and
    ``<split>_acc`` shaped (len(x), len(y)) (or (len(x),) for 1-D), ``done``, and the flat float32
    ``xdirection`` (``ydirection``) whose layout the attributes ``direction_names`` and
    ``direction_shapes`` give."""

    group = "surface"

    def directions(self) -> list[dict[str, Tensor]]:
        """The stored directions as tensor dicts keyed by parameter name (float32)."""
        like = {n: torch.empty(s) for n, s in zip(self.attrs["direction_names"], self.attrs["direction_shapes"])}
        return [unflatten(torch.as_tensor(np.asarray(self.arrays[key])), like)
                for key in ("xdirection", "ydirection") if key in self.arrays]


class InterpolationResult(Result):
    """``/interpolation``: ``alphas``, ``<split>_loss``, ``<split>_acc`` along (1-α) w_a + α w_b, and ``done``."""

    group = "interpolation"


# ---------------------------------------------------------------------------------------------- directions

def _digest(tensors: Mapping[str, Tensor]) -> str:
    digest = hashlib.sha256()
    for name, tensor in tensors.items():
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
    return digest.hexdigest()


def target_state(target: Any, like: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Weights and buffers of another model, cast like ``like``, and a description of where they came from.

    ``target`` is a checkpoint path, a :class:`landscape.checkpoint.Checkpoint`, an ``nn.Module``
    or a state dict. Every name in ``like`` must exist with the same shape.
    """
    from landscape.checkpoint import Checkpoint, load_checkpoint

    if isinstance(target, (str, Path)):
        target = load_checkpoint(target)
    if isinstance(target, Checkpoint):
        info = {"path": str(target.path), "sha256": target.sha256}
        target = target.model
    else:
        info = {}
    if isinstance(target, nn.Module):
        state = {**dict(target.named_parameters()), **dict(target.named_buffers())}
    elif isinstance(target, Mapping):
        state = dict(target)
    else:
        raise LandscapeError(f"cannot read weights from a {type(target).__name__}; "
                             "pass a checkpoint path, a Checkpoint, an nn.Module or a state dict")
    missing = [n for n in like if n not in state]
    if missing:
        raise LandscapeError(f"the other model lacks {missing[:3]}; both must share an architecture")
    wrong = [n for n, t in like.items() if tuple(state[n].shape) != tuple(t.shape)]
    if wrong:
        raise LandscapeError(f"{wrong[0]} has shape {tuple(state[wrong[0]].shape)} in the other model and "
                             f"{tuple(like[wrong[0]].shape)} here; both must share an architecture")
    cast = {n: state[n].detach().to(t.device, t.dtype) for n, t in like.items()}
    return cast, info or {"path": f"<{type(target).__name__}>", "sha256": _digest(cast)}


def surface_directions(params: Mapping[str, Tensor], dims: int = 2, *, seed: int = 0, normalization: str = "filter",
                       include_biasbn: bool = False, orthogonal: bool = False,
                       x_target: Mapping[str, Tensor] | None = None) -> list[dict[str, Tensor]]:
    """The ``dims`` (1 or 2) directions of a surface.

    x is a seeded Gaussian direction (seed stream ``2*seed``) normalised to ``params`` (see
    :func:`landscape.params.normalize_direction`), or ``x_target - params`` when ``x_target`` is
    given (unnormalised, so x = 1 lands on the target). y uses seed stream ``2*seed + 1``; with
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


# ---------------------------------------------------------------------------------------------- evaluation

class _Stop(Exception):
    """Raised by a hook to end a forward pass early."""


def _first_parametric_call(model: nn.Module, x: Tensor) -> tuple[nn.Module, Tensor] | None:
    """The first module with parameters of its own that ``model(x)`` enters, and its input."""
    found: list[tuple[nn.Module, Tensor]] = []

    def stop(module: nn.Module, inputs: tuple) -> None:
        found.append((module, inputs[0] if inputs else None))
        raise _Stop

    handles = [m.register_forward_pre_hook(stop) for m in model.modules()
               if next(m.parameters(recurse=False), None) is not None]
    try:
        model(x)
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return found[0] if found and isinstance(found[0][1], Tensor) else None


class _CachedFirstLayer(nn.Module):
    """Stands in for a Linear/Conv first layer: W0 x + Σ_i c_i D_i x from outputs computed once.

    ``key = (split, batch)`` and ``coefficients`` are set by the evaluator before each forward.
    """

    def __init__(self, base: dict[str, list[Tensor]], directions: dict[str, list[list[Tensor] | None]]) -> None:
        super().__init__()
        self.base, self.dirs = base, directions
        self.key: tuple[str, int] = ("", 0)
        self.coefficients: Sequence[float] = ()

    def forward(self, x: Tensor) -> Tensor:
        split, batch = self.key
        out = self.base[split][batch].clone()
        for c, outputs in zip(self.coefficients, self.dirs[split]):
            if c != 0.0 and outputs is not None:
                out.add_(outputs[batch], alpha=c)
        return out


class PointEvaluator:
    """Loss and accuracy at ``base + Σ_i c_i d_i`` for many coefficient vectors ``c``.

    Args:
        objectives: ``{split: Objective}``. The first supplies the base weights and buffers; all
            share its parameters, dtype, device and BatchNorm mode; each brings its evaluation set
            and loss. The objectives and their model are never modified.
        directions: tensor dicts keyed by parameter names (or floating buffer names, to move
            BatchNorm statistics too).
        bn_recompute: before each point, recompute every BatchNorm layer's running mean and
            (unbiased) variance exactly over the first objective's evaluation set, with batch
            statistics upstream (like ``torch.optim.swa_utils.update_bn``), then evaluate in eval mode.
        linear_first_layer: cache the first layer's outputs (True/False); ``None`` does so on CPU
            when the cache fits :data:`FIRST_LAYER_BUDGET`. ``self.linear_first_layer`` says what was used.
    """

    def __init__(self, objectives: Mapping[str, Objective], directions: Sequence[Mapping[str, Tensor]], *,
                 bn_recompute: bool = False, linear_first_layer: bool | None = None) -> None:
        self.objectives = dict(objectives)
        first = next(iter(self.objectives.values()))
        self.primary, self.bn, self.device = next(iter(self.objectives)), first.bn, first.device
        for split, objective in self.objectives.items():
            if ((objective.dtype, objective.device, objective.bn) != (first.dtype, first.device, first.bn)
                    or {n: t.shape for n, t in objective.params.items()} != {n: t.shape for n, t in first.params.items()}):
                raise LandscapeError(f"the {split} objective differs from the first in parameters, dtype, device "
                                     "or BatchNorm mode; build both from the same checkpoint and options")
        self.work = copy.deepcopy(first.model).to(device=first.device, dtype=first.dtype)
        state = {**dict(self.work.named_parameters()), **dict(self.work.named_buffers())}
        base = {**first.frozen, **first.params, **first.buffers}
        with torch.no_grad():
            for name, tensor in state.items():
                tensor.requires_grad_(False)
                if name in base:
                    tensor.copy_(base[name])
        names = list(dict.fromkeys(n for d in directions for n in d))
        unknown = [n for n in names if n not in state or not state[n].is_floating_point()]
        if unknown:
            raise LandscapeError(f"a direction moves {unknown[0]!r}, which is not a floating parameter or buffer "
                                 "of the model; make directions from this model's parameters")
        self.targets = [state[n] for n in names]
        self.base = [base[n] for n in names]
        self.directions = [[d[n].to(state[n]) if n in d else torch.zeros_like(state[n]) for n in names]
                           for d in directions]
        self.batches = {split: list(o.batches()) for split, o in self.objectives.items()}
        self.bn_recompute = bn_recompute
        self._statistics: dict[nn.Module, list] | None = None
        if bn_recompute:
            self._setup_recompute()
        self.cache: _CachedFirstLayer | None = None
        wanted = linear_first_layer if linear_first_layer is not None else self.device.type == "cpu"
        budget = math.inf if linear_first_layer else FIRST_LAYER_BUDGET
        self.linear_first_layer = bool(wanted) and self._install_cache(directions, budget)

    # -- BatchNorm statistics ------------------------------------------------------------------------

    def _setup_recompute(self) -> None:
        if self.bn != "eval":
            raise LandscapeError("recomputing BatchNorm statistics is for eval mode (running statistics); "
                                 "use --bn eval with --bn-recompute, or drop --bn-recompute")
        layers = [m for m in self.work.modules() if isinstance(m, _BATCHNORM) and m.running_mean is not None]
        if not layers:
            raise LandscapeError("the model has no BatchNorm layers with running statistics; drop --bn-recompute")
        for layer in layers:
            layer.register_forward_pre_hook(self._observe)
        self.bn_layers = layers

    def _observe(self, module: nn.Module, inputs: tuple) -> None:
        if self._statistics is None:
            return
        x = inputs[0].double()
        dims = [0, *range(2, x.ndim)]
        sums = self._statistics[module]
        sums[0] += x.sum(dims)
        sums[1] += x.square().sum(dims)
        sums[2] += x.numel() // x.shape[1]

    def _recompute_statistics(self) -> None:
        self._statistics = {m: [0.0, 0.0, 0] for m in self.bn_layers}
        with batchnorm_mode(self.work, "train"):
            for batch, (x, _, _) in enumerate(self.batches[self.primary]):
                self._select(self.primary, batch)
                self.work(x)
        for layer, (total, squares, count) in self._statistics.items():
            mean = total / count
            layer.running_mean.copy_(mean)
            layer.running_var.copy_((squares / count - mean.square()) * (count / max(count - 1, 1)))
        self._statistics = None

    # -- first-layer cache ---------------------------------------------------------------------------

    def _install_cache(self, directions: Sequence[Mapping[str, Tensor]], budget: float) -> bool:
        with torch.inference_mode(), batchnorm_mode(self.work, self.bn):
            found = _first_parametric_call(self.work, self.batches[self.primary][0][0])
            if found is None or not isinstance(found[0], (nn.Linear, nn.modules.conv._ConvNd)):
                return False
            layer = found[0]
            path = next(name for name, m in self.work.named_modules() if m is layer)
            if not path:
                return False
            own = dict(layer.named_parameters())
            moving = [{key: d[f"{path}.{key}"].to(p) if f"{path}.{key}" in d else torch.zeros_like(p)
                       for key, p in own.items()} if any(f"{path}.{key}" in d for key in own) else None
                      for d in directions]
            per_example = layer(found[1]).numel() // len(found[1]) * found[1].element_size()
            examples = sum(o.num_examples for o in self.objectives.values())
            copies = 1 + sum(1 for m in moving if m)
            if per_example * examples * copies > budget:
                return False
            base: dict[str, list[Tensor]] = {}
            dirs: dict[str, list[list[Tensor] | None]] = {}
            for split, batches in self.batches.items():
                inputs = [_first_parametric_call(self.work, x)[1] for x, _, _ in batches]
                base[split] = [layer(x) for x in inputs]
                dirs[split] = [[functional_call(layer, m, (x,)) for x in inputs] if m else None for m in moving]
            cache = _CachedFirstLayer(base, dirs)
            if not self._validate(layer, path, cache, len(directions)):
                return False
        self.cache = cache
        return True

    def _swap(self, path: str, module: nn.Module) -> None:
        parent, _, child = path.rpartition(".")
        setattr(self.work.get_submodule(parent) if parent else self.work, child, module)

    def _validate(self, layer: nn.Module, path: str, cache: _CachedFirstLayer, count: int) -> bool:
        """Swap the cache in and keep it only if the outputs match the plain model at a generic point."""
        point = [0.37 * (-1.6) ** i for i in range(count)]
        self._move(point)
        x = self.batches[self.primary][0][0]
        reference = self.work(x)
        self._swap(path, cache)
        cache.key, cache.coefficients = (self.primary, 0), point
        candidate = self.work(x)
        tolerance = 1e-3 if reference.dtype in (torch.float32, torch.float16, torch.bfloat16) else 1e-8
        scale = float(reference.abs().max()) if reference.numel() else 1.0
        if torch.allclose(candidate, reference, rtol=tolerance, atol=tolerance * max(scale, 1e-30)):
            return True
        self._swap(path, layer)
        return False

    # -- points --------------------------------------------------------------------------------------

    def _move(self, coefficients: Sequence[float]) -> None:
        torch._foreach_copy_(self.targets, self.base)
        for c, direction in zip(coefficients, self.directions):
            if c != 0.0:
                torch._foreach_add_(self.targets, direction, alpha=float(c))

    def _select(self, split: str, batch: int) -> None:
        if self.cache is not None:
            self.cache.key = (split, batch)

    def _pass(self, split: str) -> list[Tensor]:
        objective = self.objectives[split]
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        correct = torch.zeros((), dtype=torch.float64, device=self.device)
        for batch, (x, y, weight) in enumerate(self.batches[split]):
            self._select(split, batch)
            out = self.work(x)
            total += objective.loss_fn(out, y).double() * weight
            correct += accuracy_count(out, y)
        return [total, correct / objective.num_examples]

    def evaluate(self, points: Sequence[Sequence[float]]) -> dict[str, np.ndarray]:
        """``{"<split>_loss", "<split>_acc": array (len(points),)}`` at each coefficient vector."""
        rows = []
        with torch.inference_mode(), batchnorm_mode(self.work, self.bn):
            for coefficients in points:
                self._move(coefficients)
                if self.cache is not None:
                    self.cache.coefficients = coefficients
                if self.bn_recompute:
                    self._recompute_statistics()
                rows.append(torch.stack([v for split in self.objectives for v in self._pass(split)]))
        values = torch.stack(rows).cpu().numpy() if rows else np.zeros((0, 2 * len(self.objectives)))
        names = [f"{split}_{metric}" for split in self.objectives for metric in METRICS]
        return {name: values[:, i] for i, name in enumerate(names)}


# ---------------------------------------------------------------------------------------------- grid runs

def plain_provenance(config: Mapping[str, Any], objective: Objective, seed: int | None) -> dict[str, Any]:
    """:func:`landscape.store.provenance` with ``str`` subclasses (``torch.__version__``) made plain for HDF5."""
    attrs = provenance(config, objective.provenance(), seed, objective.device)
    return {key: str(value) if isinstance(value, str) else value for key, value in attrs.items()}


def evaluate_points(evaluator: PointEvaluator, coordinates: Sequence[np.ndarray],
                    indices: Sequence[tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Values at the grid points ``indices`` (any subset, in any order: the shardable unit)."""
    return evaluator.evaluate([tuple(float(axis[i]) for axis, i in zip(coordinates, index)) for index in indices])


class _MemoryGroup:
    """In-memory stand-in for :class:`IncrementalGroup` when no output file is given."""

    def __init__(self, datasets: Sequence[str], unit_shape: tuple[int, ...], static: Mapping[str, Any]) -> None:
        self.values = {name: np.full(unit_shape, np.nan) for name in datasets}
        self.done = np.zeros(unit_shape, dtype=bool)
        self.static = dict(static)

    def pending(self) -> list[tuple[int, ...]]:
        return [tuple(int(i) for i in index) for index in np.argwhere(~self.done)]

    def write(self, index: tuple, values: Mapping[str, Any]) -> None:
        for name, value in values.items():
            self.values[name][index] = value
        self.done[index] = True

    def arrays(self) -> dict[str, Any]:
        return {**self.static, **self.values, "done": self.done.copy()}

    def finalize(self) -> None:
        """Nothing to move: the values are already in memory."""

    def close(self) -> None:
        """Nothing to release."""


def _run(sink: IncrementalGroup | _MemoryGroup, evaluator: PointEvaluator, coordinates: Sequence[np.ndarray],
         progress: Progress | None, flush_seconds: float) -> None:
    """Evaluate every pending point; write runs of neighbours along the last axis as one block,
    at least every ``flush_seconds`` (so a kill loses at most that much work)."""
    pending = sink.pending()
    total = math.prod(len(axis) for axis in coordinates)
    done = total - len(pending)
    block: list[tuple[int, ...]] = []
    values: dict[str, list[float]] = {}
    since = time.perf_counter()

    def flush() -> None:
        nonlocal block, values, done, since
        if block:
            first, last = block[0], block[-1]
            sink.write((*first[:-1], slice(first[-1], last[-1] + 1)), {k: np.asarray(v) for k, v in values.items()})
            done += len(block)
            if progress is not None:
                progress(done, total)
        block, values, since = [], {}, time.perf_counter()

    if progress is not None:
        progress(done, total)
    for index in pending:
        if block and (index[:-1] != block[-1][:-1] or index[-1] != block[-1][-1] + 1):
            flush()
        for name, value in evaluate_points(evaluator, coordinates, [index]).items():
            values.setdefault(name, []).append(float(value[0]))
        block.append(index)
        if time.perf_counter() - since >= flush_seconds:
            flush()
    flush()


def _label_splits(objective: Objective, test_objective: Objective | None) -> dict[str, Objective]:
    """``{split: objective}``: the objective's own split (train unless its provenance says test), plus test."""
    label = objective.source.get("eval_set", {}).get("split", "train")
    if test_objective is None:
        return {label: objective}
    if label == "test":
        raise LandscapeError("the first objective is on the test split and a test objective was given too; "
                             "pass the train-split objective first")
    return {"train": objective, "test": test_objective}


def _axis(values: Any, name: str) -> np.ndarray:
    axis = np.asarray(values, dtype=np.float64).reshape(-1)
    if axis.size == 0 or not np.all(np.isfinite(axis)):
        raise LandscapeError(f"{name} must be a non-empty list of finite coordinates, e.g. -1:1:51")
    return axis


def _grid(result_type: type[Result], objectives: Mapping[str, Objective], directions: Sequence[Mapping[str, Tensor]],
          coordinates: Sequence[np.ndarray], static: Mapping[str, Any], config: dict[str, Any], extra: dict[str, Any],
          seed: int | None, *, out: str | Path | None, resume: bool, overwrite: bool, bn_recompute: bool,
          linear_first_layer: bool | None, progress: Progress | None, flush_seconds: float) -> Result:
    """Evaluate ``objectives`` on the grid ``coordinates`` along ``directions``; write ``/group`` to ``out``."""
    first = next(iter(objectives.values()))
    config = {**config, "splits": list(objectives), "bn": first.bn, "bn_recompute": bn_recompute,
              "dtype": str(first.dtype).replace("torch.", ""), "linear_first_layer": linear_first_layer,
              "checkpoint_sha256": str(first.source.get("checkpoint_sha256", "")),
              "eval_sets": {s: o.source.get("eval_set", {}) for s, o in objectives.items()}}
    evaluator = PointEvaluator(objectives, directions, bn_recompute=bn_recompute, linear_first_layer=linear_first_layer)
    attrs = {**plain_provenance(config, first, seed), **extra, "linear_first_layer_used": evaluator.linear_first_layer}
    names = [f"{s}_{m}" for s in objectives for m in METRICS]
    shape = tuple(len(axis) for axis in coordinates)
    sink = (IncrementalGroup(out, result_type.group, {n: () for n in names}, shape, attrs, static,
                             resume=resume, overwrite=overwrite) if out is not None
            else _MemoryGroup(names, shape, static))
    try:
        _run(sink, evaluator, coordinates, progress, flush_seconds)
        arrays = sink.arrays()
        sink.finalize()
    finally:
        sink.close()
    if out is not None:
        arrays, attrs = read_group(out, result_type.group)
    return result_type(arrays, attrs)


def _direction_attrs(directions: Sequence[Mapping[str, Tensor]], like: Mapping[str, Tensor]) -> dict[str, Any]:
    names = list(directions[0])
    attrs: dict[str, Any] = {"direction_names": names, "direction_shapes": [list(like[n].shape) for n in names]}
    for axis, direction in zip("xy", directions):
        attrs[f"{axis}direction_norm"] = float(global_norm(list(direction.values())))
    if len(directions) == 2:
        x, y = (flatten(d).double() for d in directions)
        attrs["direction_cosine"] = float(x @ y / (x.norm() * y.norm()).clamp_min(1e-30))
    return attrs


def loss_surface(objective: Objective, x: Any = DEFAULT_AXIS, y: Any = DEFAULT_AXIS, *,
                 test_objective: Objective | None = None, normalization: str = "filter", include_biasbn: bool = False,
                 orthogonal: bool = False, x_target: Any = None, bn_recompute: bool = False, seed: int = 0,
                 out: str | Path | None = None, resume: bool = False, overwrite: bool = False,
                 linear_first_layer: bool | None = None, progress: Progress | None = None,
                 flush_seconds: float = 1.0) -> SurfaceResult:
    """Loss and accuracy on the plane L(w + a d1 + b d2) (Li et al. 2018), or the line L(w + a d1).

    Args:
        objective: the model and evaluation set (its split names the arrays: ``train_loss``, ...).
        x, y: coordinates a and b (1-D arrays; default 51 points on [-1, 1]); ``y=None`` for 1-D.
            The arrays come out shaped (len(x), len(y)), x along axis 0.
        test_objective: a second evaluation set (the test split) evaluated at the same points.
        normalization: ``filter`` (default), ``layer`` or ``none`` (see :mod:`landscape.params`).
        include_biasbn: also move biases and BatchNorm parameters (zero by default).
        orthogonal: make d2 orthogonal to d1.
        x_target: another checkpoint (path, Checkpoint, module or state dict): d1 = w_target - w.
        bn_recompute: recompute BatchNorm running statistics at every point (see :class:`PointEvaluator`).
        seed: seed of the random directions (d1 from stream 2*seed, d2 from 2*seed + 1).
        out, resume, overwrite: write ``/surface`` of this HDF5 file incrementally; ``resume``
            continues an interrupted run (same options required), ``overwrite`` starts over.
        linear_first_layer: first-layer output caching (see :class:`PointEvaluator`); same values.
        progress: called as ``progress(points_done, points_total)`` after each written block.
        flush_seconds: finished points are written at least this often (0: after every point).

    Divergent points are stored as they come (inf or NaN), never imputed.
    """
    objectives = _label_splits(objective, test_objective)
    coordinates = [_axis(x, "x")] + ([] if y is None else [_axis(y, "y")])
    if orthogonal and y is None:
        raise LandscapeError("an orthogonal pair needs two directions; give y coordinates or drop orthogonal")
    target, target_info = (target_state(x_target, objective.params) if x_target is not None else (None, None))
    directions = surface_directions(objective.params, len(coordinates), seed=seed, normalization=normalization,
                                    include_biasbn=include_biasbn, orthogonal=orthogonal, x_target=target)
    static = {f"{axis}coordinates": values for axis, values in zip("xy", coordinates)}
    static.update({f"{axis}direction": flatten(d).detach().to("cpu", torch.float32).numpy()
                   for axis, d in zip("xy", directions)})
    config = {"x": coordinates[0].tolist(), "y": coordinates[1].tolist() if y is not None else None,
              "normalization": normalization if target is None else "target", "include_biasbn": include_biasbn,
              "orthogonal": orthogonal, "x_target": target_info, "direction_seed": seed}
    return _grid(SurfaceResult, objectives, directions, coordinates, static, config,
                 _direction_attrs(directions, objective.params), seed, out=out, resume=resume, overwrite=overwrite,
                 bn_recompute=bn_recompute, linear_first_layer=linear_first_layer, progress=progress,
                 flush_seconds=flush_seconds)


def interpolate(objective: Objective, target: Any, alphas: Any = DEFAULT_ALPHAS, *, move_buffers: bool = False,
                test_objective: Objective | None = None, bn_recompute: bool = False, out: str | Path | None = None,
                resume: bool = False, overwrite: bool = False, linear_first_layer: bool | None = None,
                progress: Progress | None = None, flush_seconds: float = 1.0) -> InterpolationResult:
    """Loss and accuracy along w(α) = w_a + α (w_b - w_a) (Goodfellow et al. 2015), α ∈ [-0.5, 1.5] by default.

    Args:
        objective: checkpoint a (its weights are w_a) with the evaluation set.
        target: checkpoint b: a path, a :class:`landscape.checkpoint.Checkpoint`, a module or a state dict.
        alphas: the coefficients α (α = 0 is a, α = 1 is b).
        move_buffers: interpolate floating buffers (BatchNorm running statistics) too; otherwise
            a's buffers are used throughout, so with BatchNorm α = 1 is b's weights with a's statistics.
        Other arguments as in :func:`loss_surface`.
    """
    objectives = _label_splits(objective, test_objective)
    coordinates = [_axis(alphas, "alphas")]
    floating = {n: b for n, b in objective.buffers.items() if b.is_floating_point()}
    state, info = target_state(target, {**objective.params, **(floating if move_buffers else {})})
    direction = difference({n: state[n] for n in objective.params}, objective.params)
    if move_buffers:
        direction.update(difference({n: state[n] for n in floating}, floating))
    config = {"alphas": coordinates[0].tolist(), "target": info, "move_buffers": move_buffers}
    extra = {"target": info["path"], "target_sha256": info["sha256"],
             "distance": float(global_norm([direction[n] for n in objective.params]))}
    return _grid(InterpolationResult, objectives, [direction], coordinates, {"alphas": coordinates[0]}, config, extra,
                 None, out=out, resume=resume, overwrite=overwrite, bn_recompute=bn_recompute,
                 linear_first_layer=linear_first_layer, progress=progress, flush_seconds=flush_seconds)
