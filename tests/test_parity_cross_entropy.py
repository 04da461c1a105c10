"""Drop-in parity with F.cross_entropy: without ``dim``, worst_of_k_cross_entropy takes every
shape F.cross_entropy takes ((C,), (N, C), spatial (N, C, d1, ...)) and returns PyTorch's number
and gradient; ambiguous inputs raise; PyTorch's own corner cases (probability targets with an
ignore_index, no classes) are followed."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastmargin as fm
from fastmargin import reference as R


def _assert_same(got, want, **tol):
    assert got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got, want, equal_nan=True, **tol)


def _check_values_and_grads(x, target, kw, rtol=1e-6, atol=1e-6):
    """fm (no dim) and the reference against F.cross_entropy: value and gradients into the
    logits (and into a probability target), for a non-trivial upstream gradient."""
    want = F.cross_entropy(x, target, **kw)
    got = fm.worst_of_k_cross_entropy(x, target, **kw)
    spec = R.worst_of_k_cross_entropy(x, target, **kw)
    _assert_same(got, want, rtol=rtol, atol=atol)
    _assert_same(spec, want, rtol=0, atol=0)
    inputs = [x] + ([target] if target.is_floating_point() and target.requires_grad else [])
    g_out = torch.rand_like(want) + 0.5
    have = torch.autograd.grad(got, inputs, g_out, allow_unused=True)
    expected = torch.autograd.grad(want, inputs, g_out, allow_unused=True)
    for h, w in zip(have, expected):
        _assert_same(h, w, rtol=rtol, atol=atol)


# --- PyTorch's own test inputs -----------------------------------------------------------------


def _opinfo_samples(dtype):
    """Every sample of PyTorch's OpInfo for nn.functional.cross_entropy: (N, C) and spatial
    inputs up to 5-D, index and probability targets, weight=, reduction=, ignore_index=."""
    pytest.importorskip("expecttest")
    from torch.testing._internal.common_methods_invocations import op_db

    (op,) = [o for o in op_db if o.name == "nn.functional.cross_entropy"]
    return list(op.sample_inputs("cpu", dtype, requires_grad=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_opinfo_sample_matches_cross_entropy(dtype):
    samples = _opinfo_samples(dtype)
    ranks = set()
    for s in samples:
        x, target, kw = s.input, s.args[0], dict(s.kwargs)
        if target.is_floating_point():
            target = target.detach().requires_grad_(True)
        ranks.add(x.dim())
        _check_values_and_grads(x, target, kw)
        # The per-sample loss of the same input, in F.cross_entropy's shape.
        _check_values_and_grads(x, target, {**kw, "reduction": "none"})
    assert {2, 3, 4, 5} <= ranks  # the spatial samples are among them


# --- shapes the OpInfo does not hold -----------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("soft", [False, True])
def test_batchless_logits(reduction, soft):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(7, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.rand(7, generator=gen, dtype=torch.float64) + 0.5
    if soft:
        target = torch.rand(7, generator=gen, dtype=torch.float64).softmax(0).requires_grad_()
    else:
        target = torch.tensor(4)
    for weight in (None, w):
        kw = dict(reduction=reduction, label_smoothing=0.2, weight=weight)
        _check_values_and_grads(x, target, kw)
    if not soft:  # an ignored batch-less sample: 0, and 0 / 0 for 'mean'
        _check_values_and_grads(x, torch.tensor(-100), dict(reduction=reduction))
        # PyTorch's forward also takes a (1,) class index for (C,) logits (the loss stays
        # 0-d; its backward then fails on the shapes): the same number, and the gradient of
        # the () index.
        got = fm.worst_of_k_cross_entropy(x, torch.tensor([4]), reduction=reduction)
        _assert_same(got, F.cross_entropy(x, torch.tensor([4]), reduction=reduction))
        want = F.cross_entropy(x, torch.tensor(4), reduction=reduction)
        _assert_same(torch.autograd.grad(got, x)[0], torch.autograd.grad(want, x)[0])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_spatial_probability_target_is_not_read_as_copies(reduction):
    """(N, C, d) logits with (N, C, d) probabilities are spatial, as F.cross_entropy reads
    them (read as (B, k, C) copies they give another number)."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    p = torch.rand(3, 5, 4, generator=gen, dtype=torch.float64).softmax(1)
    _check_values_and_grads(x, p, dict(reduction=reduction))
    if reduction != "none":  # (per-sample shapes differ: (3,) as copies, (3, 4) spatial)
        as_copies = fm.worst_of_k_cross_entropy(x, p, dim=1, reduction=reduction)
        assert not torch.allclose(as_copies, F.cross_entropy(x, p, reduction=reduction))


def test_3d_logits_with_one_index_per_sample_ask_for_dim():
    x = torch.randn(4, 3, 6)
    y = torch.randint(0, 6, (4,))
    for fn in (fm.worst_of_k_cross_entropy, R.worst_of_k_cross_entropy):
        with pytest.raises(ValueError, match=r"dim=0 .*dim=1|dim=0 or dim=1"):
            fn(x, y)
    with pytest.raises(ValueError, match="dim=0"):  # shared (B, C) probabilities: the same
        fm.worst_of_k_cross_entropy(x, torch.rand(4, 6).softmax(1))
    with pytest.raises(ValueError, match="dim="):
        fm.WorstOfKCrossEntropy()(x, y)
    # Naming the dim reads the copies (k == B: the layouts give different numbers).
    square = torch.randn(4, 4, 6)
    a = fm.worst_of_k_cross_entropy(square, y, dim=0)
    b = fm.worst_of_k_cross_entropy(square, y, dim=1)
    torch.testing.assert_close(a, R.worst_of_k_cross_entropy(square, y, dim=0))
    torch.testing.assert_close(b, R.worst_of_k_cross_entropy(square, y, dim=1))
    assert not torch.allclose(a, b)


@pytest.mark.parametrize(
    "logits_shape, target_shape",
    [((5, 4), (5, 1)), ((5, 4), (4,)), ((2, 4, 3), (2, 4)), ((2, 4, 3, 5), (2, 3)), ((4,), (2,))],
)
def test_wrong_target_shapes_name_the_expected_shape(logits_shape, target_shape):
    x = torch.randn(logits_shape)
    y = torch.zeros(target_shape, dtype=torch.long)
    with pytest.raises((RuntimeError, ValueError)):
        F.cross_entropy(x, y)  # PyTorch refuses them too
    with pytest.raises(ValueError, match="target: .*expects class indices of shape"):
        fm.worst_of_k_cross_entropy(x, y)


@pytest.mark.parametrize("shape", [(6,), (4, 6), (2, 6, 3), (2, 6, 3, 2)])
def test_return_index_is_zeros_shaped_like_the_loss(shape):
    x = torch.randn(shape)
    samples = list(shape)
    del samples[min(1, len(shape) - 1)]
    y = torch.randint(0, 6, samples)
    loss, index = fm.worst_of_k_cross_entropy(x, y, reduction="none", return_index=True)
    assert index.dtype == torch.long and index.shape == loss.shape == tuple(samples)
    assert (index == 0).all()
    _loss, ref_index = R.worst_of_k_cross_entropy(x, y, reduction="none", return_index=True)
    assert torch.equal(index, ref_index)
    scalar, index = fm.worst_of_k_cross_entropy(x, y, return_index=True)
    assert scalar.dim() == 0 and index.shape == tuple(samples)


def test_empty_batches_and_spatial_dims():
    for shape, tshape in [((0, 5), (0,)), ((0, 5, 3), (0, 3)), ((2, 5, 0), (2, 0))]:
        x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        y = torch.zeros(tshape, dtype=torch.long)
        for reduction in ("mean", "sum", "none"):
            _check_values_and_grads(x, y, dict(reduction=reduction))


# --- random shapes and strides -----------------------------------------------------------------


def _strided(t: torch.Tensor, how: str) -> torch.Tensor:
    """The same values in another memory layout: class-last (channels-last-like), every
    other element of a larger buffer, or as given."""
    if how == "class_last" and t.dim() >= 2:
        return t.movedim(1, -1).contiguous().movedim(-1, 1)
    if how == "gapped":
        big = torch.zeros([2 * n for n in t.shape], dtype=t.dtype)
        view = big[tuple(slice(None, None, 2) for _ in t.shape)]
        view.copy_(t)
        return view
    return t


@st.composite
def _ce_inputs(draw):
    batchless = draw(st.booleans()) and draw(st.booleans())
    C = draw(st.sampled_from([1, 2, 3, 5, 9]))
    spatial = [] if batchless else draw(st.lists(st.integers(1, 3), max_size=3))
    N = draw(st.integers(1, 4))
    shape = [C] if batchless else [N, C, *spatial]
    soft = draw(st.booleans())
    kw = dict(
        reduction=draw(st.sampled_from(["mean", "sum", "none"])),
        label_smoothing=draw(st.sampled_from([0.0, 0.15])),
    )
    if draw(st.booleans()):
        kw["weight"] = torch.rand(C, dtype=torch.float64) + 0.25
    seed = draw(st.integers(0, 2**16))
    layout = draw(st.sampled_from(["contiguous", "class_last", "gapped"]))
    ignore = draw(st.booleans()) and not soft
    return shape, soft, kw, seed, layout, ignore


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_ce_inputs())
def test_random_shapes_and_strides_match_cross_entropy(case):
    shape, soft, kw, seed, layout, ignore = case
    gen = torch.Generator().manual_seed(seed)
    x = _strided(torch.randn(shape, generator=gen, dtype=torch.float64), layout)
    x.requires_grad_(True)
    C = shape[0] if len(shape) == 1 else shape[1]
    if soft:
        p = torch.rand(shape, generator=gen, dtype=torch.float64)
        target = _strided(p.softmax(0 if len(shape) == 1 else 1), layout).requires_grad_(True)
    else:
        samples = [] if len(shape) == 1 else [shape[0], *shape[2:]]
        target = torch.randint(0, C, samples, generator=gen)
        if ignore:
            kw["ignore_index"] = 1
    _check_values_and_grads(x, target, kw)


# --- PyTorch's corner cases --------------------------------------------------------------------


@pytest.mark.parametrize("dim", [None, 1])
def test_probability_targets_refuse_an_ignore_index_like_pytorch(dim):
    x = torch.randn(3, 1, 4) if dim == 1 else torch.randn(3, 4)
    p = torch.rand(3, 4).softmax(1)
    with pytest.raises(RuntimeError, match="ignore_index is not supported for floating"):
        F.cross_entropy(torch.randn(3, 4), p, ignore_index=0)
    with pytest.raises(RuntimeError, match="ignore_index: not supported for floating"):
        fm.worst_of_k_cross_entropy(x, p, dim=dim, ignore_index=0)
    # A negative one can never name a class: PyTorch accepts it, and so do we.
    torch.testing.assert_close(
        fm.worst_of_k_cross_entropy(x, p, dim=dim, ignore_index=-1),
        F.cross_entropy(x.reshape(3, 4), p, ignore_index=-1),
    )


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_no_classes_follow_pytorch(reduction):
    for x_shape, target in [
        ((3, 0), torch.full((3,), -100)),  # ignored class indices
        ((3, 0), torch.zeros(3, 0)),  # probabilities
        ((0, 0), torch.zeros(0, dtype=torch.long)),
        ((2, 0, 3), torch.zeros(2, 0, 3)),
    ]:
        x = torch.zeros(x_shape, requires_grad=True)
        want = F.cross_entropy(x, target, reduction=reduction)
        got = fm.worst_of_k_cross_entropy(x, target, reduction=reduction)
        _assert_same(got, want)
        (g,) = torch.autograd.grad(got.sum(), x, allow_unused=True)
        assert g is None or g.shape == x.shape
    # A class index with no classes is out of range, as in F.cross_entropy.
    with pytest.raises(IndexError):
        F.cross_entropy(torch.zeros(3, 0), torch.zeros(3, dtype=torch.long))
    with pytest.raises(IndexError, match="out of range for 0 classes"):
        fm.worst_of_k_cross_entropy(torch.zeros(3, 0), torch.zeros(3, dtype=torch.long))
    # With copies named, the worst of k empty rows is 0 as well.
    copies = fm.worst_of_k_cross_entropy(
        torch.zeros(2, 3, 0), torch.full((3,), -100), dim=0, reduction="sum"
    )
    assert copies == 0


def test_compiled_call_without_dim_matches_cross_entropy():
    x = torch.randn(2, 5, 3, 4, requires_grad=True)
    y = torch.randint(0, 5, (2, 3, 4))
    fn = torch.compile(lambda z, t: fm.worst_of_k_cross_entropy(z, t), fullgraph=True)
    got = fn(x, y)
    want = F.cross_entropy(x, y)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got, x)[0], torch.autograd.grad(want, x)[0])


def test_spatial_mean_with_weights_and_ignore_divides_like_pytorch():
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(2, 4, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 4, (2, 3, 3), generator=gen)
    y[0, 0] = -7
    w = torch.tensor([0.5, 2.0, 1.0, 3.0], dtype=torch.float64)
    kw = dict(weight=w, ignore_index=-7, label_smoothing=0.1)
    _check_values_and_grads(x, y, kw)
    assert math.isfinite(float(fm.worst_of_k_cross_entropy(x.detach(), y, **kw)))
