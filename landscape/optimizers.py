"""Sharpness-aware optimizers and the pure perturbation rules they use.

The rules (``sam_perturbation``, ``rsam_noise``, ``rsam_perturbation``, ``filterwise_noise``,
``fisher_mask``, ``dynamic_mask_update``) are pure functions on sequences of tensors; the
analyses reuse them so a diagnostic measures exactly what an optimizer does. Formulas follow
``shared/PAPERS.md``. A *filter* is a slice along dim 0 of a tensor with ndim >= 2; a tensor
with fewer dimensions is one filter (see :func:`landscape.params.filter_norms`).
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from landscape.params import filter_norms, global_norm, is_filtered

_TINY = 1e-12


# ----------------------------------------------------------------------------------------------
# Pure perturbation rules
# ----------------------------------------------------------------------------------------------

def _check_positive(name: str, value: float, allow_zero: bool = True) -> None:
    if not (value >= 0 if allow_zero else value > 0) or math.isnan(value):
        raise ValueError(f"invalid {name}: {value!r}; must be {'>= 0' if allow_zero else '> 0'}")


def asam_scale(weights: Sequence[Tensor], eta: float = 0.01) -> list[Tensor]:
    """ASAM's element-wise T_w = |w| + eta for weight tensors (ndim >= 2); 1 for biases and norms.

    Optimizer parameter lists carry no names, so "weight" means a tensor with ndim >= 2
    (conv/linear kernels). The ASAM reference code also scales BatchNorm weights; here
    biases and BatchNorm affine parameters (ndim < 2) are not rescaled.
    """
    return [w.abs() + eta if is_filtered(w) else torch.ones_like(w) for w in weights]


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
    _check_positive("rho", rho)
    if not p >= 1.0:
        raise ValueError(f"invalid p: {p!r}; the SAM ascent needs p >= 1 (p = 2 is the paper's)")
    grads = list(grads)
    if not adaptive:
        return torch._foreach_mul(_dual_direction(grads, p), rho)
    if weights is None:
        raise ValueError("adaptive=True (ASAM) needs weights; pass the parameters as weights=")
    _check_positive("eta", eta)
    scale = asam_scale(weights, eta)
    direction = _dual_direction(torch._foreach_mul(grads, scale), p)
    return torch._foreach_mul(torch._foreach_mul(direction, scale), rho)


def _standard_normal(weights: Sequence[Tensor], generator: torch.Generator) -> list[Tensor]:
    """One N(0, 1) draw per tensor, in order, with each tensor's shape and dtype, from ``generator``."""
    return [torch.randn(w.shape, generator=generator, device=generator.device, dtype=w.dtype).to(w.device)
            for w in weights]


def rsam_noise(weights: Sequence[Tensor], gamma: float, generator: torch.Generator) -> list[Tensor]:
    """R-SAM's kernel-wise start delta0 ~ N(0, gamma^2 diag(||w_j||)) (Liu et al., as in PAPERS.md).

    The variance of filter j is gamma^2 * ||w_j|| (std gamma * sqrt(||w_j||)), literally as the
    method sheet writes it. Each tensor gets its own draw from ``generator`` (in order), unlike
    the official JAX code, which reuses one key for every tensor.
    """
    _check_positive("gamma", gamma)
    noise = _standard_normal(weights, generator)
    return [z * (gamma * filter_norms(w).sqrt()) for z, w in zip(noise, weights)]


def rsam_perturbation(delta0: Sequence[Tensor], grads: Sequence[Tensor], rho: float,
                      lam: float) -> list[Tensor]:
    """R-SAM's projected ascent: rho (delta0 + lam g) / ||delta0 + lam g||, g = grad at w + delta0.

    Returns the total perturbation from w (w_adv = w + result), on the rho-sphere.
    """
    _check_positive("rho", rho)
    _check_positive("lam", lam)
    total = torch._foreach_add(list(delta0), list(grads), alpha=lam)
    return torch._foreach_mul(total, rho / global_norm(total, 2.0).clamp_min(_TINY))


def filterwise_noise(weights: Sequence[Tensor], sigma: float, generator: torch.Generator,
                     history: Sequence[Tensor] | None = None, eta: float = 0.1) -> list[Tensor]:
    """RWP/ARWP noise eps_j ~ N(0, sigma^2 ||w_j||^2 / sqrt(1 + eta F_j)) per filter j (Li et al.).

    Without ``history`` this is RWP's N(0, sigma^2 ||w_j||^2) (std sigma ||w_j||). With the ARWP
    history F (shaped like :func:`landscape.params.filter_norms`, see :func:`arwp_history_update`)
    the variance is divided by sqrt(1 + eta F_j), i.e. the std by (1 + eta F_j)^{1/4}. One draw
    per tensor from ``generator``, in order.
    """
    _check_positive("sigma", sigma)
    _check_positive("eta", eta)
    noise = _standard_normal(weights, generator)
    scales = [filter_norms(w) * sigma for w in weights]
    if history is not None:
        damp = torch._foreach_pow(torch._foreach_add(torch._foreach_mul(list(history), eta), 1.0), -0.25)
        scales = torch._foreach_mul(scales, damp)
    return torch._foreach_mul(noise, scales)


def arwp_history_update(history: Sequence[Tensor], grads: Sequence[Tensor], beta: float = 0.99) -> list[Tensor]:
    """ARWP's filter-wise history F <- beta F + ||g_j||^2 (an exponential moving *sum*: no (1 - beta))."""
    return torch._foreach_add(torch._foreach_mul(list(history), beta),
                              [filter_norms(g).square() for g in grads])


def fisher_mask(fisher: Sequence[Tensor], sparsity: float) -> list[Tensor]:
    """SSAM-F mask: True on the global top-k entries of the Fisher diagonal, k = round((1 - s) d).

    Ties at the threshold are broken by ``torch.topk`` order (flattened, in tensor order).
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"invalid sparsity: {sparsity!r}; must be in [0, 1)")
    flat = torch.cat([f.reshape(-1) for f in fisher])
    keep = flat.new_zeros(flat.shape, dtype=torch.bool)
    keep[torch.topk(flat, round((1.0 - sparsity) * flat.numel()), sorted=False).indices] = True
    return [m.view_as(f) for m, f in zip(torch.split(keep, [f.numel() for f in fisher]), fisher)]


def drop_count(step: int, total_steps: int, sparsity: float, drop_rate: float, numel: int) -> int:
    """SSAM-D's N_drop = f_decay(t) (1 - s) d with f_decay(t) = alpha/2 (1 + cos(pi t / T))."""
    progress = min(step / max(total_steps, 1), 1.0)
    return int(drop_rate / 2.0 * (1.0 + math.cos(math.pi * progress)) * (1.0 - sparsity) * numel)


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
        drop_score = torch.where(flat_mask, flat_grad.float(), torch.inf)
        grow_score = torch.where(flat_mask, -1.0, noise)
        new_mask[torch.topk(drop_score, num_drop, largest=False).indices] = False
        new_mask[torch.topk(grow_score, num_drop).indices] = True
    return [m.view_as(t) for m, t in zip(torch.split(new_mask, [t.numel() for t in mask]), mask)]


# ----------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class OptimizerInfo:
    """One registry entry: the factory and the defaults it applies (papers' settings, adapted)."""

    name: str
    description: str
    factory: Callable[..., torch.optim.Optimizer]
    defaults: dict = field(default_factory=dict)


_REGISTRY: dict[str, OptimizerInfo] = {}


def _register(name: str, description: str, factory: Callable[..., torch.optim.Optimizer], **defaults) -> None:
    _REGISTRY[name] = OptimizerInfo(name, description, factory, defaults)


def _canonical(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


def list_optimizers(pattern: str | None = None) -> list[OptimizerInfo]:
    """Registered optimizers whose name matches the glob ``pattern`` (all if None)."""
    return [info for name, info in _REGISTRY.items() if pattern is None or fnmatch.fnmatch(name, _canonical(pattern))]


def create(name: str, params, **hparams) -> torch.optim.Optimizer:
    """Build the registered optimizer ``name`` (hyphens/underscores ignored) over ``params``.

    ``hparams`` override the entry's defaults (see :func:`list_optimizers`).
    """
    key = _canonical(name)
    if key not in _REGISTRY:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(_REGISTRY)}")
    info = _REGISTRY[key]
    return info.factory(params, **{**info.defaults, **hparams})


_register("sgd", "SGD with momentum (torch.optim.SGD)", torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=5e-4)
_register("adamw", "AdamW (torch.optim.AdamW)", torch.optim.AdamW, lr=1e-3, weight_decay=0.01)
