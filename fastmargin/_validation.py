"""Argument checks shared by the public functions.

Shape, dtype and device checks are free (metadata only) and always run. Target *values* need a
reduction and a host synchronisation, so they run only while validation is enabled
(``fm.set_validation``, or ``FASTMARGIN_VALIDATE=0`` in the environment to start disabled) and
never while ``torch.compile`` traces (a host sync would break the graph) or a CUDA graph is
captured (a host sync is an error there). Without the value
check the kernels stay memory-safe: an out-of-range target gives NaN for its row.
"""

from __future__ import annotations

import os

import torch

from . import _fast_path

_VALIDATE = os.environ.get("FASTMARGIN_VALIDATE", "1") not in ("0", "false", "False", "no")

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_REDUCTIONS = ("mean", "sum", "none")


def set_validation(enabled: bool) -> None:
    """Turn the target range check (one small reduction + one host sync per call) on or off."""
    global _VALIDATE
    _VALIDATE = bool(enabled)


def validation_enabled() -> bool:
    """Whether value checks run now: enabled, not inside a ``torch.compile`` trace, and not
    while a CUDA graph is being captured (the check reads the device, which capture forbids;
    the kernels stay memory-safe without it)."""
    return _VALIDATE and not torch.compiler.is_compiling() and not _capturing_cuda_graph()


def validation_enabled_in_eager() -> bool:
    """:func:`validation_enabled` for a caller that already knows no trace is running."""
    return _VALIDATE and not _capturing_cuda_graph()


def _capturing_cuda_graph() -> bool:
    # No CUDA context yet means no capture; the query itself would initialise CUDA.
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


def has_values(x: torch.Tensor) -> bool:
    """Whether the values of ``x`` can be read on the host now. False for meta tensors (shape
    propagation only) and for tensors wrapped by a functorch transform (``vmap``, ``grad``),
    where a host read is an error that names no argument; such values go unchecked, as with
    validation off."""
    return x.device.type != "meta" and not torch._C._functorch.is_functorch_wrapped_tensor(x)


def check_tensor(x: object, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    return x


def check_float_dtype(x: torch.Tensor, name: str) -> None:
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{name}: expected a floating dtype (float32, float16, bfloat16 or float64), "
            f"got {x.dtype}"
        )


def check_same_device(x: torch.Tensor, ref: torch.Tensor, name: str) -> None:
    if x.device != ref.device:
        raise RuntimeError(f"{name}: expected a tensor on {ref.device}, got {x.device}")


def check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction: expected one of {_REDUCTIONS}, got {reduction!r}")


def check_nonnegative(value: float, name: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name}: expected a float, got {type(value).__name__}")
    value = float(value)
    if not value >= 0.0:  # also rejects NaN
        raise ValueError(f"{name}: expected a finite value >= 0, got {value}")
    if value == float("inf"):
        raise ValueError(f"{name}: expected a finite value >= 0, got inf")
    return value


def check_label_smoothing(label_smoothing: float) -> float:
    value = check_nonnegative(label_smoothing, "label_smoothing")
    if value > 1.0:
        raise ValueError(f"label_smoothing: expected a value in [0, 1], got {value}")
    return value


def check_class_target(
    target: object,
    batch: int,
    num_classes: int,
    ignore_index: int | None,
    ref: torch.Tensor,
) -> torch.Tensor:
    """Checks a (B,) class-index target and returns it as int64 (a no-op when it already is).

    ``ignore_index=None`` means the op has no ignore value: every target must be a class.
    """
    target = check_tensor(target, "target")
    check_same_device(target, ref, "target")
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise TypeError(f"target: expected an integer dtype (class indices), got {target.dtype}")
    if target.dim() != 1 or target.shape[0] != batch:
        raise ValueError(f"target: expected shape ({batch},), got {tuple(target.shape)}")
    if ignore_index is not None and (
        not isinstance(ignore_index, int) or isinstance(ignore_index, bool)
    ):
        raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")
    target = target.long()
    if validation_enabled() and target.numel() > 0 and has_values(target):
        first = _first_out_of_range(target, num_classes, ignore_index)
        if first is not None:
            allowed = "" if ignore_index is None else f" or target == ignore_index = {ignore_index}"
            raise IndexError(
                f"target: value {first} is out of range for {num_classes} classes "
                f"(expected 0 <= target < {num_classes}{allowed})"
            )
    return target


def _first_out_of_range(
    target: torch.Tensor, num_classes: int, ignore_index: int | None
) -> int | None:
    """The first int64 target outside [0, num_classes) that is not ``ignore_index``, or None."""
    if target.device.type == "cpu" and _fast_path.available(target):
        return _fast_path.first_bad_class_target(target, num_classes, ignore_index)
    bad = (target < 0) | (target >= num_classes)  # one reduction and one host sync
    if ignore_index is not None:
        bad &= target != ignore_index
    return int(target[bad][0]) if bool(bad.any()) else None


def check_logits(logits: object, ndim: int, layout: str) -> torch.Tensor:
    """A floating tensor of rank ``ndim`` (``layout`` names the expected shape in errors)."""
    logits = check_tensor(logits, "logits")
    check_float_dtype(logits, "logits")
    if logits.dim() != ndim:
        raise ValueError(
            f"logits: expected a {ndim}-D tensor ({layout}), got {logits.dim()}-D of shape "
            f"{tuple(logits.shape)}"
        )
    return logits


def check_rows_of_logits(logits: object, *, min_classes: int = 1, why: str = "") -> torch.Tensor:
    """(N, C) logits with at least ``min_classes`` classes, returned with a contiguous class
    dim (copied once only if it is strided, which the kernels cannot read in place)."""
    logits = check_logits(logits, 2, "(N, C)")
    C = logits.shape[1]
    if C < min_classes:
        if min_classes == 1:
            raise ValueError("logits: the class dimension is empty (C = 0)")
        raise ValueError(f"logits: {why} needs at least {min_classes} classes, got C = {C}")
    return logits.contiguous() if C > 1 and logits.stride(1) != 1 else logits
