"""Stored results in other tools' formats: ``export(results, fmt, out, **options)``.

``FORMATS`` is the registry of formats (a :class:`~landscape.registry.Registry`): a name, a one-line
description, the suffix of the files it writes, the options it takes, and ``write(results, out, **options)``,
which reads what it needs from the results file and writes ``out``. A new format is one function decorated with :func:`register`;
the ``landscape export`` command offers every registered format.

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

``vtp``: ``/surface`` as a ParaView PolyData XML file (ASCII), any grid shape. Point p = i * len(y) + j
is (x[i], y[j], z), z the height drawn; one quad per grid cell, corners (i, j), (i+1, j), (i+1, j+1),
(i, j+1) (counter-clockwise seen from +z); a 1-D surface is one polyline through (x[i], 0, z). The
height follows Li et al.'s ``h52vtp.py``: the metric (their ``--surf_name``; default the first stored
loss) clipped at ``zmax``, then ``ln(z + 0.1)`` with ``log``. A non-finite (divergent) value is drawn
at the top, ``zmax`` or else the largest finite value, and flagged by the point array ``divergent``
(1; ParaView's Threshold filter removes those points). Point data: ``z`` (the height), ``divergent``
and every stored array shaped like the grid under its stored name, exactly as stored (NaN as ``nan``).

``csv`` and ``npz``: ``/surface`` (or ``/interpolation``) as plain tables, values exact.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

import h5py
import numpy as np

from landscape.errors import LandscapeError
from landscape.plotting.surface_data import metric as surface_metric
from landscape.registry import Registry
from landscape.store import read_group

Writer = Callable[..., None]  # (results file, output file, **options)
TABLE_GROUPS = ("surface", "interpolation")


@dataclass(frozen=True)
class ExportFormat:
    """A registry entry: the format's name, what it is for, its file suffix, the options its writer
    takes, and the writer."""

    name: str
    description: str
    suffix: str
    options: tuple[str, ...]
    write: Writer


FORMATS: Registry[ExportFormat] = Registry("export format")


def register(name: str, description: str, suffix: str, options: tuple[str, ...] = ()) -> Callable[[Writer], Writer]:
    """Decorator: register ``write(results, out, **options)`` as the export format ``name`` (once)."""
    def add(write: Writer) -> Writer:
        FORMATS.register(name, ExportFormat(name, description, suffix, options, write))
        return write
    return add


def default_path(results: str | Path, fmt: str) -> Path:
    """Next to the results file: ``<stem><suffix>`` (``runs/sam.vtp``), or ``<stem>_<fmt><suffix>``
    when the format's suffix is the results file's own (``runs/sam_tg.h5``)."""
    results, suffix = Path(results), FORMATS.get(fmt).suffix
    return results.with_name(f"{results.stem}_{fmt}{suffix}" if suffix == results.suffix else f"{results.stem}{suffix}")


def export(results: str | Path, fmt: str, out: str | Path | None = None, *, overwrite: bool = False,
           **options: Any) -> Path:
    """Write the results file ``results`` in the format ``fmt`` to ``out`` (default: :func:`default_path`).

    ``options`` (None or False: not given) go to the format's writer: ``metric``, ``log``, ``zmax``
    for ``vtp``; ``group`` for ``csv`` and ``npz``. The file appears whole or not at all (written
    under a temporary name, then renamed). An existing ``out`` is replaced only with ``overwrite``.
    Returns the path written.
    """
    entry = FORMATS.get(fmt)
    given = {key: value for key, value in options.items() if value is not None and value is not False}
    for key in given:
        if key not in entry.options:
            takers = [name for name, other in FORMATS.items() if key in other.options]
            raise LandscapeError(f"--{key} does not apply to --format {fmt}; it applies to "
                                 f"{', '.join(takers) or 'no format'}")
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
        entry.write(results, partial, **given)
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


# ----------------------------------------------------------------------------------------- grids and tables

def _read_grid(results: Path, group: str) -> tuple[list[tuple[str, np.ndarray]], dict[str, np.ndarray],
                                                  dict[str, Any], dict[str, Any]]:
    """``/group``'s axes ``[(stored name, values)]``, its arrays shaped like the grid they span (stored
    order, not the directions or trajectories), and all its arrays and attributes."""
    if group not in TABLE_GROUPS:
        raise LandscapeError(f"--group {group} cannot be exported as a table; choose one of {', '.join(TABLE_GROUPS)}")
    arrays, attrs = read_group(results, group)
    names = ("xcoordinates", "ycoordinates") if group == "surface" else ("alphas",)
    axes = [(name, np.asarray(arrays[name])) for name in names if name in arrays]
    if not axes:
        raise LandscapeError(f"/{group} of {results} has no {names[0]}; it is not a {group} result: "
                             f"run `landscape {group}` again")
    shape = tuple(len(values) for _, values in axes)
    grid = {name: np.asarray(value) for name, value in arrays.items()
            if name not in names and name not in ("xdirection", "ydirection") and not name.startswith("trajectory_")
            and not isinstance(value, Mapping) and np.shape(value) == shape}
    return axes, grid, arrays, attrs


def _text(value: Any) -> str:
    """A number as text that reads back exactly: shortest round-trip repr for floats, 0/1 for booleans."""
    if isinstance(value, (float, np.floating)):
        return repr(float(value))
    return str(int(value))


def _meshgrid(axes: list[tuple[str, np.ndarray]]) -> list[np.ndarray]:
    """Each axis' coordinate at every grid point, flattened in the stored arrays' (C) order."""
    return [c.ravel() for c in np.meshgrid(*(values for _, values in axes), indexing="ij")]


@register("csv", "a table, one row per point: x, y (or alpha), one column per stored array, exact floats", ".csv",
          ("group",))
def write_csv(results: Path, out: Path, group: str = "surface") -> None:
    """One row per grid point (x along the slow axis), one column per coordinate and stored array."""
    axes, grid, _, _ = _read_grid(results, group)
    header = ["alpha"] if group == "interpolation" else ["x", "y"][:len(axes)]
    columns = [*_meshgrid(axes), *(values.ravel() for values in grid.values())]
    with open(out, "w", newline="\n") as handle:
        handle.write(",".join([*header, *grid]) + "\n")
        for row in zip(*columns):
            handle.write(",".join(map(_text, row)) + "\n")


@register("npz", "numpy arrays under their stored names (coordinates, stored arrays, trajectories)", ".npz",
          ("group",))
def write_npz(results: Path, out: Path, group: str = "surface") -> None:
    """The axes, the grid-shaped arrays and the ``trajectory_*`` arrays (and labels) as stored."""
    axes, grid, arrays, attrs = _read_grid(results, group)
    paths = {name: np.asarray(value) for name, value in arrays.items() if name.startswith("trajectory_")}
    if "trajectory_labels" in attrs:
        paths["trajectory_labels"] = np.asarray(attrs["trajectory_labels"], dtype=str)
    with open(out, "wb") as handle:  # a file object: np.savez would append .npz to the temporary name
        np.savez(handle, **dict(axes), **grid, **paths)


# ----------------------------------------------------------------------------------------------------- vtp

def _heights(values: np.ndarray, log: bool, zmax: float | None) -> tuple[np.ndarray, np.ndarray]:
    """``(z, divergent)`` per point: the values clipped at ``zmax``, non-finite ones put at the top
    (``zmax`` or the largest finite value) and flagged, then ``ln(z + 0.1)`` with ``log``."""
    stored = np.asarray(values, dtype=np.float64).ravel()
    divergent = ~np.isfinite(stored)
    if divergent.all():
        raise LandscapeError("every point of the surface is divergent (inf/NaN); nothing to draw")
    if zmax is not None and not (np.isfinite(zmax) and zmax > 0):
        raise LandscapeError(f"--zmax must be a positive number (the highest z drawn), got {zmax}")
    top = float(stored[~divergent].max()) if zmax is None else zmax
    z = np.where(divergent, top, np.minimum(stored, top))
    if log:
        if z.min() <= -0.1:
            raise LandscapeError(f"--log draws ln(value + 0.1), but the surface reaches {z.min():.4g}; drop --log")
        z = np.log(z + 0.1)
    return z, divergent


def _data_array(name: str | None, values: np.ndarray, per_line: int) -> str:
    """One ASCII ``<DataArray>``; ``per_line`` values on each line (the components of a point or a cell)."""
    kind, bits = values.dtype.kind, 8 * values.dtype.itemsize
    vtk_type = {"f": f"Float{bits}", "b": "UInt8", "u": f"UInt{bits}", "i": f"Int{bits}"}[kind]
    attributes = f'type="{vtk_type}"' + (f" Name={quoteattr(name)}" if name else "")
    if values.ndim == 2:
        attributes += f' NumberOfComponents="{values.shape[1]}"'
    flat = values.ravel()
    lines = (" ".join(map(_text, flat[k:k + per_line])) for k in range(0, len(flat), per_line))
    return (f'        <DataArray {attributes} format="ascii">\n'
            + "".join(f"          {line}\n" for line in lines) + "        </DataArray>\n")


@register("vtp", "ParaView PolyData: /surface as quads, height --metric (--zmax, --log as Li et al.'s h52vtp.py)",
          ".vtp", ("metric", "log", "zmax"))
def write_vtp(results: Path, out: Path, metric: str | None = None, log: bool = False, zmax: float | None = None) -> None:
    """``/surface`` as a ParaView ``.vtp`` file (see the module docstring for the layout)."""
    axes, grid, _, _ = _read_grid(results, "surface")
    z, divergent = _heights(grid[surface_metric(grid, metric)], log, zmax)
    x, *rest = _meshgrid([(name, values.astype(np.float64)) for name, values in axes])
    points = np.column_stack([x, rest[0] if rest else np.zeros_like(x), z])
    if len(axes) == 2:
        nx, ny = len(axes[0][1]), len(axes[1][1])
        i, j = np.meshgrid(np.arange(nx - 1), np.arange(ny - 1), indexing="ij")
        corner = (i * ny + j).ravel()
        cells, kind = np.column_stack([corner, corner + ny, corner + ny + 1, corner + 1]), "Polys"
    else:
        cells, kind = np.arange(len(x))[None, :], "Lines"
    counts = {"Verts": 0, "Lines": 0, "Strips": 0, "Polys": 0, kind: len(cells)}
    point_data = {"z": z, "divergent": divergent.astype(np.uint8), **{n: v.ravel() for n, v in grid.items()}}
    with open(out, "w") as handle:
        handle.write('<?xml version="1.0"?>\n'
                     '<VTKFile type="PolyData" version="1.0" byte_order="LittleEndian" header_type="UInt64">\n'
                     "  <PolyData>\n"
                     f'    <Piece NumberOfPoints="{len(points)}" '
                     + " ".join(f'NumberOf{key}="{count}"' for key, count in counts.items()) + ">\n"
                     '      <PointData Scalars="z">\n')
        for name, values in point_data.items():
            handle.write(_data_array(name, values, 8))
        handle.write("      </PointData>\n      <Points>\n")
        handle.write(_data_array("Points", points, 3))
        handle.write(f"      </Points>\n      <{kind}>\n")
        handle.write(_data_array("connectivity", cells.ravel(), cells.shape[1]))
        handle.write(_data_array("offsets", cells.shape[1] * np.arange(1, len(cells) + 1, dtype=np.int64), 8))
        handle.write(f"      </{kind}>\n    </Piece>\n  </PolyData>\n</VTKFile>\n")
