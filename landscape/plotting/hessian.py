"""Curvature figures: the spectrum (SLQ density on a log scale with the top eigenvalues marked) of
``/hessian``, ``/ggn`` and ``/fisher``, and the histogram of lambda1 over mini-batches of
``/<curvature>_batches``.

Spectra are drawn in the manner of the spectrum figures of the SAM, SSAM and RWP papers (after
Ghorbani et al. 2019). ``COMPARE`` overlays several results (e.g. SGD vs SAM) on one set of axes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np

from landscape.curvature import NAMES

Entry = tuple[str, Mapping[str, Any], Mapping[str, Any]]   # (label, arrays, attrs)
FLOOR = 1e-10   # lowest density drawn, relative to the peak (the Gaussian tails go to ~1e-14)


def _summary(attrs: Mapping[str, Any]) -> str:
    parts = []
    if not np.isnan(attrs.get("lambda1", np.nan)):
        parts.append(f"λ1={attrs['lambda1']:.4g}")
    if not np.isnan(attrs.get("lambda1_over_lambda5", np.nan)):
        parts.append(f"λ1/λ5={attrs['lambda1_over_lambda5']:.3g}")
    if attrs.get("trace_method"):
        parts.append(f"tr={attrs['trace']:.4g}±{attrs['trace_stderr']:.2g}")
    return ", ".join(parts)


def compare_hessian(entries: Sequence[Entry], **_: Any):
    """Density (log y) per result, top eigenvalues as dashed lines, most negative ones dotted."""
    figure, ax = plt.subplots(figsize=(6.4, 4.2))
    colors = plt.get_cmap("tab10").colors
    lowest, highest = np.inf, 0.0
    for index, (label, arrays, attrs) in enumerate(entries):
        color = colors[index % len(colors)]
        name = ", ".join(part for part in (label, _summary(attrs)) if part)
        if "density" in arrays:
            density = np.asarray(arrays["density"])
            floor = density.max() * FLOOR
            ax.plot(arrays["density_grid"], np.maximum(density, floor), color=color, lw=1.3, label=name)
            lowest, highest = min(lowest, floor), max(highest, density.max())
            name = None
        for key, style in (("eigenvalues", "--"), ("bottom_eigenvalues", ":")):
            for value in np.asarray(arrays.get(key, [])):
                ax.axvline(value, color=color, ls=style, lw=0.9, alpha=0.8, label=name)
                name = None
    if highest > 0:
        ax.set_yscale("log")
        ax.set_ylim(lowest, highest * 3)
        ax.set_ylabel("density (log scale)")
    else:
        ax.set_yticks([])
    config = entries[0][2].get("config", {})
    what = f"parameters {config['params']}" if config.get("params") else "all parameters"
    name = NAMES[entries[0][2].get("curvature", "hessian")]
    ax.set(xlabel="eigenvalue", title=f"{name[0].upper()}{name[1:]} spectrum ({what}; dashed: top eigenvalues)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    figure.tight_layout()
    return figure


def draw_hessian(arrays: Mapping[str, Any], attrs: Mapping[str, Any], **options: Any):
    """One result: its density with its top (and most negative) eigenvalues marked."""
    return compare_hessian([("", arrays, attrs)], **options)


def compare_batches(entries: Sequence[Entry], **_: Any):
    """The stored histogram of lambda1 over mini-batches per result, its mean (dashed) and the values (ticks)."""
    figure, ax = plt.subplots(figsize=(6.4, 4.2))
    colors = plt.get_cmap("tab10").colors
    for index, (label, arrays, attrs) in enumerate(entries):
        color = colors[index % len(colors)]
        stats = f"mean {attrs['mean']:.4g} ± {attrs['std']:.2g} (stderr {attrs['stderr']:.2g})"
        ax.stairs(arrays["histogram_counts"], arrays["histogram_edges"], color=color, lw=1.5,
                  fill=len(entries) == 1, alpha=0.6 if len(entries) == 1 else 1.0,
                  label=", ".join(part for part in (label, stats) if part))
        ax.axvline(attrs["mean"], color=color, ls="--", lw=1.0)
        ax.plot(arrays["batch_lambda1"], np.zeros(len(arrays["batch_lambda1"])), "|", color=color, ms=12, mew=1.2,
                clip_on=False)
    attrs = entries[0][2]
    what = f", parameters {attrs['config']['params']}" if attrs.get("config", {}).get("params") else ""
    ax.set(xlabel="λ1", ylabel="mini-batches",
           title=f"λ1 of the {NAMES[attrs['curvature']]} on {attrs['batches']} mini-batches of "
                 f"{attrs['per_batch']} examples{what}")
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    figure.tight_layout()
    return figure


def draw_batches(arrays: Mapping[str, Any], attrs: Mapping[str, Any], **options: Any):
    """One result: the histogram of lambda1 over its mini-batches."""
    return compare_batches([("", arrays, attrs)], **options)


FIGURES = {**{name: draw_hessian for name in NAMES}, **{f"{name}_batches": draw_batches for name in NAMES}}
COMPARE = {**{name: compare_hessian for name in NAMES}, **{f"{name}_batches": compare_batches for name in NAMES}}
