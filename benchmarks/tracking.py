"""Overhead of tracking the sharpness during training, and what the Lanczos warm start saves.

1. Training ``cnn`` on digits with SGD (registry defaults, seed 0) for ``--epochs`` epochs, without tracking
   and with each tracking setting (``landscape.tracking.Tracking``: the defaults, then denser or richer
   ones), timed in interleaved rounds; the overhead is the median over rounds of (time tracked / time
   plain - 1), next to the tracker's own accounting (the measurements' seconds over the plain run's).
2. Warm against cold starts: the weights of a 5-epoch run every ``--every`` steps, measured in order by a
   warm-started tracker and by one restarted cold (random start) each time, at the default tolerance:
   Hessian-vector products per measurement and the largest relative difference of λ1.

    python benchmarks/tracking.py [--quick] [--epochs 100] [--rounds 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import numpy as np
import torch

from _common import write_results
from landscape.data import load_dataset
from landscape.tracking import SharpnessTracker, Tracking
from landscape.train import train_model

SETTINGS = {  # name -> tracking (None: plain training)
    "none": None,
    "lambda1 (defaults)": Tracking("lambda1"),
    "lambda1,loss (defaults)": Tracking("lambda1,loss"),
    "lambda1,trace,loss (defaults)": Tracking("lambda1,trace,loss"),
    "lambda1, every 10 steps": Tracking("lambda1", every=10),
}


def overhead(epochs: int, rounds: int) -> list[dict]:
    digits = load_dataset("digits")
    train_model(digits, "cnn", "sgd", epochs=1, seed=0, track=Tracking(every=1))   # first-call costs, untimed
    times: dict[str, list[float]] = {name: [] for name in SETTINGS}
    tracked: dict[str, list[float]] = {name: [] for name in SETTINGS}
    measurements: dict[str, dict] = {}
    for _ in range(rounds):
        for name, tracking in SETTINGS.items():
            begin = time.perf_counter()
            result = train_model(digits, "cnn", "sgd", epochs=epochs, seed=0, track=tracking)
            times[name].append(time.perf_counter() - begin)
            if result.tracking is not None:
                tracked[name].append(float(np.sum(result.tracking["seconds"])))
                measurements[name] = result.tracking.arrays
    rows = []
    for name, tracking in SETTINGS.items():
        ratios = [t / plain for t, plain in zip(times[name], times["none"])]
        row = {"setting": name, "train s (median)": statistics.median(times[name]),
               "overhead % (median of rounds)": 100 * (statistics.median(ratios) - 1)}
        if tracking is not None:
            arrays = measurements[name]
            row.update({"every (steps)": int(np.diff(arrays["steps"][:2])[0]) if len(arrays["steps"]) > 1
                        else int(arrays["steps"][0]),
                        "measurements": len(arrays["steps"]),
                        "HVPs / measurement": float(np.mean(arrays["hvps"])),
                        "s / measurement": statistics.median(tracked[name]) / len(arrays["steps"]),
                        "tracker s / plain train s %": 100 * statistics.median(
                            [s / plain for s, plain in zip(tracked[name], times["none"])])})
        rows.append(row)
    return rows


def warm_against_cold(every: int) -> dict:
    digits = load_dataset("digits")
    models = []

    class Keep:
        def __call__(self, *, step, epoch, model, optimizer, lr):
            if step % every == 0:
                models.append((step, copy.deepcopy(model), copy.deepcopy(optimizer), lr))

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    train_model(digits, "cnn", "sgd", epochs=5, seed=0, callbacks=[Keep()])
    tracking = Tracking("lambda1", every=every)
    steps = len(models) * every
    warm = SharpnessTracker(tracking, digits, steps_per_epoch=12, total_steps=steps, batch_size=128)
    cold = SharpnessTracker(tracking, digits, steps_per_epoch=12, total_steps=steps, batch_size=128)
    values = {"warm": [], "cold": []}
    products = {"warm": [], "cold": []}
    for step, model, optimizer, lr in models:
        cold.vectors = None
        for name, tracker in (("warm", warm), ("cold", cold)):
            measured = tracker.measure(model, optimizer, lr, step)
            values[name].append(measured["eigenvalues"][0])
            products[name].append(measured["hvps"])
    warm_values, cold_values = np.array(values["warm"]), np.array(values["cold"])
    return {"every (steps)": every, "measurements": len(models), "tol": tracking.tol,
            "HVPs warm (total)": int(sum(products["warm"])), "HVPs cold (total)": int(sum(products["cold"])),
            "HVPs saved %": 100 * (1 - sum(products["warm"]) / sum(products["cold"])),
            "max |λ1 warm - λ1 cold| / λ1": float(np.max(np.abs(warm_values - cold_values) / cold_values))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: fewer epochs, one round")
    parser.add_argument("--epochs", type=int, default=100, help="training epochs of 12 steps (default 100: 1,200 steps)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    epochs, rounds = (17, 1) if args.quick else (args.epochs, args.rounds)   # 17 epochs: one default measurement
    rows = overhead(epochs, rounds)
    warm_cold = [warm_against_cold(every) for every in (5, 10, 50)]
    for row in rows + warm_cold:
        print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
    meta = {"model": "cnn (digits, SGD registry defaults, batch 128)", "epochs": epochs, "rounds": rounds,
            "threads": args.threads, "tracking defaults": repr(Tracking()),
            "warm vs cold": "; ".join(" ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                               for k, v in row.items()) for row in warm_cold)}
    columns = list(dict.fromkeys(key for row in rows for key in row))  # plain training has no tracker columns
    print(write_results("tracking" + ("_quick" if args.quick else ""), rows, meta, columns))


if __name__ == "__main__":
    main()
