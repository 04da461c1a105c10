"""F.cross_entropy's reductions of per-sample losses, for the fused path.

The public functions get per-sample losses from the kernels and reduce them here, exactly as
``F.cross_entropy`` does for each target kind. The arithmetic is the op
``fastmargin::reduce_cross_entropy`` (csrc/composite/reduce_cross_entropy.cpp, written in ATen
ops), which the eager fast path (``fastmargin._fast_path``) runs too, so both paths give the same
bits. ``fastmargin.reference`` has its own reductions (it stands alone, so a bug here cannot hide
in both).
"""

from __future__ import annotations

import torch

from ._ops import ops


def reduce_cross_entropy(
    per_sample: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int,
    reduction: str,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """F.cross_entropy's reductions for every target kind.

    * index targets, no ``weight``: 'mean' divides by the number of samples not ignored;
    * index targets with class weights w: 'mean' divides by sum_b w_{y_b} over the samples not
      ignored (for k = 1 exactly F.cross_entropy; for worst-of-k the same normaliser, the
      weight of each sample's class, whichever copy is the worst);
    * probability targets: 'mean' divides by the batch size B (ignore_index does not apply).
    """
    if reduction == "none":
        return per_sample
    return ops.reduce_cross_entropy(per_sample, target, ignore_index, reduction, weight)
