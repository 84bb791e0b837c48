"""A training loop that drives any registered optimizer, in one process or data-parallel under torchrun.

One optimizer step per batch (``ceil(N / batch_size)`` steps per epoch). Methods that use two
batches per step (m-RWP, m-ARWP: ``optimizer.batches_per_step == 2``) draw both from the same
shuffled stream, so they see the data twice per epoch for the same number of steps, as the
reference code does. The closure passed to ``step`` takes a :class:`landscape.optimizers.Pass`.
After every step the loss and the weights are checked for NaN/inf (one host synchronisation, which
the pageable host-to-device batch copies make anyway), and the weights before the step are kept.

Data parallel (``torchrun --nproc-per-node W``, see :mod:`landscape.distributed`):

- ``batch_size`` is the global batch. Every rank draws the same batch order and takes its contiguous
  share of every batch (:func:`landscape.distributed.shard_range`). The model is wrapped in
  ``DistributedDataParallel``: a synchronised pass backpropagates its rows' mean loss times W x its
  share of the batch, so DDP's average is the mean over the global batch, and a run on W ranks takes
  the single-process steps to rounding (BatchNorm aside, below). A pass with ``Pass(sync=False)`` runs
  forward and backward inside ``no_sync()`` (DDP decides in the forward) with its rows' mean loss.
  Every batch must give every rank at least one example.
- BatchNorm normalises each rank's rows with their own batch statistics (as DDP does; Foret et al.'s
  SAM too). The running statistics are rank 0's, updated by its passes at w (``bn_stats="once"``;
  parallel m-RWP puts rank 0 at w), and broadcast to every rank before the evaluation, so every rank
  ends with the same buffers. A training forward never reads them, so DDP's broadcast of the buffers
  before every synchronised forward is off. SyncBatchNorm is not used: per-rank SAM and parallel m-RWP run ranks at different
  weights, whose batch statistics must not mix, and it costs an all-reduce per layer.
- Rank 0 shows progress and writes files; every rank holds the same weights and optimizer state. The
  optimizer's generator is seeded alike on every rank, so every rank draws the same noise (RWP on W
  ranks is single-process RWP on the global batch). torch's global generator (dropout) is per rank,
  seeded from (seed, rank) once the model is built.
- The evaluation is sharded over the ranks.

Training state: with ``out``, rank 0 writes ``<out>.state`` (:func:`state_path`) atomically at the end
of every epoch, readable with ``torch.load(weights_only=True)``: the model, the optimizer state (with
its generator), the LR scheduler, epoch and step, the batch-order generator, every rank's torch
generator, the history and the callbacks' states. ``resume=True`` continues that run (the same options
and data, else refused), also on another number of ranks: ranks beyond the saved ones get fresh
generators seeded from (seed, rank, step). A single-process run resumed in a single process is
bit-identical to an uninterrupted one. The file is removed when the run ends.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from landscape import distributed
from landscape.checkpoint import file_sha256, save_atomically, save_checkpoint, versions
from landscape.data import Dataset, load_dataset
from landscape.errors import LandscapeError
from landscape.models import build_model
from landscape.objective import batchnorm_mode, check_fits, count_nonfinite, model_name, resolve_device
from landscape.optimizers import Pass, PerturbedOptimizer, create, list_optimizers

STATE_FORMAT = "landscape-train-state/1"


@dataclass
class TrainResult:
    """What :func:`train_model` produced: the trained model (eval mode), its optimizer and metrics.

    ``metrics``: train/test accuracy (fraction) and mean cross-entropy, steps, seconds.
    ``history``: one dict per epoch with the mean training loss over its steps.
    ``tracking``: the sharpness measured during training (``track=``), a
    :class:`~landscape.tracking.TrainingResult`, or None.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    metrics: dict[str, Any]
    hparams: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)
    tracking: Any = None


class TrainCallback(Protocol):
    """Called by :func:`train_model` on every rank after each optimizer step that kept the weights finite.

    ``step``: optimizer steps done (1 after the first); ``epoch``: the current epoch (from 1); ``model``:
    the trained module (not its DDP wrapper); ``lr``: the learning rate of that step. ``state_dict()``
    (weights-only data: tensors, numbers, strings, lists, dicts) is saved in the training state at
    every epoch end and handed to ``load_state_dict`` when the run resumes. Under torchrun, write
    files on rank 0 only (``landscape.distributed.is_main()``).

    Optional: a callback with a ``begin(*, model, steps_per_epoch, total_steps, resumed)`` method gets that call
    on every rank once before the first step (after a resumed run's states are loaded; ``resumed`` says which),
    e.g. to record the initial weights (:class:`landscape.trajectory.TrajectoryWriter`).
    """

    def __call__(self, *, step: int, epoch: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                 lr: float) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class BatchOrder:
    """Endless global batches of example indices: a fresh permutation per pass over the data, last batch kept.

    The state is the generator's from before the current permutation and the batches taken from it.
    """

    def __init__(self, count: int, batch_size: int, seed: int):
        self.count, self.batch_size = count, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self._start = self.generator.get_state()
        self._batches: tuple[Tensor, ...] = ()
        self._taken = 0

    def __next__(self) -> Tensor:
        if self._taken == len(self._batches):
            self._start = self.generator.get_state()
            self._batches, self._taken = self._permutation(), 0
        self._taken += 1
        return self._batches[self._taken - 1]

    def _permutation(self) -> tuple[Tensor, ...]:
        return torch.randperm(self.count, generator=self.generator).split(self.batch_size)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self._start.clone(), "taken": self._taken}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self._start = self.generator.get_state()
        self._batches = self._permutation() if state["taken"] else ()
        self._taken = state["taken"]


class _StepClosure:
    """The closure of one optimizer step: each pass takes this rank's share of its global batch.

    ``share`` ends as the share of the pass whose loss ``step`` returns (the first at w, else the
    first), which weighs the loss when the ranks' losses are averaged.
    """

    def __init__(self, network: nn.Module, optimizer: torch.optim.Optimizer, inputs: Tensor, targets: Tensor,
                 batches: Sequence[Tensor], device: torch.device):
        self.network, self.optimizer, self.inputs, self.targets = network, optimizer, inputs, targets
        self.batches, self.device = batches, device
        self.share: float | None = None
        self._at_w = False

    def __call__(self, context: Pass | None = None) -> Tensor:
        context = Pass() if context is None else context
        rows = self.batches[context.batch if context.batch < len(self.batches) else 0]
        start, stop = distributed.shard_range(len(rows), *(context.shard or ()))
        context.share = (stop - start) / len(rows)
        if not self._at_w and (self.share is None or not context.perturbed):
            self.share, self._at_w = context.share, not context.perturbed
        rows = rows[start:stop]
        x, y = context.select(self.inputs[rows].to(self.device), self.targets[rows].to(self.device))
        self.optimizer.zero_grad(set_to_none=True)
        world = distributed.world_size()
        with contextlib.nullcontext() if world == 1 or context.sync else self.network.no_sync():
            loss = F.cross_entropy(self.network(x), y)
            (loss * (world * context.share) if world > 1 and context.sync else loss).backward()
        return loss


@torch.no_grad()
def evaluate(model: nn.Module, inputs: Tensor, targets: Tensor, batch_size: int = 1024) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``model`` in eval mode over a dataset; restores the mode.

    Under torchrun call it on every rank: each evaluates its contiguous share and the sums are all-reduced.
    """
    training, device = model.training, next(model.parameters()).device
    start, stop = distributed.shard_range(len(inputs))
    model.eval()
    loss, correct = torch.zeros((), device=device), torch.zeros((), device=device)
    for x, y in zip(inputs[start:stop].split(batch_size), targets[start:stop].split(batch_size)):
        x, y = x.to(device), y.to(device)
        logits = model(x)
        loss += F.cross_entropy(logits, y, reduction="sum")
        correct += (logits.argmax(dim=-1) == y).sum()
    model.train(training)
    if distributed.active():
        loss, correct = distributed.all_reduce_sum_(torch.stack([loss.double(), correct.double()]))
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
                device: str = "auto", out: str | None = None, resume: bool = False, overwrite: bool = False,
                callbacks: Sequence[TrainCallback] = (), track: Any = None,
                progress: Callable[..., Any] | None = None) -> TrainResult:
    """Train ``arch`` on ``data`` with the registered ``optimizer``; optionally write a checkpoint.

    ``lr``/``weight_decay``/``momentum`` override the optimizer's defaults (``None`` keeps them);
    ``opt_args`` are further hyper-parameters (e.g. ``{"rho": 0.1}``, ``{"base": "adamw"}``).
    ``batch_size`` is the global batch (shared out over the ranks under torchrun). The LR follows a
    per-step cosine decay to 0 when ``cosine``. ``seed`` fixes the model initialisation, the batch
    order and the optimizer's noise. ``progress(total, desc, unit)`` may return a tqdm-like bar
    (e.g. ``landscape.cli.common.progress``); ``callbacks`` see every step (:class:`TrainCallback`).
    ``track`` (a :class:`landscape.tracking.Tracking`, or metrics such as ``"lambda1,loss"``) measures the
    sharpness during training (:class:`landscape.tracking.SharpnessTracker`, a callback after the others)
    into ``/training`` of ``track.out`` (default: ``out`` with the suffix ``.h5``), returned as ``tracking``.

    With ``out``, the training state goes to ``<out>.state`` at every epoch end; ``resume=True``
    continues the interrupted run from it (refused if the options or the data differ), and a run that
    finds one without ``resume`` is refused unless ``overwrite`` (start over). Under torchrun call it
    on every rank (see the module docstring); rank 0 writes.

    Bad input is refused up front with a :class:`LandscapeError`: NaN/inf inputs, a single class,
    labels or inputs the model cannot take, NaN/inf hyper-parameters, a negative lr/weight_decay/momentum.
    A run whose loss or weights turn NaN/inf stops at that step: the weights from before it (the
    last finite ones) are written to ``out`` with ``extra["stopped_early"]`` (epoch, step, steps_done,
    loss, lr) in the metadata, then a LandscapeError names the step and the fix.

    Example: ``train_model("digits", "cnn", "sam", epochs=5, out="runs/sam.pt")``.
    """
    if epochs < 1 or batch_size < 1:
        raise LandscapeError(f"epochs={epochs} and batch_size={batch_size} must both be >= 1")
    if resume and overwrite:
        raise LandscapeError("--resume continues the interrupted run and --overwrite discards it; pass one of them")
    if resume and out is None:
        raise LandscapeError("resume needs out: the training state lives next to the checkpoint, in <out>.state")
    distributed.setup()
    dataset = load_dataset(data) if isinstance(data, str) else data  # the split is fixed: analyses see the same one
    _check_dataset(dataset)
    target = resolve_device(device)
    if target.type == "cuda" and distributed.active():
        target = distributed.local_device()
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
    _check_shares(len(dataset.x_train), batch_size, opt)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps) if cosine else None
    order = BatchOrder(len(dataset.x_train), batch_size, seed)
    name = list_optimizers(optimizer)[0].name
    path = state_path(out) if out is not None else None
    config = None if path is None and track is None else _run_config(dataset, arch, saved_kwargs, name, record,
                                                                     epochs, batch_size, cosine, seed)
    saved = _training_state(path, config, resume, overwrite)
    tracker = None
    if track is not None:
        from landscape.tracking import SharpnessTracker
        tracker = SharpnessTracker(track, dataset, steps_per_epoch=steps_per_epoch, total_steps=total_steps,
                                   batch_size=batch_size, seed=seed)
        _on_main(lambda: tracker.open(out, config, target, resume=resume, overwrite=overwrite))
        callbacks = [*callbacks, tracker]
    first_epoch, history, seconds_before = 0, [], 0.0
    if saved is None:
        _seed_rank_generator(seed, 0)
    else:
        first_epoch, history, seconds_before = saved["epoch"], list(saved["history"]), saved["seconds"]
        _restore(saved, model, opt, schedule, order, callbacks, seed)
    for callback in callbacks:
        if hasattr(callback, "begin"):
            callback.begin(model=model, steps_per_epoch=steps_per_epoch, total_steps=total_steps,
                           resumed=saved is not None)
    network = _data_parallel(model, target) if distributed.active() else model
    per_step = getattr(opt, "batches_per_step", 1)
    state = [*model.parameters(), *model.buffers()]
    floating = [t for t in state if t.is_floating_point()]
    last_finite = [t.detach().clone() for t in state]  # the weights before the current step

    bar = progress(total_steps, f"train {optimizer}", "step") if progress and distributed.is_main() else None
    if bar is not None and first_epoch:
        bar.update(first_epoch * steps_per_epoch)
    start, diverged = time.perf_counter(), None
    for epoch in range(first_epoch, epochs):
        epoch_loss = torch.zeros((), device=target)
        for step in range(steps_per_epoch):
            closure = _StepClosure(network, opt, dataset.x_train, dataset.y_train,
                                   [next(order) for _ in range(per_step)], target)
            rate = opt.param_groups[0]["lr"]
            loss, finite = _step_summary(opt.step(closure).detach(), closure.share, floating)
            if not finite:
                diverged = {"epoch": epoch + 1, "step": step + 1, "steps_done": epoch * steps_per_epoch + step,
                            "loss": float(loss), "lr": rate}
                with torch.no_grad():
                    torch._foreach_copy_(state, last_finite)
                break
            with torch.no_grad():
                torch._foreach_copy_(last_finite, state)
            epoch_loss += loss
            for callback in callbacks:
                callback(step=epoch * steps_per_epoch + step + 1, epoch=epoch + 1, model=model, optimizer=opt,
                         lr=rate)
            if schedule is not None:
                schedule.step()
            if bar is not None:
                bar.update(1)
        if diverged is not None:
            break
        history.append({"epoch": epoch + 1, "train_loss": float(epoch_loss) / steps_per_epoch})
        if bar is not None:
            bar.set_postfix(loss=f"{history[-1]['train_loss']:.4f}")
        if path is not None:
            _save_state(path, config, epoch + 1, steps_per_epoch, model, opt, schedule, order, history,
                        seconds_before + time.perf_counter() - start, callbacks)
    seconds = seconds_before + time.perf_counter() - start
    if bar is not None:
        bar.close()

    for buffer in model.buffers():  # rank 0's running statistics on every rank
        distributed.broadcast_(buffer)
    train_loss, train_accuracy = evaluate(model, dataset.x_train, dataset.y_train)
    metrics = {"train_loss": train_loss, "train_accuracy": train_accuracy, "epochs": epochs,
               "steps": total_steps if diverged is None else diverged["steps_done"], "seconds": seconds}
    if dataset.x_test is not None and dataset.y_test is not None:
        metrics["test_loss"], metrics["test_accuracy"] = evaluate(model, dataset.x_test, dataset.y_test)
    model.eval()
    extra = {"batch_size": batch_size, "cosine": cosine, "device": str(target), "history": history,
             "world_size": distributed.world_size()}
    if diverged is not None:
        extra["stopped_early"] = diverged
    tracking = None if tracker is None else _on_main(lambda: tracker.finish(complete=diverged is None))
    if out is not None:
        def finish() -> None:
            save_checkpoint(out, model, arch=arch, arch_kwargs=saved_kwargs, dataset=dataset.spec, optimizer=name,
                            optimizer_hparams=record, metrics=metrics, seed=seed, extra=extra)
            path.unlink(missing_ok=True)  # the run is over: its checkpoint replaces the training state
        _on_main(finish)
    if diverged is not None:
        raise LandscapeError(_divergence_message(diverged, steps_per_epoch, out))
    return TrainResult(model, opt, metrics, record, history, tracking)


def _data_parallel(model: nn.Module, device: torch.device) -> DistributedDataParallel:
    """``model`` under DDP without its buffer broadcast before synchronised forwards (one collective less a step:
    training forwards never read the running statistics; rank 0's reach every rank at the end)."""
    parameters = inspect.signature(DistributedDataParallel.__init__).parameters
    buffers = {"forward_sync_buffers": False} if "forward_sync_buffers" in parameters else {"broadcast_buffers": False}
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None, **buffers)


def _step_summary(loss: Tensor, share: float | None, tensors: list[Tensor]) -> tuple[Tensor, bool]:
    """(the step's loss over the global batch, whether it and the floating ``tensors`` after it are all finite).

    One host synchronisation; under torchrun one all-reduce of (loss x share, share, non-finite flag), so
    every rank takes the same decision.
    """
    largest = torch._foreach_norm(tensors, math.inf) if tensors else []  # max |entry|: NaN if any entry is NaN
    finite = torch.isfinite(torch.stack([loss.float().reshape(()), *(m.float() for m in largest)])).all()
    if not distributed.active():
        return loss, bool(finite)
    share = 1.0 / distributed.world_size() if share is None else share
    summary = torch.stack([loss.double() * share, loss.new_tensor(share, dtype=torch.float64),
                           (~finite).double()])
    summary = distributed.all_reduce_sum_(summary)
    return (summary[0] / summary[1]).to(loss.dtype), bool(summary[2] == 0)


def _check_shares(count: int, batch_size: int, optimizer: torch.optim.Optimizer) -> None:
    """Refuse a batch size whose smallest batch leaves a rank without examples under torchrun."""
    ranks = distributed.world_size() // (2 if getattr(optimizer, "parallel", False) else 1)
    smallest = min(batch_size, count % batch_size or batch_size)
    if smallest < ranks:
        raise LandscapeError(f"--batch-size {batch_size} makes a batch of {smallest} example(s) (of {count}), fewer "
                             f"than the {ranks} ranks that share each batch; choose a batch size whose every batch "
                             "gives each rank an example (--batch-size is the global batch)")


# ---------------------------------------------------------------------------------------------- training state

def state_path(out: str | Path) -> Path:
    """Where the training state of the run writing the checkpoint ``out`` lives: ``<out>.state``."""
    return Path(f"{out}.state")


def _run_config(dataset: Dataset, arch: str, arch_kwargs: dict[str, Any], optimizer: str, hparams: dict[str, Any],
                epochs: int, batch_size: int, cosine: bool, seed: int) -> dict[str, Any]:
    """What defines a run, as JSON data: a resume must present the same."""
    digest = hashlib.sha256()
    for tensor in (dataset.x_train, dataset.y_train):
        digest.update(np.ascontiguousarray(tensor.cpu().numpy()).data)
    config = {"data": dataset.spec, "data_sha256": digest.hexdigest(), "arch": arch, "arch_kwargs": arch_kwargs,
              "optimizer": optimizer, "optimizer_hparams": hparams, "epochs": epochs, "batch_size": batch_size,
              "cosine": cosine, "seed": seed}
    return json.loads(json.dumps(config, sort_keys=True, default=str))


def _training_state(path: Path | None, config: dict[str, Any] | None, resume: bool,
                    overwrite: bool) -> dict[str, Any] | None:
    """The interrupted run's state to continue, or None to start afresh; rank 0 reads, every rank gets it."""
    return None if path is None else _on_main(lambda: _read_state(path, config, resume, overwrite))


def _read_state(path: Path, config: dict[str, Any], resume: bool, overwrite: bool) -> dict[str, Any] | None:
    if not path.exists():
        return None
    if not resume:
        if not overwrite:
            raise LandscapeError(f"an interrupted run left {path}; pass --resume to continue it or --overwrite "
                                 "to start over")
        path.unlink()
        return None
    try:
        file_sha256(path)  # checks the zip entries' CRCs
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any failure means a damaged or foreign file
        raise LandscapeError(f"cannot read the training state {path} ({type(error).__name__}): it is damaged; "
                             "pass --overwrite to start over") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise LandscapeError(f"{path} is not a training state of this version ({STATE_FORMAT}); "
                             "pass --overwrite to start over")
    stored = json.loads(state["config"])
    changed = sorted(key for key in set(stored) | set(config) if stored.get(key) != config.get(key))
    if "optimizer_hparams" in changed:
        old, new = stored.get("optimizer_hparams", {}), config["optimizer_hparams"]
        changed.remove("optimizer_hparams")
        changed += sorted(key for key in set(old) | set(new) if old.get(key) != new.get(key))
    if changed:
        names = ", ".join("the data" if key == "data_sha256" else key for key in changed)
        raise LandscapeError(f"cannot resume {path}: this run differs from the interrupted one ({names}); rerun "
                             "with the same options and data, or pass --overwrite to start over")
    return state


def _rng_state(device: torch.device) -> dict[str, Tensor | None]:
    """This rank's torch generator state (CPU, and the CUDA device's when training there)."""
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def _seed_rank_generator(seed: int, step: int) -> None:
    """Under torchrun, seed torch's global generator of this rank from (seed, rank, step): per-rank dropout."""
    if distributed.active():
        words = np.random.SeedSequence([seed, distributed.rank(), step]).generate_state(2, np.uint32)
        torch.manual_seed(int(words[0]) << 32 | int(words[1]))


def _save_state(path: Path, config: dict[str, Any], epoch: int, steps_per_epoch: int, model: nn.Module,
                optimizer: torch.optim.Optimizer, schedule: Any, order: BatchOrder, history: list[dict[str, float]],
                seconds: float, callbacks: Sequence[TrainCallback]) -> None:
    """Write the training state at the end of ``epoch`` (rank 0; every rank hands in its generator)."""
    generators = distributed.all_gather_object(_rng_state(next(model.parameters()).device))
    _on_main(lambda: save_atomically({
        "format": STATE_FORMAT, "config": json.dumps(config, sort_keys=True), "epoch": epoch,
        "step": epoch * steps_per_epoch, "world_size": distributed.world_size(),
        "model": {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()},
        "optimizer": optimizer.state_dict(), "scheduler": None if schedule is None else schedule.state_dict(),
        "batch_order": order.state_dict(), "generators": generators, "history": history, "seconds": seconds,
        "callbacks": [callback.state_dict() for callback in callbacks],
        "versions": {key: str(value) for key, value in versions().items()}}, path))


def _on_main(work: Callable[[], Any]) -> Any:
    """``work()`` run on rank 0 only, its result handed to every rank; under torchrun a failure there (bad
    input, I/O) raises the same one-line LandscapeError on every rank."""
    if not distributed.active():
        return work()
    outcome: tuple[bool, Any] = (True, None)
    if distributed.is_main():
        try:
            outcome = (True, work())
        except (LandscapeError, OSError, ValueError) as error:
            outcome = (False, str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__)
    done, value = distributed.broadcast_object(outcome)
    if not done:
        raise LandscapeError(value)
    return value


def _restore(saved: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer, schedule: Any,
             order: BatchOrder, callbacks: Sequence[TrainCallback], seed: int) -> None:
    """Load a training state into the run's objects; this rank's generator is its saved one, or a fresh one."""
    if len(saved["callbacks"]) != len(callbacks):
        raise LandscapeError(f"the interrupted run had {len(saved['callbacks'])} callback(s), this one "
                             f"{len(callbacks)}; resume with the same callbacks")
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    if schedule is not None:
        schedule.load_state_dict(saved["scheduler"])
    order.load_state_dict(saved["batch_order"])
    for callback, state in zip(callbacks, saved["callbacks"]):
        callback.load_state_dict(state)
    generators, rank = saved["generators"], distributed.rank()
    if rank >= len(generators):
        _seed_rank_generator(seed, saved["step"])
        return
    torch.set_rng_state(generators[rank]["cpu"])
    device = next(model.parameters()).device
    if device.type == "cuda" and generators[rank]["cuda"] is not None:
        torch.cuda.set_rng_state(generators[rank]["cuda"], device)


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
