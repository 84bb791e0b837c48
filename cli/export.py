"""``landscape export``: a results file in another tool's format (never recomputes)."""

from __future__ import annotations

import click

from landscape.export import FORMATS

_FORMAT_HELP = "; ".join(f"{name}: {entry.description}" for name, entry in FORMATS.items())


@click.command()
@click.argument("results", type=click.Path(dir_okay=False))
@click.option("--format", "fmt", required=True, metavar="NAME", help=f"Output format. {_FORMAT_HELP}.")
@click.option("--out", default=None, type=click.Path(dir_okay=False),
              help="File to write [default: RESULTS' name with _NAME and the format's suffix, e.g. runs/sam_tg.h5].")
@click.option("--overwrite", is_flag=True, default=False, help="Replace an existing --out.")
def export(results: str, fmt: str, out: str | None, overwrite: bool) -> None:
    """Write RESULTS (an .h5 results file) in another tool's format.

    tg writes /surface as Li et al.'s loss-landscape surface file: root datasets xcoordinates,
    ycoordinates, train_loss, train_acc, test_loss, test_acc (accuracy in percent; 2-D values
    shaped (len(y), len(x)) for their meshgrid), and the directions as their per-parameter lists,
    so their plot_2D.py, plot_1D.py and h52vtp.py read it (pass it as --surf_file and --dir_file;
    plot_1D.py needs the train split, h52vtp.py a square grid).

    \b
    Examples:
      landscape export runs/sam.h5 --format tg --out runs/sam_tg.h5
      python plot_2D.py --surf_file runs/sam_tg.h5 --surf_name train_loss   # in their repository
    Python: from landscape.export import export; export("runs/sam.h5", "tg", "runs/sam_tg.h5")
    """
    from landscape.export import export as write

    click.echo(str(write(results, fmt, out, overwrite=overwrite)))
