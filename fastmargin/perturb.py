"""The all-layer perturbation of AMO (Wei & Ma 2020): u' = u + ||u_b||_2 * delta, fused."""

from __future__ import annotations

import torch

from . import _routes as routes
from . import _validation as v

_LOW = (torch.float16, torch.bfloat16)


def all_layer_perturb(u: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    r"""All-layer perturbation: :math:`u'_b = u_b + \lVert u_b \rVert_2 \, \delta_b`.

    The norm is taken per example b over every non-batch dim of ``u`` and is NOT detached, as
    in the official AMO code, so the gradients are

    * :math:`\partial/\partial u_b = g_b + \tfrac{u_b}{\lVert u_b\rVert}\langle g_b,
      \delta_b\rangle` (the second term is taken as 0 where :math:`\lVert u_b\rVert = 0`, a
      valid subgradient that keeps every gradient finite), and
    * :math:`\partial/\partial \delta_b = \lVert u_b\rVert \, g_b`,

    with g the gradient of the output. One fused op (CPU and CUDA): a per-example reduction
    then an elementwise pass, fp32 accumulation (fp64 for float64).

    Args:
        u: (B, ...) activations, float32 / float16 / bfloat16 (float64 for gradcheck), any
            shape with a leading batch dim. Contiguous and channels_last tensors (any tensor
            whose examples are each one dense block of memory) are read in place; other
            layouts are copied once.
        delta: the perturbation, u's shape. Its dtype may be wider than u's (e.g. float32
            deltas for bfloat16 activations under autocast): a float32 delta is used as is
            for float16 / bfloat16 u; any other dtype mismatch is converted to u's dtype
            (differentiably) first.

    Returns:
        u' with u's dtype and shape (and u's memory layout when it is read in place).

    Autograd: into ``u`` and ``delta``. First order runs the fused backward op; second and
    higher order (``create_graph=True``), forward mode (``torch.func.jvp``,
    ``torch.autograd.forward_ad``) and ``torch.func.grad`` / ``vmap`` are exact, computed from
    the same math in PyTorch ops.
    """
    v.check_tensor(u, "u")
    v.check_tensor(delta, "delta")
    v.check_float_dtype(u, "u")
    v.check_float_dtype(delta, "delta")
    if u.dim() == 0:
        raise ValueError("u: expected a tensor with a leading batch dim (B, ...), got a 0-D tensor")
    if delta.shape != u.shape:
        raise ValueError(
            f"delta: expected the shape of u {tuple(u.shape)}, got {tuple(delta.shape)}"
        )
    v.check_same_device(delta, u, "delta")
    if delta.dtype != u.dtype and not (u.dtype in _LOW and delta.dtype == torch.float32):
        delta = delta.to(u.dtype)
    out, _norm = routes.all_layer_perturb_fwd(u, delta)
    return out
