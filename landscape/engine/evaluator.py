"""The point evaluator: loss and accuracy at many points ``w + Σ_i c_i d_i`` of weight space, fast.

:class:`PointEvaluator` keeps a private copy of the model whose moving weights are set in place for
each point from a saved base with foreach ops; the evaluation sets stay on the device (or stream
from host memory, when held there: :mod:`landscape.evalset`) and run in inference mode. Its speed-ups are the rewrites of :mod:`landscape.engine.rewrites`, each switchable,
checked against the plain copy on a probe, and recorded in ``speedups``; a rewrite that does not
apply, raises or disagrees is dropped and the reason logged at DEBUG level
(``logging.getLogger("landscape.engine")``).

The class is about 290 lines, 50 of them its docstring: building the copy, checking it on the
probe and evaluating points all work on the same state (the moving weights, the batches and the
substitute layers), so they stay one class; the rewrites themselves live in their own module.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from landscape.engine.batchnorm import RecomputedStatistics
from landscape.engine.graph import activations_on_fresh_tensors, cacheable_first_layer, conv_batchnorm_pairs, trace
from landscape.engine.layers import CachedFirstLayer, StackedLinear
from landscape.engine.metrics import cross_entropy_and_correct, point_correct, point_losses
from landscape.engine.rewrites import (
    MovingWeights,
    cache_first_layer,
    channels_last,
    fold_batchnorm,
    linear_owners,
    micro_batch_rows,
    output_layer,
    run_in_place,
    stack_linear_points,
)
from landscape.errors import LandscapeError
from landscape.evalset import Batches
from landscape.objective import Objective, batchnorm_mode, count_nonfinite, has_batchnorm

log = logging.getLogger(__name__)

FIRST_LAYER_BUDGET = 512 * 2**20  # bytes of cached first-layer outputs the automatic choice allows
# the automatic number of stacked points keeps the widest stacked activation within these bytes: on
# the CPU small enough that the allocator reuses its memory instead of mapping fresh pages every time
STACK_BYTES = {"cpu": 4 * 2**20, "other": 256 * 2**20}
MAX_STACK = 64  # points per stacked forward at most
METRICS = ("loss", "acc")


class _RewriteFailed(Exception):
    """A rewrite raised: the private copy is half-rewritten and is built again without it."""

    def __init__(self, option: str, error: Exception) -> None:
        super().__init__(option)
        self.option, self.error = option, error


def _check(objectives: Mapping[str, Objective], directions: Sequence[Mapping[str, Tensor]],
           bn_recompute: bool) -> None:
    """Refuse objectives that do not match the first or ``bn_recompute`` without eval mode; warn of NaN/inf."""
    first = next(iter(objectives.values()))
    for split, objective in objectives.items():
        if ((objective.dtype, objective.device, objective.bn) != (first.dtype, first.device, first.bn)
                or {n: t.shape for n, t in objective.params.items()} != {n: t.shape for n, t in first.params.items()}):
            raise LandscapeError(f"the {split} objective differs from the first in parameters, dtype, device "
                                 "or BatchNorm mode; build both from the same checkpoint and options")
    if bn_recompute and first.bn != "eval":
        raise LandscapeError("recomputing BatchNorm statistics is for eval mode (running statistics); "
                             "use --bn eval with --bn-recompute, or drop --bn-recompute")
    problems = dict.fromkeys(filter(None, (o.nonfinite() for o in objectives.values())))
    moving = count_nonfinite({f"direction {i + 1} {n}": t for i, d in enumerate(directions) for n, t in d.items()})
    if moving and not problems:  # e.g. towards a checkpoint with NaN weights
        problems[f"the directions hold {moving[0]} (first in {moving[1]})",
                 "use checkpoints without NaN/inf weights"] = None
    for problem, fix in problems:  # a valid measurement: its NaN values are kept as they come
        warnings.warn(f"{problem}: the losses that depend on them are NaN and are stored as NaN; {fix}",
                      RuntimeWarning, stacklevel=4)


def _moving_weights(work: nn.Module, first: Objective, directions: Sequence[Mapping[str, Tensor]]) -> MovingWeights:
    """Set the private copy ``work`` to the base weights and buffers; the tensors that some direction moves."""
    state = {**dict(work.named_parameters()), **dict(work.named_buffers())}
    base_state = {**first.frozen, **first.params, **first.buffers}
    for name, tensor in state.items():
        tensor.requires_grad_(False)
        if name in base_state:
            tensor.copy_(base_state[name])
    names = list(dict.fromkeys(n for d in directions for n in d))
    unknown = [n for n in names if n not in state or not state[n].is_floating_point()]
    if unknown:
        raise LandscapeError(f"a direction moves {unknown[0]!r}, which is not a floating parameter or buffer "
                             "of the model; make directions from this model's parameters")
    names = [n for n in names if any(bool(d[n].any()) for d in directions if n in d)]  # what moves
    tensors = [state[n] for n in names]
    base_weights = [b if b.stride() == t.stride() else torch.empty_like(t).copy_(b)
                    for b, t in zip((base_state[n] for n in names), tensors)]
    laid_out = [[torch.empty_like(t).copy_(d[n]) if n in d else torch.zeros_like(t) for n, t in zip(names, tensors)]
                for d in directions]  # in the copy's memory layout
    return MovingWeights(names, tensors, base_weights, laid_out)


class PointEvaluator:
    """Loss and accuracy at ``base + Σ_i c_i d_i`` for many coefficient vectors ``c``.

    Speed-ups (see :mod:`landscape.engine.rewrites`), each giving the same values up to
    floating-point rounding:

    - ``fold_batchnorm``: eval-mode BatchNorm layers that no direction moves are folded into the
      Conv/Linear layer before them. ``None``: whenever possible.
    - ``channels_last``: NHWC memory layout for 4-D inputs. ``None``: on CPU (oneDNN prefers it).
    - ``micro_batch``: each evaluation batch is forwarded in chunks whose largest activation fits
      :data:`landscape.engine.rewrites.MICRO_BATCH_BYTES` (weights adjusted, so the mean is
      unchanged). ``None``: on CPU, unless BatchNorm uses batch statistics or targets hold the
      ignore index -100 (chunks would change either).
    - ``linear_first_layer``: the first layer's output is linear in its weights, so W0 x and each
      D_i x are computed once and combined per point. Only for a Linear/Conv first layer called once
      per forward on the model input, as the ``torch.fx`` graph shows. ``None``: on CPU when the
      cache fits :data:`FIRST_LAYER_BUDGET`.
    - ``stack_points``: points per forward when only Linear layers (and the cached first layer)
      own moving tensors: the batch is stacked once per point and each Linear multiplies its block
      by that point's weights. ``None``/``True``: as many as :data:`STACK_BYTES` and
      :data:`MAX_STACK` allow (without ``bn_recompute``); an int: that many; ``False``: one point
      per forward. Batch-statistics BatchNorm rules it out.
    - ``inplace_activations``: activation modules (ReLU and kin) whose input is a fresh Conv/Linear/
      BatchNorm output or sum that nothing else reads overwrite it (in the private copy), which saves
      a pass over memory per activation. ``None``: always.

    The optimised copy is checked against the plain one at two generic points on a few examples; if
    it differs (an unusual model), stacking is dropped, then every speed-up; a rewrite that raises
    is dropped alone. Finite outputs are compared, NaN/inf must match; if every probe output is NaN
    (NaN weights), the plain copy is used. Weights or inputs holding NaN/inf give a
    ``RuntimeWarning``; their NaN values are returned as they are. ``self.speedups`` says what is
    used; ``self.stack`` is the points per forward.

    Args:
        objectives: ``{split: Objective}``. The first supplies the base weights and buffers; all
            share its parameters, dtype, device and BatchNorm mode; each brings its evaluation set
            and loss. The objectives and their model are never modified. A data-parallel (sharded)
            objective is evaluated over its whole evaluation set (:meth:`Objective.whole`): under
            torchrun the ranks share out points, not rows.
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
        self.objectives = {split: o.whole() for split, o in objectives.items()}  # (points are shared out, not rows)
        first = next(iter(self.objectives.values()))
        self.primary, self.bn, self.device = next(iter(self.objectives)), first.bn, first.device
        _check(self.objectives, directions, bn_recompute)
        self.bn_recompute = bn_recompute
        self.batch_statistics = self.bn == "train" and has_batchnorm(first.model)  # rows of a forward interact
        self.ignored_targets = any(not o.targets.is_floating_point() and bool((o.targets == -100).any())
                                   for o in self.objectives.values())  # cross-entropy's ignore index
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
                reference, options = self._probe(), wanted
                while True:
                    try:
                        self._build(first, directions, options, budget)
                    except _RewriteFailed as failed:
                        log.debug("the %s rewrite raised %s: %s; building without it", failed.option,
                                  type(failed.error).__name__, failed.error)
                        options = {**options, failed.option: False}
                        continue
                    if options == plain or self._agrees(reference):
                        break
                    fallback = {**options, "stack_points": False} if self.stack > 1 else plain
                    log.debug("the speed-ups %s change the probe's outputs; trying %s", self.speedups,
                              "without stacked points" if fallback is not plain else "none")
                    options = fallback
        self.statistics = RecomputedStatistics(self.work) if bn_recompute else None

    # -- the private copy ----------------------------------------------------------------------------

    def _rewrite(self, option: str, rewrite: Callable[..., Any], *args: Any) -> Any:
        """``rewrite(*args)``; if it raises, :class:`_RewriteFailed` for ``option``."""
        try:
            return rewrite(*args)
        except Exception as error:  # noqa: BLE001 - any model may be given; the copy is built without it
            raise _RewriteFailed(option, error) from error

    def _build(self, first: Objective, directions: Sequence[Mapping[str, Tensor]], options: Mapping[str, Any],
               budget: float) -> None:
        """Make the private copy at the base weights, with the speed-ups ``options`` asks for where they apply."""
        self.work = copy.deepcopy(first.model).to(device=first.device, dtype=first.dtype)
        uses_graph = options["fold_batchnorm"] or options["inplace_activations"] or options["linear_first_layer"]
        graph = trace(self.work) if uses_graph else None  # of the copy before any rewrite
        fresh = (self._rewrite("inplace_activations", activations_on_fresh_tensors, self.work, graph)
                 if options["inplace_activations"] and graph is not None else [])
        self._layout = (torch.channels_last if options["channels_last"]
                        and self._rewrite("channels_last", channels_last, self.work) else None)
        self._modes = contextlib.ExitStack()  # the private copy stays in the objective's BatchNorm mode
        self._modes.enter_context(batchnorm_mode(self.work, self.bn))
        self.moving = _moving_weights(self.work, first, directions)
        rows = self._rewrite("micro_batch", self._micro_batch_rows) if options["micro_batch"] else None
        self.batches = {split: self._batches(o, rows) for split, o in self.objectives.items()}
        self.first_layer_cache: CachedFirstLayer | None = None
        self._stacked: list[StackedLinear] = []
        self.scores_by_point = False  # stacked class scores come as (points, rows, classes)
        pairs = (self._rewrite("fold_batchnorm", conv_batchnorm_pairs, self.work, graph)
                 if options["fold_batchnorm"] and graph is not None else [])
        folded = self._rewrite("fold_batchnorm", fold_batchnorm, self.work, pairs, self.moving) if pairs else 0
        self._move(())  # the (folded) base
        if options["linear_first_layer"]:
            self.first_layer_cache = self._rewrite("linear_first_layer", self._cache_first_layer, graph, budget)
        self.speedups = {"fold_batchnorm": folded, "channels_last": self._layout is not None, "micro_batch": rows or 0,
                         "linear_first_layer": self.first_layer_cache is not None}
        self.stack = self._rewrite("stack_points", self._stack_points, options["stack_points"])
        self.speedups["stack_points"] = self.stack
        self.speedups["inplace_activations"] = self._rewrite("inplace_activations", run_in_place, self.work, fresh)

    def _batches(self, objective: Objective, rows: int | None) -> Sequence[tuple[Tensor, Tensor, float]] | Batches:
        """The objective's batches as the copy takes them (in micro-batches of ``rows``, in its layout): a
        list on the device, or :class:`~landscape.evalset.Batches` streaming them anew from host memory
        at every pass when the evaluation set is held there."""
        def pieces() -> Iterator[tuple[Tensor, Tensor, float]]:
            for whole, targets, w in objective.batches():
                for x, y in zip(whole.split(rows or len(whole)), targets.split(rows or len(whole))):
                    yield self._arrange(x), y, w * len(x) / len(whole)
        return Batches(pieces) if objective.data.streamed else list(pieces())

    def _micro_batch_rows(self) -> int | None:
        """Rows per forward (see :func:`landscape.engine.rewrites.micro_batch_rows`), or ``None``."""
        if self.batch_statistics or self.ignored_targets:
            log.debug("no micro-batches: %s", "BatchNorm uses batch statistics" if self.batch_statistics
                      else "targets hold the ignore index -100 (a chunk's mean would weight rows differently)")
            return None
        example = self._arrange(next(self.objectives[self.primary].batches())[0][:1])
        return micro_batch_rows(self.work, example, max(min(o.batch_size, o.num_examples)
                                                        for o in self.objectives.values()))

    def _arrange(self, x: Tensor) -> Tensor:
        return x.contiguous(memory_format=self._layout) if self._layout is not None and x.ndim == 4 else x

    def _cache_first_layer(self, graph: fx.Graph | None, budget: float) -> CachedFirstLayer | None:
        """The first-layer cache, where the graph allows it (see
        :func:`landscape.engine.graph.cacheable_first_layer`)."""
        if graph is None:
            log.debug("no first-layer cache: without a torch.fx graph its uses cannot be checked")
            return None
        path = cacheable_first_layer(self.work, graph)
        if path is None:
            return None
        examples = sum(o.num_examples for o in self.objectives.values())
        return cache_first_layer(self.work, path, self.moving, self.batches, examples, budget)

    def _stack_points(self, request: bool | int) -> int:
        """Stack points in the Linear layers that move when nothing else does (but the first-layer
        cache); returns the points per forward (1: no stacking)."""
        if request is False or (not isinstance(request, bool) and request < 2) or self.bn_recompute:
            return 1
        if not self.moving.names or self.batch_statistics:
            return 1
        owners = linear_owners(self.work, self.moving, self.first_layer_cache)
        if owners is None:
            return 1
        if request is True:
            micro = self.speedups["micro_batch"] or math.inf  # the most rows per forward, without a pass
            rows = max(min(micro, o.batch_size, o.num_examples) for o in self.objectives.values())
            widest = max((max(self.work.get_submodule(p).weight.shape) for p in owners), default=1)
            if self.first_layer_cache is not None:  # the first layer's output per example, e.g. a feature map
                widest = max(widest, self.first_layer_cache.base_outputs[self.primary][0][0].numel())
            budget = STACK_BYTES["cpu" if self.device.type == "cpu" else "other"]
            request = min(MAX_STACK, budget // (rows * widest * self.moving.tensors[0].element_size()))
            if request < 2:
                return 1
        head = output_layer(self.work, list(owners), self._base_forward) if self._plain_cross_entropy() else None
        self._stacked = stack_linear_points(self.work, self.moving, owners, head, self.device.type == "cpu")
        self.scores_by_point = head is not None
        return int(request)

    def _base_forward(self) -> Tensor:
        """The private copy's output on two examples at the origin."""
        self._select(self.primary, 0, [0.0] * len(self.moving.directions))
        return self.work(self.batches[self.primary][0][0][:2])

    def _plain_cross_entropy(self) -> bool:
        """Whether every split's loss is cross-entropy on class indices, none of them ignored."""
        return not self.ignored_targets and all(o.loss_fn is F.cross_entropy and not o.targets.is_floating_point()
                                                for o in self.objectives.values())

    # -- checking the speed-ups ----------------------------------------------------------------------

    def _probe(self) -> Tensor:
        """Outputs (2, 8, ...) on a few examples at two generic points (for checking the speed-ups)."""
        points = [[0.37 * (-1.6) ** i * scale for i in range(len(self.moving.directions))] for scale in (1.0, -0.55)]
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
        except Exception as error:  # noqa: BLE001 - e.g. a model that reads its row count cannot take stacked points
            log.debug("the speed-ups %s fail on the probe (%s: %s)", self.speedups, type(error).__name__, error)
            return False
        reference = reference[:, :candidate.shape[1]]  # micro-batches may leave fewer probe rows
        finite = torch.isfinite(reference)
        if candidate.shape != reference.shape or not finite.any():  # all NaN (e.g. NaN weights): cannot decide
            log.debug("the speed-ups cannot be checked: %s", "the probe's outputs are all NaN/inf" if not finite.any()
                      else f"outputs shaped {tuple(candidate.shape)}, not {tuple(reference.shape)}")
            return False
        tolerance = 1e-8 if reference.dtype == torch.float64 else 1e-3
        scale = float(reference[finite].abs().max())
        # finite entries within the tolerance; NaN and inf exactly where the reference has them
        return torch.allclose(candidate, reference, rtol=tolerance, atol=tolerance * max(scale, 1e-30), equal_nan=True)

    # -- points --------------------------------------------------------------------------------------

    def _move(self, coefficients: Sequence[float]) -> None:
        """Set the moving weights to base + Σ_i c_i d_i."""
        if not self.moving.tensors:  # nothing moves (e.g. interpolating a checkpoint with itself)
            return
        torch._foreach_copy_(self.moving.tensors, self.moving.base_weights)
        for c, direction in zip(coefficients, self.moving.directions):
            if c != 0.0:
                torch._foreach_add_(self.moving.tensors, direction, alpha=float(c))

    def _select(self, split: str, batch: int, coefficients: Sequence[float] | Tensor) -> None:
        if self.first_layer_cache is not None:
            self.first_layer_cache.key, self.first_layer_cache.coefficients = (split, batch), coefficients
        for layer in self._stacked:
            layer.coefficients = coefficients

    def _stacked_coefficients(self, points: Sequence[Sequence[float]]) -> Tensor:
        return torch.tensor([[float(c) for c in point] for point in points], dtype=self.moving.base_weights[0].dtype,
                            device=self.device)

    def _forward(self, split: str, batch: int, x: Tensor, at: Sequence[float] | Tensor) -> Tensor:
        """Outputs (points, len(x), ...) on ``x`` (batch ``batch`` of ``split``, or its first rows) at
        ``at``: one point's coefficients (the weights already moved there), or a (P, k) tensor when stacked."""
        self._select(split, batch, at)
        if self.stack == 1:
            return self.work(x).unsqueeze(0)
        out = self.work(x if self.first_layer_cache is not None else x.repeat(len(at), *[1] * (x.ndim - 1)))
        return out if self.scores_by_point else out.view(len(at), len(x), *out.shape[1:])

    def _pass(self, split: str, at: Sequence[float] | Tensor) -> Tensor:
        """(points, 2): mean loss and accuracy over the split's evaluation set at ``at`` (see :meth:`_forward`)."""
        objective = self.objectives[split]
        total: Tensor | float = 0.0
        correct: Tensor | int = 0
        for batch, (x, y, weight) in enumerate(self.batches[split]):
            out = self._forward(split, batch, x, at)
            if self.scores_by_point:
                losses, hits = cross_entropy_and_correct(out, y)
            else:
                losses, hits = point_losses(objective.loss_fn, out, y), point_correct(out, y)
            total, correct = total + losses * weight, correct + hits
        return torch.stack([total, correct.double() / objective.num_examples], dim=1)

    def _recompute_statistics(self, coefficients: Sequence[float]) -> None:
        def forward_all() -> None:
            for batch, (x, _, _) in enumerate(self.batches[self.primary]):
                self._select(self.primary, batch, coefficients)
                self.work(x)

        self.statistics.recompute(forward_all)

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
                    if self.statistics is not None:
                        self._recompute_statistics(at)
                rows.append(torch.cat([self._pass(split, at) for split in self.objectives], dim=1))
        values = torch.cat(rows).cpu().numpy() if rows else np.zeros((0, 2 * len(self.objectives)))
        names = [f"{split}_{metric}" for split in self.objectives for metric in METRICS]
        return {name: values[:, i] for i, name in enumerate(names)}
