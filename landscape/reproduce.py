"""End to end: train every optimizer on one dataset, run every analysis, draw the papers' figures.

Figures regenerated (on the embedded digits dataset by default; the papers used CIFAR):
- Hessian spectra and λ1, λ1/λ5 per optimizer (SAM Fig. 3 / Table, SSAM Tab. 5, RWP Fig. 5);
- 2-D filter-normalised surfaces side by side (RWP Fig. 5, SSAM Fig. 4);
- perturbed loss versus radius, adversarial vs random (RWP Fig. 1);
- gradient cosine stability and perturbed loss (R-SAM Figs. 1-2);
- SAM/SGD gradient-ratio histograms (SSAM Fig. 1).
Every step is skipped when its output already exists, so an interrupted run resumes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

PAPER_OPTIMIZERS = ("sgd", "sam", "asam", "rsam", "rwp", "arwp", "mrwp", "marwp", "ssamf", "ssamd")
DIAGNOSED = ("sgd", "sam")  # the gradient diagnostics compare these two, as the papers do


@dataclass(frozen=True)
class Settings:
    """Sizes of each step; ``FULL`` follows the papers' grids, ``QUICK`` is a smoke test."""

    epochs: int = 5
    subset: int | None = 512            # evaluation examples for every analysis (None: whole train split)
    surface_points: int = 51            # 51 x 51 on [-1, 1]^2
    radius_points: int = 25
    radius_draws: int = 10
    lanczos_steps: int = 60
    cosine_rhos: int = 20
    batches: int = 4
    minibatch: int = 128                # the gradient diagnostics' minibatch


FULL = Settings()
QUICK = Settings(epochs=1, subset=256, surface_points=5, radius_points=5, radius_draws=2, lanczos_steps=20,
                 cosine_rhos=3, batches=1)


def _groups(path: Path) -> set[str]:
    from landscape.store import list_groups
    return set(list_groups(path)) if path.exists() else set()


def _summary_row(name: str, checkpoint: Path, results: Path) -> dict[str, Any]:
    from landscape.checkpoint import read_checkpoint
    from landscape.store import read_group
    metrics = read_checkpoint(checkpoint).meta.get("metrics", {})
    hessian = read_group(results, "hessian")[1]
    radius = read_group(results, "radius")[1]
    return {"optimizer": name, "test_accuracy": metrics.get("test_accuracy", math.nan),
            "lambda1": hessian.get("lambda1", math.nan), "lambda1/lambda5": hessian.get("lambda1_over_lambda5", math.nan),
            "trace": hessian.get("trace", math.nan), "trace_stderr": hessian.get("trace_stderr", math.nan),
            "rwp/awp radius": radius.get("radius_ratio", math.nan)}


def _markdown(rows: Sequence[dict[str, Any]]) -> str:
    columns = list(rows[0])
    cell = (lambda v: f"{v:.4g}" if isinstance(v, float) else str(v))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(cell(r[c]) for c in columns) + " |" for r in rows]) + "\n"


def reproduce(out_dir: str | Path = "runs/reproduce", optimizers: Sequence[str] = PAPER_OPTIMIZERS, *,
              data: str = "digits", arch: str = "cnn", settings: Settings = FULL, device: str = "auto",
              seed: int = 0, log: Callable[[str], Any] = print, progress: Callable[..., Any] | None = None) -> Path:
    """Run the whole pipeline into ``out_dir``; returns the path of ``summary.md``.

    Per optimizer NAME: ``NAME.pt`` (checkpoint) and ``NAME.h5`` (hessian, surface, radius, and for
    SGD/SAM cosine and ratio). Figures go to ``out_dir/figures``.
    """
    from landscape.analysis.cosine import cosine_stability
    from landscape.analysis.hessian import hessian_spectrum
    from landscape.analysis.radius import radius_curve
    from landscape.analysis.ratio import gradient_ratio
    from landscape.analysis.surface import loss_surface
    from landscape.objective import load_objective
    from landscape.optimizers import list_optimizers
    from landscape.plotting import plot_compare, plot_file
    from landscape.train import train_model

    names = [list_optimizers(name)[0].name if list_optimizers(name) else name for name in optimizers]
    out = Path(out_dir)
    figures = out / "figures"
    out.mkdir(parents=True, exist_ok=True)
    axis = np.linspace(-1.0, 1.0, settings.surface_points)
    radii = np.logspace(-3, 1, settings.radius_points)
    for name in names:
        checkpoint, results = out / f"{name}.pt", out / f"{name}.h5"
        if not checkpoint.exists():
            log(f"[{name}] training {arch} on {data} for {settings.epochs} epochs")
            train_model(data, arch, name, epochs=settings.epochs, seed=seed, device=device, out=str(checkpoint),
                        progress=progress)
        # the user named arch and data here, so a user module:function runs; the file's record is not used
        objective = load_objective(str(checkpoint), data=data, arch=arch, subset=settings.subset, subset_seed=seed,
                                   device=device)
        done = _groups(results)
        if "hessian" not in done:
            log(f"[{name}] Hessian: top-5, density, trace")
            hessian_spectrum(objective, top_k=5, density=True, trace=True, lanczos_steps=settings.lanczos_steps,
                             seed=seed).save(results)
        if "surface" not in done:
            log(f"[{name}] surface {len(axis)}x{len(axis)}")
            loss_surface(objective, axis, axis, seed=seed, out=results, resume=True)
        if "radius" not in done:
            log(f"[{name}] perturbed loss versus radius")
            radius_curve(objective, radii, draws=settings.radius_draws, seed=seed, out=results, resume=True)
        if name in DIAGNOSED:
            diagnostics = load_objective(str(checkpoint), data=data, arch=arch, subset=settings.subset,
                                         subset_seed=seed, bn="train", device=device)
            if "cosine" not in done:
                log(f"[{name}] gradient cosine stability and inner-maximisation gap")
                cosine_stability(diagnostics, np.linspace(0.0, 1.0, settings.cosine_rhos), batches=settings.batches,
                                 draws=settings.batches, batch_size=settings.minibatch, seed=seed).save(results)
            if "ratio" not in done:
                log(f"[{name}] SAM/SGD gradient ratios")
                gradient_ratio(diagnostics, batches=settings.batches, batch_size=settings.minibatch,
                               seed=seed).save(results)
        plot_file(results, figures)
    paths = [out / f"{name}.h5" for name in names]
    for group in ("hessian", "surface", "radius"):
        plot_compare(paths, group, figures / f"compare_{group}.png", labels=names)
    diagnosed = [out / f"{name}.h5" for name in names if name in DIAGNOSED]
    if len(diagnosed) > 1:
        for group in ("cosine", "ratio"):
            plot_compare(diagnosed, group, figures / f"compare_{group}.png",
                         labels=[n for n in names if n in DIAGNOSED])
    rows = [_summary_row(name, out / f"{name}.pt", out / f"{name}.h5") for name in names]
    summary = out / "summary.md"
    summary.write_text(f"# landscape reproduce ({data}, {arch})\n\nSettings: {asdict(settings)}\n\n" + _markdown(rows))
    log(_markdown(rows))
    return summary
