"""An objective's evaluation set: its examples, held in device or host memory, served as fixed batches.

:class:`~landscape.objective.Objective` batches come from here, and so do the point evaluator's.

:class:`EvalSet` holds rows ``start:stop`` of a whole set of N examples (all of them, or one rank's
contiguous share) and serves them as batches ``(x, y, weight)`` on the compute device, with
``weight = rows / N``: the batches of every rank's share together weigh 1, so sums over ranks of
per-share sums are means over the whole set. Where the rows are held (``placement``):

- ``device``: copied to the device once, in the compute dtype; a batch is a view.
- ``host``: kept in host memory (pinned when the device is a GPU) and copied to the device batch by
  batch with non-blocking copies, the next batch on a side CUDA stream while the current one is in
  use. For evaluation sets larger than the device's memory. On the CPU the host rows are the batches.
- ``auto``: ``device`` when the rows take at most :data:`DEVICE_SHARE` of the device's free memory
  (an estimate: their bytes in the compute dtype), else ``host``.

The rows are read from the given tensors when first used, so a set that is never iterated (a rank's
share, when an analysis needs the whole set) takes no device memory.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import Tensor

from landscape.errors import LandscapeError

PLACEMENTS = ("auto", "device", "host")
DEVICE_SHARE = 0.5  # auto: the rows go to the device when they take at most this share of its free memory

Batch = tuple[Tensor, Tensor, float]


def _cast(tensor: Tensor, device: torch.device, dtype: torch.dtype) -> Tensor:
    """A copy of ``tensor`` on ``device``; floating tensors in ``dtype``."""
    return tensor.detach().to(device, dtype if tensor.is_floating_point() else tensor.dtype, copy=True)


def _pinned_copy(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    """A copy of ``tensor`` (floating: in ``dtype``) in page-locked host memory, for fast asynchronous copies
    to a GPU; in ordinary host memory when the OS refuses to lock that much (then the copies are synchronous)."""
    dtype = dtype if tensor.is_floating_point() else tensor.dtype
    try:
        return torch.empty(tensor.shape, dtype=dtype, pin_memory=True).copy_(tensor)
    except RuntimeError:
        return _cast(tensor, torch.device("cpu"), dtype)


class Batches:
    """Batches that can be iterated again and again (each pass streams them anew) and indexed."""

    def __init__(self, make: Callable[[], Iterator[Batch]]) -> None:
        self.make = make

    def __iter__(self) -> Iterator[Batch]:
        return self.make()

    def __getitem__(self, index: int) -> Batch:
        return next(itertools.islice(self.make(), index, None))


class EvalSet:
    """Rows ``rows`` (default: all) of the examples ``inputs`` ``(N, ...)`` with labels ``targets`` ``(N,)``,
    served as batches of ``batch_size`` on ``device``, floating inputs in ``dtype``; see the module docstring.

    ``inputs`` and ``targets`` are kept as given (not copied) for :meth:`whole` and :meth:`select`.
    """

    def __init__(self, inputs: Tensor, targets: Tensor, *, device: torch.device, dtype: torch.dtype, batch_size: int,
                 placement: str = "auto", rows: tuple[int, int] | None = None) -> None:
        if placement not in PLACEMENTS:
            raise LandscapeError(f"unknown --data-on {placement!r}; use {', '.join(PLACEMENTS)}")
        self.all_inputs, self.all_targets = inputs, targets
        self.device, self.dtype, self.batch_size = torch.device(device), dtype, int(batch_size)
        self.total = len(inputs)
        self.start, self.stop = rows if rows is not None else (0, self.total)
        self.requested = placement
        self.placement = placement if placement != "auto" else self._automatic()
        self._held: tuple[Tensor, Tensor] | None = None
        self._whole: EvalSet | None = None

    def __len__(self) -> int:
        return self.stop - self.start

    def nbytes(self) -> int:
        """Bytes of the rows in the compute dtype (inputs and targets)."""
        x, y = self.all_inputs, self.all_targets
        item = torch.finfo(self.dtype).bits // 8 if x.is_floating_point() else x.element_size()
        return len(self) * (x[:1].numel() * item + y[:1].numel() * y.element_size())

    def _automatic(self) -> str:
        if self.device.type != "cuda":
            return "device"
        free = torch.cuda.mem_get_info(self.device)[0]
        return "device" if self.nbytes() <= DEVICE_SHARE * free else "host"

    @property
    def streamed(self) -> bool:
        """Whether each pass copies its batches to the device (host placement on a GPU)."""
        return self.placement == "host" and self.device.type != "cpu"

    def held(self) -> tuple[Tensor, Tensor]:
        """The rows (inputs in the compute dtype) where they are held: on the device, or in host memory."""
        if self._held is None:
            x, y = self.all_inputs[self.start:self.stop].detach(), self.all_targets[self.start:self.stop].detach()
            with torch.inference_mode(False):   # (first used inside inference mode, then under autograd)
                if self.streamed:
                    self._held = (_pinned_copy(x, self.dtype), _pinned_copy(y, y.dtype))
                else:
                    where = self.device if self.placement == "device" else torch.device("cpu")
                    self._held = (_cast(x, where, self.dtype), y.to(where, copy=True))
        return self._held

    def first(self, count: int) -> Tensor:
        """The first ``count`` inputs of the whole set on the device (to try the model on)."""
        return _cast(self.all_inputs[:count], self.device, self.dtype)

    def take(self, index: np.ndarray | Tensor) -> tuple[Tensor, Tensor]:
        """``(x, y)`` on the device for the examples ``index`` of the whole set (indices ``(n,)``)."""
        index = torch.as_tensor(np.asarray(index), dtype=torch.long)
        return (_cast(self.all_inputs[index.to(self.all_inputs.device)], self.device, self.dtype),
                self.all_targets[index.to(self.all_targets.device)].detach().to(self.device))

    def batches(self) -> Iterator[Batch]:
        """The fixed batches ``(x, y, rows / N)`` of the rows, in order, on the device."""
        x, y = self.held()
        bounds = [(s, min(s + self.batch_size, len(x))) for s in range(0, len(x), self.batch_size)]
        if self.placement == "device":
            return ((x[s:e], y[s:e], (e - s) / self.total) for s, e in bounds)
        return self._streamed(x, y, bounds)

    def _streamed(self, x: Tensor, y: Tensor, bounds: list[tuple[int, int]]) -> Iterator[Batch]:
        """Host rows to the device batch by batch; on a GPU the next batch is copied on a side stream
        while the current one is in use."""
        side = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

        def fetch(start: int, stop: int) -> tuple[Tensor, Tensor]:
            with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
                return (x[start:stop].to(self.device, non_blocking=True),
                        y[start:stop].to(self.device, non_blocking=True))

        upcoming = fetch(*bounds[0]) if bounds else None
        for i, (start, stop) in enumerate(bounds):
            batch = upcoming
            if side is not None:
                current = torch.cuda.current_stream(self.device)
                current.wait_stream(side)   # the copy has landed before the batch is used
                for tensor in batch:
                    tensor.record_stream(current)   # and its memory is not reused while it is in use
            upcoming = fetch(*bounds[i + 1]) if i + 1 < len(bounds) else None
            yield batch[0], batch[1], (stop - start) / self.total

    def whole(self) -> EvalSet:
        """The whole set (all N rows) with this placement request; ``self`` when it is the whole set."""
        if (self.start, self.stop) == (0, self.total):
            return self
        if self._whole is None:
            self._whole = self.part(0, self.total)
        return self._whole

    def part(self, start: int, stop: int) -> EvalSet:
        """Rows ``start:stop`` of the whole set (weights still over all N)."""
        return EvalSet(self.all_inputs, self.all_targets, device=self.device, dtype=self.dtype,
                       batch_size=self.batch_size, placement=self.requested, rows=(start, stop))

    def select(self, index: np.ndarray) -> EvalSet:
        """A new whole set of the examples ``index`` ``(n,)`` of this whole set, in that order (a run of
        consecutive examples is a slice, which keeps the tensors' memory layout and so every bit of the
        results)."""
        index = np.asarray(index)
        if np.array_equal(index, np.arange(index[0], index[0] + len(index))):
            x, y = self.all_inputs[index[0]:index[0] + len(index)], self.all_targets[index[0]:index[0] + len(index)]
        else:
            rows = torch.as_tensor(index, dtype=torch.long)
            x, y = self.all_inputs[rows.to(self.all_inputs.device)], self.all_targets[rows.to(self.all_targets.device)]
        return EvalSet(x, y, device=self.device, dtype=self.dtype, batch_size=self.batch_size,
                       placement=self.requested)
