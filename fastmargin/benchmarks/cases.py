"""Benchmark cases: what each op computes, on which shapes, by which providers, and its
byte model (the bytes the op must move at minimum: each input read once, each output written
once). Both ``python -m fastmargin bench`` and ``bench/test_bench_*.py`` use these.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

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


def _forward_backward(fn: Callable, inputs: Sequence, grad_output=None) -> Provider:
    """A provider running ``fn(*inputs)`` and its backward into every input that requires grad
    (with ``grad_output`` as the upstream gradient for non-scalar outputs)."""
    wrt = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]

    def run():
        out = fn(*inputs)
        return torch.autograd.grad(out, wrt, grad_outputs=grad_output)

    return run


def _forward_only(fn: Callable, inputs: Sequence) -> Provider:
    def run():
        with torch.no_grad():
            return fn(*inputs)

    return run


def _liger_cross_entropy() -> Optional[Callable]:
    try:  # optional peer: Liger-Kernel's fused cross entropy (GPU only)
        from liger_kernel.transformers.functional import liger_cross_entropy
    except Exception:
        return None
    return liger_cross_entropy


def _compiled(fn: Callable) -> Callable:
    # Dynamo caches compiled graphs on the function's code object, with a small per-code
    # limit: reset it so every case gets a real compile for its own shapes instead of
    # silently falling back to eager after the limit.
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False)


def _providers(
    ours: Callable, reference: Callable, inputs: Sequence, *, backward: bool, grad_output=None
) -> Dict[str, Provider]:
    """fastmargin, the eager reference and torch.compile(reference) on the same inputs."""
    if backward:
        make = functools.partial(_forward_backward, inputs=inputs, grad_output=grad_output)
    else:
        make = functools.partial(_forward_only, inputs=inputs)
    return {
        "fastmargin": make(ours),
        "eager": make(reference),
        "compile": make(_compiled(reference)),
    }


def _element_size(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


def _random_logits(device: str, shape, dtype, classes: int, batch: int):
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(*shape, device=device, dtype=dtype, generator=gen).requires_grad_(True)
    y = torch.randint(0, classes, (batch,), device=device, generator=gen)
    return x, y


def _wocce_fm(x, y):
    return fm.worst_of_k_cross_entropy(x, y, dim=0)


def _wocce_ref(x, y):
    return ref.worst_of_k_cross_entropy(x, y, dim=0)


def _wocce_inplace(x, y):
    # The gradient overwrites x: its values drift between repetitions, which the timing and
    # the memory it measures do not depend on.
    return fm.worst_of_k_cross_entropy(x, y, dim=0, inplace_backward=True)


def worst_of_k_case(rows: int, classes: int, k: int, dtype: torch.dtype) -> Case:
    """Worst-of-k CE forward + backward on ``rows = B * k`` rows of ``classes`` logits in the
    copy-major layout (k, B, C) (what ``torch.cat`` of k augmented batches gives)."""
    B = rows // k

    def setup(device: str) -> Dict[str, Provider]:
        x, y = _random_logits(device, (k, B, classes), dtype, classes, B)
        providers = _providers(_wocce_fm, _wocce_ref, (x, y), backward=True)
        # Overwritten by its gradient. Not a leaf (the option refuses leaves, which would be
        # parameters): the output of an op whose backward does not need it, as model logits.
        scratch = x.detach().clone().requires_grad_(True) * 1.0
        providers["fastmargin inplace"] = _forward_backward(_wocce_inplace, (scratch, y))
        liger = _liger_cross_entropy()
        if k == 1 and liger is not None and device == "cuda":
            providers["liger"] = _forward_backward(
                lambda z, t: liger(z.view(B, classes), t), (x, y)
            )
        return providers

    return Case(
        op="worst_of_k_ce",
        shape=f"{rows}x{classes},k={k}",
        dtype=dtype,
        bytes_moved=2 * rows * classes * _element_size(dtype),
        byte_model="read logits once + write their gradient once (2 passes)",
        setup=setup,
    )


def _soft_fm(x, p):
    return fm.worst_of_k_cross_entropy(x, p, dim=0)


def _soft_ref(x, p):
    return ref.worst_of_k_cross_entropy(x, p, dim=0)


def soft_target_case(rows: int, classes: int, k: int, dtype: torch.dtype) -> Case:
    """Worst-of-k CE with per-sample probability targets (B, C) shared by the k copies."""
    B = rows // k

    def setup(device: str) -> Dict[str, Provider]:
        x, _ = _random_logits(device, (k, B, classes), dtype, classes, B)
        probs = torch.softmax(torch.randn(B, classes, device=device), dim=1).to(dtype)
        return _providers(_soft_fm, _soft_ref, (x, probs), backward=True)

    s = _element_size(dtype)
    return Case(
        op="worst_of_k_ce_soft",
        shape=f"{rows}x{classes},k={k}",
        dtype=dtype,
        bytes_moved=(2 * rows + B) * classes * s,
        byte_model="read logits + targets once, write the gradient once (3-pass model at k=1)",
        setup=setup,
    )


def _spatial_fm(x, y):
    return fm.worst_of_k_cross_entropy(x, y)


def _spatial_ref(x, y):
    return ref.worst_of_k_cross_entropy(x, y)  # without dim: F.cross_entropy itself


def spatial_case(batch: int, classes: int, side: int, dtype: torch.dtype) -> Case:
    """Segmentation-shaped cross-entropy without a copy dim: (N, C, H, W) logits and
    (N, H, W) class indices, forward + backward. The fused kernels read class-contiguous rows,
    so the call makes one transposing copy of the logits (and autograd one of the gradient):
    this case shows what that costs against F.cross_entropy."""

    def setup(device: str) -> Dict[str, Provider]:
        gen = torch.Generator(device=device).manual_seed(0)
        shape = (batch, classes, side, side)
        x = torch.randn(*shape, device=device, dtype=dtype, generator=gen).requires_grad_(True)
        y = torch.randint(0, classes, (batch, side, side), device=device, generator=gen)
        return _providers(_spatial_fm, _spatial_ref, (x, y), backward=True)

    return Case(
        op="worst_of_k_ce_spatial",
        shape=f"{batch}x{classes}x{side}x{side}",
        dtype=dtype,
        bytes_moved=2 * batch * classes * side * side * _element_size(dtype),
        byte_model="read logits once + write their gradient once (2 passes; the transposing "
        "copies of the logits and of the gradient are not in the floor)",
        setup=setup,
    )


def _margin_fm(x, y):
    return fm.multiclass_margin(x, y)


def _margin_ref(x, y):
    return ref.multiclass_margin(x, y)


def _robust_fm(x, y, r):
    return fm.weight_robust_cross_entropy(x, y, r)


def _robust_ref(x, y, r):
    return ref.weight_robust_cross_entropy(x, y, r)


def _noise_fm(x, y, s):
    return fm.weight_noise_worst_of_k_cross_entropy(x, y, s, k=4)


def _noise_ref(x, y, s):
    # Materialises the k noisy copies (randn + add + worst-of-k CE), as a user would.
    return ref.weight_noise_worst_of_k_cross_entropy(x, y, s, k=4)


# (N, C)-logits ops: op -> (ours, reference, per-row extra input?, backward?, passes, model)
_ROW_OPS = {
    "multiclass_margin": (_margin_fm, _margin_ref, False, False, 1, "forward: read logits once"),
    "weight_robust_ce": (
        _robust_fm,
        _robust_ref,
        True,
        True,
        2,
        "read logits once + write their gradient once (2 passes)",
    ),
    "weight_noise_ce": (
        _noise_fm,
        _noise_ref,
        True,
        True,
        2,
        "read logits once + write their gradient once; the k = 4 copies live in registers",
    ),
}


def row_op_case(op: str, rows: int, classes: int, dtype: torch.dtype) -> Case:
    """An op on (rows, classes) logits and (rows,) targets, plus a differentiable (rows,)
    radius / scale where the op takes one."""
    ours, reference, per_row_input, backward, passes, model = _ROW_OPS[op]

    def setup(device: str) -> Dict[str, Provider]:
        x, y = _random_logits(device, (rows, classes), dtype, classes, rows)
        inputs = (x, y) if backward else (x.detach(), y)
        if per_row_input:
            inputs += (torch.rand(rows, device=device).requires_grad_(True),)
        return _providers(ours, reference, inputs, backward=backward)

    return Case(
        op=op,
        shape=f"{rows}x{classes}",
        dtype=dtype,
        bytes_moved=passes * rows * classes * _element_size(dtype),
        byte_model=model,
        setup=setup,
    )


def _perturb_fm(u, d):
    return fm.all_layer_perturb(u, d)


def _perturb_ref(u, d):
    return ref.all_layer_perturb(u, d)


def perturb_case(batch: int, per_example: int, dtype: torch.dtype) -> Case:
    """all_layer_perturb forward + backward on (batch, per_example) activations."""

    def setup(device: str) -> Dict[str, Provider]:
        gen = torch.Generator(device=device).manual_seed(0)
        u = torch.randn(batch, per_example, device=device, dtype=dtype, generator=gen)
        d = 1e-2 * torch.randn(batch, per_example, device=device, dtype=dtype, generator=gen)
        g = torch.randn(batch, per_example, device=device, dtype=dtype, generator=gen)
        inputs = (u.requires_grad_(True), d.requires_grad_(True))
        return _providers(_perturb_fm, _perturb_ref, inputs, backward=True, grad_output=g)

    return Case(
        op="all_layer_perturb",
        shape=f"{batch}x{per_example}",
        dtype=dtype,
        bytes_moved=8 * batch * per_example * _element_size(dtype),
        byte_model="fwd: read u, delta, write out; bwd: read g, u, delta, write both grads",
        setup=setup,
    )


GPU_SHAPES = [(65536, 10), (65536, 100), (65536, 1000), (32768, 32000), (16384, 128256)]
# Few samples, (B, k, C): the worst-of-k forward gives one thread group per sample, so these
# leave most SMs idle (B = 256 launches 32 blocks on an H100/H200's 132 SMs) or sweep k rows
# per group in sequence (C = 32000, k = 8). Measured to decide whether a group per row plus a
# per-sample reduction is worth its cost.
FEW_ROW_SHAPES = [(256, 4, 1000), (64, 8, 32000)]
CPU_SHAPES = [(4096, 10), (2048, 1000), (256, 32000)]
OPS = (
    "worst_of_k_ce",
    "worst_of_k_ce_soft",
    "worst_of_k_ce_spatial",
    "multiclass_margin",
    "weight_robust_ce",
    "weight_noise_ce",
    "all_layer_perturb",
    "linear_worst_of_k_ce",
)


def default_cases(device: str, *, quick: bool = False) -> List[Case]:
    """The benchmark matrix: every op on the device's shape list (small on the CPU)."""
    gpu = device == "cuda"
    shapes = GPU_SHAPES if gpu else CPU_SHAPES
    dtypes = [torch.bfloat16, torch.float32]
    ks = [1, 4, 8] if gpu and not quick else [4]
    if quick:
        shapes, dtypes = shapes[:2], [torch.float32]
    cases: List[Case] = []
    if gpu:
        cases += [worst_of_k_case(B * k, C, k, d) for B, k, C in FEW_ROW_SHAPES for d in dtypes]
    for rows, classes in shapes:
        for dtype in dtypes:
            cases += [worst_of_k_case(rows, classes, k, dtype) for k in ks]
            cases += [row_op_case(op, rows, classes, dtype) for op in _ROW_OPS]
    soft_shape = (32768, 32000) if gpu else (1024, 1000)
    cases.append(soft_target_case(*soft_shape, 4, torch.bfloat16))
    batch, classes, side = (16, 21, 512) if gpu else (4, 21, 32)
    cases += [spatial_case(batch, classes, side, dtype) for dtype in dtypes]
    for batch, per_example in [(512, 65536), (512, 4096)] if gpu else [(64, 4096)]:
        for dtype in dtypes:
            cases.append(perturb_case(batch, per_example, dtype))
    cases += linear_ce_cases(device, quick=quick)
    return cases


# --- fused linear head + worst-of-k cross-entropy ------------------------------------------


def _linear_ce_fm(h, w, y):
    return fm.linear_worst_of_k_cross_entropy(h, w, y, dim=0)


def _linear_ce_ref(h, w, y):
    return ref.linear_worst_of_k_cross_entropy(h, w, y, dim=0)


def _liger_fused_linear_cross_entropy() -> Optional[Callable]:
    try:  # optional peer: Liger-Kernel's fused linear cross entropy (k = 1, GPU only)
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except Exception:
        return None
    return liger_fused_linear_cross_entropy


def _linear_ce_unfused(h, w, y):
    return fm.worst_of_k_cross_entropy(torch.nn.functional.linear(h, w), y, dim=0)


def _linear_ce_unfused_inplace(h, w, y):
    logits = torch.nn.functional.linear(h, w)
    return fm.worst_of_k_cross_entropy(logits, y, dim=0, inplace_backward=True)


def linear_ce_case(tokens: int, hidden: int, vocab: int, k: int, dtype: torch.dtype) -> Case:
    """Linear head + worst-of-k CE, forward + backward into the hidden states and the head's
    weight, on k copies of ``tokens`` hidden states (copy-major (k, tokens, hidden)).

    Peers: the unfused path with the fused CE (``F.linear`` then
    ``worst_of_k_cross_entropy``, with and without its in-place gradient), the eager
    reference and ``torch.compile`` of it. Byte model: what must move without logits (read
    hidden and weight, write both gradients); the work is three GEMMs of 2 k T H V FLOPs each,
    so on every device this case is compute-bound and its time is compared with the unfused
    path's rather than with the copy bandwidth."""
    rows = k * tokens

    def setup(device: str) -> Dict[str, Provider]:
        gen = torch.Generator(device=device).manual_seed(0)
        h = torch.randn(k, tokens, hidden, device=device, dtype=dtype, generator=gen)
        w = torch.randn(vocab, hidden, device=device, dtype=dtype, generator=gen) / hidden**0.5
        y = torch.randint(0, vocab, (tokens,), device=device, generator=gen)
        inputs = (h.requires_grad_(True), w.requires_grad_(True), y)
        providers = _providers(_linear_ce_fm, _linear_ce_ref, inputs, backward=True)
        providers["unfused (F.linear + fm CE)"] = _forward_backward(_linear_ce_unfused, inputs)
        providers["unfused, in-place CE gradient"] = _forward_backward(
            _linear_ce_unfused_inplace, inputs
        )
        liger = _liger_fused_linear_cross_entropy()
        if k == 1 and liger is not None and device == "cuda":
            providers["liger fused linear CE"] = _forward_backward(
                lambda a, b, t: liger(a.view(tokens, hidden), b, t), inputs
            )
        return providers

    flops = 3 * 2 * rows * hidden * vocab
    return Case(
        op="linear_worst_of_k_ce",
        shape=f"{tokens}x{hidden}->{vocab},k={k}",
        dtype=dtype,
        bytes_moved=2 * (rows * hidden + vocab * hidden) * _element_size(dtype),
        byte_model=(
            "read hidden + weight, write both gradients (no logits); "
            f"FLOPs 3 GEMMs x 2kTHV = {flops / 1e9:.1f} GFLOP"
        ),
        setup=setup,
    )


def linear_ce_cases(device: str, *, quick: bool = False) -> List[Case]:
    """The LM-head cases: GPU k = 4, 8192 tokens, H = 4096, V = 128256 in bfloat16 (and k = 1
    against Liger's fused linear CE where installed); CPU k = 4, 2048 tokens, H = 256,
    V = 32000 in float32; quick: a small CPU shape."""
    if quick:
        return [linear_ce_case(256, 64, 1000, 4, torch.float32)]
    if device == "cuda":
        return [
            linear_ce_case(8192, 4096, 128256, 4, torch.bfloat16),
            linear_ce_case(8192, 4096, 128256, 1, torch.bfloat16),
        ]
    return [linear_ce_case(2048, 256, 32000, 4, torch.float32)]


def gpu_check_cases(device: str, *, quick: bool = False) -> List[Case]:
    """The time-boxed set of ``make gpu-check`` (about two minutes on one GPU), in bfloat16 and
    in order of value: the few-row worst-of-k shapes, worst-of-k at k = 4 on every shape of the
    device's list, k = 1 (the F.cross_entropy case, where Liger is a peer), then every other op
    once on the (32768, 32000) logits, the spatial case and the fused LM head. ``quick`` keeps
    the first three (a dry run's smoke test)."""
    gpu = device == "cuda"
    bf16 = torch.bfloat16
    shapes = GPU_SHAPES if gpu else CPU_SHAPES
    wide = shapes[3] if gpu else shapes[-1]  # (32768, 32000) on a GPU, (256, 32000) on the CPU
    cases = [worst_of_k_case(B * k, C, k, bf16) for B, k, C in FEW_ROW_SHAPES]
    cases += [worst_of_k_case(rows, C, 4, bf16) for rows, C in shapes]
    cases.append(worst_of_k_case(*wide, 1, bf16))
    cases.append(soft_target_case(*wide, 4, bf16))
    cases += [row_op_case(op, *wide, bf16) for op in _ROW_OPS]
    cases.append(perturb_case(512, 65536, bf16) if gpu else perturb_case(64, 4096, bf16))
    cases.append(spatial_case(16, 21, 512, bf16) if gpu else spatial_case(4, 21, 32, bf16))
    # The LM-head case at k = 4 (the CPU dry run takes the small shape).
    cases.append(linear_ce_cases(device, quick=not gpu)[0])
    return cases[:3] if quick else cases
