"""Reading the logits out of a model's output (tensor, tuple, dict, object with ``.logits``)."""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

OutputAdapter = Optional[Callable[[Any], torch.Tensor]]


def default_logits(output: Any) -> torch.Tensor:
    """The logits in a model's output: the tensor itself, the first element of a tuple or list
    (``(logits, aux)``), the ``"logits"`` entry of a dict, or the ``.logits`` attribute of an
    output object (as Hugging Face models return)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    if isinstance(output, dict):
        if isinstance(output.get("logits"), torch.Tensor):
            return output["logits"]
        raise TypeError(
            f"model: returned a dict with keys {sorted(map(str, output))} and no 'logits' "
            "tensor; pass output=lambda out: out[...] to say where the logits are"
        )
    if isinstance(getattr(output, "logits", None), torch.Tensor):
        return output.logits
    raise TypeError(
        f"model: returned {type(output).__name__}, not logits; pass output=callable mapping "
        "the model's output to the (N, C) logits"
    )


def check_output_adapter(output: OutputAdapter) -> Callable[[Any], torch.Tensor]:
    if output is None:
        return default_logits
    if not callable(output):
        raise TypeError(f"output: expected a callable or None, got {type(output).__name__}")

    def adapted(out: Any) -> torch.Tensor:
        logits = output(out)
        if not isinstance(logits, torch.Tensor):
            raise TypeError(f"output: returned {type(logits).__name__}, expected the logits tensor")
        return logits

    return adapted
