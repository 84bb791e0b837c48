"""Stored results in other tools' formats: ``export(results, fmt, out)``.

``FORMATS`` is the registry of formats: a name, a one-line description, the suffix of the files it
writes, and ``write(results, out)``, which reads what it needs from the results file and writes
``out``. A new format is one function decorated with :func:`register`; the ``landscape export``
command offers every registered format.

``tg``: the surface file of Li et al.'s loss-landscape code (github.com/tomgoldstein/loss-landscape),
which their ``plot_2D.py``, ``plot_1D.py`` and ``h52vtp.py`` read. Their rules, and what this writes:

- datasets at the file's root: ``xcoordinates`` (``ycoordinates`` for 2-D) and ``<split>_loss``,
  ``<split>_acc`` for each stored split (``train``, ``test``);
- 2-D values shaped (len(y), len(x)) with Z[i, j] the value at (x[j], y[i]), the orientation of
  ``X, Y = np.meshgrid(x, y)`` that their plots and ``h52vtp.py`` pair Z with (``/surface`` stores
  the transpose, x along axis 0);
- accuracy in percent (their ``evaluation.eval_loss`` returns 100 * correct / total; ``/surface``
  stores a fraction);
- groups ``xdirection`` (``ydirection``) holding one dataset per parameter, named ``"0"``, ``"1"``, ...
  in the model's parameter order and shaped like it, as their ``h5_util.read_list`` reads a direction
  (the group attribute ``names`` gives the parameter names). Give the file as their ``--dir_file`` too.
Their ``plot_1D.py`` needs ``train_loss``; ``h52vtp.py`` assumes a square grid.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from landscape.errors import LandscapeError
from landscape.store import read_group

Writer = Callable[[Path, Path], None]  # (results file, output file)


@dataclass(frozen=True)
class ExportFormat:
    """A registry entry: the format's name, what it is for, its file suffix and its writer."""

    name: str
    description: str
    suffix: str
    write: Writer


FORMATS: dict[str, ExportFormat] = {}


def register(name: str, description: str, suffix: str) -> Callable[[Writer], Writer]:
    """Decorator: register ``write(results, out)`` as the export format ``name``."""
    def add(write: Writer) -> Writer:
        FORMATS[name] = ExportFormat(name, description, suffix, write)
        return write
    return add


def default_path(results: str | Path, fmt: str) -> Path:
    """``<results stem>_<fmt><suffix>`` next to the results file, e.g. ``runs/sam_tg.h5``."""
    results = Path(results)
    return results.with_name(f"{results.stem}_{fmt}{_format(fmt).suffix}")


def _format(fmt: str) -> ExportFormat:
    if fmt not in FORMATS:
        raise LandscapeError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return FORMATS[fmt]


def export(results: str | Path, fmt: str, out: str | Path | None = None, *, overwrite: bool = False) -> Path:
    """Write the results file ``results`` in the format ``fmt`` to ``out`` (default: :func:`default_path`).

    The file appears whole or not at all (written under a temporary name, then renamed). An
    existing ``out`` is replaced only with ``overwrite``. Returns the path written.
    """
    writer = _format(fmt).write
    results = Path(results)
    if not results.is_file():
        raise LandscapeError(f"results file {results} does not exist; check the path or run the analysis first")
    out = default_path(results, fmt) if out is None else Path(out)
    if out.exists() and out.resolve() == results.resolve():
        raise LandscapeError(f"--out {out} is the results file itself; choose another path")
    if out.exists() and not overwrite:
        raise LandscapeError(f"{out} already exists; pass --overwrite to replace it or choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        writer(results, partial)
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    return out


@register("tg", "Li et al.'s loss-landscape surface file: their plot_2D.py, plot_1D.py and h52vtp.py read it "
                "(from /surface)", ".h5")
def write_loss_landscape(results: Path, out: Path) -> None:
    """``/surface`` of ``results`` as the surface file of Li et al.'s code (see the module docstring)."""
    arrays, attrs = read_group(results, "surface")
    two_d = "ycoordinates" in arrays
    splits = [name.removesuffix("_loss") for name in arrays if name.endswith("_loss")]
    with h5py.File(out, "w") as handle:
        handle.attrs["exported_from"] = str(results)
        for axis in ("xcoordinates", "ycoordinates") if two_d else ("xcoordinates",):
            handle.create_dataset(axis, data=np.asarray(arrays[axis], dtype=np.float64))
        for split in splits:
            loss, accuracy = (np.asarray(arrays[f"{split}_{m}"], dtype=np.float64) for m in ("loss", "acc"))
            handle.create_dataset(f"{split}_loss", data=loss.T if two_d else loss)
            handle.create_dataset(f"{split}_acc", data=100.0 * (accuracy.T if two_d else accuracy))
        names, shapes = attrs["direction_names"], attrs["direction_shapes"]
        offsets = np.cumsum([0] + [int(np.prod(shape)) for shape in shapes])
        for key in ("xdirection", "ydirection") if two_d else ("xdirection",):
            flat = np.asarray(arrays[key])
            group = handle.create_group(key)
            group.attrs["names"] = names
            for index, shape in enumerate(shapes):
                group.create_dataset(str(index), data=flat[offsets[index]:offsets[index + 1]].reshape(shape))
