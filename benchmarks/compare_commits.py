"""Old commit against new: rerun benchmarks from two commits side by side, in one run, and tabulate both.

Each commit is exported (``git archive``) to a temporary folder and each benchmark runs there with that
commit's own script and package (``PYTHONPATH`` = the export), alternating old, new, old, new, ... for
``--passes`` passes, so drifts in the machine's load hit both alike. The rows of every pass are matched by
the benchmark's key columns; the table gives each compared column's median over passes for the old and the
new commit, their range (the run-to-run spread) and new / old.

    python benchmarks/compare_commits.py OLD [NEW] [--benchmarks hessian,surface,optimizer_step] [--passes 2]

NEW defaults to HEAD. Results: ``results/compare_<benchmark>.{json,md}``. Settings per benchmark are in
:data:`BENCHMARKS` (what it is run with, its key columns and its compared columns).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from _common import write_results

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS: dict[str, dict[str, Any]] = {
    "hessian": {"args": ["--models", "cnn", "--parts", "hvp,top5,slq", "--threads", "1", "--pyhessian-cap", "120"],
                "results": "hessian", "keys": ["model", "part", "method"], "compare": ["time_s", "hvps", "ratio"]},
    "surface": {"args": ["--models", "mlp,cnn", "--threads", "1"], "results": "surface", "keys": ["model"],
                "compare": ["ms_per_point_ours", "ours_vs_pure", "plain_vs_pure", "speedup_vs_loss_landscapes"]},
    "optimizer_step": {"args": ["--configs", "cnn", "--threads", "1"], "results": "optimizer_step",
                       "keys": ["setting", "method"], "compare": ["ms_per_step", "ratio"]},
}
# rows whose method was renamed when the HVP moved into landscape/curvature (old name -> new name)
RENAMED = {"HVP Objective.hvp (forward-over-reverse, torch.func)":
           "HVP ours, one vector, forward-over-reverse (torch.func)",
           "HVP Objective.hvp_batched K=4, per vector": "HVP ours, forward-over-reverse vmapped K=4, per vector"}


def export(commit: str, folder: Path) -> str:
    """Write the tree of ``commit`` into ``folder``; returns its full hash."""
    full = subprocess.run(["git", "rev-parse", commit], cwd=ROOT, check=True, capture_output=True,
                          text=True).stdout.strip()
    archive = subprocess.run(["git", "archive", full], cwd=ROOT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return full


def run(folder: Path, benchmark: str) -> list[dict[str, Any]]:
    """Run one benchmark in an exported tree; returns its result rows."""
    spec = BENCHMARKS[benchmark]
    env = {**os.environ, "PYTHONPATH": str(folder)}
    subprocess.run([sys.executable, str(folder / "benchmarks" / f"{benchmark}.py"), *spec["args"]], cwd=folder,
                   env=env, check=True)
    path = folder / "benchmarks" / "results" / f"{spec['results']}.json"
    return json.loads(path.read_text())["rows"]


def key(row: dict[str, Any], keys: list[str]) -> tuple:
    return tuple(RENAMED.get(row.get(k), row.get(k)) for k in keys)


def table(benchmark: str, old: list[list[dict]], new: list[list[dict]]) -> list[dict[str, Any]]:
    """One row per matched key and compared column: old and new medians, ranges and new / old."""
    spec = BENCHMARKS[benchmark]
    order: list[tuple] = []
    values: dict[tuple, dict[str, list[float]]] = {}
    for side, passes in (("old", old), ("new", new)):
        for rows in passes:
            for row in rows:
                k = key(row, spec["keys"])
                if k not in values:
                    order.append(k)
                    values[k] = {}
                for column in spec["compare"]:
                    if isinstance(row.get(column), (int, float)):
                        values[k].setdefault(f"{side} {column}", []).append(float(row[column]))
    out = []
    for k in order:
        for column in spec["compare"]:
            before, after = values[k].get(f"old {column}"), values[k].get(f"new {column}")
            if not before and not after:
                continue
            entry: dict[str, Any] = dict(zip(spec["keys"], k))
            entry["column"] = column
            for side, series in (("old", before), ("new", after)):
                entry[side] = statistics.median(series) if series else None
                entry[f"{side} range"] = f"{min(series):.4g}-{max(series):.4g}" if series else ""
            entry["new / old"] = entry["new"] / entry["old"] if before and after and entry["old"] else None
            out.append(entry)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", help="the commit before the change")
    parser.add_argument("new", nargs="?", default="HEAD", help="the commit after it (default HEAD)")
    parser.add_argument("--benchmarks", default=",".join(BENCHMARKS), help="comma-separated: " + ",".join(BENCHMARKS))
    parser.add_argument("--passes", type=int, default=2, help="runs per commit, alternating old and new")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        trees = {side: Path(scratch) / side for side in ("old", "new")}
        commits = {}
        for side, tree in trees.items():
            tree.mkdir()
            commits[side] = export(getattr(args, side), tree)
        for benchmark in args.benchmarks.split(","):
            results: dict[str, list[list[dict]]] = {"old": [], "new": []}
            for index in range(args.passes):
                for side in ("old", "new"):
                    print(f"[{benchmark}] pass {index + 1}/{args.passes}: {side} {commits[side][:10]}", flush=True)
                    results[side].append(run(trees[side], benchmark))
            meta = {"old": commits["old"], "new": commits["new"], "passes per commit": args.passes,
                    "order": "old, new, old, new, ...", "benchmark args": " ".join(BENCHMARKS[benchmark]["args"]),
                    "values": "medians over passes; range = run-to-run spread"}
            print(write_results(f"compare_{benchmark}", table(benchmark, results["old"], results["new"]), meta)
                  .read_text())


if __name__ == "__main__":
    main()
