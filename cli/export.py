"""``landscape export``: a results file in another tool's format (never recomputes)."""

from __future__ import annotations

import click

from landscape.export import FORMATS, TABLE_GROUPS

_FORMAT_HELP = "; ".join(f"{name}: {entry.description}" for name, entry in FORMATS.items())


@click.command()
@click.argument("results", type=click.Path(dir_okay=False))
@click.option("--format", "fmt", required=True, metavar="NAME", help=f"Output format. {_FORMAT_HELP}.")
@click.option("--out", default=None, type=click.Path(dir_okay=False),
              help="File to write [default: RESULTS' name with the format's suffix, e.g. runs/sam.vtp; runs/sam_tg.h5 for tg].")
@click.option("--overwrite", is_flag=True, default=False, help="Replace an existing --out.")
@click.option("--metric", default=None, metavar="ARRAY",
              help="vtp: the stored array drawn as height, e.g. test_loss, train_acc [default: the first stored loss].")
@click.option("--log", is_flag=True, default=False, help="vtp: height ln(value + 0.1), as Li et al.'s h52vtp.py --log.")
@click.option("--zmax", default=None, type=float, metavar="Z",
              help="vtp: clip values above Z (before --log), as h52vtp.py --zmax.")
@click.option("--group", default=None, type=click.Choice(TABLE_GROUPS),
              help="csv, npz: the result to write [default: surface].")
def export(results: str, fmt: str, out: str | None, overwrite: bool, metric: str | None, log: bool,
           zmax: float | None, group: str | None) -> None:
    """Write RESULTS (an .h5 results file) in another tool's format.

    tg writes /surface as Li et al.'s loss-landscape surface file: root datasets xcoordinates,
    ycoordinates, train_loss, train_acc, test_loss, test_acc (accuracy in percent; 2-D values
    shaped (len(y), len(x)) for their meshgrid), and the directions as their per-parameter lists,
    so their plot_2D.py, plot_1D.py and h52vtp.py read it (pass it as --surf_file and --dir_file;
    plot_1D.py needs the train split, h52vtp.py a square grid).

    vtp writes /surface for ParaView (File > Open): point (x, y, z) per grid point, one quad per
    grid cell (a 1-D surface: one line through (x, 0, z)); point arrays z, divergent and every
    stored array (train_loss, train_acc, ...) as stored. Non-finite (divergent) points are clipped:
    drawn at the top (--zmax, or the largest finite value) and marked divergent = 1; remove them
    with ParaView's Threshold filter on divergent.

    csv writes one row per point: x, y (alpha for --group interpolation) and one column per stored
    array, floats in Python's exact repr (nan for divergent points). npz holds the coordinates,
    the stored arrays and any optimizer trajectory under their stored names.

    \b
    Examples:
      landscape export runs/sam.h5 --format tg --out runs/sam_tg.h5
      python plot_2D.py --surf_file runs/sam_tg.h5 --surf_name train_loss   # in their repository
      landscape export runs/sam.h5 --format vtp --log --zmax 10 --out runs/sam.vtp
      landscape export runs/sam.h5 --format csv --out runs/sam_surface.csv
      landscape export runs/interp.h5 --format npz --group interpolation --out runs/interp.npz
    Python: from landscape.export import export; export("runs/sam.h5", "vtp", "runs/sam.vtp", log=True, zmax=10)
    """
    from landscape.export import export as write

    options = {"metric": metric, "log": log, "zmax": zmax, "group": group}
    click.echo(str(write(results, fmt, out, overwrite=overwrite, **options)))
