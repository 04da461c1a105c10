"""Checks for the parts of F.cross_entropy's contract beyond class indices: probability
(soft) targets and class weights. Metadata only (no host synchronisation)."""

from __future__ import annotations

import torch

from . import _validation as v


def stats_dtype(logits: torch.Tensor) -> torch.dtype:
    """float64 for float64 logits, float32 otherwise (the kernels' accumulation dtype)."""
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def is_probability_target(target: object) -> bool:
    """A floating target holds class probabilities; an integer one holds class indices."""
    return isinstance(target, torch.Tensor) and target.dtype.is_floating_point


def check_probability_target(
    target: torch.Tensor, logits: torch.Tensor, x: torch.Tensor, dim: int
) -> torch.Tensor:
    """Checks a probability target against ``logits`` (as given, copies along ``dim``) and
    ``x`` (their (B, k, C) view) and returns it as the kernel reads it: (B, C) shared by the
    copies, or (B, k, C) one row per copy, with a contiguous class dim, in the logits' dtype or
    float32 (other floating dtypes are converted; float64 logits take float64 targets).
    Row values are not checked: rows that are not distributions are the caller's
    responsibility, as in F.cross_entropy.
    """
    v.check_same_device(target, logits, "target")
    B, k, C = x.shape
    if target.dim() == 1:  # class indices of the wrong dtype, most likely
        raise TypeError(
            f"target: expected an integer dtype for (B,) class indices, got {target.dtype} "
            f"(probability targets are floating of shape ({B}, {C}) or one row per copy)"
        )
    per_copy_shape = (k, B, C) if dim in (0, -3) else (B, k, C)
    if target.dim() == 2 and tuple(target.shape) == (B, C):
        t = target
    elif target.dim() == 3 and tuple(target.shape) == per_copy_shape:
        t = target.transpose(0, 1) if dim in (0, -3) else target
    else:
        raise ValueError(
            f"target: probability targets must have shape ({B}, {C}) (shared by the copies) "
            f"or {per_copy_shape} (one row per copy, like the logits); got "
            f"{tuple(target.shape)} (class-index targets must be an integer dtype of shape "
            f"({B},))"
        )
    allowed = {logits.dtype, stats_dtype(logits)}
    if t.dtype not in allowed:
        t = t.to(stats_dtype(logits))
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        t = t.contiguous()
    return t


def check_class_weight(
    weight: object | None, num_classes: int, logits: torch.Tensor
) -> torch.Tensor | None:
    """Checks ``weight=`` (None or a (C,) floating tensor on the logits' device) and returns it
    contiguous in the statistics dtype. Gradients do not flow into class weights (as in
    F.cross_entropy with class indices), so a weight that requires grad is rejected."""
    if weight is None:
        return None
    weight = v.check_tensor(weight, "weight")
    if not weight.dtype.is_floating_point:
        raise TypeError(f"weight: expected a floating dtype, got {weight.dtype}")
    if weight.dim() != 1 or weight.shape[0] != num_classes:
        raise ValueError(
            f"weight: expected a 1-D tensor of {num_classes} class weights, got shape "
            f"{tuple(weight.shape)}"
        )
    v.check_same_device(weight, logits, "weight")
    if weight.requires_grad:
        raise ValueError(
            "weight: gradients with respect to class weights are not supported; pass "
            "weight.detach()"
        )
    return weight.to(stats_dtype(logits)).contiguous()
