"""Kill a resumable run at chosen system calls (strace's fault injection) and check what every kill leaves.

A run writes ``/group`` of ``<folder>/r.h5`` through :class:`landscape.store.IncrementalGroup` and
prints ``unit <flat index>`` for every unit it computes. :func:`kill_everywhere` first runs it
uninterrupted under strace to record its writes (``pwrite64``, ``write``, ``ftruncate``,
renames and unlinks of the results file, the sidecar and their temporary files), then, for
every n, kills a process with SIGKILL on entering its call that is the n-th of that sequence (so
the call itself never happens), each process resuming what the previous one left, and finally
lets one finish. Each run is a fresh fork of a :class:`Server` that imported torch once, with
strace attached to it, so a kill point costs a fraction of a second instead of ``import torch``.
After every kill: the sidecar, if any, opens and every unit it marks done has finite values, the
done units are whole blocks from the start, and the process computed no unit that was done when it
started; at the end the group equals the uninterrupted run's bit for bit.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest

from landscape import store

SYSCALLS = ("pwrite64", "write", "ftruncate", "rename", "renameat", "renameat2", "unlink", "unlinkat")
_CALL = re.compile(rf"^(?:\d+\s+)?({'|'.join(SYSCALLS)})\((.*)$")


@dataclass(frozen=True)
class Event:
    """One traced system call: its name, the file (the renamed one for ``rename``) and a pwrite's offset."""

    syscall: str
    file: str
    offset: int = -1


@functools.cache
def _strace() -> str:
    """strace (skips the test where it is missing or cannot trace)."""
    found = shutil.which("strace")
    if found is None:
        pytest.skip("strace is not installed; the kill-at-every-write tests need it (apt-get install strace)")
    probe = subprocess.run([found, "-f", "-qq", "-e", "trace=pwrite64", "-o", os.devnull, sys.executable, "-c", ""],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"strace cannot trace here (ptrace not permitted?): {probe.stderr.strip()[:200]}")
    return found


def _parse(log: Path) -> list[Event]:
    events = []
    for line in log.read_text().splitlines():
        match = _CALL.match(line)
        if match is None:
            continue
        syscall, rest = match.groups()
        named = re.match(r"\d+<(.*?)>", rest) or re.search(r'"(.*?)"', rest)
        offset = re.search(r", (\d+)\)\s+= ", line) if syscall == "pwrite64" else None
        events.append(Event(syscall, Path(named.group(1)).name, int(offset.group(1)) if offset else -1))
    return events


SERVER = """
import ctypes, json, os, runpy, subprocess, sys, time, traceback
exec(sys.argv[1])  # what every run needs, imported (and warmed up) once
for line in sys.stdin:
    request = json.loads(line)
    ready, go = os.pipe()
    pid = os.fork()
    if pid == 0:  # the run: a fresh copy of this process
        os.close(go)
        try:
            ctypes.CDLL(None).prctl(0x59616D61, ctypes.c_ulong(-1), 0, 0, 0)  # Yama: PR_SET_PTRACER_ANY
            for fd, name in ((1, "stdout"), (2, "stderr")):
                os.dup2(os.open(request[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
            os.read(ready, 1)  # until strace is attached
            sys.argv = request["argv"]
            runpy.run_path(sys.argv[0], run_name="__main__")
            code = 0
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else 1
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    os.close(ready)
    tracer, report = None, request["stderr"] + ".strace"
    if request["strace"]:
        with open(report, "w") as handle:
            tracer = subprocess.Popen([*request["strace"], "-p", str(pid)], stderr=handle)
        while tracer.poll() is None and "attached" not in open(report).read():
            time.sleep(0.002)
    os.write(go, b"x")
    os.close(go)
    status = os.waitpid(pid, 0)[1]
    if tracer is not None:
        tracer.wait()
    print(json.dumps({"returncode": os.waitstatus_to_exitcode(status),
                      "tracer": open(report).read() if tracer is not None else ""}), flush=True)
"""


class Server:
    """A Python process that imports what the runs need once and forks a fresh copy of itself for
    every run, to which strace attaches: a run then costs its own work, not seconds of ``import torch``."""

    def __init__(self, folder: Path, preload: str) -> None:
        self.folder, self.runs = folder, 0
        script = folder / "fork_server.py"
        script.write_text(SERVER)
        self.process = subprocess.Popen([sys.executable, str(script), preload], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)

    def run(self, argv: Sequence[str], strace: Sequence[str] = ()) -> tuple[int, str, str]:
        """``(exit code, stdout, stderr)`` of the script ``argv`` run in a fresh copy (under ``strace`` if given)."""
        self.runs += 1
        out, err = self.folder / f"run{self.runs}.out", self.folder / f"run{self.runs}.err"
        self.process.stdin.write(json.dumps({"argv": list(argv), "strace": list(strace), "stdout": str(out),
                                             "stderr": str(err)}) + "\n")
        self.process.stdin.flush()
        reply = json.loads(self.process.stdout.readline())
        if strace and "attached" not in reply["tracer"]:
            pytest.skip(f"strace cannot attach to a process here: {reply['tracer'].strip()[:200]}")
        return reply["returncode"], out.read_text(), err.read_text()

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


@dataclass
class Resumable:
    """A run of ``argv`` (a script and its arguments; ``{out}`` stands for the results file) that
    writes ``/group`` incrementally in blocks of ``block`` units with ``values`` datasets; ``preload``
    is the Python code that imports what it needs."""

    argv: Sequence[str]
    group: str
    block: int
    values: int
    preload: str

    def files(self, out: Path) -> list[Path]:
        partial = store.sidecar(out, self.group)
        return [out, out.with_name(f".{out.name}.tmp"), partial, partial.with_name(f".{partial.name}.tmp")]

    def run(self, server: Server, out: Path, kill: tuple[str, int] | None = None, log: Path | None = None,
            ) -> tuple[int, str, set[int]]:
        """Run once (under strace when tracing or killing): the exit code, stderr and the units computed."""
        traced: list[str] = []
        if kill is not None or log is not None:
            traced = [_strace(), "-f", "-y", "-o", str(log or os.devnull), "-e", f"trace={','.join(SYSCALLS)}"]
            for path in self.files(out):
                traced += ["-P", str(path)]
            if kill is not None:
                traced += ["-e", f"inject={kill[0]}:signal=KILL:when={kill[1]}"]
        code, stdout, stderr = server.run([arg.replace("{out}", str(out)) for arg in self.argv], traced)
        return code, stderr, {int(line.split()[1]) for line in stdout.splitlines() if line.startswith("unit ")}


def _left(run: Resumable, out: Path) -> np.ndarray | None:
    """The done mask (flat) of the sidecar a killed run left, after checking it; None without one."""
    if out.exists():
        with h5py.File(out, "r") as handle:  # the results file is always whole: no group or a complete one
            assert run.group not in handle or handle[run.group]["done"][()].all()
    partial = store.sidecar(out, run.group)
    if not partial.exists():
        return None
    with h5py.File(partial, "r") as handle:
        shape = handle["done"].shape
        done = handle["done"][()].reshape(-1)
        for name, item in handle.items():
            if name != "done" and item.dtype == np.float64 and item.shape[:len(shape)] == shape:
                assert np.isfinite(item[()].reshape(done.size, -1)[done]).all(), f"{name}: a unit done without values"
    starts = np.arange(0, done.size, run.block)
    blocks = np.logical_and.reduceat(done, starts)
    assert (blocks == np.logical_or.reduceat(done, starts)).all(), "a block is partly marked done"
    assert blocks.all() or not blocks[np.argmin(blocks):].any(), f"done blocks {np.flatnonzero(blocks)} aren't first"
    return done


def kill_everywhere(run: Resumable, folder: Path) -> list[Event]:
    """Kill ``run`` at each write of its uninterrupted sequence in turn, then let it finish; check
    everything (see the module docstring). Returns the uninterrupted run's events."""
    reference, out = folder / "reference" / "r.h5", folder / "killed" / "r.h5"
    reference.parent.mkdir(parents=True)
    out.parent.mkdir(parents=True)
    server = Server(folder, run.preload)
    try:
        return _kill_in_turn(run, server, reference, out)
    finally:
        server.close()


def _kill_in_turn(run: Resumable, server: Server, reference: Path, out: Path) -> list[Event]:
    log = reference.with_suffix(".log")
    code, stderr, units = run.run(server, reference, log=log)
    assert code == 0, stderr
    events = _parse(log)
    partial, creation = store.sidecar(out, run.group).name, f".{store.sidecar(out, run.group).name}.tmp"
    # where a resumed process starts: after the sidecar's creation (its rename), or after the k-th block's done write
    milestones = [i for i, e in enumerate(events) if e.syscall.startswith("rename") and e.file == creation]
    writes = [i for i, e in enumerate(events) if e.syscall == "pwrite64" and e.file == partial]
    milestones += writes[run.values::run.values + 1]
    assert len(milestones) == 1 + -(-len(units) // run.block), (milestones, events)
    for index in range(len(events)):
        done = _left(run, out)
        start = 0 if done is None else milestones[int(done.sum() + run.block - 1) // run.block] + 1
        assert start <= index, f"event {index} ({events[index]}) was already passed"
        count = sum(1 for e in events[start:index + 1] if e.syscall == events[index].syscall)
        code, stderr, computed = run.run(server, out, kill=(events[index].syscall, count))
        assert code == -signal.SIGKILL, (index, events[index], code, stderr)
        if done is not None:
            assert not done[sorted(computed)].any(), f"killed at {events[index]}: finished units were computed again"
    done = _left(run, out)
    code, stderr, computed = run.run(server, out)
    assert code == 0, stderr
    if done is not None:
        assert not done[sorted(computed)].any(), "the last resume computed finished units again"
    assert not store.sidecar(out, run.group).exists()
    got, got_attrs = store.read_group(out, run.group)
    want, want_attrs = store.read_group(reference, run.group)
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)  # bit-identical (NaN-aware)
    for key in set(want_attrs) - {"created"}:
        np.testing.assert_equal(got_attrs[key], want_attrs[key], err_msg=key)
    return events


ANALYSIS = '''
import sys
import numpy as np, torch
from torch import nn
from landscape.analysis import radius, surface
from landscape.engine import runner
from landscape.objective import Objective

def mlp(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double().eval()

torch.manual_seed(0)
x, y = torch.randn(64, 6, dtype=torch.float64), torch.randint(0, 3, (64,))
objective = Objective(mlp(0), x, y, batch_size=16)
name, out = sys.argv[1], sys.argv[2]
shape = {"surface": (3, 2), "radius": (2, 3), "interpolation": (3,)}[name]
evaluate_points = runner.evaluate_points

def logged(evaluator, point_of, indices):
    print(*(f"unit {np.ravel_multi_index(index, shape)}" for index in indices), sep="\\n", flush=True)
    return evaluate_points(evaluator, point_of, indices)

runner.evaluate_points = logged
options = dict(out=out, resume=True, flush_seconds=0, evaluator_options={"stack_points": 3 if len(shape) == 2 else 2})
if name == "surface":
    surface.loss_surface(objective, np.linspace(-1, 1, 3), np.linspace(-1, 1, 2), **options)
elif name == "radius":
    radius.radius_curve(objective, [0.1, 1.0], draws=2, seed=3, **options)
else:
    surface.interpolate(objective, mlp(1), np.linspace(0, 1, 3), **options)
'''


def analysis(folder: Path, name: str) -> Resumable:
    """A tiny run of the analysis ``name`` (surface, radius or interpolation; an MLP on 64 examples):
    two blocks of points, each written as soon as it is done."""
    script = folder / "analysis.py"
    script.write_text(ANALYSIS)
    preload = ("import torch, torch.func, landscape.analysis.radius\n"
               "torch.func.grad(lambda t: (t * t).sum())(torch.ones(2))  # its first call imports much of torch")
    return Resumable([str(script), name, "{out}"], name, block=3 if name != "interpolation" else 2, values=2,
                     preload=preload)
