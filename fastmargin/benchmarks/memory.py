"""Peak extra memory of a call, on the GPU and on the CPU.

On CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``. The CPU
allocator keeps no such statistics, so on the CPU the call runs under ``torch.profiler`` with
``profile_memory=True``: every allocation and free of a tensor's storage is recorded (size and
time), and the peak of their running sum is the peak extra memory held by tensors during the
call. Unlike the process's resident set size this counts only tensor storage, is not blurred
by the C allocator keeping freed pages, and does not depend on which pages were touched.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Callable, Iterator

import torch


@contextlib.contextmanager
def _quiet_native_stderr() -> Iterator[None]:
    """The profiler's native library logs its stage changes (and, without a GPU, a failed
    device query) to file descriptor 2; a benchmark table is no place for them."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_peak_extra_bytes(fn: Callable[[], object]) -> int:
    from torch._C._autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with _quiet_native_stderr():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = fn()
            del out
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for e in events:
        if e.device_type() != DeviceType.CPU:
            continue
        current += e.nbytes()
        peak = max(peak, current)
    return peak


def peak_extra_bytes(fn: Callable[[], object], device: str) -> int:
    """Peak memory allocated while ``fn()`` runs (and its result is alive) beyond what was
    allocated before, in bytes."""
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        del out
        return torch.cuda.max_memory_allocated() - base
    return _cpu_peak_extra_bytes(fn)
