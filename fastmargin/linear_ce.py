"""Fused linear head + worst-of-k cross-entropy: the public function and its module form.

``linear_worst_of_k_cross_entropy(hidden, weight, target, bias)`` is
``worst_of_k_cross_entropy(F.linear(hidden, weight, bias), target, ...)`` without ever holding
the (k * B, V) logits or their gradient: the samples are walked in chunks (all k copies of a
sample in one chunk), see ``fastmargin/_linear_ce_op.py`` for the algorithm.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

from . import _target_checks as tc
from . import _validation as v
from ._linear_ce_op import default_chunk_size, linear_worst_of_k_ce
from .modules import LossModule
from .weight_robust import dual_exponent


def _check_head(hidden: torch.Tensor, weight: object, bias: object) -> Tuple[int, int]:
    weight = v.check_tensor(weight, "weight")
    if weight.dim() != 2:
        raise ValueError(
            f"weight: expected the head's 2-D (V, H) weight, got shape {tuple(weight.shape)}"
        )
    V, H = weight.shape
    if weight.dtype != hidden.dtype:
        raise TypeError(
            f"weight: expected the hidden states' dtype {hidden.dtype}, got {weight.dtype} "
            "(as F.linear requires)"
        )
    v.check_same_device(weight, hidden, "weight")
    if V == 0:
        raise ValueError("weight: the class dimension is empty (V = 0 rows)")
    if hidden.shape[-1] != H:
        raise ValueError(
            f"hidden: expected the last dim to be the head's input size {H} (weight is "
            f"{V} x {H}), got shape {tuple(hidden.shape)}"
        )
    if bias is not None:
        bias = v.check_tensor(bias, "bias")
        if tuple(bias.shape) != (V,):
            raise ValueError(f"bias: expected shape ({V},), got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias: expected dtype {hidden.dtype}, got {bias.dtype}")
        v.check_same_device(bias, hidden, "bias")
    return V, H


def _as_copies(hidden: torch.Tensor, target: torch.Tensor, dim: Optional[int]):
    """(3-D hidden with copies along axis 0 or 1, copies_first, target as (B,), batch-less?)."""
    if dim is None:
        if hidden.dim() == 2:
            return hidden.unsqueeze(1), False, target, False
        if hidden.dim() == 1:
            if not isinstance(target, torch.Tensor) or target.dim() != 0:
                raise ValueError(
                    "target: a batch-less (H,) hidden takes a 0-d class-index target, got "
                    f"shape {tuple(getattr(target, 'shape', ()))}"
                )
            return hidden.view(1, 1, -1), False, target.view(1), True
        if hidden.dim() == 3:
            raise ValueError(
                f"hidden: a 3-D tensor of shape {tuple(hidden.shape)} holds augmented copies; "
                "pass dim=0 or dim=1 (dim=0: (k, B, H), torch.cat of k batches; dim=1: (B, k, H)). "
                "Without dim, hidden is (N, H) or (H,) as for F.cross_entropy (k = 1)"
            )
        raise ValueError(
            f"hidden: expected (N, H) or (H,) without dim, got shape {tuple(hidden.shape)}"
        )
    if dim not in (0, 1, -3, -2) or isinstance(dim, bool):
        raise ValueError(f"dim: expected None, 0 ((k, B, H)) or 1 ((B, k, H)), got {dim!r}")
    if hidden.dim() != 3:
        layout = "(k, B, H)" if dim in (0, -3) else "(B, k, H)"
        raise ValueError(
            f"hidden: with dim={dim} expected a 3-D tensor {layout}, got shape "
            f"{tuple(hidden.shape)}"
        )
    return hidden, dim in (0, -3), target, False


def _refuse_forward_ad(*tensors) -> None:
    """Forward-mode AD (``torch.func.jvp``, ``forward_ad`` dual tensors) has no formula here;
    without this check the tangent would be dropped and read as 0."""
    for name, t in zip(("hidden", "weight", "bias"), tensors):
        if isinstance(t, torch.Tensor) and fwAD.unpack_dual(t).tangent is not None:
            raise RuntimeError(
                f"{name}: forward-mode AD (jvp) is not supported by "
                "linear_worst_of_k_cross_entropy; use the unfused "
                "worst_of_k_cross_entropy(F.linear(...)) or reverse mode"
            )


def _check_chunk_size(chunk_size: object) -> Optional[int]:
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(
            f"chunk_size: expected an int >= 1 or None, got {type(chunk_size).__name__}"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size: expected an int >= 1 (samples per chunk), got {chunk_size}")
    return chunk_size


def _autocast_inputs(hidden, weight, bias):
    """Under torch.autocast, F.linear runs in the autocast dtype: cast as it would (the
    casts are differentiable, so the gradients come back in the parameters' dtypes)."""
    device = hidden.device.type
    if not torch.is_autocast_enabled(device):
        return hidden, weight, bias, False
    dt = torch.get_autocast_dtype(device)
    # autocast casts float32 tensors only (float64 stays float64), as it does for F.linear
    cast = [
        t.to(dt) if isinstance(t, torch.Tensor) and t.dtype == torch.float32 else t
        for t in (hidden, weight, bias)
    ]
    return cast[0], cast[1], cast[2], True


def linear_worst_of_k_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    dim: Optional[int] = None,
    temperature: float = 0.0,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    class_weight: Optional[torch.Tensor] = None,
    chunk_size: Optional[int] = None,
    robust_eps: float = 0.0,
    robust_p: float = 2.0,
    return_index: bool = False,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    r"""Worst-of-k cross-entropy of a linear head, without materialising its logits.

    Computes exactly ``worst_of_k_cross_entropy(F.linear(hidden, weight, bias), target,
    dim=dim, temperature=..., label_smoothing=..., ignore_index=..., reduction=...,
    weight=class_weight)`` (and, with ``dim=None``, ``F.cross_entropy(F.linear(hidden, weight,
    bias), target, ...)``), values and gradients for ``hidden``, ``weight`` and ``bias``, while
    holding the logits of only ``chunk_size`` samples (all their k copies) at a time: memory
    O(chunk * k * V + N * H + V * H) instead of O(N * V) for the (k * B, V) logits and their
    gradient. The gradient is computed during the forward (one GEMM for the logits, the fused
    CE kernels over the chunk, then the GEMMs for the gradients) and scaled by the upstream
    gradient in the backward; for ``reduction='none'`` the backward recomputes each chunk's
    logits instead (one more GEMM per chunk).

    Copy layouts (the rule of ``worst_of_k_cross_entropy``):

    * ``dim=None``: ``hidden`` is (N, H) (or a batch-less (H,) with a 0-d target), k = 1, as
      for ``F.cross_entropy``; a 3-D ``hidden`` without ``dim`` raises ValueError;
    * ``dim=0``: (k, B, H), the layout of ``torch.cat`` of k augmented batches viewed as
      (k, B, H); ``dim=1``: (B, k, H). Target (B,) in both.

    Args:
        hidden: the head's inputs, float32 / float16 / bfloat16 / float64.
        weight: the head's (V, H) weight (an ``nn.Linear``'s, or a tied ``nn.Embedding``'s),
            in ``hidden``'s dtype. Its gradient is skipped when it does not require grad.
        target: (B,) integer class indices in [0, V) or ``ignore_index``. (Probability
            targets are not supported here: TypeError.)
        bias: optional (V,) bias.
        dim: the copy dimension: None, 0 or 1 (above).
        temperature: 0 for the hard max over copies, > 0 for the smooth max.
        label_smoothing: ε in [0, 1], PyTorch's meaning.
        ignore_index: target value of samples to skip (``'mean'`` divides by the number of
            samples not ignored, over the whole batch).
        reduction: ``'mean'`` | ``'sum'`` | ``'none'`` ((B,) per-sample losses).
        class_weight: optional (C,) class weights, ``F.cross_entropy``'s ``weight`` (renamed
            here because ``weight`` is the head's): ``'mean'`` divides by the sum of the
            selected samples' class weights. Not differentiable.
        chunk_size: samples per chunk (each with its k copies); by default about 2^22 logits
            elements per chunk. Any value gives the same result up to rounding.
        robust_eps, robust_p: the weight-robust option (k = 1 only, i.e. ``dim=None``): with
            ``robust_eps > 0`` the loss is the exact worst case over perturbations of each
            weight row of p-norm at most ``robust_eps``, i.e. ``weight_robust_cross_entropy(
            F.linear(hidden, weight, bias), target, weight_perturbation_radius(hidden,
            robust_eps, robust_p))``; the gradient into ``hidden`` includes the radius term.
        return_index: also return the (B,) int64 index of each sample's worst copy.

    Returns:
        The loss (in ``hidden``'s dtype; float32 under ``torch.autocast``, as
        ``F.cross_entropy`` gives there), and with ``return_index`` the worst-copy indices.

    Raises:
        TypeError, ValueError for malformed arguments (naming the argument); IndexError for a
        target out of range (while ``fm.set_validation`` is on). Second derivatives are not
        supported: a backward with ``create_graph=True`` raises RuntimeError (never a silent
        wrong Hessian); forward-mode AD (``torch.func.jvp``) raises RuntimeError too.
    """
    hidden = v.check_tensor(hidden, "hidden")
    v.check_float_dtype(hidden, "hidden")
    target = v.check_tensor(target, "target")
    if target.dtype.is_floating_point:
        raise TypeError(
            "target: the fused linear head takes (B,) integer class indices; probability "
            f"targets ({target.dtype}) are not supported here (use worst_of_k_cross_entropy "
            "on F.linear's logits)"
        )
    _refuse_forward_ad(hidden, weight, bias)
    hidden, weight, bias, autocast = _autocast_inputs(hidden, weight, bias)
    V, _H = _check_head(hidden, weight, bias)
    h3, copies_first, target, batchless = _as_copies(hidden, target, dim)
    axis = 1 if copies_first else 0
    B, k = h3.shape[axis], h3.shape[1 - axis]
    if k == 0:
        raise ValueError("hidden: the copy dimension is empty (k = 0); need at least one copy")
    temperature = v.check_nonnegative(temperature, "temperature")
    label_smoothing = v.check_label_smoothing(label_smoothing)
    v.check_reduction(reduction)
    if not isinstance(return_index, bool):
        raise TypeError(f"return_index: expected a bool, got {type(return_index).__name__}")
    target = v.check_class_target(target, B, V, ignore_index, hidden)
    try:
        cw = tc.check_class_weight(class_weight, V, hidden)
    except (TypeError, ValueError) as exc:  # name the argument as this function calls it
        raise type(exc)(str(exc).replace("weight:", "class_weight:", 1)) from None
    chunk = _check_chunk_size(chunk_size)
    chunk = chunk if chunk is not None else default_chunk_size(B, k, _H, V)
    robust_eps = v.check_nonnegative(robust_eps, "robust_eps")
    robust_q = dual_exponent(robust_p)
    if robust_eps > 0 and k != 1:
        raise ValueError(
            f"robust_eps: the weight-robust option needs k = 1 (dim=None), got k = {k} copies"
        )
    grad_on = torch.is_grad_enabled()
    need = [
        grad_on and hidden.requires_grad,
        grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad,
    ]
    loss, index, *_ = linear_worst_of_k_ce(
        h3,
        weight,
        bias,
        target,
        cw,
        copies_first,
        temperature,
        label_smoothing,
        ignore_index,
        reduction,
        chunk,
        robust_eps,
        robust_q,
        need,
    )
    # under autocast the CE of half logits runs (and returns) in float32, as F.cross_entropy's
    half = hidden.dtype in (torch.float16, torch.bfloat16)
    loss = loss.to(torch.float32 if autocast and half else hidden.dtype)
    if batchless:
        loss, index = loss.reshape(()), index.reshape(())
    return (loss, index) if return_index else loss


class LinearWorstOfKCrossEntropy(LossModule):
    """A linear head and its worst-of-k cross-entropy in one fused module.

    Wraps an existing ``nn.Linear`` head (or an ``nn.Embedding`` whose weight is the tied
    output embedding) and replaces ``loss_fn(head(hidden), target)`` in one line; the head's
    parameters are read at every call (so tied weights, ``.to()`` and optimiser updates are
    seen), and are not copied. Options are those of
    :func:`linear_worst_of_k_cross_entropy`; ``class_weight`` is kept as a buffer.

    Example::

        head = nn.Linear(512, vocab)                       # or lm.lm_head
        loss_fn = fm.LinearWorstOfKCrossEntropy(head, dim=0)
        h = backbone(torch.cat(copies))                    # (k * B, T, 512)
        loss = loss_fn(h.view(k, B * T, 512), y.view(-1))  # no (k * B * T, vocab) logits
    """

    def __init__(
        self,
        head: Union[nn.Linear, nn.Embedding],
        *,
        dim: Optional[int] = None,
        temperature: float = 0.0,
        label_smoothing: float = 0.0,
        ignore_index: int = -100,
        reduction: str = "mean",
        class_weight: Optional[torch.Tensor] = None,
        chunk_size: Optional[int] = None,
        robust_eps: float = 0.0,
        robust_p: float = 2.0,
    ) -> None:
        if not isinstance(head, (nn.Linear, nn.Embedding)):
            raise TypeError(
                f"head: expected an nn.Linear (or a tied nn.Embedding), got {type(head).__name__}"
            )
        super().__init__(
            dim=dim,
            temperature=temperature,
            label_smoothing=label_smoothing,
            ignore_index=ignore_index,
            reduction=reduction,
            chunk_size=chunk_size,
            robust_eps=robust_eps,
            robust_p=robust_p,
        )
        self.head = head
        self.register_buffer("class_weight", class_weight)

    def forward(
        self, hidden: torch.Tensor, target: torch.Tensor, return_index: bool = False
    ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        return linear_worst_of_k_cross_entropy(
            hidden,
            self.head.weight,
            target,
            getattr(self.head, "bias", None),
            class_weight=self.class_weight,
            return_index=return_index,
            **self.options(),
        )
