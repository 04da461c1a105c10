"""Public functions: validate the arguments, then call the fused ops (torch.ops.fastmargin.*)."""

from __future__ import annotations

from typing import Tuple, Union

import torch

from . import _validation as v
from ._ops import ops
from .reference import reduce_loss

LossAndIndex = Tuple[torch.Tensor, torch.Tensor]


def _as_batch_copies_classes(logits: torch.Tensor, dim: int) -> torch.Tensor:
    """A (B, k, C) view of 3-D logits with copies along ``dim`` (no copy unless the class dim
    is strided, which the kernels cannot read in place)."""
    if dim not in (0, 1, -3, -2):
        raise ValueError(f"dim: expected 0 (copies first, (k, B, C)) or 1 ((B, k, C)), got {dim}")
    x = logits.transpose(0, 1) if dim in (0, -3) else logits
    if x.shape[2] > 1 and x.stride(2) != 1:
        x = x.contiguous()
    return x


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
) -> Union[torch.Tensor, LossAndIndex]:
    r"""Worst-of-k cross-entropy (MaxUp): the loss of each sample's worst augmented copy.

    For sample b with k copies of logits z_{b1..bk} and target y_b, the per-copy loss is
    :math:`\ell_{bj} = \mathrm{lse}(z_{bj}) - (1-\varepsilon) z_{bj,y_b}
    - \tfrac{\varepsilon}{C}\sum_c z_{bj,c}` (``F.cross_entropy`` with label smoothing ε), and

    * ``temperature == 0``: :math:`L_b = \max_j \ell_{bj}`; the gradient flows into the worst
      copy only (ties go to the lowest j);
    * ``temperature = τ > 0``: :math:`L_b = τ \log(\tfrac1k\sum_j e^{\ell_{bj}/τ})`, whose
      gradient weights copy j by :math:`\mathrm{softmax}_j(\ell_b/τ)`.

    With k == 1 this is exactly ``F.cross_entropy``.

    Args:
        logits: 3-D float32 / float16 / bfloat16 (or float64) logits with the copies along
            ``dim``: ``dim=1`` is (B, k, C); ``dim=0`` is (k, B, C), the layout of
            ``torch.cat`` of k augmented batches viewed as (k, B, C). Neither layout is
            copied; the class dim must have stride 1 (otherwise it is copied once).
        target: (B,) integer class indices in [0, C), or ``ignore_index`` (that sample
            contributes 0, and ``'mean'`` divides by the number of samples not ignored).
        dim: the copy dimension, 0 or 1.
        temperature: 0 for the hard max, > 0 for the smooth max.
        label_smoothing: ε in [0, 1], PyTorch's meaning.
        ignore_index: target value that marks a sample to skip.
        reduction: ``'mean'`` | ``'sum'`` | ``'none'`` (per-sample (B,) losses).
        return_index: also return the (B,) int64 index of each sample's worst copy.

    Returns:
        The loss in the logits' dtype (accumulated in float32), and with ``return_index`` the
        worst-copy indices.

    Raises:
        TypeError, ValueError, RuntimeError for malformed arguments; IndexError for a target
        out of range (checked while ``fm.set_validation`` is on; without the check such a
        sample's loss is NaN).
    """
    v.check_tensor(logits, "logits")
    v.check_float_dtype(logits, "logits")
    if logits.dim() != 3:
        raise ValueError(
            f"logits: expected a 3-D tensor ((B, k, C) for dim=1 or (k, B, C) for dim=0), "
            f"got {logits.dim()}-D of shape {tuple(logits.shape)}"
        )
    x = _as_batch_copies_classes(logits, dim)
    B, k, C = x.shape
    if k == 0:
        raise ValueError("logits: the copy dimension is empty (k = 0); need at least one copy")
    if C == 0:
        raise ValueError("logits: the class dimension is empty (C = 0)")
    temperature = v.check_nonnegative(temperature, "temperature")
    label_smoothing = v.check_label_smoothing(label_smoothing)
    v.check_reduction(reduction)
    target = v.check_class_target(target, B, C, ignore_index, logits)

    per_sample, _lse, _weight, index, _dr = ops.worst_of_k_ce_fwd(
        x, target, None, temperature, label_smoothing, ignore_index
    )
    loss = reduce_loss(per_sample, target, ignore_index, reduction).to(logits.dtype)
    return (loss, index) if return_index else loss
