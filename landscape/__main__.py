"""``python -m landscape ...``: the same command line as ``landscape ...`` (also under ``torchrun -m``)."""

from landscape.cli.main import main

main()
