"""The multiclass margin m = z_y - max_{c != y} z_c as a fused, differentiable op."""

from __future__ import annotations

import torch

from . import _routes as routes
from . import _validation as v


def multiclass_margin(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    r"""Per-sample multiclass margins :math:`m_n = z_{n,y_n} - \max_{c \ne y_n} z_{n,c}`.

    One read of the logits (fused CPU / CUDA kernel); the backward is
    :math:`\partial m_n / \partial z_{n,y_n} = +1` and :math:`-1` at the runner-up class
    :math:`r_n = \arg\max_{c \ne y_n} z_{n,c}` (ties go to the lowest index), 0 elsewhere. Only
    the (N,) runner-up indices are saved for the backward, not the logits.

    There is no ``ignore_index``: every target must be a class in [0, C). With validation on
    (``fm.set_validation``) an out-of-range target raises IndexError; with it off that sample's
    margin (and its gradient row) is NaN and nothing out of bounds is read. A NaN logit in a row
    makes its margin NaN. Classes masked with -inf are fine (a row whose other classes are all
    -inf has margin +inf).

    Args:
        logits: (N, C) floating logits with C >= 2 (float32, float16, bfloat16 or float64);
            a strided class dim is copied once.
        target: (N,) integer class indices in [0, C).

    Returns:
        (N,) margins in the logits' dtype (computed in float32, float64 for float64 logits).

    Raises:
        TypeError / ValueError / RuntimeError for malformed arguments (C < 2 is a ValueError),
        IndexError for an out-of-range target while validation is on.

    Autograd: first order runs the fused backward op, whose own backward is registered, so
    second and higher order (``create_graph=True``) are exact (the margin is piecewise linear:
    its second derivative in the logits is 0, so the gradient of a loss linear in the margins
    has no graph, as for PyTorch's own gather or max). Forward mode (``torch.func.jvp``,
    ``torch.autograd.forward_ad``) and ``torch.func.grad`` / ``vmap`` are exact, computed from
    the same math in PyTorch ops (same runner-up rule).
    """
    x = v.check_rows_of_logits(logits, min_classes=2, why="the multiclass margin (C >= 2)")
    N, C = x.shape
    target = v.check_class_target(target, N, C, None, logits)
    margin, _runner_up = routes.multiclass_margin_fwd(x, target)
    return margin.to(logits.dtype)
