"""Loads the compiled kernels (fastmargin._C) and registers fake kernels and autograd.

Schemas live in csrc/ops.cpp; CPU and CUDA kernels register themselves when _C loads. What is
added here makes every op traceable by torch.compile (register_fake). The ops' reverse-mode
autograd is registered in C++ (csrc/autograd/*_autograd.cpp: a C++ node costs far less host time
per call than one registered from Python); what those nodes call with create_graph=True is
defined here: the composite backward ops, and the autograd of the margin's backward op.

A backward that autograd runs with ``create_graph=True`` (grad mode on) must itself be
differentiable; the fused backward ops are not (in the logits), so there each backward
differentiates the op's composite form (``fastmargin._composite``) instead. The first-order
backward (grad mode off, as in every ``.backward()`` and compiled graph) is the fused op.
"""

from __future__ import annotations

import torch

from . import _composite as comp
from ._loader import load_extension

# Loading fastmargin._C registers the ops; a failure names its cause and fix.
extension = load_extension()
ops = torch.ops.fastmargin


def stats_dtype(logits: torch.Tensor) -> torch.dtype:
    """Dtype of per-row statistics: float64 for float64 logits, float32 otherwise."""
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


# --- worst_of_k_ce -------------------------------------------------------------------------


@torch.library.register_fake("fastmargin::worst_of_k_ce_fwd")
def _worst_of_k_ce_fwd_fake(
    logits, target, radius, temperature, label_smoothing, ignore_index, class_weight=None
):
    # (B, k, C) rows, or 4-D spatial rows (N, S, k, C): B = N * S (csrc/include/fastmargin/
    # worst_of_k_ce.h).
    B, k = logits.shape[:-2].numel(), logits.shape[-2]
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
    grad_loss, logits, target, radius, lse, weight, label_smoothing, ignore_index, class_weight=None
):
    return torch.empty_like(logits)


@torch.library.register_fake("fastmargin::worst_of_k_ce_bwd_inplace")
def _worst_of_k_ce_bwd_inplace_fake(
    grad_loss, logits, target, radius, lse, weight, label_smoothing, ignore_index, class_weight=None
):
    return None


# Autograd of worst_of_k_ce_fwd is registered in C++ (csrc/autograd/worst_of_k_ce_autograd.cpp:
# a C++ node costs a fraction of a Python one per call). Its backward with create_graph=True
# calls the op below, whose kernel differentiates the composite form.
torch.library.define(
    "fastmargin::worst_of_k_ce_bwd_composite",
    "(Tensor grad_loss, Tensor logits, Tensor target, Tensor? radius, Tensor? class_weight, "
    "Tensor index, float temperature, float label_smoothing, int ignore_index, "
    "bool need_logits, bool need_target, bool need_radius) -> (Tensor, Tensor, Tensor)",
)


@torch.library.impl("fastmargin::worst_of_k_ce_bwd_composite", "CompositeImplicitAutograd")
def _worst_of_k_ce_bwd_composite(
    grad_loss,
    logits,
    target,
    radius,
    class_weight,
    index,
    temperature,
    label_smoothing,
    ignore_index,
    need_logits,
    need_target,
    need_radius,
):
    """(grad_logits, grad_target, grad_radius) as a differentiable graph; an empty (0,) tensor
    for a gradient not asked for (the C++ backward reads only those it asked for)."""

    def forward(z, t, r):
        return comp.worst_of_k_ce(
            z, t, r, temperature, label_smoothing, ignore_index, class_weight, index
        )[0]

    grads = comp.differentiable_backward(
        forward, (logits, target, radius), (need_logits, need_target, need_radius), grad_loss
    )
    return tuple(grad_loss.new_empty((0,)) if g is None else g for g in grads)


# --- multiclass_margin ---------------------------------------------------------------------


def stats_dtype_of(dtype: torch.dtype) -> torch.dtype:
    """:func:`stats_dtype` for a dtype rather than a tensor."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("fastmargin::multiclass_margin_fwd")
def _multiclass_margin_fwd_fake(logits, target):
    N = logits.shape[0]
    return (
        logits.new_empty((N,), dtype=stats_dtype(logits)),
        logits.new_empty((N,), dtype=torch.long),
    )


@torch.library.register_fake("fastmargin::multiclass_margin_bwd")
def _multiclass_margin_bwd_fake(grad_margin, target, runner_up, num_classes, dtype):
    return grad_margin.new_empty((grad_margin.shape[0], num_classes), dtype=dtype)


# Autograd of multiclass_margin_fwd is registered in C++ (csrc/autograd/
# multiclass_margin_autograd.cpp); with create_graph=True its backward calls
# multiclass_margin_bwd through the autograd registered here.


def _multiclass_margin_bwd_setup_context(ctx, inputs, output):
    _grad_margin, target, runner_up, num_classes, _dtype = inputs
    ctx.save_for_backward(target, runner_up)
    ctx.num_classes = num_classes


def _multiclass_margin_bwd_backward(ctx, grad_grad):
    # The backward is linear in grad_margin (and piecewise constant in the logits):
    # d<gg, grad>/d grad_margin[n] = gg[n, y] - gg[n, r], NaN where the target was invalid
    # (the kernel's rule: only in-range classes take part).
    target, runner_up = ctx.saved_tensors
    C = ctx.num_classes
    gg = grad_grad.to(stats_dtype_of(grad_grad.dtype))

    def at(index):
        valid = (index >= 0) & (index < C)
        picked = gg.gather(1, index.clamp(0, C - 1).unsqueeze(1)).squeeze(1)
        return valid, torch.where(valid, picked, torch.zeros_like(picked))

    y_valid, at_y = at(target)
    _r_valid, at_r = at(runner_up)
    out = torch.where(y_valid, at_y - at_r, torch.full_like(at_y, float("nan")))
    return out, None, None, None, None


torch.library.register_autograd(
    "fastmargin::multiclass_margin_bwd",
    _multiclass_margin_bwd_backward,
    setup_context=_multiclass_margin_bwd_setup_context,
)


# --- all_layer_perturb ---------------------------------------------------------------------


def _non_overlapping_and_dense(t: torch.Tensor) -> bool:
    import torch._prims_common as prims  # the helper's name differs between torch versions

    fn = (
        getattr(prims, "is_non_overlapping_and_dense_or_false", None)
        or prims.is_non_overlapping_and_dense
    )
    return fn(t)


def _example_major(t: torch.Tensor) -> bool:
    """Mirror of example_major() in csrc/include/fastmargin/all_layer_perturb.h: every example
    is one flat memory range (non-overlapping, dense, batch dim outermost)."""
    if t.dim() == 0 or not (t.numel() < 2 or _non_overlapping_and_dense(t)):
        return False
    B = t.shape[0]
    return B <= 1 or t.numel() == 0 or t.stride(0) == t.numel() // B


def _perturb_working_layout(u: torch.Tensor) -> torch.Tensor:
    return u if _example_major(u) else u.contiguous()


@torch.library.register_fake("fastmargin::all_layer_perturb_fwd")
def _all_layer_perturb_fwd_fake(u, delta):
    w = _perturb_working_layout(u)
    return torch.empty_like(w), u.new_empty((u.shape[0],), dtype=stats_dtype(u))


@torch.library.register_fake("fastmargin::all_layer_perturb_bwd")
def _all_layer_perturb_bwd_fake(grad, u, delta, norm, need_grad_u, need_grad_delta):
    w = _perturb_working_layout(u)
    grad_u = torch.empty_like(w) if need_grad_u else u.new_empty((0,))
    grad_delta = (
        torch.empty_like(w, dtype=delta.dtype) if need_grad_delta else delta.new_empty((0,))
    )
    return grad_u, grad_delta


# Autograd of all_layer_perturb_fwd is registered in C++ (csrc/autograd/
# all_layer_perturb_autograd.cpp), as the worst-of-k cross-entropy's is; with create_graph=True
# its backward calls the op below, whose kernel differentiates the composite form.
torch.library.define(
    "fastmargin::all_layer_perturb_bwd_composite",
    "(Tensor grad, Tensor u, Tensor delta, bool need_grad_u, bool need_grad_delta) "
    "-> (Tensor, Tensor)",
)


@torch.library.impl("fastmargin::all_layer_perturb_bwd_composite", "CompositeImplicitAutograd")
def _all_layer_perturb_bwd_composite(grad, u, delta, need_grad_u, need_grad_delta):
    """(grad_u, grad_delta) as a differentiable graph; an empty (0,) tensor for a gradient not
    asked for (the C++ backward reads only those it asked for), zeros for one asked for that
    the graph does not reach."""
    inputs, needs = (u, delta), (need_grad_u, need_grad_delta)
    grads = comp.differentiable_backward(comp.all_layer_perturb, inputs, needs, grad)
    return tuple(
        g if g is not None else (torch.zeros_like(t) if need else grad.new_empty((0,)))
        for g, t, need in zip(grads, inputs, needs)
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


# Autograd of weight_noise_ce_fwd is registered in C++ (csrc/autograd/
# weight_noise_ce_autograd.cpp); with create_graph=True its backward calls the op below, whose
# kernel differentiates the composite form (the same noise, the same selected copies).
torch.library.define(
    "fastmargin::weight_noise_ce_bwd_composite",
    "(Tensor grad_loss, Tensor logits, Tensor target, Tensor scale, Tensor philox, Tensor index, "
    "int k, float temperature, float label_smoothing, int ignore_index, bool need_grad_logits, "
    "bool need_grad_scale) -> (Tensor, Tensor)",
)


@torch.library.impl("fastmargin::weight_noise_ce_bwd_composite", "CompositeImplicitAutograd")
def _weight_noise_ce_bwd_composite(
    grad_loss,
    logits,
    target,
    scale,
    philox,
    index,
    k,
    temperature,
    label_smoothing,
    ignore_index,
    need_grad_logits,
    need_grad_scale,
):
    """(grad_logits, grad_scale) as a differentiable graph; an empty (0,) tensor for a gradient
    not asked for (the C++ backward reads only those it asked for), zeros for one asked for that
    the graph does not reach."""

    def forward(z, s):
        return comp.weight_noise_ce(
            z, target, s, philox, k, temperature, label_smoothing, ignore_index, index
        )[0]

    inputs, needs = (logits, scale), (need_grad_logits, need_grad_scale)
    grads = comp.differentiable_backward(forward, inputs, needs, grad_loss)
    return tuple(
        g if g is not None else (torch.zeros_like(t) if need else grad_loss.new_empty((0,)))
        for g, t, need in zip(grads, inputs, needs)
    )
