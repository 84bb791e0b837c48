"""glibc's malloc tuned for evaluating many points: :func:`tune_allocator`, an explicit process-wide setting."""

from __future__ import annotations

import ctypes
import functools


@functools.cache
def tune_allocator() -> None:
    """Stop glibc from handing freed memory back to the OS after every few-MiB tensor (once per process).

    Stacked points (see :class:`landscape.engine.evaluator.PointEvaluator`) allocate and free
    several MiB per layer and forward; glibc's default trimming then returns the heap top and takes
    fresh zeroed pages for the next tensor, which doubles the time of a small MLP surface on the CPU
    at random. After this call allocations under 32 MiB stay on the heap and up to 256 MiB of free
    heap is kept. It changes the whole process's allocator, so nothing in the library calls it: the
    commands that evaluate points (``landscape surface``, ``interpolate``, ``radius``, ``sharpness``,
    ``reproduce``) and ``benchmarks/surface.py`` do, and a Python session may. Values are unchanged;
    no effect outside glibc.
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    mallopt(-1, 256 * 2**20)  # M_TRIM_THRESHOLD
    mallopt(-3, 32 * 2**20)   # M_MMAP_THRESHOLD
