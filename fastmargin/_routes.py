"""The forward ops as the public functions call them: fused, or composite under AD transforms.

Each function takes the arguments of the op of the same name in ``torch.ops.fastmargin`` and
returns its outputs. Normally that is the fused op itself (one cheap check first). While a
forward-mode AD level or a functorch transform is active, the fused ops would give a zero
tangent or no batching rule, so the differentiable forms of ``fastmargin._composite`` compute
the same outputs instead (statistics the public functions do not use come back as None).
"""

from __future__ import annotations

from . import _composite as comp
from ._composite import transform_active  # noqa: F401  (for the public functions)
from ._ops import ops


def worst_of_k_ce_fwd(
    logits, target, radius, temperature, label_smoothing, ignore_index, class_weight=None
):
    if not comp.transform_active():
        return ops.worst_of_k_ce_fwd(
            logits, target, radius, temperature, label_smoothing, ignore_index, class_weight
        )
    loss, index = comp.worst_of_k_ce(
        logits, target, radius, temperature, label_smoothing, ignore_index, class_weight
    )
    return loss, None, None, index, None


def weight_noise_ce_fwd(
    logits, target, scale, philox, k, temperature, label_smoothing, ignore_index
):
    if not comp.transform_active():
        return ops.weight_noise_ce_fwd(
            logits, target, scale, philox, k, temperature, label_smoothing, ignore_index
        )
    loss, index = comp.weight_noise_ce(
        logits, target, scale, philox, k, temperature, label_smoothing, ignore_index
    )
    return loss, None, None, index


def multiclass_margin_fwd(logits, target):
    if not comp.transform_active():
        return ops.multiclass_margin_fwd(logits, target)
    return comp.multiclass_margin(logits, target), None


def all_layer_perturb_fwd(u, delta):
    if not comp.transform_active():
        return ops.all_layer_perturb_fwd(u, delta)
    return comp.all_layer_perturb(u, delta), None
