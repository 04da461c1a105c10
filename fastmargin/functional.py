"""Public functions: validate the arguments, then call the fused ops (torch.ops.fastmargin.*)."""

from __future__ import annotations

from typing import Tuple, Union

import torch

from . import _target_checks as tc
from . import _validation as v
from ._ops import ops
from .reference import reduce_cross_entropy

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
    weight: torch.Tensor | None = None,
) -> Union[torch.Tensor, LossAndIndex]:
    r"""Worst-of-k cross-entropy (MaxUp): the loss of each sample's worst augmented copy.

    For sample b with k copies of logits z_{b1..bk} and target y_b, the per-copy loss is
    :math:`\ell_{bj} = \mathrm{lse}(z_{bj}) - (1-\varepsilon) z_{bj,y_b}
    - \tfrac{\varepsilon}{C}\sum_c z_{bj,c}` (``F.cross_entropy`` with label smoothing ε), and

    * ``temperature == 0``: :math:`L_b = \max_j \ell_{bj}`; the gradient flows into the worst
      copy only (ties go to the lowest j);
    * ``temperature = τ > 0``: :math:`L_b = τ \log(\tfrac1k\sum_j e^{\ell_{bj}/τ})`, whose
      gradient weights copy j by :math:`\mathrm{softmax}_j(\ell_b/τ)`.

    With k == 1 this is exactly ``F.cross_entropy``, including its probability targets and
    class weights: in general the per-copy loss is

    .. math:: \ell_{bj} = \sum_c a_{bjc}\,(\mathrm{lse}(z_{bj}) - z_{bjc}),\qquad
              a_{bjc} = w_c\,((1-\varepsilon)\,p_{bjc} + \varepsilon / C),

    with w the class weights (1 without ``weight``) and p the target distribution: one-hot at
    y_b for class indices, or the given probability row (shared by the copies or per copy).
    The worst-of-k max is taken over these weighted per-copy losses. Terms whose coefficient
    a is exactly 0 are skipped, so a class masked with -inf that carries no target mass gives
    a finite loss (``F.cross_entropy`` gives NaN there for probability targets).

    Args:
        logits: 3-D float32 / float16 / bfloat16 (or float64) logits with the copies along
            ``dim``: ``dim=1`` is (B, k, C); ``dim=0`` is (k, B, C), the layout of
            ``torch.cat`` of k augmented batches viewed as (k, B, C). Neither layout is
            copied; the class dim must have stride 1 (otherwise it is copied once).
        target: (B,) integer class indices in [0, C), or ``ignore_index`` (that sample
            contributes 0, and ``'mean'`` divides by the number of samples not ignored);
            or floating class probabilities, either (B, C) shared by the k copies or one row
            per copy in the logits' layout ((B, k, C) for ``dim=1``, (k, B, C) for ``dim=0``;
            e.g. CutMix / MixUp labels of each augmented copy). Probability rows are used as
            given (rows that are not distributions are the caller's responsibility), in the
            logits' dtype or float32 (other floating dtypes are converted);
            ``ignore_index`` does not apply to them, and ``'mean'`` divides by B. They are
            read in the same sweep as the logits, and are differentiable.
        dim: the copy dimension, 0 or 1.
        temperature: 0 for the hard max, > 0 for the smooth max.
        label_smoothing: ε in [0, 1], PyTorch's meaning.
        ignore_index: target value that marks a sample to skip.
        reduction: ``'mean'`` | ``'sum'`` | ``'none'`` (per-sample (B,) losses).
        return_index: also return the (B,) int64 index of each sample's worst copy.
        weight: optional (C,) class weights w, as in ``F.cross_entropy`` (converted to
            float32, float64 for float64 logits; not differentiable). With class-index
            targets ``'mean'`` divides by :math:`\sum_b w_{y_b}` over the samples not ignored
            (for worst-of-k: the weight of each sample's class, whichever copy is the worst).

    Returns:
        The loss in the logits' dtype (accumulated in float32), and with ``return_index`` the
        worst-copy indices.

    Raises:
        TypeError, ValueError, RuntimeError for malformed arguments; IndexError for a target
        out of range (checked while ``fm.set_validation`` is on; without the check such a
        sample's loss is NaN).
    """
    v.check_logits(logits, 3, "(B, k, C) for dim=1 or (k, B, C) for dim=0")
    x = _as_batch_copies_classes(logits, dim)
    B, k, C = x.shape
    if k == 0:
        raise ValueError("logits: the copy dimension is empty (k = 0); need at least one copy")
    if C == 0:
        raise ValueError("logits: the class dimension is empty (C = 0)")
    temperature = v.check_nonnegative(temperature, "temperature")
    label_smoothing = v.check_label_smoothing(label_smoothing)
    v.check_reduction(reduction)
    if tc.is_probability_target(target):
        target = tc.check_probability_target(target, logits, x, dim)
    else:
        target = v.check_class_target(target, B, C, ignore_index, logits)
    class_weight = tc.check_class_weight(weight, C, logits)

    per_sample, _lse, _weight, index, _dr = ops.worst_of_k_ce_fwd(
        x, target, None, temperature, label_smoothing, ignore_index, class_weight
    )
    loss = reduce_cross_entropy(per_sample, target, ignore_index, reduction, class_weight)
    loss = loss.to(logits.dtype)
    return (loss, index) if return_index else loss
