"""The shape rule of worst_of_k_cross_entropy, and the (B, k, C) rows its kernels read.

* Without a copy dimension (``dim=None``) the call takes exactly the shapes F.cross_entropy
  takes: (C,) with a () class index or (C,) probabilities; (N, C) with (N,) or (N, C); spatial
  (N, C, d1, ...) with (N, d1, ...) or the logits' own shape. Every position is one sample with
  k = 1 copy: the rows are (N * d1 * ..., 1, C). Batch-less and (N, C) logits are viewed, never
  copied; spatial logits are copied once, transposed so that the class dim is contiguous
  (unless they already lie class-last in memory, e.g. channels-last, where the rows are a view).
  In eager mode that copy is the helper op of csrc/cpu/class_last.cpp (:class:`_ClassLast`): on
  the CPU (and on CUDA for C <= 32) it makes class-major rows (memory (C, N * d1 * ...), a block
  copy), which the kernels read in place and whose gradient maps back to the logits' shape as a
  view. (The common call, int64 class indices on contiguous logits, takes the C fast path
  instead, which on the CPU copies nothing: csrc/autograd/worst_of_k_ce_autograd.cpp.)
* With ``dim`` named, the logits are 3-D and hold k copies along it: (k, B, C) for dim=0,
  (B, k, C) for dim=1; the rows are a view in either layout.

The class dim of the rows has stride 1 (one copy is made if it is strided), except for the
class-major spatial rows above.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from . import _target_checks as tc
from . import _validation as v
from ._composite import transform_active


@dataclass
class Rows:
    """The logits and target as the kernels read them, and the way back to the caller's shapes."""

    x: torch.Tensor  # (B, k, C), class dim contiguous
    target: torch.Tensor  # (B,) class indices, or (B, C) / (B, k, C) probabilities
    loss_shape: Tuple[int, ...]  # the per-sample loss's shape (reduction 'none')


def _class_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous() if x.shape[2] > 1 and x.stride(2) != 1 else x


def rows(logits: torch.Tensor, target: object, dim: Optional[int]) -> Rows:
    """Checks ``logits`` / ``target`` shapes against the shape rule and returns the rows."""
    v.check_tensor(logits, "logits")
    v.check_float_dtype(logits, "logits")
    target = v.check_tensor(target, "target")
    v.check_same_device(target, logits, "target")
    if target.dtype.is_complex or target.dtype == torch.bool:
        raise TypeError(
            f"target: expected an integer dtype (class indices) or a floating one (class "
            f"probabilities), got {target.dtype}"
        )
    if check_copy_dim(dim) is None:
        return _rows_like_cross_entropy(logits, target)
    return _rows_of_copies(logits, target, dim)


def check_copy_dim(dim: object) -> Optional[int]:
    """None (F.cross_entropy's shapes) or the copy dim of 3-D logits: 0 / -3 or 1 / -2."""
    if dim is not None and (isinstance(dim, bool) or dim not in (0, 1, -3, -2)):
        raise ValueError(
            f"dim: expected 0 (copies first, (k, B, C)), 1 ((B, k, C)) or None (no copy "
            f"dimension: F.cross_entropy's shapes), got {dim!r}"
        )
    return dim


def _rows_of_copies(logits: torch.Tensor, target: torch.Tensor, dim: int) -> Rows:
    v.check_logits(logits, 3, "(B, k, C) for dim=1 or (k, B, C) for dim=0")
    copies_first = dim in (0, -3)
    x = _class_dim_contiguous(logits.transpose(0, 1) if copies_first else logits)
    B, k, C = x.shape
    if k == 0:
        raise ValueError("logits: the copy dimension is empty (k = 0); need at least one copy")
    if tc.is_probability_target(target):
        target = tc.check_probability_target(target, logits, x, dim)
    elif target.dim() != 1 or target.shape[0] != B:
        raise ValueError(
            f"target: expected shape ({B},) (one class index per sample; the copies along "
            f"dim={dim} share it), got {tuple(target.shape)}"
        )
    return Rows(x, target, (B,))


def _rows_like_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> Rows:
    if logits.dim() == 0:
        raise ValueError(
            "logits: expected (C,), (N, C) or (N, C, d1, ...) (F.cross_entropy's shapes), "
            "got a 0-d tensor"
        )
    soft = tc.is_probability_target(target)
    if logits.dim() == 1:
        (C,) = logits.shape
        samples: Tuple[int, ...] = ()
        x = _class_dim_contiguous(logits[None, None])
    else:
        C = logits.shape[1]
        samples = (logits.shape[0], *logits.shape[2:])
        # A view for (N, C) and for logits that lie class-last in memory; a copy otherwise.
        x = _class_last(logits, math.prod(samples))
    expected = tuple(logits.shape) if soft else samples
    if logits.dim() == 1 and not soft and tuple(target.shape) == (1,):
        expected = (1,)  # F.cross_entropy takes a (1,) class index for (C,) logits too
    if tuple(target.shape) != expected:
        # Floating "class indices"; for 3-D logits more likely probabilities shared by copies.
        if soft and tuple(target.shape) == samples and logits.dim() != 3:
            raise TypeError(
                f"target: expected an integer dtype for class indices of shape {samples}, "
                f"got {target.dtype} (probability targets have the logits' shape)"
            )
        raise ValueError(_target_shape_message(logits, target, expected, soft))
    if soft:
        t = target[None] if logits.dim() == 1 else target.movedim(1, -1).reshape(x.shape[0], C)
        t = tc.check_probability_target(t, x, x, 1)
    else:
        t = target.reshape(-1)
    return Rows(x, t, samples)


def _class_last(t: torch.Tensor, rows: int) -> torch.Tensor:
    """(N, C, d1, ...) -> (rows = N * d1 * ..., 1, C): a view where the memory allows (class-last
    logits, (N, C)), else one copy: class-major rows from :class:`_ClassLast`, or rows with a
    contiguous class dim from movedim + reshape."""
    if t.dim() < 3 or not _use_class_major(t):
        return _class_dim_contiguous(t.movedim(1, -1).reshape(rows, 1, t.shape[1]))
    return _ClassLast.apply(t)


def _use_class_major(t: torch.Tensor) -> bool:
    """Contiguous (N, C, d1, ...) with more than one class and position, where movedim + reshape
    would transpose. Eager only: traced graphs and AD transforms keep the PyTorch ops, which the
    compilers and functorch understand (the helper op has no fake kernel or batching rule)."""
    return (
        t.is_contiguous()
        and t.shape[1] > 1
        and t.numel() > t.shape[0] * t.shape[1]
        and not torch.compiler.is_compiling()
        and not transform_active()
    )


class _ClassLast(torch.autograd.Function):
    """Contiguous (N, C, d1, ...) -> (N * d1 * ..., 1, C) rows through the helper op
    ``fastmargin::_class_last`` (class-major on the CPU, and on CUDA for C <= 32; contiguous
    elsewhere); the rows' gradient goes back as a view of the logits' shape (a leaf's
    AccumulateGrad copies it into the leaf's layout, a block copy for class-major rows)."""

    @staticmethod
    def forward(ctx, t):
        ctx.shape = tuple(t.shape)
        return torch.ops.fastmargin._class_last(t)

    @staticmethod
    def backward(ctx, grad):
        N, C, *spatial = ctx.shape
        return grad.reshape(N, *spatial, C).movedim(-1, 1)


def _target_shape_message(
    logits: torch.Tensor, target: torch.Tensor, expected: Tuple[int, ...], soft: bool
) -> str:
    kind = "class probabilities (the logits' shape)" if soft else "class indices"
    message = (
        f"target: for logits of shape {tuple(logits.shape)} without dim, F.cross_entropy's "
        f"shape rule expects {kind} of shape {expected}, got {tuple(target.shape)}"
    )
    if logits.dim() == 3 and target.dim() == (2 if soft else 1):
        message += (
            ". If the 3-D logits hold k copies of each sample, pass dim=0 for (k, B, C) or "
            "dim=1 for (B, k, C)"
        )
    return message
