"""`landscape plot`: figures from results files (never recomputes)."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.argument("results", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--group", "groups", multiple=True, metavar="NAME",
              help="Only these groups (hessian, ggn, fisher, hessian_batches, ggn_batches, fisher_batches, surface, "
                   "interpolation, radius, cosine, ratio, sharpness, training). Repeatable.")
@click.option("--out-dir", default=None, type=click.Path(file_okay=False),
              help="Where figures go (default: next to the results file).")
@click.option("--format", "fmt", default="png", show_default=True, type=click.Choice(["png", "pdf", "svg"]))
@click.option("--labels", default=None, help="Comma-separated labels for side-by-side panels (one per file).")
@click.option("--log-loss", is_flag=True, default=False, help="Plot surfaces and radius curves on a log-loss scale.")
@click.option("--html", is_flag=True, default=False,
              help="Write each file's /surface as an interactive page, <name>_surface.html, instead of images: a "
                   "rotatable 3-D surface, its contours and any stored trajectories; works offline. Needs plotly.")
def plot(results: tuple[str, ...], groups: tuple[str, ...], out_dir: str | None, fmt: str, labels: str | None,
         log_loss: bool, html: bool) -> None:
    """Draw the figures stored in RESULTS (.h5 files written by the analyses).

    With one file, every plottable group gets its own figure. With several files, each group
    they share is drawn side by side (e.g. SGD vs SAM). Optimizer trajectories stored in /surface
    are drawn on the contours, one colour per path.

    With --html, each file's /surface becomes an HTML page that opens in any browser without a
    network (plotly.js is inside it): drag to rotate the surface, hover for values, click a legend
    entry to hide a trajectory. Needs plotly: pip install 'landscape[interactive]'.

    \b
    Examples:
      landscape plot runs/sgd.h5
      landscape plot runs/sgd.h5 runs/sam.h5 --labels SGD,SAM --group surface --format pdf
      landscape plot runs/sam.h5 --html                      # writes runs/sam_surface.html
    Python: landscape.plot_file("runs/sgd.h5"); landscape.plotting.plot_html("runs/sam.h5")
    """
    from landscape.errors import LandscapeError
    from landscape.plotting import MODULES, interactive_module, plot_compare, plot_file, plot_html, use_file_backend
    from landscape.store import list_groups

    options = {"log_loss": True} if log_loss else {}
    if html:
        if set(groups) - {"surface"}:
            raise click.UsageError("--html draws /surface only; leave out --group or give --group surface")
        if interactive_module() is None:
            raise LandscapeError("--html needs plotly: pip install 'landscape[interactive]'")
        for path in results:
            click.echo(str(plot_html(path, out_dir, **options)))
        return

    use_file_backend()
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
