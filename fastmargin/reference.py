"""Plain-PyTorch references: the executable spec of every fastmargin op.

Each function here computes the math of DESIGN.md in the most readable way (materialising
whatever it needs). The fused kernels are tested against these values and gradients, and the
benchmarks time them as the "eager" and "torch.compile" baselines.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def cross_entropy_per_copy(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    dim: int = 1,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
) -> torch.Tensor:
    """(B, k) matrix of l_bj = CE(z_bj, y_b) for logits with copies along ``dim``.

    l = lse(z) - (1 - eps) z_y - (eps / C) sum_c z_c, and 0 where y == ignore_index.
    """
    x = logits.movedim(dim, 1)  # (B, k, C)
    B, k, C = x.shape
    per_row = F.cross_entropy(
        x.reshape(B * k, C),
        target.repeat_interleave(k),
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        reduction="none",
    )
    return per_row.view(B, k)


def reduce_loss(
    per_sample: torch.Tensor, target: torch.Tensor, ignore_index: int, reduction: str
) -> torch.Tensor:
    """F.cross_entropy's reductions: 'mean' divides by the number of samples not ignored."""
    if reduction == "none":
        return per_sample
    if reduction == "sum":
        return per_sample.sum()
    return per_sample.sum() / (target != ignore_index).sum()


def worst_of_k_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    dim: int = 1,
    temperature: float = 0.0,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    return_index: bool = False,
):
    """Worst-of-k cross-entropy.

    L_b = max_j l_bj (temperature 0; ties to the lowest j, gradient into that copy only), or
    L_b = tau * log((1/k) sum_j exp(l_bj / tau)) for tau > 0; then F.cross_entropy's reduction.
    """
    ce = cross_entropy_per_copy(
        logits, target, dim=dim, label_smoothing=label_smoothing, ignore_index=ignore_index
    )
    k = ce.shape[1]
    worst, index = ce.max(dim=1)
    if temperature > 0:
        worst = temperature * (torch.logsumexp(ce / temperature, dim=1) - math.log(k))
    loss = reduce_loss(worst, target, ignore_index, reduction)
    return (loss, index) if return_index else loss


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
