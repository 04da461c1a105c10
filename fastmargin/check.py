"""Self-check of the installed build: ``python -m fastmargin check [--device D] [--quick] [--big]``.

Runs every public op on the chosen device against :mod:`fastmargin.reference` (computed in
float64 on the same, already rounded, inputs) and prints one table: op, case, max error, pass.
Values and gradients are compared for every dtype, both copy layouts, every target kind
(class indices with ``ignore_index``, probabilities shared by the copies or one row per copy,
class weights), τ = 0 and τ > 0, label smoothing, ragged class counts, misaligned views,
rows masked with -inf or holding a NaN, the in-place gradient path, and the weight-noise
statistics. On CUDA it also checks the ops inside a captured CUDA graph, on a non-default
stream, bit-identical repeats and (``--big``) tensors of more than 2^31 elements (64-bit
offsets).

``--quick`` keeps every kernel (every op, forward and backward, every dtype, every launch
path) but fewer cases and smaller shapes: it is the workload compute-sanitizer runs over.
Exit status: 0 when every row passes, 1 when one fails, 2 when the build cannot run on the
device at all (no CUDA kernels, or none compiled for this GPU's architecture).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

import fastmargin as fm
from fastmargin import reference as ref
from fastmargin import weight_noise as wn

# (atol, rtol) per output dtype: a few ulps of the dtype on values of size ~1-10, the
# accumulation itself being float32 (float64 for float64).
TOLERANCE: Dict[torch.dtype, Tuple[float, float]] = {
    torch.float64: (1e-7, 1e-7),  # the references round Python-float radii to float32
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-3, 4e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


@dataclass
class Row:
    op: str
    case: str
    max_error: float  # max |fastmargin - reference| (or a count / statistic, see the case)
    passed: bool
    note: str = ""


class KernelImageMissing(RuntimeError):
    """The extension holds no kernel this GPU can run."""


def _is_missing_image(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "no kernel image" in text or "nokernelimage" in text or "invalid device function" in text


def rebuild_hint() -> str:
    major, minor = torch.cuda.get_device_capability()
    return (
        "fastmargin's CUDA kernels were not compiled for this GPU "
        f"({torch.cuda.get_device_name()}, compute capability {major}.{minor}). "
        "Rebuild for it from the source tree:\n"
        f"  TORCH_CUDA_ARCH_LIST={major}.{minor} python setup.py build_ext --inplace\n"
        f"or, for an installed package:\n"
        f"  TORCH_CUDA_ARCH_LIST={major}.{minor} pip install --no-build-isolation .\n"
        f'(a list such as "8.0;9.0" builds for several GPUs).'
    )


# --- comparison ------------------------------------------------------------------------------


def max_error(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> Tuple[float, bool, str]:
    """(max |got - want| over finite entries, within tolerance?, note). Non-finite entries must
    match exactly: NaN where the reference has NaN, the same infinity where it has one."""
    if tuple(got.shape) != tuple(want.shape):
        return math.inf, False, f"shape {tuple(got.shape)} != reference {tuple(want.shape)}"
    g = got.detach().to(torch.float64)
    w = want.detach().to(device=g.device, dtype=torch.float64)
    if g.numel() == 0:
        return 0.0, True, ""
    finite_g, finite_w = torch.isfinite(g), torch.isfinite(w)
    if not torch.equal(finite_g, finite_w) or not torch.equal(g.isnan(), w.isnan()):
        return math.inf, False, "non-finite entries differ from the reference"
    inf = g.isinf()
    if bool(inf.any()) and not torch.equal(g[inf], w[inf]):
        return math.inf, False, "infinities of the wrong sign"
    if not bool(finite_g.any()):
        return 0.0, True, ""
    diff = (g - w).abs()[finite_g]
    # a result in a coarser dtype than the op's (e.g. a float32 radius' gradient for float64
    # logits) is held to that dtype's tolerance
    atol, rtol = TOLERANCE[dtype]
    if got.dtype in TOLERANCE:
        atol, rtol = max(atol, TOLERANCE[got.dtype][0]), max(rtol, TOLERANCE[got.dtype][1])
    ok = bool((diff <= atol + rtol * w.abs()[finite_g]).all())
    return float(diff.max()), ok, ""


class Report:
    def __init__(self) -> None:
        self.rows: List[Row] = []

    def add(self, op: str, case: str, err: float, ok: bool, note: str = "") -> None:
        self.rows.append(Row(op, case, err, ok, note))

    def compare(self, op: str, case: str, got, want, dtype: torch.dtype) -> None:
        err, ok, note = max_error(got, want, dtype)
        self.add(op, case, err, ok, note)

    def compare_all(self, op: str, case: str, pairs, dtype: torch.dtype) -> None:
        """One row for several (name, got, want) pairs: the largest error, all must pass."""
        worst, all_ok, notes = 0.0, True, []
        for name, got, want in pairs:
            err, ok, note = max_error(got, want, dtype)
            worst = max(worst, err)
            if not ok:
                all_ok = False
                notes.append(f"{name}: {note or 'beyond tolerance'}")
        self.add(op, case, worst, all_ok, "; ".join(notes))

    def run(self, op: str, case: str, fn: Callable[[], None]) -> None:
        """Runs one check; an exception becomes a failed row (a missing kernel image aborts)."""
        try:
            fn()
        except Exception as exc:
            if _is_missing_image(exc):
                raise KernelImageMissing(str(exc)) from exc
            self.add(op, case, math.inf, False, f"raised {type(exc).__name__}: {exc}"[:200])

    @property
    def failed(self) -> List[Row]:
        return [r for r in self.rows if not r.passed]

    def table(self) -> str:
        head = ["op", "case", "max error", "pass"]
        body = [
            [r.op, r.case, f"{r.max_error:.3g}", "ok" if r.passed else "FAIL " + r.note]
            for r in self.rows
        ]
        widths = [max(len(x[i]) for x in [head] + body) for i in range(3)]
        lines = []
        for cells in [head, ["-" * w for w in widths] + ["----"]] + body:
            lines.append("  ".join(c.ljust(w) for c, w in zip(cells, widths)) + "  " + cells[3])
        return "\n".join(lines)


# --- inputs ----------------------------------------------------------------------------------


class Inputs:
    """Seeded random inputs on one device."""

    def __init__(self, device: str, seed: int = 0) -> None:
        self.device = device
        self.gen = torch.Generator(device="cpu").manual_seed(seed)

    def randn(self, *shape, dtype=torch.float32, scale: float = 1.0) -> torch.Tensor:
        x = scale * torch.randn(*shape, generator=self.gen, dtype=torch.float64)
        return x.to(device=self.device, dtype=dtype)

    def targets(self, n: int, classes: int, ignore_every: int = 0) -> torch.Tensor:
        y = torch.randint(0, classes, (n,), generator=self.gen)
        if ignore_every:
            y[::ignore_every] = -100
        return y.to(self.device)

    def probs(self, *shape, dtype=torch.float32) -> torch.Tensor:
        p = torch.softmax(torch.randn(*shape, generator=self.gen, dtype=torch.float64), dim=-1)
        return p.to(device=self.device, dtype=dtype)

    def misaligned(self, rows: int, classes: int, dtype) -> torch.Tensor:
        """(rows, classes) view starting one element into its storage, rows 3 elements apart
        beyond C: no 16-byte-aligned row start, so the kernels' scalar paths run."""
        base = self.randn(rows * (classes + 3) + 1, dtype=dtype)
        return base[1:].view(rows, classes + 3)[:, :classes]


def _leaf(x: torch.Tensor) -> torch.Tensor:
    return x.detach().clone().requires_grad_(True)


def _wide(x: torch.Tensor) -> torch.Tensor:
    """The float64 copy of an input the reference runs on (a leaf when x requires grad)."""
    w = x.detach().to(torch.float64) if x.is_floating_point() else x
    return w.requires_grad_(True) if x.requires_grad else w


def _grads(out: torch.Tensor, inputs: Sequence[torch.Tensor], upstream: torch.Tensor):
    wrt = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    return torch.autograd.grad(out, wrt, upstream.to(out.dtype))


def compare_fn(
    report: Report,
    op: str,
    case: str,
    ours: Callable,
    theirs: Callable,
    inputs: Sequence[torch.Tensor],
    dtype: torch.dtype,
    seed: int = 1,
) -> None:
    """Values and gradients (of every input that requires grad, for a random upstream
    gradient) of ``ours(*inputs)`` against ``theirs`` on float64 copies of the inputs."""
    wide = [_wide(t) for t in inputs]
    out = ours(*inputs)
    want = theirs(*wide)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    upstream = torch.randn(tuple(want.shape), generator=gen, dtype=torch.float64).to(want.device)
    pairs = [("value", out, want)]
    if any(t.requires_grad for t in inputs):
        got_g = _grads(out, inputs, upstream)
        want_g = _grads(want, wide, upstream)
        pairs += [(f"grad{i}", a, b) for i, (a, b) in enumerate(zip(got_g, want_g))]
    report.compare_all(op, case, pairs, dtype)


# --- per-op checks ---------------------------------------------------------------------------


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def check_worst_of_k(report: Report, inp: Inputs, dtypes, quick: bool) -> None:
    op = "worst_of_k_cross_entropy"
    B, k = (5, 3) if quick else (33, 4)
    # (label, C, dim, options, target kind)
    cases = [
        ("index", 1003, 1, {}, "index"),
        (
            "index ignore ls=0.1 tau=0.5",
            1003,
            0,
            {"temperature": 0.5, "label_smoothing": 0.1},
            "ignore",
        ),
        ("probs shared", 1003, 0, {}, "probs"),
        ("probs per copy tau=0.3", 77, 1, {"temperature": 0.3}, "probs_per_copy"),
        ("class weights ls=0.1", 1003, 1, {"label_smoothing": 0.1}, "weights"),
        ("sum reduction tau=0.5", 4099, 0, {"temperature": 0.5, "reduction": "sum"}, "ignore"),
        ("C=1", 1, 1, {}, "index"),
        ("C=2 tau=0.5", 2, 0, {"temperature": 0.5}, "ignore"),
    ]
    if not quick:
        cases += [("C=7", 7, 0, {}, "index"), ("C=32000 (block per row)", 32000, 1, {}, "index")]
    for dtype in dtypes:
        for label, C, dim, opts, kind in cases:
            name = f"{label}, dim={dim}, C={C}, {_dtype_name(dtype)}"

            def one(name=name, C=C, dim=dim, opts=opts, kind=kind, dtype=dtype):
                shape = (B, k, C) if dim == 1 else (k, B, C)
                x = _leaf(inp.randn(*shape, dtype=dtype, scale=2.0))
                extra = {}
                if kind in ("index", "weights"):
                    y = inp.targets(B, C)
                elif kind == "ignore":
                    y = inp.targets(B, C, ignore_every=3)
                elif kind == "probs":
                    y = inp.probs(B, C, dtype=dtype)
                else:
                    y = inp.probs(*shape, dtype=dtype)
                if kind == "weights":
                    extra["weight"] = inp.randn(C).abs() + 0.1
                reduction = opts.get("reduction", "none")
                o = {**opts, "reduction": reduction}

                def ours(x, y, *w):
                    return fm.worst_of_k_cross_entropy(x, y, dim=dim, **o, **_w(w))

                def theirs(x, y, *w):
                    return ref.worst_of_k_cross_entropy(x, y, dim=dim, **o, **_w(w))

                args = [x, y] + ([extra["weight"]] if extra else [])
                compare_fn(report, op, name, ours, theirs, args, dtype)

            report.run(op, name, one)

    def worst_index() -> None:
        x = inp.randn(B, k, 1003, scale=2.0)
        y = inp.targets(B, 1003)
        _, got = fm.worst_of_k_cross_entropy(x, y, dim=1, return_index=True)
        _, want = ref.worst_of_k_cross_entropy(x.double(), y, dim=1, return_index=True)
        wrong = int((got != want).sum())
        report.add(op, "return_index (worst copy)", float(wrong), wrong == 0, "indices differ")

    report.run(op, "return_index (worst copy)", worst_index)
    _check_drop_in(report, inp, dtypes, B)
    _check_masked_and_nan(report, inp, dtypes, B, k)
    _check_inplace(report, inp, dtypes, B, k)


def _check_drop_in(report: Report, inp: Inputs, dtypes, B: int) -> None:
    """Without ``dim`` the loss takes F.cross_entropy's own shapes and must give its numbers:
    (N, C), spatial (N, C, d) and batch-less (C,), against F.cross_entropy itself."""
    op = "worst_of_k_cross_entropy"
    C, d = 37, 6
    shapes = [("(N, C)", (B, C), (B,)), ("(N, C, d)", (B, C, d), (B, d)), ("(C,)", (C,), ())]
    for dtype in dtypes:
        for label, shape, target_shape in shapes:
            case = f"no dim, {label} vs F.cross_entropy, {_dtype_name(dtype)}"

            def one(case=case, shape=shape, target_shape=target_shape, dtype=dtype) -> None:
                x = _leaf(inp.randn(*shape, dtype=dtype, scale=2.0))
                n = math.prod(target_shape)
                y = inp.targets(max(n, 1), C)[:n].view(target_shape)
                reduction = "none" if target_shape else "sum"
                compare_fn(
                    report,
                    op,
                    case,
                    lambda z, t: fm.worst_of_k_cross_entropy(z, t, reduction=reduction),
                    lambda z, t: torch.nn.functional.cross_entropy(z, t, reduction=reduction),
                    [x, y],
                    dtype,
                )

            report.run(op, case, one)


def _w(extra) -> dict:
    return {"weight": extra[0]} if extra else {}


def _check_masked_and_nan(report: Report, inp: Inputs, dtypes, B: int, k: int) -> None:
    op = "worst_of_k_cross_entropy"
    C = 301

    def masked() -> None:
        x = inp.randn(B, k, C, scale=2.0)
        x[..., 5:40] = float("-inf")  # masked classes: finite loss, zero gradient
        y = inp.targets(B, C)
        y[y < 40] = 41
        ours = lambda z, t: fm.worst_of_k_cross_entropy(z, t, dim=1, reduction="none")  # noqa: E731
        theirs = lambda z, t: ref.worst_of_k_cross_entropy(z, t, dim=1, reduction="none")  # noqa: E731
        compare_fn(report, op, "-inf masked classes", ours, theirs, [_leaf(x), y], torch.float32)

    def nan_row() -> None:
        x = inp.randn(B, k, C, scale=2.0)
        x[1, 2, 7] = float("nan")  # NaN propagates to its sample only
        y = inp.targets(B, C)
        got = fm.worst_of_k_cross_entropy(x, y, dim=1, reduction="none")
        want = ref.worst_of_k_cross_entropy(x.double(), y, dim=1, reduction="none")
        report.compare(op, "NaN in one row", got, want, torch.float32)

    def logits_1e4() -> None:
        x = inp.randn(B, k, C, scale=1e4)  # no overflow at large magnitudes (float32)
        y = inp.targets(B, C)
        ours = lambda z, t: fm.worst_of_k_cross_entropy(z, t, dim=0, reduction="none")  # noqa: E731
        theirs = lambda z, t: ref.worst_of_k_cross_entropy(z, t, dim=0, reduction="none")  # noqa: E731
        x = x.transpose(0, 1).contiguous()  # (k, B, C)
        report_case = "logits of magnitude 1e4"
        got = ours(x, y)
        want = theirs(x.double(), y)
        err, ok, note = max_error(got, want, torch.float32)
        # atol scales with the loss (~1e4): float32 resolves about 1e-3 there
        ok = ok or err <= 1e-6 * float(want.abs().max())
        report.add(op, report_case, err, ok, note)

    def misaligned() -> None:
        for dtype in dtypes:
            x = inp.misaligned(B * k, 37, dtype).unflatten(0, (B, k)).requires_grad_(True)
            y = inp.targets(B, 37)
            ours = lambda z, t: fm.worst_of_k_cross_entropy(z, t, dim=1, reduction="none")  # noqa: E731
            theirs = lambda z, t: ref.worst_of_k_cross_entropy(z, t, dim=1, reduction="none")  # noqa: E731
            case = f"misaligned view, {_dtype_name(dtype)}"
            compare_fn(report, op, case, ours, theirs, [x, y], dtype)

    report.run(op, "-inf masked classes", masked)
    report.run(op, "NaN in one row", nan_row)
    report.run(op, "logits of magnitude 1e4", logits_1e4)
    report.run(op, "misaligned view", misaligned)


def _check_inplace(report: Report, inp: Inputs, dtypes, B: int, k: int) -> None:
    """inplace_backward: the gradient written over the (non-leaf) logits in the forward."""
    op = "worst_of_k_cross_entropy"
    C = 1003
    for dtype in dtypes:
        for dim in (0, 1):
            case = f"inplace_backward, dim={dim}, {_dtype_name(dtype)}"

            def one(case=case, dtype=dtype, dim=dim) -> None:
                shape = (B, k, C) if dim == 1 else (k, B, C)
                leaf = _leaf(inp.randn(*shape, dtype=dtype, scale=2.0))
                y = inp.targets(B, C, ignore_every=4)
                opts = {"dim": dim, "temperature": 0.5, "label_smoothing": 0.1}
                loss = fm.worst_of_k_cross_entropy(leaf * 1, y, inplace_backward=True, **opts)
                loss.backward()
                wide = _wide(leaf)
                want = ref.worst_of_k_cross_entropy(wide, y, **opts)
                want.backward()
                pairs = [("value", loss, want), ("grad", leaf.grad, wide.grad)]
                report.compare_all(op, case, pairs, dtype)

            report.run(op, case, one)


def check_margin(report: Report, inp: Inputs, dtypes, quick: bool) -> None:
    op = "multiclass_margin"
    N = 7 if quick else 65
    shapes = [("C=1003", 1003), ("C=2", 2), ("C=4099 (block per row)", 4099)]
    for dtype in dtypes:
        for label, C in shapes:
            case = f"{label}, {_dtype_name(dtype)}"

            def one(case=case, C=C, dtype=dtype) -> None:
                x = _leaf(inp.randn(N, C, dtype=dtype, scale=2.0))
                compare_fn(
                    report,
                    op,
                    case,
                    fm.multiclass_margin,
                    ref.multiclass_margin,
                    [x, inp.targets(N, C)],
                    dtype,
                )

            report.run(op, case, one)

    for dtype in dtypes:
        case = f"misaligned view, -inf and NaN rows, {_dtype_name(dtype)}"

        def special(case=case, dtype=dtype) -> None:
            x = inp.misaligned(N, 37, dtype)
            x[0, :] = float("-inf")
            x[0, 3] = 1.0  # every other class masked: margin +inf
            x[2, 5] = float("nan")
            y = inp.targets(N, 37)
            y[0] = 3
            got = fm.multiclass_margin(x, y)
            want = ref.multiclass_margin(x.double(), y)
            report.compare(op, case, got, want, dtype)

        report.run(op, case, special)


def check_weight_robust(report: Report, inp: Inputs, dtypes, quick: bool) -> None:
    op = "weight_robust_cross_entropy"
    N = 9 if quick else 65
    for dtype in dtypes:
        for C, label in ((1003, "tensor radius"), (4099, "float radius, ls=0.1")):
            case = f"{label}, C={C}, {_dtype_name(dtype)}"

            def one(case=case, C=C, label=label, dtype=dtype) -> None:
                x = _leaf(inp.randn(N, C, dtype=dtype, scale=2.0))
                y = inp.targets(N, C, ignore_every=4)
                if label.startswith("tensor"):
                    r = _leaf(inp.randn(N).abs())

                    def ours(z, t, rr):
                        return fm.weight_robust_cross_entropy(z, t, rr, reduction="none")

                    def theirs(z, t, rr):
                        return ref.weight_robust_cross_entropy(z, t, rr, reduction="none")

                    compare_fn(report, op, case, ours, theirs, [x, y, r], dtype)
                else:
                    opts = {"label_smoothing": 0.1}
                    ours = lambda z, t: fm.weight_robust_cross_entropy(z, t, 0.3, **opts)  # noqa: E731
                    theirs = lambda z, t: ref.weight_robust_cross_entropy(z, t, 0.3, **opts)  # noqa: E731
                    compare_fn(report, op, case, ours, theirs, [x, y], dtype)

            report.run(op, case, one)

    op = "weight_perturbation_radius"
    for p in (1.0, 2.0, 3.0, math.inf):
        case = f"p={p}"

        def radius(case=case, p=p) -> None:
            h = _leaf(inp.randn(N, 129))
            ours = lambda f: fm.weight_perturbation_radius(f, 0.05, p=p)  # noqa: E731
            theirs = lambda f: ref.weight_perturbation_radius(f, 0.05, p=p)  # noqa: E731
            compare_fn(report, op, case, ours, theirs, [h], torch.float32)

        report.run(op, case, radius)


def check_all_layer_perturb(report: Report, inp: Inputs, dtypes, quick: bool, cuda: bool) -> None:
    op = "all_layer_perturb"
    # (label, shape): a warp per example; a block per example; few large examples (split into
    # chunks on the GPU); a ragged per-example size (scalar tails)
    shapes = [
        ("warp per example", (16, 3, 5, 7)),
        ("block per example", (8, 4099)),
        ("few large examples", (2, 1 << 17) if cuda else (2, 1 << 15)),
    ]
    for dtype in dtypes:
        for label, shape in shapes:
            case = f"{label} {shape}, {_dtype_name(dtype)}"

            def one(case=case, shape=shape, dtype=dtype) -> None:
                u = _leaf(inp.randn(*shape, dtype=dtype))
                d = _leaf(inp.randn(*shape, dtype=dtype, scale=1e-2))
                compare_fn(
                    report, op, case, fm.all_layer_perturb, ref.all_layer_perturb, [u, d], dtype
                )

            report.run(op, case, one)

    def mixed() -> None:
        # bfloat16 activations, float32 delta (AMO under autocast), channels_last
        u = inp.randn(4, 6, 5, 7, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
        d = inp.randn(4, 6, 5, 7, scale=1e-2)
        u, d = _leaf(u), _leaf(d)
        compare_fn(
            report,
            op,
            "bf16 u, fp32 delta, channels_last",
            fm.all_layer_perturb,
            ref.all_layer_perturb,
            [u, d],
            torch.bfloat16,
        )

    def delta_only() -> None:
        u = inp.randn(3, 3000)  # no gradient for u: the backward's grad_delta-only pass
        d = _leaf(inp.randn(3, 3000, scale=1e-2))
        compare_fn(
            report,
            op,
            "grad for delta only",
            fm.all_layer_perturb,
            ref.all_layer_perturb,
            [u, d],
            torch.float32,
        )

    report.run(op, "bf16 u, fp32 delta, channels_last", mixed)
    report.run(op, "grad for delta only", delta_only)


def check_weight_noise(report: Report, inp: Inputs, dtypes, quick: bool) -> None:
    op = "weight_noise_worst_of_k_ce"
    N, k = (7, 3) if quick else (33, 4)
    dev = inp.device
    for dtype in dtypes:
        for C, tau in ((1003, 0.0), (4099, 0.5)):
            case = f"C={C}, tau={tau}, {_dtype_name(dtype)}"

            def one(case=case, C=C, tau=tau, dtype=dtype) -> None:
                x = _leaf(inp.randn(N, C, dtype=dtype, scale=2.0))
                y = inp.targets(N, C, ignore_every=4)
                s = _leaf(inp.randn(N).abs())
                gen = torch.Generator(device=dev).manual_seed(1234)
                state = wn.draw_philox_state(dev, gen)  # the state the op will draw
                xi = wn.noise_from_state(state, N, k, C)
                opts = {"k": k, "temperature": tau, "label_smoothing": 0.1, "reduction": "none"}

                def ours(z, t, sc):
                    g = torch.Generator(device=dev).manual_seed(1234)
                    return fm.weight_noise_worst_of_k_cross_entropy(z, t, sc, generator=g, **opts)

                def theirs(z, t, sc):
                    return ref.weight_noise_worst_of_k_cross_entropy(z, t, sc, xi, **opts)

                compare_fn(report, op, case, ours, theirs, [x, y, s], dtype)

            report.run(op, case, one)

    def statistics() -> None:
        n, kk, c = (32, 4, 1000) if quick else (128, 8, 1000)
        xi = wn.noise(7, 11, n, kk, c, device=dev).double()
        m = xi.numel()
        mean, std = float(xi.mean()), float(xi.std())
        # 6 standard errors: the mean's is 1/sqrt(m), the standard deviation's 1/sqrt(2m)
        ok = abs(mean) < 6 / math.sqrt(m) and abs(std - 1) < 6 / math.sqrt(2 * m)
        corr = float((xi[:, :, 1:] * xi[:, :, :-1]).mean())  # neighbours independent
        ok = ok and abs(corr) < 6 / math.sqrt(m)
        err = max(abs(mean), abs(std - 1), abs(corr))
        report.add(op, f"noise N(0,1): mean, std, lag-1 corr ({m} draws)", err, ok)

    def fresh_draws() -> None:
        x = inp.randn(N, 1003)
        y = inp.targets(N, 1003)
        a = fm.weight_noise_worst_of_k_cross_entropy(x, y, 1.0, k=k, reduction="none")
        b = fm.weight_noise_worst_of_k_cross_entropy(x, y, 1.0, k=k, reduction="none")
        same = bool(torch.equal(a, b))
        report.add(op, "consecutive calls draw fresh noise", 0.0, not same, "identical draws")

    report.run(op, "noise statistics", statistics)
    report.run(op, "consecutive calls draw fresh noise", fresh_draws)


# --- CUDA only -------------------------------------------------------------------------------


def _all_ops_step(x, y, m, ym, u, d, xn, sn, gen_seed: int):
    """Every op, forward and backward, as one function of fixed tensors (graph, streams)."""
    loss = fm.worst_of_k_cross_entropy(x, y, dim=0, temperature=0.5)
    (gx,) = torch.autograd.grad(loss, x)
    margin = fm.multiclass_margin(m, ym)
    (gm,) = torch.autograd.grad(margin.sum(), m)
    out = fm.all_layer_perturb(u, d)
    gu, gd = torch.autograd.grad(out.float().square().sum(), (u, d))
    gen = torch.Generator(device="cuda").manual_seed(gen_seed) if gen_seed >= 0 else None
    noisy = fm.weight_noise_worst_of_k_cross_entropy(xn, ym, sn, k=4, generator=gen)
    gxn, gsn = torch.autograd.grad(noisy, (xn, sn))
    return [loss, gx, margin, gm, out, gu, gd, noisy, gxn, gsn]


def _step_inputs(inp: Inputs):
    x = _leaf(inp.randn(4, 64, 1003, dtype=torch.bfloat16))
    y = inp.targets(64, 1003)
    m = _leaf(inp.randn(64, 1003))
    u = _leaf(inp.randn(3, 70000, dtype=torch.bfloat16))
    d = _leaf(inp.randn(3, 70000, scale=1e-2))
    xn = _leaf(inp.randn(64, 1003))
    sn = _leaf(inp.randn(64).abs())
    return [x, y, m, y, u, d, xn, sn]


def check_cuda_execution(report: Report, inp: Inputs) -> None:
    """Bit-identical repeats, a non-default stream, and a captured CUDA graph."""
    op = "all ops, fwd + bwd"
    tensors = _step_inputs(inp)

    def repeats_and_stream() -> None:
        a = _all_ops_step(*tensors, gen_seed=5)
        b = _all_ops_step(*tensors, gen_seed=5)
        same = all(torch.equal(p, q) for p, q in zip(a, b))
        report.add(op, "two runs on the same inputs are bit-identical", 0.0, same, "differ")
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            c = _all_ops_step(*tensors, gen_seed=5)
        side.synchronize()
        same = all(torch.equal(p, q) for p, q in zip(a, c))
        report.add(op, "non-default stream: bit-identical", 0.0, same, "differs")

    def graph() -> None:
        if os.environ.get("PYTORCH_NO_CUDA_MEMORY_CACHING") == "1":
            # capture needs the caching allocator's private pools (memcheck runs without them)
            report.add(op, "CUDA graph", 0.0, True, "skipped: caching allocator disabled")
            return
        was = fm.validation_enabled()
        fm.set_validation(False)  # the target check synchronises the host: not capturable
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up on a side stream, as capture requires
                for _ in range(2):
                    _all_ops_step(*tensors, gen_seed=-1)
            torch.cuda.current_stream().wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                static = _all_ops_step(*tensors, gen_seed=-1)
            # new input values, then replay: the deterministic outputs must equal an eager run
            with torch.no_grad():
                for t in tensors:
                    if t.is_floating_point():
                        t.mul_(0.5)
            g.replay()
            torch.cuda.synchronize()
            first = [t.clone() for t in static]
            g.replay()
            eager = _all_ops_step(*tensors, gen_seed=-1)
            det = range(7)  # the weight-noise outputs (7..9) draw fresh noise per replay
            same = all(torch.equal(first[i], eager[i]) for i in det)
            report.add(op, "CUDA graph replay == eager (new inputs)", 0.0, same, "differs")
            fresh = not torch.equal(first[7], static[7]) and bool(torch.isfinite(static[7]))
            report.add(
                "weight_noise_worst_of_k_ce",
                "CUDA graph: each replay draws new noise",
                0.0,
                fresh,
                "same noise twice or non-finite",
            )
        finally:
            fm.set_validation(was)

    report.run(op, "repeats and non-default stream", repeats_and_stream)
    report.run(op, "CUDA graph", graph)

    def cpu_noise() -> None:
        cpu = wn.noise(3, 4, 5, 3, 1003, device="cpu")
        gpu = wn.noise(3, 4, 5, 3, 1003, device="cuda").cpu()
        err, ok, note = max_error(gpu, cpu, torch.float32)
        ok = ok or err < 1e-4  # logf / sincosf differ in the last bits between CPU and GPU
        report.add(
            "weight_noise_worst_of_k_ce",
            "same Philox state: CUDA noise == CPU noise",
            err,
            ok,
            note,
        )

    report.run("weight_noise_worst_of_k_ce", "CUDA noise == CPU noise", cpu_noise)


def check_big(report: Report, inp: Inputs) -> None:
    """More than 2^31 elements: the rows past 2^31 checked against the reference."""

    def free_gb() -> float:
        return torch.cuda.mem_get_info()[0] / 1e9

    def worst_of_k() -> None:
        B, k, C = 16800, 4, 32000  # 2.15e9 bfloat16 logits (4.3 GB) + their gradient
        if free_gb() < 12:
            report.add("worst_of_k_cross_entropy", "> 2^31 elements", 0.0, True, "skipped: memory")
            return
        x = torch.randn(B, k, C, device="cuda", dtype=torch.bfloat16).requires_grad_(True)
        y = torch.randint(0, C, (B,), device="cuda")
        per = fm.worst_of_k_cross_entropy(x, y, dim=1, reduction="none")
        g = torch.rand(B, device="cuda")
        (gx,) = torch.autograd.grad(per, x, g.to(per.dtype))
        tail = slice(B - 3, B)
        w = x[tail].detach().double().requires_grad_(True)
        want = ref.worst_of_k_cross_entropy(w, y[tail], dim=1, reduction="none")
        (gw,) = torch.autograd.grad(want, w, g[tail].to(per.dtype).double())
        pairs = [("value", per[tail], want), ("grad", gx[tail], gw)]
        report.compare_all(
            "worst_of_k_cross_entropy", f"> 2^31 elements ({B}x{k}x{C} bf16)", pairs, torch.bfloat16
        )
        xm = x.detach().view(B * k, C)
        ym = torch.randint(0, C, (B * k,), device="cuda")
        got = fm.multiclass_margin(xm, ym)[-5:]
        want = ref.multiclass_margin(xm[-5:].double(), ym[-5:])
        report.compare(
            "multiclass_margin", f"> 2^31 elements ({B * k}x{C} bf16)", got, want, torch.bfloat16
        )

    def perturb() -> None:
        B, N = 2, (1 << 30) + (1 << 20)  # example 1 ends past 2^31 elements
        if free_gb() < 40:
            report.add("all_layer_perturb", "> 2^31 elements", 0.0, True, "skipped: memory")
            return
        u = torch.randn(B, N, device="cuda", dtype=torch.bfloat16).requires_grad_(True)
        d = (1e-2 * torch.randn(B, N, device="cuda", dtype=torch.bfloat16)).requires_grad_(True)
        out = fm.all_layer_perturb(u, d)
        g = torch.randn_like(out)
        gu, gd = torch.autograd.grad(out, (u, d), g)
        # example 1 by the formulas (its norm and <g, delta> summed in float32 by torch), its
        # last 2^20 elements compared: they lie past 2^31 elements from the start of u
        u1, d1, g1 = u[1].detach().float(), d[1].detach().float(), g[1].float()
        norm = torch.linalg.vector_norm(u1).double()
        dot = torch.dot(g1, d1).double()
        tail = slice(N - (1 << 20), N)
        u_t, d_t, g_t = u1[tail].double(), d1[tail].double(), g1[tail].double()
        pairs = [
            ("value", out[1, tail], u_t + norm * d_t),
            ("grad_u", gu[1, tail], g_t + u_t * dot / norm),
            ("grad_delta", gd[1, tail], norm * g_t),
        ]
        report.compare_all(
            "all_layer_perturb", f"> 2^31 elements ({B}x{N} bf16)", pairs, torch.bfloat16
        )

    for name, fn in (("worst_of_k_cross_entropy", worst_of_k), ("all_layer_perturb", perturb)):
        report.run(name, "> 2^31 elements", fn)
        torch.cuda.empty_cache()


# --- driver ----------------------------------------------------------------------------------


def has_cuda_kernels() -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key("fastmargin::worst_of_k_ce_fwd", "CUDA")


def probe_cuda() -> Optional[str]:
    """None when the kernels run on this GPU, else what is wrong and how to fix it."""
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible (torch.cuda.is_available() is False); use --device cpu"
    if not has_cuda_kernels():
        return (
            "this fastmargin build has no CUDA kernels (built without nvcc, or with "
            "FASTMARGIN_CUDA=0). Rebuild with the CUDA toolkit: CUDA_HOME=/usr/local/cuda "
            "TORCH_CUDA_ARCH_LIST=<your GPU's x.y> python setup.py build_ext --inplace"
        )
    try:
        x = torch.randn(2, 3, device="cuda")
        fm.multiclass_margin(x, torch.zeros(2, dtype=torch.long, device="cuda"))
        torch.cuda.synchronize()
    except Exception as exc:
        if _is_missing_image(exc):
            return rebuild_hint()
        raise
    return None


def run_checks(device: str, *, quick: bool, big: bool) -> Report:
    report = Report()
    inp = Inputs(device)
    cuda = device == "cuda"
    # every dtype in both modes: each is its own kernel instantiation (--quick is what
    # compute-sanitizer runs, so it must launch them all); --quick has fewer, smaller cases
    dtypes = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
    check_worst_of_k(report, inp, dtypes, quick)
    check_margin(report, inp, dtypes, quick)
    check_weight_robust(report, inp, dtypes, quick)
    check_all_layer_perturb(report, inp, dtypes, quick, cuda)
    check_weight_noise(report, inp, dtypes, quick)
    if cuda:
        check_cuda_execution(report, inp)
        if big:
            check_big(report, inp)
        torch.cuda.synchronize()
    return report


def main_check(args: argparse.Namespace) -> int:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.big and device != "cuda":
        print("--big: the > 2^31-element cases run on CUDA only; ignored on the CPU")
    if device == "cuda":
        problem = probe_cuda()
        if problem:
            print(f"fastmargin check: {problem}")
            return 2
    start = time.perf_counter()
    try:
        report = run_checks(device, quick=args.quick, big=args.big and device == "cuda")
    except KernelImageMissing:
        print(f"fastmargin check: {rebuild_hint()}")
        return 2
    seconds = time.perf_counter() - start
    where = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(report.table())
    failed = report.failed
    mode = "quick" if args.quick else "full"
    print(
        f"\nfastmargin {fm.__version__}, torch {torch.__version__}, {where}: {mode} check, "
        f"{len(report.rows)} checks, {len(failed)} failed, {seconds:.1f} s"
    )
    if args.json:
        with open(args.json, "w") as f:
            meta = {"device": where, "torch": torch.__version__, "mode": mode, "seconds": seconds}
            json.dump({"meta": meta, "rows": [asdict(r) for r in report.rows]}, f, indent=1)
    return 1 if failed else 0


def add_check_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default=None,
        help="default: cuda when a GPU is visible, else cpu",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="every kernel once, fewer and smaller cases (compute-sanitizer's run)",
    )
    p.add_argument(
        "--big",
        action="store_true",
        help="CUDA: also tensors of more than 2^31 elements (about 45 GB of memory)",
    )
    p.add_argument("--json", default=None, help="also write the rows as JSON here")
