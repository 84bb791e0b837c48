"""``landscape train`` and ``landscape optimizers``: train with any registered optimizer."""

from __future__ import annotations

import ast
import re
from typing import Any

import click
from click.core import ParameterSource
from landscape.cli.common import device_option, echo_registry, out_option, parse_json_object, progress, seed_option

_ASSIGNMENT = re.compile(r"^([A-Za-z_]\w*)=(.*)$")


def parse_opt_args(values: tuple[str, ...]) -> dict[str, Any]:
    """``("rho=0.1", "p=3 adaptive=true")`` -> ``{"rho": 0.1, "p": 3, "adaptive": True}``.

    Items are separated by spaces or commas; values are Python/JSON literals (numbers,
    true/false, none) or else plain strings (``base=adamw``).
    """
    parsed: dict[str, Any] = {}
    for item in (part for value in values for part in re.split(r"[\s,]+", value.strip()) if part):
        match = _ASSIGNMENT.match(item)
        if match is None:
            raise click.UsageError(f"--opt-args expects key=value items, e.g. rho=0.1; got {item!r}")
        key, text = match.groups()
        literal = {"true": True, "false": False, "none": None, "null": None}.get(text.lower(), text)
        if literal is text:
            try:
                literal = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                literal = text
        parsed[key] = literal
    return parsed


@click.command()
@click.option("--data", default="digits", show_default=True, metavar="SPEC",
              help="Dataset spec: digits, cifar10:PATH, cifar100:PATH, npz:PATH, imagefolder:PATH[,options] or "
                   "module:function (see `landscape datasets`).")
@click.option("--arch", default="cnn", show_default=True, metavar="NAME|module:function",
              help="Architecture (see `landscape models`).")
@click.option("--arch-kwargs", default=None, callback=parse_json_object, metavar="JSON",
              help="Keyword arguments for --arch, as a JSON object, e.g. '{\"width\": 32}'.")
@click.option("--optimizer", default="sgd", show_default=True, metavar="NAME",
              help="Registered optimizer (see `landscape optimizers`).")
@click.option("--opt-args", multiple=True, metavar="K=V ...",
              help="Optimizer hyper-parameters, e.g. --opt-args 'rho=0.1 base=adamw' (repeatable).")
@click.option("--lr", type=float, default=None, help="Learning rate [default: the optimizer's].")
@click.option("--weight-decay", type=float, default=None, help="Weight decay [default: the optimizer's].")
@click.option("--momentum", type=float, default=None, help="SGD momentum [default: the optimizer's].")
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True,
              help="Examples per step, over all ranks under torchrun (each rank takes its share).")
@click.option("--epochs", type=click.IntRange(min=1), default=5, show_default=True,
              help="Epochs of ceil(N / batch-size) steps.")
@click.option("--cosine/--no-cosine", default=True, show_default=True, help="Cosine LR decay to 0 over training.")
@seed_option
@device_option
@out_option("model.pt", "Checkpoint to write.")
@click.option("--resume", is_flag=True, default=False,
              help="Continue the interrupted run whose training state is OUT.state (same options and data).")
@click.option("--overwrite", is_flag=True, default=False, help="Discard an interrupted run's OUT.state and start over.")
@click.option("--save-every", default=None, metavar="K|Ksteps",
              help="Record the weights along the run: at the start, every K epochs (1, 2epochs) or K optimizer "
                   "steps (50steps), and at the end, into --trajectory (for `landscape trajectory`).")
@click.option("--trajectory", "trajectory_path", default=None, type=click.Path(dir_okay=False),
              help="Trajectory file of --save-every [default: OUT without its suffix + _trajectory.h5].")
@click.option("--track", default=None, metavar="METRICS",
              help="Measure during training, on a fixed subset of the training split: any of lambda1 (top "
                   "Hessian eigenvalues, warm-started Lanczos), trace (Hutch++), loss; comma-separated.")
@click.option("--track-every", default="200", show_default=True, metavar="N|Ne",
              help="Measure every N optimizer steps, or every N epochs with Ne (e.g. 2e).")
@click.option("--track-subset", type=click.IntRange(min=0), default=128, show_default=True,
              help="Training examples the measurements use (seeded by --seed; 0: all).")
@click.option("--track-top-k", type=click.IntRange(min=1), default=1, show_default=True,
              help="Eigenvalues λ1..λk measured with lambda1.")
@click.option("--track-tol", type=float, default=0.01, show_default=True,
              help="Lanczos tolerance: relative residual ||Hv - λv|| <= tol λ.")
@click.option("--track-trace-hvps", type=click.IntRange(min=6), default=30, show_default=True,
              help="Hessian-vector products per Hutch++ trace.")
@click.option("--track-bn", type=click.Choice(["train", "eval"]), default="train", show_default=True,
              help="BatchNorm of the measurements: batch statistics per training-sized batch (the loss SGD "
                   "descends) or running statistics.")
@click.option("--track-out", default=None, type=click.Path(dir_okay=False),
              help="Results file of the /training group [default: OUT with the suffix .h5].")
def train(data: str, arch: str, arch_kwargs: dict | None, optimizer: str, opt_args: tuple[str, ...],
          lr: float | None, weight_decay: float | None, momentum: float | None, batch_size: int, epochs: int,
          cosine: bool, seed: int, device: str, out: str, resume: bool, overwrite: bool, save_every: str | None,
          trajectory_path: str | None, track: str | None, **tracking: Any) -> None:
    """Train a model with any registered optimizer and write a checkpoint.

    Prints the final train and test accuracy. m-RWP/m-ARWP use two batches per step.
    If the loss or the weights turn NaN/inf, training stops at that step, writes the weights from
    before it to --out (marked stopped_early in its metadata) and exits with code 2.
    The training state goes to OUT.state at every epoch end; --resume continues from it (also on
    another number of ranks); it is removed when the run ends.

    --save-every K records the weights (float32, one row per snapshot) at step 0, every K epochs
    (or K steps with Ksteps) and at the last step into one HDF5 file, written crash-safely and
    resumed with the run; `landscape trajectory` draws the paths on their PCA plane.

    With --track, the sharpness is measured every --track-every steps on --track-subset training
    examples and written, measurement by measurement, to /training of --track-out (crash-safe; it
    resumes with --resume); `landscape plot` draws λ1 against 2(1+β)/η, the stability threshold of
    SGD with momentum β at the learning rate of each step (Cohen et al.).

    Under torchrun the model trains data-parallel (DistributedDataParallel): --batch-size is the
    global batch, each rank takes its contiguous share, rank 0 prints and writes. SAM-family
    methods perturb each rank by its own gradient (--opt-args ascent_scope=rank, the default;
    global or group:K otherwise); m-RWP/m-ARWP take --opt-args parallel=true to run their two
    gradients on two halves of an even number of ranks.

    \b
    Examples:
      landscape train --data digits --arch cnn --optimizer sgd --epochs 5 --out runs/sgd.pt
      landscape train --optimizer sam --opt-args 'rho=0.1 base=adamw' --lr 3e-3 --out runs/sam.pt
      torchrun --standalone --nproc-per-node 2 -m landscape train --optimizer mrwp --opt-args parallel=true
      torchrun --standalone --nproc-per-node 4 -m landscape train --optimizer sam --out runs/sam.pt --resume
      landscape train --optimizer sam --save-every 1 --out runs/sam.pt     # + runs/sam_trajectory.h5
      landscape train --epochs 30 --track lambda1,loss --track-every 10 --out runs/sgd.pt   # -> runs/sgd.h5
    Python: landscape.train_model("digits", "cnn", "sam", epochs=5, opt_args={"rho": 0.1}, out="runs/sam.pt")
            landscape.train_model("digits", "cnn", "sgd", epochs=30, track=landscape.Tracking("lambda1", every=10),
                                  out="runs/sgd.pt").tracking.plot("runs/sgd_training.png")
    """
    from landscape.tracking import Tracking
    from landscape.train import train_model
    from landscape.trajectory import TrajectoryWriter, default_path

    if trajectory_path is not None and save_every is None:
        raise click.UsageError("--trajectory names the file of --save-every; pass --save-every K too")
    given = [f"--{name.replace('_', '-')}" for name in tracking
             if click.get_current_context().get_parameter_source(name) is ParameterSource.COMMANDLINE]
    if track is None and given:
        raise click.UsageError(f"{given[0]} sets how to track; add --track METRICS (e.g. --track lambda1)")
    options = {name.removeprefix("track_"): value for name, value in tracking.items()}
    options["subset"] = options["subset"] or None
    callbacks = [] if save_every is None else [
        TrajectoryWriter(trajectory_path or default_path(out), save_every, label=optimizer, checkpoint=out,
                         resume=resume, overwrite=overwrite)]
    result = train_model(data, arch, optimizer, epochs=epochs, batch_size=batch_size, lr=lr,
                         weight_decay=weight_decay, momentum=momentum, opt_args=parse_opt_args(opt_args),
                         arch_kwargs=arch_kwargs, cosine=cosine, seed=seed, device=device, out=out,
                         resume=resume, overwrite=overwrite, callbacks=callbacks, progress=progress,
                         track=None if track is None else Tracking(track, **options))
    metrics = result.metrics
    test = f"{metrics['test_accuracy']:.4f}" if "test_accuracy" in metrics else "n/a (no test split)"
    click.echo(f"train accuracy {metrics['train_accuracy']:.4f}  test accuracy {test}  "
               f"({metrics['steps']} steps, {metrics['seconds']:.1f} s) -> {out}")
    for writer in callbacks:
        click.echo(f"trajectory: {writer.rows} snapshots (every {writer.schedule}) -> {writer.path}")
    if result.tracking is not None:
        click.echo(result.tracking.summary())
        click.echo(f"saved /training in {Tracking(track, **options).results_file(out)}")


@click.command()
@click.argument("pattern", required=False)
def optimizers(pattern: str | None) -> None:
    """List the registered optimizers with their default hyper-parameters, optionally filtered by a glob.

    Override any default with --opt-args KEY=VALUE (or --lr/--weight-decay/--momentum).
    Perturbation methods also take base=sgd|adamw (the base optimizer that applies the update).
    Defaults follow the papers; a description names the authors' code's choice where it differs
    (e.g. the authors' m-RWP script: --opt-args sigma_schedule=constant).
    Under torchrun: ascent_scope (SAM family) says whose gradient each rank ascends by: rank (its
    own share's, m-sharpness with m = the per-rank batch; default), global (the whole batch's) or
    group:K (its group of K ranks'); parallel=true (m-RWP, m-ARWP) runs the clean and the perturbed
    gradient on two halves of an even number of ranks, one gradient of wall time per step.

    \b
    Examples:
      landscape optimizers
      landscape optimizers '*rwp'
    Python: landscape.list_optimizers("*rwp")
    """
    from landscape.optimizers import list_optimizers

    echo_registry(list_optimizers(pattern), "optimizer", pattern, "defaults")
