"""HDF5 results: one file, one group per analysis, provenance in attributes, crash-safe writes.

- Whole results go through a temporary copy of the file and ``os.replace``, so the results
  file is always either the old or the new version.
- Long runs use :class:`IncrementalGroup`: a sidecar file ``<file>.<group>.partial`` holds
  NaN-filled chunked datasets and a ``done`` mask, flushed after every unit of work. A killed
  run resumes from it; on completion the group moves into the main file atomically.
- Attributes that are dicts or lists are stored as JSON strings and decoded on read.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import platform
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from landscape.errors import LandscapeError

_JSON_PREFIXES = ("{", "[")
CHUNK_VALUES = 4096  # float64 values per chunk of an incremental dataset at most (32 KiB), unless one unit is larger


def _open(path: str | Path, mode: str) -> h5py.File:
    try:
        return h5py.File(path, mode)
    except OSError as exc:
        if mode == "r" and not Path(path).exists():
            raise LandscapeError(f"results file {path} does not exist; check the path or run the analysis first") from None
        raise LandscapeError(f"cannot open {path} as HDF5 ({exc.__class__.__name__}); "
                             "the file is corrupt or not a results file: move it aside or choose another --out") from None


def _encode_attr(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, sort_keys=True, default=str)
    return value


def _decode_attr(value: Any) -> Any:
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str) and value.startswith(_JSON_PREFIXES):
        with contextlib.suppress(json.JSONDecodeError):
            return json.loads(value)
    if isinstance(value, np.generic):
        return value.item()
    return value


def _write_tree(group: h5py.Group, arrays: Mapping[str, Any], attrs: Mapping[str, Any]) -> None:
    for key, value in attrs.items():
        group.attrs[key] = _encode_attr(value)
    for name, value in arrays.items():
        if isinstance(value, Mapping):
            _write_tree(group.create_group(name), value, {})
        else:
            group.create_dataset(name, data=np.asarray(value))


def _read_tree(group: h5py.Group) -> tuple[dict[str, Any], dict[str, Any]]:
    arrays: dict[str, Any] = {}
    for name, item in group.items():
        arrays[name] = _read_tree(item)[0] if isinstance(item, h5py.Group) else item[()]
    return arrays, {k: _decode_attr(v) for k, v in group.attrs.items()}


@contextlib.contextmanager
def _atomic_edit(path: str | Path) -> Iterator[h5py.File]:
    """Open a temporary copy of ``path`` (or a new file) for writing; replace ``path`` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if path.exists():
        _open(path, "r").close()
        shutil.copy2(path, tmp)
    try:
        with h5py.File(tmp, "a") as handle:
            yield handle
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _refuse_existing(handle: h5py.File, path: str | Path, group: str, overwrite: bool) -> None:
    if group in handle:
        if not overwrite:
            raise LandscapeError(f"{path} already holds /{group}; pass --overwrite to replace it "
                                 "(or --resume to continue an interrupted run), or choose another --out")
        del handle[group]


def write_group(path: str | Path, group: str, arrays: Mapping[str, Any], attrs: Mapping[str, Any],
                overwrite: bool = False) -> None:
    """Write one analysis as ``/group`` (nested dicts become subgroups), atomically."""
    with _atomic_edit(path) as handle:
        _refuse_existing(handle, path, group, overwrite)
        _write_tree(handle.create_group(group), arrays, attrs)


def read_group(path: str | Path, group: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(arrays, attrs)`` of ``/group`` as plain numpy arrays, nested dicts and Python values."""
    with _open(path, "r") as handle:
        if group not in handle:
            raise LandscapeError(f"{path} has no /{group} (it holds: {', '.join(handle) or 'nothing'}); "
                                 f"run `landscape {group}` first")
        return _read_tree(handle[group])


def list_groups(path: str | Path) -> dict[str, dict[str, Any]]:
    """Top-level groups of a results file with their decoded attributes."""
    with _open(path, "r") as handle:
        return {name: {k: _decode_attr(v) for k, v in item.attrs.items()} for name, item in handle.items()}


def provenance(config: Mapping[str, Any], source: Mapping[str, Any], seed: int | None,
               device: Any) -> dict[str, Any]:
    """The standard attributes every analysis group carries."""
    import torch

    from landscape import __version__
    return {
        "config": dict(config),
        "checkpoint": str(source.get("checkpoint", "")),
        "checkpoint_sha256": str(source.get("checkpoint_sha256", "")),
        "dataset": str(source.get("dataset", "")),
        "eval_set": source.get("eval_set", {}),
        "seed": -1 if seed is None else int(seed),
        "landscape_version": __version__,
        "torch_version": str(torch.__version__),
        "python_version": platform.python_version(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
    }


class IncrementalGroup:
    """A result computed unit by unit (a grid point, a batch, a radius) that survives being killed.

    Args:
        path: the main results file.
        group: the group name, e.g. ``surface``.
        datasets: ``{name: trailing_shape}`` per unit; stored with shape ``unit_shape + trailing_shape``,
            float64, NaN-filled, chunked by runs along the last unit axis (a grid row for scalar units,
            one unit when the trailing shape is large): the slabs that a flush writes.
        unit_shape: the grid of units, e.g. ``(51, 51)``.
        attrs: provenance and config; a resume must present the same ``config``.
        static: arrays known up front (coordinates, directions), written once.
        resume: continue a partial run (or accept an already complete group).
        overwrite: discard a partial run and/or an existing group.
    """

    def __init__(self, path: str | Path, group: str, datasets: Mapping[str, tuple[int, ...]],
                 unit_shape: tuple[int, ...], attrs: Mapping[str, Any], static: Mapping[str, Any] | None = None,
                 resume: bool = False, overwrite: bool = False) -> None:
        self.path, self.group, self.unit_shape = Path(path), group, tuple(unit_shape)
        self.partial = self.path.with_name(f"{self.path.name}.{group}.partial")
        self.overwrite = overwrite
        self.complete = False
        if self.path.exists():
            with _open(self.path, "r") as handle:
                if group in handle and not (resume or overwrite):
                    _refuse_existing(handle, self.path, group, False)
                if group in handle and resume and not self.partial.exists():
                    self._check_config(handle[group], attrs, self.path)
                    self.complete = True
                    return
        if self.partial.exists() and not resume:
            if not overwrite:
                raise LandscapeError(f"an interrupted run left {self.partial}; pass --resume to continue it "
                                     "or --overwrite to start over")
            self.partial.unlink()
        fresh = not self.partial.exists()
        self.handle = _open(self.partial, "a")
        if fresh:
            root = self.handle
            _write_tree(root, dict(static or {}), attrs)
            for name, trailing in datasets.items():
                shape = self.unit_shape + tuple(trailing)
                root.create_dataset(name, shape=shape, dtype="f8", fillvalue=np.nan, chunks=self._chunks(trailing))
            root.create_dataset("done", shape=self.unit_shape, dtype=bool, fillvalue=False,
                                chunks=self.unit_shape or None)
            self.handle.flush()
        else:
            self._check_config(self.handle, attrs, self.partial)

    def _chunks(self, trailing: tuple[int, ...]) -> tuple[int, ...]:
        """One chunk per run of units along the last unit axis, of at most :data:`CHUNK_VALUES` values."""
        trailing = tuple(max(1, s) for s in trailing)
        if not self.unit_shape:
            return trailing
        run = max(1, min(self.unit_shape[-1], CHUNK_VALUES // math.prod(trailing)))
        return (1,) * (len(self.unit_shape) - 1) + (run,) + trailing

    @staticmethod
    def _check_config(group: h5py.Group, attrs: Mapping[str, Any], where: Path) -> None:
        stored = _decode_attr(group.attrs.get("config", ""))
        wanted = json.loads(json.dumps(attrs.get("config", {}), sort_keys=True, default=str))
        if stored != wanted:
            changed = sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))
            raise LandscapeError(f"cannot resume {where}: options differ ({', '.join(changed)}); "
                                 "rerun with the same options or pass --overwrite")

    @property
    def done(self) -> np.ndarray:
        if self.complete:
            return np.ones(self.unit_shape, dtype=bool)
        return self.handle["done"][()]

    def pending(self) -> list[tuple[int, ...]]:
        """Unit indices not yet computed, in row-major order."""
        return [tuple(int(i) for i in idx) for idx in np.argwhere(~self.done)]

    def write(self, index: tuple[int, ...], values: Mapping[str, Any]) -> None:
        """Store one unit's values and mark it done; flushed to disk before returning."""
        for name, value in values.items():
            self.handle[name][index] = value
        self.handle["done"][index] = True
        self.handle.flush()

    def arrays(self) -> dict[str, Any]:
        """Everything written so far (NaN where not done)."""
        if self.complete:
            return read_group(self.path, self.group)[0]
        return _read_tree(self.handle)[0]

    def finalize(self, arrays: Mapping[str, Any] | None = None, attrs: Mapping[str, Any] | None = None) -> None:
        """Move the finished group, plus ``arrays`` and ``attrs`` derived from its units, into the main
        file in one atomic write, and delete the sidecar."""
        if self.complete:
            return
        missing = int((~self.done).sum())
        if missing:
            raise LandscapeError(f"{missing} units of /{self.group} are not done; resume the run to finish them")
        for name in arrays or {}:
            if name in self.handle:  # written by a run killed while moving
                del self.handle[name]
        _write_tree(self.handle, dict(arrays or {}), dict(attrs or {}))
        self.handle.close()
        with _open(self.partial, "r") as source, _atomic_edit(self.path) as target:
            _refuse_existing(target, self.path, self.group, True)
            target.create_group(self.group)
            for key, value in source.attrs.items():
                target[self.group].attrs[key] = value
            for name in source:
                source.copy(source[name], target[self.group], name=name)
        self.partial.unlink()
        self.complete = True

    def close(self) -> None:
        if not self.complete and self.handle.id.valid:
            self.handle.close()


class MemoryGroup:
    """In-memory stand-in for :class:`IncrementalGroup` when no output file is given."""

    def __init__(self, datasets: Sequence[str], unit_shape: tuple[int, ...], static: Mapping[str, Any]) -> None:
        self.unit_shape = tuple(unit_shape)
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

    def finalize(self, arrays: Mapping[str, Any] | None = None, attrs: Mapping[str, Any] | None = None) -> None:
        """Nothing to move: the values are already in memory."""

    def close(self) -> None:
        """Nothing to release."""
