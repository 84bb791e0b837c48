"""Multi-process runs on ``torch.distributed``, launched by ``torchrun``; a no-op in a single process.

- :func:`setup` joins the process group that ``torchrun`` describes in the environment (``RANK``,
  ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``). The backend follows the tensor:
  gloo for CPU tensors, NCCL for CUDA tensors (``"cpu:gloo,cuda:nccl"`` where CUDA exists). Every
  collective times out after :data:`TIMEOUT_S` seconds (``LANDSCAPE_DIST_TIMEOUT``) instead of hanging.
- Without ``torchrun`` (``WORLD_SIZE`` unset or 1) nothing is initialised: :func:`world_size` is 1,
  :func:`rank` 0, and every collective returns its input.
- Rank 0 writes results and prints; the others compute and stay silent except for errors.
  :func:`on_main` runs a step on rank 0 alone (opening or writing a results file) and gives every
  rank its value, or raises its error on every rank, so no rank waits for one that gave up.
- :func:`fail` and :func:`fail_together` make one rank's failure end every rank with the same exit
  code: the failing rank posts its message and code on the c10d store, a watchdog thread on every
  other rank sees it, rank 0 prints the message once, and all ranks exit together. Nobody waits for a
  collective timeout.

Call :func:`setup` (idempotent) before using the others; :func:`landscape.objective.load_objective`,
:func:`landscape.train.train_model` and the CLI do.
"""

from __future__ import annotations

import atexit
import datetime
import json
import os
import pickle
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

TIMEOUT_S = float(os.environ.get("LANDSCAPE_DIST_TIMEOUT", "600"))
WATCH_INTERVAL_S = 0.2
_ERROR_KEY = "landscape/error"


def launched() -> bool:
    """Whether this process is one of several started by ``torchrun`` (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    """Whether a process group of more than one process is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def setup() -> None:
    """Join torchrun's process group once (no-op when not launched, or already joined); it is left at the
    interpreter's exit (a process that exits holding it can abort: "terminate called without an active
    exception")."""
    if not launched() or dist.is_initialized():
        return
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=TIMEOUT_S))
    atexit.register(_leave)


def _leave() -> None:
    """Stop the watchdog and destroy the process group, if still there (at exit)."""
    stop_watchdog()
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single process): the rank that writes and prints."""
    return rank() == 0


def local_device() -> torch.device:
    """``cuda:LOCAL_RANK`` when CUDA is available (each rank its own GPU), else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())


def all_reduce_sum_(tensor: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """Sum ``tensor`` over all ranks (or those of ``group``), in place; returns it (unchanged in a single process).

    Every rank receives the same bits (gloo and NCCL reduce each element once and share the sum), which is
    what lets solvers run identically on every rank from reduced products."""
    if active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def all_reduce_sum_many_(tensors: Sequence[Tensor]) -> Sequence[Tensor]:
    """Sum each of ``tensors`` (one dtype and device) over all ranks in place, in ONE collective; returns them."""
    if active() and tensors:
        flat = all_reduce_sum_(torch.cat([t.reshape(-1) for t in tensors]))
        for tensor, part in zip(tensors, flat.split([t.numel() for t in tensors])):
            tensor.copy_(part.view_as(tensor))
    return tensors


def broadcast_object(value: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``value`` on every rank (picklable Python data; ``value`` itself in a single process)."""
    if not active():
        return value
    box = [value if rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_(tensor: Tensor, src: int = 0) -> Tensor:
    """Overwrite ``tensor`` with rank ``src``'s, in place; returns it (unchanged in a single process)."""
    if active():
        dist.broadcast(tensor, src=src)
    return tensor


def all_gather_object(value: Any) -> list[Any]:
    """Every rank's ``value`` (picklable Python data), in rank order, on every rank; ``[value]`` in a single process."""
    if not active():
        return [value]
    values: list[Any] = [None] * world_size()
    dist.all_gather_object(values, value)
    return values


def share(count: int) -> range:
    """The items (e.g. mini-batches) of ``count`` that this rank computes when items are shared out whole:
    every ``world_size()``-th one from its rank on (all of them in a single process)."""
    return range(rank(), count, world_size())


def gather_shares(arrays: Sequence[np.ndarray], axes: Sequence[int]) -> list[np.ndarray]:
    """``arrays`` with every rank's items merged, on every rank: item ``i`` along ``axes[k]`` of
    ``arrays[k]`` comes from the rank that computed it (see :func:`share`). ``arrays`` in a single process."""
    if not active():
        return list(arrays)
    merged = [np.array(array, copy=True) for array in arrays]
    for owner, part in enumerate(all_gather_object(list(arrays))):
        for target, source, axis in zip(merged, part, axes):
            index = (slice(None),) * axis + (slice(owner, None, world_size()),)
            target[index] = source[index]
    return merged


def barrier() -> None:
    if active():
        dist.barrier()


T = TypeVar("T")


def on_main(function: Callable[[], T]) -> T:
    """``function()`` run on rank 0 alone; its value on every rank (broadcast, so picklable), or, when it
    raises, the same exception raised on every rank (rank 0 raises the original). ``function()`` itself in a
    single process."""
    if not active():
        return function()
    outcome: tuple[bool, Any] | None = None
    failure: BaseException | None = None
    if is_main():
        try:
            outcome = (True, function())
        except Exception as error:  # noqa: BLE001 - handed to every rank, raised below
            failure = error
            outcome = (False, _portable(error))
    ok, value = broadcast_object(outcome)
    if not ok:
        raise failure if failure is not None else value
    return value


def _portable(error: Exception) -> Exception:
    """``error`` if it pickles, else a RuntimeError with its type and message."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001 - any unpicklable exception
        return RuntimeError(f"{type(error).__name__}: {error}")


_MAIN_DONE_KEY = "landscape/main-done"
_main_steps = [0]   # steps run by rank 0 alone so far in this process (the same count on every rank)


def wait_for_main() -> None:
    """On ranks other than 0: wait, with no timeout, until rank 0 calls :func:`main_done` for this step (a
    failure posted by rank 0 ends this process meanwhile, see :func:`fail_together`). For work that only
    rank 0 does, however long it takes (a command that computes nothing)."""
    if active() and not is_main():
        key = f"{_MAIN_DONE_KEY}/{_main_steps[0]}"
        _main_steps[0] += 1
        while not store().check([key]):
            time.sleep(WATCH_INTERVAL_S)


def main_done() -> None:
    """On rank 0: let the ranks waiting in :func:`wait_for_main` for this step go."""
    if active() and is_main():
        store().set(f"{_MAIN_DONE_KEY}/{_main_steps[0]}", "1")
        _main_steps[0] += 1


def store() -> dist.Store:
    """The job's c10d key-value store (only while :func:`active`)."""
    return dist.distributed_c10d._get_default_store()


def shard_range(count: int, index: int | None = None, parts: int | None = None) -> tuple[int, int]:
    """This rank's contiguous share ``[start, stop)`` of ``count`` items: sizes differ by at most one.

    ``index``/``parts`` give the share of part ``index`` of ``parts`` instead (default: this rank of all ranks).
    """
    size = world_size() if parts is None else parts
    rank_ = rank() if index is None else index
    base, extra = divmod(count, size)
    start = rank_ * base + min(rank_, extra)
    return start, start + base + (rank_ < extra)


# ---------------------------------------------------------------------------------------------- failures

_EXIT_KEY = "landscape/exiting"
EXIT_WAIT_S = 5.0
_failing = threading.Event()  # set once this rank handles a failure (its own or a posted one)
_claim_lock = threading.Lock()
_watchdog: list[threading.Thread] = []  # the one watchdog thread of this process, once started
_stop_watching = threading.Event()


def fail(message: str, code: int, echo: Callable[[str], Any]) -> None:
    """End this run after a failure on this rank: rank 0 ``echo``es ``message``, every rank exits ``code``.

    In a single process this only echoes; the caller exits. Under torchrun the failure is posted on the
    store (the first posted failure wins, and a rank failing after it, e.g. because of it, reports and
    exits with the first one's message and code), so the other ranks' watchdogs end them too (see
    :func:`fail_together`), and every rank leaves together with :func:`exit_together`.
    """
    if not active():
        echo(message)
        return
    if not _claim():  # the watchdog is already ending this rank with another rank's failure
        while True:
            time.sleep(WATCH_INTERVAL_S)
    try:
        posted = store().compare_set(_ERROR_KEY, "", json.dumps({"rank": rank(), "code": int(code),
                                                                 "message": message}))
        first = json.loads(posted.decode())
        message, code = first["message"], first["code"]
    except Exception:  # noqa: BLE001 - the store may already be gone; the launcher ends the job then
        pass
    if is_main():
        echo(message)
    exit_together(code)


def _claim() -> bool:
    """True for the first caller only (this rank's own failure or its watchdog), which alone reports and exits."""
    with _claim_lock:
        if _failing.is_set():
            return False
        _failing.set()
        return True


def posted_failure() -> dict[str, Any] | None:
    """The failure some rank posted, if any: ``{"rank", "code", "message"}``."""
    if not active():
        return None
    try:
        kv = store()
        if not kv.check([_ERROR_KEY]):
            return None
        return json.loads(kv.get(_ERROR_KEY).decode())
    except Exception:  # noqa: BLE001 - no store, no posted failure
        return None


def exit_together(code: int) -> None:
    """Exit with ``code`` once every rank is exiting (or after :data:`EXIT_WAIT_S`), so that the launcher
    sees the same code from every rank instead of terminating the slower ones."""
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        kv = store()
        kv.add(_EXIT_KEY, 1)
        deadline = time.monotonic() + EXIT_WAIT_S
        while kv.add(_EXIT_KEY, 0) < world_size() and time.monotonic() < deadline:
            time.sleep(0.02)
    except Exception:  # noqa: BLE001 - without a store there is nobody to wait for
        pass
    os._exit(int(code))


def fail_together(echo: Callable[[str], Any]) -> None:
    """Start a watchdog thread that ends this process when another rank posts a failure.

    Rank 0 ``echo``es the posted message; every rank exits with the posted code. Idempotent while it
    runs (see :func:`stop_watchdog`); a no-op in a single process.
    """
    if not active() or any(thread.is_alive() for thread in _watchdog):
        return
    _stop_watching.clear()

    def watch() -> None:
        while not _failing.is_set() and not _stop_watching.is_set():
            failure = posted_failure()
            if failure is not None and _claim():
                if is_main():
                    echo(failure["message"])
                exit_together(failure["code"])
            _stop_watching.wait(WATCH_INTERVAL_S)

    _watchdog[:] = [threading.Thread(target=watch, name="landscape-fail-together", daemon=True)]
    _watchdog[0].start()


def stop_watchdog() -> None:
    """Stop the watchdog of :func:`fail_together` and wait for it, before this process exits normally (a
    daemon thread inside a store call while the interpreter shuts down can abort the process)."""
    _stop_watching.set()
    for thread in _watchdog:
        thread.join()
