"""Benchmark cases: what each op computes, on which shapes, by which providers, and its
byte model (the bytes the op must move at minimum: each input read once, each output written
once). Both ``python -m fastmargin bench`` and ``bench/test_bench_*.py`` use these.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

import fastmargin as fm
from fastmargin import reference as ref

Provider = Callable[[], object]


@dataclass
class Case:
    """One benchmark case: ``setup(device)`` returns the providers, each a zero-argument
    callable doing the full measured work (e.g. forward + backward) on the same inputs."""

    op: str
    shape: str
    dtype: torch.dtype
    bytes_moved: int  # the byte model of the measured work
    byte_model: str  # how bytes_moved was counted, in words
    setup: Callable[[str], Dict[str, Provider]] = field(repr=False)

    @property
    def name(self) -> str:
        return f"{self.op}[{self.shape},{str(self.dtype).replace('torch.', '')}]"


def _grad_of(loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
    """Forward + backward of a scalar loss with respect to the logits (no .grad accumulation)."""

    def run(x: torch.Tensor, y: torch.Tensor):
        return torch.autograd.grad(loss_fn(x, y), x)[0]

    return run


def _liger_cross_entropy() -> Optional[Callable]:
    try:  # optional peer: Liger-Kernel's fused cross entropy (GPU only)
        from liger_kernel.transformers.functional import liger_cross_entropy
    except Exception:
        return None
    return liger_cross_entropy


@functools.cache
def _compiled(fn: Callable) -> Callable:
    return torch.compile(fn, dynamic=False)


def worst_of_k_case(rows: int, classes: int, k: int, dtype: torch.dtype) -> Case:
    """Worst-of-k CE forward + backward on ``rows = B * k`` rows of ``classes`` logits in the
    copy-major layout (k, B, C) (what ``torch.cat`` of k augmented batches gives)."""
    B = rows // k
    elem = torch.finfo(dtype).bits // 8
    logits_bytes = rows * classes * elem

    def loss_fm(x, y):
        return fm.worst_of_k_cross_entropy(x, y, dim=0)

    def loss_ref(x, y):
        return ref.worst_of_k_cross_entropy(x, y, dim=0)

    def setup(device: str) -> Dict[str, Provider]:
        gen = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(k, B, classes, device=device, dtype=dtype, generator=gen)
        x.requires_grad_(True)
        y = torch.randint(0, classes, (B,), device=device, generator=gen)
        providers: Dict[str, Provider] = {
            "fastmargin": functools.partial(_grad_of(loss_fm), x, y),
            "eager": functools.partial(_grad_of(loss_ref), x, y),
            "compile": functools.partial(_compiled(_grad_of(loss_ref)), x, y),
        }
        liger = _liger_cross_entropy()
        if k == 1 and liger is not None and device == "cuda":
            x2 = x.view(B, classes)

            def liger_loss(z, t):
                return liger(z.view(B, classes), t)

            providers["liger"] = functools.partial(_grad_of(liger_loss), x2, y)
        return providers

    return Case(
        op="worst_of_k_ce",
        shape=f"{rows}x{classes},k={k}",
        dtype=dtype,
        bytes_moved=2 * logits_bytes,
        byte_model="read logits once + write their gradient once (2 passes)",
        setup=setup,
    )


GPU_SHAPES = [(65536, 10), (65536, 100), (65536, 1000), (32768, 32000), (16384, 128256)]
CPU_SHAPES = [(4096, 10), (2048, 1000), (256, 32000)]


def default_cases(device: str, *, quick: bool = False) -> List[Case]:
    """The benchmark matrix: every op on the device's shape list (small on the CPU)."""
    shapes = GPU_SHAPES if device == "cuda" else CPU_SHAPES
    dtypes = [torch.bfloat16, torch.float32]
    ks = [1, 4, 8] if device == "cuda" and not quick else [4]
    if quick:
        shapes, dtypes = shapes[:2], [torch.float32]
    cases: List[Case] = []
    for rows, classes in shapes:
        for k in ks:
            for dtype in dtypes:
                cases.append(worst_of_k_case(rows, classes, k, dtype))
    return cases
