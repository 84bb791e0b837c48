"""Result objects: what every analysis returns from Python. They save to and load from the store."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from landscape import distributed, store


class Result:
    """One analysis result: ``arrays`` (numpy) and ``attrs`` (scalars, provenance), stored as ``/group``."""

    group = "result"

    def __init__(self, arrays: Mapping[str, Any], attrs: Mapping[str, Any], group: str | None = None) -> None:
        self.arrays = dict(arrays)
        self.attrs = dict(attrs)
        if group is not None:
            self.group = group

    def __getitem__(self, key: str) -> Any:
        if key in self.arrays:
            return self.arrays[key]
        return self.attrs[key]

    def __contains__(self, key: str) -> bool:
        return key in self.arrays or key in self.attrs

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write this result as ``/group`` of the HDF5 file ``path`` (atomically). Under torchrun call it on
        every rank: rank 0 writes, and an error it meets is raised on every rank."""
        distributed.on_main(lambda: store.write_group(path, self.group, self.arrays, self.attrs, overwrite=overwrite))
        return Path(path)

    @classmethod
    def load(cls, path: str | Path, group: str | None = None) -> Result:
        arrays, attrs = store.read_group(path, group or cls.group)
        return cls(arrays, attrs, group=group or cls.group)

    def plot(self, out: str | Path | None = None, **options: Any):
        """Draw this result's figure; save it to ``out`` (PNG/PDF by suffix) when given."""
        from landscape.plotting import plot_group, save_figure
        figure = plot_group(self.arrays, self.attrs, self.group, **options)
        if out is not None:
            save_figure(figure, out)
        return figure

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}{tuple(getattr(v, 'shape', ()))}" for k, v in self.arrays.items()
                           if not isinstance(v, Mapping))
        return f"<{type(self).__name__} /{self.group}: {shapes}>"


def load_result(path: str | Path, group: str) -> Result:
    """Load any stored analysis as a generic :class:`Result`."""
    return Result.load(path, group)
