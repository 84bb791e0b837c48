"""Sharpness versus ρ (Andriushchenko et al.): worst case and average case on one log-x axis.

``FIGURES`` draws one stored ``/sharpness``; ``COMPARE`` overlays several (e.g. SGD vs SAM checkpoints).
The average case carries ±1 standard-error bars; the worst case is a deterministic ascent, without bars.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np

Entry = tuple[str, Mapping[str, Any], Mapping[str, Any]]   # (label, arrays, attrs)
_MARKERS = {"worst": "o", "average": "s"}


def compare_sharpness(entries: Sequence[Entry], log_loss: bool = False, **_: Any):
    """Sharpness (nats) against ρ (log x) per result and kind; ``log_loss`` puts y on a log scale too."""
    figure, ax = plt.subplots(figsize=(6.4, 4.2))
    colors = plt.get_cmap("tab10").colors
    for index, (label, arrays, attrs) in enumerate(entries):
        rhos = np.asarray(arrays["rhos"])
        for kind_index, kind in enumerate(k for k in ("worst", "average") if k in arrays):
            color = colors[(index * 2 + kind_index) % len(colors)]
            name = ", ".join(part for part in (label, f"{kind} case") if part)
            errors = np.asarray(arrays["average_se"]) if kind == "average" else None
            ax.errorbar(rhos, np.asarray(arrays[kind]), yerr=errors, color=color, marker=_MARKERS[kind],
                        ms=4, lw=1.5, capsize=3, label=f"{name} (L(w)={attrs.get('loss_base', np.nan):.3g})")
    config = entries[0][2].get("config", {})
    ax.set_xscale("log")
    if log_loss:
        ax.set_yscale("log")
    adaptive = "adaptive " if config.get("adaptive") else ""
    m = config.get("m") or "all"
    ax.set(xlabel=f"ρ ({adaptive}{config.get('norm', '?')})", ylabel="sharpness L(w+δ) − L(w) (nats)",
           title=f"{adaptive.capitalize()}sharpness, m = {m}, BN {config.get('bn', '?')}"
                 f"{' recomputed' if config.get('bn_recompute') else ''}")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    figure.tight_layout()
    return figure


def draw_sharpness(arrays: Mapping[str, Any], attrs: Mapping[str, Any], **options: Any):
    return compare_sharpness([("", arrays, attrs)], **options)


FIGURES = {"sharpness": draw_sharpness}
COMPARE = {"sharpness": compare_sharpness}
