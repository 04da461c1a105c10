"""nn.Module forms of the losses."""

from __future__ import annotations

from typing import Union

import torch
from torch import nn

from . import functional as F_fm


class LossModule(nn.Module):
    """Base of the loss modules: keeps the keyword options of the functional form as
    attributes (so they can be changed between calls) and shows them in ``repr``."""

    _option_names: tuple = ()

    def __init__(self, **options) -> None:
        super().__init__()
        for name, value in options.items():
            setattr(self, name, value)
        self._option_names = tuple(options)

    def options(self) -> dict:
        return {name: getattr(self, name) for name in self._option_names}

    def extra_repr(self) -> str:
        return ", ".join(f"{name}={value!r}" for name, value in self.options().items())


class WorstOfKCrossEntropy(LossModule):
    """Module form of :func:`fastmargin.worst_of_k_cross_entropy` (same arguments; a class
    ``weight`` is kept as a buffer, so it follows ``.to(device)`` like nn.CrossEntropyLoss').

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
        weight: torch.Tensor | None = None,
    ) -> None:
        super().__init__(
            dim=dim,
            temperature=temperature,
            label_smoothing=label_smoothing,
            ignore_index=ignore_index,
            reduction=reduction,
        )
        self.register_buffer("weight", weight)

    def forward(
        self, logits: torch.Tensor, target: torch.Tensor, return_index: bool = False
    ) -> Union[torch.Tensor, tuple]:
        return F_fm.worst_of_k_cross_entropy(
            logits, target, return_index=return_index, weight=self.weight, **self.options()
        )
