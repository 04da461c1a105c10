"""Head-wrapping losses applied inside a model's own forward (DDP- and compile-safe)."""

from __future__ import annotations

from typing import Any, Dict, Tuple, Union

import torch
from torch import nn

from ._layers import select_layers, unwrap


class HeadLoss:
    """Runs the whole model and applies a head-wrapping loss to its head's input and output.

    ``fm.WeightRobustCrossEntropy(model.fc, eps=...)`` and
    ``fm.WeightNoiseWorstOfKCrossEntropy(model.fc, eps=...)`` need the features h entering the
    last layer and its logits z = fc(h). Calling ``loss_fn(model.features(x), y)`` computes them
    outside the model's forward; under ``DistributedDataParallel`` that bypasses
    ``DDP.forward`` and the replicas' parameters drift apart. ``HeadLoss`` instead calls the
    model (the DDP / compiled wrapper as given), reads h and z with a forward hook on the head
    and returns ``loss_fn.head_loss(h, z, y)``; the backward then syncs gradients exactly as in
    plain DDP training::

        crit = fm.WeightRobustCrossEntropy(model.fc, eps=0.05)
        step = fm.HeadLoss(ddp_model, crit)          # or fm.HeadLoss(ddp_model, crit, "fc")
        loss = step(x, y); loss.backward(); opt.step()

    The head is the first call of that module in the forward (its input must be one (N, D)
    tensor). Under ``torch.compile`` h and z are outputs of the compiled graph, and the loss's
    gradient flows back through it. The hook is inert outside a call; :meth:`remove` takes it
    away.

    Args:
        model: the model (possibly DDP-wrapped or compiled); its output is not used.
        loss_fn: a loss with ``head_loss(features, logits, target, **kwargs)``
            (:class:`~fastmargin.WeightRobustCrossEntropy`,
            :class:`~fastmargin.WeightNoiseWorstOfKCrossEntropy`).
        head: the head module or its name in the unwrapped model; default: the
            ``nn.Linear`` that ``loss_fn`` wraps.
    """

    def __init__(self, model: nn.Module, loss_fn: Any, head: Union[str, nn.Module, None] = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
        if not callable(getattr(loss_fn, "head_loss", None)):
            raise TypeError(
                "loss_fn: expected a loss with head_loss(features, logits, target) "
                "(fm.WeightRobustCrossEntropy, fm.WeightNoiseWorstOfKCrossEntropy), got "
                f"{type(loss_fn).__name__}"
            )
        wrapped = getattr(loss_fn, "linear", None)
        if head is None:
            if wrapped is None:
                raise ValueError(
                    "head: required when loss_fn wraps no nn.Linear (pass the head module or "
                    "its name, e.g. 'fc')"
                )
            head = wrapped
        ((self.head_name, self.head),) = select_layers(model, [head], arg="head")
        if wrapped is not None and unwrap(wrapped) is not self.head:
            raise ValueError(
                f"head: {self.head_name!r} is not the nn.Linear that loss_fn wraps; leave head "
                "out or wrap the same layer"
            )
        self.model = model
        self.loss_fn = loss_fn
        self._active = False
        self._seen: Dict[str, torch.Tensor] = {}
        self._handle = self.head.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs: Tuple[Any, ...], output: Any) -> None:
        if not self._active or "logits" in self._seen:
            return None
        if len(inputs) != 1 or not isinstance(inputs[0], torch.Tensor):
            raise TypeError(f"head {self.head_name!r}: expected one tensor input (the features)")
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"head {self.head_name!r}: returned {type(output).__name__}")
        self._seen["features"] = inputs[0]
        self._seen["logits"] = output
        return None

    def __call__(
        self, x: Any, y: torch.Tensor, *, return_logits: bool = False, **loss_kwargs: Any
    ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """The loss of the batch (extra keywords go to ``loss_fn.head_loss``)."""
        if self._handle is None:
            raise RuntimeError("HeadLoss: the hook was removed; create a new instance")
        self._active, self._seen = True, {}
        try:
            self.model(x)
            seen = self._seen
        finally:
            self._active, self._seen = False, {}
        if "logits" not in seen:
            raise RuntimeError(f"head: {self.head_name!r} did not run in the model's forward")
        h, z = seen["features"], seen["logits"]
        if h.dim() != 2:
            raise ValueError(
                f"head: {self.head_name!r} received features of shape {tuple(h.shape)}, "
                "expected (N, D)"
            )
        loss = self.loss_fn.head_loss(h, z, y, **loss_kwargs)
        return (loss, z) if return_logits else loss

    def __repr__(self) -> str:
        return f"HeadLoss(head={self.head_name!r}, loss_fn={self.loss_fn!r})"

    def remove(self) -> None:
        """Removes the hook from the head."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    close = remove

    def __enter__(self) -> HeadLoss:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()
