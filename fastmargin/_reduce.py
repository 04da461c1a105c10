"""F.cross_entropy's reductions of per-sample losses, for the fused path.

The public functions get per-sample losses from the kernels and reduce them here, exactly as
``F.cross_entropy`` does for each target kind. ``fastmargin.reference`` has its own reductions
(it stands alone, so a bug here cannot hide in both).
"""

from __future__ import annotations

import torch


def reduce_loss(
    per_sample: torch.Tensor, target: torch.Tensor, ignore_index: int, reduction: str
) -> torch.Tensor:
    """F.cross_entropy's reductions: 'mean' divides by the number of samples not ignored."""
    if reduction == "none":
        return per_sample
    if reduction == "sum":
        return per_sample.sum()
    return per_sample.sum() / (target != ignore_index).sum()


def reduce_cross_entropy(
    per_sample: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int,
    reduction: str,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """F.cross_entropy's reductions for every target kind.

    * index targets, no ``weight``: :func:`reduce_loss` ('mean' over samples not ignored);
    * index targets with class weights w: 'mean' divides by sum_b w_{y_b} over the samples not
      ignored (for k = 1 exactly F.cross_entropy; for worst-of-k the same normaliser, the
      weight of each sample's class, whichever copy is the worst);
    * probability targets: 'mean' divides by the batch size B (ignore_index does not apply).
    """
    if reduction == "none":
        return per_sample
    if reduction == "sum":
        return per_sample.sum()
    if target.is_floating_point():
        return per_sample.sum() / per_sample.shape[0]
    if weight is None:
        return reduce_loss(per_sample, target, ignore_index, reduction)
    return per_sample.sum() / selected_weight_sum(target, weight, ignore_index)


def selected_weight_sum(
    target: torch.Tensor, weight: torch.Tensor, ignore_index: int
) -> torch.Tensor:
    """sum_b w_{y_b} over samples whose target is a class (ignored and out-of-range targets
    count 0; gathering with them would fault, and their loss is 0 or NaN anyway)."""
    C = weight.shape[0]
    valid = (target != ignore_index) & (target >= 0) & (target < C)
    picked = weight[target.clamp(0, max(C - 1, 0))]
    return torch.where(valid, picked, torch.zeros_like(picked)).sum()
