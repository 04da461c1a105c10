"""The vectorised CPU row passes (csrc/include/fastmargin/cpu_rows.h) on long rows and short ones.

The other CE tests mostly use rows shorter than one lane block (16 classes) for their numerics
cases; these put masked classes, NaN, all -inf copies and 1e4 logits into rows that span many
lane blocks, a ragged tail, and (half / bfloat16 backward) several 512-class chunks, for the plain
and the weighted / probability-target kernels; short rows (C <= 32) are reduced a block of
samples at a time, so those tests use many samples with ignored, masked and NaN ones inside.
"""

from __future__ import annotations

import pytest
import torch
from test_worst_of_k_ce import ALL_DTYPES, check_against_reference, tolerances

import fastmargin as fm
from fastmargin import reference as ref

LONG_C = (16, 17, 1031)


def _case(B, k, C, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(B, k, C, generator=gen, dtype=torch.float64)).to(dtype)
    target = torch.randint(0, C, (B,), generator=gen)
    return logits, target


def _compare_sum(logits, tgt, ref_logits, ref_tgt, kw, ref_kw, dtype, masked=None):
    """Summed loss and gradient against the reference (on ref_logits: the same classes, or the
    unmasked ones only); masked classes must get exactly zero gradient."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    x = logits.detach().clone().requires_grad_(True)
    ref_in = ref_logits.detach().to(acc).clone().requires_grad_(True)
    kw, ref_kw = {"dim": 1, **kw}, {"dim": 1, **ref_kw}
    ours = fm.worst_of_k_cross_entropy(x, tgt, reduction="sum", temperature=0.3, **kw)
    theirs = ref.worst_of_k_cross_entropy(
        ref_in, ref_tgt, reduction="sum", temperature=0.3, **ref_kw
    )
    ours.backward()
    theirs.backward()
    assert torch.isfinite(ours)
    tol = tolerances(dtype)
    torch.testing.assert_close(ours.to(acc), theirs, **tol)
    if masked is None:
        torch.testing.assert_close(x.grad.to(acc), ref_in.grad, **tol)
    else:
        assert (x.grad[..., masked] == 0).all()
        torch.testing.assert_close(x.grad[..., ~masked].to(acc), ref_in.grad, **tol)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("C", LONG_C)
def test_long_rows_match_reference(dtype, C):
    logits, target = _case(5, 3, C, dtype, seed=C)
    check_against_reference(logits, target, label_smoothing=0.1)
    check_against_reference(logits, target, temperature=0.5)
    # Class weights with smoothing: every class has a coefficient (the dense weighted row).
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    gen = torch.Generator().manual_seed(C)
    weight = (torch.rand(C, generator=gen, dtype=torch.float64) + 0.5).to(acc)
    kw = {"weight": weight, "label_smoothing": 0.1}
    _compare_sum(logits, target, logits, target, kw, kw, dtype)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("C", LONG_C)
def test_long_rows_masks_nan_and_all_masked_copy(dtype, C):
    logits, target = _case(4, 3, C, dtype, seed=7 * C)
    masked = torch.arange(C) % 5 == 3  # masked classes in every lane position and the tail
    target = torch.where(masked[target], (target + 1) % C, target)
    logits[..., masked] = float("-inf")
    logits[1, 2, C // 2] = float("nan")  # NaN: sample 1 only
    logits[2, 0] = float("-inf")  # a fully masked copy: NaN loss for sample 2, as before
    x = logits.clone().requires_grad_(True)
    per = fm.worst_of_k_cross_entropy(x, target, dim=1, reduction="none")
    per.sum().backward()
    assert torch.isnan(per[[1, 2]]).all()
    assert torch.isfinite(per[[0, 3]]).all()
    assert (x.grad[[0, 3]][..., masked] == 0).all()  # exactly zero probability and gradient
    assert torch.isfinite(x.grad[[0, 3]]).all()
    assert torch.isnan(x.grad[1, 2]).all()
    ok = [0, 3]
    check_against_reference(logits[ok], target[ok])


@pytest.mark.parametrize("C", LONG_C)
def test_long_rows_large_logits_exact(C):
    logits, target = _case(6, 3, C, torch.float32, seed=11 * C)
    logits = logits * 1e4 / logits.abs().max()
    check_against_reference(logits, target)
    check_against_reference(logits, target, temperature=50.0, label_smoothing=0.1)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("C", LONG_C)
def test_long_rows_weighted_and_soft_targets(dtype, C):
    """Masked classes with no target mass drop out of the weighted loss, so it equals the
    reference on the unmasked classes only (the reference itself gives NaN there: 0 * -inf)."""
    logits, target = _case(4, 3, C, dtype, seed=13 * C)
    gen = torch.Generator().manual_seed(C)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    weight = (torch.rand(C, generator=gen, dtype=torch.float64) + 0.5).to(acc)
    soft = torch.softmax(torch.randn(4, C, generator=gen, dtype=torch.float64), -1).to(dtype)
    masked = torch.arange(C) % 7 == 2
    keep = ~masked
    soft[:, masked] = 0
    logits[..., masked] = float("-inf")
    target = torch.where(masked[target], (target + 1) % C, target)
    kept_index = torch.cumsum(keep.long(), 0) - 1  # class c -> its index among the kept ones
    cases = (
        (target, kept_index[target], {"weight": weight}, {"weight": weight[keep]}),
        (soft, soft[:, keep].to(acc), {}, {}),
        (soft, soft[:, keep].to(acc), {"weight": weight}, {"weight": weight[keep]}),
    )
    for tgt, ref_tgt, kw, ref_kw in cases:
        _compare_sum(logits, tgt, logits[..., keep], ref_tgt, kw, ref_kw, dtype, masked=masked)


# Rows of at most 32 classes take the batched forward (cpu_rows.h: small_rows_stats, a block of
# samples' rows reduced together); 33 classes take the per-row passes.
SMALL_C = (1, 2, 3, 10, 17, 32, 33)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("C", SMALL_C)
def test_small_rows_match_reference(dtype, C):
    # 300 samples span several blocks; ignored samples sit inside blocks; both copy layouts.
    logits, target = _case(300, 3, C, dtype, seed=C + 1)
    target[::9] = -100
    check_against_reference(logits, target, label_smoothing=0.1)
    check_against_reference(logits.transpose(0, 1).contiguous(), target, dim=0, temperature=0.5)


@pytest.mark.parametrize("C", (2, 3, 10, 17, 32))
def test_small_rows_masks_nan_and_ignored_nan_sample(C):
    logits, target = _case(200, 3, C, torch.float32, seed=3 * C)
    logits[::4, :, C - 1] = float("-inf")  # a masked class in every fourth sample
    target[::4] = 0
    logits[5, 1, 0] = float("nan")  # NaN: sample 5 only
    logits[6, 2] = float("-inf")  # a fully masked copy: NaN loss for sample 6
    logits[7] = float("nan")  # an ignored sample is never read
    target[7] = -100
    x = logits.clone().requires_grad_(True)
    per = fm.worst_of_k_cross_entropy(x, target, dim=1, reduction="none")
    per.sum().backward()
    assert torch.isnan(per[[5, 6]]).all()
    assert per[7] == 0 and (x.grad[7] == 0).all()
    ok = torch.ones(200, dtype=torch.bool)
    ok[[5, 6, 7]] = False
    assert torch.isfinite(per[ok]).all() and torch.isfinite(x.grad[ok]).all()
    masked_rows = ok & (torch.arange(200) % 4 == 0)
    assert (x.grad[masked_rows][..., C - 1] == 0).all()
    check_against_reference(logits[ok], target[ok])


@pytest.mark.parametrize("C", SMALL_C)
def test_small_rows_weight_robust_matches_reference(C):
    gen = torch.Generator().manual_seed(C)
    logits = (3 * torch.randn(300, C, generator=gen)).requires_grad_(True)
    target = torch.randint(0, C, (300,), generator=gen)
    target[::11] = -100
    radius = torch.rand(300, generator=gen).requires_grad_(True)
    ours = fm.weight_robust_cross_entropy(logits, target, radius, label_smoothing=0.05)
    theirs = ref.weight_robust_cross_entropy(logits, target, radius, label_smoothing=0.05)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    g_ours = torch.autograd.grad(ours, (logits, radius))
    g_theirs = torch.autograd.grad(theirs, (logits, radius))
    for a, b in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
