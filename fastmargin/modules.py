"""nn.Module forms of the losses."""

from __future__ import annotations

from typing import Union

import torch
from torch import nn

from . import functional as F_fm


class WorstOfKCrossEntropy(nn.Module):
    """Module form of :func:`fastmargin.worst_of_k_cross_entropy` (same arguments).

    Example::

        loss_fn = fm.WorstOfKCrossEntropy(dim=0)          # logits of k stacked batches
        loss = loss_fn(model(torch.cat(copies)).view(k, B, -1), y)
    """

    def __init__(
        self,
        *,
        dim: int = 1,
        temperature: float = 0.0,
        label_smoothing: float = 0.0,
        ignore_index: int = -100,
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        self.dim = dim
        self.temperature = temperature
        self.label_smoothing = label_smoothing
        self.ignore_index = ignore_index
        self.reduction = reduction

    def forward(
        self, logits: torch.Tensor, target: torch.Tensor, return_index: bool = False
    ) -> Union[torch.Tensor, tuple]:
        return F_fm.worst_of_k_cross_entropy(
            logits,
            target,
            dim=self.dim,
            temperature=self.temperature,
            label_smoothing=self.label_smoothing,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            return_index=return_index,
        )

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, temperature={self.temperature}, "
            f"label_smoothing={self.label_smoothing}, ignore_index={self.ignore_index}, "
            f"reduction={self.reduction!r}"
        )
