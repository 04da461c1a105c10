"""Checks shared by the losses that wrap a model's last nn.Linear (the head)."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from . import _validation as v


def check_head_features(features: object, linear: nn.Linear) -> torch.Tensor:
    """(N, in_features) inputs of the wrapped layer; the logits by mistake get a clear error."""
    features = v.check_tensor(features, "features")
    if features.dim() != 2:
        raise ValueError(
            f"features: expected a 2-D (N, D) tensor, got shape {tuple(features.shape)}"
        )
    if features.shape[1] != linear.in_features:
        hint = (
            " (these look like the logits: pass the head's input features, the loss applies "
            "the wrapped nn.Linear itself)"
            if features.shape[1] == linear.out_features
            else ""
        )
        raise ValueError(
            f"features: expected (N, {linear.in_features}) inputs of the wrapped "
            f"nn.Linear({linear.in_features}, {linear.out_features}), got "
            f"{tuple(features.shape)}{hint}"
        )
    return features


def warn_outside_ddp_forward(loss_module: nn.Module) -> None:
    """Warns once per module when the head runs outside the model's forward in a multi-process
    job: under DistributedDataParallel that bypasses DDP.forward and the replicas drift."""
    if getattr(loss_module, "_warned_ddp", False) or not torch.is_grad_enabled():
        return
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        loss_module._warned_ddp = True
        warnings.warn(
            f"{type(loss_module).__name__}: the wrapped nn.Linear is called directly in a "
            "multi-process job; if this runs outside DistributedDataParallel's forward, the "
            "gradients are not synchronised the usual way and the replicas drift apart. Use "
            "fm.HeadLoss(ddp_model, loss_fn), which runs the head inside the model's forward",
            RuntimeWarning,
            stacklevel=4,
        )
