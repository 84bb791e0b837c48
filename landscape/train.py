"""A small training loop that drives any registered optimizer (behind ``landscape train``).

One optimizer step per batch (``ceil(N / batch_size)`` steps per epoch). Methods that use two
batches per step (m-RWP, m-ARWP: ``optimizer.batches_per_step == 2``) draw both from the same
shuffled stream, so they see the data twice per epoch for the same number of steps, as the
reference code does. The closure passed to ``step`` takes a :class:`landscape.optimizers.Pass`.
After every step the loss and the weights are checked for NaN/inf (one host synchronisation, which
the pageable host-to-device batch copies make anyway), and the weights before the step are kept.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from landscape.checkpoint import save_checkpoint
from landscape.data import Dataset, load_dataset
from landscape.errors import LandscapeError
from landscape.models import build_model
from landscape.objective import batchnorm_mode, check_fits, count_nonfinite, model_name, resolve_device
from landscape.optimizers import Pass, PerturbedOptimizer, create, list_optimizers


@dataclass
class TrainResult:
    """What :func:`train_model` produced: the trained model (eval mode), its optimizer and metrics.

    ``metrics``: train/test accuracy (fraction) and mean cross-entropy, steps, seconds.
    ``history``: one dict per epoch with the mean training loss over its steps.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    metrics: dict[str, Any]
    hparams: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)


def _batches(count: int, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    """Endless index batches: a fresh permutation per pass over the data, last batch kept."""
    while True:
        order = torch.randperm(count, generator=generator)
        yield from order.split(batch_size)


@torch.no_grad()
def evaluate(model: nn.Module, inputs: Tensor, targets: Tensor, batch_size: int = 1024) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``model`` in eval mode over a dataset; restores the mode."""
    training, device = model.training, next(model.parameters()).device
    model.eval()
    loss, correct = torch.zeros((), device=device), torch.zeros((), device=device)
    for x, y in zip(inputs.split(batch_size), targets.split(batch_size)):
        x, y = x.to(device), y.to(device)
        logits = model(x)
        loss += F.cross_entropy(logits, y, reduction="sum")
        correct += (logits.argmax(dim=-1) == y).sum()
    model.train(training)
    return float(loss) / len(inputs), float(correct) / len(inputs)


def _optimizer_options(name: str, model: nn.Module, dataset: Dataset, total_steps: int, seed: int,
                       lr: float | None, weight_decay: float | None, momentum: float | None,
                       opt_args: dict[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(keyword arguments for ``create``, their JSON-able record for the checkpoint)."""
    matches = [] if any(char in name for char in "*?[") else list_optimizers(name)
    if len(matches) != 1:
        names = ", ".join(info.name for info in list_optimizers())
        raise LandscapeError(f"unknown optimizer '{name}'; use one of {names} (see `landscape optimizers`)")
    info = matches[0]
    hparams = {key: value for key, value in (("lr", lr), ("weight_decay", weight_decay), ("momentum", momentum))
               if value is not None}
    hparams.update(opt_args or {})
    for key, value in hparams.items():
        _check_hparam(key, value)
    wiring = {"model": model, "total_steps": total_steps, "seed": seed,
              "fisher_data": (dataset.x_train, dataset.y_train)}
    options = {**hparams, **{key: value for key, value in wiring.items()
                             if key not in hparams and info.accepts(key)}}
    record = {**info.defaults, **hparams}
    if issubclass(info.factory, PerturbedOptimizer):
        base = record.setdefault("base", "sgd")
        base_defaults = list_optimizers(base)[0].defaults if isinstance(base, str) and list_optimizers(base) else {}
        record = {**base_defaults, **record}
    elif "base" in hparams:
        raise LandscapeError(f"'{info.name}' is a plain torch optimizer and takes no base=; "
                             "use base= with a perturbation method such as sam")
    record.update({key: options[key] for key in ("total_steps", "seed") if key in options})
    return options, record


NON_NEGATIVE = ("lr", "weight_decay", "momentum")  # hyper-parameters with their own flags, all >= 0


def _check_hparam(key: str, value: Any) -> None:
    """Refuse NaN/inf hyper-parameters (also inside lists such as betas) and a negative lr, weight decay or momentum."""
    flag = f"--{key.replace('_', '-')}" if key in NON_NEGATIVE else f"--opt-args {key}"
    numbers = value if isinstance(value, (list, tuple)) else [value]
    if any(isinstance(number, float) and not math.isfinite(number) for number in numbers):
        raise LandscapeError(f"{flag} is {value}, not a finite number; give a finite value "
                             "(see `landscape optimizers` for the defaults)")
    if key in NON_NEGATIVE and isinstance(value, (int, float)) and value < 0:
        raise LandscapeError(f"{flag} must be >= 0, got {value}; see `landscape optimizers` for the defaults")


def train_model(data: str | Dataset = "digits", arch: str = "cnn", optimizer: str = "sgd", *, epochs: int = 5,
                batch_size: int = 128, lr: float | None = None, weight_decay: float | None = None,
                momentum: float | None = None, opt_args: dict[str, Any] | None = None,
                arch_kwargs: dict[str, Any] | None = None, cosine: bool = True, seed: int = 0,
                device: str = "auto", out: str | None = None,
                progress: Callable[..., Any] | None = None) -> TrainResult:
    """Train ``arch`` on ``data`` with the registered ``optimizer``; optionally write a checkpoint.

    ``lr``/``weight_decay``/``momentum`` override the optimizer's defaults (``None`` keeps them);
    ``opt_args`` are further hyper-parameters (e.g. ``{"rho": 0.1}``, ``{"base": "adamw"}``).
    The LR follows a per-step cosine decay to 0 when ``cosine``. ``seed`` fixes the model
    initialisation, the batch order and the optimizer's noise. ``progress(total, desc, unit)``
    may return a tqdm-like bar (e.g. ``landscape.cli.common.progress``).

    Bad input is refused up front with a :class:`LandscapeError`: NaN/inf inputs, a single class,
    labels or inputs the model cannot take, NaN/inf hyper-parameters, a negative lr/weight_decay/momentum.
    A run whose loss or weights turn NaN/inf stops at that step: the weights from before it (the
    last finite ones) are written to ``out`` with ``extra["stopped_early"]`` (epoch, step, steps_done,
    loss, lr) in the metadata, then a LandscapeError names the step and the fix.

    Example: ``train_model("digits", "cnn", "sam", epochs=5, out="runs/sam.pt")``.
    """
    if epochs < 1 or batch_size < 1:
        raise LandscapeError(f"epochs={epochs} and batch_size={batch_size} must both be >= 1")
    dataset = load_dataset(data) if isinstance(data, str) else data  # the split is fixed: analyses see the same one
    _check_dataset(dataset)
    target = resolve_device(device)
    arch_kwargs = dict(arch_kwargs or {})
    torch.manual_seed(seed)
    if ":" in arch:
        saved_kwargs = arch_kwargs
    else:  # the dataset gives the class count and input shape unless --arch-kwargs says otherwise
        saved_kwargs = {"num_classes": dataset.num_classes, "input_shape": list(dataset.input_shape), **arch_kwargs}
    model = build_model(arch, **saved_kwargs)
    model.to(target).train()
    _check_model(model, arch, saved_kwargs, dataset, target)

    steps_per_epoch = math.ceil(len(dataset.x_train) / batch_size)
    total_steps = epochs * steps_per_epoch
    options, record = _optimizer_options(optimizer, model, dataset, total_steps, seed, lr, weight_decay,
                                         momentum, opt_args)
    try:
        opt = create(optimizer, model.parameters(), **options)
    except (TypeError, ValueError) as error:
        raise LandscapeError(f"bad optimizer settings for '{optimizer}': {error}; "
                             "see `landscape optimizers` for the accepted hyper-parameters") from None
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps) if cosine else None
    stream = _batches(len(dataset.x_train), batch_size, torch.Generator().manual_seed(seed))
    per_step = getattr(opt, "batches_per_step", 1)
    state = [*model.parameters(), *model.buffers()]
    floating = [t for t in state if t.is_floating_point()]
    last_finite = [t.detach().clone() for t in state]  # the weights before the current step

    bar = progress(total_steps, f"train {optimizer}", "step") if progress else None
    history, start, diverged = [], time.perf_counter(), None
    for epoch in range(epochs):
        epoch_loss = torch.zeros((), device=target)
        for step in range(steps_per_epoch):
            batches = [next(stream) for _ in range(per_step)]

            def closure(context: Pass | None = None) -> Tensor:
                rows = batches[context.batch if context is not None and context.batch < len(batches) else 0]
                x, y = dataset.x_train[rows].to(target), dataset.y_train[rows].to(target)
                if context is not None:
                    x, y = context.select(x, y)
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                return loss

            rate = opt.param_groups[0]["lr"]
            loss = opt.step(closure).detach()
            if not _finite(loss, floating):
                diverged = {"epoch": epoch + 1, "step": step + 1, "steps_done": epoch * steps_per_epoch + step,
                            "loss": float(loss), "lr": rate}
                with torch.no_grad():
                    torch._foreach_copy_(state, last_finite)
                break
            with torch.no_grad():
                torch._foreach_copy_(last_finite, state)
            epoch_loss += loss
            if schedule is not None:
                schedule.step()
            if bar is not None:
                bar.update(1)
        if diverged is not None:
            break
        history.append({"epoch": epoch + 1, "train_loss": float(epoch_loss) / steps_per_epoch})
        if bar is not None:
            bar.set_postfix(loss=f"{history[-1]['train_loss']:.4f}")
    seconds = time.perf_counter() - start
    if bar is not None:
        bar.close()

    train_loss, train_accuracy = evaluate(model, dataset.x_train, dataset.y_train)
    metrics = {"train_loss": train_loss, "train_accuracy": train_accuracy, "epochs": epochs,
               "steps": total_steps if diverged is None else diverged["steps_done"], "seconds": seconds}
    if dataset.x_test is not None and dataset.y_test is not None:
        metrics["test_loss"], metrics["test_accuracy"] = evaluate(model, dataset.x_test, dataset.y_test)
    model.eval()
    extra = {"batch_size": batch_size, "cosine": cosine, "device": str(target), "history": history}
    if diverged is not None:
        extra["stopped_early"] = diverged
    if out is not None:
        save_checkpoint(out, model, arch=arch, arch_kwargs=saved_kwargs, dataset=dataset.spec,
                        optimizer=list_optimizers(optimizer)[0].name, optimizer_hparams=record, metrics=metrics,
                        seed=seed, extra=extra)
    if diverged is not None:
        raise LandscapeError(_divergence_message(diverged, steps_per_epoch, out))
    return TrainResult(model, opt, metrics, record, history)


def _finite(loss: Tensor, tensors: list[Tensor]) -> bool:
    """Whether a step's loss and the floating ``tensors`` (weights, buffers) after it are all finite (one sync)."""
    largest = torch._foreach_norm(tensors, math.inf) if tensors else []  # max |entry|: NaN if any entry is NaN
    return bool(torch.isfinite(torch.stack([loss.float().reshape(()), *(m.float() for m in largest)])).all())


def _divergence_message(diverged: dict[str, Any], steps_per_epoch: int, out: str | None) -> str:
    what = (f"the loss was {diverged['loss']:g}" if not math.isfinite(diverged["loss"])
            else "the weights became NaN/inf")
    kept = (f"wrote the weights from before that step to {out} (its metadata says stopped_early)" if out is not None
            else "nothing was written (no out given)")
    return (f"training diverged at epoch {diverged['epoch']}, step {diverged['step']} of {steps_per_epoch}: {what} "
            f"(lr {diverged['lr']:g}); {kept}; lower --lr (e.g. 10x) and train again")


def _check_dataset(dataset: Dataset) -> None:
    """Refuse training data that would train nothing or NaN: non-finite inputs, fewer than two classes."""
    for split in ("train", "test"):
        inputs = getattr(dataset, f"x_{split}")
        found = count_nonfinite({split: inputs}) if inputs is not None else None
        if found:
            raise LandscapeError(f"the {split} inputs of dataset '{dataset.spec}' hold {found[0]}; remove or "
                                 "replace them (one NaN input makes every weight NaN)")
    classes = torch.unique(dataset.y_train)
    if len(classes) < 2:
        raise LandscapeError(f"the train labels of dataset '{dataset.spec}' hold a single class "
                             f"({int(classes[0])}); a classifier needs examples of at least two classes")


def _check_model(model: nn.Module, arch: str, kwargs: dict[str, Any], dataset: Dataset, device: torch.device) -> None:
    """Refuse a model (``--arch``/``--arch-kwargs``) that cannot take the dataset's inputs or labels."""
    name = model_name(arch, kwargs.get("input_shape"))
    fix = ("pass --arch-kwargs for a model that takes this dataset (its input_shape "
           f"{tuple(dataset.input_shape)} and at least {dataset.num_classes} classes), or use other --data")

    def forward(x: Tensor) -> Tensor:
        with batchnorm_mode(model, "eval"):
            return model(x.to(device))

    for split in ("train", "test"):
        inputs, labels = getattr(dataset, f"x_{split}"), getattr(dataset, f"y_{split}")
        if inputs is not None and labels is not None:
            check_fits(forward, inputs, labels, name, f"dataset '{dataset.spec}' ({split} split)", fix)
