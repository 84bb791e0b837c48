"""Loss surfaces and interpolation: L(w + Σ_i c_i d_i) on a grid of coefficients, resumable.

- :func:`loss_surface`: the plane L(w + a d1 + b d2) or the line L(w + a d1) (Li et al. 2018),
  with directions from :func:`landscape.params.surface_directions` (seeded Gaussian, normalised per
  filter, per layer or not at all; optionally an orthogonalised pair, or the difference towards
  another checkpoint), stored with the result.
- :func:`pca_surface`: the plane of the top two principal components of optimizer trajectories (Li
  et al. 2018, Sec. 7, from :func:`landscape.trajectory.pca_plane`), with each path projected on it.
- :func:`interpolate`: the line from one checkpoint to another (Goodfellow et al. 2015), the other
  read by :func:`landscape.checkpoint.target_state`.
- :class:`SurfaceResult` and :class:`InterpolationResult`, whose ``summary()`` is what the CLI prints.

Points are evaluated by :class:`landscape.engine.evaluator.PointEvaluator` and run by
:mod:`landscape.engine.runner`, which writes them incrementally, so a killed run resumes with no
finished point lost and none recomputed, bit-identical to an uninterrupted run. Under torchrun the
ranks share the points out, each over the whole evaluation set, and rank 0 writes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from landscape import distributed
from landscape.checkpoint import target_state
from landscape.engine.evaluator import METRICS, PointEvaluator
from landscape.engine.runner import Progress, check_room, grid_point, run_group
from landscape.errors import LandscapeError
from landscape.objective import Objective
from landscape.params import difference, direction_attrs, flatten, global_norm, surface_directions, unflatten
from landscape.results import Result
from landscape.store import provenance, read_group
from landscape.trajectory import Trajectory, pca_plane

DEFAULT_AXIS = np.linspace(-1.0, 1.0, 51)
DEFAULT_ALPHAS = np.linspace(-0.5, 1.5, 41)
PATH_MARGIN = 0.2  # a grid covering projected paths reaches this fraction of their range beyond them on each side


def _describe(result: Result, names: Sequence[str]) -> list[str]:
    """Per split: loss and accuracy at the origin (if on the grid of the coordinate arrays ``names``),
    the range, and the number of divergent points."""
    coordinates = [np.asarray(result[n]) for n in names]
    origin = tuple(int(np.argmin(np.abs(c))) for c in coordinates)
    at_origin = all(c[i] == 0 for c, i in zip(coordinates, origin))
    lines = []
    for split in result.attrs["config"]["splits"]:
        loss, acc = np.asarray(result[f"{split}_loss"]), np.asarray(result[f"{split}_acc"])
        finite = loss[np.isfinite(loss)]
        origin_text = f"loss at the origin {loss[origin]:.4f} (acc {acc[origin]:.4f}), " if at_origin else ""
        span = f"min {finite.min():.4f}, max {finite.max():.4g}" if finite.size else "no finite value"
        lines.append(f"{split}: {origin_text}{span}; {loss.size - finite.size} of {loss.size} points divergent (inf/NaN)")
    return lines


class SurfaceResult(Result):
    """``/surface``: Li et al.'s names. ``xcoordinates`` (``ycoordinates``), ``<split>_loss`` and
    ``<split>_acc`` shaped (len(x), len(y)) (or (len(x),) for 1-D), ``done``, and the flat float32
    ``xdirection`` (``ydirection``) whose layout the attributes ``direction_names`` and
    ``direction_shapes`` give. A surface on the PCA plane of trajectories (:func:`pca_surface`) also holds
    the projected paths: ``trajectory_x``, ``trajectory_y``, ``trajectory_path``, ``trajectory_step``,
    ``trajectory_loss`` and the attributes ``trajectory_labels`` and ``explained_variance_ratio``."""

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

    def summary(self) -> str:
        """What ``landscape surface`` prints: per split, the loss (and accuracy) at the origin if it
        is on the grid, the range of finite losses, and how many points diverged."""
        lines = _describe(self, [n for n in ("xcoordinates", "ycoordinates") if n in self.arrays])
        if "explained_variance_ratio" in self.attrs:
            ratio = self.attrs["explained_variance_ratio"]
            lines.append(f"PCA directions of {', '.join(self.attrs['trajectory_labels'])}: explained variance ratio "
                         f"{ratio[0]:.4f} (x), {ratio[1]:.4f} (y)")
        return "\n".join(lines)


class InterpolationResult(Result):
    """``/interpolation``: ``alphas``, ``<split>_loss``, ``<split>_acc`` along (1-α) w_a + α w_b, and ``done``."""

    group = "interpolation"

    def summary(self) -> str:
        """What ``landscape interpolate`` prints: as :meth:`SurfaceResult.summary`, plus per split the
        loss barrier, the largest excess of the loss over the chord on [0, 1], when α = 0 and 1 are
        on the grid."""
        lines = _describe(self, ["alphas"])
        alphas = np.asarray(self["alphas"])
        inside = (alphas >= 0) & (alphas <= 1)
        ends = [int(np.argmin(np.abs(alphas - a))) for a in (0.0, 1.0)]
        if inside.any() and alphas[ends[0]] == 0 and alphas[ends[1]] == 1:
            for split in self.attrs["config"]["splits"]:
                loss = np.asarray(self[f"{split}_loss"])
                chord = (1 - alphas) * loss[ends[0]] + alphas * loss[ends[1]]
                lines.append(f"{split}: loss barrier on [0, 1] = {np.max((loss - chord)[inside]):.4g}")
        return "\n".join(lines)


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


def _stored(directions: Sequence[Mapping[str, Tensor]]) -> dict[str, np.ndarray]:
    """``xdirection`` (``ydirection``): each direction as the flat float32 vector a surface stores."""
    return {f"{axis}direction": flatten(d).detach().to("cpu", torch.float32).numpy()
            for axis, d in zip("xy", directions)}


def _grid(result_type: type[Result], objectives: Mapping[str, Objective], directions: Sequence[Mapping[str, Tensor]],
          coordinates: Sequence[np.ndarray], static: Mapping[str, Any], config: dict[str, Any], extra: dict[str, Any],
          seed: int | None, *, out: str | Path | None, resume: bool, overwrite: bool, bn_recompute: bool,
          evaluator_options: Mapping[str, Any] | None, progress: Progress | None, flush_seconds: float,
          paths: np.ndarray | None = None) -> Result:
    """Evaluate ``objectives`` on the grid ``coordinates`` along ``directions``; write ``/group`` to ``out``.
    With ``paths`` ((points, 2) coefficients), the first split's loss there is stored as ``trajectory_loss``."""
    first = next(iter(objectives.values()))
    names = _metric_names(objectives)
    shape = tuple(len(axis) for axis in coordinates)
    config = {**config, "splits": list(objectives), "bn": first.bn, "bn_recompute": bn_recompute,
              "dtype": str(first.dtype).replace("torch.", ""), "evaluator_options": dict(evaluator_options or {}),
              "eval_sets": {s: o.source.get("eval_set", {}) for s, o in objectives.items()}}
    evaluator = PointEvaluator(objectives, directions, bn_recompute=bn_recompute, **(evaluator_options or {}))
    attrs = {**provenance(config, first.provenance(), seed, first.device), **extra, "speedups": evaluator.speedups}

    def path_loss(_: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        return {"trajectory_loss": evaluator.evaluate(paths.tolist())[names[0]]}, {}

    arrays, _ = run_group(out, result_type.group, dict.fromkeys(names, ()), shape, attrs, static, evaluator,
                          grid_point(coordinates), resume=resume, overwrite=overwrite, progress=progress,
                          flush_seconds=flush_seconds, derive=None if paths is None else path_loss)
    if out is not None:
        arrays, attrs = distributed.on_main(lambda: read_group(out, result_type.group))
    return result_type(arrays, attrs)


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
        bn_recompute: recompute BatchNorm running statistics at every point (see
            :class:`landscape.engine.evaluator.PointEvaluator`).
        seed: seed of the random directions (d1 from stream 2*seed, d2 from 2*seed + 1).
        out, resume, overwrite: write ``/surface`` of this HDF5 file incrementally; ``resume``
            continues an interrupted run (same options required), ``overwrite`` starts over.
        evaluator_options: speed-up switches of :class:`~landscape.engine.evaluator.PointEvaluator`
            (``fold_batchnorm``, ``channels_last``, ``micro_batch``, ``linear_first_layer``, ``inplace_activations``:
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
    static = {**{f"{axis}coordinates": values for axis, values in zip("xy", coordinates)}, **_stored(directions)}
    config = {"x": coordinates[0].tolist(), "y": coordinates[1].tolist() if y is not None else None,
              "normalization": normalization if target is None else "target", "include_biasbn": include_biasbn,
              "orthogonal": orthogonal, "x_target": target_info, "direction_seed": seed}
    return _grid(SurfaceResult, objectives, directions, coordinates, static, config,
                 direction_attrs(directions, objective.params), seed, out=out, resume=resume, overwrite=overwrite,
                 bn_recompute=bn_recompute, evaluator_options=evaluator_options, progress=progress,
                 flush_seconds=flush_seconds)


def _covering_axes(x: Any, y: Any, points: np.ndarray) -> list[np.ndarray]:
    """The x and y coordinates: given ones, or for a number N, N points covering the projected paths
    ``points`` (n, 2) and the origin. Both covering axes have one span, the larger of the two ranges
    widened by :data:`PATH_MARGIN` of it on each side, each centred on its own range, so the plane drawn
    square shows true distances."""
    ranges = [(min(0.0, float(values.min())), max(0.0, float(values.max()))) for values in points.T]
    span = (1 + 2 * PATH_MARGIN) * max(high - low for low, high in ranges) or 1.0
    axes = []
    for values, (low, high), name in zip((x, y), ranges, "xy"):
        if isinstance(values, (int, np.integer)) and not isinstance(values, bool):
            if values < 2:
                raise LandscapeError(f"{name} needs at least 2 points to cover the paths, got {values}")
            centre = (low + high) / 2
            axes.append(np.linspace(centre - span / 2, centre + span / 2, int(values)))
        else:
            axes.append(_axis(values, name))
    return axes


def pca_surface(objective: Objective, trajectories: Sequence[Trajectory], x: Any = 51, y: Any = 51, *,
                test_objective: Objective | None = None, include_biasbn: bool = False, bn_recompute: bool = False,
                out: str | Path | None = None, resume: bool = False, overwrite: bool = False,
                evaluator_options: Mapping[str, Any] | None = None, progress: Progress | None = None,
                flush_seconds: float = 1.0) -> SurfaceResult:
    """Loss and accuracy on the PCA plane of optimizer trajectories (Li et al. 2018, Sec. 7), each path drawn on it.

    The directions are the top two principal components of the trajectories' snapshots minus the
    objective's weights, which are the plane's origin (:func:`landscape.trajectory.pca_plane`): unit
    vectors, not filter-normalised, the rows of several trajectories stacked. Besides what
    :func:`loss_surface` stores: ``trajectory_x``, ``trajectory_y`` (each snapshot projected by least
    squares), ``trajectory_path`` (its trajectory, 0..P-1), ``trajectory_step`` (its optimizer step; -1
    for checkpoints), ``trajectory_loss`` (the first split's loss at the projected point, on the plane),
    and the attributes ``trajectory_labels`` and ``explained_variance_ratio`` (of the two directions).
    ``config["trajectories"]`` records each trajectory's source and a digest of its values, so a resume
    with other trajectories is refused.

    Args:
        trajectories: from :func:`landscape.trajectory.load_trajectory` (each with its label).
        x, y: coordinates along the first and second direction, or a number of points: that many, evenly
            spaced over the projected paths and the origin, widened by 20% of that range on each side; the
            two axes then share the larger span (each centred on its own range), so the plane is square.
        include_biasbn: biases and BatchNorm parameters take part (else their direction entries are zero).
        Other arguments as in :func:`loss_surface`.
    """
    objectives = _label_splits(objective, test_objective)
    plane = pca_plane(trajectories, objective.params, include_biasbn)
    points = np.concatenate(plane.coordinates)
    coordinates = _covering_axes(x, y, points)
    _grid_room(out, objectives, coordinates, SurfaceResult.group)
    static = {"xcoordinates": coordinates[0], "ycoordinates": coordinates[1], **_stored(plane.directions),
              "trajectory_x": points[:, 0], "trajectory_y": points[:, 1],
              "trajectory_path": np.concatenate([np.full(t.rows, k) for k, t in enumerate(trajectories)]),
              "trajectory_step": np.concatenate([t.steps for t in trajectories]).astype(np.int64)}
    labels = [t.label for t in trajectories]
    config = {"x": coordinates[0].tolist(), "y": coordinates[1].tolist(), "directions": "pca",
              "normalization": None, "include_biasbn": include_biasbn, "orthogonal": False,
              "trajectories": [{"label": t.label, **t.source, "sha256": digest}
                               for t, digest in zip(trajectories, plane.digests)]}
    extra = {**direction_attrs(plane.directions, objective.params), "trajectory_labels": labels,
             "explained_variance_ratio": plane.explained_variance_ratio.tolist()}
    return _grid(SurfaceResult, objectives, plane.directions, coordinates, static, config, extra, None, out=out,
                 resume=resume, overwrite=overwrite, bn_recompute=bn_recompute, evaluator_options=evaluator_options,
                 progress=progress, flush_seconds=flush_seconds, paths=points)


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
