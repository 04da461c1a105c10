"""The tiled transposes between spatial logits (N, C, d1, ...) and the (N * d1 * ..., 1, C) rows
(csrc/cpu/class_last.cpp, used by fastmargin/_ce_layout.py in eager mode): bit-exact copies both
ways for every element size, and a spatial loss whose value and gradient are F.cross_entropy's,
with the gradient laid out as F.cross_entropy's (contiguous) for contiguous logits."""

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
def test_round_trip_is_the_movedim_copy(shape, dtype):
    x = _random(shape, dtype)
    rows = ops._class_last(x)
    want = x.movedim(1, -1).reshape(-1, 1, shape[1])
    assert rows.is_contiguous() and torch.equal(rows, want)
    back = ops._class_first(rows, list(shape))
    assert back.is_contiguous() and torch.equal(back, x)


def test_composite_kernels_match_the_cpu_ones():
    x = _random((2, 5, 3, 9), torch.float32)
    rows = ops._class_last(x)
    meta = ops._class_last(x.to("meta"))
    assert meta.shape == rows.shape
    assert ops._class_first(rows.to("meta"), list(x.shape)).shape == x.shape


def test_class_first_refuses_rows_of_another_shape():
    with pytest.raises(RuntimeError, match="do not hold logits"):
        ops._class_first(torch.zeros(6, 1, 4), [2, 3, 4])


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
    assert not _ce_layout._use_tiled_transpose(x)
    target = torch.randint(0, 6, (x.shape[0], *x.shape[2:]))
    got = fm.worst_of_k_cross_entropy(x, target)
    want = F.cross_entropy(x, target)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got, x)[0], torch.autograd.grad(want, x)[0])


def test_probability_targets_take_the_transpose_and_get_their_gradient():
    x = _random((2, 5, 4, 6), torch.float32, seed=4).requires_grad_(True)
    p = torch.softmax(_random((2, 5, 4, 6), torch.float32, seed=5), 1).requires_grad_(True)
    assert _ce_layout._use_tiled_transpose(p)
    got = fm.worst_of_k_cross_entropy(x, p, label_smoothing=0.2)
    want = F.cross_entropy(x, p, label_smoothing=0.2)
    torch.testing.assert_close(got, want)
    for h, w in zip(torch.autograd.grad(got, (x, p)), torch.autograd.grad(want, (x, p))):
        assert h.is_contiguous()
        torch.testing.assert_close(h, w)


def test_double_backward_through_the_transpose():
    x = _random((2, 4, 3, 5), torch.float64, seed=6).requires_grad_(True)
    target = torch.randint(0, 4, (2, 3, 5))
    (g,) = torch.autograd.grad(fm.worst_of_k_cross_entropy(x, target), x, create_graph=True)
    (gg,) = torch.autograd.grad(g.square().sum(), x)
    (g_ref,) = torch.autograd.grad(F.cross_entropy(x, target), x, create_graph=True)
    (gg_ref,) = torch.autograd.grad(g_ref.square().sum(), x)
    torch.testing.assert_close(gg, gg_ref)
