"""`landscape plot`: figures from results files (never recomputes)."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.argument("results", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--group", "groups", multiple=True, metavar="NAME",
              help="Only these groups (hessian, ggn, fisher, hessian_batches, ggn_batches, fisher_batches, surface, "
                   "interpolation, radius, cosine, ratio). Repeatable.")
@click.option("--out-dir", default=None, type=click.Path(file_okay=False),
              help="Where figures go (default: next to the results file).")
@click.option("--format", "fmt", default="png", show_default=True, type=click.Choice(["png", "pdf", "svg"]))
@click.option("--labels", default=None, help="Comma-separated labels for side-by-side panels (one per file).")
@click.option("--log-loss", is_flag=True, default=False, help="Plot surfaces and radius curves on a log-loss scale.")
def plot(results: tuple[str, ...], groups: tuple[str, ...], out_dir: str | None, fmt: str, labels: str | None,
         log_loss: bool) -> None:
    """Draw the figures stored in RESULTS (.h5 files written by the analyses).

    With one file, every plottable group gets its own figure. With several files, each group
    they share is drawn side by side (e.g. SGD vs SAM).

    \b
    Examples:
      landscape plot runs/sgd.h5
      landscape plot runs/sgd.h5 runs/sam.h5 --labels SGD,SAM --group surface --format pdf
    Python: landscape.plot_file("runs/sgd.h5")
    """
    from landscape.plotting import MODULES, plot_compare, plot_file, use_file_backend
    from landscape.store import list_groups

    use_file_backend()

    options = {"log_loss": True} if log_loss else {}
    if len(results) == 1:
        written = plot_file(results[0], out_dir, list(groups) or None, fmt, **options)
    else:
        shared = set.intersection(*(set(list_groups(p)) for p in results))
        wanted = list(groups) or sorted(shared & set(MODULES))
        missing = [g for g in wanted if g not in shared]
        if missing or not wanted:
            raise click.UsageError(f"not every file holds /{missing[0] if missing else 'a plottable group'}; "
                                   "pick a --group that all files share")
        names = [label.strip() for label in labels.split(",")] if labels else None
        target = Path(out_dir) if out_dir else Path(results[0]).parent
        written = [plot_compare(list(results), g, target / f"compare_{g}.{fmt}", names, **options) for g in wanted]
    for path in written:
        click.echo(str(path))
