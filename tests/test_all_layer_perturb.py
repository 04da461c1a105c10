"""fm.all_layer_perturb (u + ||u_b|| * delta) against fastmargin.reference, CPU and CUDA."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastmargin as fm
from fastmargin import reference as R

ops = torch.ops.fastmargin
LOW = (torch.float16, torch.bfloat16)
TOL = {
    torch.float64: dict(atol=1e-12, rtol=1e-12),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}
# (B, ...) shapes: a batch of 1, N = 1, odd sizes, 4-D, and N > 8192 (several CPU chunks).
SHAPES = [(1, 1), (4,), (3, 5), (2, 3, 7), (2, 3, 4, 5), (1, 33), (5, 13, 3), (2, 3, 5001)]


def _inputs(shape, dtype, delta_dtype=None, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    d = 0.3 * torch.randn(shape, generator=g, dtype=torch.float64)
    return u, d.to(device=device, dtype=delta_dtype or dtype)


def _reference_and_grads(u, d, g):
    """Reference out and (grad_u, grad_delta), computed in float32 (float64) on the same
    rounded inputs as the kernel sees."""
    acc = torch.float64 if u.dtype == torch.float64 else torch.float32
    ur = u.detach().to(acc).requires_grad_()
    dr = d.detach().to(acc).requires_grad_()
    out = R.all_layer_perturb(ur, dr)
    gu, gd = torch.autograd.grad(out, (ur, dr), g.to(acc))
    return out, gu, gd


def check_against_reference(u, d, grad_layout=None):
    """Values and both gradients of the op vs the reference; returns the op's output."""
    u = u.detach().requires_grad_()
    d = d.detach().requires_grad_()
    out = fm.all_layer_perturb(u, d)
    assert out.dtype == u.dtype and out.shape == u.shape and out.device == u.device
    g = torch.randn(u.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    g = g.to(device=u.device, dtype=u.dtype)
    if grad_layout is not None:
        g = g.contiguous(memory_format=grad_layout)
    gu, gd = torch.autograd.grad(out, (u, d), g)
    ref, ref_gu, ref_gd = _reference_and_grads(u, d, g)
    tol = TOL[u.dtype]
    torch.testing.assert_close(out.to(ref.dtype), ref, **tol)
    assert gu.dtype == u.dtype and gd.dtype == d.dtype
    torch.testing.assert_close(gu.to(ref_gu.dtype), ref_gu, **tol)
    torch.testing.assert_close(gd.to(ref_gd.dtype), ref_gd, **tol)
    return out


def _dtype_cases():
    cases = [(dt, dt) for dt in (torch.float64, torch.float32, torch.float16, torch.bfloat16)]
    return cases + [(torch.float16, torch.float32), (torch.bfloat16, torch.float32)]


@pytest.mark.parametrize("dtype,delta_dtype", _dtype_cases())
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(shape, dtype, delta_dtype):
    u, d = _inputs(shape, dtype, delta_dtype)
    check_against_reference(u, d)


def test_norm_is_per_example_and_not_detached():
    u, d = _inputs((3, 4, 5), torch.float64)
    out, norm = ops.all_layer_perturb_fwd(u, d)
    torch.testing.assert_close(norm, torch.linalg.vector_norm(u.reshape(3, -1), dim=1))
    # The gradient into u carries the norm's term u/||u|| * <g, delta>, which is not g alone.
    u.requires_grad_()
    (gu,) = torch.autograd.grad(fm.all_layer_perturb(u, d).sum(), u)
    assert not torch.allclose(gu, torch.ones_like(gu))


@pytest.mark.parametrize("fmt", [torch.channels_last, torch.contiguous_format])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_channels_last_read_in_place(fmt, dtype):
    """u and delta in the same example-major layout: no copy, output keeps the layout."""
    u, d = _inputs((3, 5, 4, 6), dtype)
    u = u.contiguous(memory_format=fmt)
    d = d.contiguous(memory_format=fmt)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = fm.all_layer_perturb(u, d)
    names = {e.name for e in prof.events()}
    assert not names & {"aten::copy_", "aten::clone", "aten::contiguous"}, names
    assert out.stride() == u.stride()
    _, norm = ops.all_layer_perturb_fwd(u, d)
    g = torch.randn_like(u)  # same layout as u
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        gu, gd = ops.all_layer_perturb_bwd(g, u, d, norm, True, True)
    names = {e.name for e in prof.events()}
    assert not names & {"aten::copy_", "aten::clone", "aten::contiguous"}, names
    assert gu.stride() == u.stride() and gd.stride() == u.stride()
    check_against_reference(u, d, grad_layout=torch.contiguous_format)


def test_channels_last_3d_and_grad_in_other_layout():
    u, d = _inputs((2, 3, 4, 2, 5), torch.float32)
    u = u.contiguous(memory_format=torch.channels_last_3d)
    out = check_against_reference(u, d.contiguous(memory_format=torch.channels_last_3d))
    assert out.is_contiguous(memory_format=torch.channels_last_3d)
    check_against_reference(u, d, grad_layout=torch.channels_last_3d)


@pytest.mark.parametrize(
    "make",
    [
        lambda t: t.transpose(0, 1).contiguous().transpose(0, 1),  # batch dim not outermost
        lambda t: torch.cat([t, t], dim=2)[:, :, ::2],  # not dense
        lambda t: t.contiguous(memory_format=torch.channels_last),  # delta in another layout
    ],
)
def test_other_layouts(make):
    u, d = _inputs((3, 4, 6, 5), torch.float32)
    check_against_reference(make(u), d)
    check_against_reference(u, make(d))
    check_against_reference(make(u), make(d))


def test_misaligned_storage():
    """Example starts that are not 16-byte aligned (vector loads impossible) still work."""
    u, d = _inputs((4, 9 * 8 + 1), torch.float32)
    buf = torch.randn(u.numel() + 1)
    um = buf[1:].view(u.shape)  # storage offset 1
    check_against_reference(um, d)


def _layout_strategy():
    @st.composite
    def strat(draw):
        ndim = draw(st.integers(1, 4))
        shape = tuple(draw(st.integers(1, 5)) for _ in range(ndim))
        perm_u = draw(st.permutations(range(ndim)))
        perm_d = draw(st.permutations(range(ndim)))
        return shape, perm_u, perm_d

    return strat()


def _with_memory_order(t, perm):
    """t's values with memory order `perm` (perm[0] is the outermost dim)."""
    inv = [perm.index(i) for i in range(t.dim())]
    return t.permute(perm).contiguous().permute(inv)


@settings(max_examples=40, deadline=None)
@given(_layout_strategy())
def test_any_memory_order(case):
    shape, perm_u, perm_d = case
    u, d = _inputs(shape, torch.float64)
    u, d = _with_memory_order(u, list(perm_u)), _with_memory_order(d, list(perm_d))
    check_against_reference(u, d)


@pytest.mark.cuda
@settings(max_examples=40, deadline=None)
@given(_layout_strategy(), st.sampled_from([torch.float32, torch.bfloat16]))
def test_cuda_any_memory_order(case, dtype):
    shape, perm_u, perm_d = case
    u, d = _inputs(shape, dtype, torch.float32, device="cuda")
    u, d = _with_memory_order(u, list(perm_u)), _with_memory_order(d, list(perm_d))
    check_against_reference(u, d)


def test_zero_norm_example_has_finite_gradients():
    u, d = _inputs((3, 4, 5), torch.float32)
    u[1] = 0.0
    u.requires_grad_()
    d.requires_grad_()
    out = fm.all_layer_perturb(u, d)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    g = torch.randn_like(out)
    gu, gd = torch.autograd.grad(out, (u, d), g)
    assert torch.isfinite(gu).all() and torch.isfinite(gd).all()
    assert torch.equal(gu[1], g[1])  # the u/||u|| term is 0 at ||u|| = 0
    assert torch.equal(gd[1], torch.zeros_like(gd[1]))
    check_against_reference(u, d)


def test_nan_propagates_to_its_example_only():
    u, d = _inputs((3, 6), torch.float32)
    u[2, 1] = float("nan")
    out = fm.all_layer_perturb(u, d)
    assert torch.isnan(out[2]).all()
    assert torch.isfinite(out[:2]).all()


@pytest.mark.parametrize("shape", [(0, 3), (0,), (3, 0), (2, 0, 4)])
def test_empty(shape):
    u = torch.zeros(shape, requires_grad=True)
    d = torch.zeros(shape, requires_grad=True)
    out = fm.all_layer_perturb(u, d)
    assert out.shape == u.shape
    out.sum().backward()
    assert u.grad.shape == u.shape and d.grad.shape == d.shape
    _, norm = ops.all_layer_perturb_fwd(u, d)
    assert norm.shape == (shape[0],) and (norm == 0).all()


def test_only_delta_or_only_u_requires_grad():
    u, d = _inputs((3, 7), torch.float32)
    d.requires_grad_()
    (gd,) = torch.autograd.grad(fm.all_layer_perturb(u, d).sum(), d)
    torch.testing.assert_close(gd, torch.linalg.vector_norm(u, dim=1, keepdim=True).expand(3, 7))
    u.requires_grad_()
    d = d.detach()
    (gu,) = torch.autograd.grad(fm.all_layer_perturb(u, d).sum(), u)
    _, ref_gu, _ = _reference_and_grads(u, d, torch.ones_like(u))
    torch.testing.assert_close(gu, ref_gu)


def test_float64_delta_is_converted_for_lower_u():
    u, d = _inputs((2, 5), torch.float32, torch.float64)
    d.requires_grad_()
    out = fm.all_layer_perturb(u, d)
    assert out.dtype == torch.float32
    out.sum().backward()
    assert d.grad.dtype == torch.float64
    with pytest.raises(RuntimeError, match="delta: expected dtype"):
        ops.all_layer_perturb_fwd(u, d.detach())


def test_deterministic():
    u, d = _inputs((3, 20000), torch.float32)
    a, na = ops.all_layer_perturb_fwd(u, d)
    b, nb = ops.all_layer_perturb_fwd(u, d)
    assert torch.equal(a, b) and torch.equal(na, nb)


@pytest.mark.parametrize("shape", [(2, 3), (2, 2, 3, 2), (1, 4)])
def test_gradcheck(shape):
    u, d = _inputs(shape, torch.float64)
    u.requires_grad_()
    d.requires_grad_()
    assert torch.autograd.gradcheck(fm.all_layer_perturb, (u, d))
    ucl = u.detach().contiguous(memory_format=torch.channels_last) if len(shape) == 4 else u
    ucl = ucl.detach().requires_grad_()
    assert torch.autograd.gradcheck(fm.all_layer_perturb, (ucl, d))


@pytest.mark.parametrize(
    "shape,dtype,delta_dtype,fmt",
    [
        ((3, 5), torch.float32, torch.float32, None),
        ((2, 3, 4, 5), torch.float32, torch.float32, torch.channels_last),
        ((2, 3, 4, 5), torch.bfloat16, torch.float32, None),
        ((3, 2, 5), torch.float64, torch.float64, None),
    ],
)
def test_opcheck(shape, dtype, delta_dtype, fmt):
    u, d = _inputs(shape, dtype, delta_dtype)
    if fmt is not None:
        u, d = u.contiguous(memory_format=fmt), d.contiguous(memory_format=fmt)
    u.requires_grad_()
    d.requires_grad_()
    torch.library.opcheck(ops.all_layer_perturb_fwd, (u, d))
    _, norm = ops.all_layer_perturb_fwd(u.detach(), d.detach())
    g = torch.randn_like(u.detach())
    for need_u, need_d in [(True, True), (True, False), (False, True)]:
        torch.library.opcheck(
            ops.all_layer_perturb_bwd, (g, u.detach(), d.detach(), norm, need_u, need_d)
        )


def test_torch_compile_fullgraph():
    def f(u, d):
        return (fm.all_layer_perturb(u, d) ** 2).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    u, d = _inputs((3, 4, 5), torch.float32)
    u.requires_grad_()
    d.requires_grad_()
    loss = compiled(u, d)
    gu, gd = torch.autograd.grad(loss, (u, d))
    ref = f(u, d)
    rgu, rgd = torch.autograd.grad(ref, (u, d))
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(gu, rgu)
    torch.testing.assert_close(gd, rgd)


# --- bad inputs ----------------------------------------------------------------------------


def _bad(u, d, exc, fragment):
    u0 = u.clone() if isinstance(u, torch.Tensor) else u
    d0 = d.clone() if isinstance(d, torch.Tensor) else d
    with pytest.raises(exc, match=fragment):
        fm.all_layer_perturb(u, d)
    if isinstance(u, torch.Tensor):
        assert torch.equal(u, u0)
    if isinstance(d, torch.Tensor) and d.device.type != "meta":  # meta tensors hold no data
        assert torch.equal(d, d0)


def test_bad_not_a_tensor():
    _bad([1.0, 2.0], torch.zeros(2), TypeError, "u: expected a torch.Tensor")
    _bad(torch.zeros(2), 0.5, TypeError, "delta: expected a torch.Tensor")


def test_bad_dtype():
    _bad(torch.arange(6).view(2, 3), torch.zeros(2, 3), TypeError, "u: expected a floating")
    _bad(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.int32), TypeError, "delta: expected")


def test_bad_shape():
    _bad(torch.randn(2, 3), torch.randn(2, 4), ValueError, "delta: expected the shape of u")
    _bad(torch.randn(2, 3), torch.randn(3, 2), ValueError, "delta: expected the shape of u")
    _bad(torch.tensor(1.0), torch.tensor(1.0), ValueError, "u: expected a tensor with a leading")


def test_bad_device():
    _bad(torch.randn(2, 3), torch.randn(2, 3, device="meta"), RuntimeError, "delta: expected")


def test_bad_direct_op_calls():
    u, d = _inputs((2, 3), torch.float32)
    with pytest.raises(RuntimeError, match="delta: expected the shape"):
        ops.all_layer_perturb_fwd(u, d[:, :2])
    with pytest.raises(RuntimeError, match="u: expected a tensor with a batch dim"):
        ops.all_layer_perturb_fwd(u[0, 0], d[0, 0])
    _, norm = ops.all_layer_perturb_fwd(u, d)
    with pytest.raises(RuntimeError, match="norm: expected"):
        ops.all_layer_perturb_bwd(u, u, d, norm[:1], True, True)
    with pytest.raises(RuntimeError, match="grad: expected"):
        ops.all_layer_perturb_bwd(u.double(), u, d, norm, True, True)


# --- CUDA ----------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,delta_dtype", _dtype_cases())
@pytest.mark.parametrize("shape", SHAPES + [(3, 1023), (3, 1025), (600, 2000), (1, 70000)])
def test_cuda_matches_reference(shape, dtype, delta_dtype):
    u, d = _inputs(shape, dtype, delta_dtype, device="cuda")
    check_against_reference(u, d)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_layouts_and_alignment(dtype):
    u, d = _inputs((4, 8, 6, 10), dtype, device="cuda")
    cl = torch.channels_last
    out = check_against_reference(u.contiguous(memory_format=cl), d.contiguous(memory_format=cl))
    assert out.is_contiguous(memory_format=cl)
    check_against_reference(u.contiguous(memory_format=cl), d, grad_layout=cl)
    check_against_reference(u.transpose(0, 1).contiguous().transpose(0, 1), d)
    buf = torch.randn(u.numel() + 1, device="cuda", dtype=dtype)
    check_against_reference(buf[1:].view(u.shape), d)  # misaligned: scalar path


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(1, 3_000_000), (2, 1 << 20), (3, 70001)])
def test_cuda_split_mode_large_examples(shape):
    """Few large examples: the reduction is split over chunks (two launches)."""
    u, d = _inputs(shape, torch.float32, device="cuda")
    check_against_reference(u, d)
    cpu_out, cpu_norm = ops.all_layer_perturb_fwd(u.cpu(), d.cpu())
    out, norm = ops.all_layer_perturb_fwd(u, d)
    torch.testing.assert_close(norm.cpu(), cpu_norm, rtol=1e-5, atol=0)
    torch.testing.assert_close(out.cpu(), cpu_out, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
def test_cuda_deterministic_stream_and_graph():
    u, d = _inputs((3, 300000), torch.bfloat16, torch.float32, device="cuda")
    a, na = ops.all_layer_perturb_fwd(u, d)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        b, nb = ops.all_layer_perturb_fwd(u, d)
    torch.cuda.synchronize()
    assert torch.equal(a, b) and torch.equal(na, nb)
    gr = torch.cuda.CUDAGraph()
    with torch.cuda.graph(gr):
        c, nc = ops.all_layer_perturb_fwd(u, d)
    gr.replay()
    torch.cuda.synchronize()
    assert torch.equal(a, c) and torch.equal(na, nc)


@pytest.mark.cuda
def test_cuda_zero_norm_and_empty():
    u, d = _inputs((3, 2000), torch.float32, device="cuda")
    u[0] = 0
    check_against_reference(u, d)
    out = fm.all_layer_perturb(torch.zeros(0, 5, device="cuda"), torch.zeros(0, 5, device="cuda"))
    assert out.shape == (0, 5)


@pytest.mark.cuda
def test_cuda_opcheck_and_compile():
    u, d = _inputs((2, 3, 4, 5), torch.bfloat16, torch.float32, device="cuda")
    torch.library.opcheck(ops.all_layer_perturb_fwd, (u.requires_grad_(), d.requires_grad_()))
    compiled = torch.compile(lambda a, b: fm.all_layer_perturb(a, b).float().sum(), fullgraph=True)
    torch.testing.assert_close(compiled(u, d), fm.all_layer_perturb(u, d).float().sum())


@pytest.mark.cuda
def test_cuda_more_than_2_pow_31_elements():
    """int64 offsets: 2^31 + 16 bfloat16 elements in 2 examples (about 4 GiB per tensor)."""
    B, N = 2, (1 << 30) + 8
    try:
        u = torch.ones(B, N, device="cuda", dtype=torch.bfloat16)
        d = torch.ones(B, N, device="cuda", dtype=torch.bfloat16)
        out, norm = ops.all_layer_perturb_fwd(u, d)
    except torch.OutOfMemoryError:
        pytest.skip("not enough GPU memory")
    expected = float(N) ** 0.5
    torch.testing.assert_close(norm.cpu(), torch.full((B,), expected), rtol=1e-4, atol=0)
    last = out[1, -8:].float().cpu()
    torch.testing.assert_close(last, torch.full((8,), 1 + expected, dtype=torch.bfloat16).float())
