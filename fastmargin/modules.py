"""nn.Module forms of the losses."""

from __future__ import annotations

from typing import Union

import torch
from torch import nn

from . import _validation as v
from . import functional as F_fm
from ._ce_layout import check_copy_dim


def _check_ignore_index(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"ignore_index: expected an int, got {type(value).__name__}")
    return value


def _check_reduction(value: object) -> str:
    v.check_reduction(value)
    return value


# The options the loss modules share, each checked in __init__ (so a typo fails where the
# module is built, not at the first batch) by the check its functional form applies per call.
_OPTION_CHECKS = {
    "dim": check_copy_dim,
    "temperature": lambda value: v.check_nonnegative(value, "temperature"),
    "label_smoothing": v.check_label_smoothing,
    "ignore_index": _check_ignore_index,
    "reduction": _check_reduction,
}


class LossModule(nn.Module):
    """Base of the loss modules: keeps the keyword options of the functional form as
    attributes (so they can be changed between calls; the functional form checks them on
    every call) and shows them in ``repr``. The options named in ``_OPTION_CHECKS`` are
    checked when the module is built."""

    _option_names: tuple = ()

    def __init__(self, **options) -> None:
        super().__init__()
        for name, value in options.items():
            check = _OPTION_CHECKS.get(name)
            setattr(self, name, value if check is None else check(value))
        self._option_names = tuple(options)

    def options(self) -> dict:
        return {name: getattr(self, name) for name in self._option_names}

    def extra_repr(self) -> str:
        return ", ".join(f"{name}={value!r}" for name, value in self.options().items())


class WorstOfKCrossEntropy(LossModule):
    """Module form of :func:`fastmargin.worst_of_k_cross_entropy` (same arguments and shape
    rule; a class ``weight`` is kept as a buffer, so it follows ``.to(device)`` like
    nn.CrossEntropyLoss'). Without ``dim`` it is a drop-in ``nn.CrossEntropyLoss``.

    Example::

        loss_fn = fm.WorstOfKCrossEntropy(dim=0)          # logits of k stacked batches
        loss = loss_fn(model(torch.cat(copies)).view(k, B, -1), y)
    """

    def __init__(
        self,
        *,
        dim: int | None = None,
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
