"""``landscape hessian``: top-k eigenvalues, spectral density (SLQ) and trace of a checkpoint's Hessian (or
its GGN or empirical Fisher), or the spread of λ1 over mini-batches."""

from __future__ import annotations

import warnings

import click
from click.core import ParameterSource

from landscape import distributed
from landscape.cli.common import (already_done, arch_options, data_option, device_option, eval_options,
                                  objective_from_options, out_option, overwrite_options, progress, seed_option)


@click.command()
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@click.option("--top-k", default=5, show_default=True, type=click.IntRange(min=0), help="Largest eigenvalues.")
@click.option("--bottom-k", default=0, show_default=True, type=click.IntRange(min=0),
              help="Most negative eigenvalues.")
@click.option("--eigenvectors", is_flag=True, default=False, help="Also store the eigenvectors (k x d).")
@click.option("--density", is_flag=True, default=False, help="Spectral density by stochastic Lanczos quadrature.")
@click.option("--trace", is_flag=True, default=False, help="Trace by Hutch++ (Hutchinson with the pyhessian backend).")
@click.option("--params", default=None, metavar="GLOB[,GLOB]",
              help="Restrict to matching parameters, e.g. 'layers.7.*' (the sub-block of the Hessian).")
@click.option("--per-block", is_flag=True, default=False, help="Also the top-k eigenvalues of every top-level block.")
@click.option("--n-v", default=4, show_default=True, type=click.IntRange(min=1), help="SLQ random starts.")
@click.option("--lanczos-steps", default=90, show_default=True, type=click.IntRange(min=2),
              help="Lanczos steps per SLQ start.")
@click.option("--tol", default=None, type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="Relative residual tolerance ||Hv - λv|| <= tol |λ|  [default: 1e-4; pyhessian: its 1e-3]")
@click.option("--trace-hvps", default=99, show_default=True, type=click.IntRange(min=6), help="HVPs for the trace.")
@click.option("--max-hvps", default=1000, show_default=True, type=click.IntRange(min=1),
              help="HVP cap per eigenvalue run (unconverged pairs are flagged).")
@click.option("--backend", default="landscape", show_default=True, type=click.Choice(["landscape", "pyhessian"]),
              help="pyhessian: eigenvalues and trace by PyHessian 0.1 (for comparison with papers).")
@click.option("--curvature", default="hessian", show_default=True, type=click.Choice(["hessian", "ggn", "fisher"]),
              help="The matrix: the Hessian; ggn, the generalised Gauss-Newton (1/N) Σ J_iᵀ H_L J_i (positive "
                   "semi-definite for cross-entropy); fisher, the EMPIRICAL Fisher (1/N) Σ g_i g_iᵀ of per-example "
                   "gradients at the true labels, which is NOT the Fisher (for cross-entropy the Fisher is the GGN) "
                   "and needs --bn eval. Saved as /hessian, /ggn or /fisher.")
@click.option("--per-batch", default=None, type=click.IntRange(min=1), metavar="B",
              help="Instead of the spectrum: λ1 on each of --batches disjoint, seeded mini-batches of B examples of "
                   "the evaluation set, with mean, std, stderr and histogram. Saved as /<curvature>_batches.")
@click.option("--batches", default=None, type=click.IntRange(min=2), metavar="N",
              help="Mini-batches for --per-batch.  [default: 8]")
@data_option
@eval_options()
@arch_options
@device_option
@seed_option
@out_option("results.h5")
@overwrite_options
def hessian(checkpoint: str, top_k: int, bottom_k: int, eigenvectors: bool, density: bool, trace: bool,
            params: str | None, per_block: bool, n_v: int, lanczos_steps: int, tol: float | None, trace_hvps: int,
            max_hvps: int, backend: str, curvature: str, per_batch: int | None, batches: int | None, out: str,
            overwrite: bool, resume: bool, seed: int, **options) -> None:
    """Hessian spectrum of CHECKPOINT's loss on its evaluation set: λ1…λk with residuals,
    λ1/λ5, SLQ density, trace ± standard error. Saved as /hessian in --out (/ggn, /fisher with
    --curvature). With --per-batch: λ1 on mini-batches, saved as /hessian_batches (/ggn_batches, ...).

    \b
    Examples:
      landscape hessian runs/sam.pt --density --trace --out runs/sam.h5
      landscape hessian runs/sgd.pt --top-k 10 --bottom-k 2 --dtype float64 --subset 512
      landscape hessian runs/sgd.pt --per-block --top-k 1
      landscape hessian runs/sgd.pt --backend pyhessian --trace
      landscape hessian runs/sgd.pt --curvature ggn --top-k 5 --trace --subset 512
      landscape hessian runs/sgd.pt --per-batch 128 --batches 8
    Python: landscape.hessian_spectrum(landscape.load_objective("runs/sam.pt", subset=512),
            top_k=5, density=True, trace=True).save("runs/sam.h5")
            landscape.minibatch_lambda1(landscape.load_objective("runs/sgd.pt"), 128, 8).save("runs/sgd.h5")
    """
    from landscape.analysis.hessian import BatchSpreadResult, HessianResult, hessian_spectrum, minibatch_lambda1

    _check_per_batch(per_batch, batches, top_k, bottom_k, eigenvectors, density, trace, per_block, backend)
    kind, group = (BatchSpreadResult, f"{curvature}_batches") if per_batch else (HessianResult, curvature)
    objective = objective_from_options(checkpoint, seed=seed, **options)
    asked = {"curvature": curvature, "params": params, "max_hvps": max_hvps, "bn": options["bn"],
             "dtype": options["dtype"]}
    if per_batch:
        asked.update(per_batch=per_batch, batches=batches or 8)
    else:
        asked.update(top_k=top_k, bottom_k=bottom_k, eigenvectors=eigenvectors, density=density, trace=trace,
                     per_block=per_block, n_v=n_v, lanczos_steps=lanczos_steps, trace_hvps=trace_hvps,
                     backend=backend, batch_size=options["batch_size"])
    if tol is not None:  # (the default depends on the backend)
        asked["tol"] = tol
    if already_done(out, group, overwrite, resume, objective, seed, asked):
        click.echo(distributed.on_main(lambda: kind.load(out, group)).summary())
        return
    with progress(None, curvature, "product") as bar, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        if per_batch:
            result = minibatch_lambda1(objective, per_batch, batches or 8, curvature=curvature, tol=tol, params=params,
                                       max_hvps=max_hvps, seed=seed, progress=bar.update)
        else:
            result = hessian_spectrum(objective, top_k, bottom_k=bottom_k, eigenvectors=eigenvectors, density=density,
                                      trace=trace, n_v=n_v, lanczos_steps=lanczos_steps, tol=tol, params=params,
                                      per_block=per_block, backend=backend, seed=seed, progress=bar.update,
                                      trace_hvps=trace_hvps, max_hvps=max_hvps, curvature=curvature)
    result.save(out, overwrite=overwrite)
    click.echo(result.summary())
    for warning in caught:
        if issubclass(warning.category, RuntimeWarning) and distributed.is_main():
            click.echo(f"warning: {warning.message}", err=True)
    click.echo(f"saved /{group} in {out}")


def _check_per_batch(per_batch: int | None, batches: int | None, top_k: int, bottom_k: int, eigenvectors: bool,
                     density: bool, trace: bool, per_block: bool, backend: str) -> None:
    """--batches needs --per-batch, which measures λ1 only: refuse the spectrum's options next to it."""
    if per_batch is None:
        if batches is not None:
            raise click.UsageError("--batches needs --per-batch B (examples per mini-batch)")
        return
    explicit_top_k = click.get_current_context().get_parameter_source("top_k") is ParameterSource.COMMANDLINE
    given = [name for name, on in (("--top-k", explicit_top_k and top_k != 1), ("--bottom-k", bottom_k),
                                   ("--eigenvectors", eigenvectors), ("--density", density), ("--trace", trace),
                                   ("--per-block", per_block), ("--backend pyhessian", backend != "landscape")) if on]
    if given:
        raise click.UsageError(f"--per-batch measures λ1 per mini-batch only; drop {given[0]} (run the spectrum "
                               "in a separate call)")
