"""Hessian spectrum speed and accuracy against PyHessian 0.1 and curvlinops 3.0.1 (+ scipy eigsh).

Per model (``cnn`` on digits at initialisation; ``cnn_sgd``, the shipped SGD-trained reference
checkpoint ``data/cnn_digits_sgd.pt``, on the same digits; ``resnet18`` at initialisation on seeded
random CIFAR-shaped images; BatchNorm on running statistics, float32) and the same evaluation set:
- ``hvp``: time of one HVP (ours: ``HessianOperator``'s double backward through cached first-order
  graphs; also its forward-over-reverse, alone and per vector of a K=4 vmapped pass, forced by
  ``cache_bytes=0``; PyHessian's double backward) over one forward+backward (``loss.backward()``) of
  the whole set.
- ``top5``: wall time, HVPs and largest relative eigenvalue error of ours (``hessian_spectrum``,
  tol 1e-4), PyHessian ``eigenvalues(top_n=5)`` at its defaults and at tol 1e-6, and curvlinops'
  ``HessianLinearOperator`` + ``scipy.sparse.linalg.eigsh(k=5, which="LA", tol=1e-4)``. The reference is
  ARPACK (``eigsh``, tol 1e-10) on our float64 operator. TensorFloat-32 is off for every method.
- ``slq``: ``n_v`` x ``m`` Lanczos steps, ours (runs in lockstep, batched passes) against curvlinops'
  ``lanczos_approximate_spectrum(ncv=m, num_repeats=n_v)`` (no reorthogonalisation, plus its eigsh
  boundary estimate). PyHessian's ``density`` is called too and its failure recorded.

    python benchmarks/hessian.py [--quick] [--device cpu|cuda] [--models cnn,cnn_sgd,resnet18] [--parts hvp,top5,slq]
                                 [--pyhessian-cap SECONDS] [--threads N] [--tag _x]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.sparse.linalg import LinearOperator, eigsh

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import timeit, write_results  # noqa: E402

from landscape.analysis.hessian import full_float32, hessian_spectrum  # noqa: E402
from landscape.checkpoint import load_checkpoint  # noqa: E402
from landscape.curvature.hessian import HessianOperator  # noqa: E402
from landscape.curvature.pyhessian_backend import pyhessian_hessian  # noqa: E402
from landscape.curvature.slq import slq  # noqa: E402
from landscape.data import load_dataset  # noqa: E402
from landscape.models import build_model  # noqa: E402
from landscape.objective import Objective  # noqa: E402

EXAMPLES = {"cnn": (512, 256), "cnn_sgd": (512, 256), "resnet18": (512, 128)}  # model -> (examples, with --quick)
TRAINED = {"cnn_sgd": Path(__file__).resolve().parents[1] / "data" / "cnn_digits_sgd.pt"}
SLQ = (4, 90)                                            # n_v, Lanczos steps (halved-ish with --quick)
TOL = 1e-4


class Capped(Exception):
    """PyHessian ran past ``--pyhessian-cap`` seconds."""


def evaluation_set(name: str, examples: int) -> tuple[torch.Tensor, torch.Tensor]:
    if name == "resnet18":
        generator = torch.Generator().manual_seed(0)
        return (torch.randn(examples, 3, 32, 32, generator=generator),
                torch.randint(0, 10, (examples,), generator=generator))
    x, y = load_dataset("digits").split("train")
    return x[:examples], y[:examples]


def setup(name: str, examples: int, device: torch.device) -> tuple[torch.nn.Module, Objective, Objective]:
    torch.manual_seed(0)
    if name in TRAINED:
        model = load_checkpoint(TRAINED[name]).model.to(device).eval()
    else:
        model = build_model(name, 10, (3, 32, 32) if name == "resnet18" else (1, 8, 8)).to(device).eval()
    x, y = evaluation_set(name, examples)
    single = Objective(model, x, y, batch_size=256, device=device)
    double = Objective(model, x, y, batch_size=256, device=device, dtype=torch.float64)
    return model, single, double


def synced(function):
    def run():
        out = function()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return out
    return run


def forward_backward(model: torch.nn.Module, objective: Objective) -> None:
    for x, y, weight in objective.batches():
        (F.cross_entropy(model(x), y) * weight).backward()
    model.zero_grad(set_to_none=True)


def hvp_rows(name: str, model, objective: Objective, repeat: int) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    vector = {n: torch.randn(p.shape, generator=generator).to(p) for n, p in objective.params.items()}
    operator = HessianOperator(objective)
    uncached = HessianOperator(objective, cache_bytes=0)   # forward-over-reverse, vmapped for several vectors
    single = torch.cat([t.reshape(1, -1) for t in vector.values()], dim=1)
    block = torch.cat([single] * 4)
    pyhessian = pyhessian_hessian(operator)
    flat = [vector[n] for n in objective.params]
    base = timeit(synced(lambda: forward_backward(model, objective)), repeat)
    times = {"forward+backward (loss.backward)": base,
             "HVP ours, one vector (double backward, cached graphs)":
                 timeit(synced(lambda: operator.apply(single)), repeat),
             "HVP ours, one vector, forward-over-reverse (torch.func)":
                 timeit(synced(lambda: uncached.apply(single)), repeat),
             "HVP ours, forward-over-reverse vmapped K=4, per vector":
                 timeit(synced(lambda: uncached.apply(block)), repeat) / 4,
             "HVP PyHessian (double backward)": timeit(synced(lambda: pyhessian.dataloader_hv_product(flat)), repeat)}
    note = f"{len(operator.graphs)} of {-(-objective.num_examples // objective.batch_size)} batch graphs cached, " \
           f"{operator.graph_bytes / 2**20:.0f} MiB"
    return [{"model": name, "part": "hvp", "method": method, "time_s": seconds, "ratio": seconds / base,
             "note": note if "cached" in method else ""} for method, seconds in times.items()]


def counted_scipy(matvec, dim: int, counter: list[int]) -> LinearOperator:
    def apply(x: np.ndarray) -> np.ndarray:
        counter[0] += 1 if x.ndim == 1 else x.shape[1]
        return matvec(x)
    return LinearOperator((dim, dim), matvec=apply, dtype=np.float64)


def relative_error(values, reference: np.ndarray) -> float:
    values = np.sort(np.asarray(values, dtype=float))[::-1]
    return float(np.max(np.abs(values - reference) / np.abs(reference)))


def reference_top5(double: Objective) -> tuple[np.ndarray, float, int]:
    operator = HessianOperator(double)
    start = time.perf_counter()
    values = eigsh(operator.to_scipy(), k=5, which="LA", tol=1e-10,
                   v0=np.random.default_rng(0).standard_normal(operator.dim), return_eigenvectors=False)
    return np.sort(values)[::-1], time.perf_counter() - start, operator.products


def top5_rows(name: str, model, objective: Objective, double: Objective, cap: float) -> list[dict]:
    reference, seconds, hvps = reference_top5(double)
    rows = [{"model": name, "part": "top5", "method": "reference: eigsh tol=1e-10 on our float64 HVP",
             "time_s": seconds, "hvps": hvps, "rel_err": 0.0, "note": ", ".join(f"{v:.5g}" for v in reference)}]

    start = time.perf_counter()
    result = synced(lambda: hessian_spectrum(objective, 5, tol=TOL))()
    ours_time = time.perf_counter() - start
    rows.append({"model": name, "part": "top5", "method": f"ours: thick-restart Lanczos tol={TOL:g}",
                 "time_s": ours_time, "hvps": result["hvp_count"],
                 "rel_err": relative_error(result["eigenvalues"], reference), "ratio": 1.0,
                 "note": f"converged={result['all_converged']}, max measured residual {max(result['residuals']):.1e} "
                         "(HVPs include 5 measuring the residuals)"})

    for tol, what in ((1e-3, "defaults (maxIter=100, tol=1e-3)"), (1e-6, "tol=1e-6 (maxIter=100)")):
        rows.append(pyhessian_top5(name, objective, reference, ours_time, cap, tol, what))

    from curvlinops import HessianLinearOperator
    params = [p for p in model.parameters() if p.requires_grad]
    data = [(x, y) for x, y, _ in objective.batches()]
    counter = [0]
    started = time.perf_counter()
    linear = HessianLinearOperator(model, torch.nn.CrossEntropyLoss(), params, data,
                                   check_deterministic=False).to_scipy()
    scipy_operator = counted_scipy(lambda x: linear @ x, linear.shape[0], counter)
    values = eigsh(scipy_operator, k=5, which="LA", tol=TOL, return_eigenvectors=False,
                   v0=np.random.default_rng(0).standard_normal(linear.shape[0]))
    seconds = time.perf_counter() - started
    rows.append({"model": name, "part": "top5", "method": f"curvlinops HessianLinearOperator + eigsh tol={TOL:g}",
                 "time_s": seconds, "hvps": counter[0], "rel_err": relative_error(values, reference),
                 "ratio": seconds / ours_time,
                 "note": f"{counter[0] / (result['hvp_count'] - 5):.2f}x our Lanczos HVPs ({result['hvp_count'] - 5})"})
    return rows


def pyhessian_top5(name: str, objective: Objective, reference: np.ndarray, ours_time: float, cap: float,
                   tol: float, what: str) -> dict:
    """PyHessian ``eigenvalues(top_n=5, tol=tol)``, cut off after ``cap`` seconds."""
    operator = HessianOperator(objective)
    started = time.perf_counter()

    def stop_at_cap(count: int) -> None:
        if time.perf_counter() - started > cap:
            raise Capped

    operator.progress = stop_at_cap
    pyhessian = pyhessian_hessian(operator)
    torch.manual_seed(0)
    row = {"model": name, "part": "top5", "method": f"PyHessian eigenvalues(top_n=5), {what}"}
    try:
        values, _ = synced(lambda: pyhessian.eigenvalues(top_n=5, tol=tol))()
    except Capped:
        seconds = time.perf_counter() - started
        return {**row, "time_s": seconds, "hvps": operator.products, "rel_err": float("nan"),
                "ratio": seconds / ours_time,
                "note": f"CAPPED at {cap:g} s after {operator.products} HVPs (not finished; time is a lower bound)"}
    seconds = time.perf_counter() - started
    order = "in order" if list(values) == sorted(values, reverse=True) else "OUT OF ORDER"
    return {**row, "time_s": seconds, "hvps": operator.products, "rel_err": relative_error(values, reference),
            "ratio": seconds / ours_time, "note": f"{order}: " + ", ".join(f"{v:.5g}" for v in values)}


def slq_rows(name: str, model, objective: Objective, n_v: int, steps: int) -> list[dict]:
    operator = HessianOperator(objective)
    start = time.perf_counter()
    synced(lambda: slq(operator, n_v, steps))()
    ours = time.perf_counter() - start
    rows = [{"model": name, "part": "slq", "method": f"ours: {n_v} runs x {steps} steps, lockstep, full reorth.",
             "time_s": ours, "hvps": operator.products, "ratio": 1.0,
             "note": "each vector by double backward through the cached graphs" if operator.graphs
             else f"{operator.products // operator.batch} batched data passes"}]

    from curvlinops import HessianLinearOperator, lanczos_approximate_spectrum
    params = [p for p in model.parameters() if p.requires_grad]
    data = [(x, y) for x, y, _ in objective.batches()]
    linear = HessianLinearOperator(model, torch.nn.CrossEntropyLoss(), params, data, check_deterministic=False)
    counter = [0]
    matmat = linear._matmat

    def counted(matrix):
        counter[0] += matrix[0].shape[-1]
        return matmat(matrix)

    linear._matmat = counted
    torch.manual_seed(0)
    start = time.perf_counter()
    synced(lambda: lanczos_approximate_spectrum(linear, steps, num_repeats=n_v))()
    seconds = time.perf_counter() - start
    rows.append({"model": name, "part": "slq", "method": f"curvlinops lanczos_approximate_spectrum(ncv={steps}, "
                 f"num_repeats={n_v})", "time_s": seconds, "hvps": counter[0], "ratio": seconds / ours,
                 "note": "no reorthogonalisation; HVPs include its eigsh boundary estimate"})

    pyhessian = pyhessian_hessian(HessianOperator(objective))
    try:
        pyhessian.density(iter=3, n_v=1)
        note = "ran"
    except Exception as error:  # the point of this row: PyHessian's density does not run on torch >= 1.9
        note = f"fails: {error.__class__.__name__}: {str(error).splitlines()[0][:80]}"
    rows.append({"model": name, "part": "slq", "method": "PyHessian density(iter=3, n_v=1)", "note": note})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer examples, shorter SLQ, one timing repeat")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", default="cnn,cnn_sgd,resnet18")
    parser.add_argument("--parts", default="hvp,top5,slq")
    parser.add_argument("--pyhessian-cap", type=float, default=1800.0,
                        help="seconds before PyHessian's top-5 is cut off")
    parser.add_argument("--tag", default="", help="suffix of the results name, e.g. _cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is steadier on a busy machine)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    parts = args.parts.split(",")
    n_v, steps = (2, 30) if args.quick else SLQ
    rows = []
    for name in args.models.split(","):
        examples = EXAMPLES[name][1 if args.quick else 0]
        model, objective, double = setup(name, examples, device)
        repeat = 1 if args.quick or name == "resnet18" else 5
        print(f"{name}: {objective.num_params} parameters, {examples} examples, {device}", flush=True)
        with full_float32():   # no TensorFloat-32 for any method (it costs ~1e-3 relative accuracy)
            if "hvp" in parts:
                rows += hvp_rows(name, model, objective, repeat)
            if "top5" in parts:
                rows += top5_rows(name, model, objective, double, args.pyhessian_cap)
            if "slq" in parts:
                rows += slq_rows(name, model, objective, n_v, steps)
        for row in rows:
            if row["model"] == name:
                print({k: v for k, v in row.items() if k != "model"}, flush=True)
    sizes = {m: EXAMPLES[m][1 if args.quick else 0] for m in args.models.split(",")}
    meta = {"device": str(device), "quick": args.quick, "examples": sizes, "batch_size": 256, "dtype": "float32",
            "tol": TOL, "slq": f"{n_v}x{steps}",
            "pyhessian_cap_s": args.pyhessian_cap, "ratio": "time / forward+backward (hvp) or time / ours (top5, slq)"}
    path = write_results(f"hessian{'_quick' if args.quick else ''}{args.tag}", rows, meta,
                         columns=["model", "part", "method", "time_s", "hvps", "rel_err", "ratio", "note"])
    print(path.read_text())


if __name__ == "__main__":
    main()
