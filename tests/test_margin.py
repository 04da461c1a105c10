"""fm.multiclass_margin: the fused op against fastmargin.reference.multiclass_margin."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastmargin as fm
from fastmargin import reference

ops = torch.ops.fastmargin
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
SHAPES = [(1, 2), (5, 3), (17, 10), (8, 33), (6, 257), (3, 2051)]
TOL = {
    torch.float64: dict(atol=1e-12, rtol=1e-12),
    torch.float32: dict(atol=1e-6, rtol=1e-6),
    torch.float16: dict(atol=1e-3, rtol=1e-3),
    torch.bfloat16: dict(atol=1e-2, rtol=1e-2),
}


def _inputs(N, C, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(N, C, generator=g, dtype=torch.float64)).to(dtype).to(device)
    y = torch.randint(0, C, (N,), generator=g).to(device)
    return x, y


def _check_against_reference(x, y):
    """Values and gradients of the op (logits' dtype) vs the reference on the same (rounded)
    inputs in float32 (float64 for float64)."""
    ref_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    xa = x.detach().clone().requires_grad_(True)
    xr = x.detach().to(ref_dtype).clone().requires_grad_(True)
    out = fm.multiclass_margin(xa, y)
    ref = reference.multiclass_margin(xr, y)
    assert out.dtype == x.dtype and out.shape == (x.shape[0],)
    torch.testing.assert_close(out.to(ref_dtype), ref, **TOL[x.dtype])
    g = torch.randn(x.shape[0], dtype=ref_dtype, device=x.device)
    out.backward(g.to(x.dtype))
    ref.backward(g.to(x.dtype).to(ref_dtype))
    assert xa.grad.dtype == x.dtype
    torch.testing.assert_close(xa.grad.to(ref_dtype), xr.grad, **TOL[x.dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(shape, dtype, device):
    x, y = _inputs(*shape, dtype, device, seed=shape[0] * 1000 + shape[1])
    _check_against_reference(x, y)


@pytest.mark.parametrize("device", DEVICES)
def test_row_strided_view_is_read_in_place_and_class_strided_is_copied(device):
    wide, y = _inputs(9, 40, torch.float32, device)
    view = wide[:, 3:33]  # row stride 40, class stride 1, misaligned start
    y = y % 30
    _check_against_reference(view, y)
    t = torch.randn(30, 9, device=device).t()  # class stride 9
    _check_against_reference(t, y)


@pytest.mark.parametrize("device", DEVICES)
def test_ties_go_to_lowest_index(device):
    x = torch.tensor(
        [
            [1.0, 5.0, 2.0, 5.0, 5.0],  # y = 0: runner-up 1 (not 3, 4)
            [5.0, 5.0, 0.0, 5.0, 1.0],  # y = 0: tie with the target value; runner-up 1
            [3.0, 3.0, 3.0, 3.0, 3.0],  # y = 2: all equal; runner-up 0
            [0.0, 7.0, 9.0, 7.0, 9.0],  # y = 4: runner-up 2
        ],
        device=device,
    ).requires_grad_(True)
    y = torch.tensor([0, 0, 2, 4], device=device)
    m = fm.multiclass_margin(x, y)
    torch.testing.assert_close(m, torch.tensor([-4.0, 0.0, 0.0, 0.0], device=device))
    m.backward(torch.tensor([1.0, 2.0, 3.0, 4.0], device=device))
    expect = torch.zeros(4, 5, device=device)
    for n, (yy, r, g) in enumerate([(0, 1, 1.0), (0, 1, 2.0), (2, 0, 3.0), (4, 2, 4.0)]):
        expect[n, yy], expect[n, r] = g, -g
    torch.testing.assert_close(x.grad, expect)
    _check_against_reference(x.detach(), y)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_and_nan_logits(dtype, device):
    inf, nan = float("inf"), float("nan")
    x = torch.tensor(
        [
            [2.0, -inf, -inf],  # others all masked: margin +inf, runner-up 1
            [-inf, 1.0, 0.5],  # a masked class is never the runner-up of a finite row
            [1.0, nan, 3.0],  # NaN off the target: NaN margin
            [nan, 1.0, 3.0],  # NaN at the target: NaN margin
        ],
        dtype=dtype,
        device=device,
    ).requires_grad_(True)
    y = torch.tensor([0, 2, 0, 0], device=device)
    m = fm.multiclass_margin(x, y)
    assert m[0].item() == inf and m[1].item() == -0.5
    assert m[2].isnan() and m[3].isnan()
    m.sum().backward()
    expect = torch.tensor(
        [[1.0, -1.0, 0.0], [0.0, -1.0, 1.0], [1.0, -1.0, 0.0], [1.0, 0.0, -1.0]],
        dtype=dtype,
        device=device,
    )
    torch.testing.assert_close(x.grad, expect)


@pytest.mark.parametrize("device", DEVICES)
def test_invalid_target_without_validation_gives_nan_row(device):
    x, y = _inputs(5, 4, torch.float32, device)
    y[1], y[3] = 4, -100  # out of range; -100 is not special for the margin
    fm.set_validation(False)
    xa = x.clone().requires_grad_(True)
    m = fm.multiclass_margin(xa, y)
    assert m[1].isnan() and m[3].isnan()
    ok = torch.tensor([0, 2, 4], device=device)
    torch.testing.assert_close(m[ok], reference.multiclass_margin(x[ok], y[ok]))
    m.sum().backward()
    assert xa.grad[1].isnan().all() and xa.grad[3].isnan().all()
    assert not xa.grad[ok].isnan().any()
    margin, runner_up = ops.multiclass_margin_fwd(x, y)
    assert runner_up[1].item() == -1 and runner_up[3].item() == -1


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device):
    x = torch.randn(0, 7, device=device, requires_grad=True)
    m = fm.multiclass_margin(x, torch.zeros(0, dtype=torch.long, device=device))
    assert m.shape == (0,)
    m.sum().backward()
    assert x.grad.shape == (0, 7)


def test_backward_saves_no_logits_sized_tensor():
    x, y = _inputs(4, 6, torch.float32, "cpu")
    x.requires_grad_(True)
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        m = fm.multiclass_margin(x, y)
    assert shapes and all(len(s) == 1 for s in shapes), shapes
    m.sum().backward()
    assert torch.equal(x.grad.sum(1), torch.zeros(4))


def test_gradcheck_float64():
    x, y = _inputs(6, 5, torch.float64, "cpu", seed=3)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: fm.multiclass_margin(z, y), (x,))
    assert torch.autograd.gradgradcheck(lambda z: fm.multiclass_margin(z, y) ** 2, (x,))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        x, y = _inputs(7, 11, dtype, device)
        torch.library.opcheck(ops.multiclass_margin_fwd, (x.requires_grad_(True), y))
        _m, r = ops.multiclass_margin_fwd(x.detach(), y)
        g = torch.randn(7, device=device, dtype=fm._ops.stats_dtype(x))
        torch.library.opcheck(ops.multiclass_margin_bwd, (g, y, r, 11, dtype))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    x, y = _inputs(8, 13, torch.float32, "cpu")

    @torch.compile(fullgraph=True)
    def hinge(z, t):
        return torch.relu(1.0 - fm.multiclass_margin(z, t)).sum()

    xa = x.clone().requires_grad_(True)
    xr = x.clone().requires_grad_(True)
    out = hinge(xa, y)
    ref = torch.relu(1.0 - reference.multiclass_margin(xr, y)).sum()
    torch.testing.assert_close(out, ref)
    out.backward()
    ref.backward()
    torch.testing.assert_close(xa.grad, xr.grad)


# --- bad inputs: each raises naming the argument, inputs unchanged ---------------------------


@pytest.mark.parametrize(
    "make, exc, fragment",
    [
        (lambda x, y: ([[1.0, 2.0]], y), TypeError, "logits"),
        (lambda x, y: (x.long(), y), TypeError, "logits"),
        (lambda x, y: (x[0], y), ValueError, "logits"),
        (lambda x, y: (x.unsqueeze(0), y), ValueError, "logits"),
        (lambda x, y: (x[:, :1], y), ValueError, "C >= 2"),
        (lambda x, y: (x, y[:3]), ValueError, "target"),
        (lambda x, y: (x, y.float()), TypeError, "target"),
        (lambda x, y: (x, y.unsqueeze(1)), ValueError, "target"),
        (lambda x, y: (x, torch.where(y == 0, 5, y)), IndexError, "target"),
        (lambda x, y: (x, torch.where(y == 0, -100, y)), IndexError, "target"),
    ],
)
def test_bad_inputs(make, exc, fragment):
    x, y = _inputs(4, 5, torch.float32, "cpu")
    y[0] = 0
    args = make(x, y)
    before = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    with pytest.raises(exc, match=fragment):
        fm.multiclass_margin(*args)
    for a, b in zip(args, before):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b)


def test_op_level_checks_reject_bad_calls():
    x, y = _inputs(4, 5, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="at least 2 classes"):
        ops.multiclass_margin_fwd(x[:, :1].contiguous(), y)
    with pytest.raises(RuntimeError, match="target"):
        ops.multiclass_margin_fwd(x, y.int())
    _m, r = ops.multiclass_margin_fwd(x, y)
    with pytest.raises(RuntimeError, match="grad_margin"):
        ops.multiclass_margin_bwd(torch.ones(4, dtype=torch.float64), y, r, 5, torch.float32)
    # a garbage runner-up is bounded: only in-range classes are written
    g = ops.multiclass_margin_bwd(torch.ones(4), y, torch.full((4,), 99), 5, torch.float32)
    assert torch.equal(g, torch.nn.functional.one_hot(y, 5).float())


@pytest.mark.cuda
def test_cuda_target_on_other_device():
    x, y = _inputs(4, 5, torch.float32, "cuda")
    with pytest.raises(RuntimeError, match="target"):
        fm.multiclass_margin(x, y.cpu())


@pytest.mark.cuda
def test_cuda_deterministic_and_side_stream():
    x, y = _inputs(257, 3001, torch.bfloat16, "cuda")
    first = fm.multiclass_margin(x, y)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        second = fm.multiclass_margin(x, y)
    stream.synchronize()
    assert torch.equal(first, second)


@pytest.mark.cuda
def test_cuda_int64_indexing_large():
    N, C = 65537, 32768  # N * C > 2**31 bf16 logits (4.3 GB)
    try:
        x = torch.randn(N, C, device="cuda", dtype=torch.bfloat16)
    except torch.cuda.OutOfMemoryError:
        pytest.skip("not enough GPU memory")
    y = torch.randint(0, C, (N,), device="cuda")
    m = fm.multiclass_margin(x, y)
    rows = torch.tensor([0, 1, N // 2, N - 2, N - 1], device="cuda")
    ref = reference.multiclass_margin(x[rows].float(), y[rows])
    torch.testing.assert_close(m[rows].float(), ref, **TOL[torch.bfloat16])


@settings(max_examples=30, deadline=None)
@given(
    N=st.integers(1, 6),
    C=st.integers(2, 70),
    offset=st.integers(0, 3),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]),
    seed=st.integers(0, 2**16),
)
def test_property_shapes_strides_dtypes(N, C, offset, dtype, seed):
    wide, y = _inputs(N, C + offset + 1, dtype, "cpu", seed=seed)
    x = wide[:, offset : offset + C]  # odd row strides and misaligned starts
    _check_against_reference(x, y % C)


@pytest.mark.cuda
def test_cuda_graph_capture_reduce_overhead():
    torch._dynamo.reset()
    x, y = _inputs(64, 1000, torch.bfloat16, "cuda")
    f = torch.compile(fm.multiclass_margin, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):  # warm-up, record, replay
        out = f(x, y)
    torch.testing.assert_close(
        out.float(), reference.multiclass_margin(x.float(), y), **TOL[x.dtype]
    )
