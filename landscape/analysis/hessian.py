"""Hessian spectrum of an :class:`~landscape.objective.Objective`, from Hessian-vector products only.

- HVPs: one vector by double backward through first-order graphs kept from the first product
  (when they fit in memory; 1.3-1.7x a forward+backward on CPU, against 1.6-3x for
  ``Objective.hvp``); several vectors per data pass by ``Objective.hvp_batched``.
- Extreme eigenvalues: Lanczos with full reorthogonalisation and thick restarts; every wanted
  Ritz pair is checked after every HVP and the run stops as soon as all meet the tolerance.
- Spectral density: stochastic Lanczos quadrature (Ghorbani et al. 2019), the ``n_v`` runs in
  lockstep so that one data pass serves several starts (``Objective.hvp_batched``).
- Trace: Hutch++ (Meyer et al. 2021) or Hutchinson, Rademacher probes, with a standard error.
- ``backend="pyhessian"``: eigenvalues and trace from PyHessian 0.1 (power iteration), run on a
  throw-away module holding a copy of the weights, so the user's model is never touched.
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
from torch import Tensor, nn

from landscape.errors import LandscapeError
from landscape.objective import Objective
from landscape.results import Result
from landscape.store import provenance

BACKENDS = ("landscape", "pyhessian")
TRACE_METHODS = ("hutch++", "hutchinson")
DEFAULT_TOL = {"landscape": 1e-4, "pyhessian": 1e-3}
BASIS_BYTES = 2 * 2**30      # CPU memory allowed for Lanczos vectors (on CUDA: half the free memory)
GRAPH_BYTES = 2 * 2**30      # CPU memory allowed for cached first-order graphs (on CUDA: a quarter of the free memory)
MAX_BASIS = 256              # most Lanczos vectors kept for the extreme eigenvalues
DENSITY_SIGMA = 1e-3         # default Gaussian width, relative to the width of the Ritz spectrum
GRID_PER_SIGMA = 4           # density grid points per sigma
GRID_TAILS = 8               # grid reaches this many sigmas beyond the outermost Ritz values
MAX_GRID = 2_000_000
_COLUMNS = 2**20             # basis columns transformed at once by a thick restart


class HessianOperator:
    """The Hessian of ``objective`` as a map on flat vectors, ``(K, d) -> (K, d)``.

    - One vector (sequential Lanczos), and every vector on the CPU: double backward through every
      batch's first-order graph, built once and kept, when all of them fit in ``cache_bytes``
      (default :func:`graph_cache_bytes`); otherwise ``Objective.hvp`` (forward-over-reverse,
      recomputed for every product). On the CPU a batched pass costs as much as its vectors one by
      one (cnn on 512 digits: 0.049 s per vector cached, 0.077 s batched), so batching does not pay.
    - Several vectors elsewhere: ``Objective.hvp_batched``, up to ``batch`` vectors per data pass.

    ``progress(n)`` is called after every pass with the number of new HVPs; ``count`` counts them
    (``objective.hvp_count`` too).
    """

    def __init__(self, objective: Objective, batch: int = 4, progress: Callable[[int], Any] | None = None,
                 cache_bytes: int | None = None) -> None:
        self.objective = objective
        self.shapes = {name: p.shape for name, p in objective.params.items()}
        self.sizes = [p.numel() for p in objective.params.values()]
        self.dim = sum(self.sizes)
        self.dtype, self.device = objective.dtype, objective.device
        self.batch = max(1, int(batch))
        self.progress = progress
        self.count = 0
        self.cache_bytes = graph_cache_bytes(self.device) if cache_bytes is None else cache_bytes
        self.leaves = [p.detach().requires_grad_() for p in objective.params.values()]
        self.graphs: list[tuple[list[Tensor | None], float]] | None = None   # decided at the first single HVP
        self.graph_bytes = 0

    def __call__(self, vectors: Tensor) -> Tensor:
        return torch.cat([self._apply(chunk) for chunk in vectors.split(self.batch)])

    def _apply(self, chunk: Tensor) -> Tensor:
        k = len(chunk)
        sequential = k == 1 or self.device.type == "cpu"
        if self.graphs is None and sequential:
            self.graphs = self._cached_graphs()
        if sequential and self.graphs:
            self.objective.hvp_count += k
            out = torch.stack([self._double_backward(vector) for vector in chunk])
        else:
            parts = dict(zip(self.shapes, chunk.split(self.sizes, dim=1)))
            if k == 1:
                products = self.objective.hvp({n: parts[n].reshape(s) for n, s in self.shapes.items()})
            else:
                products = self.objective.hvp_batched({n: parts[n].reshape(k, *s) for n, s in self.shapes.items()})
            out = torch.cat([products[n].reshape(k, -1) for n in self.shapes], dim=1)
        self.record(k)
        return out

    def _first_order(self, x: Tensor, y: Tensor, measure: bool = False) -> tuple[list[Tensor | None], int]:
        """The batch loss's gradients with their graph; with ``measure``, also the bytes that graph holds
        (counted by saved-tensor hooks, which would slow every later use of the graph: measure on a copy)."""
        held: dict[int, int] = {}

        def pack(tensor: Tensor) -> Tensor:
            held[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
            return tensor

        hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t) if measure else contextlib.nullcontext()
        with torch.enable_grad(), hooks:
            loss = self.objective.batch_loss(dict(zip(self.shapes, self.leaves)), x, y)
            grads = torch.autograd.grad(loss, self.leaves, create_graph=True, allow_unused=True)
        return list(grads), sum(held.values())

    def _cached_graphs(self) -> list[tuple[list[Tensor | None], float]]:
        """Every batch's first-order graph with its weight, or none if (by the first batch) they would
        not all fit in ``cache_bytes``."""
        batches = list(self.objective.batches())
        first = batches[0][0]
        estimate = self._first_order(first, batches[0][1], measure=True)[1] * self.objective.num_examples / len(first)
        if estimate > self.cache_bytes:
            return []
        self.graph_bytes = int(estimate)
        return [(self._first_order(x, y)[0], weight) for x, y, weight in batches]

    def _double_backward(self, vector: Tensor) -> Tensor:
        tangents = [t.reshape(s) for t, s in zip(vector.split(self.sizes), self.shapes.values())]
        total = [torch.zeros_like(t) for t in tangents]
        for grads, weight in self.graphs:
            live = [(g, t) for g, t in zip(grads, tangents) if g is not None and g.requires_grad]
            if not live:
                continue
            products = torch.autograd.grad([g for g, _ in live], self.leaves, grad_outputs=[t for _, t in live],
                                           retain_graph=True, allow_unused=True)
            for accumulated, product in zip(total, products):
                if product is not None:
                    accumulated.add_(product, alpha=weight)
        return torch.cat([t.reshape(-1) for t in total])

    def record(self, count: int) -> None:
        """Count ``count`` HVPs (also those computed outside, e.g. by PyHessian)."""
        self.count += count
        if self.progress is not None:
            self.progress(count)

    def flat(self, tensors: Sequence[Tensor]) -> Tensor:
        """Concatenate per-parameter tensors (in parameter order) into one ``(d,)`` vector."""
        return torch.cat([t.reshape(-1) for t in tensors]).to(self.device, self.dtype)


def basis_bytes(device: torch.device) -> int:
    """Memory Lanczos vectors may take: ``BASIS_BYTES`` on the CPU, half the free memory on a GPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] // 2
    return BASIS_BYTES


def graph_cache_bytes(device: torch.device) -> int:
    """Memory cached first-order graphs may take: ``GRAPH_BYTES`` on the CPU, a quarter of the free GPU memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] // 4
    return GRAPH_BYTES


@contextlib.contextmanager
def full_float32() -> Iterator[None]:
    """Turn TensorFloat-32 off for convolutions and matmuls (it costs ~1e-3 relative accuracy on GPUs)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def rademacher(count: int, dim: int, generator: torch.Generator, like: HessianOperator) -> Tensor:
    """``(count, dim)`` random signs, drawn on the CPU (device-independent) in the operator's dtype."""
    signs = torch.randint(0, 2, (count, dim), generator=generator, dtype=torch.int8)
    return signs.to(like.device, like.dtype).mul_(2).sub_(1)


class Lanczos:
    """``K`` Lanczos processes in lockstep, fully reorthogonalised (classical Gram-Schmidt, twice).

    ``basis[k, :size]`` is orthonormal and ``T[k, :size, :size] = V^T H V`` (symmetric, float64),
    with ``H V = V T + beta v e_last^T`` where ``v = basis[k, size]`` is the next vector.
    """

    def __init__(self, starts: Tensor, capacity: int, generator: torch.Generator) -> None:
        count, dim = starts.shape
        self.dim, self.capacity, self.generator = dim, capacity, generator
        self.basis = starts.new_zeros(count, capacity + 1, dim)
        self.basis[:, 0] = starts / torch.linalg.vector_norm(starts, dim=1, keepdim=True)
        self.T = np.zeros((count, capacity, capacity))
        self.beta = np.zeros(count)
        self.size = 0

    def _orthogonalize(self, w: Tensor, upto: int) -> tuple[Tensor, Tensor]:
        """``w`` minus its projection on ``basis[:, :upto]`` (twice), and the projection coefficients."""
        basis = self.basis[:, :upto]
        coefficients = torch.zeros(w.shape[0], upto, dtype=w.dtype, device=w.device)
        for _ in range(2):
            c = torch.bmm(basis, w.unsqueeze(2)).squeeze(2)
            w = w - torch.bmm(c.unsqueeze(1), basis).squeeze(1)
            coefficients += c
        return w, coefficients

    def step(self, operator: HessianOperator) -> None:
        """One HVP per process: extend the basis by one vector and ``T`` by one row and column."""
        j = self.size
        w, h = self._orthogonalize(operator(self.basis[:, j]), j + 1)
        h = h.double().cpu().numpy()
        self.T[:, :j + 1, j] = h
        self.T[:, j, :j + 1] = h
        beta = torch.linalg.vector_norm(w, dim=1)
        scale = np.abs(self.T[:, :j + 1, :j + 1]).max(axis=(1, 2))
        for k in range(len(w)):
            if j + 1 == self.dim:            # the whole space is spanned: H V = V T exactly
                beta[k] = 0.0
            elif float(beta[k]) <= 100 * torch.finfo(w.dtype).eps * max(scale[k], 1e-300):
                w[k] = self._fresh(k, j + 1)  # invariant subspace found: continue in a new direction
                beta[k] = 0.0
            else:
                w[k] = w[k] / beta[k]
        if j + 1 < self.dim:
            self.basis[:, j + 1] = w
        self.beta = beta.double().cpu().numpy()
        self.size = j + 1

    def _fresh(self, k: int, upto: int) -> Tensor:
        """A random unit vector orthogonal to ``basis[k, :upto]``."""
        w = torch.randn(self.dim, generator=self.generator, dtype=torch.float64).to(self.basis)
        basis = self.basis[k, :upto]
        for _ in range(2):
            w = w - (basis @ w) @ basis
        return w / torch.linalg.vector_norm(w)

    def ritz(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Ritz values ``(K, size)`` ascending, eigenvectors of ``T`` ``(K, size, size)``, residual norms."""
        values, vectors = np.linalg.eigh(self.T[:, :self.size, :self.size])
        return values, vectors, self.beta[:, None] * np.abs(vectors[:, -1, :])

    def ritz_vectors(self, coefficients: np.ndarray) -> Tensor:
        """``V S`` for ``S`` of shape ``(K, size, l)``: the Ritz vectors ``(K, l, d)``."""
        s = torch.as_tensor(coefficients, dtype=self.basis.dtype, device=self.basis.device)
        return torch.bmm(s.transpose(1, 2), self.basis[:, :self.size])

    def restart(self, coefficients: np.ndarray, values: np.ndarray) -> None:
        """Thick restart: keep the Ritz vectors ``V S`` (values ``(K, l)``) and the next vector."""
        keep = values.shape[1]
        s = torch.as_tensor(coefficients, dtype=self.basis.dtype, device=self.basis.device).transpose(1, 2)
        for start in range(0, self.dim, _COLUMNS):
            columns = slice(start, start + _COLUMNS)
            self.basis[:, :keep, columns] = torch.bmm(s, self.basis[:, :self.size, columns])
        self.basis[:, keep] = self.basis[:, self.size]
        self.T[:] = 0.0
        self.T[:, np.arange(keep), np.arange(keep)] = values
        self.size = keep


def extreme_eigenpairs(operator: HessianOperator, top_k: int, bottom_k: int = 0, tol: float = 1e-4,
                       max_hvps: int = 1000, seed: int = 0, eigenvectors: bool = False) -> dict[str, Any]:
    """The ``top_k`` largest and ``bottom_k`` smallest eigenvalues by thick-restart Lanczos.

    A Ritz pair ``(theta, v)`` is converged when Lanczos' residual estimate ``beta |s_last|`` of
    ``||Hv - theta v||`` is at most ``tol * max(|theta|, sqrt(eps) * |theta|_max)`` (``eps``: machine epsilon
    of the compute dtype; the floor keeps eigenvalues near zero reachable), which bounds the
    eigenvalue error by the same amount. The run stops when every wanted pair is converged (or
    after ``max_hvps``); ``top_k + bottom_k`` more HVPs (one batched pass) then *measure* the residuals.

    Returns ``top``/``bottom`` (eigenvalues, descending / ascending), ``top_residuals``/``bottom_residuals``
    (measured ``||Hv - theta v|| / |theta|``), ``top_converged``/``bottom_converged`` and, on request,
    ``top_vectors``/``bottom_vectors`` ``(k, d)``.
    """
    wanted = top_k + bottom_k
    vector_bytes = operator.dim * torch.finfo(operator.dtype).bits // 8
    capacity = min(operator.dim, MAX_BASIS, max(wanted + 16, basis_bytes(operator.device) // vector_bytes))
    generator = torch.Generator().manual_seed(seed)
    start = torch.randn(1, operator.dim, generator=generator, dtype=torch.float64).to(operator.device, operator.dtype)
    lanczos = Lanczos(start, capacity, generator)
    floor = math.sqrt(torch.finfo(operator.dtype).eps)
    begin = operator.count
    while True:
        lanczos.step(operator)
        size = lanczos.size
        if size < wanted:
            continue
        values, vectors, residuals = (a[0] for a in lanczos.ritz())
        pick = np.r_[np.arange(size - 1, size - 1 - top_k, -1), np.arange(bottom_k)].astype(int)
        picked = values[pick]
        converged = residuals[pick] <= tol * np.maximum(np.abs(picked), floor * np.abs(values).max())
        if converged.all() or size == operator.dim or operator.count - begin >= max_hvps:
            break
        if size == capacity:
            keep = _restart_selection(size, top_k, bottom_k)
            lanczos.restart(vectors[None][:, :, keep], values[None, keep])
    ritz = lanczos.ritz_vectors(vectors[None][:, :, pick])[0]
    relative = measured_residuals(operator, picked, ritz)
    out = {"top": picked[:top_k], "bottom": picked[top_k:], "top_residuals": relative[:top_k],
           "bottom_residuals": relative[top_k:], "top_converged": converged[:top_k],
           "bottom_converged": converged[top_k:]}
    if eigenvectors:
        out["top_vectors"], out["bottom_vectors"] = ritz[:top_k], ritz[top_k:]
    return out


def measured_residuals(operator: HessianOperator, values: np.ndarray, vectors: Tensor) -> np.ndarray:
    """``||H v - lambda v|| / |lambda|`` for unit ``vectors`` ``(k, d)``, from ``k`` more HVPs."""
    products = operator(vectors) - torch.as_tensor(values).to(vectors)[:, None] * vectors
    norms = torch.linalg.vector_norm(products, dim=1).double().cpu().numpy()
    return norms / np.maximum(np.abs(values), np.finfo(float).tiny)


def _restart_selection(size: int, top_k: int, bottom_k: int) -> np.ndarray:
    """Indices (into ascending Ritz values) kept at a thick restart: the wanted ones plus half the
    spare room, shared between the two ends in proportion to ``top_k`` and ``bottom_k``."""
    spare = (size - top_k - bottom_k) // 2
    extra_top = spare * top_k // (top_k + bottom_k)
    keep_top, keep_bottom = top_k + extra_top, bottom_k + spare - extra_top
    return np.r_[np.arange(keep_bottom), np.arange(size - keep_top, size)].astype(int)


def slq(operator: HessianOperator, n_v: int, steps: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Stochastic Lanczos quadrature: Ritz nodes and weights ``(n_v, steps)`` from Rademacher starts.

    Each run's weights are the squared first components of the eigenvectors of its ``T`` and sum
    to one; ``sum(w * node**j)`` is ``u^T H^j u`` for the unit start ``u`` (exact for ``j <= 2 * steps - 1``).
    Runs go in lockstep (one batched data pass per step) as far as :func:`basis_bytes` allows.
    """
    steps = min(steps, operator.dim)
    vector_bytes = operator.dim * torch.finfo(operator.dtype).bits // 8
    per_pass = max(1, min(n_v, basis_bytes(operator.device) // ((steps + 1) * vector_bytes)))
    generator = torch.Generator().manual_seed(seed)
    nodes, weights = [], []
    for first in range(0, n_v, per_pass):
        starts = rademacher(min(per_pass, n_v - first), operator.dim, generator, operator)
        lanczos = Lanczos(starts, steps, generator)
        for _ in range(steps):
            lanczos.step(operator)
        values, vectors, _ = lanczos.ritz()
        nodes.append(values)
        weights.append(vectors[:, 0, :] ** 2)
    return np.concatenate(nodes), np.concatenate(weights)


def broadened_density(nodes: np.ndarray, weights: np.ndarray,
                      sigma: float | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """Average of Gaussian-broadened quadratures on a uniform grid: ``(grid, density, sigma)``.

    ``sigma`` (eigenvalue units) defaults to ``DENSITY_SIGMA`` times the width of the Ritz
    spectrum. The grid spacing is ``sigma / GRID_PER_SIGMA`` and it extends ``GRID_TAILS`` sigmas past
    the outermost nodes, so the density integrates to one and decays to ~1e-14 at the ends (log-y plots).
    """
    low, high = float(nodes.min()), float(nodes.max())
    if sigma is None:
        sigma = DENSITY_SIGMA * ((high - low) or max(abs(high), 1.0))
    if not sigma > 0:
        raise LandscapeError(f"density sigma must be positive, got {sigma}; omit it for the default")
    step = sigma / GRID_PER_SIGMA
    count = math.ceil((high - low + 2 * GRID_TAILS * sigma) / step) + 1
    if count > MAX_GRID:
        raise LandscapeError(f"density sigma {sigma:.3g} is too small for a spectrum {high - low:.3g} wide "
                             f"({count} grid points); use at least {(high - low) / (MAX_GRID / GRID_PER_SIGMA):.3g}")
    grid = low - GRID_TAILS * sigma + step * np.arange(count)
    density = np.zeros(count)
    for node_row, weight_row in zip(nodes, weights):
        z = (grid[:, None] - node_row[None, :]) / sigma
        density += np.exp(-0.5 * z**2) @ weight_row
    return grid, density / (len(nodes) * sigma * math.sqrt(2 * math.pi)), float(sigma)


def hutchinson_trace(operator: HessianOperator, samples: int, seed: int = 0) -> tuple[float, float]:
    """Hutchinson's ``mean(z^T H z)`` over ``samples`` Rademacher probes, and its standard error."""
    generator = torch.Generator().manual_seed(seed)
    values = []
    for first in range(0, samples, operator.batch):
        z = rademacher(min(operator.batch, samples - first), operator.dim, generator, operator)
        values.append((z * operator(z)).sum(1).double().cpu().numpy())
    return _mean_and_stderr(np.concatenate(values))


def hutchpp_trace(operator: HessianOperator, budget: int, seed: int = 0) -> tuple[float, float]:
    """Hutch++ with ``budget`` HVPs, and the standard error of its Hutchinson part.

    A third of the budget sketches ``Q = orth(H S)``, a third gives ``tr(Q^T H Q)`` exactly, the
    rest runs Hutchinson on the deflated ``(I - QQ^T) H (I - QQ^T)``.
    """
    generator = torch.Generator().manual_seed(seed)
    sketch = budget // 3
    q = torch.linalg.qr(operator(rademacher(sketch, operator.dim, generator, operator)).T).Q.T
    head = float((q * operator(q)).sum())
    g = rademacher(budget - 2 * sketch, operator.dim, generator, operator)
    g = g - (g @ q.T) @ q
    mean, stderr = _mean_and_stderr((g * operator(g)).sum(1).double().cpu().numpy())
    return head + mean, stderr


def _mean_and_stderr(values: np.ndarray) -> tuple[float, float]:
    return float(values.mean()), float(values.std(ddof=1) / math.sqrt(len(values)))


class _WeightsModule(nn.Module):
    """The objective's weights as fresh parameters of a module that PyHessian may mutate freely."""

    def __init__(self, objective: Objective) -> None:
        super().__init__()
        self.names = list(objective.params)
        self.weights = nn.ParameterList([nn.Parameter(p.clone()) for p in objective.params.values()])
        self.objective = objective

    def forward(self, x: Tensor) -> Tensor:
        return self.objective.outputs(dict(zip(self.names, self.weights)), x)


def pyhessian_hessian(objective: Objective, operator: HessianOperator):
    """A ``pyhessian.hessian`` over the objective's batches whose HVPs are counted by ``operator``."""
    import pyhessian

    class Counted(pyhessian.hessian):
        def dataloader_hv_product(self, v):
            operator.record(1)
            return super().dataloader_hv_product(v)

    batches = [(x, y) for x, y, _ in objective.batches()]
    return Counted(_WeightsModule(objective), objective.loss_fn, dataloader=batches,
                   cuda=objective.device.type == "cuda")


@contextlib.contextmanager
def _quiet_pyhessian(seed: int, device: torch.device) -> Iterator[None]:
    """Seed PyHessian's global-RNG draws without disturbing the caller's RNG state; mute its graph warning."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
        torch.manual_seed(seed)
        yield


def pyhessian_eigenpairs(objective: Objective, operator: HessianOperator, top_k: int, tol: float,
                         seed: int = 0, eigenvectors: bool = False) -> dict[str, Any]:
    """PyHessian's ``eigenvalues(top_n=top_k, tol=tol)`` (power iteration, at most 100 HVPs each).

    Residuals are measured afterwards with ``top_k`` HVPs of our own; ``converged`` means the measured
    residual passes the tolerance test of :func:`extreme_eigenpairs`.
    """
    with _quiet_pyhessian(seed, objective.device):
        values, vectors = pyhessian_hessian(objective, operator).eigenvalues(maxIter=100, tol=tol, top_n=top_k)
    values = np.asarray(values, dtype=float)
    order = np.argsort(-values, kind="stable")
    flat = torch.stack([operator.flat(vectors[i]) for i in order])
    flat = flat / torch.linalg.vector_norm(flat, dim=1, keepdim=True)
    values = values[order]
    relative = measured_residuals(operator, values, flat)
    floor = math.sqrt(torch.finfo(operator.dtype).eps) * np.abs(values).max()
    out = {"top": values, "bottom": np.zeros(0), "top_residuals": relative,
           "bottom_residuals": np.zeros(0), "top_converged": relative * np.abs(values) <= tol * np.maximum(
               np.abs(values), floor), "bottom_converged": np.zeros(0, dtype=bool)}
    if eigenvectors:
        out["top_vectors"], out["bottom_vectors"] = flat, flat[:0]
    return out


def pyhessian_trace(objective: Objective, operator: HessianOperator, samples: int, tol: float,
                    seed: int = 0) -> tuple[float, float]:
    """PyHessian's Hutchinson ``trace(maxIter=samples, tol=tol)`` (it may stop early), with our standard error."""
    with _quiet_pyhessian(seed, objective.device):
        values = np.asarray(pyhessian_hessian(objective, operator).trace(maxIter=samples, tol=tol), dtype=float)
    return float(values.mean()), float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else math.nan


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
    """Eigenvalues (descending), optional eigenvectors, SLQ nodes/weights and density, trace; see ``table()``."""

    group = "hessian"

    def table(self) -> str:
        """The summary the CLI prints: eigenvalues with residuals, lambda1/lambda5, trace, HVPs, time."""
        a = self.attrs
        lines = [f"{'':<12}{'eigenvalue':>14}{'residual':>11}  converged"]
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
        lines.append(f"{'HVPs':<12}{a['hvp_count']:>14d}")
        lines.append(f"{'time':<12}{a['time_s']:>13.1f}s")
        return "\n".join(lines)


@full_float32()
def hessian_spectrum(objective: Objective, top_k: int = 5, *, bottom_k: int = 0, eigenvectors: bool = False,
                     density: bool = False, trace: bool = False, n_v: int = 4, lanczos_steps: int = 90,
                     tol: float | None = None, params: str | Sequence[str] | None = None, per_block: bool = False,
                     backend: str = "landscape", seed: int = 0, progress: Callable[[int], Any] | None = None,
                     trace_hvps: int = 99, trace_method: str = "hutch++", max_hvps: int = 1000,
                     density_sigma: float | None = None, hvp_batch: int = 4) -> HessianResult:
    """Top/bottom eigenvalues, spectral density and trace of the Hessian of ``objective``.

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
    """
    begin = time.perf_counter()
    tol = DEFAULT_TOL.get(backend, 0.0) if tol is None else float(tol)
    config = {"top_k": top_k, "bottom_k": bottom_k, "eigenvectors": eigenvectors, "density": density,
              "trace": trace, "n_v": n_v, "lanczos_steps": lanczos_steps, "tol": tol, "params": params,
              "per_block": per_block, "backend": backend, "trace_hvps": trace_hvps, "trace_method": trace_method,
              "max_hvps": max_hvps, "density_sigma": density_sigma, "hvp_batch": hvp_batch,
              "bn": objective.bn, "dtype": str(objective.dtype).replace("torch.", ""),
              "batch_size": objective.batch_size}
    if params is not None:
        objective = objective.restrict(params)
    _validate(objective, config)
    objective.require_finite("a Hessian spectrum")
    operator = HessianOperator(objective, hvp_batch, progress)
    arrays: dict[str, Any] = {}
    attrs: dict[str, Any] = {"backend": backend, "tol": tol, "num_params": operator.dim,
                             "hvp_count_eigen": 0, "hvp_count_blocks": 0, "hvp_count_density": 0,
                             "hvp_count_trace": 0}
    if top_k or bottom_k:
        pairs = _eigenpairs(objective, operator, top_k, bottom_k, tol, max_hvps, seed, eigenvectors, backend)
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
        attrs["hvp_count_eigen"] = operator.count
    attrs["all_converged"] = bool(all(attrs.get("converged", [])) and all(attrs.get("bottom_converged", [])))
    top = arrays.get("eigenvalues", np.zeros(0))
    attrs["lambda1"] = float(top[0]) if len(top) else math.nan
    attrs["lambda1_over_lambda5"] = float(top[0] / top[4]) if len(top) >= 5 else math.nan
    if per_block:
        _blocks(objective, operator, top_k, tol, max_hvps, seed, backend, arrays, attrs)
    if density:
        counted = operator.count
        nodes, weights = slq(operator, n_v, lanczos_steps, seed)
        grid, values, sigma = broadened_density(nodes, weights, density_sigma)
        arrays.update(slq_nodes=nodes, slq_weights=weights, density_grid=grid, density=values)
        attrs.update(density_sigma=sigma, n_v=n_v, lanczos_steps=nodes.shape[1],
                     hvp_count_density=operator.count - counted)
    if trace:
        counted = operator.count
        if backend == "pyhessian":
            estimate, stderr = pyhessian_trace(objective, operator, trace_hvps, tol, seed)
            method = "pyhessian-hutchinson"
        elif trace_method == "hutch++":
            estimate, stderr = hutchpp_trace(operator, trace_hvps, seed)
            method = trace_method
        else:
            estimate, stderr = hutchinson_trace(operator, trace_hvps, seed)
            method = trace_method
        attrs.update(trace=estimate, trace_stderr=stderr, trace_method=method,
                     hvp_count_trace=operator.count - counted)
    attrs.update(hvp_count=operator.count, time_s=time.perf_counter() - begin)
    attrs.update(provenance(config, objective.provenance(), seed, objective.device))
    _warn_unconverged(attrs)
    return HessianResult(arrays, attrs)


def _eigenpairs(objective: Objective, operator: HessianOperator, top_k: int, bottom_k: int, tol: float,
                max_hvps: int, seed: int, eigenvectors: bool, backend: str) -> dict[str, Any]:
    if backend == "pyhessian":
        return pyhessian_eigenpairs(objective, operator, top_k, tol, seed, eigenvectors)
    return extreme_eigenpairs(operator, top_k, bottom_k, tol, max_hvps, seed, eigenvectors)


def _blocks(objective: Objective, operator: HessianOperator, top_k: int, tol: float, max_hvps: int, seed: int,
            backend: str, arrays: dict[str, Any], attrs: dict[str, Any]) -> None:
    """``top_k`` eigenvalues of each block's sub-Hessian into ``block_eigenvalues`` ``(blocks, top_k)``."""
    counted = operator.count
    names, sizes, values, converged = [], [], [], []
    for name, members in parameter_blocks(objective).items():
        sub = objective.restrict(members)
        sub_operator = HessianOperator(sub, operator.batch, operator.record)
        k = min(top_k, sub_operator.dim)
        pairs = _eigenpairs(sub, sub_operator, k, 0, tol, max_hvps, seed, False, backend)
        names.append(name)
        sizes.append(sub_operator.dim)
        values.append(np.r_[pairs["top"], np.full(top_k - k, np.nan)])
        converged.append(bool(pairs["top_converged"].all()))
    arrays["block_eigenvalues"] = np.array(values)
    attrs.update(blocks=names, block_num_params=sizes, block_converged=converged,
                 hvp_count_blocks=operator.count - counted)


def _validate(objective: Objective, config: dict[str, Any]) -> None:
    top_k, bottom_k, backend = config["top_k"], config["bottom_k"], config["backend"]
    dim = objective.num_params
    checks = [
        (backend in BACKENDS, f"unknown backend {backend!r}; use {' or '.join(BACKENDS)}"),
        (config["trace_method"] in TRACE_METHODS,
         f"unknown trace method {config['trace_method']!r}; use {' or '.join(TRACE_METHODS)}"),
        (top_k >= 0 and bottom_k >= 0, f"top_k and bottom_k must be >= 0, got {top_k} and {bottom_k}"),
        (top_k + bottom_k <= dim,
         f"asked for {top_k + bottom_k} eigenvalues of a {dim}x{dim} Hessian; ask for at most {dim}"),
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
    for ok, message in checks:
        if not ok:
            raise LandscapeError(message)


def _warn_unconverged(attrs: dict[str, Any]) -> None:
    if not attrs["all_converged"] or not all(attrs.get("block_converged", [])):
        warnings.warn(f"some Hessian eigenpairs did not reach tol={attrs['tol']:g} (see residuals/converged); "
                      "raise max_hvps, use float64, or loosen tol", RuntimeWarning, stacklevel=3)
