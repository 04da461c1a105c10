"""Probability (soft) targets for worst_of_k_cross_entropy: F.cross_entropy's semantics, one
row per sample shared by the copies or one row per copy in the logits' layout."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _weighted_ce_common import (
    DEVICES,
    DTYPES,
    check_against_reference,
    make_logits,
    make_probs,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastmargin as fm
from fastmargin import reference as R
from fastmargin._ops import ops

# (B, k, C): C not a multiple of 8, C = 1 and 2, a batch of 1, rows longer than a vector.
SHAPES = [(4, 3, 5), (1, 2, 7), (3, 1, 1), (5, 2, 2), (2, 4, 37), (3, 2, 130)]


# --- agreement with PyTorch's own test inputs -------------------------------------------------


def _opinfo_2d_samples(dtype):
    """The samples of PyTorch's OpInfo for nn.functional.cross_entropy that fit the (N, C)
    case (index and probability targets, weight=, reduction=, ignore_index=,
    label_smoothing=)."""
    pytest.importorskip("expecttest")
    from torch.testing._internal.common_methods_invocations import op_db

    (op,) = [o for o in op_db if o.name == "nn.functional.cross_entropy"]
    samples = [
        s
        for s in op.sample_inputs("cpu", dtype, requires_grad=True)
        if s.input.dim() == 2 and s.args[0].dim() in (1, 2)
    ]
    assert len(samples) >= 10  # the OpInfo still provides what this test is about
    return samples


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("dim", [0, 1])
def test_k1_matches_cross_entropy_on_opinfo_samples(dtype, dim):
    kinds = set()
    for s in _opinfo_2d_samples(dtype):
        x, target = s.input, s.args[0]
        kw = dict(s.kwargs)
        kinds.add((target.is_floating_point(), "weight" in kw))
        soft = target.is_floating_point()
        if soft:
            target = target.detach().requires_grad_(True)
        expected = F.cross_entropy(x, target, **kw)
        logits3 = x.unsqueeze(dim)  # k = 1 copy, in either layout
        got = fm.worst_of_k_cross_entropy(logits3, target, dim=dim, **kw)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
        inputs = [x, target] if soft else [x]
        g_out = torch.rand_like(expected) + 0.5
        want = torch.autograd.grad(expected, inputs, g_out)
        have = torch.autograd.grad(got, inputs, g_out)
        for h, w in zip(have, want):
            torch.testing.assert_close(h, w, rtol=1e-6, atol=1e-6)
    # Index and probability targets, each with and without class weights, were covered.
    assert kinds == {(False, False), (False, True), (True, False), (True, True)}


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.3])
def test_k1_matches_cross_entropy_probabilities(reduction, label_smoothing):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 9, generator=gen, dtype=torch.float64, requires_grad=True)
    p = torch.rand(6, 9, generator=gen, dtype=torch.float64)  # not normalised: used as given
    w = torch.rand(9, generator=gen, dtype=torch.float64) + 0.2
    for weight in (None, w):
        kw = dict(reduction=reduction, label_smoothing=label_smoothing, weight=weight)
        expected = F.cross_entropy(x, p, **kw)
        got = fm.worst_of_k_cross_entropy(x[:, None], p, dim=1, **kw)
        torch.testing.assert_close(got, expected)
        g = torch.rand_like(expected)
        torch.testing.assert_close(
            torch.autograd.grad(got, x, g)[0], torch.autograd.grad(expected, x, g)[0]
        )


def test_mean_divides_by_batch_size():
    """PyTorch's 'mean' for probability targets divides by B, not by a sum of weights."""
    gen = torch.Generator().manual_seed(2)
    x = make_logits(5, 3, 4, 1, torch.float64, "cpu", gen)
    p = make_probs((5, 4), torch.float64, "cpu", gen)
    w = torch.tensor([0.5, 2.0, 1.0, 3.0], dtype=torch.float64)
    per_sample = fm.worst_of_k_cross_entropy(x, p, dim=1, weight=w, reduction="none")
    mean = fm.worst_of_k_cross_entropy(x, p, dim=1, weight=w, reduction="mean")
    torch.testing.assert_close(mean, per_sample.sum() / 5)


# --- random inputs against the reference ------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dim", [1, 0])
@pytest.mark.parametrize("per_copy", [False, True])
def test_matches_reference(device, dtype, shape, dim, per_copy):
    B, k, C = shape
    seed = hash((shape, dim, per_copy, str(dtype))) % 2**31
    gen = torch.Generator().manual_seed(seed)
    x = make_logits(B, k, C, dim, dtype, device, gen)
    tshape = ((k, B, C) if dim == 0 else (B, k, C)) if per_copy else (B, C)
    # low-precision logits take float32 targets as well as their own dtype
    tdtype = torch.float32 if (dtype in (torch.float16, torch.bfloat16) and seed % 2) else dtype
    target = make_probs(tshape, tdtype, device, gen).requires_grad_(True)
    weight = torch.rand(C, generator=gen).to(device) + 0.25 if seed % 3 else None
    kwargs = dict(
        dim=dim,
        temperature=[0.0, 0.5][seed % 2],
        label_smoothing=[0.0, 0.1, 0.0][seed % 3],
        reduction=["mean", "sum", "none"][seed % 3],
    )
    check_against_reference(x, target, kwargs, weight)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_hard_and_smooth_max_pick_the_weighted_worst_copy(device, temperature):
    """Per-copy targets change which copy is the worst; the reduction sees the soft loss."""
    gen = torch.Generator().manual_seed(3)
    x = make_logits(6, 4, 10, 0, torch.float32, device, gen)
    t = make_probs((4, 6, 10), torch.float32, device, gen)
    w = torch.rand(10, generator=gen).to(device) + 0.1
    check_against_reference(x, t, dict(dim=0, temperature=temperature, reduction="none"), w)


@pytest.mark.parametrize("device", DEVICES)
def test_strided_targets_and_logits(device):
    """Targets and logits that are views with odd strides (class dim contiguous) are read in
    place; a target with a strided class dim is copied."""
    gen = torch.Generator().manual_seed(4)
    big = torch.randn(5, 7, 23, generator=gen).to(device)
    x = big[:, 1:6:2, 3:20].detach().requires_grad_(True)  # (5, 3, 17)
    tbig = make_probs((5, 9, 40), torch.float32, device, gen)
    t_rows = tbig[:, 2:8:2, 5:22]  # (5, 3, 17), row stride 40
    t_shared = tbig[:, 4, 1:18]  # (5, 17)
    t_strided = make_probs((5, 17, 3), torch.float32, device, gen).transpose(1, 2)
    for t in (t_rows, t_shared, t_strided):
        check_against_reference(x, t, dict(temperature=0.3, label_smoothing=0.05))


def test_masked_classes_with_zero_target_mass_are_finite():
    """A class masked with -inf that has no target mass is skipped: the loss equals the loss
    without that class, and its gradient is 0 (F.cross_entropy gives NaN here)."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(4, 2, 6, generator=gen)
    x[:, :, 2] = float("-inf")
    p = make_probs((4, 6), torch.float32, "cpu", gen)
    p[:, 2] = 0
    w = torch.rand(6, generator=gen) + 0.5
    keep = [0, 1, 3, 4, 5]
    x.requires_grad_(True)
    loss = fm.worst_of_k_cross_entropy(x, p, dim=1, weight=w, reduction="none")
    expected = R.worst_of_k_cross_entropy(
        x[:, :, keep], p[:, keep], dim=1, weight=w[keep], reduction="none"
    )
    torch.testing.assert_close(loss, expected)
    (g,) = torch.autograd.grad(loss.sum(), x)
    assert torch.all(g[:, :, 2] == 0) and torch.isfinite(g).all()
    # With target mass on the masked class the loss is +inf, as -log(0) is.
    p[0, 2] = 0.5
    assert fm.worst_of_k_cross_entropy(x.detach(), p, dim=1, reduction="none")[0] == float("inf")


def test_large_logits_are_exact():
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(8, 3, 33, generator=gen, dtype=torch.float64) * 1e4
    p = make_probs((8, 3, 33), torch.float64, "cpu", gen)
    got = fm.worst_of_k_cross_entropy(
        x.float(), p.float(), dim=1, reduction="none", label_smoothing=0.1
    )
    ref = R.worst_of_k_cross_entropy(
        x.float().double(), p.float().double(), dim=1, reduction="none", label_smoothing=0.1
    )
    torch.testing.assert_close(got.double(), ref, rtol=2e-6, atol=0)


def test_nan_in_a_row_propagates_to_its_sample():
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(3, 2, 5, generator=gen)
    x[1, 1, 3] = float("nan")
    p = make_probs((3, 5), torch.float32, "cpu", gen)
    loss = fm.worst_of_k_cross_entropy(x, p, dim=1, reduction="none")
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all()


def test_empty_batch():
    x = torch.randn(0, 3, 4, requires_grad=True)
    p = torch.rand(0, 4)
    assert torch.isnan(fm.worst_of_k_cross_entropy(x, p, dim=1))  # as F.cross_entropy: 0 / 0
    assert fm.worst_of_k_cross_entropy(x, p, dim=1, reduction="sum") == 0
    loss = fm.worst_of_k_cross_entropy(x, p, dim=1, reduction="none")
    assert loss.shape == (0,)
    (g,) = torch.autograd.grad(loss.sum(), x)
    assert g.shape == x.shape


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    B=st.integers(1, 5),
    k=st.integers(1, 4),
    C=st.sampled_from([1, 2, 3, 8, 17, 4097]),
    dim=st.sampled_from([0, 1]),
    per_copy=st.booleans(),
    step=st.integers(1, 2),
    dtype=st.sampled_from(DTYPES),
    weighted=st.booleans(),
    temperature=st.sampled_from([0.0, 0.5]),
    label_smoothing=st.sampled_from([0.0, 0.1]),
    seed=st.integers(0, 2**16),
)
def test_property_shapes_strides_dtypes(
    B, k, C, dim, per_copy, step, dtype, weighted, temperature, label_smoothing, seed
):
    """Random shapes, both layouts, sample-strided views of logits and targets, every dtype."""
    gen = torch.Generator().manual_seed(seed)
    x = make_logits(B * step, k, C, dim, dtype, "cpu", gen).detach()
    x = (x[::step] if dim == 1 else x[:, ::step]).requires_grad_(True)
    tshape = ((k, B * step, C) if dim == 0 else (B * step, k, C)) if per_copy else (B * step, C)
    t = make_probs(tshape, dtype, "cpu", gen)
    t = t[:, ::step] if (per_copy and dim == 0) else t[::step]
    w = torch.rand(C, generator=gen) + 0.1 if weighted else None
    kwargs = dict(dim=dim, temperature=temperature, label_smoothing=label_smoothing)
    check_against_reference(x, t.requires_grad_(True), kwargs, w)


# --- gradcheck, opcheck, compile ---------------------------------------------------------------


@pytest.mark.parametrize("per_copy", [False, True])
@pytest.mark.parametrize("dim", [1, 0])
def test_gradcheck(per_copy, dim):
    gen = torch.Generator().manual_seed(8)
    B, k, C = 3, 2, 5
    x = make_logits(B, k, C, dim, torch.float64, "cpu", gen)
    tshape = ((k, B, C) if dim == 0 else (B, k, C)) if per_copy else (B, C)
    p = make_probs(tshape, torch.float64, "cpu", gen).requires_grad_(True)
    w = torch.rand(C, generator=gen, dtype=torch.float64) + 0.2

    def f(x, p):
        return fm.worst_of_k_cross_entropy(
            x, p, dim=dim, temperature=0.4, label_smoothing=0.1, weight=w, reduction="none"
        )

    assert torch.autograd.gradcheck(f, (x, p))
    # the hard max (distinct losses: differentiable away from ties)
    assert torch.autograd.gradcheck(
        lambda x, p: fm.worst_of_k_cross_entropy(x, p, dim=dim, reduction="sum"), (x, p)
    )


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(4, 3, 10, generator=gen).to(device).requires_grad_(True)
    shared = make_probs((4, 10), torch.float32, device, gen)
    per_copy = make_probs((4, 3, 10), torch.float32, device, gen)
    w = (torch.rand(10, generator=gen) + 0.1).to(device)
    for t, cw, tau, eps in [
        (shared, None, 0.0, 0.0),
        (per_copy, w, 0.5, 0.1),
        (shared, w, 0.0, 0.2),
    ]:
        torch.library.opcheck(ops.worst_of_k_ce_fwd, (x, t, None, tau, eps, -100, cw))
        _loss, lse, weight, _i, _dr = ops.worst_of_k_ce_fwd(x.detach(), t, None, tau, eps, -100, cw)
        g = torch.rand(4, generator=gen).to(device)
        torch.library.opcheck(
            ops.worst_of_k_ce_bwd, (g, x.detach(), t, None, lse, weight, eps, -100, cw)
        )
    xh = x.detach().half()
    torch.library.opcheck(ops.worst_of_k_ce_fwd, (xh, per_copy, None, 0.0, 0.0, -100, w))


def test_compile_fullgraph():
    gen = torch.Generator().manual_seed(10)
    x = make_logits(4, 3, 12, 0, torch.float32, "cpu", gen)
    p = make_probs((3, 4, 12), torch.float32, "cpu", gen)
    w = torch.rand(12, generator=gen) + 0.1

    def f(x, p):
        return fm.worst_of_k_cross_entropy(
            x, p, dim=0, temperature=0.2, weight=w, label_smoothing=0.1
        )

    compiled = torch.compile(f, fullgraph=True)
    got = compiled(x, p)
    want = f(x, p)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got, x)[0], torch.autograd.grad(want, x)[0])


# --- bad inputs ---------------------------------------------------------------------------------


def _inputs():
    gen = torch.Generator().manual_seed(11)
    return torch.randn(4, 3, 6, generator=gen), make_probs((4, 6), torch.float32, "cpu", gen)


@pytest.mark.parametrize(
    "make_target, exc, fragment",
    [
        (lambda: torch.rand(5, 6), ValueError, "target"),  # wrong B
        (lambda: torch.rand(4, 7), ValueError, "target"),  # wrong C
        (lambda: torch.rand(4, 2, 6), ValueError, "target"),  # wrong k
        (lambda: torch.rand(3, 4, 6), ValueError, "(4, 3, 6)"),  # (k, B, C) with dim=1
        (lambda: torch.rand(4, 3, 6, 1), ValueError, "target"),  # 4-D
        (lambda: torch.rand(4), TypeError, "target: expected an integer"),  # float indices
        (lambda: torch.rand(4, 6, dtype=torch.complex64), TypeError, "target"),
        (lambda: torch.rand(4, 6, device="meta"), RuntimeError, "target"),
    ],
)
def test_bad_targets(make_target, exc, fragment):
    x, _ = _inputs()
    target = make_target()
    x0 = x.clone()
    t0 = target.clone() if target.device.type != "meta" else None
    with pytest.raises(exc, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        fm.worst_of_k_cross_entropy(x, target, dim=1)
    assert torch.equal(x, x0)
    if t0 is not None:
        assert torch.equal(target, t0)


def test_op_level_checks_name_the_argument():
    x, p = _inputs()
    x0, p0 = x.clone(), p.clone()
    with pytest.raises(RuntimeError, match="target: probability targets must have the logits"):
        ops.worst_of_k_ce_fwd(x, p.double(), None, 0.0, 0.0, -100)
    with pytest.raises(RuntimeError, match="radius"):
        ops.worst_of_k_ce_fwd(x, p, torch.zeros(4), 0.0, 0.0, -100)
    with pytest.raises(RuntimeError, match="target: expected probabilities of shape"):
        ops.worst_of_k_ce_fwd(x, p[:3], None, 0.0, 0.0, -100)
    with pytest.raises(RuntimeError, match="class dim must be contiguous"):
        ops.worst_of_k_ce_fwd(x, torch.rand(6, 4).t(), None, 0.0, 0.0, -100)
    assert torch.equal(x, x0) and torch.equal(p, p0)


def test_target_dtypes_are_converted_or_kept():
    """float32 targets serve half logits as they are; other floating dtypes are converted."""
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(4, 2, 6, generator=gen)
    p = make_probs((4, 6), torch.float64, "cpu", gen)
    ref = R.worst_of_k_cross_entropy(x.double(), p, dim=1, reduction="none")
    for t in (p, p.float(), p.half()):
        got = fm.worst_of_k_cross_entropy(x, t, dim=1, reduction="none")
        torch.testing.assert_close(got.double(), ref, rtol=2e-3, atol=2e-3)


# --- GPU-only checks ----------------------------------------------------------------------------


@pytest.mark.cuda
def test_cuda_repeatable_on_a_side_stream_and_in_a_cuda_graph():
    gen = torch.Generator().manual_seed(13)
    x = torch.randn(64, 4, 1000, generator=gen).cuda().bfloat16()
    p = make_probs((64, 4, 1000), torch.float32, "cuda", gen)
    w = (torch.rand(1000, generator=gen) + 0.1).cuda()
    args = (x, p, None, 0.3, 0.1, -100, w)
    first = ops.worst_of_k_ce_fwd(*args)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        second = ops.worst_of_k_ce_fwd(*args)
    stream.synchronize()
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    _loss, lse, weight, _i, _dr = first
    g = torch.rand(64, device="cuda")
    grads = [ops.worst_of_k_ce_bwd(g, x, p, None, lse, weight, 0.1, -100, w) for _ in range(2)]
    assert torch.equal(grads[0], grads[1])

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):  # warm up outside the capture
        ops.worst_of_k_ce_fwd(*args)
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        captured = ops.worst_of_k_ce_fwd(*args)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured[0], first[0])


@pytest.mark.cuda
def test_cuda_more_than_2_31_logits_elements():
    """int64 offsets: a bf16 (B, k, C) batch with B*k*C > 2^31, per-copy soft targets."""
    B, k, C = 16385, 4, 32768  # 2^31 + 2^17 elements, 4.3 GB of logits
    free, _total = torch.cuda.mem_get_info()
    if free < 16 * 2**30:
        pytest.skip("needs about 16 GiB of free GPU memory")
    x = torch.randn(B, k, C, device="cuda", dtype=torch.bfloat16).requires_grad_(True)
    t = torch.rand(B, C, device="cuda", dtype=torch.bfloat16)  # shared rows, used as given
    loss = fm.worst_of_k_cross_entropy(x, t, dim=1, reduction="none", temperature=0.5)
    (g,) = torch.autograd.grad(loss.sum(), x)
    last = x[-2:].detach().float().requires_grad_(True)
    ref = R.worst_of_k_cross_entropy(last, t[-2:].float(), dim=1, reduction="none", temperature=0.5)
    (ref_g,) = torch.autograd.grad(ref.sum(), last)
    torch.testing.assert_close(loss[-2:].float(), ref, rtol=1.6e-2, atol=1e-2)
    torch.testing.assert_close(g[-2:].float(), ref_g, rtol=1.6e-2, atol=1e-2)
