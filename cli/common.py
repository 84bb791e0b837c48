"""Options and helpers shared by the commands (device, seed, output, data, architecture, evaluation set)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping
from typing import Any

import click

F = Callable[..., Any]
COORDINATE_BYTES = 64  # memory per grid coordinate: the array, the Python float in the config list, its JSON


def compose(*decorators: F) -> Callable[[F], F]:
    """One decorator applying ``decorators`` as if stacked in this order above a function."""
    def apply(function: F) -> F:
        for decorator in reversed(decorators):
            function = decorator(function)
        return function
    return apply


device_option = click.option("--device", default="auto", show_default=True,
                             type=click.Choice(["auto", "cpu", "cuda"]),
                             help="Where to compute; auto picks CUDA when available (under torchrun each rank "
                                  "its own GPU, cuda:LOCAL_RANK).")
seed_option = click.option("--seed", default=0, show_default=True, type=int, help="Random seed.")
data_option = click.option("--data", default=None, metavar="SPEC",
                           help="Dataset spec: digits, cifar10:PATH, cifar100:PATH, npz:PATH, "
                                "imagefolder:PATH[,options] or module:function (see `landscape datasets`). "
                                "Default: the one recorded in the checkpoint.")


def out_option(default: str, help_text: str = "Results file (HDF5); one group per analysis.") -> Callable[[F], F]:
    return click.option("--out", default=default, show_default=True, type=click.Path(dir_okay=False),
                        help=help_text)


def parse_json_object(ctx: click.Context, param: click.Parameter, value: str | None) -> dict | None:
    if value is None:
        return None
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not valid JSON ({exc.msg}); example: '{{\"depth\": 16, \"width\": 4}}'") from None
    if not isinstance(parsed, dict):
        raise click.BadParameter("must be a JSON object, e.g. '{\"bn\": false}'")
    return parsed


trust_option = click.option("--trust", is_flag=True, default=False,
                            help="Allow loading pickled modules/TorchScript and module:function names recorded in "
                                 "the file (runs code from the file: only for files you trust).")
arch_options = compose(
    click.option("--arch", default=None, metavar="NAME|module:function",
                 help="Architecture for foreign checkpoints (see `landscape models`)."),
    click.option("--arch-kwargs", default=None, callback=parse_json_object, metavar="JSON",
                 help="Keyword arguments for --arch, as a JSON object."),
    trust_option,
)


def eval_options(default_subset: int | None = None, default_bn: str = "eval", default_batch_size: int = 256,
                 batch_help: str = "Examples per forward pass (does not change the result).",
                 splits: tuple[str, ...] = ("train", "test"),
                 split_help: str = "Which split the evaluation set comes from.") -> Callable[[F], F]:
    return compose(
        click.option("--split", default="train", show_default=True, type=click.Choice(list(splits)), help=split_help),
        click.option("--subset", default=default_subset, show_default=True, type=click.IntRange(min=1),
                     help="Use a fixed, seeded subset of N examples (recorded in the results)."),
        click.option("--batch-size", default=default_batch_size, show_default=True, type=click.IntRange(min=1),
                     help=batch_help),
        click.option("--bn", default=default_bn, show_default=True, type=click.Choice(["eval", "train"]),
                     help="BatchNorm: running statistics (eval) or batch statistics (train, buffers untouched)."),
        click.option("--dtype", default="float32", show_default=True, type=click.Choice(["float32", "float64"]),
                     help="Compute precision."),
        click.option("--data-on", default="auto", show_default=True, type=click.Choice(["auto", "device", "host"]),
                     help="Where the evaluation set is held: on the device, or in host memory and streamed to the "
                          "device batch by batch (for sets larger than its memory; same results). auto: the "
                          "device when the set takes at most half its free memory."),
    )


def renamed_option(old: str, new: str) -> Callable[[F], F]:
    """A hidden option ``old`` that is refused in one line naming ``new``, its name since it was renamed."""
    def refuse(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
        if value is not None:
            raise click.UsageError(f"{old} is now called {new}; pass {new} {value}")
    return click.option(old, hidden=True, expose_value=False, callback=refuse)


overwrite_options = compose(
    click.option("--overwrite", is_flag=True, default=False, help="Replace an existing result group."),
    click.option("--resume", is_flag=True, default=False, help="Continue an interrupted run."),
)


def objective_from_options(checkpoint: str, *, data: str | None, split: str, subset: int | None, batch_size: int,
                           bn: str, dtype: str, device: str, arch: str | None, arch_kwargs: dict | None,
                           trust: bool, seed: int = 0, data_on: str = "auto", **_: Any):
    """Build the Objective the shared options describe (the subset is drawn with ``seed``); under torchrun
    it is data parallel (see :class:`landscape.objective.Objective`)."""
    from landscape.objective import load_objective
    return load_objective(checkpoint, data=data, split=split, subset=subset, subset_seed=seed,
                          batch_size=batch_size, bn=bn, dtype=dtype, device=device, arch=arch,
                          arch_kwargs=arch_kwargs, trust=trust, data_on=data_on)


def parse_floats(text: str, name: str = "value") -> list[float]:
    """Parse ``"0,0.1,0.2"`` into floats; a bad entry is a one-line usage error."""
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise click.UsageError(f"{name} must be comma-separated numbers, e.g. 0,0.05,0.1; got {text!r}") from None
    if not values:
        raise click.UsageError(f"{name} needs at least one number, e.g. 0,0.05,0.1")
    return values


def parse_grid(text: str, name: str, log: bool = False, example: str = "-1:1:51"):
    """``LO:HI:N`` (N points, ends included; log-spaced if ``log``) or a comma-separated list -> numpy array.

    An N whose coordinates cannot fit in memory is refused before anything is allocated."""
    import numpy as np

    from landscape.resources import require
    if ":" not in text:
        values = np.asarray(parse_floats(text, name))
    else:
        parts = text.split(":")
        try:
            low, high, count = float(parts[0]), float(parts[1]), int(parts[2])
        except (ValueError, IndexError):
            count = 0
        if len(parts) != 3 or count < 1:
            raise click.UsageError(f"{name} must be LO:HI:N with N >= 1 or a comma-separated list, e.g. {example}; "
                                   f"got {text!r}")
        if log and not (low > 0 and high > 0):
            raise click.UsageError(f"{name} is log-spaced, so LO and HI must be > 0; got {text!r}")
        require(f"{name} with {count:,} points", f"give fewer points than {text!r}", memory=count * COORDINATE_BYTES)
        values = np.geomspace(low, high, count) if log else np.linspace(low, high, count)
    if not np.all(np.isfinite(values)):
        raise click.UsageError(f"{name} must hold finite numbers; got {text!r}")
    return values


def progress(total: int | None, desc: str, unit: str = "it", initial: int = 0):
    """A progress bar on stderr (hidden when stderr is not a terminal and LANDSCAPE_PROGRESS is unset, and
    on every rank but 0 under torchrun)."""
    import os

    from tqdm.auto import tqdm

    from landscape import distributed
    disable = not (sys.stderr.isatty() or os.environ.get("LANDSCAPE_PROGRESS")) or not distributed.is_main()
    return tqdm(total=total, desc=desc, unit=unit, initial=initial, file=sys.stderr, disable=disable,
                dynamic_ncols=True, leave=False)


def require_matches(entries: list, what: str, pattern: str | None) -> None:
    """Refuse an empty listing of ``what`` (e.g. ``"model"``) for the glob ``pattern`` in one line."""
    from landscape.errors import LandscapeError
    if not entries:
        raise LandscapeError(f"no {what} matches '{pattern}'; run `landscape {what}s` to see all names")


def echo_registry(entries: list, what: str, pattern: str | None, label: str) -> None:
    """Print registry entries (``name``, ``description``, ``defaults``) with their ``label`` line."""
    import json

    require_matches(entries, what, pattern)
    width = max(len(entry.name) for entry in entries)
    for entry in entries:
        values = ", ".join(f"{key}={json.dumps(value)}" for key, value in entry.defaults.items())
        click.echo(f"{entry.name:<{width}}  {entry.description}")
        click.echo(f"{'':<{width}}  {label}: {values or 'none'}")


def already_done(out: str, group: str, overwrite: bool, resume: bool, objective: Any, seed: int | None,
                 options: Mapping[str, Any]) -> bool:
    """True when ``--resume`` finds ``group`` complete in ``out``, computed from ``objective``'s checkpoint
    and evaluation set with ``seed`` and ``options`` (keys of the group's config); a mismatch is refused
    (see :func:`landscape.store.check_resume`), and so is recomputing over the group without ``--overwrite``.
    Under torchrun rank 0 reads ``out`` and every rank gets its answer (or its error)."""
    from landscape import distributed
    from landscape.store import provenance, resume_complete

    wanted = provenance(options, objective.provenance(), seed, objective.device)
    return distributed.on_main(lambda: resume_complete(out, group, wanted, resume=resume, overwrite=overwrite))
