"""Loads the compiled kernels (fastmargin._C) and registers fake kernels and autograd.

Schemas live in csrc/ops.cpp; CPU and CUDA kernels register themselves when _C loads. What is
added here makes every op traceable by torch.compile (register_fake) and differentiable
(register_autograd, whose backward is itself a registered op).
"""

from __future__ import annotations

import torch

try:
    from . import _C  # noqa: F401  (loading it registers the ops)
except ImportError as exc:  # pragma: no cover - only without a build
    raise ImportError(
        "fastmargin._C is not built. Run `make build` (or `pip install -e .`) in the "
        "fastmargin checkout first."
    ) from exc

ops = torch.ops.fastmargin


def stats_dtype(logits: torch.Tensor) -> torch.dtype:
    """Dtype of per-row statistics: float64 for float64 logits, float32 otherwise."""
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


# --- worst_of_k_ce -------------------------------------------------------------------------


@torch.library.register_fake("fastmargin::worst_of_k_ce_fwd")
def _worst_of_k_ce_fwd_fake(logits, target, radius, temperature, label_smoothing, ignore_index):
    B, k = logits.shape[0], logits.shape[1]
    f = stats_dtype(logits)
    return (
        logits.new_empty((B,), dtype=f),
        logits.new_empty((B, k), dtype=f),
        logits.new_empty((B, k), dtype=f),
        logits.new_empty((B,), dtype=torch.long),
        logits.new_empty((B if radius is not None else 0,), dtype=f),
    )


@torch.library.register_fake("fastmargin::worst_of_k_ce_bwd")
def _worst_of_k_ce_bwd_fake(
    grad_loss, logits, target, radius, lse, weight, label_smoothing, ignore_index
):
    return torch.empty_like(logits)


def _worst_of_k_ce_setup_context(ctx, inputs, output):
    logits, target, radius, _temperature, label_smoothing, ignore_index = inputs
    _loss, lse, weight, _index, dradius = output
    ctx.save_for_backward(logits, target, radius, lse, weight, dradius)
    ctx.label_smoothing = label_smoothing
    ctx.ignore_index = ignore_index
    ctx.mark_non_differentiable(lse, weight, dradius)


def _worst_of_k_ce_backward(ctx, grad_loss, _g_lse, _g_weight, _g_index, _g_dradius):
    logits, target, radius, lse, weight, dradius = ctx.saved_tensors
    grad_logits = grad_radius = None
    if grad_loss is None:
        return None, None, None, None, None, None
    grad_loss = grad_loss.to(lse.dtype).contiguous()
    if ctx.needs_input_grad[0]:
        grad_logits = ops.worst_of_k_ce_bwd(
            grad_loss, logits, target, radius, lse, weight, ctx.label_smoothing, ctx.ignore_index
        )
    if radius is not None and ctx.needs_input_grad[2]:
        grad_radius = grad_loss * dradius
    return grad_logits, None, grad_radius, None, None, None


torch.library.register_autograd(
    "fastmargin::worst_of_k_ce_fwd",
    _worst_of_k_ce_backward,
    setup_context=_worst_of_k_ce_setup_context,
)


# --- weight_noise_ce -----------------------------------------------------------------------


@torch.library.register_fake("fastmargin::weight_noise_ce_fwd")
def _weight_noise_ce_fwd_fake(
    logits, target, scale, philox, k, temperature, label_smoothing, ignore_index
):
    N = logits.shape[0]
    f = stats_dtype(logits)
    return (
        logits.new_empty((N,), dtype=f),
        logits.new_empty((N, k), dtype=f),
        logits.new_empty((N, k), dtype=f),
        logits.new_empty((N,), dtype=torch.long),
    )


@torch.library.register_fake("fastmargin::weight_noise_ce_bwd")
def _weight_noise_ce_bwd_fake(
    grad_loss, logits, target, scale, philox, lse, weight, label_smoothing, ignore_index
):
    return torch.empty_like(logits), scale.new_empty((logits.shape[0],))


@torch.library.register_fake("fastmargin::weight_noise_normal")
def _weight_noise_normal_fake(philox, n, k, c):
    return philox.new_empty((n, k, c), dtype=torch.float32)


def _weight_noise_ce_setup_context(ctx, inputs, output):
    logits, target, scale, philox, _k, _temperature, label_smoothing, ignore_index = inputs
    _loss, lse, weight, _index = output
    # The noise is not saved: the backward regenerates it from the (2,) philox state.
    ctx.save_for_backward(logits, target, scale, philox, lse, weight)
    ctx.label_smoothing = label_smoothing
    ctx.ignore_index = ignore_index
    ctx.mark_non_differentiable(lse, weight)


def _weight_noise_ce_backward(ctx, grad_loss, _g_lse, _g_weight, _g_index):
    none = (None,) * 8
    if grad_loss is None or not (ctx.needs_input_grad[0] or ctx.needs_input_grad[2]):
        return none
    logits, target, scale, philox, lse, weight = ctx.saved_tensors
    grad_loss = grad_loss.to(lse.dtype).contiguous()
    # One pass gives both gradients (the scale's is a by-product of the logits' pass).
    grad_logits, grad_scale = ops.weight_noise_ce_bwd(
        grad_loss, logits, target, scale, philox, lse, weight, ctx.label_smoothing, ctx.ignore_index
    )
    return (
        grad_logits if ctx.needs_input_grad[0] else None,
        None,
        grad_scale if ctx.needs_input_grad[2] else None,
        None,
        None,
        None,
        None,
        None,
    )


torch.library.register_autograd(
    "fastmargin::weight_noise_ce_fwd",
    _weight_noise_ce_backward,
    setup_context=_weight_noise_ce_setup_context,
)
