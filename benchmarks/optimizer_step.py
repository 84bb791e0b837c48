"""Step time of every registered optimizer as a ratio to an SGD step on the same model and batch.

Two settings: ``cnn`` on a batch of 128 digits, and ``resnet18`` on 128 random CIFAR-shaped
images. Methods are timed in interleaved rounds (median over rounds), so machine noise hits all
of them alike; each round times as many steps per method as fill about a quarter of a second
(at most ``--steps``). SSAM-F/SSAM-D are also timed once with a mask refresh on the step; their
amortised time adds that extra cost divided by the default refresh interval.

    python benchmarks/optimizer_step.py [--quick] [--configs cnn,resnet18] [--device auto] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from _common import write_results
from landscape.data import load_dataset
from landscape.models import build_model
from landscape.objective import resolve_device
from landscape.optimizers import create, list_optimizers

GOALS = {"sam": 2.1, "asam": 2.1, "rsam": 2.1, "mrwp": 2.1, "marwp": 2.1, "rwp": 1.15, "arwp": 1.15,
         "ssamf": 2.2, "ssamd": 2.2}
SPARSE = ("ssamf", "ssamd")


def setting(name: str, device: torch.device) -> tuple[Callable[[], torch.nn.Module], tuple, tuple]:
    """(model builder, the timed batch (x, y), the Fisher pool (x, y)) of a setting."""
    if name == "cnn":
        digits = load_dataset("digits")
        batch = (digits.x_train[:128].to(device), digits.y_train[:128].to(device))
        return lambda: build_model("cnn", 10, digits.input_shape), batch, (digits.x_train, digits.y_train)
    if name == "resnet18":
        generator = torch.Generator().manual_seed(0)
        pool = (torch.randn(1024, 3, 32, 32, generator=generator), torch.randint(0, 10, (1024,), generator=generator))
        batch = (pool[0][:128].to(device), pool[1][:128].to(device))
        return lambda: build_model("resnet18", 10, (3, 32, 32)), batch, pool
    raise SystemExit(f"unknown setting {name!r}; use cnn or resnet18")


def stepper(method: str, builder, batch, pool, device, **extra) -> Callable[[], None]:
    """One optimizer step of ``method`` (registry defaults) on a fresh model, as a function."""
    torch.manual_seed(0)
    model = builder().to(device).train()
    info = list_optimizers(method)[0]
    wiring = {"model": model, "total_steps": 10**6, "fisher_data": pool, "seed": 0, **extra}
    opt = create(method, model.parameters(), **{k: v for k, v in wiring.items() if info.accepts(k)})
    x, y = batch

    def closure():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    def step():
        opt.step(closure)
    return step


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step: Callable[[], None], count: int, device: torch.device) -> float:
    """Seconds per call of ``step`` over ``count`` calls."""
    synchronise(device)
    start = time.perf_counter()
    for _ in range(count):
        step()
    synchronise(device)
    return (time.perf_counter() - start) / count


def measure(name: str, device: torch.device, rounds: int, max_steps: int) -> tuple[list[dict], int]:
    """Rows for every method in setting ``name``, and the steps timed per method per round."""
    builder, batch, pool = setting(name, device)
    methods = [info.name for info in list_optimizers()]
    steps = {method: stepper(method, builder, batch, pool, device) for method in methods}
    refreshing = {method: stepper(method, builder, batch, pool, device, refresh=1) for method in SPARSE}
    for step in steps.values():                      # warm-up: allocations, masks, autotuning
        for _ in range(2):
            step()
    inner = max(1, min(max_steps, round(0.25 / timed(steps["sgd"], 1, device))))
    times: dict[str, list[float]] = {key: [] for key in steps}
    for _ in range(rounds):
        for key, step in steps.items():
            times[key].append(timed(step, inner, device))
    for method, step in refreshing.items():          # a refresh costs the same every time: once is enough
        step()
        times[f"{method}@refresh"] = [timed(step, 1, device)]
    median = {key: statistics.median(values) for key, values in times.items()}
    sgd = median["sgd"]
    rows = []
    for method in methods:
        seconds = median[method]
        row = {"setting": name, "method": method, "ms_per_step": 1e3 * seconds, "ratio": seconds / sgd}
        if method in SPARSE:
            refresh = list_optimizers(method)[0].defaults["refresh"]
            extra = max(median[f"{method}@refresh"] - seconds, 0.0)
            row["refresh_ms"] = 1e3 * extra
            row["ratio_amortised"] = (seconds + extra / refresh) / sgd
        goal = GOALS.get(method)
        row["goal"] = goal if goal is not None else ""
        reported = row.get("ratio_amortised", row["ratio"])
        row["meets_goal"] = "" if goal is None else ("yes" if reported <= goal else "NO")
        rows.append(row)
    return rows, inner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run)")
    parser.add_argument("--configs", default="cnn,resnet18", help="comma-separated settings: cnn, resnet18")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--rounds", type=int, default=9, help="interleaved timing rounds (median taken)")
    parser.add_argument("--steps", type=int, default=5, help="at most this many steps per method per round")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is steadier on a busy machine)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    rounds, max_steps = (3, 2) if args.quick else (args.rounds, args.steps)
    rows, inner = [], {}
    for name in args.configs.split(","):
        setting_rows, inner[name.strip()] = measure(name.strip(), device, rounds, max_steps)
        rows += setting_rows
        for row in rows[-len(list_optimizers()):]:
            print(f"{row['setting']:9s} {row['method']:6s} {row['ms_per_step']:9.2f} ms  x{row['ratio']:.2f}"
                  + (f"  amortised x{row['ratio_amortised']:.2f}" if "ratio_amortised" in row else ""))
    name = "optimizer_step" if device.type == "cpu" else f"optimizer_step_{device.type}"
    path = write_results(name, rows, {"device": str(device), "rounds": rounds, "steps_per_round": inner,
                         "refresh_timed": "once per sparse method",
                         "batch": 128, "defaults": "registry defaults, base SGD"},
                         columns=["setting", "method", "ms_per_step", "ratio", "ratio_amortised", "refresh_ms",
                                  "goal", "meets_goal"])
    print(path.read_text())


if __name__ == "__main__":
    main()
