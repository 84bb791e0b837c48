"""The resumable point runner: every analysis that evaluates many units goes through it.

A run is a grid of units (a surface or interpolation point, a (radius, direction) pair of
``landscape radius``, a (batch, ρ) pair of ``landscape sharpness``), numbered by their flat
row-major index in the grid's shape. An evaluator (:class:`Evaluates`: a
:class:`landscape.engine.evaluator.PointEvaluator`, or an analysis's own unit computation) gives
the values at a list of points (:class:`OneByOne` for units computed one at a time); ``point_of``
maps a unit's grid index to its point.

Units go in blocks of ``evaluator.stack`` consecutive units whose boundaries are fixed multiples
of that size, and a block is always evaluated whole (one stacked forward), so every point is
computed together with the same others whether or not the run was interrupted: a resumed result
is bit-identical to an uninterrupted one. Values are written through the sink's crash-safe
``write(start, values)`` (:class:`landscape.store.IncrementalGroup`, or
:class:`landscape.store.MemoryGroup` without a file).

The seam between evaluating and writing, for runs that share points out among processes:

- :func:`pending_blocks` lists the blocks a run still owes, from the sink's ``done`` mask;
- :func:`evaluate_blocks` evaluates a given list of blocks and yields finished ``(units, values)``
  chunks at least every flush interval; it touches no file, so each process of a sharded run
  can call it on its share of the pending blocks;
- :func:`run_points` owns the sink: it hands the pending blocks to :func:`evaluate_blocks`,
  writes each chunk that comes back and reports progress.

:func:`run_group` makes the sink, runs it and moves the finished group into the results file;
:func:`check_room` refuses a run that cannot fit before anything is allocated. Under torchrun
:func:`run_group` shares the pending blocks out among the ranks instead
(:mod:`landscape.engine.sharing`): rank 0 alone opens the sink, lists the pending blocks, writes
every rank's finished blocks and moves the group in; every rank returns the finished group.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from landscape import distributed
from landscape.engine.sharing import share_blocks
from landscape.resources import require
from landscape.store import IncrementalGroup, MemoryGroup

PointOf = Callable[[tuple[int, ...]], Any]  # unit index -> the evaluator's point (e.g. a coefficient vector)
Progress = Callable[[int, int], None]  # (units done, units in total)
Values = dict[str, np.ndarray]  # name -> array (units, ...)


class Evaluates(Protocol):
    """What the runner needs of an evaluator: ``stack`` points per block, evaluated together."""

    stack: int

    def evaluate(self, points: Sequence[Any]) -> Values:
        """``{name: array (len(points), ...)}`` at ``points``."""


class OneByOne:
    """An evaluator of units computed one at a time (one unit per block) by ``compute(point)``, which
    returns ``{name: value}`` (a number or an array of the dataset's trailing shape)."""

    stack = 1

    def __init__(self, compute: Callable[[Any], Mapping[str, Any]]) -> None:
        self.compute = compute

    def evaluate(self, points: Sequence[Any]) -> Values:
        computed = [self.compute(point) for point in points]
        return {name: np.stack([np.asarray(values[name], dtype=np.float64) for values in computed])
                for name in computed[0]}


def grid_point(coordinates: Sequence[np.ndarray]) -> PointOf:
    """The coefficients at a grid index: one coordinate per axis."""
    return lambda index: [float(axis[i]) for axis, i in zip(coordinates, index)]


def evaluate_points(evaluator: Evaluates, point_of: PointOf, indices: Sequence[tuple[int, ...]]) -> Values:
    """Values at the units ``indices`` (any subset, in any order)."""
    return evaluator.evaluate([point_of(index) for index in indices])


def _unravel(flat: np.ndarray, shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Grid indices of the flat row-major indices ``flat``."""
    return list(zip(*(axis.tolist() for axis in np.unravel_index(flat, shape))))


def pending_blocks(done: np.ndarray, size: int) -> np.ndarray:
    """First flat units of the blocks of ``size`` units not all marked in the flat ``done`` mask."""
    starts = np.arange(0, done.size, size)
    return starts[~np.logical_and.reduceat(done, starts)]


def evaluate_blocks(evaluator: Evaluates, point_of: PointOf, shape: tuple[int, ...], starts: Sequence[int],
                    flush_seconds: float) -> Iterator[tuple[np.ndarray, Values]]:
    """Evaluate the blocks of ``evaluator.stack`` units that begin at the flat units ``starts``, in that
    order; yield ``(flat units, values)`` chunks: the first block at once, then whatever is finished
    at least every ``flush_seconds`` (timed from when the previous chunk was taken), and the rest at
    the end. Cheap blocks go several per evaluator call: about 0.1 s of work."""
    size, total = max(1, int(evaluator.stack)), math.prod(shape)
    position, blocks_per_call, since, first = 0, 1, time.perf_counter(), True
    indices: list[np.ndarray] = []
    values: dict[str, list[np.ndarray]] = {}
    while position < len(starts):
        began = time.perf_counter()
        blocks = starts[position:position + blocks_per_call]
        flat = _block_units(blocks, size, total)
        for name, value in evaluate_points(evaluator, point_of, _unravel(flat, shape)).items():
            values.setdefault(name, []).append(value)
        indices.append(flat)
        position += len(blocks)
        per_block = (time.perf_counter() - began) / len(flat) * size
        blocks_per_call = max(1, min(256 // size, int(min(0.1, flush_seconds / 4) / max(per_block, 1e-9))))
        if position < len(starts) and time.perf_counter() - since < flush_seconds and not first:
            continue  # (the first block goes at once: early progress and a first time per point)
        yield np.concatenate(indices), {name: np.concatenate(parts) for name, parts in values.items()}
        indices, values, since, first = [], {}, time.perf_counter(), False


def _block_units(starts: Sequence[int], size: int, total: int) -> np.ndarray:
    """The flat units of the blocks of ``size`` units beginning at ``starts`` (the last block may be short)."""
    return np.concatenate([np.arange(start, min(start + size, total)) for start in starts])


def _writer(sink: IncrementalGroup | MemoryGroup, done: np.ndarray,
            progress: Progress | None) -> Callable[[np.ndarray, Values], None]:
    """``write(flat, values)``: store the values of the flat units ``flat`` (ascending) in ``sink``, one
    ``write`` per run of consecutive units, and report ``progress(units done, units in total)`` (also
    once now); ``done`` is the flat mask as it was at the start."""
    finished = int(done.sum())
    if progress is not None:
        progress(finished, done.size)

    def write(flat: np.ndarray, values: Values) -> None:
        nonlocal finished
        for run in np.split(np.arange(len(flat)), np.flatnonzero(np.diff(flat) != 1) + 1):
            sink.write(int(flat[run[0]]), {name: value[run] for name, value in values.items()})
        finished += int((~done[flat]).sum())
        if progress is not None:
            progress(finished, done.size)
    return write


def run_points(sink: IncrementalGroup | MemoryGroup, evaluator: Evaluates, point_of: PointOf,
               progress: Progress | None, flush_seconds: float) -> None:
    """Evaluate every unit of ``sink`` not yet done at ``point_of(index)`` and write the finished ones
    at least every ``flush_seconds`` (so a kill loses at most that much work, and no written unit is
    recomputed). Only a block that a kill left partly marked done, in the middle of its ``done``
    write, has its marked units computed again."""
    done = np.array(sink.done, dtype=bool).reshape(-1)  # as it was at the start
    write = _writer(sink, done, progress)
    starts = pending_blocks(done, max(1, int(evaluator.stack)))
    for flat, values in evaluate_blocks(evaluator, point_of, sink.unit_shape, starts, flush_seconds):
        write(flat, values)


def run_group(out: str | Path | None, group: str, datasets: Mapping[str, tuple[int, ...]], shape: tuple[int, ...],
              attrs: Mapping[str, Any], static: Mapping[str, Any], evaluator: Evaluates, point_of: PointOf, *,
              resume: bool, overwrite: bool, progress: Progress | None, flush_seconds: float,
              derive: Callable[[dict[str, Any]], tuple[dict[str, Any], dict[str, Any]]] | None = None,
              ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Evaluate the ``datasets`` (``{name: trailing shape}`` per unit) on every unit of ``shape``;
    return the group's arrays and the attributes ``derive`` adds.

    With ``out`` the group is written incrementally (resumable, see
    :class:`landscape.store.IncrementalGroup`) and moved into ``out`` when complete, together with
    the ``(arrays, attrs)`` that ``derive`` computes from the finished arrays; else it stays in memory.
    Under torchrun the ranks share the blocks out (see the module docstring); rank 0 alone touches
    ``out`` and calls ``progress``, and an error it meets opening the sink is raised on every rank.
    """
    def open_sink() -> IncrementalGroup | MemoryGroup:
        return (IncrementalGroup(out, group, datasets, shape, attrs, static, resume=resume, overwrite=overwrite)
                if out is not None else MemoryGroup(datasets, shape, static))

    def finish(sink: IncrementalGroup | MemoryGroup) -> tuple[dict[str, Any], dict[str, Any]]:
        arrays = sink.arrays()
        derived, derived_attrs = derive(arrays) if derive is not None else ({}, {})
        sink.finalize(derived, derived_attrs)
        return {**arrays, **derived}, derived_attrs

    if not distributed.active():
        sink = open_sink()
        try:
            run_points(sink, evaluator, point_of, progress, flush_seconds)
            return finish(sink)
        finally:
            sink.close()
    return _run_shared(open_sink, finish, evaluator, point_of, shape, progress, flush_seconds)


def _run_shared(open_sink: Callable[[], IncrementalGroup | MemoryGroup],
                finish: Callable[[IncrementalGroup | MemoryGroup], tuple[dict[str, Any], dict[str, Any]]],
                evaluator: Evaluates, point_of: PointOf, shape: tuple[int, ...], progress: Progress | None,
                flush_seconds: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """:func:`run_group` on several ranks: rank 0 opens the sink and plans, every rank evaluates a share of
    the pending blocks (:func:`landscape.engine.sharing.share_blocks`), rank 0 writes and finishes."""
    total = math.prod(shape)
    opened: list[tuple[IncrementalGroup | MemoryGroup, np.ndarray]] = []   # rank 0's sink and done mask

    def plan() -> tuple[str, int, np.ndarray]:
        sink = open_sink()
        opened.append((sink, np.array(sink.done, dtype=bool).reshape(-1)))
        size = max(1, int(evaluator.stack))
        run = distributed.store().add("landscape/points/runs", 1)   # a key unique in the job
        return f"landscape/points/{run}", size, pending_blocks(opened[0][1], size)

    try:
        key, size, starts = distributed.on_main(plan)   # (every rank uses rank 0's block size)
        write = _writer(*opened[0], progress) if distributed.is_main() else None
        share_blocks(lambda flat: evaluate_points(evaluator, point_of, _unravel(flat, shape)),
                     lambda blocks: _block_units(blocks, size, total), starts, key, write, flush_seconds)
        return distributed.on_main(lambda: finish(opened[0][0]))
    finally:
        for sink, _ in opened:
            sink.close()


def check_room(out: str | Path | None, shape: tuple[int, ...], names: Sequence[str], what: str,
               memory: float = 0.0) -> None:
    """Refuse a run of ``shape`` units of the scalar values ``names`` that cannot fit: in memory, its
    values and done mask (plus ``memory`` bytes the caller needs); on disk next to ``out``, its
    ``.partial`` sidecar and the final copy of the results file (see :mod:`landscape.resources`; under
    torchrun only rank 0, which writes them, looks at the disk)."""
    group = math.prod(shape) * (8 * len(names) + 1)
    writes = out is not None and distributed.is_main()
    existing = Path(out).stat().st_size if writes and Path(out).exists() else 0
    require(f"{what} ({math.prod(shape):,} points)", "use fewer points, or a machine with more room",
            memory=group + memory, disk=2 * group + existing if writes else 0.0, where=out)
