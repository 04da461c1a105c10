r"""Every fused op in differentiable PyTorch ops: the path for autograd beyond first order.

The fused ops carry first-order reverse-mode autograd (C++ autograd nodes, csrc/autograd).
PyTorch offers no forward-mode rule for such ops, and their backward ops are not differentiable
in the logits. So two situations use the functions here instead, which compute the same
function from ordinary PyTorch ops (autograd of every order, forward mode and functorch
transforms come with them):

* a forward-mode AD or functorch transform is active (:func:`transform_active`: dual tensors of
  ``torch.autograd.forward_ad``, ``torch.func.jvp`` / ``grad`` / ``vjp`` / ``vmap`` ...): the
  public functions call these forms instead of the fused forward (see ``fastmargin._routes``);
* the backward runs with ``create_graph=True``: the registered backward then differentiates
  these forms (:func:`differentiable_backward`), so the gradient it returns is itself a
  differentiable graph (gradient penalties, Hessian-vector products, ``gradgradcheck``).

The first-order path (eager or ``torch.compile``) never comes here. These forms materialise
(B, k, C) temporaries, so they are for correctness, not speed. They are written from the math of
the ops, independently of ``fastmargin.reference`` (which tests compare both paths against).

The worst-of-k hard max (temperature 0) is piecewise: inside a piece its derivative is that of
the selected copy (the lowest j attaining the max), which is what every order of derivative
here differentiates. With ``index`` given (the fused forward's choice), the same copy as the
first-order backward is used even where rounding makes two copies' losses tie.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Tuple

import torch
import torch.autograd.forward_ad as _forward_ad


def transform_active() -> bool:
    """Whether a forward-mode AD level or a functorch transform is active now.

    Also right while ``torch.compile`` traces a transform (``torch.func.jvp`` inside a compiled
    function: dynamo evaluates both checks at trace time); a plain compiled graph sees False
    and keeps the fused ops.
    """
    return _forward_ad._current_level >= 0 or torch._C._functorch.maybe_current_level() is not None


def _stats_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# --- cross-entropy family ------------------------------------------------------------------


def _per_copy_losses(
    z: torch.Tensor,
    target: torch.Tensor,
    label_smoothing: float,
    class_weight: Optional[torch.Tensor],
    y: Optional[torch.Tensor],
) -> torch.Tensor:
    r"""(B, k) losses :math:`\ell_{bj} = \sum_c a_{bjc} (\mathrm{lse}(z_{bj}) - z_{bjc})`.

    a = w_c ((1 - eps) p_c + eps / C) with p one-hot at y (index targets, ``y`` the clamped
    classes) or the probability rows of ``target``. Terms whose coefficient is exactly 0 are not
    evaluated (a class masked with -inf and no target mass gives a finite loss), as in the
    fused kernels.
    """
    B, k, C = z.shape
    eps = label_smoothing
    lse = torch.logsumexp(z, dim=2)  # (B, k)
    if y is not None:  # class indices
        z_y = z.gather(2, y.view(B, 1, 1).expand(B, k, 1)).squeeze(2)
        w_y = 1.0 if class_weight is None else class_weight[y].unsqueeze(1)
        loss = (1.0 - eps) * w_y * (lse - z_y)
        if eps > 0:  # the smoothing term, only when it has weight (it is inf for -inf classes)
            gap = lse.unsqueeze(2) - z
            if class_weight is not None:
                gap = gap * class_weight
            loss = loss + (eps / C) * gap.sum(dim=2)
        return loss
    p = target.to(z.dtype)
    p = p.unsqueeze(1) if p.dim() == 2 else p  # (B, 1, C) shared by the copies, or (B, k, C)
    a = (1.0 - eps) * p + eps / C
    if class_weight is not None:
        a = a * class_weight
    gap = lse.unsqueeze(2) - z
    # A zero coefficient on an infinite gap is a skipped term (0, not NaN); written with where
    # on the gap so that no NaN reaches any derivative either.
    gap = torch.where((a == 0) & torch.isinf(gap), torch.zeros_like(gap), gap)
    return (a * gap).sum(dim=2)


def worst_of_k_ce(
    logits: torch.Tensor,
    target: torch.Tensor,
    radius: Optional[torch.Tensor],
    temperature: float,
    label_smoothing: float,
    ignore_index: int,
    class_weight: Optional[torch.Tensor] = None,
    index: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    r"""(loss (B,), worst copy (B,) int64) of ``worst_of_k_ce_fwd`` for (B, k, C) logits (or
    4-D (N, S, k, C) spatial rows, B = N * S).

    Per copy the (smoothed, class-weighted) cross-entropy of the row, shifted to the
    weight-robust row :math:`\tilde z = z + r (1 - 2 e_y)` when ``radius`` is given; then
    :math:`\max_j` (temperature 0, the copy ``index`` or the lowest j attaining the max) or
    :math:`\tau \log(\tfrac1k \sum_j e^{\ell_j/\tau})`. Ignored samples give 0, targets out of
    [0, C) give NaN, in the statistics dtype (float32, float64 for float64 logits).
    """
    f = _stats_dtype(logits)
    z = logits.to(f)
    if z.dim() == 4:  # spatial rows (N, S, k, C): B = N * S rows
        z = z.flatten(0, 1)
    B, k, C = z.shape
    if target.is_floating_point():
        y = None
        keep = bad = None
    else:
        in_range = (target >= 0) & (target < C)
        keep = target != ignore_index
        bad = keep & ~in_range
        y = torch.where(in_range, target, torch.zeros_like(target))
        if radius is not None:
            classes = torch.arange(C, device=z.device)
            at_y = (classes == y.unsqueeze(1)) & (keep & in_range).unsqueeze(1)  # (B, C)
            sign = 1.0 - 2.0 * at_y.to(f)
            z = z + radius.to(f).view(B, 1, 1) * sign.unsqueeze(1)
    cw = None if class_weight is None else class_weight.to(f)
    per_copy = _per_copy_losses(z, target, label_smoothing, cw, y)  # (B, k)
    if keep is not None:
        per_copy = torch.where(keep.unsqueeze(1), per_copy, torch.zeros_like(per_copy))
    if index is None:
        index = per_copy.detach().argmax(dim=1)  # the first maximum: ties go to the lowest j
    if temperature > 0:
        loss = temperature * (torch.logsumexp(per_copy / temperature, dim=1) - math.log(k))
        if keep is not None:
            loss = torch.where(keep, loss, torch.zeros_like(loss))
    else:
        loss = per_copy.gather(1, index.view(B, 1)).squeeze(1)
    if bad is not None:
        loss = torch.where(bad, torch.full_like(loss, float("nan")), loss)
    return loss, index


def weight_noise_ce(
    logits: torch.Tensor,
    target: torch.Tensor,
    scale: torch.Tensor,
    philox: torch.Tensor,
    k: int,
    temperature: float,
    label_smoothing: float,
    ignore_index: int,
    index: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    r"""(loss (N,), worst copy (N,)) of ``weight_noise_ce_fwd``: worst-of-k over the noisy rows
    :math:`z_n + s_n ξ_{nj}`, with the exact noise ξ of the state ``philox`` regenerated."""
    N, C = logits.shape
    f = _stats_dtype(logits)
    xi = torch.ops.fastmargin.weight_noise_normal(philox, N, k, C).to(f)
    noisy = logits.to(f).unsqueeze(1) + scale.to(f).view(N, 1, 1) * xi
    return worst_of_k_ce(
        noisy, target, None, temperature, label_smoothing, ignore_index, None, index
    )


# --- margin and perturbation -----------------------------------------------------------------


def multiclass_margin(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(N,) margins z_y - z_r of ``multiclass_margin_fwd`` (statistics dtype), r the runner-up:
    the lowest class other than y attaining the max (a NaN counts as the max); NaN for a
    target out of [0, C)."""
    z = logits.to(_stats_dtype(logits))
    N, C = z.shape
    in_range = (target >= 0) & (target < C)
    y = torch.where(in_range, target, torch.zeros_like(target))
    is_y = torch.arange(C, device=z.device) == y.unsqueeze(1)
    others = z.detach().masked_fill(is_y, float("-inf"))
    runner_up = others.argmax(dim=1)
    # argmax lands on y itself only when every other class is -inf (and y is the first class):
    # then the runner-up is the lowest other class, as in the kernel.
    runner_up = torch.where(runner_up == y, (y == 0).long(), runner_up)
    z_y = z.gather(1, y.unsqueeze(1)).squeeze(1)
    z_r = z.gather(1, runner_up.unsqueeze(1)).squeeze(1)
    margin = z_y - z_r
    return torch.where(in_range, margin, torch.full_like(margin, float("nan")))


def all_layer_perturb(u: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    r""":math:`u_b + \lVert u_b\rVert_2 \delta_b` of ``all_layer_perturb_fwd`` in u's dtype,
    accumulated in float32 (float64 for float64 u); the norm is not detached, and its
    gradient at :math:`u_b = 0` is 0 (PyTorch's convention for ``vector_norm``)."""
    f = _stats_dtype(u)
    B = u.shape[0]
    uf = u.to(f)
    norm = torch.linalg.vector_norm(uf.reshape(B, -1), dim=1)
    out = uf + norm.view((B,) + (1,) * (u.dim() - 1)) * delta.to(f)
    return out.to(u.dtype)


# --- the differentiable backward -------------------------------------------------------------


def differentiable_backward(
    forward: Callable[..., torch.Tensor],
    inputs: Sequence[Optional[torch.Tensor]],
    needs_grad: Sequence[bool],
    grad_output: torch.Tensor,
) -> list:
    """Gradients of ``<grad_output, forward(*inputs)>`` for the inputs flagged in
    ``needs_grad`` (None for the others), built as a graph that can be differentiated again.

    Called from a registered backward when autograd runs it with ``create_graph=True``: the
    saved inputs are then the graph's own tensors, so the result depends on them (and on
    ``grad_output``) differentiably.
    """
    wanted = [t for t, need in zip(inputs, needs_grad) if need and t is not None]
    with torch.enable_grad():
        out = forward(*inputs)
        grads = torch.autograd.grad(out, wanted, grad_output, create_graph=True, allow_unused=True)
    it = iter(grads)
    return [next(it) if need and t is not None else None for t, need in zip(inputs, needs_grad)]
