"""2-D loss surface time against the pure-forward limit and loss-landscapes' ``random_plane``.

For each model the same evaluation set is forwarded once per grid point by three methods:
- pure forward: ``model(x)`` per point in inference mode, no landscape machinery (the limit), and
  pure evaluation: the same plus the mean cross-entropy and the accuracy that a surface stores;
- ours: ``landscape.loss_surface`` with an output file (directions, evaluator set-up, per-point
  weight updates, loss and accuracy, incremental HDF5 writes and the final move included), with
  its automatic speed-ups (BatchNorm folding, channels-last, micro-batches, first-layer cache,
  stacked points, in-place activations),
  without the first-layer cache and without stacking (do they pay?), and with none (``plain``:
  the machinery's own overhead);
- loss-landscapes' ``random_plane(..., normalization="filter", deepcopy_model=True)`` with its
  ``Loss`` metric (loss only: less work per point than ours, the goal's comparison), and with a
  metric returning the loss and the accuracy, as a surface of ours stores (equal work), under
  ``torch.no_grad()`` (CPU only: it creates its directions on the CPU).
Every method forwards the whole evaluation set as one batch per point. Each round times every
method back to back (mlp: 9 rounds, cnn: 3, resnet18: 1, after a warm-up round for the small
models); times are medians over rounds and ratios are medians of the within-round ratios, so that
the machine's load drifts between rounds cancel. All-zero parameters (BatchNorm
biases at initialisation) get small random values first, since loss-landscapes' filter normalisation
divides by zero on them.

    python benchmarks/surface.py [--quick] [--threads N] [--device cpu|cuda] [--models mlp,cnn] [--grid 51] [--tag _x]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import timeit, write_results  # noqa: E402

from landscape.analysis.surface import loss_surface  # noqa: E402
from landscape.data import load_dataset  # noqa: E402
from landscape.engine import tune_allocator  # noqa: E402
from landscape.engine.evaluator import PointEvaluator  # noqa: E402
from landscape.models import build_model  # noqa: E402
from landscape.objective import Objective  # noqa: E402
from landscape.params import surface_directions  # noqa: E402

PLAIN = ("fold_batchnorm", "channels_last", "micro_batch", "linear_first_layer", "stack_points", "inplace_activations")
# model -> (grid side, grid side with --quick, examples, examples with --quick, timing repeats)
CASES = {"mlp": (51, 11, None, None, 9), "cnn": (11, 5, None, None, 3), "resnet18": (3, 2, 1000, 200, 1)}


def evaluation_set(name: str, examples: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Digits' train split for the small models; seeded random CIFAR-shaped images for resnet18."""
    if name == "resnet18":
        generator = torch.Generator().manual_seed(0)
        return torch.randn(examples, 3, 32, 32, generator=generator), torch.randint(0, 10, (examples,), generator=generator)
    return load_dataset("digits").split("train")


def pure_forward(model: torch.nn.Module, x: torch.Tensor, points: int) -> None:
    with torch.inference_mode():
        for _ in range(points):
            model(x)
    if x.is_cuda:
        torch.cuda.synchronize()


def pure_evaluation(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, points: int) -> None:
    """The limit including what a surface stores per point: mean loss and accuracy."""
    with torch.inference_mode():
        for _ in range(points):
            out = model(x)
            float(F.cross_entropy(out, y)), int((out.argmax(1) == y).sum())


def ours(objective: Objective, axis: np.ndarray, out: Path, options: dict | None) -> dict:
    """``loss_surface`` writing ``out``; returns the speed-ups it used."""
    return loss_surface(objective, axis, axis, out=out, overwrite=True, evaluator_options=options).attrs["speedups"]


def loss_landscapes_plane(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int,
                          accuracy: bool = False) -> None:
    """``random_plane`` with its ``Loss`` metric, or with one that also counts correct predictions."""
    from loss_landscapes import random_plane
    from loss_landscapes.metrics import Loss, Metric

    class LossAndAccuracy(Metric):
        def __call__(self, model_wrapper) -> tuple[float, float]:
            out = model_wrapper.forward(x)
            return float(F.cross_entropy(out, y)), int((out.argmax(1) == y).sum()) / len(y)

    metric = LossAndAccuracy() if accuracy else Loss(F.cross_entropy, x, y)
    with torch.no_grad():
        random_plane(model, metric, distance=1, steps=steps, normalization="filter", deepcopy_model=True)


def run_case(name: str, quick: bool, device: torch.device, folder: Path, grid: int | None = None) -> dict:
    side, quick_side, examples, quick_examples, repeat = CASES[name]
    side, examples = (quick_side, quick_examples) if quick else (side, examples)
    side = grid or side
    x, y = evaluation_set(name, examples)
    torch.manual_seed(0)
    model = build_model(name, 10, tuple(x.shape[1:])).eval().to(device)
    with torch.no_grad():  # loss-landscapes' filter normalisation divides by zero on all-zero tensors (BN biases)
        for parameter in model.parameters():
            if not parameter.any():
                parameter.normal_(0.0, 0.01)
    x, y = x.to(device), y.to(device)
    axis, points = np.linspace(-1.0, 1.0, side), side * side
    objective = Objective(model, x, y, batch_size=len(x), device=device)
    warmup = 0 if name == "resnet18" else 1
    pure_forward(model, x, 2)
    row = {"model": name, "grid": f"{side}x{side}", "examples": len(x)}
    with torch.no_grad():
        used = PointEvaluator({"train": objective}, surface_directions(objective.params)).speedups
    row["speedups"] = " ".join(f"{k}={v}" for k, v in used.items())
    methods = {"pure_s": lambda: pure_forward(model, x, points),
               "pure_eval_s": lambda: pure_evaluation(model, x, y, points),
               "ours_s": lambda: ours(objective, axis, folder / "s.h5", None),
               "ours_plain_s": lambda: ours(objective, axis, folder / "s.h5", dict.fromkeys(PLAIN, False))}
    if used["linear_first_layer"]:
        methods["ours_no_cache_s"] = lambda: ours(objective, axis, folder / "s.h5", {"linear_first_layer": False})
    if used["stack_points"] > 1:
        methods["ours_unstacked_s"] = lambda: ours(objective, axis, folder / "s.h5", {"stack_points": False})
    if device.type == "cpu":
        methods["loss_landscapes_s"] = lambda: loss_landscapes_plane(model, x, y, side)
        methods["loss_landscapes_eval_s"] = lambda: loss_landscapes_plane(model, x, y, side, accuracy=True)
    times: dict[str, list[float]] = {column: [] for column in methods}
    for round_ in range(warmup + repeat):  # interleaved, so that load drifts hit every method alike
        for column, method in methods.items():
            elapsed = timeit(method, repeat=1, warmup=0)
            if round_ >= warmup:
                times[column].append(elapsed)
    row.update({column: statistics.median(values) for column, values in times.items()})

    def ratio(numerator: str, denominator: str) -> float:  # median over rounds of the within-round ratio
        return statistics.median(a / b for a, b in zip(times[numerator], times[denominator]))

    row["ours_vs_pure"] = ratio("ours_s", "pure_s")
    row["ours_vs_pure_eval"] = ratio("ours_s", "pure_eval_s")
    row["plain_vs_pure"] = ratio("ours_plain_s", "pure_s")
    if device.type == "cpu":
        row["speedup_vs_loss_landscapes"] = ratio("loss_landscapes_s", "ours_s")
        row["speedup_vs_loss_landscapes_eval"] = ratio("loss_landscapes_eval_s", "ours_s")
    row["ms_per_point_ours"] = 1e3 * row["ours_s"] / points
    print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller grids and resnet18 on 200 images")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--models", default=",".join(CASES), help="comma-separated subset of " + ",".join(CASES))
    parser.add_argument("--tag", default="", help="suffix of the results name (runs with other settings)")
    parser.add_argument("--grid", type=int, default=None,
                        help="grid side for every model (default: per model; on a GPU the small grids time set-up)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tune_allocator()  # as the CLI does: glibc keeps freed memory for stacked points
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as folder:
        rows = [run_case(name, args.quick, device, Path(folder), args.grid) for name in args.models.split(",")]
    name = "surface" + ("_quick" if args.quick else "") + ("_cuda" if device.type == "cuda" else "") + args.tag
    meta = {"quick": args.quick, "device": str(device), "goals": "ours_vs_pure <= 1.1; speedup_vs_loss_landscapes >= 1.5",
            "loss_landscapes": "loss_landscapes_s: its Loss metric (loss only); loss_landscapes_eval_s: loss and "
                               "accuracy per point, as ours",
            "batch": "whole evaluation set per forward", "ratios": "medians of within-round ratios", "resnet18": "1000 (quick: 200) random CIFAR-shaped images, "
            "3x3 (quick: 2x2) grid", "digits": "train split, 1437 images; mlp 51x51, cnn 11x11 (quick: 11x11, 5x5)",
            "grid": f"{args.grid}x{args.grid} for every model" if args.grid else "per model",
            "variants": "ours_s: automatic speed-ups; ours_no_cache_s: without the first-layer cache; "
                        "ours_unstacked_s: one point per forward; ours_plain_s: no speed-ups"}
    print(write_results(name, rows, meta).read_text())


if __name__ == "__main__":
    main()
