"""Spectra of the Hessian, the Gauss-Newton matrix or the empirical Fisher of an
:class:`~landscape.objective.Objective`: the analyses and their results.

:func:`hessian_spectrum` builds the curvature operator (``CURVATURES``) and runs the curvature
solvers on it: extreme eigenvalues by thick-restart Lanczos, the spectral density by stochastic
Lanczos quadrature, the trace by Hutch++ or Hutchinson (or, for the Hessian with
``backend="pyhessian"``, eigenvalues and trace from PyHessian 0.1), optionally on a parameter
subset and per block of parameters (:func:`parameter_blocks`). :class:`HessianResult` holds what it
finds and prints its summary; it is stored as one group per curvature (``/hessian``, ``/ggn``,
``/fisher``), so one file holds all three. :func:`minibatch_lambda1` measures how lambda1 spreads
over disjoint mini-batches of the evaluation set (:class:`BatchSpreadResult`, ``/<curvature>_batches``).

Under torchrun the objective is data parallel: every curvature product is summed over the ranks'
shares of the evaluation set (in the operator), and the solvers run identically on every rank.
:func:`minibatch_lambda1` shares its mini-batches out whole instead: each rank measures its own.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from landscape import distributed
from landscape.curvature import NAMES
from landscape.curvature.fisher import EmpiricalFisherOperator
from landscape.curvature.ggn import GGNOperator
from landscape.curvature.hessian import HessianOperator
from landscape.curvature.lanczos import extreme_eigenpairs
from landscape.curvature.operator import CurvatureOperator
from landscape.curvature.pyhessian_backend import pyhessian_eigenpairs, pyhessian_trace
from landscape.curvature.slq import broadened_density, slq
from landscape.curvature.trace import hutchinson_trace, hutchpp_trace
from landscape.errors import LandscapeError
from landscape.objective import Objective
from landscape.registry import Registry
from landscape.results import Result
from landscape.store import provenance

CURVATURES: Registry[type[CurvatureOperator]] = Registry("curvature")
CURVATURES.register("hessian", HessianOperator)
CURVATURES.register("ggn", GGNOperator)
CURVATURES.register("fisher", EmpiricalFisherOperator)
PRODUCTS = {"hessian": "HVPs", "ggn": "GGN products", "fisher": "Fisher products"}
BACKENDS = ("landscape", "pyhessian")
TRACE_METHODS = ("hutch++", "hutchinson")
DEFAULT_TOL = {"landscape": 1e-4, "pyhessian": 1e-3}


@contextlib.contextmanager
def full_float32() -> Iterator[None]:
    """Turn TensorFloat-32 off for convolutions and matmuls (it costs ~1e-3 relative accuracy on GPUs)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def parameter_blocks(objective: Objective) -> dict[str, list[str]]:
    """The objective's parameters grouped by top-level module; containers (``nn.Sequential``,
    ``nn.ModuleList``, ``nn.ModuleDict``) at the top level are split into their children."""
    containers = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
    blocks: dict[str, list[str]] = {}
    for name in objective.params:
        parts = name.split(".")
        depth = 2 if len(parts) > 2 and isinstance(objective.model.get_submodule(parts[0]), containers) else 1
        blocks.setdefault(".".join(parts[:depth]), []).append(name)
    return blocks


class HessianResult(Result):
    """Eigenvalues (descending), optional eigenvectors, SLQ nodes/weights and density, trace; see ``summary()``.
    Its group is the curvature's name (``hessian``, ``ggn``, ``fisher``)."""

    group = "hessian"

    def summary(self) -> str:
        """The summary the CLI prints: eigenvalues with residuals, lambda1/lambda5, trace, products, time."""
        a = self.attrs
        curvature = a.get("curvature", "hessian")
        lines = [f"{NAMES[curvature]} ({a['num_params']} parameters)",
                 f"{'':<12}{'eigenvalue':>14}{'residual':>11}  converged"]
        for prefix, values, residuals, flags in (
                ("λ", self.arrays.get("eigenvalues", []), a.get("residuals", []), a.get("converged", [])),
                ("λmin", self.arrays.get("bottom_eigenvalues", []), a.get("bottom_residuals", []),
                 a.get("bottom_converged", []))):
            for i, (value, residual, flag) in enumerate(zip(values, residuals, flags), start=1):
                lines.append(f"{prefix + str(i):<12}{value:>14.6g}{residual:>11.2e}  {'yes' if flag else 'NO'}")
        if not math.isnan(a.get("lambda1_over_lambda5", math.nan)):
            lines.append(f"{'λ1/λ5':<12}{a['lambda1_over_lambda5']:>14.4g}")
        for name, size, value in zip(a.get("blocks", []), a.get("block_num_params", []),
                                     self.arrays.get("block_eigenvalues", [])):
            lines.append(f"{'λ1 ' + name:<12}{value[0]:>14.6g}   ({size} params)")
        if a.get("trace_method"):
            lines.append(f"{'trace':<12}{a['trace']:>14.6g} ± {a['trace_stderr']:.3g}  ({a['trace_method']})")
        if "density" in self.arrays:
            lines.append(f"{'density':<12}{a['n_v']} runs x {a['lanczos_steps']} Lanczos steps, "
                         f"sigma {a['density_sigma']:.3g}")
        lines.append(f"{PRODUCTS[curvature]:<16}{a['hvp_count']:>10d}")
        lines.append(f"{'time':<12}{a['time_s']:>13.1f}s")
        return "\n".join(lines)


@full_float32()
def hessian_spectrum(objective: Objective, top_k: int = 5, *, bottom_k: int = 0, eigenvectors: bool = False,
                     density: bool = False, trace: bool = False, n_v: int = 4, lanczos_steps: int = 90,
                     tol: float | None = None, params: str | Sequence[str] | None = None, per_block: bool = False,
                     backend: str = "landscape", seed: int = 0, progress: Callable[[int], Any] | None = None,
                     trace_hvps: int = 99, trace_method: str = "hutch++", max_hvps: int = 1000,
                     density_sigma: float | None = None, hvp_batch: int = 4,
                     curvature: str = "hessian") -> HessianResult:
    """Top/bottom eigenvalues, spectral density and trace of the Hessian of ``objective`` (or its GGN or
    empirical Fisher). "HVPs" below are products with the chosen matrix.

    Args:
        objective: the loss over a fixed evaluation set; never modified.
        top_k: largest eigenvalues (descending), with residuals and convergence flags.
        bottom_k: smallest (most negative) eigenvalues, ascending.
        eigenvectors: also return the unit eigenvectors, ``(k, d)`` in parameter order.
        density: SLQ spectral density from ``n_v`` Rademacher starts of ``lanczos_steps`` steps each.
        trace: ``trace_method`` (``hutch++`` or ``hutchinson``) with ``trace_hvps`` HVPs.
        tol: relative residual tolerance ``||Hv - lambda v|| <= tol |lambda|`` (default 1e-4; with
            ``backend="pyhessian"`` PyHessian's own stopping rule, default 1e-3).
        params: glob(s) restricting everything to a parameter subset (the sub-block of H).
        per_block: also the ``top_k`` eigenvalues of each top-level block's sub-Hessian.
        backend: ``landscape`` or ``pyhessian`` (eigenvalues and trace; the density is always ours).
        seed: seeds every random start and probe.
        progress: called with the number of new HVPs after every data pass.
        max_hvps: HVP cap per eigenvalue run; unconverged pairs are flagged and warned about.
        density_sigma: Gaussian width in eigenvalue units (default 1e-3 of the spectrum's width).
        hvp_batch: HVPs per data pass (memory grows with it).
        curvature: ``hessian``; ``ggn``, the generalised Gauss-Newton matrix ``(1/N) sum J^T H_L J``
            (:class:`~landscape.curvature.ggn.GGNOperator`); or ``fisher``, the EMPIRICAL Fisher
            ``(1/N) sum g_i g_i^T`` of the per-example gradients at the true labels (not the Fisher;
            :class:`~landscape.curvature.fisher.EmpiricalFisherOperator`, needs ``bn="eval"`` with BatchNorm).
            The result's group is this name.
    """
    begin = time.perf_counter()
    tol = DEFAULT_TOL.get(backend, 0.0) if tol is None else float(tol)
    config = {"top_k": top_k, "bottom_k": bottom_k, "eigenvectors": eigenvectors, "density": density,
              "trace": trace, "n_v": n_v, "lanczos_steps": lanczos_steps, "tol": tol, "params": params,
              "per_block": per_block, "backend": backend, "trace_hvps": trace_hvps, "trace_method": trace_method,
              "max_hvps": max_hvps, "density_sigma": density_sigma, "hvp_batch": hvp_batch,
              "curvature": curvature, "bn": objective.bn, "dtype": str(objective.dtype).replace("torch.", ""),
              "batch_size": objective.batch_size}
    if params is not None:
        objective = objective.derive(params=params)
    _validate(objective, config)
    objective.require_finite("a curvature spectrum")
    operator = CURVATURES.get(curvature)(objective, hvp_batch, progress)
    arrays: dict[str, Any] = {}
    attrs: dict[str, Any] = {"curvature": curvature, "backend": backend, "tol": tol, "num_params": operator.dim,
                             "hvp_count_eigen": 0, "hvp_count_blocks": 0, "hvp_count_density": 0,
                             "hvp_count_trace": 0}
    if top_k or bottom_k:
        pairs = _eigenpairs(operator, top_k, bottom_k, tol, max_hvps, seed, eigenvectors, backend)
        arrays["eigenvalues"] = pairs["top"]
        attrs.update(residuals=pairs["top_residuals"].tolist(), converged=pairs["top_converged"].tolist())
        if bottom_k:
            arrays["bottom_eigenvalues"] = pairs["bottom"]
            attrs.update(bottom_residuals=pairs["bottom_residuals"].tolist(),
                         bottom_converged=pairs["bottom_converged"].tolist())
        if eigenvectors:
            arrays["eigenvectors"] = pairs["top_vectors"].cpu().numpy()
            if bottom_k:
                arrays["bottom_eigenvectors"] = pairs["bottom_vectors"].cpu().numpy()
        attrs["hvp_count_eigen"] = operator.products
    attrs["all_converged"] = bool(all(attrs.get("converged", [])) and all(attrs.get("bottom_converged", [])))
    top = arrays.get("eigenvalues", np.zeros(0))
    attrs["lambda1"] = float(top[0]) if len(top) else math.nan
    attrs["lambda1_over_lambda5"] = float(top[0] / top[4]) if len(top) >= 5 else math.nan
    if per_block:
        _blocks(objective, operator, top_k, tol, max_hvps, seed, backend, arrays, attrs)
    if density:
        counted = operator.products
        nodes, weights = slq(operator, n_v, lanczos_steps, seed)
        grid, values, sigma = broadened_density(nodes, weights, density_sigma)
        arrays.update(slq_nodes=nodes, slq_weights=weights, density_grid=grid, density=values)
        attrs.update(density_sigma=sigma, n_v=n_v, lanczos_steps=nodes.shape[1],
                     hvp_count_density=operator.products - counted)
    if trace:
        counted = operator.products
        if backend == "pyhessian":
            estimate, stderr = pyhessian_trace(operator, trace_hvps, tol, seed)
            method = "pyhessian-hutchinson"
        elif trace_method == "hutch++":
            estimate, stderr = hutchpp_trace(operator, trace_hvps, seed)
            method = trace_method
        else:
            estimate, stderr = hutchinson_trace(operator, trace_hvps, seed)
            method = trace_method
        attrs.update(trace=estimate, trace_stderr=stderr, trace_method=method,
                     hvp_count_trace=operator.products - counted)
    attrs.update(hvp_count=operator.products, time_s=time.perf_counter() - begin)
    attrs.update(provenance(config, objective.provenance(), seed, objective.device))
    _warn_unconverged(attrs, NAMES[curvature])
    return HessianResult(arrays, attrs, group=curvature)


class BatchSpreadResult(Result):
    """lambda1 on disjoint mini-batches: ``batch_lambda1`` ``(batches,)`` with ``batch_residuals`` and
    ``batch_converged``, ``batch_indices`` ``(batches, per_batch)`` (rows of the evaluation set),
    ``histogram_counts``/``histogram_edges`` (numpy's Sturges bins), and the attrs ``mean``, ``std``
    (sample standard deviation, ``ddof=1``) and ``stderr`` (``std / sqrt(batches)``); see ``summary()``.
    Its group is ``<curvature>_batches``."""

    group = "hessian_batches"

    def summary(self) -> str:
        """The summary the CLI prints: lambda1 per batch with residuals, mean, std, stderr, range, products, time."""
        a, values = self.attrs, np.asarray(self.arrays["batch_lambda1"])
        lines = [f"λ1 of the {NAMES[a['curvature']]} on {len(values)} mini-batches of {a['per_batch']} examples",
                 f"{'':<12}{'λ1':>14}{'residual':>11}  converged"]
        for i, (value, residual, flag) in enumerate(zip(values, self.arrays["batch_residuals"],
                                                        self.arrays["batch_converged"]), start=1):
            lines.append(f"{'batch ' + str(i):<12}{value:>14.6g}{residual:>11.2e}  {'yes' if flag else 'NO'}")
        for name in ("mean", "std", "stderr"):
            lines.append(f"{name:<12}{a[name]:>14.6g}")
        lines.append(f"{'min, max':<12}{values.min():>14.6g}{values.max():>11.6g}  (max/min {a['max_over_min']:.3g})")
        lines.append(f"{PRODUCTS[a['curvature']]:<16}{a['hvp_count']:>10d}")
        lines.append(f"{'time':<12}{a['time_s']:>13.1f}s")
        return "\n".join(lines)


@full_float32()
def minibatch_lambda1(objective: Objective, per_batch: int, batches: int = 8, *, curvature: str = "hessian",
                      tol: float | None = None, params: str | Sequence[str] | None = None, max_hvps: int = 1000,
                      hvp_batch: int = 4, seed: int = 0,
                      progress: Callable[[int], Any] | None = None) -> BatchSpreadResult:
    """lambda1 of the Hessian (or GGN, empirical Fisher: ``curvature``) of the loss on each of ``batches``
    disjoint mini-batches of ``per_batch`` examples, with its mean, standard deviation, standard error and
    histogram over the batches (how far a mini-batch lambda1 is from another: PyHessian issue 5).

    The batches are the first ``batches * per_batch`` entries of a permutation of the evaluation set drawn
    with ``seed``; each lambda1 is a Lanczos top-1 to ``tol`` (default 1e-4) on the objective restricted to
    that batch (``Objective.derive(examples=...)``), at most ``max_hvps`` products. ``params`` restricts to
    a parameter subset as in :func:`hessian_spectrum`.
    """
    begin = time.perf_counter()
    tol = DEFAULT_TOL["landscape"] if tol is None else float(tol)
    config = {"per_batch": per_batch, "batches": batches, "curvature": curvature, "tol": tol, "params": params,
              "max_hvps": max_hvps, "hvp_batch": hvp_batch, "bn": objective.bn,
              "dtype": str(objective.dtype).replace("torch.", ""), "batch_size": objective.batch_size}
    n = objective.num_examples
    _raise_first([
        _known_curvature(curvature),
        (per_batch >= 1 and batches >= 2, f"need per_batch >= 1 and batches >= 2 for a spread, got {per_batch} "
                                          f"and {batches}"),
        (per_batch * batches <= n, f"{batches} disjoint batches of {per_batch} need {per_batch * batches} examples; "
                                   f"the evaluation set has {n}: lower --batches or --per-batch, or raise --subset"),
        (0 < tol < 1, f"tol must be in (0, 1), got {tol}"),
        (max_hvps >= 1 and hvp_batch >= 1, f"max_hvps and hvp_batch must be >= 1, got {max_hvps} and {hvp_batch}"),
    ])
    if params is not None:
        objective = objective.derive(params=params)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:per_batch * batches].numpy()
    indices = np.sort(order.reshape(batches, per_batch), axis=1)
    lambda1, residuals, converged, products = (np.full(batches, np.nan), np.full(batches, np.nan),
                                                np.zeros(batches, dtype=bool), np.zeros(batches, dtype=np.int64))
    for b in distributed.share(batches):  # (under torchrun each rank measures its share of the batches)
        operator = CURVATURES.get(curvature)(objective.derive(examples=indices[b]), hvp_batch, progress)
        pairs = extreme_eigenpairs(operator, 1, 0, tol, max_hvps, seed)
        lambda1[b], residuals[b], converged[b] = pairs["top"][0], pairs["top_residuals"][0], pairs["top_converged"][0]
        products[b] = operator.products
    lambda1, residuals, converged, products = distributed.gather_shares([lambda1, residuals, converged, products],
                                                                        axes=[0, 0, 0, 0])
    counts, edges = np.histogram(lambda1, bins="sturges")
    std = float(lambda1.std(ddof=1))
    arrays = {"batch_lambda1": lambda1, "batch_residuals": residuals,
              "batch_converged": converged, "batch_indices": indices,
              "histogram_counts": counts, "histogram_edges": edges}
    attrs: dict[str, Any] = {
        "curvature": curvature, "per_batch": per_batch, "batches": batches, "tol": tol,
        "num_params": objective.num_params,
        "mean": float(lambda1.mean()), "std": std, "stderr": std / math.sqrt(batches),
        "max_over_min": float(lambda1.max() / lambda1.min()) if lambda1.min() > 0 else math.nan,
        "all_converged": bool(converged.all()),
        "hvp_count": int(products.sum()), "time_s": time.perf_counter() - begin}
    attrs.update(provenance(config, objective.provenance(), seed, objective.device))
    _warn_unconverged(attrs, NAMES[curvature])
    return BatchSpreadResult(arrays, attrs, group=f"{curvature}_batches")


def _eigenpairs(operator: CurvatureOperator, top_k: int, bottom_k: int, tol: float, max_hvps: int, seed: int,
                eigenvectors: bool, backend: str) -> dict[str, Any]:
    if backend == "pyhessian":
        return pyhessian_eigenpairs(operator, top_k, tol, seed, eigenvectors)
    return extreme_eigenpairs(operator, top_k, bottom_k, tol, max_hvps, seed, eigenvectors)


def _blocks(objective: Objective, operator: CurvatureOperator, top_k: int, tol: float, max_hvps: int, seed: int,
            backend: str, arrays: dict[str, Any], attrs: dict[str, Any]) -> None:
    """``top_k`` eigenvalues of each block's sub-matrix into ``block_eigenvalues`` ``(blocks, top_k)``."""
    counted = operator.products
    names, sizes, values, converged = [], [], [], []
    for name, members in parameter_blocks(objective).items():
        sub_operator = type(operator)(objective.derive(params=members), operator.batch, operator.record)
        k = min(top_k, sub_operator.dim)
        pairs = _eigenpairs(sub_operator, k, 0, tol, max_hvps, seed, False, backend)
        names.append(name)
        sizes.append(sub_operator.dim)
        values.append(np.r_[pairs["top"], np.full(top_k - k, np.nan)])
        converged.append(bool(pairs["top_converged"].all()))
    arrays["block_eigenvalues"] = np.array(values)
    attrs.update(blocks=names, block_num_params=sizes, block_converged=converged,
                 hvp_count_blocks=operator.products - counted)


def _validate(objective: Objective, config: dict[str, Any]) -> None:
    top_k, bottom_k, backend = config["top_k"], config["bottom_k"], config["backend"]
    dim = objective.num_params
    checks = [
        _known_curvature(config["curvature"]),
        (backend in BACKENDS, f"unknown backend {backend!r}; use {' or '.join(BACKENDS)}"),
        (backend == "landscape" or config["curvature"] == "hessian",
         f"the pyhessian backend computes the Hessian only; use backend='landscape' for {config['curvature']!r}"),
        (config["trace_method"] in TRACE_METHODS,
         f"unknown trace method {config['trace_method']!r}; use {' or '.join(TRACE_METHODS)}"),
        (top_k >= 0 and bottom_k >= 0, f"top_k and bottom_k must be >= 0, got {top_k} and {bottom_k}"),
        (top_k + bottom_k <= dim,
         f"asked for {top_k + bottom_k} eigenvalues of a {dim}x{dim} matrix; ask for at most {dim}"),
        (bool(top_k or bottom_k or config["density"] or config["trace"]),
         "nothing to compute; ask for top_k/bottom_k eigenvalues, the density or the trace"),
        (0 < config["tol"] < 1, f"tol must be in (0, 1), got {config['tol']}"),
        (config["n_v"] >= 1, f"n_v must be >= 1, got {config['n_v']}"),
        (config["lanczos_steps"] >= 2, f"lanczos_steps must be >= 2, got {config['lanczos_steps']}"),
        (config["trace_hvps"] >= (6 if config["trace_method"] == "hutch++" else 2),
         f"trace_hvps={config['trace_hvps']} is too few for a standard error; use at least 6"),
        (config["max_hvps"] >= 1, f"max_hvps must be >= 1, got {config['max_hvps']}"),
        (config["hvp_batch"] >= 1, f"hvp_batch must be >= 1, got {config['hvp_batch']}"),
        (not (config["per_block"] and top_k == 0), "per_block needs top_k >= 1"),
        (not (backend == "pyhessian" and bottom_k),
         "the pyhessian backend has no smallest eigenvalues; use backend='landscape' for bottom_k"),
    ]
    _raise_first(checks)


def _known_curvature(curvature: str) -> tuple[bool, str]:
    return curvature in CURVATURES, f"unknown curvature {curvature!r}; use {', '.join(CURVATURES)}"


def _raise_first(checks: Sequence[tuple[bool, str]]) -> None:
    """Raise the message of the first failed check as a one-line :class:`LandscapeError`."""
    for ok, message in checks:
        if not ok:
            raise LandscapeError(message)


def _warn_unconverged(attrs: dict[str, Any], name: str) -> None:
    if not attrs["all_converged"] or not all(attrs.get("block_converged", [])):
        warnings.warn(f"some {name} eigenpairs did not reach tol={attrs['tol']:g} (see residuals/converged); "
                      "raise max_hvps, use float64, or loosen tol", RuntimeWarning, stacklevel=3)
