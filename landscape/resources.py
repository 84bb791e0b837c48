"""Sizes of a run before it starts: refuse what cannot fit in memory or on disk, and say how long the rest takes."""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

from landscape.errors import LandscapeError

_CGROUP = Path("/sys/fs/cgroup")


def available_memory() -> float:
    """Bytes of memory this process can still get: ``MemAvailable`` of ``/proc/meminfo`` (else the
    free pages ``os.sysconf`` reports), within a cgroup v2 limit; ``inf`` when unknown."""
    available = math.inf
    try:
        with open("/proc/meminfo") as handle:
            available = next(int(line.split()[1]) * 1024 for line in handle if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            pass
    try:
        limit = (_CGROUP / "memory.max").read_text().strip()
        if limit != "max":
            available = min(available, int(limit) - int((_CGROUP / "memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return available


def free_disk(path: str | Path) -> float:
    """Free bytes on the file system that holds (or would hold) ``path``."""
    folder = Path(path).absolute().parent
    while not folder.exists():
        folder = folder.parent
    return float(shutil.disk_usage(folder).free)


def size(nbytes: float) -> str:
    """``12.3 GB`` (decimal units)."""
    units = ("B", "kB", "MB", "GB", "TB", "PB")
    power = min(len(units) - 1, int(math.log10(max(nbytes, 1.0)) // 3))
    return f"{nbytes / 1000 ** power:.{1 if power else 0}f} {units[power]}"


def duration(seconds: float) -> str:
    """``3.2 s``, ``12.5 min``, ``40.2 h`` (up to two days) or ``3.1 days``."""
    for unit, span, after in (("days", 86400.0, 172800.0), ("h", 3600.0, 3600.0), ("min", 60.0, 60.0)):
        if seconds >= after:
            return f"{seconds / span:.1f} {unit}"
    return f"{seconds:.1f} s"


def require(what: str, fix: str, memory: float = 0.0, disk: float = 0.0, where: str | Path | None = None) -> None:
    """Refuse ``what`` in one line (with ``fix``) when it needs more than the available ``memory``
    bytes, or more than the free ``disk`` bytes next to ``where``."""
    room = available_memory()
    if memory > room:
        raise LandscapeError(f"{what} needs ~{size(memory)} of memory and {size(room)} is available; {fix}")
    if disk and where is not None and disk > (free := free_disk(where)):
        raise LandscapeError(f"{what} needs ~{size(disk)} of disk next to {where} and {size(free)} is free; {fix}")


def estimate(points: int, seconds_per_point: float) -> str:
    """``~40.2 h for 1,000,000 points at 0.14 s/point``: how long ``points`` more will take."""
    return f"~{duration(points * seconds_per_point)} for {points:,} points at {seconds_per_point:.3g} s/point"
