"""The CPU kernels' vectorised float exp (exp_lane, csrc/include/fastmargin/cpu_vec_math.h),
seen through the op where it is the only approximation: the cross-entropy gradient of two-class
rows (0, -d) is the probability of the second class, exp(-d - lse), against float64 over the
whole argument range the kernels use (0 down to below -87, where exp_lane returns 0), in every
row layout whose loop calls it; and NaN / infinite logits keep their meaning."""

from __future__ import annotations

import pytest
import torch

ops = torch.ops.fastmargin


def _rows(d: torch.Tensor, layout: str) -> torch.Tensor:
    rows = torch.stack([torch.zeros_like(d), -d], 1).unsqueeze(1)  # (B, 1, 2)
    if layout == "class_major":  # memory (C, B): the class-major kernels
        return rows.squeeze(1).t().contiguous().t().unsqueeze(1)
    if layout == "wide":  # 40 classes, 38 of them -inf (probability 0): the general row loop
        pad = torch.full((d.shape[0], 1, 38), float("-inf"))
        return torch.cat([rows, pad], 2)
    return rows  # (B, 1, 2) contiguous: the small-row kernels


def _second_class_probability(rows: torch.Tensor) -> torch.Tensor:
    B = rows.shape[0]
    target = torch.zeros(B, dtype=torch.long)
    out = ops.worst_of_k_ce_fwd(rows, target, None, 0.0, 0.0, -100)
    grad = ops.worst_of_k_ce_bwd(torch.ones(B), rows, target, None, out[1], out[2], 0.0, -100)
    return grad[:, 0, 1]


@pytest.mark.parametrize("layout", ["contiguous", "class_major", "wide"])
def test_exp_is_float_accurate_over_the_kernels_range(layout):
    d = torch.cat([torch.linspace(0, 90, 20001), torch.rand(4000) * 87])
    got = _second_class_probability(_rows(d, layout))
    d64 = d.double()
    want = torch.exp(-d64 - torch.log1p(torch.exp(-d64)))
    # exp_lane is about 1 ulp; the logsumexp adds a few (its error is absolute in the exponent).
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=2e-38)
    assert (got[d > 87.5] == 0).all()  # below -87 the exp is exactly 0, never a subnormal


@pytest.mark.parametrize("layout", ["contiguous", "class_major"])
def test_exp_of_non_finite_logits(layout):
    d = torch.tensor([float("nan"), float("inf"), 1.0, float("-inf")] * 20)
    got = _second_class_probability(_rows(d, layout)).view(20, 4)
    assert torch.isnan(got[:, 0]).all()  # a NaN logit: NaN probabilities
    assert (got[:, 1] == 0).all()  # a -inf logit: probability 0
    torch.testing.assert_close(got[:, 2], torch.full((20,), 1 / (1 + torch.e)))
    assert torch.isnan(got[:, 3]).all()  # +inf: inf - inf in the logsumexp, as F.cross_entropy
