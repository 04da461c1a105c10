"""Plain-PyTorch references: the executable spec of every fastmargin op.

Each function here computes the math of docs/design.md in the most readable way (materialising
whatever it needs). The fused kernels are tested against these values and gradients, and the
benchmarks time them as the "eager" and "torch.compile" baselines.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def cross_entropy_per_copy(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    dim: int = 1,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, k) matrix of l_bj = CE(z_bj, y_b) for logits with copies along ``dim``.

    l = lse(z) - (1 - eps) z_y - (eps / C) sum_c z_c, and 0 where y == ignore_index.
    With class weights w (``weight``) and/or a probability target p (floating ``target`` of
    shape (B, C), or one row per copy in the logits' layout), F.cross_entropy's
    l = sum_c w_c ((1 - eps) p_c + eps / C) (lse(z) - z_c), p = e_y for an index target.
    """
    x = logits.movedim(dim, 1)  # (B, k, C)
    B, k, C = x.shape
    if target.is_floating_point():
        t = target.movedim(dim, 1) if target.dim() == 3 else target[:, None, :].expand(B, k, C)
        rows = t.reshape(B * k, C)
    else:
        rows = target.repeat_interleave(k)
    per_row = F.cross_entropy(
        x.reshape(B * k, C),
        rows,
        weight=weight,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        reduction="none",
    )
    return per_row.view(B, k)


def _reduce(
    per_sample: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int,
    reduction: str,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """F.cross_entropy's reductions: 'mean' divides by the number of samples not ignored
    (class indices), by sum_b w_{y_b} over them (class weights; worst-of-k: the weight of each
    sample's class, whichever copy is the worst), or by B (probability targets)."""
    if reduction == "none":
        return per_sample
    total = per_sample.sum()
    if reduction == "sum":
        return total
    if target.is_floating_point():
        return total / per_sample.numel()
    counted = target != ignore_index
    if weight is None:
        return total / counted.sum()
    C = weight.shape[0]
    counted = counted & (target >= 0) & (target < C)  # out of range: NaN loss, weight 0
    w = torch.where(counted, weight[target.clamp(0, max(C - 1, 0))], 0.0)
    return total / w.sum()


def worst_of_k_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    dim: int | None = None,
    temperature: float = 0.0,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    return_index: bool = False,
    weight: torch.Tensor | None = None,
):
    """Worst-of-k cross-entropy.

    Without ``dim``: F.cross_entropy itself, on every shape it accepts (k = 1; the worst-copy
    index is 0 for every sample). A 3-D input with a (B,) class-index target is refused: it
    would be read as spatial, and is most likely k copies whose ``dim`` was forgotten.
    With ``dim`` (0 or 1), 3-D logits hold k copies along it, and
    L_b = max_j l_bj (temperature 0; ties to the lowest j, gradient into that copy only), or
    L_b = tau * log((1/k) sum_j exp(l_bj / tau)) for tau > 0; then F.cross_entropy's reduction
    (see :func:`_reduce` for class weights and probability targets).
    """
    options = dict(label_smoothing=label_smoothing, ignore_index=ignore_index, weight=weight)
    if dim is None:
        if logits.dim() == 3 and not target.is_floating_point() and target.dim() == 1:
            raise ValueError("target: a (B,) target with 3-D logits needs dim=0 or dim=1")
        loss = F.cross_entropy(logits, target, reduction=reduction, **options)
        samples = list(logits.shape)
        del samples[min(1, logits.dim() - 1)]  # the class dim: 0 for (C,), 1 otherwise
        index = torch.zeros(samples, dtype=torch.long, device=logits.device)
        return (loss, index) if return_index else loss
    if logits.dim() != 3:
        raise ValueError(f"logits: expected 3-D logits with copies along dim={dim}")
    ce = cross_entropy_per_copy(logits, target, dim=dim, **options)
    k = ce.shape[1]
    worst, index = ce.max(dim=1)
    if temperature > 0:
        worst = temperature * (torch.logsumexp(ce / temperature, dim=1) - math.log(k))
    loss = _reduce(worst, target, ignore_index, reduction, weight)
    return (loss, index) if return_index else loss


def multiclass_margin(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """m_n = z_{n,y_n} - max_{c != y_n} z_{n,c} for (N, C) logits (C >= 2), in the logits' dtype.

    The runner-up is the lowest index attaining the max (a NaN logit off the target counts as the
    max), so autograd gives +1 at y and -1 at that one class, as the fused op does.
    """
    N, C = logits.shape
    is_target = F.one_hot(target, C).bool()
    others = logits.detach().masked_fill(is_target, float("-inf"))
    best = others.max(dim=1, keepdim=True).values
    hit = (others == best) | others.isnan()
    hit &= ~is_target
    classes = torch.arange(C, device=logits.device).expand(N, C)
    runner_up = torch.where(hit, classes, C).min(dim=1).values
    z_y = logits.gather(1, target.unsqueeze(1)).squeeze(1)
    z_r = logits.gather(1, runner_up.unsqueeze(1)).squeeze(1)
    return z_y - z_r


def weight_robust_logits(
    logits: torch.Tensor, target: torch.Tensor, radius: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """z~ = z + r (1 - 2 onehot(y)): every off-target logit up by r, the target's down by r.

    Rows whose target is ``ignore_index`` are returned shifted up everywhere (their loss is
    ignored anyway). ``radius`` is a (N,) tensor.
    """
    C = logits.shape[1]
    valid = target != ignore_index
    onehot = F.one_hot(torch.where(valid, target, 0), C) * valid.unsqueeze(1)
    sign = 1 - 2 * onehot.to(radius.dtype)
    return logits + radius.unsqueeze(1) * sign


def weight_robust_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    radius,
    *,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """Worst-case CE over last-layer weight perturbations of radius r: F.cross_entropy(z~, y)."""
    if not isinstance(radius, torch.Tensor):
        radius = torch.full((logits.shape[0],), float(radius), device=logits.device)
    z_tilde = weight_robust_logits(logits, target, radius.to(logits.dtype), ignore_index)
    return F.cross_entropy(
        z_tilde,
        target,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        reduction=reduction,
    )


def weight_perturbation_radius(features: torch.Tensor, eps: float, p: float = 2.0) -> torch.Tensor:
    """r_n = eps * ||h_n||_q with 1/p + 1/q = 1, written out per case (h flattened per row)."""
    h = features.flatten(1).abs()
    if p == 1:
        norm = h.max(dim=1).values
    elif p == math.inf:
        norm = h.sum(dim=1)
    else:
        q = p / (p - 1)
        norm = h.pow(q).sum(dim=1).pow(1 / q)
    return eps * norm


def all_layer_perturb(u: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """All-layer perturbation (AMO): u' = u + ||u_b||_2 * delta.

    ||u_b||_2 is the norm of example b over every non-batch dim, not detached, computed in
    float32 (float64 for float64 u); the result has u's dtype. Where ||u_b|| = 0 the gradient
    of the norm is taken as 0 (PyTorch's own convention for vector_norm at 0).
    """
    acc = torch.float64 if u.dtype == torch.float64 else torch.float32
    B = u.shape[0]
    ua = u.to(acc)
    norm = torch.linalg.vector_norm(ua.reshape(B, -1), dim=1)
    scale = norm.reshape((B,) + (1,) * (u.dim() - 1))
    return (ua + scale * delta.to(acc)).to(u.dtype)


# --- soft targets and class weights ----------------------------------------------------------


def weight_noise_worst_of_k_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    scale,
    noise: torch.Tensor = None,
    *,
    k: int = 4,
    temperature: float = 0.0,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    return_index: bool = False,
    generator: torch.Generator = None,
):
    """Worst-of-k CE over the k noisy copies z_n + s_n * xi_nj, materialised as (N, k, C).

    ``noise`` is xi (N, k, C) (e.g. ``fastmargin.weight_noise.noise_from_state`` for the exact
    noise the kernels draw); without it, xi = torch.randn in the logits' dtype (the eager
    baseline: randn + add + worst-of-k CE). ``scale`` is a float or an (N,) tensor.
    """
    N, C = logits.shape
    if noise is None:
        noise = torch.randn(
            (N, k, C), dtype=logits.dtype, device=logits.device, generator=generator
        )
    s = torch.as_tensor(scale, device=logits.device).to(logits.dtype).expand(N)
    noisy = logits.unsqueeze(1) + s.view(N, 1, 1) * noise.to(logits.dtype)
    return worst_of_k_cross_entropy(
        noisy,
        target,
        dim=1,
        temperature=temperature,
        label_smoothing=label_smoothing,
        ignore_index=ignore_index,
        reduction=reduction,
        return_index=return_index,
    )


def all_layer_margin_loss(
    model: nn.Module,
    layers,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    lr: float = 0.01,
    steps: int = 1,
    freeze_bn: bool = True,
) -> torch.Tensor:
    """AMO (Wei & Ma 2020) with ordinary forward hooks, the reference of fm.AllLayerMargin.

    After each module in ``layers`` its output u becomes u + ||u_b||_2 * delta (float32, or
    float64 for float64 models; the norm per example, not detached). delta starts at zero and
    takes ``steps`` SGD steps of size ``lr`` on -CE (ascent on the loss) by
    ``torch.autograd.grad`` with respect to the deltas only; BatchNorm buffers are put back
    after the ascent when ``freeze_bn``. Returns the CE of the perturbed network.
    """
    deltas, calls = {}, {}

    def make_hook(i):
        def hook(module, inputs, out):
            key = (i, calls[i])
            calls[i] += 1
            acc = torch.float64 if out.dtype == torch.float64 else torch.float32
            if key not in deltas:
                deltas[key] = torch.zeros(out.shape, dtype=acc, device=out.device).requires_grad_()
            B = out.shape[0]
            norm = out.to(acc).reshape(B, -1).norm(dim=1).view((B,) + (1,) * (out.dim() - 1))
            return (out.to(acc) + norm * deltas[key]).to(out.dtype)

        return hook

    def forward():
        calls.update({i: 0 for i in range(len(layers))})
        return F.cross_entropy(model(x), y)

    handles = [m.register_forward_hook(make_hook(i)) for i, m in enumerate(layers)]
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [{k: b.clone() for k, b in m.named_buffers()} for m in bns]
    try:
        for _ in range(steps):
            loss = forward()
            keys = list(deltas)
            grads = torch.autograd.grad(loss, [deltas[k] for k in keys])
            for k, g in zip(keys, grads):
                deltas[k] = (deltas[k] + lr * g).detach().requires_grad_()
        if freeze_bn:
            for m, buffers in zip(bns, saved):
                for k, b in m.named_buffers():
                    b.copy_(buffers[k])
        for k in deltas:
            deltas[k] = deltas[k].detach()
        return forward()
    finally:
        for h in handles:
            h.remove()


# --- fused linear head + worst-of-k cross-entropy ----------------------------------------------


def linear_worst_of_k_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    dim: int | None = None,
    temperature: float = 0.0,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    class_weight: torch.Tensor | None = None,
    robust_eps: float = 0.0,
    robust_p: float = 2.0,
) -> torch.Tensor:
    """The unfused composition: the head's full logits F.linear(hidden, weight, bias), then
    F.cross_entropy (dim=None, k = 1) or the worst-of-k loss over copies along ``dim``.

    With ``robust_eps > 0`` (k = 1): F.cross_entropy of the weight-robust logits
    z~ = z + r (1 - 2 e_y), r = robust_eps * ||hidden||_q (1/p + 1/q = 1).
    """
    logits = F.linear(hidden, weight, bias)
    options = dict(
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        reduction=reduction,
        weight=class_weight,
    )
    if robust_eps > 0:
        radius = weight_perturbation_radius(hidden, robust_eps, robust_p)
        logits = weight_robust_logits(logits, target, radius.to(logits.dtype), ignore_index)
    if dim is None:
        return F.cross_entropy(logits, target, **options)
    return worst_of_k_cross_entropy(logits, target, dim=dim, temperature=temperature, **options)
