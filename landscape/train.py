"""A small training loop that drives any registered optimizer (behind ``landscape train``).

One optimizer step per batch (``ceil(N / batch_size)`` steps per epoch). Methods that use two
batches per step (m-RWP, m-ARWP: ``optimizer.batches_per_step == 2``) draw both from the same
shuffled stream, so they see the data twice per epoch for the same number of steps, as the
reference code does. The closure passed to ``step`` takes a :class:`landscape.optimizers.Pass`.
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
from landscape.objective import resolve_device
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

    Example: ``train_model("digits", "cnn", "sam", epochs=5, out="runs/sam.pt")``.
    """
    if epochs < 1 or batch_size < 1:
        raise LandscapeError(f"epochs={epochs} and batch_size={batch_size} must both be >= 1")
    dataset = load_dataset(data) if isinstance(data, str) else data  # the split is fixed: analyses see the same one
    target = resolve_device(device)
    arch_kwargs = dict(arch_kwargs or {})
    torch.manual_seed(seed)
    if ":" in arch:
        model = build_model(arch, **arch_kwargs)
        saved_kwargs = arch_kwargs
    else:
        model = build_model(arch, dataset.num_classes, dataset.input_shape, **arch_kwargs)
        saved_kwargs = {**arch_kwargs, "num_classes": dataset.num_classes, "input_shape": list(dataset.input_shape)}
    model.to(target).train()

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

    bar = progress(total_steps, f"train {optimizer}", "step") if progress else None
    history, start = [], time.perf_counter()
    for epoch in range(epochs):
        epoch_loss = torch.zeros((), device=target)
        for _ in range(steps_per_epoch):
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

            epoch_loss += opt.step(closure).detach()
            if schedule is not None:
                schedule.step()
            if bar is not None:
                bar.update(1)
        history.append({"epoch": epoch + 1, "train_loss": float(epoch_loss) / steps_per_epoch})
        if bar is not None:
            bar.set_postfix(loss=f"{history[-1]['train_loss']:.4f}")
    seconds = time.perf_counter() - start
    if bar is not None:
        bar.close()

    train_loss, train_accuracy = evaluate(model, dataset.x_train, dataset.y_train)
    metrics = {"train_loss": train_loss, "train_accuracy": train_accuracy, "epochs": epochs,
               "steps": total_steps, "seconds": seconds}
    if dataset.x_test is not None and dataset.y_test is not None:
        metrics["test_loss"], metrics["test_accuracy"] = evaluate(model, dataset.x_test, dataset.y_test)
    model.eval()
    if out is not None:
        save_checkpoint(out, model, arch=arch, arch_kwargs=saved_kwargs, dataset=dataset.spec,
                        optimizer=list_optimizers(optimizer)[0].name, optimizer_hparams=record, metrics=metrics,
                        seed=seed, extra={"batch_size": batch_size, "cosine": cosine, "device": str(target),
                                          "history": history})
    return TrainResult(model, opt, metrics, record, history)
