"""Sharpness during training (``/training``), as in Cohen et al. (ICLR 2021): λ1 against the step, with the
stability threshold 2(1+β)/η of the learning rate of each step as a dashed line of the same colour (it
follows the LR schedule: under cosine decay it rises over training). Panels below show the trace
(±1 standard error) and the loss when they were tracked. ``COMPARE`` overlays several runs (SGD vs SAM).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np

from landscape.errors import LandscapeError

Entry = tuple[str, Mapping[str, Any], Mapping[str, Any]]   # (label, arrays, attrs)
THRESHOLD_LABEL = "2(1+β)/η"
HEADROOM = 1.15   # the λ axis ends this factor above the larger of the largest λ and the lowest threshold


def _done(arrays: Mapping[str, Any], name: str) -> np.ndarray:
    """``arrays[name]`` as floats with NaN where no measurement was taken (a run stopped early)."""
    values = np.array(arrays[name], dtype=float)
    values[~np.asarray(arrays["done"], dtype=bool)] = np.nan
    return values


def compare_training(entries: Sequence[Entry], **_: Any):
    """λ1..λk (λ1 solid, the others thinner) and the threshold per run against the step; trace and loss panels
    for the metrics that every run tracked."""
    panels = [name for name in ("eigenvalues", "trace", "loss") if all(name in a for _, a, _ in entries)]
    if not panels:
        raise LandscapeError("these /training groups share no tracked metric; compare runs that tracked the same")
    figure, axes = plt.subplots(len(panels), 1, figsize=(6.4, 3.2 + 1.6 * (len(panels) - 1)), sharex=True,
                                squeeze=False, gridspec_kw={"height_ratios": [2] + [1] * (len(panels) - 1)})
    axes = dict(zip(panels, axes[:, 0]))
    colors = plt.get_cmap("tab10").colors
    top = 0.0
    for index, (label, arrays, attrs) in enumerate(entries):
        color, steps = colors[index % len(colors)], np.asarray(arrays["steps"])
        prefix = f"{label}: " if label else ""
        if "eigenvalues" in axes:
            values = _done(arrays, "eigenvalues")
            for k in range(values.shape[1] - 1, -1, -1):
                axes["eigenvalues"].plot(steps, values[:, k], color=color, lw=1.6 if k == 0 else 0.8,
                                         alpha=1.0 if k == 0 else 0.5, marker="o" if k == 0 else None, ms=2.5,
                                         label=f"{prefix}λ1" if k == 0 else (f"{prefix}λ2..λ{values.shape[1]}"
                                                                             if k == 1 else None))
            top = max(top, np.nanmax(values, initial=0.0))
            threshold = _done(arrays, "threshold")
            threshold[~np.isfinite(threshold)] = np.nan
            if not np.isnan(threshold).all():
                axes["eigenvalues"].plot(steps, threshold, color=color, ls="--", lw=1.2,
                                         label=f"{prefix}{THRESHOLD_LABEL}")
                top = max(top, np.nanmin(threshold))
        if "trace" in axes:
            trace, error = _done(arrays, "trace"), _done(arrays, "trace_stderr")
            axes["trace"].plot(steps, trace, color=color, lw=1.3)
            axes["trace"].fill_between(steps, trace - error, trace + error, color=color, alpha=0.25, lw=0)
        if "loss" in axes:
            axes["loss"].plot(steps, _done(arrays, "loss"), color=color, lw=1.3)
    config, source = entries[0][2].get("config", {}), entries[0][2].get("eval_set", {})
    first = axes[panels[0]]
    first.set_title(f"Sharpness during training ({source.get('n', '?')} training examples, BN {config.get('bn', '?')})")
    if "eigenvalues" in axes:
        axes["eigenvalues"].set_ylim(0.0, HEADROOM * top if top > 0 else None)
        axes["eigenvalues"].set_ylabel("Hessian eigenvalue")
        axes["eigenvalues"].legend(fontsize=7)
    if "trace" in axes:
        axes["trace"].set_ylabel("trace ± s.e.")
    if "loss" in axes:
        axes["loss"].set(ylabel="loss", yscale="log")
    for axis in axes.values():
        axis.grid(alpha=0.3)
    list(axes.values())[-1].set_xlabel("optimizer step")
    figure.tight_layout()
    return figure


def draw_training(arrays: Mapping[str, Any], attrs: Mapping[str, Any], **options: Any):
    return compare_training([("", arrays, attrs)], **options)


FIGURES = {"training": draw_training}
COMPARE = {"training": compare_training}
