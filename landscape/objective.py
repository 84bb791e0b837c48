"""Objective: a model, a loss and a fixed evaluation set, evaluated functionally.

Every analysis goes through an :class:`Objective`. It holds its own copy of the weights
(``params``) and buffers, evaluates ``torch.func.functional_call`` over the evaluation set in
fixed batches (:class:`landscape.evalset.EvalSet`: on the device, or streamed from host memory),
and never changes the model: parameters, buffers and train/eval flags are exactly as before after
any call.

Under torchrun (several ranks) an objective is data parallel: each rank holds a contiguous share of
the evaluation set, its batches weigh rows / N over the whole set's N examples, and the loss, the
accuracy and the gradient are summed over the ranks here, so every rank gets the whole set's exact
mean (up to the order of the sums). Curvature products are summed in one place too, the base
curvature operator. :meth:`Objective.whole` is the same objective over the whole set on every rank,
for analyses that share out points or mini-batches instead.

Per-example gradients are computed here, in one place (:func:`per_example_gradients`), for the
empirical-Fisher operator and for SSAM-F's Fisher diagonal (:func:`empirical_fisher`).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from landscape import distributed
from landscape.errors import LandscapeError
from landscape.evalset import EvalSet
from landscape.params import select

BN_MODES = ("eval", "train")
_BATCHNORM = nn.modules.batchnorm._BatchNorm


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """``auto`` picks this rank's GPU when CUDA is available (``cuda:LOCAL_RANK`` under torchrun, else
    ``cuda:0``), else the CPU; ``cuda`` is this rank's GPU too; ``cuda`` without a GPU is an input error."""
    if isinstance(name, torch.device):
        return name
    if name in (None, "auto"):
        return distributed.local_device()
    if str(name).startswith("cuda") and not torch.cuda.is_available():
        raise LandscapeError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto")
    if name == "cuda":
        return distributed.local_device()
    try:
        return torch.device(name)
    except RuntimeError:
        raise LandscapeError(f"unknown device {name!r}; use auto, cpu or cuda") from None


@contextlib.contextmanager
def batchnorm_mode(model: nn.Module, mode: str) -> Iterator[None]:
    """Temporarily set how the model normalises; everything is restored on exit.

    - ``eval``: every module in eval mode; BatchNorm uses its running statistics.
    - ``train``: every module in eval mode (no dropout) except BatchNorm, which uses the
      statistics of the current batch without touching its running buffers.
    - ``frozen``: module modes are kept; BatchNorm layers that are training use batch
      statistics but do not update ``running_mean``/``running_var``/``num_batches_tracked``.
      This is what the optimizers use on their perturbed passes.
    """
    if mode not in ("eval", "train", "frozen"):
        raise LandscapeError(f"unknown BatchNorm mode {mode!r}; use eval or train")
    saved = [(m, m.training, getattr(m, "track_running_stats", None)) for m in model.modules()]
    try:
        if mode != "frozen":
            model.eval()
        if mode != "eval":
            for module in model.modules():
                if isinstance(module, _BATCHNORM) and (mode == "train" or module.training):
                    module.training = True
                    module.track_running_stats = False
        yield
    finally:
        for module, training, tracking in saved:
            module.training = training
            if tracking is not None:
                module.track_running_stats = tracking


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, _BATCHNORM) for m in model.modules())


def accuracy_count(outputs: Tensor, targets: Tensor) -> Tensor:
    """Number of correct argmax predictions (0-d tensor)."""
    return (outputs.argmax(dim=-1) == targets).sum()


IGNORE_INDEX = -100  # cross-entropy's ignored target


def count_nonfinite(tensors: Mapping[str, Tensor]) -> tuple[str, str] | None:
    """``("12 NaN and 1 inf values", name of the first tensor holding one)`` over the floating
    ``tensors``; None when every value is finite."""
    nan = inf = 0
    first = ""
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            continue
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            count = int(torch.isnan(tensor).sum())
            nan, inf, first = nan + count, inf + bad - count, first or name
    return (nonfinite_words(nan, inf), first) if first else None


def nonfinite_words(nan: int, inf: int) -> str:
    """``"12 NaN and 1 inf values"``."""
    counts = " and ".join(f"{count} {kind}" for count, kind in ((nan, "NaN"), (inf, "inf")) if count)
    return f"{counts} value{'s' if nan + inf > 1 else ''}"


def model_name(arch: str | None, input_shape: Sequence[int] | None) -> str:
    """``"the model (arch cnn, input_shape (1, 8, 8))"``, with what is known, for error messages."""
    details = ([f"arch {arch}"] if arch else []) + ([f"input_shape {tuple(input_shape)}"] if input_shape else [])
    return f"the model ({', '.join(details)})" if details else "the model"


def check_fits(forward: Callable[[Tensor], Any], inputs: Tensor, targets: Tensor | None, model: str, data: str,
               fix: str) -> None:
    """Refuse a dataset that the model cannot take, before any analysis or training runs.

    ``forward`` (the model in eval mode) must run on two examples of ``inputs`` (no grad); class
    indices ``targets`` (None: not class indices) must lie in 0..C-1 for the C outputs it gives.
    ``model`` and ``data`` name the two in the one-line error, ``fix`` says what to do.
    """
    try:
        with torch.no_grad():
            outputs = forward(inputs[:2])
    except Exception as error:  # noqa: BLE001 - whatever fails here, the model cannot take these inputs
        detail = (str(error).strip().splitlines() or [""])[0]
        raise LandscapeError(f"{model} cannot take inputs of shape {tuple(inputs.shape[1:])} from {data} "
                             f"({type(error).__name__}: {detail}); {fix}") from None
    if targets is None or targets.is_floating_point() or not isinstance(outputs, Tensor) or outputs.ndim < 2:
        return
    labels = targets[targets != IGNORE_INDEX]
    classes = outputs.shape[1]
    if labels.numel() and (int(labels.max()) >= classes or int(labels.min()) < 0):
        raise LandscapeError(f"labels of {data} go from {int(labels.min())} to {int(labels.max())} but {model} has "
                             f"{classes} outputs (classes 0..{classes - 1}); {fix}")


def per_example_gradients(loss: Callable[[Mapping[str, Tensor], Tensor, Tensor], Tensor],
                          params: Mapping[str, Tensor], inputs: Tensor, targets: Tensor,
                          chunk: int) -> Iterator[dict[str, Tensor]]:
    """The gradient in ``params`` of ``loss(params, x_i[None], y_i[None])`` for every example ``i``, by
    ``torch.func.vmap`` over ``grad``: ``{name: (rows, *shape)}`` for each run of ``chunk`` examples, in order.

    ``loss`` sees each example as a batch of one, so a BatchNorm in it must use running statistics.
    """
    def example_loss(p: Mapping[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return loss(p, x.unsqueeze(0), y.unsqueeze(0))

    gradients = vmap(grad(example_loss), in_dims=(None, 0, 0), randomness="different")
    for x, y in zip(inputs.split(chunk), targets.split(chunk)):
        yield gradients(params, x, y)


def empirical_fisher(model: nn.Module, params: Mapping[str, Tensor], inputs: Tensor, targets: Tensor,
                     chunk_size: int = 64) -> dict[str, Tensor]:
    """Diagonal empirical Fisher (1/N) sum_i (d/dw log p_w(y_i | x_i))^2 over N examples, whose entries
    SSAM-F ranks (:func:`landscape.optimizers.fisher_mask`).

    Per-sample gradients of the cross-entropy come from :func:`per_example_gradients` (``torch.func.vmap``
    over ``grad``) with BatchNorm in eval mode (running statistics; no buffer changes), ``chunk_size``
    examples at a time. ``params`` maps model parameter names to the weights to evaluate at (others are
    held at the model's values). Returns tensors shaped like ``params``; the model is not changed.
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"invalid chunk_size: {chunk_size!r}; use a positive number of examples per vmap chunk")
    weights = {name: t.detach() for name, t in params.items()}
    fixed = {name: p.detach() for name, p in model.named_parameters() if name not in weights}
    buffers = dict(model.named_buffers())

    def loss(trainable: Mapping[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(functional_call(model, ({**fixed, **trainable}, buffers), (x,)), y)

    total = {name: torch.zeros_like(t) for name, t in weights.items()}
    with batchnorm_mode(model, "eval"):
        for grads in per_example_gradients(loss, weights, inputs, targets, chunk_size):
            for name in total:
                total[name] += grads[name].square().sum(0)
    return {name: t / inputs.shape[0] for name, t in total.items()}


class Objective:
    """L(w) = mean loss of ``model`` over a fixed evaluation set.

    Args:
        model: the network; never modified.
        inputs: evaluation inputs, shape (N, ...).
        targets: class labels, shape (N,).
        loss_fn: ``loss_fn(outputs, targets) -> mean loss``; cross-entropy by default.
        batch_size: examples per forward pass; the last batch may be smaller and is weighted exactly.
        bn: ``eval`` (running statistics) or ``train`` (batch statistics, buffers untouched).
        dtype: compute dtype (e.g. ``torch.float64``); defaults to the model's.
        device: where the weights live and the batches are computed.
        source: provenance (checkpoint path, sha256, dataset spec, evaluation set recipe; ``arch`` and
            ``input_shape`` name the model in error messages).
        data_on: where the evaluation set is held: ``device``, ``host`` (streamed to the device batch by
            batch, for sets larger than its memory) or ``auto`` (see :mod:`landscape.evalset`).
        shard: hold only this rank's contiguous share of the evaluation set and sum the loss, accuracy,
            gradient and curvature products over the ranks (``None``: whenever a process group of several
            ranks is active). Shares are :func:`landscape.distributed.shard_range` of the rows, or of the
            batches when BatchNorm uses batch statistics (``bn="train"``), so that every batch, and its
            statistics, is the single-process one.

    The model must take the inputs and, with the default loss, give an output per label class:
    two examples go through it at construction, else a one-line :class:`LandscapeError` says why.
    """

    def __init__(self, model: nn.Module, inputs: Tensor, targets: Tensor, *,
                 loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None, batch_size: int = 256,
                 bn: str = "eval", dtype: torch.dtype | None = None, device: str | torch.device | None = None,
                 source: Mapping[str, Any] | None = None, data_on: str = "auto", shard: bool | None = None) -> None:
        if bn not in BN_MODES:
            raise LandscapeError(f"unknown --bn {bn!r}; use eval or train")
        if batch_size < 1:
            raise LandscapeError(f"--batch-size must be >= 1, got {batch_size}")
        if len(inputs) != len(targets) or len(inputs) == 0:
            raise LandscapeError(f"evaluation set has {len(inputs)} inputs and {len(targets)} targets; "
                                 "they must be equal and non-zero")
        if isinstance(model, torch.jit.ScriptModule):
            raise LandscapeError("a TorchScript model cannot be differentiated functionally; pass --arch NAME "
                                 "(and --arch-kwargs) so its weights load into an eager model")
        first = next(model.parameters(), None)
        if first is None:
            raise LandscapeError("the model has no parameters")
        self.model = model
        self.device = resolve_device(device) if device is not None else first.device
        self.dtype = dtype or first.dtype
        self.loss_fn = loss_fn or F.cross_entropy
        self.batch_size = int(batch_size)
        self.bn = bn
        self.source = dict(source or {})
        self.params: dict[str, Tensor] = {n: self._cast(p) for n, p in model.named_parameters()}
        self.buffers: dict[str, Tensor] = {n: self._cast(b) for n, b in model.named_buffers()}
        self.frozen: dict[str, Tensor] = {}
        self.sharded = distributed.active() and shard is not False
        self.data = EvalSet(inputs, targets, device=self.device, dtype=self.dtype, batch_size=self.batch_size,
                            placement=data_on)
        if self.sharded:
            self.data = self.data.part(*self._share())
        check_fits(self._eval_outputs, self.data.first(2), targets if self.loss_fn is F.cross_entropy else None,
                   model_name(self.source.get("arch"), self.source.get("input_shape")), self._data_name(),
                   "use a dataset that matches the checkpoint, or pass --arch/--arch-kwargs for a model that takes it")

    def _cast(self, tensor: Tensor) -> Tensor:
        dtype = self.dtype if tensor.is_floating_point() else tensor.dtype
        return tensor.detach().to(self.device, dtype, copy=True)

    def _share(self) -> tuple[int, int]:
        """This rank's rows of the whole evaluation set: whole batches under batch statistics."""
        count = self.data.total
        if self.bn == "train" and has_batchnorm(self.model):
            first, last = distributed.shard_range(math.ceil(count / self.batch_size))
            return first * self.batch_size, min(last * self.batch_size, count)
        return distributed.shard_range(count)

    @property
    def num_examples(self) -> int:
        """Examples of the whole evaluation set (on every rank, sharded or not)."""
        return self.data.total

    @property
    def num_local_examples(self) -> int:
        """Examples this rank holds and computes on (all of them unless sharded)."""
        return len(self.data)

    @property
    def inputs(self) -> Tensor:
        """The inputs this rank holds, in the compute dtype (on the device, or in host memory; see ``data_on``)."""
        return self.data.held()[0]

    @property
    def targets(self) -> Tensor:
        """The labels this rank holds."""
        return self.data.held()[1]

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.params.values())

    def batches(self) -> Iterator[tuple[Tensor, Tensor, float]]:
        """Fixed batches ``(x, y, weight)`` of this rank's rows on the device, ``weight = len(x) / N`` (N: the
        whole set's examples)."""
        return self.data.batches()

    def examples(self, index: np.ndarray | Tensor) -> tuple[Tensor, Tensor]:
        """``(x, y)`` on the device for the examples ``index`` ``(n,)`` of the whole evaluation set."""
        return self.data.whole().take(index)

    def whole(self) -> Objective:
        """The same objective over the whole evaluation set on every rank, with no sums over ranks (for
        analyses that share out points or mini-batches); ``self`` when not sharded."""
        if not self.sharded:
            return self
        whole = copy.copy(self)
        whole.sharded, whole.data = False, self.data.whole()
        return whole

    def sum_over_ranks_(self, tensors: Sequence[Tensor]) -> Sequence[Tensor]:
        """Sum ``tensors`` (one dtype and device) over the ranks in place when sharded (one collective)."""
        return distributed.all_reduce_sum_many_(tensors) if self.sharded else tensors

    def _eval_outputs(self, x: Tensor) -> Any:
        """Outputs at the base weights with running BatchNorm statistics (for :func:`check_fits`)."""
        with batchnorm_mode(self.model, "eval"):
            return functional_call(self.model, ({**self.frozen, **self.params}, self.buffers), (x,), strict=False)

    def _data_name(self) -> str:
        spec = self.source.get("dataset")
        return f"dataset '{spec}'" if spec else "the evaluation set"

    def nonfinite(self) -> tuple[str, str] | None:
        """``(problem, fix)`` in words when the weights, floating buffers or evaluation inputs hold NaN/inf;
        None when everything is finite. (Sharded: the inputs of every rank are counted, one collective.)"""
        weights = count_nonfinite({**self.frozen, **self.params, **self.buffers})
        if weights:
            checkpoint = self.source.get("checkpoint")
            owner = f"the weights of {checkpoint}" if checkpoint else "the weights"
            return (f"{owner} hold {weights[0]} (first in {weights[1]})",
                    "use a checkpoint saved before training diverged")
        x = self.inputs
        counts = (torch.stack([torch.isnan(x).sum(), (~torch.isfinite(x)).sum()]) if x.is_floating_point()
                  else torch.zeros(2, dtype=torch.int64, device=x.device))
        nan, bad = (int(c) for c in self.sum_over_ranks_([counts])[0])
        if bad:
            return (f"the inputs of {self._data_name()} hold {nonfinite_words(nan, bad - nan)}",
                    "remove or replace the non-finite inputs in the dataset")
        return None

    def require_finite(self, analysis: str) -> None:
        """Refuse (LandscapeError) weights or inputs holding NaN/inf, for which ``analysis`` would be NaN."""
        found = self.nonfinite()
        if found:
            raise LandscapeError(f"{found[0]}, so {analysis} would be NaN; {found[1]}")

    def outputs(self, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        """Model outputs at ``params`` (a full or restricted dict) under the BatchNorm mode."""
        with batchnorm_mode(self.model, self.bn):
            return functional_call(self.model, ({**self.frozen, **params}, self.buffers), (x,), strict=False)

    def batch_loss(self, params: Mapping[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        """Mean loss on one batch; a pure function of ``params`` (usable under torch.func)."""
        return self.loss_fn(self.outputs(params, x), y)

    def _at(self, delta: Mapping[str, Tensor] | None, params: Mapping[str, Tensor] | None) -> dict[str, Tensor]:
        base = dict(self.params if params is None else params)
        if delta is not None:
            for name, d in delta.items():
                base[name] = base[name] + d
        return base

    def loss_and_accuracy(self, delta: Mapping[str, Tensor] | None = None,
                          params: Mapping[str, Tensor] | None = None) -> tuple[float, float]:
        """Exact mean loss and accuracy (fraction) at ``params + delta`` over the whole evaluation set."""
        at = self._at(delta, params)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        with torch.inference_mode():
            for x, y, weight in self.batches():
                out = self.outputs(at, x)
                total += self.loss_fn(out, y).double() * weight
                correct += accuracy_count(out, y)
        if self.sharded:
            total, correct = self.sum_over_ranks_([torch.stack([total, correct.double()])])[0]
        return float(total), int(correct) / self.num_examples

    def loss(self, delta: Mapping[str, Tensor] | None = None, params: Mapping[str, Tensor] | None = None) -> float:
        return self.loss_and_accuracy(delta, params)[0]

    def gradient(self, delta: Mapping[str, Tensor] | None = None,
                 params: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        """Gradient of the exact mean loss at ``params + delta`` over the whole evaluation set."""
        at = self._at(delta, params)
        total = {n: torch.zeros_like(t) for n, t in at.items()}
        for x, y, weight in self.batches():
            for name, g in grad(self.batch_loss)(at, x, y).items():
                total[name].add_(g, alpha=weight)
        self.sum_over_ranks_(list(total.values()))
        return total

    def example_gradients(self, chunk: int) -> Iterator[Tensor]:
        """Each example's loss gradient (at its own label), flat in parameter order: ``(rows, d)`` for each
        run of at most ``chunk`` examples of this rank's rows, in evaluation-set order. Refused under
        ``bn="train"`` with BatchNorm, which would normalise each example by itself."""
        if self.bn == "train" and has_batchnorm(self.model):
            raise LandscapeError("per-example gradients (the empirical Fisher) need BatchNorm on running "
                                 "statistics; use --bn eval (bn='eval')")
        return (torch.cat([g.reshape(len(g), -1) for g in grads.values()], dim=1)
                for x, y, _ in self.batches()
                for grads in per_example_gradients(self.batch_loss, self.params, x, y, chunk))

    def derive(self, *, params: str | Sequence[str] | None = None, bn: str | None = None,
               examples: Sequence[int] | np.ndarray | Tensor | None = None) -> Objective:
        """The same objective (sharing weights and buffers) over the parameters matching ``params`` (globs;
        the others held fixed at their values), with BatchNorm mode ``bn``, and/or over the evaluation-set
        rows ``examples`` (indices ``(n,)`` into the whole set, in that order; recorded by count and digest;
        every rank then holds all of them: the derived objective is not sharded)."""
        derived = copy.copy(self)
        if examples is not None:
            index = np.asarray(examples)
            n = self.num_examples
            if index.ndim != 1 or not len(index) or not np.issubdtype(index.dtype, np.integer) \
                    or index.min() < 0 or index.max() >= n:
                raise LandscapeError(f"examples must be a non-empty 1-D array of integer indices in [0, {n}), got "
                                     f"{index.dtype} of shape {index.shape}")
            derived.sharded, derived.data = False, self.data.whole().select(index)
            derived.source = {**self.source, "examples": {"n": len(index), "indices_sha256": indices_digest(index)}}
        if bn is not None:
            if bn not in BN_MODES:
                raise LandscapeError(f"unknown bn {bn!r}; use train (batch statistics) or eval (running statistics)")
            derived.bn = bn
            if derived.sharded:   # whole batches or not
                derived.data = self.data.part(*derived._share())
        if params is not None:
            names = select(list(self.params), params)
            derived.params = {n: self.params[n] for n in names}
            derived.frozen = {**self.frozen, **{n: t for n, t in self.params.items() if n not in names}}
            derived.source = {**derived.source, "params": ",".join(names)}
        return derived

    def provenance(self) -> dict[str, Any]:
        """Where this objective came from, for the results store."""
        return dict(self.source)


def indices_digest(indices: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(indices, dtype=np.int64).tobytes()).hexdigest()


def load_objective(checkpoint: str, *, data: str | None = None, split: str = "train", subset: int | None = None,
                   subset_seed: int = 0, batch_size: int = 256, bn: str = "eval", dtype: torch.dtype | str | None = None,
                   device: str | torch.device = "auto", arch: str | None = None, arch_kwargs: Mapping | None = None,
                   trust: bool = False, data_on: str = "auto", shard: bool | None = None) -> Objective:
    """Build an :class:`Objective` from a checkpoint file and a dataset spec.

    ``data`` defaults to the dataset recorded in a landscape checkpoint; a recorded
    ``module:function`` dataset (like a recorded ``module:function`` architecture) is refused
    unless ``trust=True``, so name it as ``data``/``arch`` to run it. ``subset`` picks a
    deterministic subset (by ``subset_seed``) of the split; the recipe and a digest of the
    chosen indices are recorded so the evaluation set can be rebuilt exactly (the same recipe and
    digest on every rank and world size). Under torchrun it joins the process group
    (:func:`landscape.distributed.setup`), ``device="auto"`` is this rank's GPU, and the objective is
    data parallel unless ``shard=False`` (see :class:`Objective`); ``data_on`` as there.
    """
    distributed.setup()
    from landscape.checkpoint import load_checkpoint, recorded_spec
    from landscape.data import eval_subset, load_dataset
    from landscape.models import model_options

    if split not in ("train", "test"):
        raise LandscapeError(f"unknown --split {split!r}; use train or test")
    if isinstance(dtype, str):
        if dtype not in ("float32", "float64"):
            raise LandscapeError(f"unknown --dtype {dtype!r}; use float32 or float64")
        dtype = getattr(torch, dtype)
    given = model_options(arch_kwargs, "arch_kwargs (--arch-kwargs)")
    dataset = load_dataset(data) if data else None
    # The dataset fills in the class count and input shape only for an architecture named on the
    # command line (foreign weights); an own checkpoint's recorded values and --arch-kwargs win.
    ckpt = load_checkpoint(checkpoint, arch=arch, arch_kwargs=given, trust=trust,
                           num_classes=dataset.num_classes if dataset and arch and "num_classes" not in given else None,
                           input_shape=dataset.input_shape if dataset and arch and "input_shape" not in given else None)
    spec = data or recorded_spec(ckpt.meta, "dataset", checkpoint, trust)
    if not spec:
        raise LandscapeError(f"{checkpoint} does not record its dataset; pass --data (e.g. --data digits)")
    dataset = dataset or load_dataset(spec)
    x, y = dataset.split(split)
    x, y, indices = eval_subset(x, y, subset, subset_seed)
    source = {"checkpoint": str(checkpoint), "checkpoint_sha256": ckpt.sha256, "dataset": spec,
              "arch": ckpt.meta.get("arch"), "input_shape": ckpt.meta.get("arch_kwargs", {}).get("input_shape"),
              "eval_set": {"split": split, "subset": subset, "subset_seed": subset_seed, "n": len(indices),
                           "indices_sha256": indices_digest(indices)}}
    return Objective(ckpt.model, x, y, batch_size=batch_size, bn=bn, dtype=dtype,
                     device=resolve_device(device), source=source, data_on=data_on, shard=shard)
