"""The class-major rows of spatial logits (N, C, d1, ...) seen as (N * d1 * ..., 1, C)
(csrc/cpu/class_last.cpp, used by fastmargin/_ce_layout.py in eager mode): class-major copies on
the CPU for every element size, and a spatial loss whose value and gradient are F.cross_entropy's
through the class-major kernels (and through the contiguous copy they fall back to)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastmargin as fm
from fastmargin import _ce_layout

ops = torch.ops.fastmargin

# Positions per sample on both sides of the 64-position tile, and a sample of one position.
SHAPES = [(1, 2, 1, 2), (3, 5, 7, 11), (2, 21, 8, 8), (2, 3, 65), (1, 33, 130), (2, 4, 3, 5, 7)]
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int8]


def _random(shape, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.int8:
        return torch.randint(-128, 127, shape, generator=gen, dtype=torch.int8)
    return torch.randn(shape, generator=gen).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_cpu_rows_are_class_major_copies(shape, dtype):
    x = _random(shape, dtype)
    rows = ops._class_last(x)
    want = x.movedim(1, -1).reshape(-1, 1, shape[1])
    assert torch.equal(rows, want)
    B = want.shape[0]
    assert rows.stride(0) == 1 and rows.stride(2) == B  # memory (C, B)
    assert rows.data_ptr() != x.data_ptr()


@pytest.mark.parametrize(
    "make",
    [
        lambda x: x.contiguous(memory_format=torch.channels_last),
        lambda x: x[:, :, ::2],
        lambda x: x.transpose(2, 3),
    ],
)
def test_cpu_rows_of_non_contiguous_logits_are_class_major_copies(make):
    # Contiguous logits are copied run by run (one memcpy per sample and class); other layouts
    # take the strided copy.
    x = make(_random((2, 5, 6, 4), torch.float32))
    assert not x.is_contiguous()
    rows = ops._class_last(x)
    assert torch.equal(rows, x.movedim(1, -1).reshape(-1, 1, 5))
    assert rows.stride(0) == 1 and rows.stride(2) == rows.shape[0]


def test_other_devices_get_contiguous_rows():
    x = _random((2, 5, 3, 9), torch.float32)
    meta = ops._class_last(x.to("meta"))  # the CompositeExplicitAutograd kernel
    assert meta.shape == (54, 1, 5) and meta.is_contiguous()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 5, 7, 11), (2, 21, 9, 8), (2, 3, 130)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_spatial_loss_and_leaf_gradient_match_cross_entropy(shape, dtype, reduction):
    x = _random(shape, torch.float32, seed=1).to(dtype)
    gen = torch.Generator().manual_seed(2)
    target = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=gen)
    target[0].view(-1)[::3] = -100
    a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    got = fm.worst_of_k_cross_entropy(a, target, reduction=reduction, label_smoothing=0.1)
    want = F.cross_entropy(b, target, reduction=reduction, label_smoothing=0.1)
    tol = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(got, want, **tol)
    g_out = torch.rand_like(want) + 0.5
    got.backward(g_out)
    want.backward(g_out)
    assert a.grad.is_contiguous() and a.grad.stride() == b.grad.stride()
    torch.testing.assert_close(a.grad, b.grad, **tol)


@pytest.mark.parametrize(
    "make",
    [
        lambda x: x.contiguous(memory_format=torch.channels_last),  # class-last: rows are a view
        lambda x: x[:, :, ::2],  # strided: movedim + reshape copies
        lambda x: x.transpose(2, 3),  # a permuted spatial layout
    ],
)
def test_other_layouts_keep_the_pytorch_copy_and_match(make):
    base = _random((2, 6, 8, 5), torch.float32, seed=3)
    x = make(base).requires_grad_(True)
    assert not _ce_layout._use_class_major(x)
    target = torch.randint(0, 6, (x.shape[0], *x.shape[2:]))
    got = fm.worst_of_k_cross_entropy(x, target)
    want = F.cross_entropy(x, target)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got, x)[0], torch.autograd.grad(want, x)[0])


def test_probability_targets_take_the_transpose_and_get_their_gradient():
    x = _random((2, 5, 4, 6), torch.float32, seed=4).requires_grad_(True)
    p = torch.softmax(_random((2, 5, 4, 6), torch.float32, seed=5), 1).requires_grad_(True)
    assert _ce_layout._use_class_major(x)
    got = fm.worst_of_k_cross_entropy(x, p, label_smoothing=0.2)
    want = F.cross_entropy(x, p, label_smoothing=0.2)
    torch.testing.assert_close(got, want)
    for h, w in zip(torch.autograd.grad(got, (x, p)), torch.autograd.grad(want, (x, p))):
        torch.testing.assert_close(h, w)


def test_double_backward_through_the_transpose():
    x = _random((2, 4, 3, 5), torch.float64, seed=6).requires_grad_(True)
    target = torch.randint(0, 4, (2, 3, 5))
    (g,) = torch.autograd.grad(fm.worst_of_k_cross_entropy(x, target), x, create_graph=True)
    (gg,) = torch.autograd.grad(g.square().sum(), x)
    (g_ref,) = torch.autograd.grad(F.cross_entropy(x, target), x, create_graph=True)
    (gg_ref,) = torch.autograd.grad(g_ref.square().sum(), x)
    torch.testing.assert_close(gg, gg_ref)


# --- the CPU ops on class-major rows, against the same rows laid out contiguously ------------

OP_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _class_major(rows: torch.Tensor) -> torch.Tensor:
    """(B, 1, C) rows with memory (C, B): consecutive rows, class stride B."""
    B, _, C = rows.shape
    return rows.squeeze(1).t().contiguous().t().unsqueeze(1)


def _op_case(B, C, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    rows = (3 * torch.randn(B, 1, C, generator=gen)).to(dtype)
    target = torch.randint(0, C, (B,), generator=gen)
    target[::7] = -100  # ignored rows inside the tiles
    return rows, target


def _assert_ops_match(cm, rows, target, eps=0.0, tau=0.0, **kw):
    assert cm.stride(2) != 1
    torch.testing.assert_close(cm, rows, rtol=0, atol=0, equal_nan=True)
    a = ops.worst_of_k_ce_fwd(cm, target, None, tau, eps, -100, **kw)
    b = ops.worst_of_k_ce_fwd(rows, target, None, tau, eps, -100, **kw)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6, equal_nan=True)
    g = torch.rand(rows.shape[0], dtype=b[1].dtype) + 0.5
    ga = ops.worst_of_k_ce_bwd(g, cm, target, None, a[1], a[2], eps, -100, **kw)
    gb = ops.worst_of_k_ce_bwd(g, rows, target, None, b[1], b[2], eps, -100, **kw)
    tol = {"rtol": 1e-2, "atol": 1e-3} if rows.dtype in (torch.float16, torch.bfloat16) else {}
    torch.testing.assert_close(ga, gb, equal_nan=True, **tol)
    inplace = cm.clone(memory_format=torch.preserve_format)
    assert inplace.stride() == cm.stride()
    ops.worst_of_k_ce_bwd_inplace(g, inplace, target, None, a[1], a[2], eps, -100, **kw)
    torch.testing.assert_close(inplace, gb, equal_nan=True, **tol)
    return ga


@pytest.mark.parametrize("dtype", OP_DTYPES)
@pytest.mark.parametrize("B, C", [(2, 2), (63, 3), (64, 21), (200, 21), (130, 33), (70, 100)])
@pytest.mark.parametrize("eps, tau", [(0.0, 0.0), (0.1, 0.0), (0.0, 0.5)])
def test_class_major_ops_match_contiguous_rows(B, C, dtype, eps, tau):
    rows, target = _op_case(B, C, dtype, seed=B * C)
    ga = _assert_ops_match(_class_major(rows), rows, target, eps, tau)
    assert ga.stride() == _class_major(rows).stride()  # the gradient keeps the layout


def test_class_major_rows_with_non_finite_logits_and_invalid_targets():
    rows, target = _op_case(150, 9, torch.float32, seed=11)
    rows[3, 0] = float("nan")  # NaN: that row's loss and gradient
    rows[4, 0] = float("-inf")  # a fully masked row: NaN loss
    rows[5, 0, 2] = float("-inf")  # one masked class: 0 probability
    rows[6, 0, 1] = float("inf")
    rows[100, 0] = float("nan")  # an ignored row is never used
    target[100] = -100
    target[7] = 9  # out of range (validation off in direct op calls): NaN row
    target[8] = -5
    ga = _assert_ops_match(_class_major(rows), rows, target)
    assert (ga[100] == 0).all() and torch.isnan(ga[7]).all() and torch.isnan(ga[8]).all()


@pytest.mark.parametrize(
    "kw",
    [
        {"class_weight": torch.rand(6) + 0.5},  # weighted loss: a contiguous copy
    ],
)
def test_class_major_rows_other_losses_take_a_contiguous_copy(kw):
    rows, target = _op_case(90, 6, torch.float32, seed=5)
    _assert_ops_match(_class_major(rows), rows, target, eps=0.05, **kw)


def test_class_major_rows_with_radius_or_probabilities_match():
    rows, target = _op_case(90, 6, torch.float64, seed=6)
    target[target < 0] = 0
    cm = _class_major(rows)
    radius = torch.rand(90, dtype=torch.float64)
    a = ops.worst_of_k_ce_fwd(cm, target, radius, 0.0, 0.0, -100)
    b = ops.worst_of_k_ce_fwd(rows, target, radius, 0.0, 0.0, -100)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)
    p = torch.softmax(torch.randn(90, 6, dtype=torch.float64), 1)
    a = ops.worst_of_k_ce_fwd(cm, p, None, 0.0, 0.1, -100)
    b = ops.worst_of_k_ce_fwd(rows, p, None, 0.0, 0.1, -100)
    torch.testing.assert_close(a[0], b[0])
    g = torch.rand(90, dtype=torch.float64)
    torch.testing.assert_close(
        ops.worst_of_k_ce_bwd(g, cm, p, None, a[1], a[2], 0.1, -100),
        ops.worst_of_k_ce_bwd(g, rows, p, None, b[1], b[2], 0.1, -100),
    )


def test_strided_class_rows_other_than_class_major_are_refused():
    gen = torch.Generator().manual_seed(9)
    rows = torch.randn(40, 1, 12, generator=gen)[:, :, ::2]  # class stride 2, row stride 12
    target = torch.randint(0, 6, (40,), generator=gen)
    with pytest.raises(RuntimeError, match="class dim must be contiguous"):
        ops.worst_of_k_ce_fwd(rows, target, None, 0.0, 0.0, -100)


def test_class_major_rows_with_gaps_get_their_gradient_through_a_copy():
    gen = torch.Generator().manual_seed(10)
    padded = torch.randn(6, 50, generator=gen)[:, :40].t().unsqueeze(1)  # class stride 50 > B
    target = torch.randint(0, 6, (40,), generator=gen)
    a = ops.worst_of_k_ce_fwd(padded, target, None, 0.0, 0.0, -100)
    b = ops.worst_of_k_ce_fwd(padded.contiguous(), target, None, 0.0, 0.0, -100)
    torch.testing.assert_close(a[0], b[0])
    g = torch.rand(40, generator=gen)
    torch.testing.assert_close(
        ops.worst_of_k_ce_bwd(g, padded, target, None, a[1], a[2], 0.0, -100),
        ops.worst_of_k_ce_bwd(g, padded.contiguous(), target, None, b[1], b[2], 0.0, -100),
    )


@pytest.mark.parametrize("weight", [False, True])
@pytest.mark.parametrize("inplace", [False, True])
def test_spatial_public_call_with_weights_and_inplace_backward(weight, inplace):
    gen = torch.Generator().manual_seed(12)
    base = torch.randn(3, 7, 5, 9, generator=gen)
    target = torch.randint(0, 7, (3, 5, 9), generator=gen)
    target[1, 2] = -100
    kw = {"weight": torch.rand(7, generator=gen) + 0.5} if weight else {}
    a = (2 * base).requires_grad_(True)  # a leaf; the loss sees a non-leaf for inplace_backward
    b = base.clone().requires_grad_(True)
    got = fm.worst_of_k_cross_entropy(a * 0.5, target, inplace_backward=inplace, **kw)
    want = F.cross_entropy(b, target, **kw)
    torch.testing.assert_close(got, want)
    got.backward()
    want.backward()
    torch.testing.assert_close(a.grad * 2, b.grad)
