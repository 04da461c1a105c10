"""The dtype a loss is returned in, as F.cross_entropy returns it.

Inside ``torch.autocast`` (any lower-precision dtype, CPU or CUDA) F.cross_entropy of float16 /
bfloat16 logits returns float32, and so do the fastmargin losses. The fused kernels already
accumulate in float32 and read the logits in their own dtype, so this costs nothing: the float32
result is simply not rounded down (and the logits are never copied to float32). Outside
autocast the loss has the logits' dtype.

The value is the float32 loss of the half-precision logits, which is what F.cross_entropy gives
on the CPU (autocast's CPU rules cast ``cross_entropy_loss`` to float32). On CUDA, autocast has
no rule for ``cross_entropy_loss`` itself: it calls ``log_softmax`` with the logits' dtype, so
the log-probabilities are rounded to float16 / bfloat16 before ``nll_loss`` (which autocast runs
in float32). F.cross_entropy's CUDA value under autocast is therefore float32 in dtype but off
by up to one half-precision rounding of each log-probability (measured on an H200, 4096 x 1000
logits: up to 3.8e-3 relative for bfloat16, 4.8e-4 for float16); the fastmargin value is the
exact float32 one, equal to ``F.cross_entropy(logits.float(), ...)`` (3.6e-7 and 4.2e-7).
"""

from __future__ import annotations

import torch

_LOWER_PRECISION = (torch.float16, torch.bfloat16)


def loss_dtype(logits: torch.Tensor) -> torch.dtype:
    """float32 for float16 / bfloat16 logits under autocast on their device, else their dtype."""
    if logits.dtype in _LOWER_PRECISION and torch.is_autocast_enabled(logits.device.type):
        return torch.float32
    return logits.dtype
