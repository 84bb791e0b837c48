"""The ``landscape`` command group. Subcommands load lazily, so ``--help`` answers at once."""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import warnings
from collections.abc import Iterator

import click

from landscape import __version__

# name -> (module, attribute, one-line help shown without importing the module)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "train": ("landscape.cli.train", "train", "Train a model with any registered optimizer; write a checkpoint."),
    "optimizers": ("landscape.cli.train", "optimizers", "List the registered optimizers and their defaults."),
    "hessian": ("landscape.cli.hessian", "hessian", "Hessian spectrum: top-k eigenvalues, density (SLQ), trace."),
    "surface": ("landscape.cli.surface", "surface", "Filter-normalised 1-D/2-D loss surface (resumable)."),
    "trajectory": ("landscape.cli.trajectory", "trajectory", "Optimizer paths on one PCA plane with its loss surface."),
    "interpolate": ("landscape.cli.surface", "interpolate", "Loss along the line between two checkpoints."),
    "radius": ("landscape.cli.surface", "radius", "Perturbed loss versus radius: adversarial (SAM) vs random."),
    "cosine": ("landscape.cli.diagnostics", "cosine", "Gradient cosine stability and perturbed loss (R-SAM)."),
    "ratio": ("landscape.cli.diagnostics", "ratio", "SAM/SGD gradient-ratio histograms (SSAM)."),
    "sharpness": ("landscape.cli.sharpness", "sharpness", "Worst- and average-case (adaptive) sharpness versus rho."),
    "plot": ("landscape.cli.plot", "plot", "Draw the figures of a results file (.h5)."),
    "export": ("landscape.cli.export", "export", "Write a results file as Li et al.'s file, ParaView .vtp, csv or npz."),
    "info": ("landscape.cli.info", "info", "Show a checkpoint's metadata or a results file's contents."),
    "models": ("landscape.cli.info", "models", "List the built-in architectures."),
    "datasets": ("landscape.cli.info", "datasets", "List the accepted dataset specs."),
    "reproduce": ("landscape.cli.reproduce", "reproduce", "Regenerate every figure end to end."),
}


# Commands that compute nothing: under torchrun rank 0 runs them and the other ranks wait for it (and
# exit with its code). ``reproduce`` refuses torchrun; ``train`` and the analyses run on every rank.
MAIN_ONLY = ("optimizers", "plot", "export", "info", "models", "datasets")


def _echo_error(line: str) -> None:
    click.echo(line, err=True)


def _echo_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Show a warning as one line on stderr, ``warning: MESSAGE`` (rank 0 only under torchrun)."""
    from landscape import distributed
    if distributed.is_main():
        click.echo(f"warning: {message}", err=True)


def _fail(message: str, code: int) -> None:
    """End the command: ``message`` on stderr and exit ``code``; under torchrun every rank exits ``code``
    and rank 0 alone prints (see :func:`landscape.distributed.fail`)."""
    from landscape import distributed
    distributed.fail(message, code, _echo_error)
    sys.exit(code)


@contextlib.contextmanager
def _ranks() -> Iterator[None]:
    """Join torchrun's process group when launched by it; ranks other than 0 print nothing to stdout. A
    failure on any rank ends every rank (its watchdog runs while the command does)."""
    from landscape import distributed
    distributed.setup()
    distributed.fail_together(_echo_error)
    try:
        if distributed.is_main():
            yield
            return
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
            yield
    finally:
        distributed.stop_watchdog()


INPUT_ERROR = 2  # exit code for bad input from the user (one line on stderr)


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        from landscape import distributed
        if name in MAIN_ONLY and not distributed.is_main():
            return _WAIT_FOR_RANK_0
        module, attribute, _ = COMMANDS[name]
        return getattr(importlib.import_module(module), attribute)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, text) for name, (_, _, text) in COMMANDS.items()])

    def invoke(self, ctx: click.Context):
        from landscape.errors import LandscapeError
        try:
            with _ranks(), warnings.catch_warnings():
                warnings.showwarning = _echo_warning
                value = super().invoke(ctx)
            if ctx.invoked_subcommand in MAIN_ONLY:
                from landscape import distributed
                distributed.main_done()
            return value
        except click.UsageError as exc:  # one line, not click's usage banner
            command = f" {ctx.invoked_subcommand}" if ctx.invoked_subcommand else ""
            _fail(f"Error: {exc.format_message()} (see `landscape{command} --help`)", INPUT_ERROR)
        except click.ClickException as exc:
            _fail(f"Error: {exc.format_message()}", exc.exit_code)
        except (click.exceptions.Exit, click.Abort):
            raise
        except (LandscapeError, ValueError, OSError) as exc:
            if os.environ.get("LANDSCAPE_DEBUG"):
                raise
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
            _fail(f"Error: {message}", INPUT_ERROR)
        except Exception as exc:  # a bug, not bad input: still one line, exit 1
            if os.environ.get("LANDSCAPE_DEBUG"):
                raise
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            _fail(f"Internal error: {exc.__class__.__name__}: {first} "
                  "(set LANDSCAPE_DEBUG=1 for the traceback and report it)", 1)


def _wait_for_rank_0(arguments: tuple[str, ...]) -> None:
    """What ranks other than 0 run for a command of :data:`MAIN_ONLY`: wait until rank 0 has run it."""
    from landscape import distributed
    distributed.wait_for_main()


_WAIT_FOR_RANK_0 = click.Command("wait", callback=_wait_for_rank_0, params=[click.Argument(["arguments"], nargs=-1)],
                                 add_help_option=False,
                                 context_settings={"ignore_unknown_options": True, "allow_extra_args": True})


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="landscape")
def cli() -> None:
    """Measure the geometry your optimizer found: Hessian spectra, loss surfaces,
    perturbed loss versus radius, gradient diagnostics.

    \b
    Quick start on the embedded digits dataset:
      landscape train --optimizer sam --out runs/sam.pt
      landscape hessian runs/sam.pt --density --trace --out runs/sam.h5
      landscape surface runs/sam.pt --out runs/sam.h5
      landscape plot runs/sam.h5
    """


def main() -> None:
    cli(prog_name="landscape")


if __name__ == "__main__":
    main()
