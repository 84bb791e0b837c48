"""Figures for the gradient diagnostics: cosine stability / perturbed loss / inner-max gap, ratio histograms.

``FIGURES`` draws one stored result; ``COMPARE`` overlays several (e.g. SGD vs SAM checkpoints).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np

from landscape.errors import LandscapeError

Entry = tuple[str, Mapping[str, Any], Mapping[str, Any]]   # (label, arrays, attrs)
_STYLES = ("-", "--", "-.", ":")


def _band(ax, x: np.ndarray, mean: np.ndarray, std: np.ndarray, label: str, color, style: str = "-") -> None:
    ax.plot(x, mean, style, color=color, label=label, lw=1.6)
    ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.18, lw=0)


def _gamma_label(gamma2: float) -> str:
    return "vanilla (γ²=0)" if gamma2 == 0 else f"γ²={gamma2:g}"


def _draw_cosine(entries: Sequence[Entry], log_loss: bool = False):
    """Cosine vs ρ, perturbed loss vs ρ (one line per γ², ±1 std bands) and inner-max gaps vs ρ."""
    figure, (cos_ax, loss_ax, gap_ax) = plt.subplots(1, 3, figsize=(15, 4.2))
    colors = plt.get_cmap("tab10").colors
    single = len(entries) == 1
    for fi, (label, arrays, attrs) in enumerate(entries):
        rhos, prefix = np.asarray(arrays["rhos"]), "" if single else f"{label}: "
        for gi, gamma2 in enumerate(np.asarray(arrays["gammas2"])):
            color = colors[(gi if single else fi) % len(colors)]
            style = "-" if single else _STYLES[gi % len(_STYLES)]
            name = prefix + _gamma_label(float(gamma2))
            _band(cos_ax, rhos, arrays["cosine"][gi], arrays["cosine_std"][gi], name, color, style)
            _band(loss_ax, rhos, arrays["perturbed_loss"][gi], arrays["perturbed_loss_std"][gi], name, color, style)
        for ki, (key, what) in enumerate((("gap_sam", "PGA − SAM"), ("gap_rsam", "PGA − R-SAM"))):
            color = colors[(ki if single else fi) % len(colors)]
            _band(gap_ax, rhos, arrays[key], arrays[f"{key}_std"], prefix + what, color, "-" if single else _STYLES[ki])
    config = entries[0][2].get("config", {})
    cos_ax.set(xlabel="ρ", ylabel="cos(g(ŵ), g(ŵ + ρ g/‖g‖))", title="Gradient cosine stability")
    loss_ax.set(xlabel="ρ", ylabel="L(ŵ + ρ g/‖g‖)", title="Perturbed loss")
    gap_ax.set(xlabel="ρ", ylabel="loss gap (nats)",
               title=f"Inner-maximisation gap ({config.get('pga_steps', '?')}-step PGA)")
    if log_loss:
        loss_ax.set_yscale("log")
    gap_ax.axhline(0.0, color="0.5", lw=0.8)
    for ax in (cos_ax, loss_ax, gap_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    figure.suptitle(f"noise: {config.get('noise', '?')}, BN: {config.get('bn', '?')}, "
                    f"{config.get('batches', '?')} batches × {config.get('draws', '?')} draws of "
                    f"{config.get('batch_size', '?')} examples; bands ±1 std", fontsize=9)
    figure.tight_layout()
    return figure


def _histogram(ax, edges: np.ndarray, counts: np.ndarray, label: str, color, filled: bool) -> None:
    density = counts / max(counts.sum(), 1) / np.diff(edges)
    if filled:
        ax.stairs(density, edges, fill=True, color=color, alpha=0.5, label=label)
    else:
        ax.stairs(density, edges, color=color, lw=1.4, label=label)


def _fraction_label(prefix: str, fraction: float, zero: int) -> str:
    return f"{prefix}{100 * fraction:.1f}% r<0" + (f", {zero} zero g" if zero else "")


def _draw_ratio(entries: Sequence[Entry], by: str = "rho", rho_index: int = -1):
    """Histograms of r = log10|(g_SAM − g_SGD)/g_SGD|: one panel per ρ, or per layer at one ρ."""
    if by not in ("rho", "layer"):
        raise LandscapeError(f"unknown ratio figure layout {by!r}; use by='rho' or by='layer'")
    if by == "layer" and len(entries) != 1:
        raise LandscapeError("per-layer ratio histograms draw one file; compare files with by='rho'")
    label0, arrays0, attrs0 = entries[0]
    rhos = np.asarray(arrays0["rhos"])
    for label, arrays, _ in entries[1:]:
        if not np.array_equal(np.asarray(arrays["rhos"]), rhos):
            raise LandscapeError(f"{label} holds ratios at other ρ than {label0}; "
                                 "rerun `landscape ratio` with the same --rhos")
    if by == "rho":
        panels = [(f"ρ = {rho:g}", [(lbl, a, ri) for lbl, a, _ in entries]) for ri, rho in enumerate(rhos)]
    else:
        ri = rho_index % len(rhos)
        panels = [(name, [("", layer, ri)]) for name, layer in arrays0["layers"].items()]
    name = str(attrs0.get("config", {}).get("perturbation", "sam")).upper()
    cols = min(len(panels), 4)
    rows = -(-len(panels) // cols)
    figure, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    colors = plt.get_cmap("tab10").colors
    for ax, (title, series) in zip(axes.flat, panels):
        for si, (label, arrays, ri) in enumerate(series):
            edges = np.asarray(entries[0][1]["bin_edges"] if by == "layer" else arrays["bin_edges"])
            prefix = f"{label}: " if len(series) > 1 else ""
            text = _fraction_label(prefix, float(arrays["fraction_below_zero"][ri]),
                                   int(arrays["zero_gradient_count"][ri]))
            _histogram(ax, edges, np.asarray(arrays["counts"][ri]), text, colors[si % len(colors)], len(series) == 1)
        ax.axvline(0.0, color="k", ls="--", lw=0.8)
        ax.set(title=title, xlabel=f"r = log10|(g_{name} − g_SGD)/g_SGD|", ylabel="density")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    config = attrs0.get("config", {})
    subtitle = f"perturbation: {config.get('perturbation', '?')}, {config.get('batches', '?')} batches"
    if by == "layer":
        subtitle += f", ρ = {rhos[rho_index % len(rhos)]:g}"
    figure.suptitle(subtitle, fontsize=9)
    figure.tight_layout()
    return figure


def draw_cosine(arrays: Mapping[str, Any], attrs: Mapping[str, Any], log_loss: bool = False):
    """``/cosine`` figure: cosine and perturbed loss vs ρ per γ², and the inner-max gap vs ρ."""
    return _draw_cosine([("", arrays, attrs)], log_loss)


def draw_ratio(arrays: Mapping[str, Any], attrs: Mapping[str, Any], by: str = "rho", rho_index: int = -1,
               log_loss: bool = False):
    """``/ratio`` figure: histograms per ρ (``by="rho"``) or per layer at ``rhos[rho_index]`` (``by="layer"``).

    ``log_loss`` is accepted for a uniform ``landscape plot`` interface and has no effect here.
    """
    return _draw_ratio([("", arrays, attrs)], by, rho_index)


def compare_cosine(entries: Sequence[Entry], log_loss: bool = False):
    """Several ``/cosine`` results overlaid (colour per file, line style per γ²)."""
    return _draw_cosine(entries, log_loss)


def compare_ratio(entries: Sequence[Entry], log_loss: bool = False):
    """Several ``/ratio`` results overlaid, one panel per ρ (the files must share their ρ values)."""
    return _draw_ratio(entries, "rho")


FIGURES = {"cosine": draw_cosine, "ratio": draw_ratio}
COMPARE = {"cosine": compare_cosine, "ratio": compare_ratio}
