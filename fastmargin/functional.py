"""Public functions: validate the arguments, then call the fused ops (torch.ops.fastmargin.*)."""

from __future__ import annotations

from typing import Tuple, Union

import torch

from . import _routes as routes
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
    inplace_backward: bool = False,
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
        inplace_backward: write the gradient over ``logits`` during the forward (eager mode
            and a scalar loss only; ignored under ``torch.compile``). Saves the logits-sized
            gradient allocation for a terminal loss, as the fused kernels of Liger do;
            afterwards ``logits`` holds d loss / d logits (times the upstream gradient once
            backward has run), so it must not be used for anything else.
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

    Autograd: gradients flow into ``logits`` and probability targets (not ``weight``). First
    order runs the fused backward op. Second and higher order (``create_graph=True``: gradient
    penalties, Hessian-vector products, ``gradgradcheck``), forward mode
    (``torch.func.jvp``, ``torch.autograd.forward_ad``) and ``torch.func.grad`` / ``vmap``
    are exact, computed from the same math in PyTorch ops (which hold (B, k, C) temporaries).
    With ``temperature == 0`` the max is piecewise: every derivative is the selected copy's
    (ties to the lowest j). ``inplace_backward`` is first order only.
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

    args = (target, temperature, label_smoothing, ignore_index, class_weight)
    if inplace_backward and _use_inplace_backward(logits, target, reduction):
        copies_first = dim in (0, -3)
        loss, index = _GradientIntoLogits.apply(logits, x, copies_first, reduction, *args)
    else:
        per_sample, _lse, _weight, index, _dr = routes.worst_of_k_ce_fwd(
            x, args[0], None, *args[1:]
        )
        loss = reduce_cross_entropy(per_sample, target, ignore_index, reduction, class_weight)
    loss = loss.to(logits.dtype)
    return (loss, index) if return_index else loss


def _use_inplace_backward(logits: torch.Tensor, target: torch.Tensor, reduction: str) -> bool:
    """Whether the in-place option applies: eager mode, a scalar loss, a gradient wanted."""
    if reduction == "none":
        raise ValueError(
            "inplace_backward: needs a scalar loss (reduction 'mean' or 'sum'), got 'none'"
        )
    if torch.compiler.is_compiling():
        return False  # traced graphs must not mutate their inputs: the out-of-place ops
    if routes.transform_active():
        return False  # forward-mode AD / functorch: the differentiable composite path
    if target.is_floating_point() and target.requires_grad:
        raise ValueError("inplace_backward: not available with a target that requires grad")
    return torch.is_grad_enabled() and logits.requires_grad


class _GradientIntoLogits(torch.autograd.Function):
    """The loss, with dloss/dlogits written over the logits' own storage in the forward.

    The gradient of the reduced loss (for an upstream gradient of 1) is computed by the
    backward op right after the forward op, straight into the logits buffer, so no
    logits-sized gradient is ever allocated; the backward only scales it by the upstream
    gradient (one in-place pass; no host sync to test whether it is 1).
    """

    @staticmethod
    def forward(
        ctx,
        logits,
        x,
        copies_first,
        reduction,
        target,
        temperature,
        eps,
        ignore_index,
        class_weight,
    ):
        per_sample, lse, weight, index, _dr = ops.worst_of_k_ce_fwd(
            x, target, None, temperature, eps, ignore_index, class_weight
        )
        with torch.enable_grad():  # d loss / d per_sample: 1 ('sum') or 1 / normaliser ('mean')
            leaf = per_sample.detach().requires_grad_(True)
            loss = reduce_cross_entropy(leaf, target, ignore_index, reduction, class_weight)
            (g,) = torch.autograd.grad(loss, leaf)
        ops.worst_of_k_ce_bwd_inplace(
            g.contiguous(), x, target, None, lse, weight, eps, ignore_index, class_weight
        )
        # x is a view of the logits (or, for a strided class dim, the one copy made of them):
        # it now holds the gradient, returned in the logits' layout.
        ctx.gradient = x.detach().transpose(0, 1) if copies_first else x.detach()
        ctx.mark_non_differentiable(index)
        return loss.detach(), index

    @staticmethod
    def backward(ctx, grad_loss, _grad_index):
        if torch.is_grad_enabled():  # create_graph=True: a stored gradient has no graph
            raise RuntimeError(
                "inplace_backward: the gradient written into the logits is first order only; "
                "for create_graph=True (gradient penalties, double backward) call "
                "worst_of_k_cross_entropy without inplace_backward"
            )
        gradient = ctx.gradient
        del ctx.gradient
        return gradient.mul_(grad_loss), None, None, None, None, None, None, None, None
