"""Optimizers against float64 references written here from the formulas in PAPERS.md.

The references use torch.func.grad on a functional loss, plain loops for filter norms and
per-sample Fisher, and a hand-written SGD-with-momentum update; the noise is reproduced by
replaying the documented generator draw (one flat ``randn`` over all parameters, in order).
"""

from __future__ import annotations

import copy
import io
import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close
from torch import nn
from torch.func import functional_call, grad

from landscape import optimizers as O

LR, MOMENTUM, WD, SEED = 0.1, 0.9, 1e-3, 7
BASE = {"lr": LR, "momentum": MOMENTUM, "weight_decay": WD}
F64 = torch.float64


# -- helpers ----------------------------------------------------------------------------------

def tiny_net(bn: bool = False, dtype=F64, seed: int = 0) -> nn.Module:
    """Conv (4-D weight: 3 filters) -> [BN] -> tanh -> linear; inputs (N, 1, 6, 6), 4 classes."""
    torch.manual_seed(seed)
    layers = [nn.Conv2d(1, 3, 3), *([nn.BatchNorm2d(3)] if bn else []), nn.Tanh(), nn.Flatten(), nn.Linear(48, 4)]
    return nn.Sequential(*layers).to(dtype)


def batch(seed: int, n: int = 16, dtype=F64) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 6, 6, generator=generator, dtype=dtype), torch.randint(0, 4, (n,), generator=generator)


def functional_loss(model: nn.Module):
    """Mean cross-entropy of ``model`` (train mode: BatchNorm on batch statistics) at given weights."""
    copy_ = copy.deepcopy(model).train()
    for module in copy_.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.track_running_stats = False       # batch statistics without touching buffers

    def loss(params, x, y):
        return F.cross_entropy(functional_call(copy_, params, (x,)), y)
    return loss


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def row_norms(t: torch.Tensor) -> torch.Tensor:
    """||w_j|| per filter (row along dim 0) by a loop, shaped to broadcast; whole norm for ndim < 2."""
    if t.ndim < 2:
        return t.norm()
    return torch.stack([row.norm() for row in t]).view(-1, *([1] * (t.ndim - 1)))


def replay_noise(shapes: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The documented draw: one flat randn over all entries, split into the tensors in order."""
    flat = torch.randn(sum(v.numel() for v in shapes.values()), generator=generator, dtype=F64)
    return {n: z.view_as(v) for (n, v), z in zip(shapes.items(), flat.split([v.numel() for v in shapes.values()]))}


def global_norm(d: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.sqrt(sum((v ** 2).sum() for v in d.values()))


def add(a, b, scale=1.0):
    return {n: a[n] + scale * b[n] for n in a}


class ReferenceSGD:
    """torch.optim.SGD with momentum and coupled weight decay, written out."""

    def __init__(self):
        self.buffer = None

    def __call__(self, w, g):
        d = {n: g[n] + WD * w[n] for n in w}
        self.buffer = d if self.buffer is None else {n: MOMENTUM * self.buffer[n] + d[n] for n in w}
        return {n: w[n] - LR * self.buffer[n] for n in w}


def closure_for(model, opt, x, y):
    """A step's closure on the fixed batch ``(x, y)``."""
    return pass_closure(model, opt, lambda ctx: (x, y))


def pass_closure(model, opt, rows):
    """A step's closure: zero the gradients, backward the cross-entropy on ``rows(ctx)``, the ``(x, y)``
    that the :class:`~landscape.optimizers.Pass` ``ctx`` asks for (None for plain torch optimizers)."""
    def closure(ctx=None):
        x, y = rows(ctx)
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss
    return closure


def assert_params(model, expected: dict, rtol=1e-7, atol=1e-10, what=""):
    for name, p in model.named_parameters():
        assert_close(p, expected[name], rtol, f"{what} {name}", atol=atol)


def run_against_reference(opt_name, direction, steps, bn=False, rows=None, **hparams):
    """Step the optimizer and the reference (``direction(w, step) -> final gradient``) together, the
    closure on ``rows(ctx) -> (x, y)`` (default: ``batch(1)`` for every pass)."""
    model = tiny_net(bn)
    opt = O.create(opt_name, model.parameters(), seed=SEED, **BASE, **hparams)
    x, y = batch(1)
    closure = pass_closure(model, opt, rows or (lambda ctx: (x, y)))
    reference, w = ReferenceSGD(), weights(model)
    for step in range(steps):
        opt.step(closure)
        w = reference(w, direction(w, step))
        assert_params(model, w, what=f"{opt_name} step {step + 1}:")
    return opt, w


# -- pure rules -------------------------------------------------------------------------------

@pytest.mark.parametrize("p", [1.5, 2.0, 3.0, math.inf])
def test_sam_perturbation_is_the_dual_norm_maximiser(p):
    generator = torch.Generator().manual_seed(0)
    grads = [torch.randn(3, 4, generator=generator, dtype=F64), torch.randn(5, generator=generator, dtype=F64)]
    eps = O.sam_perturbation(grads, rho=0.3, p=p)
    flat_g, flat_e = torch.cat([g.flatten() for g in grads]), torch.cat([e.flatten() for e in eps])
    q = 1.0 if math.isinf(p) else p / (p - 1)
    assert_close(torch.linalg.vector_norm(flat_e, p), 0.3, 1e-5, "||eps||_p", atol=1e-8)
    # Hölder equality: <eps, g> = rho ||g||_q, which only the maximiser attains
    assert_close(flat_e @ flat_g, 0.3 * torch.linalg.vector_norm(flat_g, q), 1e-5, "<eps, g> = rho ||g||_q", atol=1e-8)
    if not math.isinf(p):
        expected = 0.3 * flat_g.sign() * flat_g.abs() ** (q - 1) / (flat_g.abs() ** q).sum() ** ((q - 1) / q)
        assert_close(flat_e, expected, 1e-10, "eps", atol=1e-8)


def test_sam_perturbation_p1_puts_rho_on_the_largest_entry_and_zero_gradient_gives_zero():
    grads = [torch.tensor([0.5, -3.0, 1.0], dtype=F64), torch.tensor([[2.0]], dtype=F64)]
    eps = O.sam_perturbation(grads, rho=0.2, p=1.0)
    assert torch.equal(eps[0], torch.tensor([0.0, -0.2, 0.0], dtype=F64))
    assert torch.equal(eps[1], torch.zeros(1, 1, dtype=F64))
    zeros = O.sam_perturbation([torch.zeros(3, dtype=F64)], rho=0.2)
    assert torch.equal(zeros[0], torch.zeros(3, dtype=F64))


def test_rsam_noise_differs_per_tensor_and_matches_the_kernelwise_formula():
    w = torch.randn(4, 2, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    noise = O.rsam_noise([w, w.clone()], gamma=0.2, generator=torch.Generator().manual_seed(3))
    assert not torch.equal(noise[0], noise[1])                      # never one shared key
    z = replay_noise({"a": w, "b": w}, torch.Generator().manual_seed(3))
    for n, key in zip(noise, "ab"):
        assert_close(n, 0.2 * row_norms(w).sqrt() * z[key], 1e-5, key, atol=1e-8)     # variance gamma^2 ||w_j||


def test_filterwise_noise_with_history_matches_formula():
    generator = torch.Generator().manual_seed(0)
    ws = [torch.randn(5, 3, generator=generator, dtype=F64), torch.randn(5, generator=generator, dtype=F64)]
    history = [torch.rand(5, 1, generator=generator, dtype=F64), torch.rand((), generator=generator, dtype=F64)]
    noise = O.filterwise_noise(ws, 0.05, torch.Generator().manual_seed(1), history, eta=0.3)
    z = replay_noise({"a": ws[0], "b": ws[1]}, torch.Generator().manual_seed(1))
    for n, w, h, key in zip(noise, ws, history, "ab"):
        variance = 0.05 ** 2 * row_norms(w) ** 2 / torch.sqrt(1 + 0.3 * h)
        assert_close(n, variance.sqrt() * z[key], 1e-5, key, atol=1e-8)


def test_batched_filter_square_sums_equal_filter_norms():
    from landscape.params import filter_norms, filter_square_sums, per_filter
    generator = torch.Generator().manual_seed(0)
    tensors = [torch.randn(shape, generator=generator, dtype=F64) for shape in [(4, 3, 2, 2), (5,), (), (3, 7)]]
    tensors.append(torch.randn(6, 2, 3, 3, generator=generator, dtype=F64).to(memory_format=torch.channels_last))
    expected = torch.cat([filter_norms(t).square().reshape(-1) for t in tensors])
    assert_close(filter_square_sums(tensors), expected, 1e-12, "filter square sums", atol=1e-8)
    for part, t in zip(per_filter(expected, tensors), tensors):
        assert part.shape == filter_norms(t).shape


def test_fisher_mask_and_dynamic_update_match_brute_force():
    generator = torch.Generator().manual_seed(0)
    fisher = [torch.rand(4, 5, generator=generator, dtype=F64), torch.rand(7, generator=generator, dtype=F64)]
    mask = O.fisher_mask(fisher, sparsity=0.6)
    flat = torch.cat([f.flatten() for f in fisher])
    keep = set(sorted(range(27), key=lambda i: -flat[i].item())[:int(0.4 * 27)])
    assert set(torch.cat([m.flatten() for m in mask]).nonzero().flatten().tolist()) == keep

    grads = [torch.randn(4, 5, generator=generator, dtype=F64), torch.randn(7, generator=generator, dtype=F64)]
    new = O.dynamic_mask_update(mask, grads, num_drop=3, generator=torch.Generator().manual_seed(5))
    flat_g = torch.cat([g.flatten() for g in grads]).abs()
    scores = torch.rand(27, generator=torch.Generator().manual_seed(5))
    dropped = set(sorted(keep, key=lambda i: flat_g[i].item())[:3])
    grown = set(sorted(set(range(27)) - keep, key=lambda i: -scores[i].item())[:3])
    assert set(torch.cat([m.flatten() for m in new]).nonzero().flatten().tolist()) == (keep - dropped) | grown
    assert O.drop_count(25, 100, 0.5, 0.5, 1000) == int(0.5 / 2 * (1 + math.cos(math.pi / 4)) * 500)


# the cosine factor (1 + cos(pi t/T)) / 2 where it is rational, for the exact ground truth below
EXACT_DECAY = {Fraction(0): Fraction(1), Fraction(1, 3): Fraction(3, 4), Fraction(1, 2): Fraction(1, 2),
               Fraction(2, 3): Fraction(1, 4), Fraction(1): Fraction(0)}
DECIMALS = ("0", "0.1", "0.25", "0.3", "0.5", "0.7", "0.9", "0.95", "0.99", "0.999", "0.3333333", "0.6666667",
            "0.1428571", "0.12345678", "0.9999999")


def test_drop_count_is_the_exact_floor_of_the_decay_schedule():
    assert O.drop_count(5, 10, 0.9, 0.5, 1000) == 25          # was 24: int() of 24.999999999999996
    assert O.drop_count(0, 10, 0.9, 1.0, 1000) == 100         # all of the 100 perturbed entries, not 99
    for total in (6, 12, 300, 6000):           # multiples of 6: t = T, 2T/3, T/2, T/3, 0 exactly
        for progress, decay in EXACT_DECAY.items():
            step = int(progress * total)
            for sparsity in DECIMALS[:10]:
                for alpha in ("0.1", "0.3", "0.5", "0.7", "0.9", "1"):
                    for d in (1, 7, 10, 100, 1000, 12345, 10**6, 11_689_512):
                        exact = Fraction(alpha) * decay * (1 - Fraction(sparsity)) * d
                        assert O.drop_count(step, total, float(sparsity), float(alpha), d) == math.floor(exact), \
                            (step, total, sparsity, alpha, d)
    assert O.drop_count(50, 10, 0.5, 0.5, 1000) == 0          # t past T: the schedule has ended


def test_kept_count_is_the_exact_floor_of_the_dense_fraction():
    assert O.kept_count(10, 0.9) == 1 and O.kept_count(90, 0.3) == 63     # the reference's int() gives 0, 62
    assert O.kept_count(3, 0.6666667) == 0                                # 0.9999999, not rounded up
    for sparsity in DECIMALS:
        for d in [*range(1, 1001), 10**6 + 7, 11_689_512, 10**9]:
            assert O.kept_count(d, float(sparsity)) == math.floor((1 - Fraction(sparsity)) * d), (d, sparsity)


# -- one and several steps against the references ---------------------------------------------

@pytest.mark.parametrize("p", [2.0, 3.0])
def test_sam_steps_match_reference(p):
    model = tiny_net()
    loss, (x, y) = functional_loss(model), batch(1)
    q = p / (p - 1)

    def direction(w, step):
        g = grad(loss)(w, x, y)
        dual = sum((v.abs() ** q).sum() for v in g.values()) ** ((q - 1) / q)
        eps = {n: 0.05 * v.sign() * v.abs() ** (q - 1) / dual for n, v in g.items()}
        return grad(loss)(add(w, eps), x, y)
    run_against_reference("sam", direction, steps=3, p=p)


def test_asam_steps_match_reference():
    loss, (x, y) = functional_loss(tiny_net()), batch(1)

    def direction(w, step):
        g = grad(loss)(w, x, y)
        scale = {n: (v.abs() + 0.01 if v.ndim >= 2 else torch.ones_like(v)) for n, v in w.items()}
        norm = global_norm({n: scale[n] * g[n] for n in g})
        return grad(loss)(add(w, {n: 0.5 * scale[n] ** 2 * g[n] / norm for n in g}), x, y)
    run_against_reference("asam", direction, steps=3)


def test_sam_with_weight_decay_in_the_ascent_matches_reference():
    loss, (x, y) = functional_loss(tiny_net()), batch(1)

    def direction(w, step):
        g = add(grad(loss)(w, x, y), w, WD)
        return grad(loss)(add(w, g, 0.05 / global_norm(g)), x, y)
    run_against_reference("sam", direction, steps=2, ascent_weight_decay=True)


def test_rsam_steps_match_reference():
    loss, (x, y), replay = functional_loss(tiny_net()), batch(1), torch.Generator().manual_seed(SEED)

    def direction(w, step):
        z = replay_noise(w, replay)
        delta0 = {n: 0.02 * row_norms(v).sqrt() * z[n] for n, v in w.items()}
        v = add(delta0, grad(loss)(add(w, delta0), x, y), 0.5)
        return grad(loss)(add(w, v, 0.05 / global_norm(v)), x, y)
    run_against_reference("rsam", direction, steps=3, gamma=0.02, grad_weight=0.5)


@pytest.mark.parametrize("adaptive", [False, True])
def test_rwp_and_arwp_steps_match_reference(adaptive):
    loss, (x, y), replay = functional_loss(tiny_net()), batch(1), torch.Generator().manual_seed(SEED)
    total, sigma, start = 4, 0.05, 0.005
    history = {n: torch.zeros(()) for n, _ in tiny_net().named_parameters()}

    def direction(w, step):
        sigma_t = start + (sigma - start) * (1 - math.cos(math.pi * step / total)) / 2
        z = replay_noise(w, replay)
        eps = {n: sigma_t * row_norms(v) / (1 + 0.3 * history[n]) ** 0.25 * z[n] for n, v in w.items()}
        g = grad(loss)(add(w, eps), x, y)
        if adaptive:
            for n, v in g.items():
                history[n] = 0.9 * history[n] + (v.square().flatten(1).sum(1).view_as(row_norms(v))
                                                 if v.ndim >= 2 else v.square().sum())
        return g
    opt, _ = run_against_reference("arwp" if adaptive else "rwp", direction, steps=total, sigma=sigma,
                                   sigma_start=start, total_steps=total, eta=0.3, beta=0.9)
    if adaptive:
        for h, (name, _) in zip(opt.history(), tiny_net().named_parameters()):
            assert_close(h, history[name].expand_as(h), 1e-9, name, atol=1e-8)


@pytest.mark.parametrize("name", ["mrwp", "marwp"])
def test_mrwp_with_two_batches_matches_reference(name):
    loss, (x1, y1), (x2, y2) = functional_loss(tiny_net()), batch(1), batch(2)
    replay, history = torch.Generator().manual_seed(SEED), {n: torch.zeros(()) for n in weights(tiny_net())}

    def direction(w, step):
        z = replay_noise(w, replay)
        eps = {n: 0.05 * row_norms(v) / (1 + 0.1 * history[n]) ** 0.25 * z[n] for n, v in w.items()}
        g1, g2 = grad(loss)(add(w, eps), x1, y1), grad(loss)(w, x2, y2)
        if name == "marwp":
            for n, v in g1.items():
                history[n] = 0.99 * history[n] + (v.square().flatten(1).sum(1).view_as(row_norms(v))
                                                  if v.ndim >= 2 else v.square().sum())
        return {n: 0.3 * g1[n] + 0.7 * g2[n] for n in w}
    run_against_reference(name, direction, steps=3, rows=lambda ctx: (x1, y1) if ctx.batch == 0 else (x2, y2),
                          sigma=0.05, sigma_schedule="constant", perturbed_weight=0.3)


def brute_force_fisher(model, w, x, y) -> dict[str, torch.Tensor]:
    """Empirical Fisher diagonal by one autograd call per example, model in eval mode."""
    total = {n: torch.zeros_like(v) for n, v in w.items()}
    model.eval()
    for i in range(len(x)):
        params = {n: v.clone().requires_grad_(True) for n, v in w.items()}
        sample = F.cross_entropy(functional_call(model, params, (x[i:i + 1],)), y[i:i + 1])
        for n, g in zip(params, torch.autograd.grad(sample, list(params.values()))):
            total[n] += g ** 2
    model.train()
    return {n: v / len(x) for n, v in total.items()}


def top_mask(scores: dict[str, torch.Tensor], keep: int) -> dict[str, torch.Tensor]:
    flat = torch.cat([v.flatten() for v in scores.values()])
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    chosen[sorted(range(flat.numel()), key=lambda i: -flat[i].item())[:keep]] = True
    out, offset = {}, 0
    for n, v in scores.items():
        out[n] = chosen[offset:offset + v.numel()].view_as(v)
        offset += v.numel()
    return out


def test_ssamf_mask_is_the_brute_force_fisher_top_k_and_steps_match():
    model = tiny_net(bn=True)
    pool_x, pool_y = batch(5, n=40)
    x, y = batch(1)
    loss, replay = functional_loss(model), torch.Generator().manual_seed(SEED)
    d = sum(p.numel() for p in model.parameters())
    opt = O.create("ssamf", model.parameters(), model=model, fisher_data=(pool_x, pool_y), num_samples=24,
                   fisher_chunk=10, refresh=2, sparsity=0.7, seed=SEED, **BASE)
    reference, w, mask = ReferenceSGD(), weights(model), None
    for step in range(3):
        if step % 2 == 0:   # the mask is refreshed after the pass at w, which updated the BN statistics
            with torch.no_grad():
                at_w = copy.deepcopy(model)
                at_w(x)
            chosen = torch.randperm(40, generator=replay)[:24]
            mask = top_mask(brute_force_fisher(at_w, w, pool_x[chosen], pool_y[chosen]), math.floor(0.3 * d))
        opt.step(closure_for(model, opt, x, y))
        for (n, _), m in zip(model.named_parameters(), opt.masks()):
            assert torch.equal(m, mask[n]), f"step {step}: mask of {n} differs from the brute-force Fisher top-k"
        g = grad(loss)(w, x, y)
        eps = {n: 0.1 * g[n] / global_norm(g) * mask[n] for n in g}
        w = reference(w, grad(loss)(add(w, eps), x, y))
        assert_params(model, w, what=f"ssamf step {step + 1}:")


def test_ssamd_steps_match_reference():
    model = tiny_net()
    loss, (x, y), replay = functional_loss(model), batch(1), torch.Generator().manual_seed(SEED)
    names = list(weights(model))
    d = sum(p.numel() for p in model.parameters())
    keep, total = math.floor(0.5 * d), 6
    opt = O.create("ssamd", model.parameters(), refresh=2, total_steps=total, seed=SEED, **BASE)
    reference, w, flat_mask = ReferenceSGD(), weights(model), None
    for step in range(4):
        g = grad(loss)(w, x, y)
        flat_g = torch.cat([v.flatten() for v in g.values()]).abs()
        if step == 0:
            scores = torch.rand(d, generator=replay)
            flat_mask = set(sorted(range(d), key=lambda i: -scores[i].item())[:keep])
        elif step % 2 == 0:                          # step 2 of 6: cos(pi / 3) = 1/2 exactly
            drop = math.floor(Fraction(1, 2) / 2 * (1 + Fraction(1, 2)) * Fraction(1, 2) * d)
            scores = torch.rand(d, generator=replay)
            dropped = set(sorted(flat_mask, key=lambda i: flat_g[i].item())[:drop])
            grown = set(sorted(set(range(d)) - flat_mask, key=lambda i: -scores[i].item())[:drop])
            flat_mask = (flat_mask - dropped) | grown
        chosen = torch.zeros(d, dtype=F64)
        chosen[sorted(flat_mask)] = 1.0
        mask = dict(zip(names, torch.split(chosen, [v.numel() for v in w.values()])))
        eps = {n: 0.1 * g[n] / global_norm(g) * mask[n].view_as(g[n]) for n in g}
        opt.step(closure_for(model, opt, x, y))
        w = reference(w, grad(loss)(add(w, eps), x, y))
        assert_params(model, w, what=f"ssamd step {step + 1}:")
        assert sum(int(m.sum()) for m in opt.masks()) == keep


def test_sparse_norm_option_masked_has_radius_rho():
    grads = [torch.randn(6, 2, generator=torch.Generator().manual_seed(0), dtype=F64)]
    model = nn.Linear(2, 6).double()
    opt = O.SSAMD([model.weight], total_steps=5, sparsity=0.5, mask_norm="masked", rho=0.3, lr=0.1)
    opt.state[model.weight]["mask"] = torch.rand(6, 2, generator=torch.Generator().manual_seed(1)) > 0.5
    opt._refreshed_at = 0
    eps = opt._ascent([model.weight], grads)
    assert_close(eps[0].norm(), 0.3, 1e-5, "||eps||", atol=1e-8)
    assert torch.equal(eps[0] != 0, opt.masks()[0])


def test_m_sharpness_averages_per_chunk_perturbed_gradients():
    loss, (x, y) = functional_loss(tiny_net()), batch(1)

    def direction(w, step):
        final = {n: torch.zeros_like(v) for n, v in w.items()}
        for start in range(0, 16, 5):                                    # chunks of 5, 5, 5, 1
            xc, yc = x[start:start + 5], y[start:start + 5]
            g = grad(loss)(w, xc, yc)
            gp = grad(loss)(add(w, g, 0.05 / global_norm(g)), xc, yc)
            final = add(final, gp, len(xc) / 16)
        return final
    run_against_reference("sam", direction, steps=2, rows=lambda ctx: ctx.select(x, y), m=5)


def test_clipping_applies_to_the_final_gradient():
    loss, (x, y) = functional_loss(tiny_net()), batch(1)

    def direction(w, step):
        g = grad(loss)(w, x, y)
        final = grad(loss)(add(w, g, 0.05 / global_norm(g)), x, y)
        return {n: v * min(1.0, 0.01 / (global_norm(final).item() + 1e-6)) for n, v in final.items()}
    run_against_reference("sam", direction, steps=2, max_grad_norm=0.01)


def test_gradient_accumulation_inside_the_closure_equals_the_full_batch():
    x, y = batch(1)
    results = []
    for parts in (1, 2):
        model = tiny_net()
        opt = O.create("sam", model.parameters(), seed=SEED, **BASE)

        def closure(ctx=None):
            opt.zero_grad()
            total = 0.0
            for xs, ys in zip(x.chunk(parts), y.chunk(parts)):
                part = F.cross_entropy(model(xs), ys) * len(xs) / len(x)
                part.backward()
                total += part.detach()
            return total
        for _ in range(2):
            opt.step(closure)
        results.append(weights(model))
    for n in results[0]:
        assert_close(results[0][n], results[1][n], 1e-10, n, atol=1e-12)


# -- shared correctness -----------------------------------------------------------------------

ALL = [info.name for info in O.list_optimizers()]


def make(name: str, model: nn.Module, seed: int, data, **extra):
    """The optimizer ``name`` with the wiring it accepts (model, schedule length, Fisher data, ...)."""
    info = O.list_optimizers(name)[0]
    options = {"model": model, "total_steps": 6, "fisher_data": data, "seed": seed, "refresh": 2, "num_samples": 8}
    options = {k: v for k, v in options.items() if info.accepts(k)}
    return O.create(name, model.parameters(), **options, **extra)


@pytest.mark.parametrize("name", ALL)
def test_resume_is_bit_identical(name):
    data = batch(9, n=32, dtype=torch.float32)

    def run(model, opt, steps):
        for step in steps:
            x, y = batch(100 + step, dtype=torch.float32)
            x2, y2 = batch(200 + step, dtype=torch.float32)

            def closure(ctx=None):
                xb, yb = (x2, y2) if ctx is not None and ctx.batch == 1 else (x, y)
                opt.zero_grad()
                loss = F.cross_entropy(model(xb), yb)
                loss.backward()
                return loss
            opt.step(closure)

    straight = tiny_net(bn=True, dtype=torch.float32)
    opt = make(name, straight, SEED, data)
    run(straight, opt, range(6))

    first = tiny_net(bn=True, dtype=torch.float32)
    opt = make(name, first, SEED, data)
    run(first, opt, range(3))
    saved = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": opt.state_dict()}, saved)
    saved.seek(0)
    state = torch.load(saved, weights_only=True)
    resumed = tiny_net(bn=True, dtype=torch.float32, seed=123)
    resumed.load_state_dict(state["model"])
    opt = make(name, resumed, 999, data)
    opt.load_state_dict(state["optimizer"])
    run(resumed, opt, range(3, 6))
    for (n, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), f"{name}: {n} differs after resume (max |diff| {(a - b).abs().max()})"


@pytest.mark.parametrize("name", [n for n in ALL if n not in ("sgd", "adamw")])
def test_weights_are_restored_exactly(name):
    """With lr = 0 the base step changes nothing, so any drift would come from the restore."""
    model = tiny_net(bn=True, dtype=torch.float32)
    before = weights(model)
    data = batch(9, n=32, dtype=torch.float32)
    opt = make(name, model, SEED, data)
    for group in opt.param_groups:
        group["lr"] = 0.0
    x, y = batch(1, dtype=torch.float32)
    for _ in range(3):
        opt.step(closure_for(model, opt, x, y))
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]), f"{name}: {n} not restored exactly"


def test_batchnorm_statistics_after_a_sam_step_equal_one_plain_forward():
    model = tiny_net(bn=True)
    plain = copy.deepcopy(model)
    x, y = batch(1)
    opt = O.create("sam", model.parameters(), model=model, **BASE)
    opt.step(closure_for(model, opt, x, y))
    plain(x)
    for (n, a), b in zip(model.named_buffers(), plain.buffers()):
        assert torch.equal(a, b), f"BN buffer {n} differs from one plain forward at w"
    papers = tiny_net(bn=True)
    opt = O.create("sam", papers.parameters(), model=papers, bn_stats="every", **BASE)
    opt.step(closure_for(papers, opt, x, y))
    assert int(papers[1].num_batches_tracked) == 2


@pytest.mark.parametrize("name", ["sam", "rsam", "arwp"])
def test_grad_scaler_gives_the_unscaled_step(name):
    x, y = batch(1, dtype=torch.float32)
    results = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)):
        model = tiny_net(dtype=torch.float32)
        opt = make(name, model, SEED, None, grad_scaler=scaler, **BASE)

        def closure(ctx=None):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            (scaler.scale(loss) if scaler else loss).backward()
            return loss
        for _ in range(2):
            opt.step(closure)
        results.append(weights(model))
    for n in results[0]:
        assert_close(results[0][n], results[1][n], 1e-5, n, atol=1e-7)


def test_grad_scaler_skips_and_restores_on_inf():
    model = tiny_net(dtype=torch.float32)
    x, y = batch(1, dtype=torch.float32)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    opt = O.create("sam", model.parameters(), grad_scaler=scaler, **BASE)
    before = weights(model)

    def closure(ctx=None):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y) * (math.inf if ctx is not None and ctx.perturbed else 1.0)
        scaler.scale(loss).backward()
        return loss
    opt.step(closure)
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]), f"{n} changed on a skipped step"
    assert scaler.get_scale() == 2.0 ** 7 and len(opt.base.state) == 0


def test_bf16_autocast_on_cpu_follows_the_float32_step():
    x, y = batch(1, dtype=torch.float32)
    updates = []
    for autocast in (False, True):
        model = tiny_net(bn=True, dtype=torch.float32)
        start = weights(model)
        opt = O.create("sam", model.parameters(), model=model, **BASE)

        def closure(ctx=None):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss
        opt.step(closure)
        updates.append(torch.cat([(p.detach() - start[n]).flatten() for n, p in model.named_parameters()]))
    assert torch.isfinite(updates[1]).all()
    assert F.cosine_similarity(updates[0], updates[1], dim=0) > 0.99


def test_mrwp_accepts_a_closure_without_arguments_and_sam_m_needs_select():
    model = tiny_net()
    x, y = batch(1)
    opt = O.create("mrwp", model.parameters(), total_steps=2)
    opt.step(closure_for(model, opt, x, y))
    sam = O.create("sam", model.parameters(), m=4)
    with pytest.raises(ValueError, match="Pass"):
        sam.step(lambda: F.cross_entropy(model(x), y))
    with pytest.raises(ValueError, match="select"):
        sam.step(lambda ctx: F.cross_entropy(model(x), y))
    with pytest.raises(ValueError, match="closure"):
        sam.step()


# -- registry and validation ------------------------------------------------------------------

def test_registry_names_aliases_and_base_optimizers():
    assert ALL == ["sgd", "adamw", "sam", "asam", "rsam", "rwp", "arwp", "mrwp", "marwp", "ssamf", "ssamd"]
    assert [info.name for info in O.list_optimizers("m-*rwp")] == ["mrwp", "marwp"]
    model = tiny_net()
    opt = O.create("M-RWP", model.parameters(), total_steps=3, base="adamw")
    assert isinstance(opt.base, torch.optim.AdamW) and opt.param_groups[0]["lr"] == 3e-3 and opt.perturbed_weight == 0.5
    assert isinstance(O.create("asam", model.parameters()).base, torch.optim.SGD)
    with pytest.raises(ValueError, match="unknown optimizer 'lion'; use one of sgd, adamw, sam, asam, rsam, rwp"):
        O.create("lion", model.parameters())


def test_optimizers_listing_says_which_sigma_and_history_choices_are_the_papers_and_the_authors_code():
    from clitools import invoke
    result = invoke("optimizers", "*rwp")
    assert result.exit_code == 0
    lines = {line.split()[0]: line for line in result.output.splitlines() if line and not line[0].isspace()}
    for name, start, end in (("rwp", 0.001, 0.01), ("arwp", 0.001, 0.01), ("mrwp", 0.0015, 0.015),
                             ("marwp", 0.0015, 0.015)):
        assert "paper's cosine rise" in lines[name] and "authors' script" in lines[name], lines[name]
        opt = O.create(name, tiny_net().parameters(), total_steps=10)   # the listed rise is what runs
        assert math.isclose(opt.sigma_at(0), start) and math.isclose(opt.sigma_at(10), end)
    assert "0.001 -> 0.011" in lines["rwp"]
    assert "constant 0.015" in lines["mrwp"] and "constant 0.015" in lines["marwp"]
    assert "per bias entry" in lines["arwp"]
    opt = O.create("arwp", [nn.Parameter(torch.ones(3, 2)), nn.Parameter(torch.ones(3))], total_steps=10)
    assert [h.numel() for h in opt.history()] == [3, 1]     # a bias is one filter: one history value


@pytest.mark.parametrize("name, options, word", [
    ("sam", {"rho": -0.1}, "rho"), ("sam", {"rho": "big"}, "rho"), ("sam", {"p": 0.5}, "p"),
    ("sam", {"m": 0}, "m"), ("sam", {"bn_stats": "sometimes"}, "bn_stats"),
    ("sam", {"max_grad_norm": 0}, "max_grad_norm"), ("sam", {"base": "nope"}, "base"),
    ("sam", {"nesterov_typo": True}, "SGD"), ("rsam", {"gamma": -1}, "gamma"),
    ("rwp", {}, "total_steps"), ("rwp", {"total_steps": 5, "sigma_schedule": "linear"}, "sigma_schedule"),
    ("mrwp", {"total_steps": 5, "perturbed_weight": 0.0}, "perturbed_weight"),
    ("rsam", {"lam": 0.5}, "lam= is now called grad_weight="),
    ("mrwp", {"total_steps": 5, "lam": 0.5}, "lam= is now called perturbed_weight="),
    ("arwp", {"total_steps": 5, "beta": 2}, "beta"),
    ("ssamd", {"total_steps": 5, "sparsity": 1.0}, "sparsity"), ("ssamd", {}, "total_steps"),
    ("ssamd", {"total_steps": 5, "drop_rate": 1.5}, "drop_rate"), ("ssamf", {}, "fisher_data"),
    ("ssamd", {"total_steps": 5, "refresh": 0}, "refresh"), ("sgd", {"betas": (0.9, 0.9)}, "sgd"),
])
def test_bad_hyperparameters_raise_value_errors(name, options, word):
    with pytest.raises(ValueError, match=word):
        O.create(name, tiny_net().parameters(), **options)


def test_ssamf_refuses_parameters_outside_the_model():
    model, other = tiny_net(), nn.Linear(2, 2).double()
    with pytest.raises(ValueError, match="not in the model"):
        O.create("ssamf", other.parameters(), model=model, fisher_data=batch(1))
