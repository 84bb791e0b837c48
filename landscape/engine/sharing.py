"""A grid's pending blocks shared out among the ranks of a torchrun job, written by rank 0.

:func:`landscape.engine.runner.run_group` uses this when several ranks run; in one process it never is.

- Rank 0 owns the sink (the crash-safe sidecar of :class:`landscape.store.IncrementalGroup`). It lists
  the pending blocks once, from the sink's ``done`` mask, and broadcasts them with a key naming the run.
- Every rank, rank 0 included, takes blocks from a queue on the job's c10d store: ``store.add(next, k)``
  hands out the next ``k`` pending blocks (fetch-and-add: no block goes to two ranks). ``k`` grows until
  a claim is about :data:`CLAIM_SECONDS` of work (at most ``flush_seconds``) and shrinks near the end,
  so that uneven point costs and uneven ranks balance out.
- A rank other than 0 posts the values of each claim on the store under ``<run>/<rank>/<n>``
  (``n = 0, 1, ...``; numpy's ``.npz`` bytes, never pickles), and an end mark when the queue is empty.
  Rank 0 writes its own claims, and a thread of rank 0 writes the posted ones as they come, through the
  sink's crash-safe ``write``, deleting each key it has read. So finished points reach the file within
  about a claim's time, whichever rank computed them, and nothing but the values of finished blocks and
  one counter ever goes through the store: no collective per point or per block.

A block is always evaluated whole, on one rank, so each point is computed together with the same
others whatever the world size: a run on any number of ranks, killed on any rank and resumed on any
other number, is bit-identical to an uninterrupted single-process run on the same hardware. A kill
loses the claims in flight and those posted but not yet written; a resume recomputes exactly those.
"""

from __future__ import annotations

import io
import math
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from landscape import distributed
from landscape.errors import LandscapeError

CLAIM_SECONDS = 0.2       # work per claim the queue aims at
POLL_SECONDS = 0.01       # rank 0's writer looks for posted values this often when none are waiting
_VALUES, _END, _FAILED = b"v", b".", b"!"   # the first byte of a posted message


def _encode(flat: np.ndarray, values: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, __units__=flat, **values)
    return buffer.getvalue()


def _decode(message: bytes) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    with np.load(io.BytesIO(message[1:]), allow_pickle=False) as archive:
        values = {name: archive[name] for name in archive.files}
    return values.pop("__units__"), values


class _Writer:
    """Rank 0's side: writes finished values through ``write(flat, values)`` (its own, and in a thread
    those the other ranks post) under one lock, until every rank has posted its end mark."""

    def __init__(self, key: str, write: Callable[[np.ndarray, dict[str, np.ndarray]], None]) -> None:
        self.key, self.write_values = key, write
        self.lock = threading.Lock()
        self.failure: str | None = None
        self.thread = threading.Thread(target=self._collect, name="landscape-points-writer", daemon=True)
        self.thread.start()

    def write(self, flat: np.ndarray, values: dict[str, np.ndarray]) -> None:
        with self.lock:
            self.write_values(flat, values)

    def _collect(self) -> None:
        kv, ranks = distributed.store(), list(range(1, distributed.world_size()))
        counts = dict.fromkeys(ranks, 0)
        try:
            while ranks:
                found = False
                for rank in list(ranks):
                    name = f"{self.key}/{rank}/{counts[rank]}"
                    if not kv.check([name]):
                        continue
                    message = kv.get(name)
                    kv.delete_key(name)
                    counts[rank] += 1
                    found = True
                    if message[:1] == _VALUES:
                        self.write(*_decode(message))
                    else:
                        ranks.remove(rank)
                        if message[:1] == _FAILED and self.failure is None:
                            self.failure = f"rank {rank} failed: {message[1:].decode()}"
                if not found:
                    time.sleep(POLL_SECONDS)
        except Exception as error:  # noqa: BLE001 - raised by join() in the main thread
            self.failure = f"writing the other ranks' points failed: {type(error).__name__}: {error}"

    def join(self) -> None:
        """Wait until every rank has ended (their values written); raise a failure any of them posted."""
        self.thread.join()
        if self.failure is not None:
            raise LandscapeError(self.failure)


def share_blocks(evaluate: Callable[[np.ndarray], dict[str, np.ndarray]], units: Callable[[np.ndarray], np.ndarray],
                 starts: np.ndarray, key: str, write: Callable[[np.ndarray, dict[str, np.ndarray]], None] | None,
                 flush_seconds: float) -> None:
    """Evaluate the blocks beginning at the flat units ``starts`` (the same list on every rank) on all ranks.

    ``units(blocks)`` gives the flat units of some blocks, ``evaluate(flat)`` their values. On rank 0,
    ``write(flat, values)`` stores finished values (own and posted ones, never two at once); the other
    ranks pass ``None``. ``key`` names this run on the store (unique in the job). Returns once every
    block is written (rank 0) or this rank has no more to claim (the others).
    """
    kv = distributed.store()
    writer = _Writer(key, write) if distributed.is_main() else None
    posted = 0

    def post(tag: bytes, payload: bytes = b"") -> None:
        nonlocal posted
        kv.set(f"{key}/{distributed.rank()}/{posted}", tag + payload)
        posted += 1

    try:
        for flat, values in _claims(evaluate, units, starts, key, flush_seconds):
            if writer is not None:
                writer.write(flat, values)
            else:
                post(_VALUES, _encode(flat, values))
    except BaseException as error:
        if writer is None:   # rank 0 stops waiting for this rank and reports it
            post(_FAILED, f"{type(error).__name__}: {error}".encode())
        else:                # the other ranks stop claiming
            kv.set(f"{key}/abort", f"{type(error).__name__}: {error}")
        raise
    if writer is None:
        post(_END)
    else:
        writer.join()


def _claims(evaluate: Callable[[np.ndarray], dict[str, np.ndarray]], units: Callable[[np.ndarray], np.ndarray],
            starts: np.ndarray, key: str, flush_seconds: float) -> Iterator[tuple[np.ndarray, dict[str, Any]]]:
    """This rank's claims from the queue, evaluated: ``(flat units, values)`` each."""
    kv, ranks = distributed.store(), distributed.world_size()
    target = min(CLAIM_SECONDS, flush_seconds)
    count = 1
    while True:
        if kv.check([f"{key}/abort"]):
            raise LandscapeError(f"rank 0 stopped the run: {kv.get(f'{key}/abort').decode()}")
        end = kv.add(f"{key}/next", count)
        first = end - count
        if first >= len(starts):
            return
        blocks = starts[first:min(end, len(starts))]
        began = time.perf_counter()
        flat = units(blocks)
        yield flat, evaluate(flat)
        per_block = (time.perf_counter() - began) / len(blocks)
        left = len(starts) - end
        count = max(1, min(int(target / max(per_block, 1e-9)), math.ceil(left / (2 * ranks))))
