"""The eager fast path of the public losses: one C call for checks, forward and reduction.

On a small batch the host time of a loss call is its cost: each Python-level check or tensor op
around the kernel costs about a microsecond, F.cross_entropy's whole forward about five. Where
nothing needs to see those steps as Python calls, ``fastmargin._C`` does them in C++:

* ``worst_of_k_cross_entropy``: the public function of the same name for the common case
  ((N, C) or contiguous spatial logits, or k copies along ``dim``; int64 class indices; plain
  scalars; targets range-checked in C++, in one pass on the CPU). It returns None for anything
  else, valid or not, and the Python path then computes the same result or raises its error:
  no rule or message lives in C++.
* ``worst_of_k_ce_loss``: the loss of rows the Python layer has checked (the other layouts).

Both run the forward op through the dispatcher and reduce it inside one C++ autograd node
(csrc/autograd/worst_of_k_ce_autograd.cpp) with the function ``fastmargin::reduce_cross_entropy``
uses, so the numbers and gradients equal the op path's bit for bit.

The fast path is taken only in plain eager mode: not while ``torch.compile`` traces (dynamo
would break the graph at a C function; it traces the ops instead), not under a forward-mode AD
level or functorch transform (the composite forms run there, ``fastmargin._routes``), not while
a Python dispatch or function mode is active (modes see every op of the op path), and only for
plain ``torch.Tensor`` arguments (subclasses keep their ``__torch_function__``). Everywhere
else the public functions take the op path, which computes the same numbers.
"""

from __future__ import annotations

import torch

from ._composite import transform_active
from ._ops import extension as _C

worst_of_k_cross_entropy = _C.worst_of_k_cross_entropy
worst_of_k_ce_loss = _C.worst_of_k_ce_loss
first_bad_class_target = _C.first_bad_class_target
first_negative_or_nonfinite = _C.first_negative_or_nonfinite

# How worst_of_k_ce_loss reads the rows from the logits (csrc/include/fastmargin/
# worst_of_k_ce_autograd.h): as given (B, k, C), copies first (k, B, C), or (N, C) with k = 1.
ROWS, COPIES_FIRST, ONE_COPY = 0, 1, 2

_len_dispatch_modes = torch._C._len_torch_dispatch_stack
_len_function_modes = torch._C._len_torch_function_stack


def available(*tensors: torch.Tensor | None) -> bool:
    """Whether the fast path may run for these arguments now (None entries are skipped)."""
    if torch.compiler.is_compiling() or transform_active():
        return False
    if _len_dispatch_modes() or _len_function_modes():
        return False
    for t in tensors:  # a loop, not all(...): this runs on every call
        if t is not None and type(t) is not torch.Tensor:
            return False
    return True
