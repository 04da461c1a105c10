"""Class weights (weight=) for worst_of_k_cross_entropy with class-index targets: PyTorch's
semantics (per-sample w_y-weighted loss, smoothing term weighted per class, 'mean' divided by
the sum of the selected weights), and the weighted loss inside the worst-of-k max."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _weighted_ce_common import DEVICES, DTYPES, check_against_reference, make_logits

import fastmargin as fm
from fastmargin import reference as R
from fastmargin._ops import ops

SHAPES = [(4, 3, 5), (1, 2, 7), (3, 1, 1), (5, 2, 2), (2, 4, 37), (3, 2, 130)]


def _targets(B, C, gen, device, ignore=True):
    y = torch.randint(0, C, (B,), generator=gen)
    if ignore and B > 2:
        y[1] = -100
    return y.to(device)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.25])
@pytest.mark.parametrize("ignore_index", [-100, 2])
def test_k1_matches_cross_entropy(reduction, label_smoothing, ignore_index):
    gen = torch.Generator().manual_seed(20)
    x = torch.randn(7, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 6, (7,), generator=gen)
    y[0] = ignore_index
    w = torch.rand(6, generator=gen, dtype=torch.float64) + 0.1
    kw = dict(
        weight=w, reduction=reduction, label_smoothing=label_smoothing, ignore_index=ignore_index
    )
    expected = F.cross_entropy(x, y, **kw)
    g = torch.rand_like(expected)
    (expected_grad,) = torch.autograd.grad(expected, x, g)
    for dim in (0, 1):
        got = fm.worst_of_k_cross_entropy(x.unsqueeze(dim), y, dim=dim, **kw)
        torch.testing.assert_close(got, expected)
        torch.testing.assert_close(torch.autograd.grad(got, x, g)[0], expected_grad)


def test_negative_and_zero_weights_follow_pytorch():
    """PyTorch does not restrict the sign of class weights; neither does fastmargin."""
    gen = torch.Generator().manual_seed(21)
    x = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 1, 0])
    w = torch.tensor([1.5, -0.5, 0.0, 2.0], dtype=torch.float64)
    for eps in (0.0, 0.2):
        for reduction in ("none", "mean"):
            torch.testing.assert_close(
                fm.worst_of_k_cross_entropy(
                    x[:, None], y, dim=1, weight=w, label_smoothing=eps, reduction=reduction
                ),
                F.cross_entropy(x, y, weight=w, label_smoothing=eps, reduction=reduction),
            )


def test_mean_divides_by_selected_weights_of_samples_not_ignored():
    gen = torch.Generator().manual_seed(22)
    x = make_logits(5, 3, 4, 1, torch.float64, "cpu", gen)
    y = torch.tensor([0, 3, -100, 1, 3])
    w = torch.tensor([0.5, 2.0, 1.0, 3.0], dtype=torch.float64)
    per_sample = fm.worst_of_k_cross_entropy(x, y, dim=1, weight=w, reduction="none")
    mean = fm.worst_of_k_cross_entropy(x, y, dim=1, weight=w)
    torch.testing.assert_close(mean, per_sample.sum() / (0.5 + 3.0 + 2.0 + 3.0))
    # the per-copy loss inside the max is the weighted one: w_y * CE
    plain = fm.worst_of_k_cross_entropy(x, y, dim=1, reduction="none")
    torch.testing.assert_close(per_sample, plain * torch.where(y >= 0, w[y.clamp(0)], 0))


def test_all_ignored_mean_is_nan_like_pytorch():
    x = torch.randn(3, 2, 4)
    y = torch.full((3,), -100)
    w = torch.rand(4) + 0.1
    assert torch.isnan(fm.worst_of_k_cross_entropy(x, y, dim=1, weight=w))
    assert torch.isnan(F.cross_entropy(x[:, 0], y, weight=w))
    assert fm.worst_of_k_cross_entropy(x, y, dim=1, weight=w, reduction="sum") == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dim", [1, 0])
def test_matches_reference(device, dtype, shape, dim):
    B, k, C = shape
    seed = hash((shape, dim, str(dtype))) % 2**31
    gen = torch.Generator().manual_seed(seed)
    x = make_logits(B, k, C, dim, dtype, device, gen)
    y = _targets(B, C, gen, device)
    w = (torch.rand(C, generator=gen) + 0.25).to(
        device=device, dtype=[torch.float32, dtype][seed % 2]
    )
    kwargs = dict(
        dim=dim,
        temperature=[0.0, 0.5][seed % 2],
        label_smoothing=[0.0, 0.1, 0.2][seed % 3],
        reduction=["mean", "sum", "none"][(seed // 3) % 3],
    )
    check_against_reference(x, y, kwargs, w)


@pytest.mark.parametrize("device", DEVICES)
def test_masked_classes(device):
    """-inf classes: finite loss and zero gradient without smoothing (a_c = 0 off target)."""
    gen = torch.Generator().manual_seed(23)
    x = torch.randn(4, 2, 6, generator=gen).to(device)
    x[:, :, 4] = float("-inf")
    x.requires_grad_(True)
    y = torch.tensor([0, 1, 2, 5], device=device)
    w = (torch.rand(6, generator=gen) + 0.5).to(device)
    loss = fm.worst_of_k_cross_entropy(x, y, dim=1, weight=w, reduction="none")
    ref = R.worst_of_k_cross_entropy(x, y, dim=1, weight=w, reduction="none")
    torch.testing.assert_close(loss, ref)
    (g,) = torch.autograd.grad(loss.sum(), x)
    assert torch.isfinite(g).all() and torch.all(g[:, :, 4] == 0)


def test_large_logits_are_exact():
    gen = torch.Generator().manual_seed(24)
    x = (torch.randn(8, 3, 33, generator=gen) * 1e4).float()
    y = torch.randint(0, 33, (8,), generator=gen)
    w = torch.rand(33, generator=gen) + 0.5
    got = fm.worst_of_k_cross_entropy(x, y, dim=1, weight=w, reduction="none")
    ref = R.worst_of_k_cross_entropy(x.double(), y, dim=1, weight=w.double(), reduction="none")
    torch.testing.assert_close(got.double(), ref, rtol=2e-6, atol=1e-3)


def test_validation_off_out_of_range_target_gives_nan_not_a_fault():
    x = torch.randn(3, 2, 4)
    y = torch.tensor([0, 9, 1])
    w = torch.rand(4) + 0.1
    fm.set_validation(False)
    loss = fm.worst_of_k_cross_entropy(x, y, dim=1, weight=w, reduction="none")
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all()
    assert torch.isnan(fm.worst_of_k_cross_entropy(x, y, dim=1, weight=w))
    fm.set_validation(True)
    with pytest.raises(IndexError, match="target"):
        fm.worst_of_k_cross_entropy(x, y, dim=1, weight=w)


# --- gradcheck, the weight-robust radius with class weights, opcheck, compile ------------------


@pytest.mark.parametrize("temperature", [0.0, 0.6])
def test_gradcheck(temperature):
    gen = torch.Generator().manual_seed(25)
    x = make_logits(4, 3, 5, 0, torch.float64, "cpu", gen)
    y = torch.tensor([0, 4, -100, 2])
    w = torch.rand(5, generator=gen, dtype=torch.float64) + 0.2
    assert torch.autograd.gradcheck(
        lambda x: fm.worst_of_k_cross_entropy(
            x, y, dim=0, temperature=temperature, label_smoothing=0.15, weight=w
        ),
        (x,),
    )


def _robust_reference(x, y, r, w, eps, tau):
    """Weight-robust rows z~ = z + r (c != y), z_y - r, then the weighted worst-of-k CE."""
    onehot = F.one_hot(y.clamp(0), x.shape[-1]).to(x.dtype)[:, None, :]
    zt = x + r[:, None, None] * (1 - 2 * onehot)
    return R.worst_of_k_cross_entropy(
        zt, y, dim=1, temperature=tau, label_smoothing=eps, weight=w, reduction="none"
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("eps, tau", [(0.0, 0.0), (0.2, 0.5)])
def test_radius_with_class_weights(device, eps, tau):
    """The op's weight-robust path also takes class weights: loss and d/dr, d/dz."""
    gen = torch.Generator().manual_seed(26)
    x = make_logits(5, 3, 7, 1, torch.float64, device, gen)
    y = torch.tensor([0, 6, 3, -100, 2], device=device)
    r = (torch.rand(5, generator=gen, dtype=torch.float64) * 0.5).to(device).requires_grad_(True)
    w = (torch.rand(7, generator=gen, dtype=torch.float64) + 0.2).to(device)
    loss = ops.worst_of_k_ce_fwd(x, y, r, tau, eps, -100, w)[0]
    ref = _robust_reference(x, y, r, w, eps, tau)
    torch.testing.assert_close(loss, ref)
    g = torch.rand(5, generator=gen, dtype=torch.float64).to(device)
    for a, b in zip(torch.autograd.grad(loss, (x, r), g), torch.autograd.grad(ref, (x, r), g)):
        torch.testing.assert_close(a, b)
    if device == "cpu":
        assert torch.autograd.gradcheck(
            lambda x, r: ops.worst_of_k_ce_fwd(x, y, r, tau, eps, -100, w)[0], (x, r)
        )


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    gen = torch.Generator().manual_seed(27)
    x = torch.randn(4, 3, 10, generator=gen).to(device).requires_grad_(True)
    y = torch.tensor([1, -100, 9, 0], device=device)
    w = (torch.rand(10, generator=gen) + 0.1).to(device)
    r = torch.rand(4, generator=gen).to(device)
    for rad, tau, eps in [(None, 0.0, 0.0), (None, 0.5, 0.1), (r, 0.0, 0.1)]:
        torch.library.opcheck(ops.worst_of_k_ce_fwd, (x, y, rad, tau, eps, -100, w))
        _loss, lse, weight, _i, _dr = ops.worst_of_k_ce_fwd(x.detach(), y, rad, tau, eps, -100, w)
        g = torch.rand(4, generator=gen).to(device)
        torch.library.opcheck(
            ops.worst_of_k_ce_bwd, (g, x.detach(), y, rad, lse, weight, eps, -100, w)
        )


def test_compile_fullgraph():
    gen = torch.Generator().manual_seed(28)
    x = make_logits(4, 3, 12, 1, torch.float32, "cpu", gen)
    y = torch.tensor([3, 0, -100, 11])
    w = torch.rand(12, generator=gen) + 0.1

    def f(x, y):
        return fm.worst_of_k_cross_entropy(x, y, dim=1, weight=w, label_smoothing=0.1)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = compiled(x, y)
    want = f(x, y)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got, x)[0], torch.autograd.grad(want, x)[0])


# --- bad inputs ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make_weight, exc, fragment",
    [
        (lambda: torch.rand(5), ValueError, "weight: expected a 1-D tensor of 6"),
        (lambda: torch.rand(6, 1), ValueError, "weight"),
        (lambda: torch.arange(6), TypeError, "weight: expected a floating dtype"),
        (lambda: [1.0] * 6, TypeError, "weight"),
        (lambda: torch.rand(6, device="meta"), RuntimeError, "weight"),
        (lambda: torch.rand(6, requires_grad=True), ValueError, "weight: gradients"),
    ],
)
@pytest.mark.parametrize("soft", [False, True])
def test_bad_weights(make_weight, exc, fragment, soft):
    gen = torch.Generator().manual_seed(29)
    x = torch.randn(4, 3, 6, generator=gen)
    target = torch.rand(4, 6, generator=gen) if soft else torch.tensor([0, 5, 1, 2])
    weight = make_weight()
    x0, t0 = x.clone(), target.clone()
    w0 = (
        weight.detach().clone()
        if isinstance(weight, torch.Tensor) and weight.device.type != "meta"
        else None
    )
    with pytest.raises(exc, match=fragment):
        fm.worst_of_k_cross_entropy(x, target, dim=1, weight=weight)
    assert torch.equal(x, x0) and torch.equal(target, t0)
    if w0 is not None:
        assert torch.equal(weight, w0)


def test_op_level_class_weight_checks():
    x = torch.randn(4, 3, 6)
    y = torch.tensor([0, 5, 1, 2])
    with pytest.raises(RuntimeError, match="class_weight: expected dtype"):
        ops.worst_of_k_ce_fwd(x, y, None, 0.0, 0.0, -100, torch.rand(6).half())
    with pytest.raises(RuntimeError, match="class_weight: expected shape"):
        ops.worst_of_k_ce_fwd(x, y, None, 0.0, 0.0, -100, torch.rand(7))
    _l, lse, weight, _i, _d = ops.worst_of_k_ce_fwd(x, y, None, 0.0, 0.0, -100)
    with pytest.raises(RuntimeError, match="class_weight: expected shape"):
        ops.worst_of_k_ce_bwd(torch.ones(4), x, y, None, lse, weight, 0.0, -100, torch.rand(5))
