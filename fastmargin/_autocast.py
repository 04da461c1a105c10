"""The dtype a loss is returned in, as F.cross_entropy returns it.

F.cross_entropy is on autocast's float32 list: inside ``torch.autocast`` (any lower-precision
dtype, CPU or CUDA) float16 / bfloat16 logits give a float32 loss. The fused kernels already
accumulate in float32 and read the logits in their own dtype, so matching that costs nothing:
the float32 result is simply not rounded down (and the logits are never copied to float32).
Outside autocast the loss has the logits' dtype.
"""

from __future__ import annotations

import torch

_LOWER_PRECISION = (torch.float16, torch.bfloat16)


def loss_dtype(logits: torch.Tensor) -> torch.dtype:
    """float32 for float16 / bfloat16 logits under autocast on their device, else their dtype."""
    if logits.dtype in _LOWER_PRECISION and torch.is_autocast_enabled(logits.device.type):
        return torch.float32
    return logits.dtype
