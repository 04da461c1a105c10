"""The radius path of the CPU small-row kernels (rows of at most 32 classes, csrc/cpu/
worst_of_k_ce.cpp): the robust rows z~ are formed while each tile is loaded (cpu::RowShift) rather
than gathered into scratch, and dL/dr and the target-class gradients take one vectorised exp per
block. Checked against the reference (loss, gradients into the logits and the radius) on odd row
lengths, ignored and out-of-range targets, radius 0, radii large enough to flip the argmax, NaN /
inf logits and every dtype, and bit for bit against the gathered path (copies-first layout).
"""

from __future__ import annotations

import pytest
import torch
from test_worst_of_k_ce import ALL_DTYPES, tolerances

import fastmargin as fm
from fastmargin import reference as ref

SMALL_C = (1, 3, 7, 10, 17, 31, 32)


def _case(N, C, dtype, seed, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    logits = (scale * torch.randn(N, C, generator=gen, dtype=torch.float64)).to(dtype)
    target = torch.randint(0, C, (N,), generator=gen)
    radius = torch.rand(N, generator=gen, dtype=torch.float64)
    return logits, target, radius


def _check(logits, target, radius, **kw):
    """Loss and gradients into logits and radius against the reference (fp32 reference for half
    inputs, on the same rounded logits)."""
    dtype = logits.dtype
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    x = logits.detach().clone().requires_grad_(True)
    r = radius.detach().to(acc).clone().requires_grad_(True)
    x_ref = logits.detach().to(acc).clone().requires_grad_(True)
    r_ref = radius.detach().to(acc).clone().requires_grad_(True)
    ours = fm.weight_robust_cross_entropy(x, target, r, reduction="none", **kw)
    theirs = ref.weight_robust_cross_entropy(x_ref, target, r_ref, reduction="none", **kw)
    tol = tolerances(dtype)
    torch.testing.assert_close(ours.to(acc), theirs, equal_nan=True, **tol)
    g = torch.rand(ours.shape, generator=torch.Generator().manual_seed(1), dtype=acc) + 0.5
    ok = ~torch.isnan(theirs)  # NaN samples: NaN gradients, compared below by the caller
    g_ours = torch.autograd.grad(ours, (x, r), g.to(ours.dtype))
    g_theirs = torch.autograd.grad(theirs, (x_ref, r_ref), g)
    torch.testing.assert_close(g_ours[0][ok].to(acc), g_theirs[0][ok], **tol)
    torch.testing.assert_close(g_ours[1][ok], g_theirs[1][ok], **tol)
    return ours, g_ours


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("C", SMALL_C)
def test_matches_reference_with_ignored_samples(dtype, C):
    # 300 samples span several blocks and a ragged last tile; ignored samples sit inside tiles.
    logits, target, radius = _case(300, C, dtype, seed=C)
    target[::7] = -100
    radius[::5] = 0.0  # radius 0 next to positive ones in the same tile
    ours, (gx, gr) = _check(logits, target, radius, label_smoothing=0.1)
    assert (ours[::7] == 0).all() and (gx[::7] == 0).all() and (gr[::7] == 0).all()


@pytest.mark.parametrize("C", (2, 10, 32))
def test_zero_radius_is_cross_entropy(C):
    logits, target, _ = _case(200, C, torch.float32, seed=2 * C)
    x = logits.clone().requires_grad_(True)
    r = torch.zeros(200, requires_grad=True)
    ours = fm.weight_robust_cross_entropy(x, target, r, reduction="none")
    want = torch.nn.functional.cross_entropy(logits, target, reduction="none")
    torch.testing.assert_close(ours, want, rtol=1e-6, atol=1e-6)
    gx, gr = torch.autograd.grad(ours.sum(), (x, r))
    xw = logits.clone().requires_grad_(True)
    (gw,) = torch.autograd.grad(torch.nn.functional.cross_entropy(xw, target, reduction="sum"), xw)
    torch.testing.assert_close(gx, gw, rtol=1e-6, atol=1e-6)
    # dL/dr at r = 0: 2 (1 - p_y).
    p_y = logits.softmax(1).gather(1, target[:, None])[:, 0]
    torch.testing.assert_close(gr, 2 * (1 - p_y), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("C", (3, 10, 32))
def test_large_radius(C):
    # Radii far above the logits' spread: the robust row's max moves off the target.
    logits, target, radius = _case(200, C, torch.float32, seed=3 * C, scale=1.0)
    _check(logits, target, 50.0 + 100.0 * radius)


@pytest.mark.parametrize("C", (3, 10, 17, 32))
def test_nan_inf_logits_and_out_of_range_target(C):
    logits, target, radius = _case(200, C, torch.float32, seed=5 * C)
    logits[::4, C - 1] = float("-inf")  # a masked class in every fourth sample
    target[::4] = 0
    logits[5, 0] = float("nan")  # NaN: sample 5 only
    logits[6] = float("-inf")  # a fully masked row: NaN loss
    logits[9, 0] = float("inf")  # +inf logit: NaN loss (inf - inf)
    target[9] = C - 1 if C > 1 else 0
    logits[7] = float("nan")  # an ignored sample is never used
    target[7] = -100
    fm.set_validation(False)
    try:
        target[8] = C  # out of range: NaN loss and gradients for that sample only
        x = logits.clone().requires_grad_(True)
        r = radius.float().clone().requires_grad_(True)
        per = fm.weight_robust_cross_entropy(x, target, r, reduction="none")
        gx, gr = torch.autograd.grad(per.sum(), (x, r))
    finally:
        fm.set_validation(True)
    assert torch.isnan(per[[5, 6, 8]]).all() and torch.isnan(gx[8]).all() and torch.isnan(gr[8])
    assert per[7] == 0 and (gx[7] == 0).all() and gr[7] == 0
    ok = torch.ones(200, dtype=torch.bool)
    ok[[5, 6, 7, 8, 9]] = False
    assert torch.isfinite(per[ok]).all() and torch.isfinite(gx[ok]).all()
    masked = ok & (torch.arange(200) % 4 == 0)
    assert (gx[masked][:, C - 1] == 0).all()
    _check(logits[ok], target[ok], radius[ok])


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("C", (3, 10, 32))
def test_packed_copies_equal_gathered_rows(dtype, C):
    # k copies packed per sample (B, k, C) are read in place with the radius applied per tile;
    # the copies-first layout (k, B, C) still gathers the robust rows. Same numbers, bit for bit
    # for float32 / float64; half rows read in place take the baseline build of the lane loop and
    # the gathered float rows the multiversioned one (FMA), so they agree to rounding.
    B, k = 150, 3
    gen = torch.Generator().manual_seed(C)
    packed = (3 * torch.randn(B, k, C, generator=gen, dtype=torch.float64)).to(dtype)
    copies_first = packed.transpose(0, 1).contiguous().transpose(0, 1)
    target = torch.randint(0, C, (B,), generator=gen)
    target[::6] = -100
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    radius = torch.rand(B, generator=gen, dtype=acc)
    radius[::4] = 0.0
    for temperature in (0.0, 0.5):
        a = torch.ops.fastmargin.worst_of_k_ce_fwd(
            packed, target, radius, temperature, 0.1, -100, None
        )
        b = torch.ops.fastmargin.worst_of_k_ce_fwd(
            copies_first, target, radius, temperature, 0.1, -100, None
        )
        tol = {"rtol": 0, "atol": 0} if acc == dtype else {"rtol": 1e-6, "atol": 1e-6}
        for u, v in zip(a, b):
            torch.testing.assert_close(u, v, equal_nan=True, **tol)
