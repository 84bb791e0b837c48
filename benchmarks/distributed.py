"""Scale-out benchmarks under torchrun (gloo on the CPU, one thread per rank), written as one result file.

Sections (one function each, returning table rows; ``main`` writes them all with ``write_results``):

- ``surface``: a 2-D surface of the shipped ``data/cnn_digits_sgd.pt`` on the 1,437 digits training images
  (:data:`SURFACE_GRID` points a side), in 1 process against 2 ranks sharing its points out; throughput is
  points written per second, timed on rank 0 from the runner's first progress call to its last (so the
  start-up and the evaluator's build are left out of both). Efficiency = 2-rank throughput / (2 x 1-rank);
  goal >= 0.9. Also: the bytes each grid block costs on the c10d store, and the CPU time / wall time of
  every rank over the run (below 1: the rank waited, for a core or for the others).
- ``lanczos``: top-5 Lanczos (``landscape.hessian_spectrum(top_k=5)``, float32, tol 1e-4) of the same
  checkpoint on a data-parallel objective: 1 process against 2 ranks holding 719 and 718 rows; efficiency =
  1-rank time / (2 x 2-rank time); goal >= 0.8. Also the all-reduce bytes per Hessian-vector product, the
  time spent in all-reduce per product (waiting for the other rank included) and every rank's CPU use.

- ``bound``: the same work (the forward of a surface point; a Hessian-vector product) alone and in two
  independent processes at once, without torchrun or any communication: the share of two processes'
  throughput this machine gives (two vCPUs of a shared host), the ceiling of both efficiencies above.

Each of these rounds runs the 1-process measurement and then the 2-rank job, back to back, and
records the load average before the round (above ~1 the other core was busy: the 2-rank job then shares
a core with another program); ratios are medians over rounds, with their range.

- ``training``: a step of ``landscape train`` with parallel m-RWP (``--opt-args parallel=true``) on 2 ranks
  divided by a step of ``landscape train`` with SGD in 1 process, at the same per-rank batch: the clean
  and the perturbed gradient run at the same time, so the goal is <= 1.15 (the RWP paper's "one gradient
  of wall time"). Step times are the medians of the intervals between a callback's calls after each
  step (the first steps are warm-up); each round trains SGD in this process, then, in one 2-rank
  torchrun job, SGD (global batch 2 x the per-rank batch) and parallel m-RWP; ratios are medians over
  rounds of within-round ratios. The second ratio, parallel m-RWP / SGD on the same 2 ranks, shares the
  all-reduce and the need for two free cores with its baseline: it is the method's own overhead, and
  holds up on a busy machine where the first does not. The all-reduce payload per step is counted on
  rank 0 (calls to ``torch.distributed.all_reduce``).

    python benchmarks/distributed.py [--quick] [--sections training] [--configs cnn,resnet18] [--rounds N]

Settings: ``cnn`` on digits, per-rank batch 128; ``resnet18`` on random CIFAR-shaped images, per-rank
batch 64. The multi-rank part runs this script under torchrun (``--worker``), which hands its numbers
back through a JSON file (:func:`launch`); a new section adds its row function and its worker to
:data:`SECTIONS`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from _common import write_results

GOAL = 1.15
CONFIGS = {"cnn": {"arch": "cnn", "batch": 128, "steps": 24},
           "resnet18": {"arch": "resnet18", "batch": 64, "steps": 5}}
WARMUP = 2  # steps not timed at the start of a run


class StepClock:
    """A training callback that records when each step ends (:class:`landscape.train.TrainCallback`)."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def __call__(self, *, step: int, epoch: int, model, optimizer, lr: float) -> None:
        self.stamps.append(time.perf_counter())

    def seconds_per_step(self) -> float:
        intervals = [b - a for a, b in zip(self.stamps, self.stamps[1:])][WARMUP - 1:]
        return statistics.median(intervals)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def dataset(name: str, count: int):
    """The setting's training data: digits for the cnn; ``count`` random CIFAR-shaped images for resnet18."""
    from landscape.data import Dataset, load_dataset
    if name == "cnn":
        return load_dataset("digits")
    generator = torch.Generator().manual_seed(0)
    return Dataset("random-cifar", "random-cifar", torch.randn(count, 3, 32, 32, generator=generator),
                   torch.randint(0, 10, (count,), generator=generator), None, None, 10, (3, 32, 32))


def train_steps(name: str, optimizer: str, batch: int, opt_args: dict[str, Any] | None = None) -> StepClock:
    """Train the setting for its steps at global ``batch`` (in this process, or on every rank under torchrun)."""
    from landscape.train import train_model
    config, clock = CONFIGS[name], StepClock()
    data = dataset(name, config["steps"] * batch)
    epochs = max(1, round(config["steps"] * batch / len(data.x_train)))
    train_model(data, config["arch"], optimizer, epochs=epochs, batch_size=batch, opt_args=opt_args,
                device="cpu", callbacks=[clock])
    return clock


def training_worker(name: str, out: str) -> None:
    """Under torchrun: SGD then parallel m-RWP steps; rank 0 writes their seconds per step and m-RWP's
    all-reduce bytes per step."""
    import torch.distributed as dist

    from landscape import distributed
    sent: list[int] = []
    all_reduce = dist.all_reduce

    def counting(tensor, *args, **kwargs):
        sent.append(tensor.numel() * tensor.element_size())
        return all_reduce(tensor, *args, **kwargs)
    batch = CONFIGS[name]["batch"]
    sgd = train_steps(name, "sgd", 2 * batch)
    dist.all_reduce = counting
    clock = train_steps(name, "mrwp", batch, {"parallel": True})
    steps = len(clock.stamps)  # a step all-reduces the gradient and the loop's summary; then the evaluation
    if distributed.is_main():
        Path(out).write_text(json.dumps({"seconds": clock.seconds_per_step(), "sgd": sgd.seconds_per_step(),
                                         "all_reduce_bytes_per_step": sum(sent[:2 * steps]) / steps}))


def training(configs: list[str], rounds: int) -> list[dict[str, Any]]:
    """Section ``training``: parallel m-RWP on 2 ranks / SGD in 1 process, same per-rank batch."""
    torch.set_num_threads(1)
    rows = []
    for name in configs:
        ratios, own, sgd_times, ddp_times, mrwp_times, payload = [], [], [], [], [], {}
        for _ in range(rounds):
            sgd = train_steps(name, "sgd", CONFIGS[name]["batch"]).seconds_per_step()
            payload = launch(2, "training", name)
            sgd_times.append(sgd)
            ddp_times.append(payload["sgd"])
            mrwp_times.append(payload["seconds"])
            ratios.append(payload["seconds"] / sgd)
            own.append(payload["seconds"] / payload["sgd"])
            print(f"{name}: sgd {1e3 * sgd:.1f} ms, sgd on 2 ranks {1e3 * payload['sgd']:.1f} ms, parallel m-RWP "
                  f"{1e3 * payload['seconds']:.1f} ms: x{ratios[-1]:.3f} (x{own[-1]:.3f})", flush=True)
        ratio = statistics.median(ratios)
        rows.append({"section": "training", "setting": name, "per_rank_batch": CONFIGS[name]["batch"],
                     "sgd_1_rank_ms": 1e3 * statistics.median(sgd_times),
                     "sgd_2_ranks_ms": 1e3 * statistics.median(ddp_times),
                     "mrwp_parallel_2_ranks_ms": 1e3 * statistics.median(mrwp_times), "ratio": ratio,
                     "ratio_min": min(ratios), "ratio_max": max(ratios), "rounds": rounds, "goal": GOAL,
                     "meets_goal": "yes" if ratio <= GOAL else "NO", "ratio_to_sgd_2_ranks": statistics.median(own),
                     "ratio_to_sgd_2_ranks_min": min(own), "ratio_to_sgd_2_ranks_max": max(own),
                     "all_reduce_MB_per_step": payload["all_reduce_bytes_per_step"] / 2**20})
    return rows


def launch(ranks: int, section: str, setting: str) -> dict[str, Any]:
    """Run ``section``'s worker for ``setting`` on ``ranks`` ranks under torchrun; what its rank 0 wrote."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "result.json"
        run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
                              __file__, "--worker", section, "--setting", setting, "--out", str(out)],
                             capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if run.returncode != 0:
            raise SystemExit(f"the {ranks}-rank {section} run failed:\n{run.stderr[-3000:]}")
        return json.loads(out.read_text())


CHECKPOINT = Path(__file__).resolve().parents[1] / "data" / "cnn_digits_sgd.pt"
SURFACE_GRID = 15          # points a side of the benchmark's surface
SURFACE_GOAL, LANCZOS_GOAL = 0.9, 0.8


def surface_run(name: str, out: str) -> None:
    """On every rank (or in one process): the surface of :data:`CHECKPOINT`; rank 0 writes its points per
    second, the store bytes per block and every rank's CPU time / wall time as JSON to ``out``."""
    import numpy as np

    from landscape import distributed
    from landscape.analysis.surface import loss_surface
    from landscape.engine import sharing, tune_allocator
    from landscape.objective import load_objective
    tune_allocator()
    stamps: list[tuple[float, int]] = []
    posted: list[tuple[int, int]] = []   # (bytes, blocks) of every message this rank posts
    encode = sharing._encode

    def counted(flat, values):
        message = encode(flat, values)
        posted.append((len(message) + 1, len(flat)))   # (+1: the tag byte; one unit per block here)
        return message
    sharing._encode = counted
    axis = np.linspace(-1.0, 1.0, SURFACE_GRID)
    objective = load_objective(str(CHECKPOINT), device="cpu")
    with tempfile.TemporaryDirectory() as folder:
        cpu, wall = time.process_time(), time.perf_counter()
        loss_surface(objective, x=axis, y=axis, out=Path(folder) / "surface.h5",
                     progress=lambda done, total: stamps.append((time.perf_counter(), done)))
        use = (time.process_time() - cpu) / (time.perf_counter() - wall)
    uses = distributed.all_gather_object(use)
    messages = [m for part in distributed.all_gather_object(posted) for m in part]
    if distributed.is_main():
        (first, done0), (last, done1) = stamps[0], stamps[-1]
        Path(out).write_text(json.dumps({"points_per_s": (done1 - done0) / (last - first), "cpu_use": uses,
                                         "store_bytes_per_block": sum(b for b, _ in messages) / max(1, sum(
                                             n for _, n in messages)),
                                         "blocks_per_message": sum(n for _, n in messages) / max(1, len(messages))}))


def lanczos_run(name: str, out: str) -> None:
    """On every rank (or in one process): top-5 Lanczos of :data:`CHECKPOINT`'s Hessian on a data-parallel
    objective; rank 0 writes the seconds, the products, the all-reduce bytes per product and the values."""
    import torch.distributed as dist

    from landscape import distributed
    from landscape.analysis.hessian import hessian_spectrum
    from landscape.objective import load_objective
    sent: list[tuple[int, float]] = []   # (bytes, seconds) of every all-reduce
    all_reduce = dist.all_reduce

    def counting(tensor, *args, **kwargs):
        began = time.perf_counter()
        done = all_reduce(tensor, *args, **kwargs)
        sent.append((tensor.numel() * tensor.element_size(), time.perf_counter() - began))
        return done
    objective = load_objective(str(CHECKPOINT), device="cpu")
    dist.all_reduce = counting
    cpu, began = time.process_time(), time.perf_counter()
    result = hessian_spectrum(objective, top_k=5)
    seconds, cpu = time.perf_counter() - began, time.process_time() - cpu
    uses = distributed.all_gather_object(cpu / seconds)
    waits = distributed.all_gather_object(sum(wait for _, wait in sent))
    if distributed.is_main():
        products = result.attrs["hvp_count"]
        Path(out).write_text(json.dumps({"seconds": seconds, "products": products, "cpu_use": uses,
                                         "all_reduce_bytes_per_product": sum(b for b, _ in sent) / products,
                                         "all_reduce_ms_per_product": [1e3 * w / products for w in waits],
                                         "eigenvalues": result["eigenvalues"].tolist()}))


BOUND_WORK = {"forward": 40, "hvp": 10}   # repetitions of each workload per process


def bound_run(name: str, out: str) -> None:
    """One process's share of the ``bound`` section: ``name`` is ``forward`` (the model's forward on the
    1,437 images, what a surface point costs) or ``hvp`` (Hessian-vector products on them, what a Lanczos
    step costs), repeated :data:`BOUND_WORK` times; writes the seconds and the CPU time / wall time."""
    from landscape.curvature.hessian import HessianOperator
    from landscape.objective import load_objective
    objective = load_objective(str(CHECKPOINT), device="cpu", shard=False)
    if name == "forward":
        model, x = objective.model.eval(), objective.inputs

        def work() -> None:
            with torch.inference_mode():
                model(x)
    else:
        operator = HessianOperator(objective)
        vector = torch.randn(operator.shape[0], generator=torch.Generator().manual_seed(0))
        operator @ vector   # builds the cached graphs, as Lanczos' first product does

        def work() -> None:
            operator @ vector
    work()
    cpu, began = time.process_time(), time.perf_counter()
    for _ in range(BOUND_WORK[name]):
        work()
    seconds = time.perf_counter() - began
    Path(out).write_text(json.dumps({"seconds": seconds, "cpu_use": (time.process_time() - cpu) / seconds}))


def bound(configs: list[str], rounds: int) -> list[dict[str, Any]]:
    """Section ``bound``: what this machine allows two processes. The same work alone and in two
    independent processes at once (no torchrun, no communication): efficiency = time alone / time of the
    slower of the two. No 2-rank job here can exceed it."""
    rows = []
    for name in BOUND_WORK:
        efficiencies, alone_s, together_s = [], [], []
        for _ in range(rounds):
            with tempfile.TemporaryDirectory() as folder:
                def start(k: int) -> subprocess.Popen:
                    return subprocess.Popen([sys.executable, __file__, "--worker", "bound", "--setting", name,
                                             "--out", str(Path(folder) / f"{k}.json")],
                                            env={**os.environ, "OMP_NUM_THREADS": "1"})
                start(0).wait()
                alone = json.loads((Path(folder) / "0.json").read_text())["seconds"]
                pair = [start(1), start(2)]
                for process in pair:
                    process.wait()
                together = max(json.loads((Path(folder) / f"{k}.json").read_text())["seconds"] for k in (1, 2))
            alone_s.append(alone)
            together_s.append(together)
            efficiencies.append(alone / together)
            print(f"bound {name}: alone {alone:.2f} s, two at once {together:.2f} s: {efficiencies[-1]:.3f}", flush=True)
        rows.append({"section": "bound", "setting": f"{name} x{BOUND_WORK[name]}, cnn, 1,437 digits",
                     "one_process_s": statistics.median(alone_s), "two_processes_s": statistics.median(together_s),
                     "efficiency": statistics.median(efficiencies), "efficiency_min": min(efficiencies),
                     "efficiency_max": max(efficiencies), "rounds": rounds})
    return rows


def in_process(run, name: str) -> dict[str, Any]:
    """``run(name, out)`` in this process (one rank); what it wrote."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "result.json"
        run(name, str(out))
        return json.loads(out.read_text())


def surface(configs: list[str], rounds: int) -> list[dict[str, Any]]:
    """Section ``surface``: points per second on 2 ranks / (2 x in 1 process)."""
    torch.set_num_threads(1)
    efficiencies, one, two, loads, uses, payload = [], [], [], [], [], {}
    for _ in range(rounds):
        loads.append(os.getloadavg()[0])
        single = in_process(surface_run, "cnn")["points_per_s"]
        payload = launch(2, "surface", "cnn")
        one.append(single)
        two.append(payload["points_per_s"])
        uses.append(min(payload["cpu_use"]))
        efficiencies.append(payload["points_per_s"] / (2 * single))
        print(f"surface: 1 rank {single:.1f} pt/s, 2 ranks {payload['points_per_s']:.1f} pt/s: efficiency "
              f"{efficiencies[-1]:.3f} (load before {loads[-1]:.2f}, CPU use of the ranks {payload['cpu_use']})",
              flush=True)
    efficiency = statistics.median(efficiencies)
    return [{"section": "surface", "setting": f"cnn, 1,437 digits, {SURFACE_GRID}x{SURFACE_GRID}",
             "one_rank_points_per_s": statistics.median(one), "two_ranks_points_per_s": statistics.median(two),
             "efficiency": efficiency, "efficiency_min": min(efficiencies), "efficiency_max": max(efficiencies),
             "rounds": rounds, "goal": SURFACE_GOAL, "meets_goal": "yes" if efficiency >= SURFACE_GOAL else "NO",
             "load_before_min": min(loads), "load_before_max": max(loads), "least_rank_cpu_use_min": min(uses),
             "store_bytes_per_block": payload["store_bytes_per_block"],
             "blocks_per_message": payload["blocks_per_message"]}]


def lanczos(configs: list[str], rounds: int) -> list[dict[str, Any]]:
    """Section ``lanczos``: top-5 Lanczos in 1 process / (2 x on 2 ranks)."""
    torch.set_num_threads(1)
    efficiencies, one, two, loads, uses, waits, payload = [], [], [], [], [], [], {}
    for _ in range(rounds):
        loads.append(os.getloadavg()[0])
        single = in_process(lanczos_run, "cnn")
        payload = launch(2, "lanczos", "cnn")
        one.append(single["seconds"])
        two.append(payload["seconds"])
        uses.append(min(payload["cpu_use"]))
        waits.append(max(payload["all_reduce_ms_per_product"]))
        efficiencies.append(single["seconds"] / (2 * payload["seconds"]))
        print(f"lanczos: 1 rank {single['seconds']:.2f} s ({single['products']} HVPs, CPU use {single['cpu_use']}), "
              f"2 ranks {payload['seconds']:.2f} s ({payload['products']} HVPs, CPU use {payload['cpu_use']}, "
              f"all-reduce ms per HVP {payload['all_reduce_ms_per_product']}): efficiency {efficiencies[-1]:.3f} "
              f"(load before {loads[-1]:.2f}; eigenvalues {single['eigenvalues']} vs {payload['eigenvalues']})",
              flush=True)
    efficiency = statistics.median(efficiencies)
    return [{"section": "lanczos", "setting": "cnn, 1,437 digits, top-5, float32",
             "one_rank_s": statistics.median(one), "two_ranks_s": statistics.median(two), "efficiency": efficiency,
             "efficiency_min": min(efficiencies), "efficiency_max": max(efficiencies), "rounds": rounds,
             "goal": LANCZOS_GOAL, "meets_goal": "yes" if efficiency >= LANCZOS_GOAL else "NO",
             "load_before_min": min(loads), "load_before_max": max(loads), "least_rank_cpu_use_min": min(uses),
             "products": payload["products"], "all_reduce_bytes_per_product": payload["all_reduce_bytes_per_product"],
             "all_reduce_ms_per_product_max": max(waits)}]


# section name -> (rows from the settings and rounds, the worker each rank runs under torchrun)
SECTIONS = {"training": (training, training_worker), "surface": (surface, surface_run),
            "lanczos": (lanczos, lanczos_run), "bound": (bound, bound_run)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one round of the cnn only (a smoke run)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated: " + ", ".join(SECTIONS))
    parser.add_argument("--configs", default="cnn,resnet18",
                        help="comma-separated settings of the training section: cnn, resnet18")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per setting (median of their ratios)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)   # set by launch()
    parser.add_argument("--setting", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        torch.set_num_threads(1)
        SECTIONS[args.worker][1](args.setting, args.out)
        return
    configs = ["cnn"] if args.quick else [name.strip() for name in args.configs.split(",")]
    rounds = 1 if args.quick else args.rounds
    rows = []
    for section in args.sections.split(","):
        rows += SECTIONS[section.strip()][0](configs, rounds)
    columns = list(dict.fromkeys(key for row in rows for key in row))  # sections may add their own columns
    path = write_results("distributed", rows, {"launcher": "torchrun --standalone, gloo", "threads_per_rank": 1,
                                               "warmup_steps": WARMUP, "note": "shared 2-core machine"}, columns)
    print(path.read_text())


if __name__ == "__main__":
    main()
