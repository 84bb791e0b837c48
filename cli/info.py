"""``landscape info``, ``landscape models`` and ``landscape datasets``: look before you compute."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from landscape.cli.common import echo_registry, require_matches, trust_option

from landscape.errors import LandscapeError

CHECKPOINT_FIELDS = ("format", "arch", "arch_kwargs", "dataset", "optimizer", "optimizer_hparams", "metrics",
                     "seed", "versions", "extra")
BATCHNORM_STATISTICS = ("running_mean", "running_var")


def checkpoint_summary(path: str, trust: bool = False) -> dict[str, Any]:
    """Metadata of a checkpoint plus its parameter count and SHA-256; builds and imports nothing.

    ``parameters`` counts the elements of the floating-point tensors in the state_dict other than
    BatchNorm running statistics (so it equals the model's parameter count for the built-in models).
    """
    from landscape.checkpoint import read_checkpoint

    checkpoint = read_checkpoint(path, trust=trust)
    summary = {"file": path, "sha256": checkpoint.sha256}
    summary.update({key: checkpoint.meta[key] for key in CHECKPOINT_FIELDS if checkpoint.meta.get(key) is not None})
    summary["parameters"] = sum(tensor.numel() for name, tensor in checkpoint.state.items()
                                if tensor.is_floating_point() and not name.endswith(BATCHNORM_STATISTICS))
    return summary


def results_summary(path: str) -> dict[str, Any]:
    """Groups of a results file: their attributes and dataset shapes and dtypes."""
    import numpy as np

    from landscape.store import list_groups, read_group

    def shapes(arrays: dict) -> dict:
        return {name: shapes(value) if isinstance(value, dict) else
                f"{np.shape(value)} {np.asarray(value).dtype}" for name, value in arrays.items()}

    return {"file": path, "groups": {group: {"attrs": attrs, "datasets": shapes(read_group(path, group)[0])}
                                     for group, attrs in list_groups(path).items()}}


def _text(value: Any) -> str:
    """One-line rendering of a metadata value (JSON for containers)."""
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, default=str)
    return str(value)


def _echo_fields(fields: dict, indent: str = "") -> None:
    width = max(map(len, fields), default=0)
    for key, value in fields.items():
        if isinstance(value, dict) and key == "datasets":
            click.echo(f"{indent}{key}:")
            _echo_fields(value, indent + "  ")
        else:
            click.echo(f"{indent}{key:<{width}}  {_text(value)}")


@click.command()
@click.argument("file", type=click.Path(dir_okay=False))
@trust_option
@click.option("--json", "as_json", is_flag=True, default=False, help="Print machine-readable JSON.")
def info(file: str, trust: bool, as_json: bool) -> None:
    """Show a checkpoint's metadata, or the groups of a results file (.h5).

    For a checkpoint: format, architecture and kwargs, dataset, optimizer and hyper-parameters,
    metrics, seed, versions, parameter count and SHA-256 (foreign weights: format, parameter
    count and SHA-256). Nothing is built or imported: the metadata is only shown.
    For a results file: each group's attributes and dataset shapes.

    \b
    Examples:
      landscape info runs/sgd.pt
      landscape info resnet.safetensors
      landscape info runs/sgd.h5
    Python: landscape.checkpoint.read_checkpoint("runs/sgd.pt").meta ; landscape.store.list_groups("runs/sgd.h5")
    """
    import h5py

    if not Path(file).is_file():
        raise LandscapeError(f"'{file}' not found; check the path")
    if h5py.is_hdf5(file) or Path(file).suffix in (".h5", ".hdf5"):  # a corrupt .h5 gets the store's message
        summary = results_summary(file)
    else:
        summary = checkpoint_summary(file, trust=trust)
    if as_json:
        click.echo(json.dumps(summary, indent=2, default=str))
    elif "groups" in summary:
        click.echo(f"file  {file}")
        for group, content in summary["groups"].items():
            click.echo(f"/{group}")
            _echo_fields({**content["attrs"], "datasets": content["datasets"]}, "  ")
    else:
        _echo_fields(summary)


@click.command()
@click.argument("pattern", required=False)
def models(pattern: str | None) -> None:
    """List the built-in architectures and their options, optionally filtered by a glob.

    Pass options to a model with --arch-kwargs (JSON), e.g. '{"depth": 28, "width": 10, "bn": false}'.

    \b
    Examples:
      landscape models
      landscape models 'res*'
    Python: landscape.list_models("res*")
    """
    from landscape.models import list_models

    echo_registry(list_models(pattern), "model", pattern, "options")


@click.command()
@click.argument("pattern", required=False)
def datasets(pattern: str | None) -> None:
    """List the accepted dataset specs (for --data), optionally the built-in kinds matching a glob.

    Options follow the path after commas: imagefolder:PATH,crop=32,size=36 (see the options line).

    \b
    Examples:
      landscape datasets
      landscape datasets 'cifar*'
      landscape train --data cifar10:~/data --arch resnet18 --out runs/r18.pt
      landscape hessian runs/r50.pt --arch mymod:resnet50 --data imagefolder:~/imagenet/val,per_class=10
    Python: landscape.list_datasets("cifar*") ; landscape.load_dataset("digits")
    """
    from landscape.data import DATASETS, list_datasets

    forms = list_datasets(pattern)
    require_matches(forms, "dataset", pattern)
    options = {kind.form: kind.options for kind in DATASETS.list()}
    width = max(len(form) for form, _ in forms)
    for form, description in forms:
        click.echo(f"{form:<{width}}  {description}")
        if options.get(form):
            click.echo(f"{'':<{width}}  options: {options[form]}")
