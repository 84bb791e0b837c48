"""Launch a script or module under ``torchrun --standalone`` on this machine (gloo, one thread per rank).

Each rank's stdout and stderr go to files under ``logs`` (torchrun's ``--log-dir``/``--redirects``);
:func:`rank_logs` reads them back and :func:`exit_codes` reads every failed rank's exit code from
torchrun's summary.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import torch

WORKER = Path(__file__).with_name("ddp_worker.py")


def torchrun(nproc: int, *args: str, logs: Path, timeout: float = 240,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node NPROC ARGS`` with OMP_NUM_THREADS=1 (and ``env``); ARGS: a script
    or ``-m module``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LANDSCAPE_DIST_TIMEOUT": "60", **(env or {})}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               f"--log-dir={logs}", "--redirects=3", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


def rank_logs(logs: Path) -> dict[int, tuple[str, str]]:
    """``{rank: (stdout, stderr)}`` of the last torchrun launch that logged into ``logs``."""
    attempts = sorted(logs.glob("*/attempt_*"), key=lambda path: path.stat().st_mtime)
    folder = attempts[-1]
    return {int(rank.name): ((rank / "stdout.log").read_text(), (rank / "stderr.log").read_text())
            for rank in folder.iterdir() if rank.name.isdigit()}


def exit_codes(summary: str) -> dict[int, int]:
    """``{rank: exit code}`` of the failed ranks, from torchrun's failure summary (its stderr)."""
    return {int(rank): int(code) for rank, code in
            re.findall(r"rank\s*:\s*(\d+) \(local_rank.*?\n\s*exitcode\s*:\s*(-?\d+)", summary)}


def outputs(folder: Path, name: str, nproc: int) -> list[dict]:
    """What :mod:`ddp_worker` wrote for scenario ``name`` on each rank."""
    return [torch.load(folder / f"{name}.rank{rank}.pt") for rank in range(nproc)]
