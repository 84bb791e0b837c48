"""Sharpness tracked during training, after Cohen et al. (ICLR 2021): λ1 against the stability threshold 2/η.

:class:`SharpnessTracker` is a :class:`~landscape.train.TrainCallback`. Every ``every`` optimizer steps
(steps, as Cohen et al. count; ``"Ne"``: every N epochs) it measures, at the current weights, on a FIXED
evaluation subset of the training split (``subset`` examples drawn with the run's seed, the same at
every measurement):

- ``lambda1``: the ``top_k`` largest Hessian eigenvalues by thick-restart Lanczos to ``tol``, with their
  measured residuals ``||Hv - λv|| / λ``. Lanczos is WARM-STARTED from the previous measurement's top
  eigenvectors (their sum, plus a seeded random vector of weight :data:`RANDOM_SHARE` that keeps
  directions new to the top of the spectrum reachable), so a measurement costs a few Hessian-vector
  products when the spectrum moves little;
- ``trace``: Hutch++ with ``trace_hvps`` products, with the standard error of its Hutchinson part;
- ``loss``: the mean loss and the accuracy over the subset.

Every measurement also records the step, epoch, learning rate and momentum of the step just taken and
its stability threshold (:func:`stability_threshold`, 2(1+β)/η for SGD with heavy-ball momentum β).

BatchNorm: ``bn="train"`` (the default) normalises each batch of ``batch_size`` examples of the subset
(the training batch size) by its own statistics, as the training forward does: the Hessian of the
loss that SGD descends, which is what its stability depends on (Cohen et al. train by full-batch GD,
where this is exactly the training loss). Running statistics lag behind the weights early in
training, and the Hessian under them (``bn="eval"``) can be several times larger there. Either way
the running buffers and the model's train/eval flags are untouched (:class:`~landscape.objective.Objective`).

Results form the group ``/training`` of a results file (:class:`TrainingResult`), one unit per
measurement, written as it is taken through :class:`~landscape.store.IncrementalGroup`: a killed run
loses no measurement, and the resumed run (``train_model(..., resume=True)``) repeats the steps since
the last saved training state, measures them again from the saved warm-start vectors (the same values,
bit for bit, in one process) and writes none that is already done. Under torchrun every rank measures
(every rank takes part in whatever collectives the curvature operator uses) and rank 0 writes.
"""

from __future__ import annotations

import contextlib
import math
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from landscape.analysis.hessian import full_float32
from landscape.curvature.hessian import HessianOperator
from landscape.curvature.lanczos import extreme_eigenpairs
from landscape.curvature.trace import hutchpp_trace
from landscape.data import Dataset, eval_subset
from landscape.errors import LandscapeError
from landscape.objective import BN_MODES, Objective, indices_digest
from landscape.results import Result
from landscape.store import IncrementalGroup, MemoryGroup, provenance

METRICS = ("lambda1", "trace", "loss")
GROUP = "training"
RANDOM_SHARE = 0.1   # weight of the random vector in a warm start, against the unit sum of the previous eigenvectors
_EVERY = re.compile(r"^\s*(\d+)\s*(e?)\s*$")


@dataclass(frozen=True)
class Tracking:
    """What :class:`SharpnessTracker` measures, how often and where it writes.

    ``metrics``: any of ``lambda1``, ``trace``, ``loss`` (a tuple, or a comma-separated string).
    ``every``: steps between measurements (an int), or ``"Ne"``: every N epochs. ``subset``: examples of
    the training split (None: all of them). ``top_k``: eigenvalues measured with ``lambda1``. ``tol``:
    Lanczos' relative residual tolerance. ``trace_hvps``: Hutch++ products per trace. ``bn``: BatchNorm
    ``train`` (batch statistics) or ``eval`` (running ones). ``max_hvps``: Lanczos products at most per
    measurement. ``out``: the results file (default: next to the checkpoint, ``<out>.h5``; none: memory).

    The defaults keep the overhead on digits/cnn under 10% of the training time (``benchmarks/tracking.py``).
    """

    metrics: tuple[str, ...] = ("lambda1",)
    every: int | str = 200
    subset: int | None = 128
    top_k: int = 1
    tol: float = 1e-2
    trace_hvps: int = 30
    bn: str = "train"
    max_hvps: int = 300
    out: str | None = None

    def __post_init__(self) -> None:
        metrics = self.metrics.split(",") if isinstance(self.metrics, str) else self.metrics
        object.__setattr__(self, "metrics", tuple(dict.fromkeys(m.strip() for m in metrics if m.strip())))
        unknown = [m for m in self.metrics if m not in METRICS]
        checks = [
            (bool(self.metrics) and not unknown, f"unknown --track metric {unknown[0] if unknown else '(none)'!r}; "
                                                 f"use a comma-separated list of {', '.join(METRICS)}"),
            (self.subset is None or self.subset >= 1, f"--track-subset must be >= 1, got {self.subset}"),
            (self.top_k >= 1, f"--track-top-k must be >= 1, got {self.top_k}"),
            (self.top_k == 1 or "lambda1" in self.metrics,
             f"--track-top-k {self.top_k} needs lambda1 in --track (the eigenvalues are measured with it)"),
            (0 < self.tol < 1, f"--track-tol must be in (0, 1), got {self.tol}"),
            (self.trace_hvps >= 6, f"--track-trace-hvps must be >= 6 for Hutch++ with a standard error, "
                                   f"got {self.trace_hvps}"),
            (self.bn in BN_MODES, f"unknown --track-bn {self.bn!r}; use train or eval"),
            (self.max_hvps >= 1, f"max_hvps must be >= 1, got {self.max_hvps}"),
        ]
        for ok, message in checks:
            if not ok:
                raise LandscapeError(message)
        self.every_steps(1)   # checks the cadence's form

    def results_file(self, checkpoint: str | Path | None) -> Path | None:
        """Where ``/training`` goes: ``out``, else ``checkpoint`` with the suffix ``.h5``, else nowhere (memory)."""
        if self.out is not None:
            return Path(self.out)
        return None if checkpoint is None else Path(checkpoint).with_suffix(".h5")

    def every_steps(self, steps_per_epoch: int) -> int:
        """The cadence in optimizer steps."""
        match = _EVERY.match(str(self.every)) if not isinstance(self.every, bool) else None
        if match is None or int(match.group(1)) < 1:
            raise LandscapeError(f"--track-every takes N steps or Ne epochs with N >= 1 (e.g. 50 or 2e), "
                                 f"got {self.every!r}")
        return int(match.group(1)) * (steps_per_epoch if match.group(2) else 1)


def stability_threshold(optimizer: torch.optim.Optimizer, lr: float) -> float:
    """The largest curvature that the optimizer's step keeps stable on a quadratic, at learning rate ``lr``.

    SGD (also the base of SAM and the other perturbation methods) with momentum β and dampening d:
    2(1+β)/((1−d)η) (heavy ball; 2/η without momentum), Nesterov: 2(1+β)/((1+2β)η). NaN for other
    optimizers (adaptive ones precondition the step: no line for the raw Hessian). Weight decay λ_wd
    would lower it by λ_wd; it is left out.
    """
    base = getattr(optimizer, "base", optimizer)
    if not isinstance(base, torch.optim.SGD):
        return math.nan
    if lr <= 0:
        return math.inf
    group = base.param_groups[0]
    beta, damping = float(group["momentum"]), float(group["dampening"])
    if group["nesterov"]:
        return 2 * (1 + beta) / ((1 + 2 * beta) * lr)
    return 2 * (1 + beta) / ((1 - damping) * lr) if damping < 1 else math.inf


class TrainingResult(Result):
    """``/training``: per measurement (M of them) ``steps``, ``epochs`` (static), ``lr``, ``momentum``,
    ``threshold`` (:func:`stability_threshold`), ``eigenvalues`` and ``residuals`` ``(M, top_k)`` (λ1 first),
    ``converged``, ``trace`` and ``trace_stderr``, ``loss`` and ``accuracy`` (those measured), ``hvps``,
    ``seconds``, ``done``; ``subset_indices`` (rows of the training split); see ``summary()``."""

    group = GROUP

    def summary(self, rows: int = 12) -> str:
        """The measurements (at most ``rows``, evenly spread), the largest λ1 against the threshold, the cost."""
        arrays, config = self.arrays, self.attrs.get("config", {})
        done = np.flatnonzero(np.asarray(arrays["done"], dtype=bool))
        columns = {"step": (arrays["steps"], "{:>7.0f}"), "epoch": (arrays["epochs"], "{:>5.0f}"),
                   "lr": (arrays["lr"], "{:>10.4g}")}
        if "eigenvalues" in arrays:
            columns.update({"λ1": (np.asarray(arrays["eigenvalues"])[:, 0], "{:>11.5g}"),
                            "residual": (np.asarray(arrays["residuals"])[:, 0], "{:>8.1e}"),
                            "2(1+β)/η": (arrays["threshold"], "{:>11.5g}")})
        if "trace" in arrays:
            columns.update({"trace": (arrays["trace"], "{:>11.5g}"), "± s.e.": (arrays["trace_stderr"], "{:>8.2g}")})
        if "loss" in arrays:
            columns["loss"] = (arrays["loss"], "{:>9.4g}")
        lines = [f"tracked on {self.attrs.get('eval_set', {}).get('n', '?')} training examples (BN "
                 f"{config.get('bn', '?')}), every {config.get('every_steps', '?')} steps: {len(done)} of "
                 f"{len(arrays['done'])} measurements",
                 " ".join(f"{title:>{len(fmt.format(0.0))}}" for title, (_, fmt) in columns.items())]
        shown = done if len(done) <= rows else done[np.unique(np.linspace(0, len(done) - 1, rows).round().astype(int))]
        lines += [" ".join(fmt.format(float(values[i])) for values, fmt in columns.values()) for i in shown]
        if "eigenvalues" in arrays and np.isfinite(columns["λ1"][0][done]).any():
            lambda1, threshold = columns["λ1"][0][done], np.asarray(arrays["threshold"])[done]
            top = int(np.nanargmax(lambda1))
            lines.append(f"largest λ1 {lambda1[top]:.5g} at step {arrays['steps'][done[top]]}, "
                         f"{lambda1[top] / threshold[top]:.3g} times 2(1+β)/η there; λ1 >= 2(1+β)/η at "
                         f"{int(np.sum(lambda1 >= threshold))} of {len(done)} measurements")
        lines.append(f"HVPs {np.nansum(arrays['hvps']):.0f}, tracking time {np.nansum(arrays['seconds']):.1f} s")
        return "\n".join(lines)


class SharpnessTracker:
    """A training callback measuring the sharpness every ``tracking.every`` steps; see the module docstring.

    Args:
        tracking: what to measure (:class:`Tracking`, or a metrics string such as ``"lambda1,loss"``).
        dataset: the training data; the subset comes from its training split.
        steps_per_epoch, total_steps: the run's length (fixes the measured steps: every, 2 every, ...).
        batch_size: the training batch, the batch of the tracking subset's forwards.
        seed: draws the subset, seeds the first Lanczos start, the random part of every warm start and
            the trace probes.

    :meth:`open` says where the results go (under torchrun on rank 0; until then, and on the other
    ranks, they stay in memory), :meth:`finish` completes them. ``state_dict()`` holds the warm start.
    """

    def __init__(self, tracking: Tracking | str, dataset: Dataset, *, steps_per_epoch: int, total_steps: int,
                 batch_size: int, seed: int = 0) -> None:
        self.tracking = Tracking(tracking) if isinstance(tracking, str) else tracking
        self.every = self.tracking.every_steps(steps_per_epoch)
        if self.every > total_steps:
            raise LandscapeError(f"--track-every {self.tracking.every} is {self.every} steps, more than the run's "
                                 f"{total_steps}: no measurement; lower --track-every")
        count = len(dataset.x_train)
        if self.tracking.subset is not None and self.tracking.subset > count:
            raise LandscapeError(f"--track-subset {self.tracking.subset} is more than the {count} training examples; "
                                 "lower it (or 0 for all of them)")
        self.inputs, self.targets, self.indices = eval_subset(dataset.x_train, dataset.y_train, self.tracking.subset,
                                                              seed)
        self.steps = np.arange(self.every, total_steps + 1, self.every)
        self.epochs = (self.steps - 1) // steps_per_epoch + 1
        self.batch_size, self.seed, self.spec = batch_size, seed, dataset.spec
        self.vectors: Tensor | None = None   # the last measurement's top eigenvectors (top_k, d)
        self.memory = MemoryGroup(self._datasets(), (len(self.steps),), self._static())
        self.path: Path | None = None
        self.attrs: dict[str, Any] = {}

    def _datasets(self) -> dict[str, tuple[int, ...]]:
        shapes: dict[str, tuple[int, ...]] = {"lr": (), "momentum": (), "threshold": ()}
        if "lambda1" in self.tracking.metrics:
            k = (self.tracking.top_k,)
            shapes.update(eigenvalues=k, residuals=k, converged=k)
        if "trace" in self.tracking.metrics:
            shapes.update(trace=(), trace_stderr=())
        if "loss" in self.tracking.metrics:
            shapes.update(loss=(), accuracy=())
        return {**shapes, "hvps": (), "seconds": ()}

    def _static(self) -> dict[str, Any]:
        return {"steps": self.steps, "epochs": self.epochs, "subset_indices": self.indices}

    def open(self, checkpoint: str | None, run: Mapping[str, Any], device: Any, *, resume: bool = False,
             overwrite: bool = False) -> None:
        """Write the measurements as they are taken, crash-safely, to ``/training`` of the tracking's ``out``,
        else of ``<checkpoint>`` with the suffix ``.h5``, else keep them in memory. ``run`` (the training
        run's options) is part of the group's config, which a resumed run must present again; ``resume``
        continues a killed run's group, ``overwrite`` discards it or an existing group."""
        config = {**asdict(self.tracking), "metrics": list(self.tracking.metrics), "every_steps": self.every,
                  "batch_size": self.batch_size, "run": dict(run)}
        config.pop("out")
        source = {"checkpoint": checkpoint or "", "dataset": self.spec,
                  "eval_set": {"split": "train", "subset": self.tracking.subset, "subset_seed": self.seed,
                               "n": len(self.indices), "indices_sha256": indices_digest(self.indices)}}
        self.attrs = provenance(config, source, self.seed, device)
        self.path = self.tracking.results_file(checkpoint)
        with self._group(resume=resume, overwrite=overwrite):
            pass

    @contextlib.contextmanager
    def _group(self, *, resume: bool = True, overwrite: bool = False) -> Iterator[IncrementalGroup | MemoryGroup]:
        """The group's store, held only while in use: the file's :class:`IncrementalGroup` (its lock released
        on leaving, also when training fails), or the memory's."""
        if self.path is None:
            yield self.memory
            return
        group = IncrementalGroup(self.path, GROUP, self._datasets(), (len(self.steps),), self.attrs, self._static(),
                                 resume=resume, overwrite=overwrite)
        try:
            yield group
        finally:
            group.close()

    def __call__(self, *, step: int, epoch: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                 lr: float) -> None:
        if step % self.every:
            return
        values = self.measure(model, optimizer, lr, step)
        unit = step // self.every - 1
        with self._group() as group:
            if not group.done[unit]:   # a resumed run measures again the steps it repeats, and keeps what is stored
                group.write(unit, {name: np.asarray(value, dtype=float)[None] for name, value in values.items()})

    @full_float32()
    def measure(self, model: nn.Module, optimizer: torch.optim.Optimizer, lr: float, step: int) -> dict[str, Any]:
        """The metrics at ``model``'s current weights after ``step`` (the model is not changed); updates the
        warm start."""
        begin = time.perf_counter()
        tracking = self.tracking
        objective = Objective(model, self.inputs, self.targets, batch_size=self.batch_size, bn=tracking.bn)
        operator = HessianOperator(objective)
        values: dict[str, Any] = {"lr": lr, "momentum": optimizer.param_groups[0].get("momentum", math.nan),
                                  "threshold": stability_threshold(optimizer, lr)}
        if "lambda1" in tracking.metrics:
            values.update(self._eigenvalues(operator, step))
        if "trace" in tracking.metrics:
            values["trace"], values["trace_stderr"] = hutchpp_trace(operator, tracking.trace_hvps, self.seed)
        if "loss" in tracking.metrics:
            values["loss"], values["accuracy"] = objective.loss_and_accuracy()
        values.update(hvps=operator.products, seconds=time.perf_counter() - begin)
        return values

    def _eigenvalues(self, operator: HessianOperator, step: int) -> dict[str, np.ndarray]:
        """The top eigenvalues, residuals and convergence flags; NaN (and the warm start kept) where the
        curvature is not finite, as on the way to a divergence."""
        try:
            pairs = extreme_eigenpairs(operator, self.tracking.top_k, 0, self.tracking.tol, self.tracking.max_hvps,
                                       self.seed, eigenvectors=True, start=self._start(step))
        except np.linalg.LinAlgError:   # inf/NaN in the Lanczos matrix
            pairs = {"top": np.full(self.tracking.top_k, np.nan)}
        if np.isfinite(pairs["top"]).all():
            self.vectors = pairs["top_vectors"]
            return {"eigenvalues": pairs["top"], "residuals": pairs["top_residuals"],
                    "converged": pairs["top_converged"]}
        nan = np.full(self.tracking.top_k, np.nan)
        return {"eigenvalues": nan, "residuals": nan, "converged": np.zeros(self.tracking.top_k)}

    def _start(self, step: int) -> Tensor | None:
        """The warm start: the previous top eigenvectors' sum made unit, and :data:`RANDOM_SHARE` times a unit
        random vector drawn from (seed, step); None (a random start from ``seed``) at the first measurement."""
        if self.vectors is None:
            return None
        words = np.random.SeedSequence([self.seed, step]).generate_state(2, np.uint32)
        generator = torch.Generator().manual_seed(int(words[0]) << 32 | int(words[1]))
        noise = torch.randn(self.vectors.shape[1], generator=generator, dtype=torch.float64).to(self.vectors)
        total = self.vectors.sum(0)
        return torch.stack([total / torch.linalg.vector_norm(total),
                            RANDOM_SHARE * noise / torch.linalg.vector_norm(noise)])

    def state_dict(self) -> dict[str, Any]:
        return {"vectors": None if self.vectors is None else self.vectors.detach().cpu()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.vectors = state["vectors"]

    def finish(self, complete: bool = True) -> TrainingResult:
        """Move the complete group into the results file and return it. A run stopped early (``complete=False``:
        training diverged) stores what it measured, ``done`` marking it, with the attribute ``stopped_early``."""
        with self._group() as group:
            if self.path is None:
                return TrainingResult(group.arrays(), self.attrs)
            if complete or group.complete:
                group.finalize()
            else:
                TrainingResult(group.arrays(), {**self.attrs, "stopped_early": True}).save(self.path, overwrite=True)
                group.partial.unlink()
        return TrainingResult.load(self.path)
