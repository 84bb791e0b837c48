"""Loss surfaces and interpolation: L(w + Σ_i c_i d_i) on a grid of coefficients, resumable.

- Directions (Li et al. 2018) come from :mod:`landscape.params`: seeded Gaussian, normalised per
  filter (default), per layer or not at all; optionally an orthogonalised pair, or the difference
  towards another checkpoint. They are stored with the result.
- :class:`PointEvaluator` evaluates many points fast. A private copy of the model holds the
  weights, which are set in place for each point from the objective's base with foreach ops; the
  evaluation sets stay on the device and run in inference mode. Eval-mode BatchNorm is folded into
  the layer before it, CPU convolutions run channels-last, and on CPU the first layer's output,
  linear in its weights, is computed once per direction: W(a, b) x = W0 x + a D1 x + b D2 x.
  When every moving weight sits in a Linear layer (an MLP), many points share one forward: the
  batch is stacked once per point and each Linear applies its own weights to its block (bmm).
- :func:`evaluate_points` evaluates any list of grid indices (the unit a sharded run distributes).
  :func:`run_group` writes blocks of finished points through :class:`landscape.store.IncrementalGroup`,
  so a killed run resumes with no finished point lost and none recomputed, bit-identical to an
  uninterrupted run (``landscape radius`` uses it too). :func:`check_room` refuses grids that
  cannot fit in memory or on disk before anything is allocated.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import functools
import hashlib
import math
import operator
import time
import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from landscape.errors import LandscapeError
from landscape.objective import Objective, accuracy_count, batchnorm_mode, count_nonfinite, has_batchnorm
from landscape.params import difference, flatten, global_norm, orthogonalize, random_direction, unflatten
from landscape.resources import require
from landscape.results import Result
from landscape.store import IncrementalGroup, MemoryGroup, provenance, read_group

DEFAULT_AXIS = np.linspace(-1.0, 1.0, 51)
DEFAULT_ALPHAS = np.linspace(-0.5, 1.5, 41)
FIRST_LAYER_BUDGET = 512 * 2**20  # bytes of cached first-layer outputs the automatic choice allows
# the automatic number of stacked points keeps the widest stacked activation within these bytes: on
# the CPU small enough that the allocator reuses its memory instead of mapping fresh pages every time
STACK_BYTES = {"cpu": 4 * 2**20, "other": 256 * 2**20}
MAX_STACK = 64  # points per stacked forward at most
# on the CPU, rows per forward keep the largest activation within these bytes (a cache-sized working
# set: ResNet-18 on 1,000 CIFAR images runs 1.3x faster in chunks of 32 than in one batch)
MICRO_BATCH_BYTES = 8 * 2**20
METRICS = ("loss", "acc")
_BATCHNORM = nn.modules.batchnorm._BatchNorm
_FOLDABLE_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_FOLDABLE_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_INPLACE_ACTIVATIONS = (nn.ReLU, nn.LeakyReLU, nn.Hardtanh, nn.ELU, nn.CELU, nn.SELU, nn.SiLU, nn.Mish, nn.Hardswish)
Traced = tuple[list[tuple[torch.fx.Node, torch.fx.Node]], Counter]  # see _sole_inputs
Progress = Callable[[int, int], None]  # (points done, points in total)


class SurfaceResult(Result):
    """``/surface``: Li et al.'s names. ``xcoordinates`` (``ycoordinates``), ``<split>_loss`` and
    ``<split>_acc`` shaped (len(x), len(y)) (or (len(x),) for 1-D), ``done``, and the flat float32
    ``xdirection`` (``ydirection``) whose layout the attributes ``direction_names`` and
    ``direction_shapes`` give."""

    group = "surface"

    def _repr_mimebundle_(self, include=None, exclude=None) -> dict[str, Any]:
        """Jupyter: the interactive figure when plotly is installed, else the static one (imported here,
        so ``import landscape`` imports neither)."""
        from landscape.plotting import display_bundle
        return display_bundle(self.arrays, self.attrs, include, exclude)

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


def _sole_inputs(model: nn.Module) -> Traced:
    """From a ``torch.fx`` trace of ``model``: the (producer, module call) node pairs where the call's
    only input is the producer's output and nothing else uses that output, and how often each module
    is called. Nothing if tracing fails."""
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # noqa: BLE001 - an untraceable model simply gets no folding and no in-place activations
        return [], Counter()
    pairs = [(node.args[0], node) for node in graph.nodes
             if node.op == "call_module" and len(node.args) == 1 and not node.kwargs
             and isinstance(node.args[0], torch.fx.Node) and len(node.args[0].users) == 1]
    return pairs, Counter(node.target for node in graph.nodes if node.op == "call_module")


def _conv_batchnorm_pairs(model: nn.Module, traced: Traced) -> list[tuple[str, str]]:
    """(layer, BatchNorm) module paths where the BatchNorm's only input is a Conv/Linear layer's output
    that nothing else uses, each called once."""
    pairs, calls = traced
    modules = dict(model.named_modules())
    return [(source.target, node.target) for source, node in pairs
            if source.op == "call_module" and type(modules[node.target]) in _FOLDABLE_NORMS
            and type(modules[source.target]) in _FOLDABLE_LAYERS and modules[node.target].running_mean is not None
            and calls[node.target] == calls[source.target] == 1]


def _activations_on_fresh_tensors(model: nn.Module, traced: Traced) -> list[str]:
    """Paths of activation modules every call of which gets a new tensor that nothing else uses (a
    Conv/Linear/BatchNorm output or a sum), so they may overwrite it."""
    pairs, calls = traced
    modules = dict(model.named_modules())
    fresh = Counter(node.target for source, node in pairs if isinstance(modules[node.target], _INPLACE_ACTIVATIONS) and (
        (source.op == "call_module" and isinstance(modules[source.target], _FOLDABLE_LAYERS + (_BATCHNORM,)))
        or (source.op == "call_function" and source.target in (operator.add, torch.add))))
    return [path for path, count in fresh.items() if count == calls[path]]


class _CachedFirstLayer(nn.Module):
    """Stands in for a Linear/Conv first layer: W0 x + Σ_i c_i D_i x from outputs computed once.

    ``key = (split, batch)`` and ``coefficients`` are set by the evaluator before each forward; the
    input must be that batch's first-layer input or a prefix of it (the rows returned). Coefficients
    as a (P, k) tensor give P stacked blocks of rows, one per point.

    Args:
        base: ``{split: [W0 x per batch]}``, each (rows, ...).
        steps: ``{split: [D x per batch]}``, each (len(columns), rows, ...).
        columns: the directions (coefficient positions) that move this layer.
    """

    def __init__(self, base: dict[str, list[Tensor]], steps: dict[str, list[Tensor]], columns: list[int]) -> None:
        super().__init__()
        self.base, self.steps, self.columns = base, steps, columns
        self.key: tuple[str, int] = ("", 0)
        self.coefficients: Sequence[float] | Tensor = ()

    def forward(self, x: Tensor) -> Tensor:
        split, batch = self.key
        rows = len(x)
        base, steps, c = self.base[split][batch][:rows], self.steps[split][batch][:, :rows], self.coefficients
        if isinstance(c, Tensor):
            out = torch.addmm(base.reshape(1, -1), c[:, self.columns], steps.reshape(len(self.columns), base.numel()))
            return out.view(-1, *base.shape[1:])
        out = None
        for column, step in zip(self.columns, steps):
            if c[column] != 0.0:
                out = torch.add(base, step, alpha=c[column]) if out is None else out.add_(step, alpha=c[column])
        return base.clone() if out is None else out


class _StackedLinear(nn.Module):
    """Stands in for a Linear layer whose weights move, for P points in one call.

    The input rows come as P equal blocks; block p sees the weights base + Σ_i c_pi D_i with
    ``coefficients`` (a (P, k) tensor) set by the evaluator before each forward. ``pad`` zero
    output features are computed and dropped (CPU GEMMs run narrow outputs such as 10 classes
    twice as fast at a multiple of 8). With ``points_first`` (a head whose output is the model's)
    the output is (P, rows, out), a view of a (P, out, rows) product: reductions over the features,
    such as a loss's, then run along contiguous rows.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None, weight_directions: Tensor,
                 bias_directions: Tensor | None, pad: int = 0, points_first: bool = False) -> None:
        super().__init__()
        self.features, self.points_first = len(weight), points_first
        rows = (0, 0, 0, pad)  # zero rows appended to (.., out, in) tensors
        self.shape = (len(weight) + pad, weight.shape[1])
        self.weight = F.pad(weight, rows).reshape(1, -1)  # (1, out * in)
        self.weight_directions = F.pad(weight_directions, rows).flatten(1)  # (k, out * in)
        self.bias = None if bias is None else F.pad(bias, (0, pad)).reshape(1, -1)  # (1, out)
        self.bias_directions = None if bias_directions is None else F.pad(bias_directions, (0, pad))  # (k, out)
        self.coefficients = torch.zeros(1, len(weight_directions), dtype=weight.dtype, device=weight.device)

    def forward(self, x: Tensor) -> Tensor:
        c = self.coefficients
        weight = torch.addmm(self.weight, c, self.weight_directions).view(len(c), *self.shape)  # (P, out, in)
        blocks = x.reshape(len(c), -1, x.shape[-1])
        bias = None
        if self.bias is not None:  # (P, out)
            moved = self.bias_directions is not None
            bias = torch.addmm(self.bias, c, self.bias_directions) if moved else self.bias.expand(len(c), -1)
        if self.points_first:
            columns = blocks.transpose(1, 2)
            out = torch.bmm(weight, columns) if bias is None else torch.baddbmm(bias.unsqueeze(2), weight, columns)
            return out.transpose(1, 2)
        out = (torch.bmm(blocks, weight.transpose(1, 2)) if bias is None
               else torch.baddbmm(bias.unsqueeze(1), blocks, weight.transpose(1, 2)))
        return out[..., :self.features].reshape(*x.shape[:-1], -1)


class PointEvaluator:
    """Loss and accuracy at ``base + Σ_i c_i d_i`` for many coefficient vectors ``c``.

    A private copy of the model holds the weights; for each point they are set in place from the
    base with foreach ops, and the evaluation sets (kept on the device) run in inference mode.
    Speed-ups, each giving the same values up to floating-point rounding:

    - ``fold_batchnorm``: eval-mode BatchNorm layers that no direction moves are folded into the
      Conv/Linear layer before them (W s, (b - mean) s + beta with s = gamma/sqrt(var + eps)); the
      folded weights and directions stay linear in the coefficients. ``None``: whenever possible.
    - ``channels_last``: NHWC memory layout for 4-D inputs. ``None``: on CPU (oneDNN prefers it).
    - ``micro_batch``: each evaluation batch is forwarded in chunks whose largest activation fits
      :data:`MICRO_BATCH_BYTES` (weights adjusted, so the mean is unchanged). ``None``: on CPU, unless
      BatchNorm uses batch statistics or targets hold the ignore index -100 (chunks would change either).
    - ``linear_first_layer``: the first layer's output is linear in its weights, so W0 x and each
      D_i x are computed once and combined per point. ``None``: on CPU when the cache fits
      :data:`FIRST_LAYER_BUDGET`.
    - ``stack_points``: points per forward when only Linear layers (and the cached first layer)
      own moving tensors: the batch is stacked once per point and each Linear multiplies its block
      by that point's weights. ``None``/``True``: as many as :data:`STACK_BYTES` and
      :data:`MAX_STACK` allow (without ``bn_recompute``); an int: that many; ``False``: one point
      per forward. Batch-statistics BatchNorm rules it out.
    - ``inplace_activations``: activation modules (ReLU and kin) whose input is a fresh Conv/Linear/
      BatchNorm output or sum that nothing else reads overwrite it (in the private copy), which saves
      a pass over memory per activation. ``None``: always.

    The optimised copy is checked against the plain one at two generic points on a few examples; if
    it fails or differs (an unusual model), stacking is dropped, then every speed-up. Finite outputs
    are compared, NaN/inf must match; if every probe output is NaN (NaN weights), the plain copy is used.
    Weights or inputs holding NaN/inf give a ``RuntimeWarning``; their NaN values are returned as they are.
    ``self.speedups`` says what is used.

    Args:
        objectives: ``{split: Objective}``. The first supplies the base weights and buffers; all
            share its parameters, dtype, device and BatchNorm mode; each brings its evaluation set
            and loss. The objectives and their model are never modified.
        directions: tensor dicts keyed by parameter names (or floating buffer names, to move
            BatchNorm statistics too).
        bn_recompute: before each point, recompute every BatchNorm layer's running mean and
            (unbiased) variance exactly over the first objective's evaluation set, with batch
            statistics upstream (like ``torch.optim.swa_utils.update_bn``), then evaluate in eval mode.
    """

    def __init__(self, objectives: Mapping[str, Objective], directions: Sequence[Mapping[str, Tensor]], *,
                 bn_recompute: bool = False, fold_batchnorm: bool | None = None, channels_last: bool | None = None,
                 micro_batch: bool | None = None, linear_first_layer: bool | None = None,
                 stack_points: bool | int | None = None, inplace_activations: bool | None = None) -> None:
        self.objectives = dict(objectives)
        first = next(iter(self.objectives.values()))
        self.primary, self.bn, self.device = next(iter(self.objectives)), first.bn, first.device
        for split, objective in self.objectives.items():
            if ((objective.dtype, objective.device, objective.bn) != (first.dtype, first.device, first.bn)
                    or {n: t.shape for n, t in objective.params.items()} != {n: t.shape for n, t in first.params.items()}):
                raise LandscapeError(f"the {split} objective differs from the first in parameters, dtype, device "
                                     "or BatchNorm mode; build both from the same checkpoint and options")
        if bn_recompute and self.bn != "eval":
            raise LandscapeError("recomputing BatchNorm statistics is for eval mode (running statistics); "
                                 "use --bn eval with --bn-recompute, or drop --bn-recompute")
        problems = dict.fromkeys(filter(None, (o.nonfinite() for o in self.objectives.values())))
        moving = count_nonfinite({f"direction {i + 1} {n}": t for i, d in enumerate(directions) for n, t in d.items()})
        if moving and not problems:  # e.g. towards a checkpoint with NaN weights
            problems[f"the directions hold {moving[0]} (first in {moving[1]})",
                     "use checkpoints without NaN/inf weights"] = None
        for problem, fix in problems:  # a valid measurement: its NaN values are kept as they come
            warnings.warn(f"{problem}: the losses that depend on them are NaN and are stored as NaN; {fix}",
                          RuntimeWarning, stacklevel=2)
        self.bn_recompute = bn_recompute
        self.batch_statistics = self.bn == "train" and has_batchnorm(first.model)  # rows of a forward interact
        self.ignored_targets = any(not o.targets.is_floating_point() and bool((o.targets == -100).any())
                                   for o in self.objectives.values())  # cross-entropy's ignore index
        self._statistics: dict[nn.Module, list] | None = None
        on_cpu = self.device.type == "cpu"
        wanted = {"fold_batchnorm": (fold_batchnorm is not False) and self.bn == "eval" and not bn_recompute,
                  "channels_last": channels_last if channels_last is not None else on_cpu,
                  "micro_batch": micro_batch if micro_batch is not None else on_cpu,
                  "linear_first_layer": linear_first_layer if linear_first_layer is not None else on_cpu,
                  "stack_points": True if stack_points is None else stack_points,
                  "inplace_activations": inplace_activations is not False}
        budget = math.inf if linear_first_layer else FIRST_LAYER_BUDGET
        plain = dict.fromkeys(wanted, False)
        with torch.no_grad():
            self._build(first, directions, plain, budget)
            if any(wanted.values()):
                reference = self._probe()
                for options in (wanted, {**wanted, "stack_points": False}, plain):
                    self._build(first, directions, options, budget)
                    if options is plain or self._agrees(reference):
                        break
        if bn_recompute:
            self._setup_recompute()

    # -- the private copy ----------------------------------------------------------------------------

    def _build(self, first: Objective, directions: Sequence[Mapping[str, Tensor]], wanted: Mapping[str, bool],
               budget: float) -> None:
        """Make the private copy at the base weights, with the ``wanted`` speed-ups where they apply."""
        self.work = copy.deepcopy(first.model).to(device=first.device, dtype=first.dtype)
        traced = _sole_inputs(self.work) if wanted["fold_batchnorm"] or wanted["inplace_activations"] else ([], Counter())
        self._layout = torch.channels_last if wanted["channels_last"] and _has_conv2d(self.work) else None
        if self._layout is not None:
            self.work.to(memory_format=self._layout)
        self._modes = contextlib.ExitStack()  # the private copy stays in the objective's BatchNorm mode
        self._modes.enter_context(batchnorm_mode(self.work, self.bn))
        state = {**dict(self.work.named_parameters()), **dict(self.work.named_buffers())}
        base = {**first.frozen, **first.params, **first.buffers}
        for name, tensor in state.items():
            tensor.requires_grad_(False)
            if name in base:
                tensor.copy_(base[name])
        names = list(dict.fromkeys(n for d in directions for n in d))
        unknown = [n for n in names if n not in state or not state[n].is_floating_point()]
        if unknown:
            raise LandscapeError(f"a direction moves {unknown[0]!r}, which is not a floating parameter or buffer "
                                 "of the model; make directions from this model's parameters")
        self.names = [n for n in names if any(bool(d[n].any()) for d in directions if n in d)]  # what moves
        self.targets = [state[n] for n in self.names]
        self.base = [b if b.stride() == t.stride() else torch.empty_like(t).copy_(b)
                     for b, t in zip((base[n] for n in self.names), self.targets)]
        self.directions = [[torch.empty_like(t).copy_(d[n]) if n in d else torch.zeros_like(t)
                            for n, t in zip(self.names, self.targets)] for d in directions]
        rows = self._micro_batch_rows() if wanted["micro_batch"] else None
        self.batches = {split: [(self._arrange(x), y, w * len(x) / len(whole))
                                for whole, targets, w in o.batches()
                                for x, y in zip(whole.split(rows or len(whole)), targets.split(rows or len(whole)))]
                        for split, o in self.objectives.items()}
        self.cache: _CachedFirstLayer | None = None
        self._stacked: list[_StackedLinear] = []
        self.scores_by_point = False  # stacked class scores come as (points, rows, classes)
        overwritten = _activations_on_fresh_tensors(self.work, traced) if wanted["inplace_activations"] else []
        folded = self._fold_batchnorm(traced) if wanted["fold_batchnorm"] else 0
        self._move(())  # the (folded) base
        self.speedups = {"fold_batchnorm": folded, "channels_last": self._layout is not None, "micro_batch": rows or 0,
                         "linear_first_layer": bool(wanted["linear_first_layer"]) and self._install_cache(budget)}
        self.stack = self._install_stacking(wanted["stack_points"])
        self.speedups["stack_points"] = self.stack
        for path in overwritten:
            self.work.get_submodule(path).inplace = True
        self.speedups["inplace_activations"] = len(overwritten)

    def _micro_batch_rows(self) -> int | None:
        """Rows per forward that keep the largest module output within :data:`MICRO_BATCH_BYTES`, or
        ``None`` when every batch already does, when BatchNorm uses batch statistics, or when targets
        hold cross-entropy's ignore index -100 (a chunk's mean would then count other rows)."""
        if self.batch_statistics or self.ignored_targets:
            return None
        largest = [0]

        def measure(module: nn.Module, inputs: tuple, output: Any) -> None:
            if isinstance(output, Tensor):
                largest[0] = max(largest[0], output.numel() * output.element_size())

        handles = [m.register_forward_hook(measure) for m in self.work.modules() if not list(m.children())]
        try:
            self.work(self._arrange(next(self.objectives[self.primary].batches())[0][:1]))
        except Exception:  # noqa: BLE001 - a model that cannot take a single example keeps its batches
            return None
        finally:
            for handle in handles:
                handle.remove()
        rows = max(1, MICRO_BATCH_BYTES // max(largest[0], 1))
        biggest = max(min(o.batch_size, o.num_examples) for o in self.objectives.values())
        return rows if rows < biggest else None

    def _arrange(self, x: Tensor) -> Tensor:
        return x.contiguous(memory_format=self._layout) if self._layout is not None and x.ndim == 4 else x

    def _swap(self, path: str, module: nn.Module) -> nn.Module:
        """Put ``module`` at ``path`` of the private copy; returns the module it replaces."""
        parent, _, child = path.rpartition(".")
        owner = self.work.get_submodule(parent) if parent else self.work
        previous = getattr(owner, child)
        setattr(owner, child, module)
        return previous

    def _probe(self) -> Tensor:
        """Outputs (2, 8, ...) on a few examples at two generic points (for checking the speed-ups)."""
        points = [[0.37 * (-1.6) ** i * scale for i in range(len(self.directions))] for scale in (1.0, -0.55)]
        x = self.batches[self.primary][0][0][:8]
        if self.stack > 1:
            return self._forward(self.primary, 0, x, self._stacked_coefficients(points))
        outputs = []
        for point in points:
            self._move(point)
            outputs.append(self._forward(self.primary, 0, x, point))
        self._move(())
        return torch.cat(outputs)

    def _agrees(self, reference: Tensor) -> bool:
        """Whether the private copy, as built, runs and gives the plain copy's ``reference`` outputs
        (False when the reference has no finite entry to compare)."""
        try:
            candidate = self._probe()
        except Exception:  # noqa: BLE001 - e.g. a model that reads its row count cannot take stacked points
            return False
        reference = reference[:, :candidate.shape[1]]  # micro-batches may leave fewer probe rows
        finite = torch.isfinite(reference)
        if candidate.shape != reference.shape or not finite.any():  # all NaN (e.g. NaN weights): cannot decide
            return False
        tolerance = 1e-8 if reference.dtype == torch.float64 else 1e-3
        scale = float(reference[finite].abs().max())
        # finite entries within the tolerance; NaN and inf exactly where the reference has them
        return torch.allclose(candidate, reference, rtol=tolerance, atol=tolerance * max(scale, 1e-30), equal_nan=True)

    def _fold_batchnorm(self, traced: Traced) -> int:
        """Fold each eval-mode BatchNorm that no direction moves into its Conv/Linear layer; returns how many."""
        index = {n: i for i, n in enumerate(self.names)}
        folded = 0
        for layer_path, norm_path in _conv_batchnorm_pairs(self.work, traced):
            layer, norm = self.work.get_submodule(layer_path), self.work.get_submodule(norm_path)
            if any(f"{norm_path}.{key}" in index for key, _ in (*norm.named_parameters(), *norm.named_buffers())):
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
                self.base[i] = self.base[i] * factor + offset
                for direction in self.directions:
                    direction[i] = direction[i] * factor
            self._swap(norm_path, nn.Identity())
            folded += 1
        return folded

    def _install_cache(self, budget: float) -> bool:
        """Replace the first layer by :class:`_CachedFirstLayer` if it is Linear/Conv and the cache fits ``budget``."""
        probe = self.batches[self.primary][0][0][:8]
        found = _first_parametric_call(self.work, probe)
        if found is None or type(found[0]) not in _FOLDABLE_LAYERS + (nn.ConvTranspose1d, nn.ConvTranspose2d):
            return False
        layer, probe_input = found
        path = next(name for name, m in self.work.named_modules() if m is layer)
        index = {n: i for i, n in enumerate(self.names)}
        own = dict(layer.named_parameters())
        moving = [{key: d[index[f"{path}.{key}"]] if f"{path}.{key}" in index else torch.zeros_like(p)
                   for key, p in own.items()} if any(f"{path}.{key}" in index for key in own) else None
                  for d in self.directions]
        per_example = layer(probe_input[:1]).numel() * probe_input.element_size()
        examples = sum(o.num_examples for o in self.objectives.values())
        if not path or per_example * examples * (1 + sum(1 for m in moving if m)) > budget:
            return False
        columns = [i for i, m in enumerate(moving) if m]
        base: dict[str, list[Tensor]] = {}
        steps: dict[str, list[Tensor]] = {}
        for split, batches in self.batches.items():
            inputs = [_first_parametric_call(self.work, x)[1] for x, _, _ in batches]
            base[split] = [layer(x) for x in inputs]
            steps[split] = [torch.stack([functional_call(layer, moving[i], (x,)) for i in columns])
                            if columns else layer(x).new_zeros(0, *base[split][0].shape[1:]) for x in inputs]
        self.cache = _CachedFirstLayer(base, steps, columns)
        self._swap(path, self.cache)
        return True

    def _install_stacking(self, request: bool | int) -> int:
        """Swap each Linear layer whose tensors move for a :class:`_StackedLinear` when nothing else
        (but the first-layer cache) moves; returns the points per forward (1: no stacking)."""
        if request is False or (not isinstance(request, bool) and request < 2) or self.bn_recompute:
            return 1
        if not self.names or self.batch_statistics:
            return 1
        owners: dict[str, dict[str, int]] = {}
        for i, name in enumerate(self.names):
            path, _, key = name.rpartition(".")
            module = self.work.get_submodule(path)
            if module is self.cache:
                continue
            if type(module) is not nn.Linear:
                return 1
            owners.setdefault(path, {})[key] = i
        if request is True:
            rows = max(len(x) for batches in self.batches.values() for x, _, _ in batches)
            widest = max((max(self.work.get_submodule(p).weight.shape) for p in owners), default=1)
            if self.cache is not None:  # the first layer's output per example, e.g. a feature map
                widest = max(widest, self.cache.base[self.primary][0][0].numel())
            budget = STACK_BYTES["cpu" if self.device.type == "cpu" else "other"]
            request = min(MAX_STACK, budget // (rows * widest * self.targets[0].element_size()))
            if request < 2:
                return 1
        if self.device.type == "cpu":
            _keep_freed_memory()
        head = self._output_layer(list(owners)) if self._plain_cross_entropy() else None
        for path, moving in owners.items():
            layer = self.work.get_submodule(path)
            tensors, directions = {}, {}
            for key in ("weight", "bias"):
                i, own = moving.get(key), getattr(layer, key)
                tensors[key] = own if i is None else self.base[i]
                directions[key] = None if i is None else torch.stack([d[i] for d in self.directions])
            if directions["weight"] is None:
                directions["weight"] = torch.zeros(len(self.directions), *layer.weight.shape, dtype=layer.weight.dtype,
                                                   device=layer.weight.device)
            features = layer.out_features
            pad = -features % 8 if self.device.type == "cpu" and 8 < features < 64 and path != head else 0
            stacked = _StackedLinear(tensors["weight"], tensors["bias"], directions["weight"], directions["bias"], pad,
                                     points_first=path == head)
            self._swap(path, stacked)
            self._stacked.append(stacked)
        self.scores_by_point = head is not None
        return int(request)

    def _plain_cross_entropy(self) -> bool:
        """Whether every split's loss is cross-entropy on class indices, none of them ignored."""
        return not self.ignored_targets and all(o.loss_fn is F.cross_entropy and not o.targets.is_floating_point()
                                                for o in self.objectives.values())

    def _output_layer(self, paths: Sequence[str]) -> str | None:
        """The one of the layers ``paths`` whose output the model returns unchanged, if any."""
        outputs: dict[str, Any] = {}

        def record(path: str) -> Callable:
            return lambda module, inputs, output: outputs.__setitem__(path, output)

        handles = [self.work.get_submodule(path).register_forward_hook(record(path)) for path in paths]
        try:
            self._select(self.primary, 0, [0.0] * len(self.directions))
            result = self.work(self.batches[self.primary][0][0][:2])
        finally:
            for handle in handles:
                handle.remove()
        return next((path for path, output in outputs.items() if output is result), None)

    # -- BatchNorm statistics ------------------------------------------------------------------------

    def _setup_recompute(self) -> None:
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

    def _recompute_statistics(self, coefficients: Sequence[float]) -> None:
        self._statistics = {m: [0.0, 0.0, 0] for m in self.bn_layers}
        with batchnorm_mode(self.work, "train"):
            for batch, (x, _, _) in enumerate(self.batches[self.primary]):
                self._select(self.primary, batch, coefficients)
                self.work(x)
        for layer, (total, squares, count) in self._statistics.items():
            mean = total / count
            layer.running_mean.copy_(mean)
            layer.running_var.copy_((squares / count - mean.square()) * (count / max(count - 1, 1)))
        self._statistics = None

    # -- points --------------------------------------------------------------------------------------

    def _move(self, coefficients: Sequence[float]) -> None:
        if not self.targets:  # nothing moves (e.g. interpolating a checkpoint with itself)
            return
        torch._foreach_copy_(self.targets, self.base)
        for c, direction in zip(coefficients, self.directions):
            if c != 0.0:
                torch._foreach_add_(self.targets, direction, alpha=float(c))

    def _select(self, split: str, batch: int, coefficients: Sequence[float] | Tensor) -> None:
        if self.cache is not None:
            self.cache.key, self.cache.coefficients = (split, batch), coefficients
        for layer in self._stacked:
            layer.coefficients = coefficients

    def _stacked_coefficients(self, points: Sequence[Sequence[float]]) -> Tensor:
        return torch.tensor([[float(c) for c in point] for point in points], dtype=self.base[0].dtype,
                            device=self.device)

    def _forward(self, split: str, batch: int, x: Tensor, at: Sequence[float] | Tensor) -> Tensor:
        """Outputs (points, len(x), ...) on ``x`` (batch ``batch`` of ``split``, or its first rows) at
        ``at``: one point's coefficients (the weights already moved there), or a (P, k) tensor when stacked."""
        self._select(split, batch, at)
        if self.stack == 1:
            return self.work(x).unsqueeze(0)
        out = self.work(x if self.cache is not None else x.repeat(len(at), *[1] * (x.ndim - 1)))
        return out if self.scores_by_point else out.view(len(at), len(x), *out.shape[1:])

    def _pass(self, split: str, at: Sequence[float] | Tensor) -> Tensor:
        """(points, 2): mean loss and accuracy over the split's evaluation set at ``at`` (see :meth:`_forward`)."""
        objective = self.objectives[split]
        total: Tensor | float = 0.0
        correct: Tensor | int = 0
        for batch, (x, y, weight) in enumerate(self.batches[split]):
            out = self._forward(split, batch, x, at)
            if self.scores_by_point:
                losses, hits = _cross_entropy_and_correct(out, y)
            else:
                losses, hits = _point_losses(objective.loss_fn, out, y), _point_correct(out, y)
            total, correct = total + losses * weight, correct + hits
        return torch.stack([total, correct.double() / objective.num_examples], dim=1)

    def evaluate(self, points: Sequence[Sequence[float]]) -> dict[str, np.ndarray]:
        """``{"<split>_loss", "<split>_acc": array (len(points),)}`` at each coefficient vector."""
        rows = []
        with torch.inference_mode():
            for start in range(0, len(points), self.stack):
                group = points[start:start + self.stack]
                if self.stack > 1:
                    at: Sequence[float] | Tensor = self._stacked_coefficients(group)
                else:
                    at = group[0]
                    self._move(at)
                    if self.bn_recompute:
                        self._recompute_statistics(at)
                rows.append(torch.cat([self._pass(split, at) for split in self.objectives], dim=1))
        values = torch.cat(rows).cpu().numpy() if rows else np.zeros((0, 2 * len(self.objectives)))
        names = [f"{split}_{metric}" for split in self.objectives for metric in METRICS]
        return {name: values[:, i] for i, name in enumerate(names)}


@functools.cache
def _keep_freed_memory() -> None:
    """Stop glibc from handing freed memory back to the OS after every few-MiB tensor (once per process).

    Stacked points allocate and free several MiB per layer and forward; glibc's default trimming
    then returns the heap top and takes fresh zeroed pages for the next tensor, which doubles the
    time of a small MLP surface at random. Allocations under 32 MiB stay on the heap and up to
    256 MiB of free heap is kept. No effect outside glibc.
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    mallopt(-1, 256 * 2**20)  # M_TRIM_THRESHOLD
    mallopt(-3, 32 * 2**20)   # M_MMAP_THRESHOLD


def _point_losses(loss_fn: Callable[[Tensor, Tensor], Tensor], outputs: Tensor, targets: Tensor) -> Tensor:
    """(points,) float64 mean losses from ``outputs`` shaped (points, rows, ...) against ``targets``."""
    if len(outputs) == 1:
        return loss_fn(outputs[0], targets).double().view(1)
    if loss_fn is F.cross_entropy:  # one call for every point
        repeated = targets.repeat(len(outputs), *[1] * (targets.ndim - 1))
        losses = F.cross_entropy(outputs.flatten(0, 1), repeated, reduction="none").view(len(outputs), -1).double()
        if targets.is_floating_point():  # class probabilities
            return losses.mean(1)
        return losses.sum(1) / (targets != -100).sum()  # the mean over targets not ignored, as F.cross_entropy
    return torch.stack([loss_fn(out, targets) for out in outputs]).double()


def _cross_entropy_and_correct(scores: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """(points,) float64 mean cross-entropy and correct argmax predictions from class ``scores``
    (points, rows, classes) against class indices ``targets`` (rows,), from one max over the classes."""
    top, predicted = scores.max(dim=-1)
    log_normaliser = (scores - top.unsqueeze(-1)).exp_().sum(-1).log_().add_(top)
    picked = scores.gather(-1, targets.expand(len(scores), -1).unsqueeze(-1)).squeeze(-1)
    return (log_normaliser - picked).double().mean(1), (predicted == targets).sum(1)


def _point_correct(outputs: Tensor, targets: Tensor) -> Tensor:
    """(points,) correct argmax predictions from ``outputs`` shaped (points, rows, ...)."""
    if outputs.ndim == targets.ndim + 2:  # class scores: one argmax for every point
        return (outputs.argmax(dim=-1) == targets).flatten(1).sum(1)
    return torch.stack([accuracy_count(out, targets) for out in outputs])


def _has_conv2d(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


# ---------------------------------------------------------------------------------------------- grid runs

PointOf = Callable[[tuple[int, ...]], Sequence[float]]  # unit index -> coefficient vector


def grid_point(coordinates: Sequence[np.ndarray]) -> PointOf:
    """The coefficients at a grid index: one coordinate per axis."""
    return lambda index: [float(axis[i]) for axis, i in zip(coordinates, index)]


def evaluate_points(evaluator: PointEvaluator, point_of: PointOf,
                    indices: Sequence[tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Values at the units ``indices`` (any subset, in any order: the shardable unit)."""
    return evaluator.evaluate([point_of(index) for index in indices])


def _unravel(flat: np.ndarray, shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Grid indices of the flat row-major indices ``flat``."""
    return list(zip(*(axis.tolist() for axis in np.unravel_index(flat, shape))))


def run_points(sink: IncrementalGroup | MemoryGroup, evaluator: PointEvaluator, point_of: PointOf,
               progress: Progress | None, flush_seconds: float) -> None:
    """Evaluate every unit of ``sink`` not yet done at ``point_of(index)`` and write the finished ones
    at least every ``flush_seconds`` (so a kill loses at most that much work, and no written unit is
    recomputed).

    Units go in blocks of ``evaluator.stack`` consecutive row-major units, whose boundaries are fixed
    multiples of that size, and a block is always evaluated whole (one stacked forward): every point
    is computed together with the same others whether or not the run was interrupted, so a resumed
    result is bit-identical to an uninterrupted one. (Only a block that a kill left partly marked
    done, in the middle of its ``done`` write, has its marked points computed again.)
    """
    shape = sink.unit_shape
    total = math.prod(shape)
    size = max(1, int(evaluator.stack))
    done = np.array(sink.done, dtype=bool).reshape(-1)  # as it was at the start
    starts = np.arange(0, total, size)
    pending = starts[~np.logical_and.reduceat(done, starts)]
    finished, first = int(done.sum()), True
    if progress is not None:
        progress(finished, total)
    position, blocks_per_call, since = 0, 1, time.perf_counter()
    indices: list[np.ndarray] = []
    values: dict[str, list[np.ndarray]] = {}
    while position < len(pending):
        began = time.perf_counter()
        blocks = pending[position:position + blocks_per_call]
        flat = np.concatenate([np.arange(start, min(start + size, total)) for start in blocks])
        for name, value in evaluate_points(evaluator, point_of, _unravel(flat, shape)).items():
            values.setdefault(name, []).append(value)
        indices.append(flat)
        position += len(blocks)
        # cheap blocks go several per call: about 0.1 s of work, well inside the flush interval
        per_block = (time.perf_counter() - began) / len(flat) * size
        blocks_per_call = max(1, min(256 // size, int(min(0.1, flush_seconds / 4) / max(per_block, 1e-9))))
        if position < len(pending) and time.perf_counter() - since < flush_seconds and not first:
            continue  # (the first block is written at once: early progress and a first time per point)
        flat = np.concatenate(indices)
        merged = {name: np.concatenate(parts) for name, parts in values.items()}
        for run in np.split(np.arange(len(flat)), np.flatnonzero(np.diff(flat) != 1) + 1):  # consecutive units
            sink.write(int(flat[run[0]]), {name: value[run] for name, value in merged.items()})
        finished += int((~done[flat]).sum())
        if progress is not None:
            progress(finished, total)
        indices, values, since, first = [], {}, time.perf_counter(), False


def check_room(out: str | Path | None, shape: tuple[int, ...], names: Sequence[str], what: str,
               memory: float = 0.0) -> None:
    """Refuse a run of ``shape`` units of the scalar values ``names`` that cannot fit: in memory, its
    values and done mask (plus ``memory`` bytes the caller needs); on disk next to ``out``, its
    ``.partial`` sidecar and the final copy of the results file (see :mod:`landscape.resources`)."""
    group = math.prod(shape) * (8 * len(names) + 1)
    existing = Path(out).stat().st_size if out is not None and Path(out).exists() else 0
    require(f"{what} ({math.prod(shape):,} points)", "use fewer points, or a machine with more room",
            memory=group + memory, disk=2 * group + existing if out is not None else 0.0, where=out)


def _label_splits(objective: Objective, test_objective: Objective | None) -> dict[str, Objective]:
    """``{split: objective}``: the objective's own split (train unless its provenance says test), plus test."""
    label = objective.source.get("eval_set", {}).get("split", "train")
    if test_objective is None:
        return {label: objective}
    if label == "test":
        raise LandscapeError("the first objective is on the test split and a test objective was given too; "
                             "pass the train-split objective first")
    return {"train": objective, "test": test_objective}


def _metric_names(objectives: Mapping[str, Objective]) -> list[str]:
    return [f"{split}_{metric}" for split in objectives for metric in METRICS]


def _grid_room(out: str | Path | None, objectives: Mapping[str, Objective], coordinates: Sequence[np.ndarray],
               group: str) -> None:
    """:func:`check_room` for a grid of ``coordinates``, before anything grid-sized is made."""
    shape = tuple(len(axis) for axis in coordinates)
    check_room(out, shape, _metric_names(objectives), f"a {'x'.join(map(str, shape))} {group}")


def _axis(values: Any, name: str) -> np.ndarray:
    axis = np.asarray(values, dtype=np.float64).reshape(-1)
    if axis.size == 0 or not np.all(np.isfinite(axis)):
        raise LandscapeError(f"{name} must be a non-empty list of finite coordinates, e.g. -1:1:51")
    return axis


def _grid(result_type: type[Result], objectives: Mapping[str, Objective], directions: Sequence[Mapping[str, Tensor]],
          coordinates: Sequence[np.ndarray], static: Mapping[str, Any], config: dict[str, Any], extra: dict[str, Any],
          seed: int | None, *, out: str | Path | None, resume: bool, overwrite: bool, bn_recompute: bool,
          evaluator_options: Mapping[str, Any] | None, progress: Progress | None, flush_seconds: float) -> Result:
    """Evaluate ``objectives`` on the grid ``coordinates`` along ``directions``; write ``/group`` to ``out``."""
    first = next(iter(objectives.values()))
    names = _metric_names(objectives)
    shape = tuple(len(axis) for axis in coordinates)
    config = {**config, "splits": list(objectives), "bn": first.bn, "bn_recompute": bn_recompute,
              "dtype": str(first.dtype).replace("torch.", ""), "evaluator_options": dict(evaluator_options or {}),
              "eval_sets": {s: o.source.get("eval_set", {}) for s, o in objectives.items()}}
    evaluator = PointEvaluator(objectives, directions, bn_recompute=bn_recompute, **(evaluator_options or {}))
    attrs = {**provenance(config, first.provenance(), seed, first.device), **extra, "speedups": evaluator.speedups}
    arrays, _ = run_group(out, result_type.group, names, shape, attrs, static, evaluator, grid_point(coordinates),
                          resume=resume, overwrite=overwrite, progress=progress, flush_seconds=flush_seconds)
    if out is not None:
        arrays, attrs = read_group(out, result_type.group)
    return result_type(arrays, attrs)


def run_group(out: str | Path | None, group: str, names: Sequence[str], shape: tuple[int, ...],
              attrs: Mapping[str, Any], static: Mapping[str, Any], evaluator: PointEvaluator, point_of: PointOf, *,
              resume: bool, overwrite: bool, progress: Progress | None, flush_seconds: float,
              derive: Callable[[dict[str, Any]], tuple[dict[str, Any], dict[str, Any]]] | None = None,
              ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Evaluate the values ``names`` (scalars) on every unit of ``shape``; return the group's arrays
    and the attributes ``derive`` adds.

    With ``out`` the group is written incrementally (resumable, see
    :class:`landscape.store.IncrementalGroup`) and moved into ``out`` when complete, together with
    the ``(arrays, attrs)`` that ``derive`` computes from the finished arrays; else it stays in memory.
    """
    sink = (IncrementalGroup(out, group, {n: () for n in names}, shape, attrs, static, resume=resume,
                             overwrite=overwrite) if out is not None else MemoryGroup(names, shape, static))
    try:
        run_points(sink, evaluator, point_of, progress, flush_seconds)
        arrays = sink.arrays()
        derived, derived_attrs = derive(arrays) if derive is not None else ({}, {})
        sink.finalize(derived, derived_attrs)
    finally:
        sink.close()
    return {**arrays, **derived}, derived_attrs


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
                 evaluator_options: Mapping[str, Any] | None = None, progress: Progress | None = None,
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
        evaluator_options: speed-up switches of :class:`PointEvaluator` (``fold_batchnorm``,
            ``channels_last``, ``micro_batch``, ``linear_first_layer``, ``inplace_activations``:
            True/False/None for automatic; ``stack_points``: also an int); the values agree up to
            floating-point rounding either way. ``attrs["speedups"]`` says what was used.
        progress: called as ``progress(points_done, points_total)`` after each written block.
        flush_seconds: finished points are written at least this often (0: after every block of
            stacked points; the first block is always written at once).

    Divergent points are stored as they come (inf or NaN), never imputed.
    """
    objectives = _label_splits(objective, test_objective)
    coordinates = [_axis(x, "x")] + ([] if y is None else [_axis(y, "y")])
    _grid_room(out, objectives, coordinates, SurfaceResult.group)
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
                 bn_recompute=bn_recompute, evaluator_options=evaluator_options, progress=progress,
                 flush_seconds=flush_seconds)


def interpolate(objective: Objective, target: Any, alphas: Any = DEFAULT_ALPHAS, *, move_buffers: bool = False,
                test_objective: Objective | None = None, bn_recompute: bool = False, out: str | Path | None = None,
                resume: bool = False, overwrite: bool = False, evaluator_options: Mapping[str, Any] | None = None,
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
    _grid_room(out, objectives, coordinates, InterpolationResult.group)
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
                 evaluator_options=evaluator_options, progress=progress, flush_seconds=flush_seconds)
