"""Sharpness-aware optimizers and the pure perturbation rules they use.

The rules (``sam_perturbation``, ``asam_scale``, ``rsam_noise``, ``rsam_perturbation``,
``filterwise_noise``, ``arwp_history_update``, ``fisher_mask``, ``dynamic_mask_update``) are pure functions on sequences of tensors; the analyses reuse them so a
diagnostic measures exactly what an optimizer does. Formulas follow ``shared/PAPERS.md``. A
*filter* is a slice along dim 0 of a tensor with ndim >= 2; a tensor with fewer dimensions is
one filter (as :func:`landscape.params.filter_norms`).

Optimizers (``create(name, params, **hparams)``; closure calls per ``step``):
sam/asam 2 (2 per chunk with m-sharpness), rsam 2, rwp/arwp 1, mrwp/marwp 2, ssamf/ssamd 2
(SSAM-F also computes a Fisher every ``refresh`` steps without calling the closure).
Choices where the sources leave room, stated once:
- ASAM rescales only tensors with ndim >= 2 (no names in optimizer parameter lists).
- R-SAM's delta0 has variance gamma^2 ||w_j|| per filter, literally as the method sheet writes it.
- ARWP's history is F <- beta F + ||g_j||^2 (no (1 - beta)) of the perturbed gradient, and divides
  the noise *variance* by sqrt(1 + eta F_j) as the paper writes (its code divides the std). F has
  one entry per filter, a bias being one filter; the authors' code keeps one per bias entry.
- RWP, ARWP, m-RWP and m-ARWP default to the paper's cosine-rising sigma (sigma/10 -> sigma). The
  authors' scripts differ: RWP/ARWP rise 0.001 -> 0.011, m-RWP/m-ARWP keep 0.015 constant.
- SSAM's mask counts are exact floors of decimal products (:func:`kept_count`, :func:`drop_count`).
- SSAM's eps defaults to the reference code's rho g / ||g|| * mask (radius < rho); ``mask_norm``.
- Weight decay is excluded from SAM's ascent gradient unless ``ascent_weight_decay=True``.
- All noise comes from one flat ``randn`` per step (:func:`standard_normal`).

Under torchrun (a data-parallel loop such as :func:`landscape.train.train_model`): the SAM family's
ascent pass runs unsynchronised and ``ascent_scope`` (rank, global, group:K) says whose gradient a
rank ascends by; m-RWP/m-ARWP's ``parallel=True`` computes the clean and the perturbed gradient on two
halves of the ranks; SSAM masks are the same on every rank; the generator is seeded alike on every
rank, so every rank draws the same noise. A :class:`Pass` tells the loop what each pass needs.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from landscape import distributed
from landscape.objective import batchnorm_mode, empirical_fisher
from landscape.params import (filter_norms, filter_square_sums, flat_cat, global_norm, is_filtered, per_entry,
                              per_filter, split_like)
from landscape.registry import Registry

_TINY = 1e-12


# ----------------------------------------------------------------------------------------------
# Pure perturbation rules
# ----------------------------------------------------------------------------------------------

def _check_number(name: str, value: float, low: float = 0.0, high: float = math.inf, *,
                  low_open: bool = False, high_open: bool = False, hint: str = "") -> None:
    """ValueError unless ``value`` is a real number between ``low`` and ``high`` (closed unless open)."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (number and (low < value if low_open else low <= value)
            and (value < high if high_open else value <= high)):
        if high < math.inf:
            interval = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        else:
            interval = f"{'>' if low_open else '>='} {low:g}"
        raise ValueError(f"invalid {name}: {value!r}; must be a number {interval}{hint}")


def _refuse_renamed(kwargs: Mapping, old: str, new: str, method: str) -> None:
    """ValueError naming ``new`` when the keyword arguments still use the old name ``old``."""
    if old in kwargs:
        raise ValueError(f"{method}'s {old}= is now called {new}=; pass {new}={kwargs[old]!r}")


def _check_count(name: str, value: int, what: str) -> None:
    """ValueError unless ``value`` is a positive int."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"invalid {name}: {value!r}; use a positive number of {what}")


def asam_scale(weights: Sequence[Tensor], eta: float = 0.01) -> list[Tensor]:
    """ASAM's element-wise T_w = |w| + eta for weight tensors (ndim >= 2); ones for biases and norms.

    Optimizer parameter lists carry no names, so "weight" means a tensor with ndim >= 2
    (conv/linear kernels). The ASAM reference code also scales BatchNorm weights; here
    biases and BatchNorm affine parameters (ndim < 2) are not rescaled.
    """
    scale = torch._foreach_abs(list(weights))
    kernels = [t for t in scale if is_filtered(t)]
    others = [t for t in scale if not is_filtered(t)]
    if kernels:
        torch._foreach_add_(kernels, eta)
    if others:
        torch._foreach_zero_(others)
        torch._foreach_add_(others, 1.0)
    return scale


def _dual_direction(grads: list[Tensor], p: float) -> list[Tensor]:
    """The unit-p-norm maximiser of <eps, g>: sign(g)|g|^{q-1}/||g||_q^{q-1}, 1/p + 1/q = 1."""
    if p == 2.0:
        scale = 1.0 / global_norm(grads, 2.0).clamp_min(_TINY)
        return torch._foreach_mul(grads, scale)
    if math.isinf(p):                                   # q = 1: eps = sign(g)
        return torch._foreach_sign(grads)
    largest = global_norm(grads, math.inf)
    if p == 1.0:                                        # q = inf: all mass on the largest |g|, ties share
        hits = [(g.abs() == largest) & (largest > 0) for g in grads]
        count = torch.stack([h.sum() for h in hits]).sum().clamp_min(1)
        return [torch.sign(g) * h / count for g, h in zip(grads, hits)]
    q = p / (p - 1.0)
    scaled = torch._foreach_div(grads, largest.clamp_min(_TINY))       # |g|/max|g| <= 1: no overflow
    powered = torch._foreach_pow(torch._foreach_abs(scaled), q - 1.0)
    denom = global_norm(scaled, q).clamp_min(_TINY).pow(q - 1.0)
    return torch._foreach_div(torch._foreach_mul(torch._foreach_sign(scaled), powered), denom)


def sam_perturbation(grads: Sequence[Tensor], rho: float, p: float = 2.0,
                     weights: Sequence[Tensor] | None = None, adaptive: bool = False,
                     eta: float = 0.01) -> list[Tensor]:
    """SAM's one-step ascent eps with ||eps||_p = rho (Foret et al.), or ASAM's if ``adaptive``.

    eps = rho * sign(g)|g|^{q-1} / ||g||_q^{q-1} with 1/p + 1/q = 1 (p = 2: rho g/||g||;
    p = inf: rho sign(g); p = 1: rho sign(g) on the largest |g| entries, split among ties).
    ASAM (Kwon et al.) applies it to T_w g and returns T_w * eps, T_w from :func:`asam_scale`.
    A zero gradient gives eps = 0. Shapes follow ``grads``; no host synchronisation.
    """
    _check_number("rho", rho)
    _check_number("p", p, 1.0, math.inf, hint=" (p = 2 is the paper's; inf allowed)")
    grads = list(grads)
    if not adaptive:
        return torch._foreach_mul(_dual_direction(grads, p), rho)
    if weights is None:
        raise ValueError("adaptive=True (ASAM) needs weights; pass the parameters as weights=")
    _check_number("eta", eta)
    scale = asam_scale(weights, eta)
    direction = _dual_direction(torch._foreach_mul(grads, scale), p)
    return torch._foreach_mul(torch._foreach_mul(direction, scale), rho)


def _flat_normal(weights: Sequence[Tensor], generator: torch.Generator) -> Tensor:
    flat = torch.randn(sum(w.numel() for w in weights), generator=generator, device=generator.device,
                       dtype=weights[0].dtype)
    return flat.to(weights[0].device)


def standard_normal(weights: Sequence[Tensor], generator: torch.Generator) -> list[Tensor]:
    """N(0, 1) noise shaped like ``weights``: ONE flat ``randn`` of all their entries (tensors
    concatenated in order, dtype of the first) from ``generator``, split back into their shapes.

    Every tensor gets its own independent entries; the single draw keeps the step cheap. All
    noise of this module is drawn this way.
    """
    weights = list(weights)
    return split_like(_flat_normal(weights, generator), weights)


def rsam_noise(weights: Sequence[Tensor], gamma: float, generator: torch.Generator) -> list[Tensor]:
    """R-SAM's kernel-wise start delta0 ~ N(0, gamma^2 diag(||w_j||)) (Liu et al., as in PAPERS.md).

    The variance of filter j is gamma^2 * ||w_j|| (std gamma * sqrt(||w_j||)), literally as the
    method sheet writes it. Noise comes from :func:`standard_normal`: every tensor gets its own
    entries, unlike the official JAX code, which reuses one key for every tensor.
    """
    _check_number("gamma", gamma)
    weights = list(weights)
    std = filter_square_sums(weights).pow_(0.25).mul_(gamma)                # gamma * ||w_j||^(1/2)
    return split_like(_flat_normal(weights, generator).mul_(per_entry(std, weights)), weights)


def rsam_perturbation(delta0: Sequence[Tensor], grads: Sequence[Tensor], rho: float,
                      grad_weight: float) -> list[Tensor]:
    """R-SAM's projected ascent: rho (delta0 + a g) / ||delta0 + a g||, g = grad at w + delta0,
    a = ``grad_weight`` (the paper's lambda: the weight of the gradient against the random start).

    Returns the total perturbation from w (w_adv = w + result), on the rho-sphere.
    """
    _check_number("rho", rho)
    _check_number("grad_weight", grad_weight)
    total = torch._foreach_add(list(delta0), list(grads), alpha=grad_weight)
    return torch._foreach_mul(total, rho / global_norm(total, 2.0).clamp_min(_TINY))


def filterwise_noise(weights: Sequence[Tensor], sigma: float, generator: torch.Generator,
                     history: Sequence[Tensor] | None = None, eta: float = 0.1) -> list[Tensor]:
    """RWP/ARWP noise eps_j ~ N(0, sigma^2 ||w_j||^2 / sqrt(1 + eta F_j)) per filter j (Li et al.).

    Without ``history`` this is RWP's N(0, sigma^2 ||w_j||^2) (std sigma ||w_j||). With the ARWP
    history F (shaped like :func:`landscape.params.filter_norms`, see :func:`arwp_history_update`)
    the variance is divided by sqrt(1 + eta F_j), i.e. the std by (1 + eta F_j)^{1/4}. Noise
    comes from :func:`standard_normal`.
    """
    _check_number("sigma", sigma)
    _check_number("eta", eta)
    weights = list(weights)
    std = filter_square_sums(weights).sqrt_().mul_(sigma)
    if history is not None:
        std.mul_(flat_cat(history).mul(eta).add_(1.0).pow_(-0.25))
    return split_like(_flat_normal(weights, generator).mul_(per_entry(std, weights)), weights)


def arwp_history_update(history: Sequence[Tensor], grads: Sequence[Tensor], beta: float = 0.99) -> list[Tensor]:
    """ARWP's filter-wise history F <- beta F + ||g_j||^2 (an exponential moving *sum*: no (1 - beta)).

    ``history`` and the result are shaped like :func:`landscape.params.filter_norms` of ``grads``: a
    tensor with ndim < 2 (a bias) is one filter, one history value; the authors' code keeps one per entry.
    """
    grads = list(grads)
    return per_filter(flat_cat(history).mul(beta).add_(filter_square_sums(grads)), grads)


def fisher_mask(fisher: Sequence[Tensor], sparsity: float) -> list[Tensor]:
    """SSAM-F mask: True on the global top-k entries of the Fisher diagonal, k = :func:`kept_count`.

    Ties at the threshold are broken by ``torch.topk`` order (flattened, in tensor order).
    """
    _check_number("sparsity", sparsity, 0.0, 1.0, high_open=True, hint=" (the fraction of entries not perturbed)")
    flat = torch.cat([f.reshape(-1) for f in fisher])
    keep = flat.new_zeros(flat.shape, dtype=torch.bool)
    keep[torch.topk(flat, kept_count(flat.numel(), sparsity), sorted=False).indices] = True
    return [m.view_as(f) for m, f in zip(torch.split(keep, [f.numel() for f in fisher]), fisher)]


def _decimal(value: float) -> Fraction:
    """``value`` as the exact decimal it prints as: 0.9 -> 9/10, not the binary float nearest to 0.9."""
    return Fraction(repr(float(value)))


def kept_count(numel: int, sparsity: float) -> int:
    """Number of perturbed entries in an SSAM mask: the exact floor((1 - s) d), with s read as the
    decimal it prints as (d = 10, s = 0.9 keeps 1).

    The reference code rounds in floating point, int(d (1 - s)) for SSAM-F and d - ceil(d s) for
    SSAM-D, which is one lower where the float product falls just below an integer (SSAM-F's
    int(10 * (1 - 0.9)) = 0, int(90 * (1 - 0.3)) = 62).
    """
    return math.floor((1 - _decimal(sparsity)) * numel)


def drop_count(step: int, total_steps: int, sparsity: float, drop_rate: float, numel: int) -> int:
    """SSAM-D's N_drop = floor(f_decay(t) (1 - s) d), f_decay(t) = alpha/2 (1 + cos(pi t / T)), t capped at T.

    The product is exact: alpha and s are read as the decimals they print as, and the cosine factor
    (1 + cos(pi t / T)) / 2 is rounded to 12 decimals, which makes it exact where it is rational
    (1, 3/4, 1/2, 1/4, 0 at t/T = 0, 1/3, 1/2, 2/3, 1), so an integer product is never truncated
    one lower by float rounding (t = 5, T = 10, s = 0.9, alpha = 0.5, d = 1000: 25).
    """
    progress = min(Fraction(step, max(total_steps, 1)), Fraction(1))
    decay = _decimal(round((1.0 + math.cos(math.pi * progress)) / 2.0, 12))
    return math.floor(_decimal(drop_rate) * decay * (1 - _decimal(sparsity)) * numel)


def dynamic_mask_update(mask: Sequence[Tensor], grads: Sequence[Tensor], num_drop: int,
                        generator: torch.Generator) -> list[Tensor]:
    """SSAM-D mask update: drop the ``num_drop`` perturbed entries with the smallest |g|, then
    regrow as many uniformly at random among the entries that were unperturbed before the drop.

    The number of perturbed entries is unchanged. Random scores come from one uniform draw
    over all entries (flattened, in tensor order) from ``generator``.
    """
    flat_mask = torch.cat([m.reshape(-1) for m in mask])
    flat_grad = torch.cat([g.reshape(-1) for g in grads]).abs()
    num_drop = min(num_drop, int(flat_mask.sum()), int((~flat_mask).sum()))
    noise = torch.rand(flat_mask.shape, generator=generator, device=generator.device).to(flat_mask.device)
    new_mask = flat_mask.clone()
    if num_drop > 0:
        drop_score = torch.where(flat_mask, flat_grad, torch.inf)
        grow_score = torch.where(flat_mask, -1.0, noise)
        new_mask[torch.topk(drop_score, num_drop, largest=False).indices] = False
        new_mask[torch.topk(grow_score, num_drop).indices] = True
    return [m.view_as(t) for m, t in zip(torch.split(new_mask, [t.numel() for t in mask]), mask)]


# ----------------------------------------------------------------------------------------------
# Optimizers
# ----------------------------------------------------------------------------------------------

@dataclass
class Pass:
    """What one closure call inside a step must compute; closures taking an argument receive it.

    - ``perturbed``: the weights hold w + eps for this pass.
    - ``batch``: which batch to use: 0 = B1, 1 = B2. Only m-RWP/m-ARWP ask for 1 (the clean
      pass at w); a loop may serve the same batch for both.
    - ``chunk``, ``chunk_size``: SAM's m-sharpness; take the rows with :meth:`select`.
    - ``sync``: False when this gradient is only used locally or reduced by the optimizer itself
      (SAM's ascent direction, parallel m-RWP), so a data-parallel loop must run the pass, forward
      included, under ``DistributedDataParallel.no_sync()``. A synchronised pass's gradient must be the
      mean over the whole global batch; an unsynchronised one the mean over this rank's rows.
    - ``shard``: ``(index, parts)``: this rank takes part ``index`` of ``parts`` of the global batch
      (parallel m-RWP splits the ranks in two halves, one per batch); None: its share among all ranks.
    - ``share``: the fraction of the global batch this rank took, recorded by a data-parallel loop
      (None: not recorded); the optimizer weighs its own reductions by it.
    """

    perturbed: bool = False
    batch: int = 0
    chunk: int = 0
    chunk_size: int | None = None
    sync: bool = True
    shard: tuple[int, int] | None = None
    batch_size: int | None = None     # rows in the full batch, recorded by select()
    share: float | None = None

    def select(self, *tensors: Tensor) -> tuple[Tensor, ...]:
        """The rows of this pass's chunk (all rows without m-sharpness), for each tensor."""
        self.batch_size = tensors[0].shape[0]
        if self.chunk_size is None:
            return tensors
        rows = slice(self.chunk * self.chunk_size, (self.chunk + 1) * self.chunk_size)
        return tuple(t[rows] for t in tensors)


Closure = Callable[..., Tensor]


def _base_class(base: str | type[torch.optim.Optimizer]) -> type[torch.optim.Optimizer]:
    if isinstance(base, type) and issubclass(base, torch.optim.Optimizer):
        return base
    classes = {name.lower(): cls for name, cls in vars(torch.optim).items()
               if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer) and cls is not torch.optim.Optimizer}
    if not isinstance(base, str) or base.lower() not in classes:
        raise ValueError(f"invalid base optimizer {base!r}; use a torch.optim class or one of "
                         f"{', '.join(sorted(classes))}")
    return classes[base.lower()]


def _takes_pass(closure: Closure) -> bool:
    """Whether ``closure`` accepts a positional argument (plain functions: cached by code object)."""
    if inspect.isfunction(closure):
        return _code_takes_argument(closure.__code__)
    try:
        parameters = inspect.signature(closure).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL) for p in parameters)


@functools.lru_cache(maxsize=256)
def _code_takes_argument(code) -> bool:
    return code.co_argcount > 0 or bool(code.co_flags & inspect.CO_VARARGS)


def _reduce_sum(tensors: list[Tensor], group: dist.ProcessGroup | None = None) -> list[Tensor]:
    """Sum of each tensor over the ranks (of ``group``): one all-reduce of one flat buffer."""
    return split_like(distributed.all_reduce_sum_(flat_cat(tensors), group), tensors)


def _weighted_mean(tensors: list[Tensor], weight: float, group: dist.ProcessGroup | None = None) -> list[Tensor]:
    """sum_r weight_r tensors_r / sum_r weight_r over the ranks (of ``group``), in one all-reduce."""
    *total, weights = _reduce_sum([*torch._foreach_mul(tensors, weight), tensors[0].new_full((), weight)], group)
    return torch._foreach_div(total, weights)


def _share(context: Pass, parts: int) -> float:
    """The fraction of its global batch a pass took (recorded by the loop; else an equal share of ``parts``)."""
    return context.share if context.share is not None else 1.0 / parts


def _scope_size(scope: str) -> int:
    """How many consecutive ranks share one ascent gradient under ``ascent_scope=scope``."""
    world = distributed.world_size()
    match = re.fullmatch(r"group:(\d+)", scope) if isinstance(scope, str) else None
    if scope == "rank":
        return 1
    if scope == "global":
        return world
    if match is not None and int(match[1]) >= 1 and world % int(match[1]) == 0:
        return int(match[1])
    raise ValueError(f"invalid ascent_scope: {scope!r}; use rank (each rank's own gradient, the default), global, "
                     f"or group:K with K dividing the number of ranks ({world})")


class PerturbedOptimizer(torch.optim.Optimizer):
    """Base of the weight-perturbation optimizers: wraps a base optimizer that applies the update.

    ``step(closure)``: the closure zeroes the gradients, runs forward and backward, and returns
    the loss; it may take one argument, a :class:`Pass`, saying which batch/chunk to use. The
    step runs the method's passes, restores w exactly from a saved copy after each perturbed
    pass, leaves the final gradient in ``p.grad``, clips it (``max_grad_norm``) and calls the
    base optimizer. It returns the loss of the pass at w (or of the first pass if none is at w).

    Shared options:
    - ``base``: torch.optim class or its name (``"sgd"``, ``"adamw"``, ...); extra keyword
      arguments (``lr``, ``momentum``, ``weight_decay``, ...) go to it. Its ``param_groups`` are
      shared, so LR schedulers work on this optimizer.
    - ``model``: enables BatchNorm control. With ``bn_stats="once"`` (default) running statistics
      and ``num_batches_tracked`` are updated only by passes at w; methods with no pass at w
      (RWP, ARWP, R-SAM) update them on their first pass. Other passes run under
      ``batchnorm_mode(model, "frozen")``. ``bn_stats="every"`` keeps the papers' behaviour
      (every pass updates). Without ``model`` every pass updates them.
    - ``grad_scaler``: a ``torch.amp.GradScaler`` whose scaled loss the closure backpropagates.
      Intermediate gradients are unscaled arithmetically; the final gradient is unscaled once with
      ``unscale_``, and the step is skipped (weights stay restored) on inf/NaN. The optimizer calls
      ``scaler.update()`` itself.
    - ``seed``: seeds the optimizer's own ``torch.Generator`` (on the parameters' device); None
      draws the seed from torch's global generator (so ``torch.manual_seed`` fixes it).
    Gradient accumulation happens inside the closure (several backward calls on micro-batches).
    ``state_dict()`` holds the base optimizer's state, the method's state (masks, ARWP history),
    the step count (schedule position) and the generator state: a resumed run is bit-identical.
    """

    batches_per_step = 1

    def __init__(self, params, base: str | type[torch.optim.Optimizer] = "sgd", *, model: nn.Module | None = None,
                 bn_stats: str = "once", max_grad_norm: float | None = None,
                 grad_scaler: torch.amp.GradScaler | None = None, seed: int | None = None, **base_kwargs):
        if bn_stats not in ("once", "every"):
            raise ValueError(f"invalid bn_stats: {bn_stats!r}; use 'once' (perturbed passes frozen) or 'every'")
        if max_grad_norm is not None:
            _check_number("max_grad_norm", max_grad_norm, low_open=True)
        if model is not None and not isinstance(model, nn.Module):
            raise ValueError(f"invalid model: {type(model).__name__}; pass the torch.nn.Module being trained")
        base_class = _base_class(base)
        try:
            self.base = base_class(params, **base_kwargs)
        except TypeError as error:
            raise ValueError(f"invalid arguments for base optimizer {base_class.__name__}: {error}") from None
        super().__init__(self.base.param_groups, {})
        self.param_groups = self.base.param_groups
        self.defaults = self.base.defaults
        self.model, self.bn_stats, self.max_grad_norm, self.grad_scaler = model, bn_stats, max_grad_norm, grad_scaler
        first = self.param_groups[0]["params"][0]
        self.generator = torch.Generator(device=first.device)
        self.generator.manual_seed(seed if seed is not None else int(torch.randint(2**62, (), dtype=torch.int64)))
        self.steps = 0
        self._backup: list[Tensor] = []

    # -- the step ---------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> Tensor:  # type: ignore[override]
        if closure is None:
            raise ValueError(f"{type(self).__name__}.step needs a closure that zeroes the gradients, "
                             "runs forward and backward, and returns the loss")
        params = self._params()
        loss = self._step(closure, params)
        self._apply(params)
        self.steps += 1
        return loss

    def _step(self, closure: Closure, params: list[Tensor]) -> Tensor:
        """Run the passes; leave weights at w and the final (scaled) gradient in ``p.grad``."""
        raise NotImplementedError

    def _params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"] if p.requires_grad]

    def _run(self, closure: Closure, context: Pass, update_bn: bool | None = None) -> Tensor:
        """One closure call; BatchNorm buffers frozen unless ``update_bn`` (default: pass at w)."""
        update_bn = not context.perturbed if update_bn is None else update_bn
        freeze = self.model is not None and self.bn_stats == "once" and not update_bn
        with torch.enable_grad(), (batchnorm_mode(self.model, "frozen") if freeze else contextlib.nullcontext()):
            loss = closure(context) if _takes_pass(closure) else closure()
        return loss.detach() if isinstance(loss, Tensor) else loss

    @staticmethod
    def _take_grads(params: list[Tensor]) -> list[Tensor]:
        """Detach the gradients from the parameters (None -> zeros) so the next pass starts fresh."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        for p in params:
            p.grad = None
        return grads

    def _scaling(self) -> bool:
        return self.grad_scaler is not None and self.grad_scaler.is_enabled()

    def _unscale(self, grads: list[Tensor]) -> list[Tensor]:
        """Divide intermediate gradients by the GradScaler's scale (no host synchronisation)."""
        if not self._scaling():
            return grads
        return torch._foreach_mul(grads, self.grad_scaler._get_scale_async().double().reciprocal().float())

    def _perturb(self, params: list[Tensor], eps: list[Tensor]) -> None:
        """Save an exact copy of w, then move to w + eps."""
        if len(self._backup) != len(params) or any(b.shape != p.shape for b, p in zip(self._backup, params)):
            self._backup = [torch.empty_like(p) for p in params]
        torch._foreach_copy_(self._backup, params)
        torch._foreach_add_(params, eps)

    def _restore(self, params: list[Tensor]) -> None:
        torch._foreach_copy_(params, self._backup)

    def _apply(self, params: list[Tensor]) -> None:
        """Unscale once, clip the final gradient, and step the base optimizer (skipped on inf/NaN)."""
        if self._scaling():
            self.grad_scaler.unscale_(self.base)
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], self.max_grad_norm,
                                           foreach=True)
        if self._scaling():
            self.grad_scaler.step(self.base)
            self.grad_scaler.update()
        else:
            self.base.step()

    # -- checkpoints ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = super().state_dict()
        state.update(base=self.base.state_dict(), steps=self.steps, generator=self.generator.get_state())
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state = dict(state_dict)
        base, self.steps, generator = state.pop("base"), state.pop("steps"), state.pop("generator")
        super().load_state_dict(state)
        self.base.load_state_dict(base)
        self.param_groups = self.base.param_groups
        self.generator.set_state(generator)


class _AscentMethod(PerturbedOptimizer):
    """Base of the methods whose perturbation follows an ascent gradient (SAM, ASAM, SSAM, R-SAM).

    Under torchrun the ascent pass runs without gradient synchronisation (``Pass(sync=False)``) and
    ``ascent_scope`` says whose gradient each rank perturbs by: ``"rank"`` (default) its own, the
    mean over its share of the batch (m-sharpness with m = the per-rank batch, as Foret et al.);
    ``"global"`` the mean over the global batch (the single-process step); ``"group:K"`` the mean
    over its group of K consecutive ranks. The reduction is one all-reduce of the gradient, weighted by
    each rank's share of the batch. The second pass is synchronised as usual. In a single process
    every scope is the same (``group:K`` needs K = 1).
    """

    def __init__(self, params, base: str | type[torch.optim.Optimizer] = "sgd", *, ascent_scope: str = "rank",
                 **kwargs):
        size = _scope_size(ascent_scope)
        super().__init__(params, base, **kwargs)
        self.ascent_scope, self._scope_ranks = ascent_scope, size
        self._scope_group = dist.new_subgroups(size)[0] if 1 < size < distributed.world_size() else None

    def _ascent_gradient(self, closure: Closure, context: Pass, params: list[Tensor],
                         update_bn: bool | None = None) -> tuple[Tensor, list[Tensor]]:
        """Run the (unsynchronised) ascent pass ``context``: its loss and unscaled gradient, averaged over the scope."""
        loss = self._run(closure, context, update_bn)
        grads = self._unscale(self._take_grads(params))
        if self._scope_ranks > 1:
            grads = _weighted_mean(grads, _share(context, distributed.world_size()), self._scope_group)
        return loss, grads


class SAM(_AscentMethod):
    """SAM (Foret et al.) with p-norm ascent, ASAM (``adaptive``, Kwon et al.) and m-sharpness.

    Each step: gradient at w, eps = :func:`sam_perturbation`, gradient at w + eps, restore w,
    base step with that gradient. Closure calls per step: 2, or 2 * ceil(batch / m) with
    m-sharpness, where each chunk of ``m`` examples gets its own eps and the final gradient is
    the size-weighted mean of the chunks' perturbed gradients (the closure must take a
    :class:`Pass` and use ``ctx.select(x, y)``). ``ascent_weight_decay=True`` adds the group's
    ``weight_decay * w`` to the ascent gradient; the default excludes it, as the PyTorch SAM
    implementations do. ASAM rescales tensors with ndim >= 2 only (:func:`asam_scale`).
    """

    def __init__(self, params, base: str | type[torch.optim.Optimizer] = "sgd", *, rho: float = 0.05,
                 p: float = 2.0, adaptive: bool = False, eta: float = 0.01, m: int | None = None,
                 ascent_weight_decay: bool = False, **kwargs):
        _check_number("rho", rho)
        _check_number("eta", eta)
        _check_number("p", p, 1.0, math.inf, hint=" (p = 2 is the paper's; inf allowed)")
        if m is not None:
            _check_count("m", m, "examples per chunk, or None")
            if distributed.world_size() > 1:
                raise ValueError(f"m={m} (m-sharpness) is for a single process; under torchrun each rank already "
                                 "perturbs by the gradient of its own share of the batch (ascent_scope=rank): "
                                 "set m through --batch-size / --nproc-per-node instead")
        super().__init__(params, base, **kwargs)
        self.rho, self.p, self.adaptive, self.eta, self.m = rho, p, adaptive, eta, m
        self.ascent_weight_decay = ascent_weight_decay

    def _ascent(self, params: list[Tensor], grads: list[Tensor]) -> list[Tensor]:
        if self.ascent_weight_decay:
            decays = [group.get("weight_decay", 0.0) for group in self.param_groups
                      for p in group["params"] if p.requires_grad]
            grads = torch._foreach_add(grads, torch._foreach_mul(params, decays))
        return sam_perturbation(grads, self.rho, self.p, params, self.adaptive, self.eta)

    def _step(self, closure: Closure, params: list[Tensor]) -> Tensor:
        if self.m is None:
            loss, grads = self._ascent_gradient(closure, Pass(sync=False), params)
            self._perturb(params, self._ascent(params, grads))
            self._run(closure, Pass(perturbed=True))
            self._restore(params)
            return loss
        if not _takes_pass(closure):
            raise ValueError("m-sharpness (m set) needs a closure that takes a Pass and slices its batch "
                             "with ctx.select(x, y)")
        loss, total, chunk, size = 0.0, None, 0, None
        while size is None or chunk * self.m < size:
            clean = Pass(sync=False, chunk=chunk, chunk_size=self.m)
            chunk_loss = self._run(closure, clean)
            if clean.batch_size is None:
                raise ValueError("with m set, the closure must take its rows with ctx.select(x, y)")
            size = clean.batch_size
            weight = (min(size, (chunk + 1) * self.m) - chunk * self.m) / size
            self._perturb(params, self._ascent(params, self._unscale(self._take_grads(params))))
            self._run(closure, Pass(perturbed=True, chunk=chunk, chunk_size=self.m))
            self._restore(params)
            grads = torch._foreach_mul(self._take_grads(params), weight)
            total = grads if total is None else torch._foreach_add(total, grads)
            loss = loss + chunk_loss * weight
            chunk += 1
        for p, g in zip(params, total):
            p.grad = g
        return loss


class _SparseSAM(SAM):
    """SSAM (Mi et al.): SAM whose eps is zero outside a binary mask refreshed every ``refresh`` steps.

    ``mask_norm="full"`` (default, the paper's code) scales by the unmasked gradient norm,
    eps = rho g / ||g|| * mask, so ||eps|| <= rho; ``"masked"`` uses rho (g * mask) / ||g * mask||.
    """

    def __init__(self, params, base="sgd", *, rho: float = 0.1, sparsity: float = 0.5, refresh: int = 1000,
                 mask_norm: str = "full", **kwargs):
        _check_number("sparsity", sparsity, 0.0, 1.0, high_open=True, hint=" (the fraction of entries not perturbed)")
        _check_count("refresh", refresh, "steps between mask updates")
        if mask_norm not in ("full", "masked"):
            raise ValueError(f"invalid mask_norm: {mask_norm!r}; use 'full' (paper code) or 'masked'")
        super().__init__(params, base, rho=rho, **kwargs)
        self.sparsity, self.refresh, self.mask_norm = sparsity, refresh, mask_norm
        self._refreshed_at = -1

    def _new_mask(self, params: list[Tensor], grads: list[Tensor]) -> list[Tensor] | None:
        raise NotImplementedError

    def masks(self) -> list[Tensor]:
        """The current perturbation masks (bool, shaped like the parameters), in parameter order."""
        return [self.state[p]["mask"].bool() for p in self._params()]

    def _ascent(self, params: list[Tensor], grads: list[Tensor]) -> list[Tensor]:
        if self.steps % self.refresh == 0 and self._refreshed_at != self.steps:
            mask = self._new_mask(params, grads)
            if mask is not None:
                for p, m in zip(params, mask):
                    self.state[p]["mask"] = m.to(p.dtype)       # 0/1 in the parameter dtype: fast foreach
            self._refreshed_at = self.steps
        mask = [self.state[p]["mask"] for p in params]
        if self.mask_norm == "masked":
            return super()._ascent(params, torch._foreach_mul(grads, mask))
        return torch._foreach_mul(super()._ascent(params, grads), mask)


class SSAMF(_SparseSAM):
    """SSAM-F: the mask keeps the top (1 - s) d entries of the empirical Fisher diagonal.

    Every ``refresh`` steps (from step 0) the Fisher is computed by
    :func:`~landscape.objective.empirical_fisher` at w
    over ``num_samples`` examples drawn without replacement from ``fisher_data = (x, y)`` with the
    optimizer's generator (per-sample gradients via vmap, BatchNorm in eval mode). ``model`` is
    required and must own the parameters. Closure calls per step: 2. Under torchrun every rank draws
    the same sample, computes the Fisher over its contiguous share of it, and the sums are all-reduced:
    every rank holds the same mask.
    """

    def __init__(self, params, base="sgd", *, model: nn.Module | None = None,
                 fisher_data: tuple[Tensor, Tensor] | None = None, num_samples: int = 1024,
                 fisher_chunk: int = 128, **kwargs):
        if model is None or fisher_data is None:
            raise ValueError("SSAM-F needs model= and fisher_data=(inputs, targets) to compute the Fisher mask")
        _check_count("num_samples", num_samples, "examples for the Fisher")
        _check_count("fisher_chunk", fisher_chunk, "examples per vmap chunk")
        super().__init__(params, base, model=model, **kwargs)
        names = {id(p): name for name, p in model.named_parameters()}
        missing = [i for i, p in enumerate(self._params()) if id(p) not in names]
        if missing:
            raise ValueError(f"SSAM-F: parameters {missing[:3]} are not in the model; pass model.parameters()")
        self._names = [names[id(p)] for p in self._params()]
        self.fisher_data, self.num_samples, self.fisher_chunk = fisher_data, num_samples, fisher_chunk

    def _new_mask(self, params: list[Tensor], grads: list[Tensor]) -> list[Tensor]:
        inputs, targets = self.fisher_data
        count = min(self.num_samples, inputs.shape[0])
        chosen = torch.randperm(inputs.shape[0], generator=self.generator, device=self.generator.device)[:count]
        if not distributed.active():
            return fisher_mask(self._fisher(params, chosen), self.sparsity)
        start, stop = distributed.shard_range(count)   # under torchrun each rank takes its share of the sample
        sums = [f * (stop - start) for f in self._fisher(params, chosen[start:stop])] if stop > start else \
            [torch.zeros_like(p) for p in params]
        return fisher_mask([f / count for f in _reduce_sum(sums)], self.sparsity)

    def _fisher(self, params: list[Tensor], chosen: Tensor) -> list[Tensor]:
        """The empirical Fisher diagonal at ``params`` over the ``fisher_data`` rows ``chosen``."""
        inputs, targets = self.fisher_data
        chosen, device = chosen.to(inputs.device), params[0].device
        fisher = empirical_fisher(self.model, dict(zip(self._names, params)), inputs[chosen].to(device),
                                  targets[chosen].to(device), self.fisher_chunk)
        return list(fisher.values())


class SSAMD(_SparseSAM):
    """SSAM-D: a random initial mask, then every ``refresh`` steps drop the N_drop perturbed
    entries with the smallest |g| (gradient at w) and regrow as many at random (:func:`dynamic_mask_update`),
    N_drop = floor(drop_rate/2 (1 + cos(pi t / total_steps)) (1 - s) d) (:func:`drop_count`). Closure calls
    per step: 2. Under torchrun the drop ranks the mean of the ranks' ascent gradients (one all-reduce
    per refresh) and the regrowth draws from the optimizer's generator, the same on every rank: every
    rank holds the same mask.
    """

    def __init__(self, params, base="sgd", *, drop_rate: float = 0.5, total_steps: int | None = None, **kwargs):
        _check_number("drop_rate", drop_rate, 0.0, 1.0)
        _check_count("total_steps", total_steps, "training steps (SSAM-D's cosine drop schedule needs it)")
        super().__init__(params, base, **kwargs)
        self.drop_rate, self.total_steps = drop_rate, total_steps

    def _new_mask(self, params: list[Tensor], grads: list[Tensor]) -> list[Tensor] | None:
        numel = sum(p.numel() for p in params)
        if "mask" not in self.state[params[0]]:
            scores = torch.rand(numel, generator=self.generator, device=self.generator.device).to(params[0].device)
            return fisher_mask([s.view_as(p) for s, p in zip(scores.split([p.numel() for p in params]), params)],
                               self.sparsity)
        if distributed.active():  # drop by the ranks' mean gradient, so that every rank keeps the same mask
            grads = [g / distributed.world_size() for g in _reduce_sum(grads)]
        if not torch.isfinite(global_norm(grads)):
            return None
        num_drop = drop_count(self.steps, self.total_steps, self.sparsity, self.drop_rate, numel)
        return dynamic_mask_update(self.masks(), grads, num_drop, self.generator)


class RSAM(_AscentMethod):
    """R-SAM (Liu et al.): random start, then a projected ascent step.

    Each step: delta0 = :func:`rsam_noise` (fresh draw per tensor), gradient g at w + delta0,
    eps = :func:`rsam_perturbation` (rho (delta0 + a g)/||delta0 + a g||, a = ``grad_weight``, the
    paper's lambda), gradient at w + eps, restore w, base step. Closure calls per step: 2 (both
    perturbed; the first, nearest to w, updates BatchNorm statistics under ``bn_stats="once"``).
    Returns the loss at w + delta0.
    """

    def __init__(self, params, base="sgd", *, rho: float = 0.05, gamma: float = 0.01, grad_weight: float = 1.0,
                 **kwargs):
        _refuse_renamed(kwargs, "lam", "grad_weight", "R-SAM")
        _check_number("rho", rho)
        _check_number("gamma", gamma)
        _check_number("grad_weight", grad_weight)
        super().__init__(params, base, **kwargs)
        self.rho, self.gamma, self.grad_weight = rho, gamma, grad_weight

    def _step(self, closure: Closure, params: list[Tensor]) -> Tensor:
        delta0 = rsam_noise(params, self.gamma, self.generator)
        self._perturb(params, delta0)
        loss, grads = self._ascent_gradient(closure, Pass(perturbed=True, sync=False), params, update_bn=True)
        self._restore(params)
        self._perturb(params, rsam_perturbation(delta0, grads, self.rho, self.grad_weight))
        self._run(closure, Pass(perturbed=True))
        self._restore(params)
        return loss


class RWP(PerturbedOptimizer):
    """RWP / ARWP / m-RWP / m-ARWP (Li et al.): gradients at filter-wise random perturbations.

    - eps = :func:`filterwise_noise` with sigma_t: constant, or (``sigma_schedule="cosine"``)
      rising from ``sigma_start`` (default sigma/10, as the reference code starts at 1e-3 for
      sigma = 0.01) to ``sigma`` over ``total_steps`` with sigma_start + (sigma - sigma_start)
      (1 - cos(pi t / T)) / 2. The registry defaults use the cosine rise for all four methods, the
      paper's schedule. The authors' scripts (nblt/mARWP) differ: ``run_rwp.sh`` (RWP/ARWP) rises
      from 0.001 to 0.011, 0.001 (1 + 10 (1 - cos(pi t / T)) / 2), i.e. ``sigma=0.011,
      sigma_start=0.001``; ``run_mrwp.sh`` (m-RWP/m-ARWP) keeps 0.015 constant, i.e.
      ``sigma_schedule="constant"`` (its cosine rise is opt-in).
    - ``adaptive=True`` (ARWP): per-filter history F <- beta F + ||g_j||^2 of the perturbed
      gradients (:func:`arwp_history_update`, no (1 - beta)), dividing the noise variance by
      sqrt(1 + eta F_j), as the paper writes. The reference code instead divides the std by
      sqrt(1 + eta F_j). A tensor with ndim < 2 (a bias, a BatchNorm weight) is one filter here,
      for the history as for the noise; the reference code keeps its history per entry (while its
      noise std uses the whole tensor's norm).
    - ``perturbed_weight`` m < 1 (m-RWP / m-ARWP; the paper's lambda): gradient
      m grad L_B1(w + eps) + (1 - m) grad L_B2(w). The clean pass asks for ``Pass(batch=1)`` and the
      perturbed one for ``Pass(batch=0)``, so a loop may feed two different batches
      (``batches_per_step == 2``) or the same one twice.
    - ``parallel=True`` (m-RWP / m-ARWP under torchrun, an even number W of ranks): the two gradients
      run at the same time, so a step costs one gradient of wall time. Ranks 0 .. W/2 - 1 compute
      grad L(w) on their shares of B2 (rank 0, which writes BatchNorm statistics, is at w), ranks
      W/2 .. W - 1 grad L(w + eps) on their shares of B1; one all-reduce of the gradients, each
      scaled by m or 1 - m times its share of its batch, gives exactly the step above (m-ARWP also
      reduces the perturbed gradient for its history: twice the volume). Every rank draws the noise,
      so the generator stays the same everywhere. Each rank returns the loss of its own pass.
    Closure calls per step: 1 for m = 1 (its pass updates BatchNorm statistics: there is no
    pass at w), 2 for m < 1 (clean pass first; its loss is returned), 1 with ``parallel``.
    Noise is drawn from the optimizer's generator, the same on every rank: a run on W ranks takes
    the single-process step on the global batch.
    """

    def __init__(self, params, base="sgd", *, sigma: float = 0.01, sigma_schedule: str = "constant",
                 sigma_start: float | None = None, total_steps: int | None = None, adaptive: bool = False,
                 eta: float = 0.1, beta: float = 0.99, perturbed_weight: float = 1.0, parallel: bool = False,
                 **kwargs):
        _refuse_renamed(kwargs, "lam", "perturbed_weight", "m-RWP")
        _check_number("sigma", sigma)
        _check_number("eta", eta)
        if sigma_schedule not in ("constant", "cosine"):
            raise ValueError(f"invalid sigma_schedule: {sigma_schedule!r}; use 'constant' or 'cosine'")
        if sigma_schedule == "cosine":
            _check_count("total_steps", total_steps, "training steps (the cosine sigma schedule needs it; "
                         "or use sigma_schedule='constant')")
        if sigma_start is not None:
            _check_number("sigma_start", sigma_start)
        _check_number("beta", beta, 0.0, 1.0)
        _check_number("perturbed_weight", perturbed_weight, 0.0, 1.0, low_open=True,
                      hint=" (1 = RWP, 0.5 = the m-RWP paper's)")
        if parallel and perturbed_weight == 1.0:
            raise ValueError("parallel=true runs m-RWP's two gradients on two halves of the ranks; it needs "
                             "perturbed_weight < 1 (mrwp, marwp)")
        if parallel and distributed.world_size() % 2:
            raise ValueError(f"parallel=true needs an even number of ranks, got {distributed.world_size()}: launch "
                             "with torchrun --nproc-per-node 2 (or 4, ...), or drop parallel=true")
        super().__init__(params, base, **kwargs)
        self.sigma, self.sigma_schedule, self.total_steps = sigma, sigma_schedule, total_steps
        self.sigma_start = sigma / 10 if sigma_start is None else sigma_start
        self.adaptive, self.eta, self.beta, self.perturbed_weight = adaptive, eta, beta, perturbed_weight
        self.parallel = bool(parallel)
        self.batches_per_step = 1 if perturbed_weight == 1.0 else 2

    def sigma_at(self, step: int) -> float:
        """The noise scale sigma_t at optimizer step ``step``."""
        if self.sigma_schedule == "constant":
            return self.sigma
        progress = min(step / self.total_steps, 1.0)
        return self.sigma_start + (self.sigma - self.sigma_start) * (1.0 - math.cos(math.pi * progress)) / 2.0

    def history(self) -> list[Tensor] | None:
        """ARWP's per-filter history F (shaped like ``filter_norms``), None for RWP."""
        if not self.adaptive:
            return None
        params = self._params()
        for p in params:
            if "history" not in self.state[p]:
                self.state[p]["history"] = torch.zeros_like(filter_norms(p))
        return [self.state[p]["history"] for p in params]

    def _update_history(self, history: list[Tensor], grads: list[Tensor]) -> None:
        """ARWP's history update from the (scaled) perturbed gradient; kept on a GradScaler's inf/NaN step."""
        updated = arwp_history_update(history, self._unscale(grads), self.beta)
        if self._scaling():
            finite = torch.isfinite(global_norm(updated))
            updated = [torch.where(finite, new, old) for new, old in zip(updated, history)]
        for p, h in zip(self._params(), updated):
            self.state[p]["history"] = h

    def _step(self, closure: Closure, params: list[Tensor]) -> Tensor:
        if self.parallel:
            return self._parallel_step(closure, params)
        clean, loss = None, None
        if self.perturbed_weight < 1.0:
            loss = self._run(closure, Pass(batch=1))
            clean = self._take_grads(params)
        history = self.history()
        self._perturb(params, filterwise_noise(params, self.sigma_at(self.steps), self.generator, history, self.eta))
        perturbed_loss = self._run(closure, Pass(perturbed=True, batch=0), update_bn=clean is None)
        self._restore(params)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        if history is not None:
            self._update_history(history, grads)
        if clean is not None:
            torch._foreach_mul_(grads, self.perturbed_weight)
            torch._foreach_add_(grads, clean, alpha=1.0 - self.perturbed_weight)
            for p, g in zip(params, grads):
                p.grad = g
        return perturbed_loss if loss is None else loss

    def _parallel_step(self, closure: Closure, params: list[Tensor]) -> Tensor:
        """One m-(A)RWP step with the clean and the perturbed gradient on two halves of the ranks."""
        half, rank = distributed.world_size() // 2, distributed.rank()
        history = self.history()
        noise = filterwise_noise(params, self.sigma_at(self.steps), self.generator, history, self.eta)
        if rank < half:
            context = Pass(batch=1, sync=False, shard=(rank, half))
            loss = self._run(closure, context)
        else:
            self._perturb(params, noise)
            context = Pass(perturbed=True, batch=0, sync=False, shard=(rank - half, half))
            loss = self._run(closure, context, update_bn=False)
            self._restore(params)
        grads, share = self._take_grads(params), _share(context, half)
        mixed = torch._foreach_mul(grads, share * (self.perturbed_weight if rank >= half else 1.0 - self.perturbed_weight))
        if history is None:
            mixed = _reduce_sum(mixed)
        else:
            perturbed = torch._foreach_mul(grads, share if rank >= half else 0.0)
            reduced = _reduce_sum(mixed + perturbed)
            mixed, perturbed = reduced[:len(params)], reduced[len(params):]
            self._update_history(history, perturbed)
        for p, g in zip(params, mixed):
            p.grad = g
        return loss


# ----------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class OptimizerInfo:
    """A registry entry: the class, a description and the defaults ``create`` applies."""

    name: str
    description: str
    factory: Callable[..., torch.optim.Optimizer]
    defaults: dict = field(default_factory=dict)

    def accepts(self, option: str) -> bool:
        """Whether ``create(name, ...)`` understands the keyword ``option`` (beyond base-optimizer ones)."""
        if issubclass(self.factory, PerturbedOptimizer):
            classes = [c for c in self.factory.__mro__ if issubclass(c, PerturbedOptimizer)]
            return any(option in inspect.signature(c.__init__).parameters for c in classes)
        return option in inspect.signature(self.factory.__init__).parameters


def _canonical(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


OPTIMIZERS: Registry[OptimizerInfo] = Registry("optimizer", canonical=_canonical, error=ValueError)


def _register(name: str, description: str, factory: Callable[..., torch.optim.Optimizer], **defaults) -> None:
    OPTIMIZERS.register(name, OptimizerInfo(name, description, factory, defaults))


def list_optimizers(pattern: str | None = None) -> list[OptimizerInfo]:
    """Registered optimizers whose name matches the glob ``pattern`` (hyphens ignored; all if None)."""
    return OPTIMIZERS.list(pattern)


def create(name: str, params, **hparams) -> torch.optim.Optimizer:
    """Build the registered optimizer ``name`` (case, hyphens and underscores ignored) over ``params``.

    Precedence: the base optimizer's registry defaults (for ``base="sgd"``/``"adamw"``), then the
    method's paper defaults, then ``hparams``. Wrappers take ``base=``, ``model=``, ``seed=``, ...
    (see :class:`PerturbedOptimizer`); everything else goes to the base optimizer.
    """
    info = OPTIMIZERS.get(name)
    options = {**info.defaults, **hparams}
    if issubclass(info.factory, PerturbedOptimizer):
        base = options.setdefault("base", "sgd")
        if isinstance(base, str) and _canonical(base) in ("sgd", "adamw"):
            options = {**OPTIMIZERS.get(base).defaults, **options}
        return info.factory(params, **options)
    try:
        return info.factory(params, **options)
    except TypeError as error:
        raise ValueError(f"invalid arguments for {info.name}: {error}") from None


_register("sgd", "SGD with momentum (torch.optim.SGD); also the default base of every method", torch.optim.SGD,
          lr=0.1, momentum=0.9, weight_decay=5e-4)
_register("adamw", "AdamW (torch.optim.AdamW); base=adamw for any method", torch.optim.AdamW,
          lr=3e-3, weight_decay=0.01)
_SCOPE = "; torchrun: ascent_scope=rank|global|group:K (whose gradient each rank ascends by)"
_register("sam", "SAM, p-norm ascent (Foret et al. 2021); 2 passes" + _SCOPE, SAM, rho=0.05, p=2.0,
          ascent_scope="rank")
_register("asam", "ASAM, SAM with T_w = |w| + eta on weights (Kwon et al. 2021); 2 passes" + _SCOPE, SAM,
          rho=0.5, adaptive=True, eta=0.01, ascent_scope="rank")
_register("rsam", "R-SAM, random start + projected ascent (Liu et al. 2022); 2 passes" + _SCOPE, RSAM,
          rho=0.05, gamma=0.01, grad_weight=1.0, ascent_scope="rank")
_register("rwp", "RWP, filter-wise random perturbation (Li et al.); 1 pass. sigma: the paper's cosine rise "
          "0.001 -> 0.01 (authors' script: 0.001 -> 0.011)", RWP,
          sigma=0.01, sigma_schedule="cosine")
_register("arwp", "ARWP, RWP with gradient-history-adapted noise (Li et al.); 1 pass. sigma: the paper's cosine "
          "rise 0.001 -> 0.01 (authors' script: 0.001 -> 0.011); noise variance / sqrt(1 + eta F) (paper; "
          "authors' code: the std); F per filter, a bias one filter (authors' code: per bias entry)", RWP,
          sigma=0.01, sigma_schedule="cosine", adaptive=True, eta=0.1, beta=0.99)
_PARALLEL = ("; torchrun: parallel=true runs the two gradients on two halves of an even number of ranks "
             "(one gradient of wall time)")
_register("mrwp", "m-RWP, m*grad(w+eps; B1) + (1-m)*grad(w; B2), m = perturbed_weight (Li et al.); 2 passes. "
          "sigma: the paper's cosine rise 0.0015 -> 0.015 (authors' script: constant 0.015)" + _PARALLEL, RWP,
          sigma=0.015, sigma_schedule="cosine", perturbed_weight=0.5, parallel=False)
_register("marwp", "m-ARWP, m-RWP with ARWP noise (Li et al.); 2 passes. sigma: the paper's cosine rise "
          "0.0015 -> 0.015 (authors' script: constant 0.015); noise as arwp" + _PARALLEL, RWP,
          sigma=0.015, sigma_schedule="cosine", perturbed_weight=0.5, adaptive=True, eta=0.1, beta=0.99,
          parallel=False)
_register("ssamf", "SSAM-F, SAM on a Fisher top-k mask (Mi et al. 2022); 2 passes" + _SCOPE, SSAMF,
          rho=0.1, sparsity=0.5, refresh=1000, num_samples=1024, ascent_scope="rank")
_register("ssamd", "SSAM-D, SAM on a dynamic drop/regrow mask (Mi et al. 2022); 2 passes" + _SCOPE, SSAMD,
          rho=0.1, sparsity=0.5, refresh=1000, drop_rate=0.5, ascent_scope="rank")
