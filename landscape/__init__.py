"""landscape: the geometry that sharpness-aware and random-perturbation optimizers find.

The public API is re-exported here and imported lazily, so ``import landscape`` (and the
CLI's ``--help``) stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "LandscapeError": "landscape.errors",
    "Objective": "landscape.objective",
    "load_objective": "landscape.objective",
    "batchnorm_mode": "landscape.objective",
    "load_dataset": "landscape.data",
    "list_datasets": "landscape.data",
    "build_model": "landscape.models",
    "list_models": "landscape.models",
    "load_checkpoint": "landscape.checkpoint",
    "save_checkpoint": "landscape.checkpoint",
    "Result": "landscape.results",
    "load_result": "landscape.results",
    "plot_file": "landscape.plotting",
    "create_optimizer": ("landscape.optimizers", "create"),
    "list_optimizers": "landscape.optimizers",
    "train_model": "landscape.train",
    "Tracking": "landscape.tracking",
    "SharpnessTracker": "landscape.tracking",
    "TrainingResult": "landscape.tracking",
    "hessian_spectrum": "landscape.analysis.hessian",
    "minibatch_lambda1": "landscape.analysis.hessian",
    "CurvatureOperator": "landscape.curvature.operator",
    "DenseOperator": "landscape.curvature.operator",
    "HessianOperator": "landscape.curvature.hessian",
    "GGNOperator": "landscape.curvature.ggn",
    "EmpiricalFisherOperator": "landscape.curvature.fisher",
    "PointEvaluator": "landscape.engine.evaluator",
    "tune_allocator": "landscape.engine",
    "loss_surface": "landscape.analysis.surface",
    "pca_surface": "landscape.analysis.surface",
    "load_trajectory": "landscape.trajectory",
    "TrajectoryWriter": "landscape.trajectory",
    "interpolate": "landscape.analysis.surface",
    "radius_curve": "landscape.analysis.radius",
    "cosine_stability": "landscape.analysis.cosine",
    "gradient_ratio": "landscape.analysis.ratio",
    "sharpness": "landscape.analysis.sharpness",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    target = _EXPORTS.get(name)
    if target is None:
        raise AttributeError(f"module 'landscape' has no attribute {name!r}")
    module_name, attribute = target if isinstance(target, tuple) else (target, name)
    return getattr(importlib.import_module(module_name), attribute)


def __dir__() -> list[str]:
    return sorted(__all__)
