"""Per-call overhead: the host time of one ``fm.worst_of_k_cross_entropy`` call on a batch so
small that the fixed cost of a call (argument checks, dispatch, autograd bookkeeping) is all
there is, against ``F.cross_entropy`` on the same numbers.

Unlike the byte-model cases in :mod:`fastmargin.benchmarks.cases` there is no byte model and
no memory column: the measure is microseconds per call, from calls in a tight loop, the best
of many short blocks (the least disturbed by other work on the machine: on a shared 2-core
machine the best of 10 blocks of 1000 calls read up to 1.5x apart from run to run, the best of
100 blocks of 50 within a few %). The providers take turns block by block, so a change of load
reaches all of them alike, and Python's cycle collector is paused while a block runs. One
intra-op thread (a second thread only adds its wake-up to calls this small); validation as the
process has it (on by default). On CUDA each block ends with ``torch.cuda.synchronize()``, so a
block's time also covers kernels that have not finished by the last call's return.

Goals (float32, 8 samples, 10 classes, int64 targets, reduction 'mean', 1 thread):
forward + backward within 1.5x of ``F.cross_entropy`` on (8, 10) logits, and forward under
``torch.no_grad`` within 2x; measured for the worst-of-k form (8, 1, 10) with ``dim=1`` and for
the drop-in form (8, 10) without ``dim``.
"""

from __future__ import annotations

import gc
import json
import os
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

import fastmargin as fm

OP = "call_overhead"  # the name ``--ops`` selects this section by
BATCH, CLASSES = 8, 10
GOAL_FORWARD_BACKWARD = 1.5
GOAL_NO_GRAD = 2.0

Provider = Callable[[], object]


@dataclass
class OverheadRow:
    work: str  # "fwd+bwd" or "no_grad fwd"
    call: str  # the fastmargin call measured
    reference_us: float  # F.cross_entropy, microseconds per call
    fastmargin_us: float
    goal: float  # the most fastmargin / F.cross_entropy may be

    @property
    def ratio(self) -> float:
        return self.fastmargin_us / self.reference_us

    @property
    def met(self) -> bool:
        return self.ratio <= self.goal

    def as_dict(self) -> dict:
        return {**asdict(self), "ratio": self.ratio, "met": self.met}


def _forward_backward(fn: Callable, x: torch.Tensor, y: torch.Tensor) -> Provider:
    def run():
        return torch.autograd.grad(fn(x, y), (x,))

    return run


def _no_grad(fn: Callable, x: torch.Tensor, y: torch.Tensor) -> Provider:
    def run():
        with torch.no_grad():
            return fn(x, y)

    return run


def _fm_copy_dim(x, y):
    return fm.worst_of_k_cross_entropy(x, y, dim=1)


# call -> (function, which logits it takes). The drop-in form (no ``dim``) takes exactly
# F.cross_entropy's arguments.
_CALLS = {
    "F.cross_entropy(x2, y)": (F.cross_entropy, "x2"),
    "fm(x3, y, dim=1)": (_fm_copy_dim, "x3"),
    "fm(x2, y)": (fm.worst_of_k_cross_entropy, "x2"),
}
_REFERENCE = "F.cross_entropy(x2, y)"
_WORK = {
    "fwd+bwd": (_forward_backward, GOAL_FORWARD_BACKWARD),
    "no_grad fwd": (_no_grad, GOAL_NO_GRAD),
}


def calls_per_block(quick: bool) -> int:
    return 20 if quick else 50


def blocks(repeats: int) -> int:
    """Blocks timed per provider: ten per repetition ``--reps`` asks for (the blocks are
    short, and the best of many is what is steady)."""
    return 10 * max(1, repeats)


def providers(device: str) -> Dict[str, Dict[str, Provider]]:
    """work -> call -> provider: x2 is (8, 10) float32 logits, x3 the same numbers as
    (8, 1, 10) (one copy per sample, copy dim 1), y (8,) int64 class indices."""
    gen = torch.Generator(device=device).manual_seed(0)
    x2 = torch.randn(BATCH, CLASSES, device=device, generator=gen).requires_grad_(True)
    x3 = x2.detach().view(BATCH, 1, CLASSES).clone().requires_grad_(True)
    y = torch.randint(0, CLASSES, (BATCH,), device=device, generator=gen)
    logits = {"x2": x2, "x3": x3}
    return {
        work: {call: make(fn, logits[which], y) for call, (fn, which) in _CALLS.items()}
        for work, (make, _goal) in _WORK.items()
    }


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _block_us(fn: Provider, calls: int, device: str) -> float:
    """Microseconds per call over one block of ``calls`` back-to-back calls."""
    _sync(device)
    collecting = gc.isenabled()
    gc.disable()  # (autograd graphs are freed by reference counting, not by the collector)
    try:
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        _sync(device)
        return (time.perf_counter() - t0) / calls * 1e6
    finally:
        if collecting:
            gc.enable()


def measure(device: str, *, quick: bool = False, repeats: int = 10) -> List[OverheadRow]:
    """Microseconds per call of every provider, the best of ``blocks(repeats)`` blocks, at
    one intra-op thread (the caller's thread count is restored afterwards)."""
    calls = calls_per_block(quick)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        by_work = providers(device)
        best: Dict[tuple, float] = {}
        for calls_of in by_work.values():
            for fn in calls_of.values():
                _block_us(fn, max(20, calls // 10), device)  # warm-up: first-call caches
        for _ in range(blocks(repeats)):
            for work, calls_of in by_work.items():
                for call, fn in calls_of.items():
                    us = _block_us(fn, calls, device)
                    best[work, call] = min(us, best.get((work, call), us))
    finally:
        torch.set_num_threads(threads)
    rows = []
    for work, (_make, goal) in _WORK.items():
        for call in _CALLS:
            if call != _REFERENCE:
                rows.append(OverheadRow(work, call, best[work, _REFERENCE], best[work, call], goal))
    return rows


def markdown_table(rows: List[OverheadRow], device_name: str, *, quick: bool, repeats: int) -> str:
    calls = calls_per_block(quick)
    validation = "on" if fm.validation_enabled() else "off"
    lines = [
        f"Per-call overhead ({OP}): host time per call on {device_name}, best of "
        f"{blocks(repeats)} blocks of {calls} calls, 1 thread, validation {validation}; "
        f"float32, {BATCH} samples x {CLASSES} classes, int64 targets, reduction 'mean'; "
        f"x2 is ({BATCH}, {CLASSES}), x3 ({BATCH}, 1, {CLASSES}). No byte model.",
        "",
        "| work | fastmargin call | F.cross_entropy us | fastmargin us | ratio | goal | met |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        cells = [
            r.work,
            r.call,
            f"{r.reference_us:.1f}",
            f"{r.fastmargin_us:.1f}",
            f"{r.ratio:.2f}x",
            f"{r.goal:.1f}x",
            "yes" if r.met else "no",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_json(path: str, rows: List[OverheadRow], device_name: str, *, merge: bool) -> None:
    """Add the rows under "overhead" to the JSON the byte-model cases wrote to ``path`` in
    this run (``merge``), or write a file of their own."""
    data: dict = {"meta": {"device": device_name, "torch": torch.__version__}, "results": []}
    if merge and os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
    data["overhead"] = [r.as_dict() for r in rows]
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
