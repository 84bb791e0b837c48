"""``landscape cosine`` and ``landscape ratio``: per-minibatch gradient diagnostics of SAM-family perturbations."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click
from landscape.cli.common import (
    already_done,
    arch_options,
    compose,
    data_option,
    device_option,
    eval_options,
    objective_from_options,
    out_option,
    overwrite_options,
    parse_floats,
    parse_grid,
    progress,
    renamed_option,
    seed_option,
)


def parse_bins(text: str) -> list[float]:
    """Histogram edges: ``LO:HI:N`` (N equal bins, N + 1 edges) or a comma-separated list of edges."""
    if ":" in text:
        low, high, count = (text.split(":") + ["", "", ""])[:3]
        text = f"{low}:{high}:{int(count) + 1 if count.strip().isdigit() else count}"
    return [float(v) for v in parse_grid(text, "--bins", example="-8:4:120")]


_rsam_grad_weight_options = compose(
    click.option("--rsam-grad-weight", default=None, type=float,
                 help="R-SAM's weight a of the gradient in δ0 + a g (the paper's λ) "
                      "[default: the rsam optimizer's]."),
    renamed_option("--rsam-lam", "--rsam-grad-weight"))
_minibatch_options = eval_options(
    default_bn="train", default_batch_size=128,
    batch_help="Minibatch size; both gradients of every pair use the same minibatch (changes the result).")


def _shared(default_out: str) -> Callable[[Callable], Callable]:
    return compose(click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False)), data_option,
                   _minibatch_options, arch_options, device_option, seed_option, out_option(default_out),
                   overwrite_options)


def _cell(mean: float, std: float) -> str:
    return f"{mean:.4f}±{std:.4f}"


def _echo_table(header: list[str], rows: list[list[str]]) -> None:
    """Aligned columns: the first (a label) left-aligned, the numbers right-aligned."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    for row in (header, *rows):
        click.echo("  ".join([row[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(row[1:], widths[1:]))]))


def print_cosine(result: Any) -> None:
    """Cosine and perturbed loss per γ², then SAM / R-SAM / PGA losses and gaps, one row per ρ."""
    a, config = result.arrays, result.attrs["config"]
    gammas = [f"γ²={g:g}" for g in a["gammas2"]]
    click.echo(f"cosine(g(ŵ), g(ŵ + ρ g/‖g‖)), mean±std over batches × draws (noise {config['noise']}, "
               f"BN {config['bn']}):")
    _echo_table(["rho", *gammas], [[f"{rho:.3f}", *(_cell(a["cosine"][g, i], a["cosine_std"][g, i])
                                                    for g in range(len(gammas)))] for i, rho in enumerate(a["rhos"])])
    click.echo(f"\nperturbed loss L(ŵ + ρ g/‖g‖) (unperturbed batch loss {result.attrs['base_loss']:.4f}):")
    _echo_table(["rho", *gammas], [[f"{rho:.3f}", *(_cell(a["perturbed_loss"][g, i], a["perturbed_loss_std"][g, i])
                                                    for g in range(len(gammas)))] for i, rho in enumerate(a["rhos"])])
    click.echo(f"\ninner maximisation on the ρ-ball (PGA: best of {config['pga_steps']} projected ascent steps "
               f"from SAM's point; R-SAM γ={config['rsam_gamma']:g}, grad_weight={config['rsam_grad_weight']:g}):")
    keys = ["loss_sam", "loss_rsam", "loss_pga", "gap_sam", "gap_rsam"]
    _echo_table(["rho", "L_SAM", "L_R-SAM", "L_PGA", "PGA-SAM", "PGA-R-SAM"],
                [[f"{rho:.3f}", *(_cell(a[k][i], a[f"{k}_std"][i]) for k in keys)] for i, rho in enumerate(a["rhos"])])


def print_ratio(result: Any) -> None:
    """Global fraction r < 0 and the special counts per ρ, then the fraction per layer."""
    a, config = result.arrays, result.attrs["config"]
    click.echo(f"r = log10|(g_{config['perturbation'].upper()} - g_SGD)/g_SGD| over {config['batches']} batches "
               f"(r = -inf: g unchanged, counted as r < 0; g_SGD = 0: not binned):")
    _echo_table(["rho", "r<0", "entries", "g_SGD=0", "unchanged", "below bins", "above bins"],
                [[f"{rho:g}", f"{100 * a['fraction_below_zero'][i]:.2f}%", str(a["entries"][i]),
                  str(a["zero_gradient_count"][i]), str(a["equal_count"][i]), str(a["below_range"][i]),
                  str(a["above_range"][i])] for i, rho in enumerate(a["rhos"])])
    click.echo("\nfraction with r < 0 per parameter tensor:")
    _echo_table(["parameter", *(f"rho={rho:g}" for rho in a["rhos"])],
                [[name, *(f"{100 * f:.2f}%" for f in layer["fraction_below_zero"])]
                 for name, layer in a["layers"].items()])


@click.command()
@_shared("landscape.h5")
@click.option("--rhos", default="0:1:21", show_default=True, help="Radii ρ: LO:HI:N (N values) or a list.")
@click.option("--gammas2", default="0,0.0075,0.01,0.0125", show_default=True,
              help="Noise variances γ² of the random start ŵ = w + δ0; 0 is vanilla SAM.")
@click.option("--noise", default="kernel", show_default=True, type=click.Choice(["kernel", "isotropic"]),
              help="δ0: R-SAM's kernel-wise noise (std γ sqrt(‖w_j‖) per filter) or isotropic N(0, γ² I).")
@click.option("--batches", default=4, show_default=True, type=click.IntRange(min=1),
              help="Minibatches to average over.")
@click.option("--draws", default=4, show_default=True, type=click.IntRange(min=1), help="Noise draws per minibatch.")
@click.option("--pga-steps", default=10, show_default=True, type=click.IntRange(min=1),
              help="Projected gradient ascent steps (the inner-maximisation reference), started at SAM's point.")
@click.option("--pga-step", default=1.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="PGA step length as a fraction of ρ (along the normalised gradient, then projection on the ball).")
@click.option("--rsam-gamma", default=None, type=float,
              help="R-SAM's γ for its randomised ascent [default: the rsam optimizer's].")
@_rsam_grad_weight_options
def cosine(checkpoint: str, rhos: str, gammas2: str, noise: str, batches: int, draws: int, pga_steps: int,
           pga_step: float, rsam_gamma: float | None, rsam_grad_weight: float | None, out: str, overwrite: bool,
           resume: bool, seed: int, **options: Any) -> None:
    """Gradient cosine stability and perturbed loss versus ρ (R-SAM Figs. 1-2), and the
    inner-maximisation gap of SAM's and R-SAM's one-step ascent against projected gradient ascent.

    Per minibatch: cos(g(ŵ), g(ŵ + ρ g(ŵ)/‖g(ŵ)‖)) and L(ŵ + ρ g(ŵ)/‖g(ŵ)‖) with ŵ = w + δ0,
    for each γ², averaged over --batches × --draws. The ascent is SAM's own rule (landscape.optimizers). Writes /cosine
    of --out as a whole (--resume skips a completed run).

    \b
    Examples:
      landscape cosine runs/sam.pt --out runs/sam.h5
      landscape cosine runs/sgd.pt --rhos 0,0.05,0.1,0.5 --noise isotropic --bn eval --dtype float64
    Python:
      landscape.cosine_stability(landscape.load_objective("runs/sam.pt"), batch_size=128).save("runs/sam.h5")
    """
    from landscape.analysis.cosine import cosine_stability

    rho_values, gamma_values = [float(v) for v in parse_grid(rhos, "--rhos", example="0:1:21")], parse_floats(gammas2, "--gammas2")
    objective = objective_from_options(checkpoint, seed=seed, **options)
    given = {"rsam_gamma": rsam_gamma, "rsam_grad_weight": rsam_grad_weight}  # (the defaults are the optimizer's)
    asked = {"rhos": rho_values, "gammas2": gamma_values, "noise": noise, "batches": batches, "draws": draws,
             "bn": options["bn"], "pga_steps": pga_steps, "pga_step": pga_step,
             **{key: value for key, value in given.items() if value is not None}}
    if already_done(out, "cosine", overwrite, resume, objective, seed, asked):
        click.echo(f"{out}: /cosine is complete; nothing to do")
        return
    result = cosine_stability(objective, rho_values, gamma_values, noise=noise, batches=batches, draws=draws,
                              batch_size=options["batch_size"], bn=options["bn"], pga_steps=pga_steps,
                              pga_step=pga_step, rsam_gamma=rsam_gamma, rsam_grad_weight=rsam_grad_weight,
                              seed=seed, progress=progress)
    result.save(out, overwrite=overwrite)
    print_cosine(result)
    click.echo(f"\nwrote {out} /cosine")


@click.command()
@_shared("landscape.h5")
@click.option("--rhos", default="0.01,0.05,0.1", show_default=True, help="Radii ρ (> 0): a list or LO:HI:N.")
@click.option("--perturbation", default="sam", show_default=True, type=click.Choice(["sam", "asam", "rsam"]),
              help="Whose perturbation ε gives g_SAM = g(w + ε): SAM's, ASAM's or R-SAM's rule.")
@click.option("--batches", default=4, show_default=True, type=click.IntRange(min=1),
              help="Minibatches whose histograms are accumulated.")
@click.option("--bins", default="-8:4:120", show_default=True,
              help="Histogram of r: LO:HI:N (N equal bins) or a list of edges; outside values are counted apart.")
@click.option("--asam-eta", default=None, type=float, help="ASAM's η [default: the asam optimizer's].")
@click.option("--rsam-gamma", default=None, type=float, help="R-SAM's γ [default: the rsam optimizer's].")
@_rsam_grad_weight_options
def ratio(checkpoint: str, rhos: str, perturbation: str, batches: int, bins: str, asam_eta: float | None,
          rsam_gamma: float | None, rsam_grad_weight: float | None, out: str, overwrite: bool, resume: bool, seed: int,
          **options: Any) -> None:
    """Histograms of r = log10|(g_SAM - g_SGD)/g_SGD| per parameter entry (SSAM Fig. 1).

    g_SGD and g_SAM are taken on the same minibatch, g_SAM at w + ε with ε the optimizer's own
    perturbation. Histograms are global and per parameter tensor; entries with g_SGD = 0 and entries
    whose gradient does not change (r = -inf) are counted separately. Writes /ratio of --out.

    \b
    Examples:
      landscape ratio runs/sgd.pt --out runs/sgd.h5
      landscape ratio runs/sam.pt --rhos 0.05 --perturbation rsam --dtype float64 --bins -10:4:140
    Python:
      landscape.gradient_ratio(landscape.load_objective("runs/sgd.pt"), batch_size=128).save("runs/sgd.h5")
    """
    from landscape.analysis.ratio import gradient_ratio

    rho_values = [float(v) for v in parse_grid(rhos, "--rhos", example="0:1:21")]
    edges = parse_bins(bins)
    objective = objective_from_options(checkpoint, seed=seed, **options)
    given = {"asam_eta": asam_eta, "rsam_gamma": rsam_gamma,  # (the defaults are the optimizer's)
             "rsam_grad_weight": rsam_grad_weight}
    asked = {"rhos": rho_values, "perturbation": perturbation, "batches": batches, "bin_edges": edges,
             "bn": options["bn"], **{key: value for key, value in given.items() if value is not None}}
    if already_done(out, "ratio", overwrite, resume, objective, seed, asked):
        click.echo(f"{out}: /ratio is complete; nothing to do")
        return
    result = gradient_ratio(objective, rho_values, perturbation=perturbation, batches=batches,
                            batch_size=options["batch_size"], bin_edges=edges, bn=options["bn"], asam_eta=asam_eta,
                            rsam_gamma=rsam_gamma, rsam_grad_weight=rsam_grad_weight, seed=seed, progress=progress)
    result.save(out, overwrite=overwrite)
    print_ratio(result)
    click.echo(f"\nwrote {out} /ratio")
