"""Optimizer trajectories: the weights recorded along training, read back, and the PCA plane they span
(Li et al. 2018, Sec. 7), with each path projected on it.

**Recording** (:class:`TrajectoryWriter`, a :class:`landscape.train.TrainCallback`; ``landscape train
--save-every K``). Snapshots: step 0 (the initial weights), every K epochs (``1``, ``2epochs``) or every K
optimizer steps (``50steps``), and the final step. One HDF5 file per run, group ``/trajectory``:

- ``weights`` float32 (rows, d): row i is every parameter (``named_parameters()`` order, flattened) at
  snapshot i; ``step`` int64 (rows,): optimizer steps done; ``epoch`` float64 (rows,): step / steps per
  epoch; ``done`` bool (rows,): which rows are written;
- attributes: ``format``, ``names`` and ``shapes`` (the layout of a row), ``schedule``, ``every_steps``,
  ``steps_per_epoch``, ``total_steps``, ``rows``, ``label`` (the optimizer) and ``checkpoint`` (the
  checkpoint the run writes, relative to the file's folder: the final weights with their BatchNorm
  statistics, the default origin of ``landscape trajectory``).

The file is laid out whole when the run starts (contiguous datasets allocated at once, written under a
temporary name, fsynced, renamed into place), so HDF5 never writes its metadata again: a snapshot goes
into its row's bytes with ``pwrite``, then its step and epoch, then its ``done`` byte, as
:class:`landscape.store.IncrementalGroup` writes units. A run killed at any moment leaves a valid file
whose done rows are whole. The training state saved at each epoch end holds the number of rows written
(``state_dict``); a resumed run marks the later rows not done and writes them again as it replays those
steps, so every snapshot is there once. Contiguous rows (rather than one chunk per snapshot) also let the
PCA below read a block of columns of every snapshot in one pass. Under torchrun rank 0 writes.

**Reading** (:func:`load_trajectory`): a trajectory file, or checkpoints of any trainer: files, folders
(their ``.pt``, ``.pth``, ``.ckpt``, ``.bin`` and ``.safetensors`` files) or globs, comma-separated, in
natural order (``epoch_9`` before ``epoch_10``). Checkpoints are read by
:func:`landscape.checkpoint.read_checkpoint` (weights only: no model is built and no code runs without
``trust``) and matched to the model's parameters by name, wrapper prefixes stripped.

**PCA plane** (:func:`pca_plane`), as Li et al.'s ``projection.py`` computes it: the matrix M has one row
w_i - w per snapshot (w: the weights of the surface's checkpoint, the plane's origin; Li et al.'s matrix
holds every saved model including the final one, whose row is zero when it is w), over the weights with
two or more dimensions, biases and BatchNorm parameters too with ``include_biasbn`` (Li et al.'s
``--ignore biasbn`` zeroes them); the directions are the top two principal components of M, as their
``sklearn.decomposition.PCA``: rows centred on their mean, unit-norm right singular vectors, not
filter-normalised; the explained variance ratio of each is its squared singular value over the sum of
all. Several trajectories are stacked into one M; the centring makes the directions independent of the
reference point, which only fixes the plane's origin. Each snapshot is projected by least squares on the
two directions (their ``lstsq`` projection). Each direction's sign is chosen so that the first
trajectory's first snapshot has a coordinate <= 0 (training moves along +x and +y).

The principal components come from the N x N Gram matrix of the centred rows (N snapshots in all, a few
hundred at most; float64, ``numpy.linalg.eigh``): exact, N^2 memory and O(N^2 d) work, with the snapshot
matrix streamed from the file in blocks of columns, once for the Gram matrix and once for the directions
and projections. No d x d matrix is formed, nor is M held in memory (d can be 10^7: 40 MB a snapshot).
A randomized SVD (``torch.svd_lowrank``) would need M in memory or a pass per power iteration, and gives
an approximation, where the Gram matrix of so few rows is small and exact.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import math
import os
import re
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch import Tensor, nn

from landscape import distributed
from landscape.errors import LandscapeError
from landscape.params import is_filtered
from landscape.resources import require
from landscape.store import decode_attr, encode_attr, fsync, pwrite

FORMAT = "landscape-trajectory/1"
GROUP = "trajectory"
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors")
BLOCK_BYTES = 1 << 26  # float64 bytes of one block of columns of all snapshots, read at a time
RANK_TOLERANCE = 1e-10  # a second principal component below this fraction of the first is refused
_EVERY = re.compile(r"^\s*(\d+)\s*(epochs?|steps?|)\s*$")


# ------------------------------------------------------------------------------------------------ recording

@dataclass(frozen=True)
class Schedule:
    """When snapshots are taken: every ``count`` epochs or optimizer steps (``unit``), plus step 0 and the last."""

    count: int
    unit: str  # "epoch" or "step"

    def __str__(self) -> str:
        return f"{self.count}{self.unit}{'s' if self.count > 1 else ''}"

    def every_steps(self, steps_per_epoch: int) -> int:
        return self.count * (steps_per_epoch if self.unit == "epoch" else 1)

    def steps(self, steps_per_epoch: int, total_steps: int) -> list[int]:
        """The optimizer steps after which a snapshot is taken: 0, every K-th, and ``total_steps``."""
        steps = list(range(0, total_steps + 1, self.every_steps(steps_per_epoch)))
        return steps if steps[-1] == total_steps else [*steps, total_steps]


def parse_schedule(text: str | int) -> Schedule:
    """``1``/``1epoch``/``2epochs`` (epochs) or ``50steps`` (optimizer steps) -> :class:`Schedule`."""
    match = _EVERY.match(str(text).lower())
    if match is None or int(match.group(1)) < 1:
        raise LandscapeError(f"--save-every takes N (epochs), Nepochs or Nsteps with N >= 1, e.g. 1 or 50steps; "
                             f"got {text!r}")
    return Schedule(int(match.group(1)), "step" if match.group(2).startswith("step") else "epoch")


def default_path(checkpoint: str | os.PathLike) -> Path:
    """Where ``landscape train --save-every`` records the run writing ``checkpoint``: ``runs/sgd.pt`` ->
    ``runs/sgd_trajectory.h5``."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(f"{checkpoint.stem}_trajectory.h5")


def _layout(model: nn.Module, schedule: Schedule, steps_per_epoch: int, total_steps: int) -> dict[str, Any]:
    """What a trajectory file of this run must hold (compared when a run resumes)."""
    named = list(model.named_parameters())
    return {"names": [n for n, _ in named], "shapes": [list(p.shape) for _, p in named], "schedule": str(schedule),
            "every_steps": schedule.every_steps(steps_per_epoch),
            "steps_per_epoch": steps_per_epoch, "total_steps": total_steps,
            "rows": len(schedule.steps(steps_per_epoch, total_steps))}


class TrajectoryWriter:
    """A training callback that records the weights along the run into the trajectory file ``path``
    (see the module docstring): ``train_model(..., callbacks=[TrajectoryWriter("runs/sgd_trajectory.h5")])``.

    ``every``: ``1`` (epochs), ``2epochs``, ``50steps`` or a :class:`Schedule`. ``label`` names the path in
    figures (e.g. the optimizer); ``checkpoint`` is recorded as the checkpoint of the final weights.
    A run that starts afresh refuses an existing file unless ``overwrite`` (or ``resume``: the interrupted
    run it would continue left no training state, so it starts over); a resumed run continues the file.
    A run stopped early by non-finite weights ends at its last scheduled snapshot before them.
    """

    def __init__(self, path: str | os.PathLike, every: str | int | Schedule = 1, *, label: str = "",
                 checkpoint: str | None = None, resume: bool = False, overwrite: bool = False) -> None:
        self.path = Path(path)
        self.schedule = every if isinstance(every, Schedule) else parse_schedule(every)
        self.label, self.checkpoint, self.resume, self.overwrite = label, checkpoint, resume, overwrite
        self.rows = 0  # snapshots recorded
        self.plan: list[int] = []  # the steps of every snapshot
        self.steps_per_epoch = 1
        self.offsets: dict[str, int] = {}

    def begin(self, *, model: nn.Module, steps_per_epoch: int, total_steps: int, resumed: bool) -> None:
        """Called by :func:`landscape.train.train_model` before the first step: create (or, ``resumed``,
        check and continue) the file, and record the initial weights of a fresh run."""
        from landscape.train import _on_main  # rank 0 opens the file; a refusal reaches every rank

        self.steps_per_epoch = steps_per_epoch
        self.plan = self.schedule.steps(steps_per_epoch, total_steps)
        layout = _layout(model, self.schedule, steps_per_epoch, total_steps)
        self.offsets = _on_main(lambda: self._continue(layout) if resumed else self._create(layout))
        if not resumed:
            self.rows = 0
            self._record(0, model)

    def __call__(self, *, step: int, epoch: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                 lr: float) -> None:
        if self.rows < len(self.plan) and step == self.plan[self.rows]:
            self._record(step, model)

    def state_dict(self) -> dict[str, Any]:
        return {"rows": self.rows}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rows = int(state["rows"])

    def _record(self, step: int, model: nn.Module) -> None:
        if distributed.is_main():
            row = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).to("cpu", torch.float32).numpy()
            fd = os.open(self.path, os.O_RDWR)
            try:
                pwrite(fd, row.astype("<f4", copy=False), self.offsets["weights"] + self.rows * row.nbytes)
                pwrite(fd, np.array([step], "<i8"), self.offsets["step"] + 8 * self.rows)
                pwrite(fd, np.array([step / self.steps_per_epoch], "<f8"), self.offsets["epoch"] + 8 * self.rows)
                pwrite(fd, np.ones(1, bool), self.offsets["done"] + self.rows)
            finally:
                os.close(fd)
        self.rows += 1

    def _create(self, layout: dict[str, Any]) -> dict[str, int]:
        """Lay the file out whole under a temporary name, flush it, rename it into place; the datasets' offsets."""
        if self.path.exists() and not (self.overwrite or self.resume):
            raise LandscapeError(f"the trajectory {self.path} already exists; pass --overwrite to replace it, or "
                                 "choose another --trajectory")
        width = sum(math.prod(shape) for shape in layout["shapes"])
        require(f"a trajectory of {layout['rows']} snapshots of {width:,} parameters",
                "take fewer snapshots (a larger --save-every)", disk=4.0 * layout["rows"] * width, where=self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with h5py.File(tmp, "w") as handle:
            group = handle.create_group(GROUP)
            checkpoint = os.path.relpath(self.checkpoint, self.path.parent) if self.checkpoint else ""
            for key, value in {"format": FORMAT, **layout, "label": self.label, "checkpoint": checkpoint}.items():
                group.attrs[key] = encode_attr(value)
            for name, dtype, shape, fill in (("weights", "<f4", (layout["rows"], width), None),
                                             ("step", "<i8", (layout["rows"],), -1),
                                             ("epoch", "<f8", (layout["rows"],), np.nan),
                                             ("done", "?", (layout["rows"],), False)):
                plist = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
                plist.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)  # all storage now: no metadata change later
                group.create_dataset(name, shape=shape, dtype=dtype, fillvalue=fill, dcpl=plist)
        fsync(tmp)
        os.replace(tmp, self.path)
        fsync(self.path.parent)
        return _offsets(self.path)

    def _continue(self, layout: dict[str, Any]) -> dict[str, int]:
        """Check that the file is this run's, mark the rows after the resumed state's not done; the offsets."""
        if not self.path.exists():
            raise LandscapeError(f"the interrupted run's trajectory {self.path} is missing; pass --overwrite to "
                                 "start the run over")
        stored, done = _header(self.path)
        if stored.get("format") != FORMAT or any(stored.get(key) != layout[key] for key in layout):
            model = "" if (stored.get("names"), stored.get("shapes")) == (layout["names"], layout["shapes"]) \
                else " of another model"
            raise LandscapeError(f"cannot resume the trajectory {self.path}: it holds snapshots every "
                                 f"{stored.get('schedule')} of {stored.get('total_steps')} steps{model}, this run "
                                 f"takes them every {layout['schedule']} of {layout['total_steps']}; rerun with "
                                 f"--save-every {stored.get('schedule')}, or pass --overwrite to start over")
        if not done[:self.rows].all():
            raise LandscapeError(f"the trajectory {self.path} lacks snapshots the training state says were written; "
                                 "pass --overwrite to start the run over")
        offsets = _offsets(self.path)
        fd = os.open(self.path, os.O_RDWR)
        try:
            pwrite(fd, np.zeros(len(done) - self.rows, bool), offsets["done"] + self.rows)
        finally:
            os.close(fd)
        return offsets


def _header(path: Path) -> tuple[dict[str, Any], np.ndarray]:
    """(the decoded attributes, the done mask) of a trajectory file; refuses anything else."""
    try:
        with h5py.File(path, "r") as handle:
            group = handle.get(GROUP)
            if not isinstance(group, h5py.Group) or "done" not in group:
                raise LandscapeError(f"{path} is not a trajectory file (no /{GROUP}); give one written by "
                                     "`landscape train --save-every`, or checkpoints")
            return {key: decode_attr(value) for key, value in group.attrs.items()}, group["done"][()]
    except OSError as error:
        raise LandscapeError(f"cannot read the trajectory {path} ({type(error).__name__}); the file is damaged: "
                             "record it again") from None


def _offsets(path: Path) -> dict[str, int]:
    """Byte offsets of the trajectory datasets' raw data (contiguous, allocated at creation)."""
    with h5py.File(path, "r") as handle:
        return {name: int(handle[GROUP][name].id.get_offset()) for name in ("weights", "step", "epoch", "done")}


# -------------------------------------------------------------------------------------------------- reading

@dataclass
class Trajectory:
    """One optimizer path: ``rows`` snapshots of the parameters ``names`` (shapes ``shapes``), laid end to end.

    ``steps`` (rows,) are the optimizer steps (-1: unknown, for checkpoints), ``source`` what it was read
    from (for a result's configuration). ``matrix`` holds the rows of checkpoints in memory; a trajectory
    file is read in blocks.
    """

    label: str
    names: list[str]
    shapes: list[tuple[int, ...]]
    steps: np.ndarray
    source: dict[str, Any]
    matrix: np.ndarray | None = None
    offsets: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        sizes = [math.prod(shape) for shape in self.shapes]
        self.offsets = dict(zip(self.names, np.cumsum([0, *sizes[:-1]]).tolist()))

    @property
    def rows(self) -> int:
        return len(self.steps)

    @contextlib.contextmanager
    def columns(self) -> Iterator[Callable[[int, int], np.ndarray]]:
        """``read(start, stop)``: the flat entries [start, stop) of every snapshot, float32 (rows, stop - start)."""
        if self.matrix is not None:
            yield lambda start, stop: self.matrix[:, start:stop]
            return
        with h5py.File(self.source["path"], "r") as handle:
            weights = handle[GROUP]["weights"]
            yield lambda start, stop: weights[:self.rows, start:stop]

    def check_fits(self, like: Mapping[str, Tensor], model: str) -> None:
        """Refuse a trajectory whose parameter names or shapes differ from ``like``'s (the model's)."""
        shapes = dict(zip(self.names, self.shapes))
        missing = [n for n in like if n not in shapes]
        extra = [n for n in shapes if n not in like]
        misshaped = [n for n in like if n in shapes and tuple(shapes[n]) != tuple(like[n].shape)]
        problems = [f"{kind}: {', '.join(names[:3])}{', ...' if len(names) > 3 else ''}"
                    for kind, names in (("missing", missing), ("not in the model", extra),
                                        ("wrongly shaped", misshaped)) if names]
        if problems:
            raise LandscapeError(f"the trajectory {self.label!r} ({_where(self.source)}) does not match the parameters "
                                 f"of {model} ({'; '.join(problems)}); give a trajectory of this architecture")


def _where(source: Mapping[str, Any]) -> str:
    files = source.get("checkpoints")
    return source["path"] if files is None else f"{files[0]} ... {files[-1]}"


def load_trajectory(spec: str | os.PathLike, like: Mapping[str, Tensor], *, label: str | None = None,
                    trust: bool = False, model: str = "the model") -> Trajectory:
    """The trajectory ``spec`` names, checked against the parameters ``like`` (name -> tensor) of ``model``.

    ``spec``: a trajectory file, or comma-separated checkpoint files, folders and globs (see the module
    docstring). ``label`` defaults to the recorded optimizer (a checkpoint's own metadata, else the
    folder's name). At least two snapshots are needed.
    """
    text = str(spec)
    path = Path(text)
    if path.is_file() and h5py.is_hdf5(path):
        trajectory = _from_file(path)
    else:
        trajectory = _from_checkpoints(text, _checkpoint_files(text), like, trust)
    if trajectory.rows < 2:
        raise LandscapeError(f"the trajectory {text} holds {trajectory.rows} snapshot(s); a path needs at least two")
    if label:
        trajectory.label = label
    trajectory.check_fits(like, model)
    return trajectory


def final_checkpoint(spec: str | os.PathLike) -> str:
    """The checkpoint of the final weights of the trajectory ``spec``: for a trajectory file, the one its
    training wrote (recorded in it, relative to the file's folder); for checkpoints, the last one."""
    path = Path(spec)
    if not (path.is_file() and h5py.is_hdf5(path)):
        return _checkpoint_files(str(spec))[-1]
    recorded = _header(path)[0].get("checkpoint")
    if not recorded:
        raise LandscapeError(f"the trajectory {path} records no checkpoint; pass --final CKPT")
    return str(path.parent / recorded)


def _from_file(path: Path) -> Trajectory:
    attrs, done = _header(path)
    if attrs.get("format") != FORMAT:
        raise LandscapeError(f"{path} has format {attrs.get('format')!r}, not {FORMAT}; record it again with "
                             "`landscape train --save-every`")
    rows = int(np.argmin(done)) if not done.all() else len(done)  # written rows come first, in order
    if rows < len(done):
        warnings.warn(f"the trajectory {path} holds {rows} of its {len(done)} snapshots (its run is still going, "
                      "was killed or stopped early); using those", stacklevel=2)
    with h5py.File(path, "r") as handle:
        steps = handle[GROUP]["step"][:rows]
    return Trajectory(attrs.get("label") or path.stem, list(attrs["names"]), [tuple(s) for s in attrs["shapes"]],
                      steps, {"path": str(path), "rows": rows, "of": len(done)})


def _natural(path: str) -> list[Any]:
    """Sort key: digit runs compare as numbers (``epoch_9`` before ``epoch_10``)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path)]


def _checkpoint_files(spec: str) -> list[str]:
    """The checkpoint files of comma-separated files, folders and globs, each folder or glob in natural order."""
    files: list[str] = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        if Path(part).is_dir():
            found = sorted((str(p) for p in Path(part).iterdir() if p.suffix in CHECKPOINT_SUFFIXES), key=_natural)
        elif glob.has_magic(part):
            found = sorted((p for p in glob.glob(part) if Path(p).is_file()), key=_natural)
        else:
            found = [part] if Path(part).is_file() else []
        if not found:
            raise LandscapeError(f"no checkpoint found for {part!r} of the trajectory {spec!r}; give existing files, "
                                 "a folder or a glob")
        files += found
    if len(files) == 1:
        raise LandscapeError(f"the trajectory {spec!r} is one checkpoint; a path needs at least two: quote a glob "
                             "('runs/sgd/*.pt') or join the files with commas")
    return files


def _from_checkpoints(spec: str, files: Sequence[str], like: Mapping[str, Tensor], trust: bool) -> Trajectory:
    """The parameters ``like`` names of every checkpoint in ``files``, as float32 rows in memory."""
    from landscape.checkpoint import read_checkpoint, strip_prefixes

    width = sum(t.numel() for t in like.values())
    require(f"a trajectory of {len(files)} checkpoints of {width:,} parameters", "give fewer checkpoints",
            memory=4.0 * len(files) * width)
    matrix = np.empty((len(files), width), dtype=np.float32)
    meta: dict[str, Any] = {}
    for row, name in enumerate(files):
        file = read_checkpoint(name, trust=trust)
        state, meta = strip_prefixes(file.state), file.meta
        missing = [n for n in like if n not in state]
        misshaped = [n for n in like if n in state and tuple(state[n].shape) != tuple(like[n].shape)]
        if missing or misshaped:
            wrong = misshaped[0] if misshaped else ""
            detail = (f"lacks {', '.join(missing[:3])}" if missing else
                      f"has {wrong} shaped {tuple(state[wrong].shape)}, not {tuple(like[wrong].shape)}")
            raise LandscapeError(f"checkpoint {name} of the trajectory {spec!r} {detail}: it is not of the model's "
                                 "architecture; every checkpoint of a path must be")
        matrix[row] = torch.cat([state[n].detach().reshape(-1) for n in like]).to(torch.float32).numpy()
    label = meta.get("optimizer") or Path(files[-1]).parent.name or "path"
    return Trajectory(str(label), list(like), [tuple(t.shape) for t in like.values()], np.full(len(files), -1),
                      {"checkpoints": list(files)}, matrix)


# ------------------------------------------------------------------------------------------------ PCA plane

@dataclass
class Plane:
    """The PCA plane of trajectories: two unit ``directions`` shaped like the reference (zero where no
    parameter takes part), each trajectory's snapshots projected on it (``coordinates``: (rows, 2) each),
    the ``explained_variance_ratio`` (2,) of the two, and a SHA-256 of each trajectory's values used."""

    directions: list[dict[str, Tensor]]
    coordinates: list[np.ndarray]
    explained_variance_ratio: np.ndarray
    digests: list[str]


def pca_plane(trajectories: Sequence[Trajectory], reference: Mapping[str, Tensor],
              include_biasbn: bool = False) -> Plane:
    """The plane of the top two principal components of the snapshots' differences from ``reference``
    (the weights at the plane's origin), and every snapshot projected on it (see the module docstring).

    The directions come out in ``reference``'s dtype and device; the projections use them as they are.
    Refused in one line: no trajectory, one that does not match ``reference``, or snapshots that span
    fewer than two directions.
    """
    if not trajectories:
        raise LandscapeError("PCA directions need at least one trajectory")
    for trajectory in trajectories:
        trajectory.check_fits(reference, "the model")
    names = [n for n, t in reference.items() if include_biasbn or is_filtered(t)]
    if not names:
        raise LandscapeError("no parameter has two or more dimensions; pass --include-biasbn (include_biasbn=True)")
    base = {n: reference[n].detach().to("cpu", torch.float64).reshape(-1).numpy() for n in names}
    total = sum(t.rows for t in trajectories)
    width = max(1, BLOCK_BYTES // (8 * total))
    digests = [hashlib.sha256() for _ in trajectories]
    dtype = next(iter(reference.values())).dtype
    with contextlib.ExitStack() as stack:
        readers = [stack.enter_context(t.columns()) for t in trajectories]

        def blocks() -> Iterator[tuple[str, int, int, list[np.ndarray], np.ndarray]]:
            """(name, start, stop, each trajectory's float32 rows, their stacked float64 differences) per block."""
            for name in names:
                size = len(base[name])
                for start in range(0, size, width):
                    stop = min(size, start + width)
                    parts = [read(t.offsets[name] + start, t.offsets[name] + stop)
                             for t, read in zip(trajectories, readers)]
                    yield name, start, stop, parts, np.concatenate(parts).astype(np.float64) - base[name][start:stop]

        gram = np.zeros((total, total))
        for name, _, _, parts, block in blocks():
            for digest, part in zip(digests, parts):
                digest.update(np.ascontiguousarray(part, "<f4").tobytes())
            gram += block @ block.T
        centred = gram - gram.mean(axis=0) - gram.mean(axis=1)[:, None] + gram.mean()
        values, vectors = np.linalg.eigh(centred)
        top, variances = vectors[:, ::-1][:, :2], values[::-1][:2]
        if not variances[0] > 0 or not variances[1] > RANK_TOLERANCE * variances[0]:
            raise LandscapeError(f"the {total} snapshots span fewer than two directions (all equal, or on one line); "
                                 "record more snapshots of the run (e.g. --save-every 1 over several epochs)")
        scale = top / np.sqrt(variances)  # direction k = (centred rows)^T u_k / s_k
        flat = {n: np.zeros((len(base[n]), 2)) for n in names}
        projected, gram2 = np.zeros((total, 2)), np.zeros((2, 2))
        for name, start, stop, _, block in blocks():
            piece = (block - block.mean(axis=0)).T @ scale
            piece = torch.from_numpy(piece).to(dtype).double().numpy()  # the directions as the surface uses them
            flat[name][start:stop] = piece
            projected += block @ piece
            gram2 += piece.T @ piece
    coordinates = np.linalg.solve(gram2, projected.T).T  # least squares on the two directions
    signs = np.where(coordinates[0] > 0, -1.0, 1.0)
    coordinates = coordinates * signs
    directions = [{n: (torch.from_numpy(flat[n][:, k] * signs[k]).view(t.shape) if n in flat
                       else torch.zeros(t.shape, dtype=torch.float64)).to(t.device, t.dtype)
                   for n, t in reference.items()} for k in range(2)]
    splits = np.cumsum([t.rows for t in trajectories])[:-1]
    return Plane(directions, np.split(coordinates, splits), variances / np.trace(centred),
                 [digest.hexdigest() for digest in digests])
