"""4-D spatial rows (N, S, k, C) in the worst-of-k ops (csrc/include/fastmargin/worst_of_k_ce.h).

Contiguous spatial logits (N, C, d1, ...) are memory (N, C, S); their in-place view (N, S, 1, C),
class stride S, is what the CPU kernels read for the plain loss, with no copy of the logits and
the gradient in the logits' own layout. Every other 4-D input runs on a contiguous (B, k, C) copy.
Each is checked against the same rows laid out as contiguous (B, k, C) logits, and the public
spatial loss against F.cross_entropy with no copy of the logits or of their gradient.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

import fastmargin as fm

ops = torch.ops.fastmargin

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# (N, C, S): positions on both sides of the 64-row tile and the 256-row block, so that blocks
# end at sample boundaries inside a thread's range; one position; a single sample.
SHAPES = [(3, 5, 77), (2, 21, 1024), (4, 3, 65), (2, 33, 300), (5, 2, 1), (1, 7, 257)]


def _logits(N, C, S, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    return (3 * torch.randn(N, C, S, generator=gen)).to(dtype)


def _in_place_rows(x: torch.Tensor) -> torch.Tensor:
    """(N, S, 1, C) view of contiguous (N, C, S) logits: row n * S + s, class stride S."""
    N, C, S = x.shape
    return x.as_strided((N, S, 1, C), (C * S, 1, C * S, S))


def _contiguous_rows(x: torch.Tensor) -> torch.Tensor:
    return x.movedim(1, -1).reshape(-1, 1, x.shape[1]).contiguous()


def _target(B, C, seed):
    gen = torch.Generator().manual_seed(seed)
    t = torch.randint(0, C, (B,), generator=gen)
    t[::5] = -100  # ignored rows inside the tiles
    return t


def _grad_tol(dtype):
    return {"rtol": 1e-2, "atol": 1e-3} if dtype in (torch.float16, torch.bfloat16) else {}


def _assert_match(rows4, rows3, target, eps=0.0, tau=0.0, radius=None, **kw):
    """fwd, bwd and the in-place bwd on the 4-D rows equal those on the (B, k, C) rows."""
    a = ops.worst_of_k_ce_fwd(rows4, target, radius, tau, eps, -100, **kw)
    b = ops.worst_of_k_ce_fwd(rows3, target, radius, tau, eps, -100, **kw)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6, equal_nan=True)
    B = rows3.shape[0]
    g = torch.rand(B, dtype=b[1].dtype, generator=torch.Generator().manual_seed(1)) + 0.5
    ga = ops.worst_of_k_ce_bwd(g, rows4, target, radius, a[1], a[2], eps, -100, **kw)
    gb = ops.worst_of_k_ce_bwd(g, rows3, target, radius, b[1], b[2], eps, -100, **kw)
    assert ga.shape == rows4.shape and ga.stride() == torch.empty_like(rows4).stride()
    tol = _grad_tol(rows3.dtype)
    torch.testing.assert_close(ga.reshape(gb.shape), gb, equal_nan=True, **tol)
    inplace = rows4.clone()
    ops.worst_of_k_ce_bwd_inplace(g, inplace, target, radius, a[1], a[2], eps, -100, **kw)
    torch.testing.assert_close(inplace.reshape(gb.shape), gb, equal_nan=True, **tol)
    return ga


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N, C, S", SHAPES)
@pytest.mark.parametrize("eps, tau", [(0.0, 0.0), (0.1, 0.0), (0.0, 0.5)])
def test_in_place_spatial_rows_match_contiguous_rows(N, C, S, dtype, eps, tau):
    x = _logits(N, C, S, dtype, seed=N * C + S)
    rows4 = _in_place_rows(x)
    ga = _assert_match(rows4, _contiguous_rows(x), _target(N * S, C, S), eps, tau)
    if C > 1 and S > 1:
        assert ga.stride() == rows4.stride()  # memory (N, C, S), as the logits


def test_in_place_spatial_rows_with_non_finite_logits_and_invalid_targets():
    x = _logits(3, 9, 100, torch.float32, seed=3)
    target = _target(300, 9, 4)
    x[0, :, 3] = float("nan")  # a NaN row: NaN loss and gradient
    x[1, :, 4] = float("-inf")  # a fully masked row: NaN loss
    x[2, 2, 5] = float("-inf")  # one masked class: probability 0
    x[2, 1, 6] = float("inf")
    x[1, :, 0] = float("nan")  # an ignored row is never read
    target[100] = -100
    target[207] = 9  # out of range (direct op calls do not validate): a NaN row
    target[208] = -5
    ga = _assert_match(_in_place_rows(x), _contiguous_rows(x), target).reshape(300, 9)
    assert (ga[100] == 0).all() and torch.isnan(ga[207]).all() and torch.isnan(ga[208]).all()


def test_in_place_spatial_rows_of_a_tensor_with_a_storage_offset():
    x = _logits(2, 4, 70, torch.float32, seed=5)
    big = torch.cat([torch.zeros(11), x.reshape(-1)])
    shifted = big[11:].view(2, 4, 70)
    assert shifted.storage_offset() == 11
    _assert_match(_in_place_rows(shifted), _contiguous_rows(x), _target(140, 4, 6))


@pytest.mark.parametrize("option", ["class_weight", "radius", "probabilities"])
def test_other_losses_on_spatial_rows_take_a_contiguous_copy(option):
    x = _logits(2, 6, 45, torch.float64, seed=7)
    target = _target(90, 6, 8)
    kw = {}
    if option == "class_weight":
        kw["class_weight"] = torch.rand(6, dtype=torch.float64) + 0.5
    elif option == "radius":
        target[target < 0] = 0
        kw["radius"] = torch.rand(90, dtype=torch.float64)
    else:
        target = torch.softmax(torch.randn(90, 6, dtype=torch.float64), 1)
    _assert_match(_in_place_rows(x), _contiguous_rows(x), target, eps=0.1, **kw)


@pytest.mark.parametrize(
    "make",
    [
        lambda x: x.movedim(1, -1).reshape(2, 45, 1, 6),  # class-contiguous 4-D: a view
        lambda x: x.movedim(1, -1).reshape(2, 15, 3, 6),  # k = 3 copies per row
        lambda x: x.movedim(1, -1).reshape(2, 45, 6, 1),  # one class
        lambda x: _in_place_rows(torch.cat([x, x], 2))[:, ::2],  # gaps: the gradient via a copy
    ],
)
def test_other_4d_logits_run_on_their_rows(make):
    rows4 = make(_logits(2, 6, 45, torch.float32, seed=9))
    rows3 = rows4.reshape(-1, *rows4.shape[2:]).contiguous()
    _assert_match(rows4, rows3, _target(rows3.shape[0], rows3.shape[2], 10), eps=0.05, tau=0.2)


def test_spatial_rows_checks_name_the_argument():
    rows4 = _in_place_rows(_logits(2, 5, 10, torch.float32, seed=11))
    with pytest.raises(RuntimeError, match=r"target: expected shape \(20,\)"):
        ops.worst_of_k_ce_fwd(rows4, torch.zeros(10, dtype=torch.long), None, 0.0, 0.0, -100)
    with pytest.raises(RuntimeError, match="expected a 3-D"):
        ops.worst_of_k_ce_fwd(rows4[None], torch.zeros(20, dtype=torch.long), None, 0.0, 0.0, -1)
    out = ops.worst_of_k_ce_fwd(rows4, torch.zeros(20, dtype=torch.long), None, 0.0, 0.0, -100)
    with pytest.raises(RuntimeError, match=r"lse: expected contiguous \(20, 1\)"):
        ops.worst_of_k_ce_bwd(out[0], rows4, out[3], None, out[1][:10], out[2], 0.0, -100)


def test_fake_kernels_take_spatial_rows():
    with FakeTensorMode():
        rows4 = torch.empty(3, 40, 2, 7)
        loss, lse, weight, index, dr = ops.worst_of_k_ce_fwd(
            rows4, torch.empty(120, dtype=torch.long), None, 0.0, 0.0, -100
        )
        assert loss.shape == (120,) and lse.shape == weight.shape == (120, 2)
        assert index.shape == (120,) and dr.shape == (0,)
        grad = ops.worst_of_k_ce_bwd(loss, rows4, index, None, lse, weight, 0.0, -100)
        assert grad.shape == rows4.shape


@pytest.mark.parametrize("shape", [(3, 5, 7, 11), (2, 21, 32, 32), (2, 4, 3, 5, 7)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_public_spatial_loss_reads_the_logits_in_place(shape, reduction):
    """The eager spatial loss on the CPU: F.cross_entropy's value and gradient, and neither the
    logits nor their gradient is copied (no _class_last, no copy_ in the backward: the gradient
    lies as the logits and becomes .grad as it is)."""
    gen = torch.Generator().manual_seed(12)
    base = torch.randn(shape, generator=gen)
    target = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=gen)
    target[0].view(-1)[::4] = -100
    a, b = base.clone().requires_grad_(True), base.clone().requires_grad_(True)
    with torch.profiler.profile() as prof:
        got = fm.worst_of_k_cross_entropy(a, target, reduction=reduction, label_smoothing=0.1)
        got.backward(torch.ones_like(got))
    want = F.cross_entropy(b, target, reduction=reduction, label_smoothing=0.1)
    want.backward(torch.ones_like(want))
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(a.grad, b.grad)
    assert a.grad.is_contiguous()
    names = {e.name for e in prof.events()}
    assert "fastmargin::worst_of_k_ce_bwd" in names
    assert not names & {"fastmargin::_class_last", "aten::copy_", "aten::clone"}


def test_public_spatial_loss_sees_logits_changed_before_the_backward():
    """The loss reads the logits in place (it saves them, not a copy): changing them between
    the forward and the backward is caught, as for any autograd input saved for the backward.
    (Double backward through spatial logits: tests/test_class_major_rows.py.)"""
    x = torch.randn(2, 4, 6, 5, requires_grad=True)
    target = torch.randint(0, 4, (2, 6, 5))
    z = x * 1.0
    loss = fm.worst_of_k_cross_entropy(z, target)
    with torch.no_grad():
        z.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
