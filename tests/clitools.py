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


def assert_input_error(result: Result, *fragments: str) -> None:
    """Bad input as the CLI must report it: exit code 2 and ONE line (no traceback, no internal error)
    holding every one of ``fragments``."""
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output and "Internal error" not in result.output, \
        result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
