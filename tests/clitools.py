"""Run the ``landscape`` CLI in-process (click's CliRunner), for the command tests."""

from click.testing import CliRunner, Result


def invoke(*args) -> Result:
    """``landscape ARGS...``; arguments may be paths or numbers."""
    from landscape.cli.main import cli
    return CliRunner().invoke(cli, [str(a) for a in args])


def kill_after_progress(worker, count: int) -> None:
    """SIGKILL ``worker`` (a text-mode Popen printing ``"<points done> ..."`` lines) once it reports ``count``."""
    import os
    import signal

    for line in worker.stdout:
        if int(line.split()[0]) >= count:
            break
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
