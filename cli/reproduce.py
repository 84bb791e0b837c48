"""`landscape reproduce`: every optimizer, every analysis, every figure, end to end."""

from __future__ import annotations

import click

from landscape.cli.common import device_option, seed_option


@click.command()
@click.option("--out-dir", default="runs/reproduce", show_default=True, type=click.Path(file_okay=False),
              help="Where checkpoints, results, figures and summary.md go. Existing outputs are reused (resume).")
@click.option("--optimizers", default=None, metavar="LIST",
              help="Comma-separated optimizers (default: all ten of the papers: sgd,sam,asam,rsam,rwp,arwp,mrwp,"
                   "marwp,ssamf,ssamd).")
@click.option("--data", default="digits", show_default=True, metavar="SPEC", help="Dataset spec.")
@click.option("--arch", default="cnn", show_default=True, help="Architecture (see `landscape models`).")
@click.option("--quick", is_flag=True, default=False, help="Tiny sizes: a smoke test of the whole pipeline.")
@seed_option
@device_option
def reproduce(out_dir: str, optimizers: str | None, data: str, arch: str, quick: bool, seed: int, device: str) -> None:
    """Train each optimizer, run the Hessian, surface, radius, cosine and ratio analyses,
    and regenerate the papers' figures plus a summary table (summary.md).

    \b
    Examples:
      landscape reproduce                       # all ten optimizers on digits (~15 min on 2 CPU cores)
      landscape reproduce --optimizers sgd,sam --quick --out-dir /tmp/smoke
    Python: landscape.reproduce.reproduce("runs/reproduce")
    """
    from landscape import distributed
    from landscape.cli.common import progress
    from landscape.engine import tune_allocator
    from landscape.optimizers import list_optimizers
    from landscape.plotting import use_file_backend
    from landscape.reproduce import FULL, PAPER_OPTIMIZERS, QUICK
    from landscape.reproduce import reproduce as run

    if distributed.launched():
        raise click.UsageError("landscape reproduce runs in one process; run it without torchrun (each command it "
                               "runs, train, hessian, surface, radius, cosine, ratio, also runs under torchrun)")
    names = [n.strip() for n in optimizers.split(",") if n.strip()] if optimizers else list(PAPER_OPTIMIZERS)
    unknown = [n for n in names if not list_optimizers(n)]
    if unknown:
        raise click.UsageError(f"unknown optimizer {unknown[0]!r}; see `landscape optimizers`")
    use_file_backend()
    tune_allocator()
    summary = run(out_dir, names, data=data, arch=arch, settings=QUICK if quick else FULL, device=device, seed=seed,
                  log=lambda line: click.echo(line, err=True), progress=progress)
    click.echo(str(summary))
