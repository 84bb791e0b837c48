"""Run the ``landscape`` CLI in-process (click's CliRunner), for the command tests."""

from click.testing import CliRunner, Result


def invoke(*args) -> Result:
    """``landscape ARGS...``; arguments may be paths or numbers."""
    from landscape.cli.main import cli
    return CliRunner().invoke(cli, [str(a) for a in args])
