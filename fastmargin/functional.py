"""Public functions: validate the arguments, then call the fused ops (torch.ops.fastmargin.*)."""

from __future__ import annotations

from typing import Tuple, Union

import torch

from . import _ce_layout as layout
from . import _fast_path as fast_path
from . import _routes as routes
from . import _target_checks as tc
from . import _validation as v
from ._autocast import loss_dtype
from ._ops import _non_overlapping_and_dense, ops
from ._reduce import reduce_cross_entropy

LossAndIndex = Tuple[torch.Tensor, torch.Tensor]


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

    Shape rule. Without ``dim`` the call accepts exactly what ``F.cross_entropy`` accepts and
    returns the same number (k = 1 copy of every sample), for every reduction,
    ``ignore_index``, ``label_smoothing`` and ``weight``:

    ===================  ======================================  ================
    logits               target                                  ``'none'`` gives
    ===================  ======================================  ================
    (C,)                 () class index, or (C,) probabilities   ()
    (N, C)               (N,), or (N, C)                         (N,)
    (N, C, d1, ..., dm)  (N, d1, ..., dm), or the logits' shape  (N, d1, ..., dm)
    ===================  ======================================  ================

    With ``dim`` named the logits are 3-D and hold k copies of each sample along it:
    ``dim=0`` is (k, B, C), the layout of ``torch.cat`` of k augmented batches viewed as
    (k, B, C); ``dim=1`` is (B, k, C). A 3-D input without ``dim`` is read as spatial, as
    ``F.cross_entropy`` reads it; a (B,) class-index target then raises a ValueError that
    asks for ``dim=0`` or ``dim=1``.

    Args:
        logits: float32 / float16 / bfloat16 (or float64) logits, shaped by the rule above.
            (C,) and (N, C) logits and both copy layouts are read in place. Contiguous
            spatial logits with int64 class indices are read in place too, their gradient
            written in their own layout (with class weights, or on CUDA above 32 classes, the
            op copies the rows once); other spatial calls copy them once into
            (N·d1·…·dm, C) rows: a block copy into class-major memory (on the CPU, and on CUDA
            up to 32 classes), else one transposing copy (none when they already lie
            class-last in memory, e.g. channels-last). The class dim must have stride 1
            (otherwise it is copied once).
        target: integer class indices in [0, C), or ``ignore_index`` (that sample
            contributes 0, and ``'mean'`` divides by the number of samples not ignored),
            one per sample: shaped as above, or (B,) with ``dim`` (shared by the copies).
            Or floating class probabilities: the logits' shape without ``dim``; with ``dim``
            either (B, C) shared by the k copies or one row per copy in the logits' layout
            ((B, k, C) for ``dim=1``, (k, B, C) for ``dim=0``; e.g. CutMix / MixUp labels of
            each augmented copy). Probability rows are used as given (rows that are not
            distributions are the caller's responsibility), in the logits' dtype or float32
            (other floating dtypes are converted); ``'mean'`` divides by the number of
            samples, and, as in ``F.cross_entropy``, an ``ignore_index`` >= 0 is refused
            (RuntimeError). They are read in the same sweep as the logits, and are
            differentiable.
        dim: None (the default: ``F.cross_entropy``'s shapes), or the copy dimension of 3-D
            logits, 0 or 1.
        temperature: 0 for the hard max, > 0 for the smooth max.
        label_smoothing: ε in [0, 1], PyTorch's meaning.
        ignore_index: target value that marks a sample to skip.
        reduction: ``'mean'`` | ``'sum'`` | ``'none'`` (per-sample losses, shaped as
            ``F.cross_entropy``'s without ``dim``, (B,) with it).
        return_index: also return the int64 index of each sample's worst copy, shaped like
            the per-sample losses (all zeros without ``dim``: one copy).
        inplace_backward: write the gradient over ``logits`` during the forward (eager mode
            and a scalar loss only; ignored under ``torch.compile``). Saves the logits-sized
            gradient allocation for a terminal loss, as the fused kernels of Liger do (memory,
            not time: it moves more bytes, and measured 2.2-3.9x the default's time on an
            H200); afterwards ``logits`` holds d loss / d logits (times the upstream gradient once
            backward has run), so it must not be used for anything else. Refused (with a
            RuntimeError) for logits that are a leaf tensor requiring grad, such as an
            ``nn.Parameter``, or a view of one; a second backward through the loss raises a
            RuntimeError. Logits whose memory cannot take the gradient element for element
            (overlapping, e.g. ``z.unsqueeze(1).expand(B, k, C)``, or a strided window of a
            larger buffer) take the out-of-place path instead and are left unchanged; where
            the rule above copies the logits (spatial, strided class dim) the copy is
            overwritten, not the logits. The write bumps the logits' version counter, so
            another autograd node that saved them raises at backward.
        weight: optional (C,) class weights w, as in ``F.cross_entropy`` (converted to
            float32, float64 for float64 logits; not differentiable). With class-index
            targets ``'mean'`` divides by :math:`\sum_b w_{y_b}` over the samples not ignored
            (for worst-of-k: the weight of each sample's class, whichever copy is the worst).

    Returns:
        The loss (accumulated in float32) in the logits' dtype, or in float32 for float16 /
        bfloat16 logits inside ``torch.autocast`` (as ``F.cross_entropy``; the logits are not
        copied to float32), and with ``return_index`` the worst-copy indices. With no classes
        (C = 0) the result is ``F.cross_entropy``'s: 0 per sample (NaN for a class index,
        which is then out of range); 'mean' is NaN.

    Raises:
        TypeError, ValueError, RuntimeError for malformed arguments; IndexError for a target
        out of range (checked while ``fm.set_validation`` is on, and never inside a
        ``torch.compile`` graph: there, and with validation off, such a sample's loss is NaN).

    Autograd: gradients flow into ``logits`` and probability targets (not ``weight``). First
    order runs the fused backward op. Second and higher order (``create_graph=True``: gradient
    penalties, Hessian-vector products, ``gradgradcheck``), forward mode
    (``torch.func.jvp``, ``torch.autograd.forward_ad``) and ``torch.func.grad`` / ``vmap``
    are exact, computed from the same math in PyTorch ops (which hold (B, k, C) temporaries).
    With ``temperature == 0`` the max is piecewise: every derivative is the selected copy's
    (ties to the lowest j). ``inplace_backward`` is first order only.
    """
    if not inplace_backward and fast_path.available(logits, target, weight):
        out = fast_path.worst_of_k_cross_entropy(
            logits, target, dim, temperature, label_smoothing, ignore_index, reduction,
            return_index, weight, loss_dtype(logits), v.validation_enabled_in_eager(),
        )  # fmt: skip
        if out is not None:
            return out
    rows = layout.rows(logits, target, dim)
    x, target = rows.x, rows.target
    B, k, C = x.shape
    temperature = v.check_nonnegative(temperature, "temperature")
    label_smoothing = v.check_label_smoothing(label_smoothing)
    v.check_reduction(reduction)
    if tc.is_probability_target(target):
        _check_ignore_index_for_probabilities(ignore_index)
    else:
        target = v.check_class_target(target, B, C, ignore_index, logits)
    class_weight = tc.check_class_weight(weight, C, logits)

    args = (target, temperature, label_smoothing, ignore_index, class_weight)
    if C == 0:
        per_sample, index = _no_classes(x, target, ignore_index)
        loss = reduce_cross_entropy(per_sample, target, ignore_index, reduction, class_weight)
        if reduction == "mean" and target.is_floating_point():
            loss = loss * float("nan")  # F.cross_entropy divides by numel / C = 0 / 0 here
    elif inplace_backward and _use_inplace_backward(logits, x, target, reduction):
        loss, index = _GradientIntoLogits.apply(x, reduction, *args)
    elif fast_path.available(x, target, class_weight):
        loss, index = fast_path.worst_of_k_ce_loss(
            x, target, None, temperature, label_smoothing, ignore_index, class_weight,
            reduction, loss_dtype(logits), fast_path.ROWS,
        )  # fmt: skip
        return _shaped(loss, index, rows.loss_shape, reduction, return_index)
    else:
        per_sample, _lse, _weight, index, _dr = routes.worst_of_k_ce_fwd(
            x, args[0], None, *args[1:]
        )
        loss = reduce_cross_entropy(per_sample, target, ignore_index, reduction, class_weight)
    loss = loss.to(loss_dtype(logits))
    return _shaped(loss, index, rows.loss_shape, reduction, return_index)


def _shaped(
    loss: torch.Tensor,
    index: torch.Tensor,
    loss_shape: Tuple[int, ...],
    reduction: str,
    return_index: bool,
) -> Union[torch.Tensor, LossAndIndex]:
    """The per-sample results in the caller's sample shape (a no-op for (B,) samples)."""
    if reduction == "none" and loss.shape != loss_shape:
        loss = loss.reshape(loss_shape)
    if not return_index:
        return loss
    return loss, index if index.shape == loss_shape else index.reshape(loss_shape)


def _check_ignore_index_for_probabilities(ignore_index: int) -> None:
    """F.cross_entropy refuses a class-valued ignore_index with probability targets (a negative
    one, the default -100 included, can never name a class and is accepted)."""
    if ignore_index >= 0:
        raise RuntimeError(
            f"ignore_index: not supported for floating point (probability) targets, got "
            f"{ignore_index} (as in F.cross_entropy: leave it at its default)"
        )


def _no_classes(x: torch.Tensor, target: torch.Tensor, ignore_index: int) -> LossAndIndex:
    """C = 0, as F.cross_entropy: a sample's loss is 0 (a probability target, or an ignored
    class index) or NaN (a class index, necessarily out of range: IndexError while validation
    is on); 'mean' is NaN for probability targets (PyTorch divides by numel / C). Built from
    the inputs so that autograd still reaches them (empty gradients)."""
    B = x.shape[0]
    per_sample = x.sum(dim=(1, 2)).to(tc.stats_dtype(x))
    if target.is_floating_point():
        per_sample = per_sample + target.reshape(B, -1).sum(dim=1).to(per_sample.dtype)
    else:
        per_sample = torch.where(target == ignore_index, per_sample, float("nan"))
    return per_sample, torch.zeros(B, dtype=torch.long, device=x.device)


def _use_inplace_backward(
    logits: torch.Tensor, x: torch.Tensor, target: torch.Tensor, reduction: str
) -> bool:
    """Whether the in-place option applies: eager mode, a scalar loss, a gradient wanted, and
    logits whose memory may be overwritten (else the out-of-place ops compute the same)."""
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
    if not (torch.is_grad_enabled() and logits.requires_grad):
        return False
    base = logits if logits._base is None else logits._base
    if base.is_leaf:
        raise RuntimeError(
            "inplace_backward: logits are a leaf tensor that requires grad (e.g. an "
            "nn.Parameter), or a view of one; the option would overwrite them. Pass "
            "inplace_backward=False, or logits computed by the model"
        )
    # Overlapping memory (e.g. one row expanded into k copies) or a strided window of a larger
    # buffer: the gradient cannot be written over it element for element.
    return x.numel() < 2 or _non_overlapping_and_dense(x)


class _GradientIntoLogits(torch.autograd.Function):
    """The loss, with dloss/dx written over the rows' own storage in the forward.

    ``x`` is the (B, k, C) rows of the logits: a view of them (their memory is overwritten), or
    the one copy the shape rule made (a strided class dim, spatial logits). The gradient of the
    reduced loss (for an upstream gradient of 1) is computed by the backward op right after
    the forward op, straight into that buffer, so no logits-sized gradient is ever allocated;
    the backward only scales it by the upstream gradient (one in-place pass; no host sync to
    test whether it is 1), and autograd maps it back through the view to the logits' layout.
    The write bumps the logits' version counter, so an autograd node that saved them for its
    own backward raises instead of reading the gradient as logits.
    """

    @staticmethod
    def forward(ctx, x, reduction, target, temperature, eps, ignore_index, class_weight):
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
        torch.autograd.graph.increment_version(x)
        ctx.gradient = x.detach()
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
        if gradient is None:
            raise RuntimeError(
                "inplace_backward: the gradient written over the logits was already used by "
                "a first backward; a second backward through this loss (retain_graph=True) "
                "is not supported. Pass inplace_backward=False to backpropagate twice"
            )
        ctx.gradient = None
        return gradient.mul_(grad_loss), None, None, None, None, None, None
