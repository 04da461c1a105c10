"""The CUDA kernels, run on the host under the emulation (csrc/emu/cuda_emu.h) with ASan and
UBSan's alignment check, against the CPU kernels on the same inputs.

torch.ops.fastmargin_emu.* is the CUDA host code (checks, copies, alignment, warp / block and
split choices, allocation) and the CUDA kernels; torch.ops.fastmargin.* the CPU kernels. Exact
agreement where the arithmetic is the same (selected indices, margins, runner-ups, the Philox
noise); elsewhere the CUDA kernels reduce in a different order (warp trees vs sequential SIMD
lanes), so floating results agree within TOL: a few ulps of the statistics dtype, plus one
rounding of the output dtype.
"""

from __future__ import annotations

import pytest
import torch

CPU = torch.ops.fastmargin
EMU = torch.ops.fastmargin_emu

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# (rtol, atol) of a value in the statistics dtype (float32; float64 for float64 logits), and of
# one rounded to the logits' dtype (half / bfloat16 gradients: one rounding step apart at most).
STATS_TOL = {torch.float64: (1e-12, 1e-12), None: (2e-5, 2e-6)}
OUT_TOL = {torch.float16: (2e-3, 1e-4), torch.bfloat16: (1.6e-2, 1e-3)}


def tol(dtype: torch.dtype, stats: bool) -> tuple[float, float]:
    if dtype == torch.float64:
        return STATS_TOL[torch.float64]
    if stats or dtype == torch.float32:
        return STATS_TOL[None]
    return OUT_TOL[dtype]


def close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, stats: bool = True) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype
    rtol, atol = tol(dtype, stats)
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol, equal_nan=True)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def logits_in_layout(B, k, C, dtype, layout, seed):
    """(B, k, C) logits laid out as named: 'bkc', 'kbc' (a transposed (k, B, C) view), 'pad'
    (row stride C + 3), 'offset' (storage offset + 1: no 16-byte vectors), 'expand' (k copies
    of one row, copy stride 0)."""
    g = gen(seed)
    if layout == "kbc":
        return (torch.randn(k, B, C, generator=g) * 3).to(dtype).transpose(0, 1)
    if layout == "pad":
        return (torch.randn(B, k, C + 3, generator=g) * 3).to(dtype)[..., :C]
    if layout == "offset":
        flat = (torch.randn(B * k * C + 1, generator=g) * 3).to(dtype)
        return flat[1:].view(B, k, C)
    if layout == "expand":
        return (torch.randn(B, 1, C, generator=g) * 3).to(dtype).expand(B, k, C)
    return (torch.randn(B, k, C, generator=g) * 3).to(dtype)


def stats_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def index_target(B, C, seed, ignore=False, invalid=False):
    t = torch.randint(0, C, (B,), generator=gen(seed))
    if ignore and B > 1:
        t[1] = -100
    if invalid and B > 2:
        t[2] = C + 5
    return t


def check_worst_of_k(x, target, radius=None, tau=0.0, eps=0.0, weight=None, inplace=None):
    """Forward, backward (from the CPU forward's statistics, so both backward kernels see the
    same inputs) and the in-place backward of both builds (by default for contiguous logits)."""
    dt = x.dtype
    args = (target, radius, tau, eps, -100, weight)
    cpu = CPU.worst_of_k_ce_fwd(x, *args)
    emu = EMU.worst_of_k_ce_fwd(x, *args)
    for name, a, b in zip(("loss", "lse", "weight", "index", "dradius"), emu, cpu):
        if name == "index":
            assert torch.equal(a, b), name
        else:
            close(a, b, dt)
    _, lse, w, _, _ = cpu
    g = torch.rand(x.shape[:-2].numel(), generator=gen(7), dtype=stats_dtype(dt)) + 0.5
    bargs = (g, x, target, radius, lse, w, eps, -100, weight)
    grad_cpu = CPU.worst_of_k_ce_bwd(*bargs)
    grad_emu = EMU.worst_of_k_ce_bwd(*bargs)
    close(grad_emu, grad_cpu, dt, stats=False)
    if inplace is None:
        inplace = x.stride(1) != 0 and x.storage_offset() == 0 and x.is_contiguous()
    assert grad_emu.stride() == torch.empty_like(x).stride()  # the gradient in the logits' layout
    if inplace:
        y = x.clone()
        EMU.worst_of_k_ce_bwd_inplace(g, y, target, radius, lse, w, eps, -100, weight)
        close(y, grad_cpu, dt, stats=False)


CLASSES = [1, 2, 8, 17, 64, 2048, 2049, 2056]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C", CLASSES)
def test_worst_of_k_plain_every_dtype_and_class_count(dtype, C):
    B, k = (2, 2) if C > 2048 else (5, 3)
    x = logits_in_layout(B, k, C, dtype, "bkc", C)
    check_worst_of_k(x, index_target(B, C, C, ignore=True, invalid=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("C", [10, 21, 32, 33])
@pytest.mark.parametrize("layout", ["bkc", "offset"])
def test_worst_of_k_thread_rows_span_blocks(dtype, C, layout):
    """C <= 32: a thread per row (256 rows per block); enough rows for several blocks and a
    partly filled last one, forward (per sample) and backward (per row); C = 33 takes warps."""
    B, k = 301, 3
    x = logits_in_layout(B, k, C, dtype, layout, C)
    check_worst_of_k(x, index_target(B, C, C, ignore=True, invalid=True), eps=0.1, tau=0.3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("C", [1, 2, 21, 32, 33])
def test_class_last_rows(dtype, C):
    """_class_last on CUDA: class-major rows (memory (C, N * S)) for C <= 32, which the kernels
    read with a thread per row; contiguous rows above. The values are the rows either way."""
    x = (torch.randn(3, C, 5, 7, generator=gen(C)) * 3).to(dtype)
    rows = EMU._class_last(x)
    assert torch.equal(rows, x.movedim(1, -1).reshape(-1, 1, C))
    if 1 < C <= 32:
        assert rows.stride(0) == 1 and rows.stride(2) == 3 * 5 * 7
    else:
        assert rows.is_contiguous()
    assert torch.equal(EMU._class_last(x.transpose(2, 3)), CPU._class_last(x.transpose(2, 3)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("C", [2, 21, 32, 33])
@pytest.mark.parametrize("option", ["plain", "smoothing", "radius", "class_weight"])
def test_worst_of_k_class_major_rows(dtype, C, option):
    """Class-major rows ((N * S, 1, C), class stride N * S, as _class_last lays spatial logits
    out): read in place by the plain loss up to 32 classes, through a contiguous copy otherwise
    (more classes, a radius, class weights); the gradient comes back in the logits' layout. 303
    rows: two blocks of a thread per row."""
    N, S = 3, 101
    x = CPU._class_last((torch.randn(N, C, S, generator=gen(C + 50)) * 3).to(dtype))
    assert x.stride(2) == N * S
    target = index_target(N * S, C, 9, ignore=True, invalid=True)
    sd = stats_dtype(dtype)
    kw = {"eps": 0.1} if option == "smoothing" else {}
    if option == "radius":
        kw["radius"] = torch.rand(N * S, generator=gen(3), dtype=sd)
    if option == "class_weight":
        kw["weight"] = torch.rand(C, generator=gen(4), dtype=sd) + 0.1
    check_worst_of_k(x, target, inplace=True, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("C", [2, 21, 33])
@pytest.mark.parametrize("option", ["plain", "smoothing", "class_weight"])
def test_worst_of_k_spatial_rows(dtype, C, option):
    """4-D spatial rows (N, S, 1, C), the in-place view of contiguous (N, C, S) logits: read in
    place by the plain loss up to 32 classes (a thread per row, each sample's rows located by
    row_offset; 303 rows: two blocks, and warps that span two samples), through a contiguous
    (B, 1, C) copy otherwise; the gradient comes back in the rows' layout (written over them
    for the in-place backward)."""
    N, S = 3, 101
    x = (torch.randn(N, C, S, generator=gen(C + 60)) * 3).to(dtype)
    rows = x.as_strided((N, S, 1, C), (C * S, 1, C * S, S))
    target = index_target(N * S, C, 10, ignore=True, invalid=True)
    kw = {"eps": 0.1} if option == "smoothing" else {}
    if option == "class_weight":
        kw["weight"] = torch.rand(C, generator=gen(5), dtype=stats_dtype(dtype)) + 0.1
    check_worst_of_k(rows, target, inplace=True, **kw)


@pytest.mark.parametrize("layout", ["kbc", "pad", "offset", "expand"])
@pytest.mark.parametrize("C", [17, 64, 2049])
def test_worst_of_k_layouts(layout, C):
    dtype = torch.bfloat16
    B, k = (2, 2) if C > 2048 else (4, 3)
    x = logits_in_layout(B, k, C, dtype, layout, C + 1)
    check_worst_of_k(x, index_target(B, C, 3, ignore=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("C", [17, 2056])
@pytest.mark.parametrize(
    "option", ["smoothing", "tau", "radius", "radius_smoothing_tau", "class_weight"]
)
def test_worst_of_k_options(dtype, C, option):
    B, k = (2, 2) if C > 2048 else (5, 3)
    x = logits_in_layout(B, k, C, dtype, "bkc", 11)
    target = index_target(B, C, 5, ignore=True, invalid=True)
    sd = stats_dtype(dtype)
    kw = {}
    if "smoothing" in option:
        kw["eps"] = 0.1
    if "tau" in option:
        kw["tau"] = 0.7
    if "radius" in option:
        kw["radius"] = torch.rand(B, generator=gen(3), dtype=sd)
    if option == "class_weight":
        kw["weight"] = torch.rand(C, generator=gen(4), dtype=sd) + 0.1
        kw["eps"] = 0.05
    check_worst_of_k(x, target, **kw)


def soft_target(shape, dtype, seed):
    return torch.softmax(torch.randn(*shape, generator=gen(seed)), -1).to(dtype)


@pytest.mark.parametrize("C", [2, 17, 64, 2049])
@pytest.mark.parametrize(
    "kind", ["shared", "per_copy", "float32_for_half", "offset", "expanded", "weighted_tau"]
)
def test_worst_of_k_soft_targets(C, kind):
    dtype = torch.float16 if kind == "float32_for_half" else torch.float32
    B, k = (2, 2) if C > 2048 else (4, 3)
    x = logits_in_layout(B, k, C, dtype, "bkc", 21)
    weight = None
    tau = 0.0
    if kind == "shared":
        target = soft_target((B, C), dtype, 1)
    elif kind == "per_copy":
        target = soft_target((B, k, C), dtype, 2)
    elif kind == "float32_for_half":
        target = soft_target((B, k, C), torch.float32, 3)
    elif kind == "offset":  # misaligned target rows: the scalar path
        flat = soft_target((B * C + 1,), dtype, 4)
        target = flat[1:].view(B, C)
    elif kind == "expanded":  # one row for every sample and copy (strides 0)
        target = soft_target((1, 1, C), dtype, 5).expand(B, k, C)
    else:
        target = soft_target((B, C), dtype, 6)
        weight = torch.rand(C, generator=gen(8)) + 0.1
        tau = 0.5
    check_worst_of_k(x, target, tau=tau, eps=0.1, weight=weight)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C", [2, 17, 2048, 2049])
@pytest.mark.parametrize("layout", ["contiguous", "pad", "offset"])
def test_margin(dtype, C, layout):
    N = 3 if C > 2048 else 6
    g = gen(C)
    if layout == "pad":
        x = torch.randn(N, C + 5, generator=g).to(dtype)[:, :C]
    elif layout == "offset":
        x = torch.randn(N * C + 1, generator=g).to(dtype)[1:].view(N, C)
    else:
        x = torch.randn(N, C, generator=g).to(dtype)
    target = index_target(N, C, 2, invalid=True)
    m_cpu, r_cpu = CPU.multiclass_margin_fwd(x, target)
    m_emu, r_emu = EMU.multiclass_margin_fwd(x, target)
    assert torch.equal(r_emu, r_cpu)
    torch.testing.assert_close(m_emu, m_cpu, rtol=0, atol=0, equal_nan=True)  # same arithmetic
    gm = torch.randn(N, generator=g, dtype=stats_dtype(dtype))
    args = (gm, target, r_cpu, C, dtype)
    torch.testing.assert_close(
        EMU.multiclass_margin_bwd(*args),
        CPU.multiclass_margin_bwd(*args),
        rtol=0,
        atol=0,
        equal_nan=True,
    )


def perturb_case(shape, dtype, delta_dtype, layout, seed):
    g = gen(seed)
    u = torch.randn(*shape, generator=g).to(dtype)
    delta = (torch.randn(*shape, generator=g) * 0.1).to(delta_dtype)
    if layout == "channels_last":
        u = u.contiguous(memory_format=torch.channels_last)
        delta = delta.contiguous(memory_format=torch.channels_last)
    elif layout == "offset":
        u = torch.cat([u.new_zeros(1), u.flatten()])[1:].view(shape)
    return u, delta


@pytest.mark.parametrize(
    "shape, layout",
    [
        ((3, 5), "contiguous"),
        ((4, 3, 4, 5), "channels_last"),
        ((2, 1100), "contiguous"),  # block per example, one chunk
        ((2, 40000), "contiguous"),  # split mode: two launches with chunk partial sums
        ((1, 3, 8, 8), "offset"),  # misaligned: the scalar path
        ((0, 4), "contiguous"),
        ((3, 0), "contiguous"),
    ],
)
@pytest.mark.parametrize(
    "dtype, delta_dtype",
    [
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float16),
        (torch.float64, torch.float64),
    ],
)
def test_all_layer_perturb(shape, layout, dtype, delta_dtype):
    u, delta = perturb_case(shape, dtype, delta_dtype, layout, 9)
    out_cpu, n_cpu = CPU.all_layer_perturb_fwd(u, delta)
    out_emu, n_emu = EMU.all_layer_perturb_fwd(u, delta)
    assert out_emu.stride() == out_cpu.stride()
    close(n_emu, n_cpu, dtype)
    close(out_emu, out_cpu, dtype, stats=False)
    grad = torch.randn(shape, generator=gen(10)).to(dtype)
    for need_u, need_d in ((True, True), (True, False), (False, True)):
        args = (grad, u, delta, n_cpu, need_u, need_d)
        for a, b in zip(EMU.all_layer_perturb_bwd(*args), CPU.all_layer_perturb_bwd(*args)):
            close(a, b, dtype, stats=False)


# One float32 Box-Muller definition serves host and device (philox.h), so the two noises differ
# only where a compiler contracts a multiply-add into an FMA (the vectorised CPU loops and nvcc
# do, this host build of the CUDA sources need not): measured at most 1.8 ulp apart here, and
# each is within 3.2 ulp of a float64 Box-Muller of the same Philox words (tests/test_philox.py).
NOISE_ULP_BOUND = 4.0


def noise_ulps(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest |got - want| in float32 ulps of want."""
    spacing = torch.finfo(torch.float32).eps * want.abs().clamp_min(2.0**-126)
    return float(((got - want).abs() / spacing).max()) if want.numel() else 0.0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C, k", [(17, 3), (64, 10), (2049, 2)])
@pytest.mark.parametrize("tau, eps", [(0.0, 0.0), (0.5, 0.1)])
def test_weight_noise(dtype, C, k, tau, eps):
    N = 2 if C > 2048 else 5
    g = gen(C + k)
    x = torch.randn(N, C, generator=g).to(dtype)
    target = index_target(N, C, 4, ignore=True, invalid=True)
    scale = torch.rand(N, generator=g, dtype=stats_dtype(dtype))
    philox = torch.tensor([1234, 5678])
    noise_cpu = CPU.weight_noise_normal(philox, N, k, C)
    assert noise_ulps(EMU.weight_noise_normal(philox, N, k, C), noise_cpu) <= NOISE_ULP_BOUND
    # The noise is float32 whatever the logits, and the two builds' noises may differ by a few
    # ulp (above): float64 logits are compared at float32's tolerance.
    tol_dtype = torch.float32 if dtype == torch.float64 else dtype
    args = (target, scale, philox, k, tau, eps, -100)
    cpu = CPU.weight_noise_ce_fwd(x, *args)
    emu = EMU.weight_noise_ce_fwd(x, *args)
    for name, a, b in zip(("loss", "lse", "weight", "index"), emu, cpu):
        if name == "index":
            assert torch.equal(a, b)
        else:
            close(a, b, tol_dtype)
    _, lse, w, _ = cpu
    gl = torch.rand(N, generator=g, dtype=stats_dtype(dtype)) + 0.5
    bargs = (gl, x, target, scale, philox, lse, w, eps, -100)
    (ga, sa), (gb, sb) = EMU.weight_noise_ce_bwd(*bargs), CPU.weight_noise_ce_bwd(*bargs)
    close(ga, gb, tol_dtype, stats=False)
    close(sa, sb, tol_dtype)


def test_empty_batches():
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(0, 3, 7).to(dtype)
        t = torch.zeros(0, dtype=torch.long)
        for a, b in zip(
            EMU.worst_of_k_ce_fwd(x, t, None, 0.0, 0.0, -100),
            CPU.worst_of_k_ce_fwd(x, t, None, 0.0, 0.0, -100),
        ):
            assert a.shape == b.shape and a.dtype == b.dtype
        m = EMU.multiclass_margin_fwd(torch.randn(0, 5).to(dtype), t)
        assert m[0].shape == (0,)
        s = torch.zeros(0)
        out = EMU.weight_noise_ce_fwd(
            x[:, 0], t, s.to(torch.float32), torch.tensor([1, 2]), 3, 0.0, 0.0, -100
        )
        assert out[1].shape == (0, 3)
        assert EMU.weight_noise_normal(torch.tensor([1, 2]), 0, 3, 7).shape == (0, 3, 7)


def test_cuda_host_code_refuses_what_the_cpu_ops_refuse():
    """The checks the CUDA entry points run before launching (shared headers): a soft target
    with no classes, overlapping logits for the in-place backward, backward inputs on another
    device (redispatched to the emulation's key, as tests/test_op_contract.py does on the CPU)."""
    with pytest.raises(RuntimeError, match="probability targets need at least one class"):
        EMU.worst_of_k_ce_fwd(torch.randn(3, 2, 0), torch.randn(3, 0), None, 0.0, 0.0, -100)
    z = torch.randn(3, 7)
    x = z.unsqueeze(1).expand(3, 4, 7)
    t = torch.tensor([1, 2, 3])
    _, lse, w, _, _ = CPU.worst_of_k_ce_fwd(x, t, None, 0.0, 0.0, -100)
    before = z.clone()
    with pytest.raises(RuntimeError, match="logits: the in-place backward needs logits whose"):
        EMU.worst_of_k_ce_bwd_inplace(torch.ones(3), x, t, None, lse, w, 0.0, -100)
    assert torch.equal(z, before)
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
    with pytest.raises(RuntimeError, match="grad_loss: expected device cpu, got meta"):
        EMU.worst_of_k_ce_bwd.default.redispatch(
            keys, torch.ones(3, device="meta"), x, t, None, lse, w, 0.0, -100, None
        )
