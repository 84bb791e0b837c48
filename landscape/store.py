"""HDF5 results: one file, one group per analysis, provenance in attributes, crash-safe writes.

- Writers of one results file take turns: every read-modify-replace of ``<file>`` holds an advisory
  lock (``fcntl.flock``) on the side file ``.<file>.lock``, and a writer that has to wait says so
  on stderr. Concurrent analyses writing to one file therefore all keep their groups.
- Whole results go through a temporary copy ``.<file>.tmp`` (written under the lock, fsynced) and
  ``os.replace``, so the results file is always either the old or the new version.
- Long runs use :class:`IncrementalGroup`, a sidecar ``<file>.<group>.partial``. HDF5 itself is not
  crash-safe while its metadata changes (a kill in the middle leaves "bad object header" or "addr
  overflow" files), so the sidecar's metadata never changes after it is made:

  * it is laid out completely at creation: attributes (config and provenance), static arrays, one
    contiguous, early-allocated, NaN-filled float64 dataset per value and the ``done`` mask
    (False). It is built as ``.<partial>.tmp``, fsynced and renamed into place: a kill during
    creation leaves no sidecar (the next run starts afresh) or a complete one;
  * afterwards the HDF5 library never writes to it: units are written with ``os.pwrite`` into the
    datasets' raw bytes at fixed offsets, first the values, then, once those writes have returned,
    the units' ``done`` bytes. Whatever moment a process dies, the sidecar is valid HDF5 and a unit
    marked done has its values. A SIGKILL does not lose the OS page cache, so nothing is fsynced
    per write (only at creation and at the final move); an OS crash or power loss can lose the
    most recent writes in any order, so after one, start over with ``--overwrite``;
  * one run per group: the run holds the lock ``.<file>.<group>.lock`` for its lifetime, and a
    second run of the same group is refused in one line (two runs writing one sidecar would mix);
  * when every unit is done, the sidecar's group plus the arrays derived from it move into the main
    file through the atomic edit above, and the sidecar is deleted. A kill before the replace leaves
    the sidecar to resume from; one after it leaves both, and a resume moves the same group again.

  A journal of checksummed records next to the file would also survive kills; writing raw bytes in
  place keeps one format, readable by h5py at every moment, and costs nothing per write.
- :func:`check_resume` is the one place that decides whether stored results may be resumed or reused
  (same checkpoint, dataset, evaluation set, seed and options).
- Attributes that are dicts or lists are stored as JSON strings and decoded on read.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import math
import os
import platform
import shutil
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import h5py
import numpy as np

from landscape.errors import LandscapeError

_JSON_PREFIXES = ("{", "[")
# the attributes that say what a result was computed from, compared by check_resume (with ``config``)
RESUME_KEYS = {"checkpoint_sha256": "checkpoint", "dataset": "dataset", "eval_set": "evaluation set", "seed": "seed"}
_MISSING = object()


def _open(path: str | Path, mode: str) -> h5py.File:
    try:
        return h5py.File(path, mode)
    except OSError as exc:
        if mode == "r" and not Path(path).exists():
            raise LandscapeError(f"results file {path} does not exist; check the path or run the analysis first") from None
        raise LandscapeError(f"cannot open {path} as HDF5 ({exc.__class__.__name__}); "
                             "the file is corrupt or not a results file: move it aside or choose another --out") from None


def encode_attr(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, sort_keys=True, default=str)
    return value


def decode_attr(value: Any) -> Any:
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
        group.attrs[key] = encode_attr(value)
    for name, value in arrays.items():
        if isinstance(value, Mapping):
            _write_tree(group.create_group(name), value, {})
        else:
            group.create_dataset(name, data=np.asarray(value))


def _read_tree(group: h5py.Group) -> tuple[dict[str, Any], dict[str, Any]]:
    arrays: dict[str, Any] = {}
    for name, item in group.items():
        arrays[name] = _read_tree(item)[0] if isinstance(item, h5py.Group) else item[()]
    return arrays, {k: decode_attr(v) for k, v in group.attrs.items()}


def fsync(path: Path) -> None:
    """Flush ``path`` (a file or a folder, e.g. after a rename in it) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _side(path: Path, suffix: str) -> Path:
    """The hidden side file ``.<name><suffix>`` next to ``path``."""
    return path.with_name(f".{path.name}{suffix}")


@contextlib.contextmanager
def _writer_lock(path: Path) -> Iterator[None]:
    """Hold the lock of ``path``'s writers (``.<name>.lock``), waiting (and saying so) while another process has it."""
    with open(_side(path, ".lock"), "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another landscape process writing {path} ...", file=sys.stderr, flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _claim(lock: Path, what: str) -> IO[str]:
    """Take the lock file ``lock`` for this process (its pid written in it) or refuse while another holds it."""
    handle = open(lock, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip()
        handle.close()
        raise LandscapeError(f"another landscape process{f' (pid {holder})' if holder else ''} is computing {what}; "
                             "wait for it to finish (then --resume), or choose another --out") from None
    handle.truncate(0)
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


@contextlib.contextmanager
def _atomic_edit(path: str | Path) -> Iterator[h5py.File]:
    """Open a temporary copy of ``path`` (or a new file) for writing; replace ``path`` on success.

    The whole read-modify-replace holds the writers' lock of ``path``, so concurrent edits follow
    one another instead of one replacing the other's work."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _side(path, ".tmp")  # one editor at a time (the lock), so a fixed name; a killed one's is overwritten
    with _writer_lock(path):
        if path.exists():
            _open(path, "r").close()
            shutil.copy2(path, tmp)
        else:
            tmp.unlink(missing_ok=True)
        try:
            with h5py.File(tmp, "a") as handle:
                yield handle
            fsync(tmp)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, path)
        fsync(path.parent)


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
        return {name: {k: decode_attr(v) for k, v in item.attrs.items()} for name, item in handle.items()}


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


def _plain(value: Any) -> Any:
    """``value`` as it reads back from an attribute (JSON types), for comparisons."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return f"{text[:12]}…" if len(text) > 12 else text or "none"


def check_resume(where: str, stored: Mapping[str, Any], wanted: Mapping[str, Any]) -> None:
    """Refuse, in one line naming what differs, to resume or reuse ``where`` when the attributes
    ``wanted`` (as :func:`provenance` makes them) name another checkpoint, dataset, evaluation set,
    seed or options than the decoded ``stored`` ones. Keys missing from ``wanted`` (or from its
    ``config``) are not compared."""
    differences = []
    for key, label in RESUME_KEYS.items():
        if key in wanted and _plain(stored.get(key, "")) != _plain(wanted[key]):
            differences.append(f"another {label} ({_short(wanted[key])} here, {_short(stored.get(key, ''))} stored)")
    config = stored.get("config") if isinstance(stored.get("config"), Mapping) else {}
    options = _plain(wanted.get("config", {}))
    changed = sorted(key for key in options if config.get(key, _MISSING) != options[key])
    if changed:
        differences.append(f"options differ ({', '.join(changed)})")
    if differences:
        raise LandscapeError(f"cannot resume {where}: {'; '.join(differences)}; rerun with what it was computed "
                             "from, or pass --overwrite to start over")


def resume_complete(path: str | Path, group: str, wanted: Mapping[str, Any], *, resume: bool,
                    overwrite: bool) -> bool:
    """Whether ``path`` already holds ``/group`` complete and ``resume`` may reuse it.

    False when there is nothing to reuse, with ``overwrite``, or while the group's sidecar (see
    :class:`IncrementalGroup`) waits to be resumed; an existing group is refused
    without ``resume``, and with it unless :func:`check_resume` accepts ``wanted``."""
    path = Path(path)
    if overwrite or not path.exists() or sidecar(path, group).exists():
        return False  # (a sidecar: the run was killed while moving its group in; resuming it moves it again)
    with _open(path, "r") as handle:
        if group not in handle:
            return False
        if not resume:
            _refuse_existing(handle, path, group, False)
        check_resume(f"/{group} of {path}", {k: decode_attr(v) for k, v in handle[group].attrs.items()}, wanted)
    return True


def sidecar(path: str | Path, group: str) -> Path:
    """The file ``<path>.<group>.partial`` in which :class:`IncrementalGroup` builds ``/group`` of ``path``."""
    path = Path(path)
    return path.with_name(f"{path.name}.{group}.partial")


def pwrite(fd: int, data: np.ndarray, offset: int) -> None:
    """Write all of ``data``'s bytes at ``offset`` of ``fd`` (one system call unless it comes back short)."""
    view = memoryview(np.ascontiguousarray(data)).cast("B")
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


class IncrementalGroup:
    """A result computed unit by unit (a grid point, a batch, a radius) that survives being killed
    at any moment (see the module docstring for how).

    Units are numbered by their flat row-major index in ``unit_shape``; :meth:`write` stores a run of
    consecutive units.

    Args:
        path: the main results file.
        group: the group name, e.g. ``surface``.
        datasets: ``{name: trailing_shape}`` per unit; stored float64, NaN-filled, with shape
            ``unit_shape + trailing_shape``.
        unit_shape: the grid of units, e.g. ``(51, 51)``.
        attrs: provenance and config; a resume must present the same (see :func:`check_resume`).
        static: arrays known up front (coordinates, directions), written once.
        resume: continue a partial run (or accept an already complete group).
        overwrite: discard a partial run and/or an existing group.
    """

    def __init__(self, path: str | Path, group: str, datasets: Mapping[str, tuple[int, ...]],
                 unit_shape: tuple[int, ...], attrs: Mapping[str, Any], static: Mapping[str, Any] | None = None,
                 resume: bool = False, overwrite: bool = False) -> None:
        self.path, self.group, self.unit_shape = Path(path), group, tuple(unit_shape)
        self.datasets = {name: tuple(trailing) for name, trailing in datasets.items()}
        self.partial = sidecar(self.path, group)
        self.complete = False
        self.fd: int | None = None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock: IO[str] | None = _claim(_side(self.path, f".{group}.lock"), f"/{group} of {self.path}")
        try:
            self._start(attrs, dict(static or {}), resume, overwrite)
        except BaseException:
            self.close()
            raise

    def _start(self, attrs: Mapping[str, Any], static: dict[str, Any], resume: bool, overwrite: bool) -> None:
        if self.partial.exists():
            if not (resume or overwrite):
                raise LandscapeError(f"an interrupted run left {self.partial}; pass --resume to continue it "
                                     "or --overwrite to start over")
            if overwrite:
                self.partial.unlink()
        if not self.partial.exists():
            if resume_complete(self.path, self.group, attrs, resume=resume, overwrite=overwrite):
                self.complete = True
                self.close()  # nothing to write: let other runs of this group go
                return
            self._create(attrs, static)
        with _open(self.partial, "r") as handle:
            check_resume(str(self.partial), {k: decode_attr(v) for k, v in handle.attrs.items()}, attrs)
            self.offsets = self._layout(handle)
            self._done = handle["done"][()]
        self.fd = os.open(self.partial, os.O_RDWR)

    def _create(self, attrs: Mapping[str, Any], static: Mapping[str, Any]) -> None:
        """Lay the sidecar out completely under a temporary name, flush it to the disk, rename it into place."""
        tmp = _side(self.partial, ".tmp")  # this group's lock is held, so a fixed name; a killed one's is overwritten
        with h5py.File(tmp, "w") as root:
            _write_tree(root, static, attrs)
            for name, trailing in {**self.datasets, "done": ()}.items():
                plist = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
                plist.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)  # storage and fill written now, never later
                root.create_dataset(name, shape=self.unit_shape + trailing, dtype=bool if name == "done" else "<f8",
                                    fillvalue=False if name == "done" else np.nan, dcpl=plist)
        fsync(tmp)
        os.replace(tmp, self.partial)
        fsync(self.partial.parent)

    def _layout(self, handle: h5py.File) -> dict[str, int]:
        """Byte offset of each dataset's raw data; refuses a sidecar not laid out for this run."""
        offsets = {}
        for name, trailing in {**self.datasets, "done": ()}.items():
            item = handle.get(name)
            dtype = np.dtype(bool) if name == "done" else np.dtype("<f8")
            offset = (item.id.get_offset() if isinstance(item, h5py.Dataset) and item.chunks is None
                      and item.shape == self.unit_shape + trailing and item.dtype == dtype else None)
            if offset is None:
                raise LandscapeError(f"{self.partial} is not laid out for this run ({name}; an older version "
                                     "made it?); pass --overwrite to start over")
            offsets[name] = int(offset)
        return offsets

    @property
    def done(self) -> np.ndarray:
        """Which units are written, shaped ``unit_shape``."""
        if self.complete:
            return np.ones(self.unit_shape, dtype=bool)
        return self._done.copy()

    def write(self, start: int, values: Mapping[str, Any]) -> None:
        """Store consecutive units from the flat index ``start`` on (``values[name]`` shaped
        ``(units,) + trailing_shape``) and then mark them done: one ``pwrite`` per dataset, then one
        for the ``done`` bytes. Durable against the process being killed once it returns."""
        if set(values) != set(self.datasets):
            raise ValueError(f"write needs exactly the values {sorted(self.datasets)}, got {sorted(values)}")
        counts = set()
        for name, trailing in self.datasets.items():
            data = np.asarray(values[name], dtype="<f8").reshape(-1, *trailing)
            counts.add(len(data))
            if len(counts) > 1 or not 0 <= start <= start + len(data) <= self._done.size:
                raise ValueError(f"units {start}..{start + len(data) - 1} of {name} do not fit the grid of "
                                 f"{self._done.size} units or the other values")
            pwrite(self.fd, data, self.offsets[name] + start * data.itemsize * math.prod(trailing))
        count = counts.pop()
        pwrite(self.fd, np.ones(count, dtype=bool), self.offsets["done"] + start)
        self._done.reshape(-1)[start:start + count] = True

    def arrays(self) -> dict[str, Any]:
        """Everything written so far (NaN where not done)."""
        if self.complete:
            return read_group(self.path, self.group)[0]
        with _open(self.partial, "r") as handle:
            return _read_tree(handle)[0]

    def finalize(self, arrays: Mapping[str, Any] | None = None, attrs: Mapping[str, Any] | None = None) -> None:
        """Move the finished group, plus ``arrays`` and ``attrs`` derived from its units, into the main
        file in one atomic write, and delete the sidecar."""
        if self.complete:
            return
        missing = int((~self._done).sum())
        if missing:
            raise LandscapeError(f"{missing} units of /{self.group} are not done; resume the run to finish them")
        with _open(self.partial, "r") as source, _atomic_edit(self.path) as target:
            _refuse_existing(target, self.path, self.group, True)
            group = target.create_group(self.group)
            for key, value in source.attrs.items():
                group.attrs[key] = value
            for name in source:
                source.copy(source[name], group, name=name)
            _write_tree(group, dict(arrays or {}), dict(attrs or {}))
        self.partial.unlink()
        fsync(self.partial.parent)
        self.complete = True
        self.close()

    def close(self) -> None:
        """Release the sidecar and this group's lock (idempotent)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self._lock is not None:
            self._lock.close()
            self._lock = None


class MemoryGroup:
    """In-memory stand-in for :class:`IncrementalGroup` when no output file is given.

    ``datasets`` is ``{name: trailing_shape}`` per unit as for :class:`IncrementalGroup`, or a
    sequence of names of scalar values.
    """

    def __init__(self, datasets: Mapping[str, tuple[int, ...]] | Sequence[str], unit_shape: tuple[int, ...],
                 static: Mapping[str, Any]) -> None:
        self.unit_shape = tuple(unit_shape)
        trailing = dict(datasets) if isinstance(datasets, Mapping) else dict.fromkeys(datasets, ())
        self.values = {name: np.full(self.unit_shape + tuple(shape), np.nan) for name, shape in trailing.items()}
        self.done = np.zeros(unit_shape, dtype=bool)
        self.static = dict(static)

    def write(self, start: int, values: Mapping[str, Any]) -> None:
        """Store consecutive units from the flat index ``start`` on."""
        for name, value in values.items():
            units = self.values[name].reshape(self.done.size, -1)
            value = np.asarray(value, dtype=np.float64).reshape(-1, units.shape[1])
            units[start:start + len(value)] = value
            self.done.reshape(-1)[start:start + len(value)] = True

    def arrays(self) -> dict[str, Any]:
        return {**self.static, **self.values, "done": self.done.copy()}

    def finalize(self, arrays: Mapping[str, Any] | None = None, attrs: Mapping[str, Any] | None = None) -> None:
        """Nothing to move: the values are already in memory."""

    def close(self) -> None:
        """Nothing to release."""
