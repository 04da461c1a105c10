"""worst_of_k_cross_entropy against the plain-PyTorch reference: values, gradients, numerics.

The device-independent checks are written once (``check_*``) and run on the CPU here and on
the GPU in the CUDA section at the bottom.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastmargin as fm
from fastmargin import reference as ref

HALF_DTYPES = (torch.float16, torch.bfloat16)
ALL_DTYPES = (torch.float32, torch.float64, *HALF_DTYPES)


def tolerances(dtype: torch.dtype) -> dict:
    """Loss/grad tolerances: half inputs are compared with an fp32 reference on the same
    rounded inputs, so only the final rounding of the gradient to half precision differs."""
    if dtype == torch.float64:
        return {"atol": 1e-10, "rtol": 1e-9}
    if dtype == torch.float32:
        return {"atol": 2e-5, "rtol": 2e-5}
    if dtype == torch.float16:
        return {"atol": 2e-3, "rtol": 2e-3}
    return {"atol": 1.6e-2, "rtol": 1.6e-2}  # bfloat16: 8 mantissa bits


def make_case(B, k, C, *, dim=1, dtype=torch.float32, device="cpu", ignore_frac=0.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shape = (B, k, C) if dim == 1 else (k, B, C)
    logits = (3 * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype).to(device)
    target = torch.randint(0, C, (B,), generator=gen)
    if ignore_frac > 0:
        target[torch.rand(B, generator=gen) < ignore_frac] = -100
    return logits, target.to(device)


def run_both(logits, target, **kw):
    """(loss, index, grad) from fastmargin and from the reference (in fp32 for half inputs)."""
    kw = {"dim": 1, **kw}  # (B, k, C) unless the caller names the layout
    ref_in = logits.detach().to(torch.float64 if logits.dtype == torch.float64 else torch.float32)
    ref_in.requires_grad_(True)
    x = logits.detach().clone().requires_grad_(True)
    loss, idx = fm.worst_of_k_cross_entropy(x, target, return_index=True, **kw)
    ref_loss, ref_idx = ref.worst_of_k_cross_entropy(ref_in, target, return_index=True, **kw)
    weight = torch.randn_like(ref_loss) if loss.dim() else torch.tensor(1.7).to(ref_loss)
    (loss.to(ref_loss.dtype) * weight).sum().backward()
    (ref_loss * weight).sum().backward()
    return (loss, idx, x.grad), (ref_loss, ref_idx, ref_in.grad)


def check_against_reference(logits, target, **kw):
    (loss, idx, grad), (ref_loss, ref_idx, ref_grad) = run_both(logits, target, **kw)
    tol = tolerances(logits.dtype)
    assert loss.dtype == logits.dtype
    assert grad.dtype == logits.dtype and grad.shape == logits.shape
    torch.testing.assert_close(loss.to(ref_loss.dtype), ref_loss, **tol)
    torch.testing.assert_close(grad.to(ref_grad.dtype), ref_grad, **tol)
    # The chosen copy is a worst one (copies within rounding of each other may differ from
    # the reference's pick; exact ties are tested separately).
    per_copy = ref.cross_entropy_per_copy(
        logits.detach().double(),
        target,
        dim=kw.get("dim", 1),
        label_smoothing=kw.get("label_smoothing", 0.0),
        ignore_index=kw.get("ignore_index", -100),
    )
    chosen = per_copy.gather(1, idx.to(per_copy.device)[:, None])[:, 0]
    torch.testing.assert_close(chosen, per_copy.max(dim=1).values, **tol)
    assert ref_idx.shape == idx.shape


SHAPES = [(1, 1, 1), (1, 3, 2), (5, 4, 7), (8, 3, 33), (6, 2, 130), (3, 4, 1031)]


@pytest.mark.parametrize("B,k,C", SHAPES)
@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_matches_reference_fp32(B, k, C, dim, temperature):
    logits, target = make_case(B, k, C, dim=dim, seed=B * 100 + C)
    check_against_reference(logits, target, dim=dim, temperature=temperature)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.15])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_reference_dtypes_smoothing_reductions(dtype, label_smoothing, reduction):
    logits, target = make_case(9, 3, 45, dtype=dtype, ignore_frac=0.3, seed=3)
    check_against_reference(
        logits, target, label_smoothing=label_smoothing, reduction=reduction, temperature=0.0
    )
    check_against_reference(
        logits, target, label_smoothing=label_smoothing, reduction=reduction, temperature=2.0
    )


@pytest.mark.parametrize("ignore_index", [-100, 0, 3])
def test_ignore_index(ignore_index):
    logits, target = make_case(12, 3, 6, seed=7)
    target[::3] = ignore_index
    check_against_reference(logits, target, ignore_index=ignore_index)
    x = logits.clone().requires_grad_(True)
    per = fm.worst_of_k_cross_entropy(x, target, dim=1, ignore_index=ignore_index, reduction="none")
    per.sum().backward()
    ignored = target == ignore_index
    assert torch.all(per[ignored] == 0)
    assert torch.all(x.grad[ignored] == 0)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_k1_equals_cross_entropy(reduction, label_smoothing):
    logits, target = make_case(16, 1, 11, seed=5, ignore_frac=0.2)
    x1 = logits.clone().requires_grad_(True)
    x2 = logits[:, 0].clone().requires_grad_(True)
    ours = fm.worst_of_k_cross_entropy(
        x1, target, dim=1, reduction=reduction, label_smoothing=label_smoothing
    )
    theirs = F.cross_entropy(x2, target, reduction=reduction, label_smoothing=label_smoothing)
    torch.testing.assert_close(ours, theirs)
    ours.sum().backward()
    theirs.sum().backward()
    torch.testing.assert_close(x1.grad[:, 0], x2.grad)


def test_ties_go_to_lowest_copy_and_gradient_only_there():
    logits, target = make_case(4, 1, 9, seed=11)
    x = logits.expand(4, 5, 9).clone().requires_grad_(True)  # five identical copies
    loss, idx = fm.worst_of_k_cross_entropy(x, target, dim=1, return_index=True)
    loss.backward()
    assert torch.equal(idx, torch.zeros(4, dtype=torch.long))
    assert torch.any(x.grad[:, 0] != 0)
    assert torch.all(x.grad[:, 1:] == 0)


def test_hard_max_selects_worst_copy():
    logits, target = make_case(6, 4, 10, seed=2)
    per_copy = ref.cross_entropy_per_copy(logits, target)
    _, idx = fm.worst_of_k_cross_entropy(logits, target, dim=1, return_index=True)
    assert torch.equal(idx, per_copy.argmax(dim=1))


def test_smooth_max_tends_to_hard_max_and_mean():
    logits, target = make_case(6, 4, 10, seed=4)
    per_copy = ref.cross_entropy_per_copy(logits, target)
    cold = fm.worst_of_k_cross_entropy(logits, target, dim=1, temperature=1e-3, reduction="none")
    hot = fm.worst_of_k_cross_entropy(logits, target, dim=1, temperature=1e4, reduction="none")
    torch.testing.assert_close(cold, per_copy.max(dim=1).values, atol=5e-3, rtol=0)
    torch.testing.assert_close(hot, per_copy.mean(dim=1), atol=1e-3, rtol=1e-3)


def test_masked_classes_finite_loss_zero_grad():
    logits, target = make_case(5, 3, 8, seed=9)
    mask = torch.zeros(8, dtype=torch.bool)
    mask[[1, 4]] = True
    target[target == 1] = 0
    target[target == 4] = 2
    x = logits.masked_fill(mask, float("-inf")).requires_grad_(True)
    loss = fm.worst_of_k_cross_entropy(x, target, dim=1)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.all(x.grad[..., mask] == 0)
    torch.testing.assert_close(loss, ref.worst_of_k_cross_entropy(x.detach(), target, dim=1))


def test_nan_propagates_to_its_row_only():
    logits, target = make_case(4, 3, 6, seed=1)
    logits[2, 1, 3] = float("nan")
    x = logits.clone().requires_grad_(True)
    per = fm.worst_of_k_cross_entropy(x, target, dim=1, reduction="none")
    per.sum().backward()
    assert torch.isnan(per[2]) and torch.all(torch.isfinite(per[[0, 1, 3]]))
    assert torch.all(torch.isfinite(x.grad[[0, 1, 3]]))
    assert torch.isnan(x.grad[2, 1]).all()


def test_large_logits_exact_in_fp32():
    logits, target = make_case(8, 3, 17, seed=6)
    logits = logits * 1e4 / logits.abs().max()
    check_against_reference(logits, target)
    check_against_reference(logits, target, temperature=50.0, label_smoothing=0.1)
    check_against_reference(logits.double(), target, temperature=50.0)


def test_empty_batch_matches_cross_entropy():
    logits = torch.randn(0, 3, 5, requires_grad=True)
    target = torch.zeros(0, dtype=torch.long)
    for reduction in ("mean", "sum", "none"):
        ours = fm.worst_of_k_cross_entropy(logits, target, dim=1, reduction=reduction)
        theirs = F.cross_entropy(logits[:, 0], target, reduction=reduction)
        torch.testing.assert_close(ours, theirs, equal_nan=True)
    fm.worst_of_k_cross_entropy(logits, target, dim=1, reduction="sum").backward()
    assert logits.grad.shape == logits.shape


def test_all_ignored_mean_is_nan_like_cross_entropy():
    logits, target = make_case(3, 2, 4)
    target[:] = -100
    ours = fm.worst_of_k_cross_entropy(logits, target, dim=1)
    theirs = F.cross_entropy(logits[:, 0], target)
    assert torch.isnan(ours) and torch.isnan(theirs)


def test_copy_major_layout_is_not_copied_and_matches_sample_major():
    """dim=0 reads the (k, B, C) tensor in place; the gradient keeps its layout."""
    logits, target = make_case(6, 4, 12, dim=0, seed=8)
    x0 = logits.clone().requires_grad_(True)
    x1 = logits.transpose(0, 1).contiguous().requires_grad_(True)
    l0, i0 = fm.worst_of_k_cross_entropy(x0, target, dim=0, return_index=True)
    l1, i1 = fm.worst_of_k_cross_entropy(x1, target, dim=1, return_index=True)
    torch.testing.assert_close(l0, l1)
    assert torch.equal(i0, i1)
    l0.backward()
    l1.backward()
    assert x0.grad.is_contiguous()
    torch.testing.assert_close(x0.grad, x1.grad.transpose(0, 1))


def test_strided_views_match_reference():
    base, target = make_case(10, 6, 40, seed=12)
    view = base[::2, 1::2, 3:35]  # every stride non-trivial, class dim still stride 1
    check_against_reference(view, target[::2], temperature=0.3)
    noncontig_class = base.transpose(1, 2)[:, :6, :6]  # class dim strided: copied once
    check_against_reference(noncontig_class, target.clamp(max=5))


def test_invalid_target_without_validation_is_nan_not_a_crash():
    logits, target = make_case(4, 2, 5)
    target[1] = 17
    target[2] = -3
    fm.set_validation(False)
    x = logits.clone().requires_grad_(True)
    per = fm.worst_of_k_cross_entropy(x, target, dim=1, reduction="none")
    per.sum().backward()
    assert torch.isnan(per[1]) and torch.isnan(per[2])
    assert torch.isfinite(per[0]) and torch.isfinite(per[3])
    assert torch.isnan(x.grad[1]).all() and torch.isfinite(x.grad[0]).all()


def test_module_form():
    logits, target = make_case(5, 3, 7, dim=0)
    module = fm.WorstOfKCrossEntropy(dim=0, temperature=0.5, label_smoothing=0.1)
    expected = fm.worst_of_k_cross_entropy(
        logits, target, dim=0, temperature=0.5, label_smoothing=0.1
    )
    torch.testing.assert_close(module(logits, target), expected)
    assert "temperature=0.5" in repr(module)
    weight = torch.rand(7) + 0.5
    weighted = fm.WorstOfKCrossEntropy(dim=0, weight=weight)
    assert torch.equal(weighted.weight, weight)  # a buffer: follows .to(device)
    torch.testing.assert_close(
        weighted(logits, target), fm.worst_of_k_cross_entropy(logits, target, dim=0, weight=weight)
    )


def test_does_not_modify_inputs():
    logits, target = make_case(5, 3, 7)
    x = logits.clone().requires_grad_(True)
    t = target.clone()
    fm.worst_of_k_cross_entropy(x, t, dim=1, label_smoothing=0.1).backward()
    assert torch.equal(x.detach(), logits) and torch.equal(t, target)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("dim", [0, 1])
def test_gradcheck_float64(temperature, dim):
    logits, target = make_case(3, 3, 5, dim=dim, dtype=torch.float64, seed=21)
    target[1] = -100
    x = logits.requires_grad_(True)

    def f(z):
        return fm.worst_of_k_cross_entropy(
            z,
            target,
            dim=dim,
            temperature=temperature,
            label_smoothing=0.1,
            reduction="none",
        )

    assert torch.autograd.gradcheck(f, (x,))


@pytest.mark.parametrize("with_radius", [False, True])
def test_opcheck(with_radius):
    logits, target = make_case(4, 3, 9, seed=3)
    target[0] = -100
    radius = torch.rand(4) if with_radius else None
    x = logits.requires_grad_(True)
    args = (x, target, radius, 0.0, 0.1, -100)
    torch.library.opcheck(torch.ops.fastmargin.worst_of_k_ce_fwd.default, args)
    torch.library.opcheck(
        torch.ops.fastmargin.worst_of_k_ce_fwd.default, (*args[:3], 0.5, 0.0, -100)
    )
    loss, lse, weight, _idx, _dr = torch.ops.fastmargin.worst_of_k_ce_fwd(*args)
    torch.library.opcheck(
        torch.ops.fastmargin.worst_of_k_ce_bwd.default,
        (torch.rand(4), logits.detach(), target, radius, lse, weight, 0.1, -100),
    )


def test_compile_fullgraph():
    torch._dynamo.reset()
    logits, target = make_case(6, 4, 10, dim=0, seed=13)

    def step(z, y):
        return fm.worst_of_k_cross_entropy(z, y, dim=0, temperature=0.0, label_smoothing=0.05)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x1 = logits.clone().requires_grad_(True)
    x2 = logits.clone().requires_grad_(True)
    out_c = compiled(x1, target)
    out_e = step(x2, target)
    torch.testing.assert_close(out_c, out_e)
    out_c.backward()
    out_e.backward()
    torch.testing.assert_close(x1.grad, x2.grad)


def test_compile_inductor_fullgraph():
    """The default backend (Inductor) compiles a graph with the op inside, forward + backward."""
    torch._dynamo.reset()
    logits, target = make_case(3, 2, 10, dim=0, seed=14)
    x = logits.clone().requires_grad_(True)
    fn = torch.compile(lambda z, y: fm.worst_of_k_cross_entropy(z, y, dim=0), fullgraph=True)
    loss = fn(x, target)
    loss.backward()
    torch.testing.assert_close(loss, fm.worst_of_k_cross_entropy(logits, target, dim=0))
    ref_x = logits.clone().requires_grad_(True)
    fm.worst_of_k_cross_entropy(ref_x, target, dim=0).backward()
    torch.testing.assert_close(x.grad, ref_x.grad)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    B=st.integers(1, 5),
    k=st.integers(1, 4),
    C=st.sampled_from([1, 2, 3, 4, 8, 17, 4097]),
    dim=st.sampled_from([0, 1]),
    step_b=st.integers(1, 2),
    dtype=st.sampled_from(ALL_DTYPES),
    temperature=st.sampled_from([0.0, 0.5]),
    label_smoothing=st.sampled_from([0.0, 0.1]),
    seed=st.integers(0, 2**16),
)
def test_property_shapes_strides_dtypes(
    B, k, C, dim, step_b, dtype, temperature, label_smoothing, seed
):
    logits, target = make_case(B * step_b, k, C, dim=dim, dtype=dtype, seed=seed)
    if dim == 1:
        logits = logits[::step_b]
    else:
        logits = logits[:, ::step_b]
    check_against_reference(
        logits,
        target[::step_b],
        dim=dim,
        temperature=temperature,
        label_smoothing=label_smoothing,
        reduction="none",
    )


# --- CUDA: the same checks on the GPU, plus what only a GPU can show ---------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("B,k,C", [(1, 1, 1), (5, 4, 7), (8, 3, 1000), (4, 2, 4099), (3, 4, 32000)])
@pytest.mark.parametrize("dim", [0, 1])
def test_cuda_matches_reference(dtype, B, k, C, dim):
    logits, target = make_case(B, k, C, dim=dim, dtype=dtype, device="cuda", ignore_frac=0.2)
    check_against_reference(logits, target, dim=dim, label_smoothing=0.1)
    check_against_reference(logits, target, dim=dim, temperature=0.5)


@pytest.mark.cuda
def test_cuda_matches_cpu_and_unaligned_views():
    base, target = make_case(9, 5, 203, seed=4)
    view = base[:, :, 1:]  # rows start off the 16-byte boundary: the scalar path
    cpu = fm.worst_of_k_cross_entropy(view, target, dim=1, reduction="none")
    gpu = fm.worst_of_k_cross_entropy(view.cuda(), target.cuda(), dim=1, reduction="none")
    torch.testing.assert_close(gpu.cpu(), cpu)
    check_against_reference(view.cuda(), target.cuda(), temperature=0.2)


@pytest.mark.cuda
def test_cuda_numerics_and_invalid_target():
    logits, target = make_case(4, 3, 64, device="cuda")
    logits[..., 5] = float("-inf")
    logits[1, 2, 7] = float("nan")
    target[target == 5] = 0
    target[3] = 1000
    fm.set_validation(False)
    x = logits.clone().requires_grad_(True)
    per = fm.worst_of_k_cross_entropy(x, target, dim=1, reduction="none")
    per.sum().backward()
    torch.cuda.synchronize()
    assert torch.isfinite(per[[0, 2]]).all() and torch.isnan(per[[1, 3]]).all()
    assert torch.all(x.grad[[0, 2]][..., 5] == 0)


@pytest.mark.cuda
def test_cuda_deterministic_stream_and_graph():
    logits, target = make_case(64, 4, 1000, device="cuda", dtype=torch.bfloat16)
    x = logits.clone().requires_grad_(True)

    def loss_and_grad():
        x.grad = None
        loss = fm.worst_of_k_cross_entropy(x, target, dim=1, temperature=0.3)
        loss.backward()
        return loss.detach().clone(), x.grad.clone()

    a, b = loss_and_grad(), loss_and_grad()
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        c = loss_and_grad()
    stream.synchronize()
    assert torch.equal(a[0], c[0]) and torch.equal(a[1], c[1])

    fm.set_validation(False)  # a host sync cannot be captured
    static_x = logits.clone()
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        static_loss = fm.worst_of_k_cross_entropy(static_x, target, dim=1, temperature=0.3)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_loss, a[0])


@pytest.mark.cuda
def test_cuda_compile_reduce_overhead():
    torch._dynamo.reset()
    logits, target = make_case(32, 4, 100, device="cuda", dim=0)
    fn = torch.compile(
        lambda z, y: fm.worst_of_k_cross_entropy(z, y, dim=0),
        fullgraph=True,
        mode="reduce-overhead",
    )
    expected = fm.worst_of_k_cross_entropy(logits, target, dim=0)
    for _ in range(3):
        torch.testing.assert_close(fn(logits, target), expected)


@pytest.mark.cuda
def test_cuda_int64_indexing_beyond_2_pow_31():
    """More than 2^31 logits elements: offsets must be 64-bit (bf16, about 4.3 GB + grad)."""
    free, _ = torch.cuda.mem_get_info()
    B, k, C = 16385, 4, 32768  # 2^31 + 2^17 elements
    if free < 3 * B * k * C * 2:
        pytest.skip("not enough GPU memory for the > 2^31-element case")
    gen = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(B, k, C, device="cuda", dtype=torch.bfloat16, generator=gen)
    target = torch.randint(0, C, (B,), device="cuda", generator=gen)
    x = logits.requires_grad_(True)
    per, idx = fm.worst_of_k_cross_entropy(x, target, dim=1, reduction="none", return_index=True)
    per.sum().backward()
    for b in (0, B // 2, B - 1):  # spot-check rows, including the last ones past 2^31
        row_ref, idx_ref = ref.worst_of_k_cross_entropy(
            logits[b : b + 1].float(), target[b : b + 1], dim=1, reduction="none", return_index=True
        )
        # per is the bfloat16 loss (the logits' dtype): one rounding of the float32 value
        torch.testing.assert_close(per[b : b + 1].float(), row_ref, atol=1e-3, rtol=4e-3)
        assert int(idx[b]) == int(idx_ref[0])
        assert torch.isfinite(x.grad[b]).all()
    assert math.isfinite(float(x.grad[-1].float().abs().sum()))


# --- inplace_backward: the gradient written over the logits in the forward -----------------


@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"temperature": 0.5, "label_smoothing": 0.1, "reduction": "sum"},
        {"weight": "rand"},
        {"soft": True, "temperature": 0.3},
    ],
    ids=["plain", "smooth-sum", "class-weight", "soft"],
)
def test_inplace_backward_matches_the_out_of_place_gradient(dim, dtype, kw):
    kw = dict(kw)
    logits, target = make_case(7, 3, 37, dim=dim, dtype=dtype, ignore_frac=0.2, seed=31)
    if kw.pop("soft", False):
        target = torch.softmax(torch.randn(7, 37, dtype=torch.float64), 1).to(dtype)
    if kw.get("weight") == "rand":
        kw["weight"] = torch.rand(37, dtype=torch.float64).to(dtype) + 0.5
    base = logits.clone().requires_grad_(True)
    model_out = base * 2.0  # a non-leaf, as a model's logits are
    upstream = 0.37
    loss = fm.worst_of_k_cross_entropy(model_out, target, dim=dim, inplace_backward=True, **kw)
    (upstream * loss).backward()

    ref_base = logits.clone().requires_grad_(True)
    ref_loss = fm.worst_of_k_cross_entropy(ref_base * 2.0, target, dim=dim, **kw)
    (upstream * ref_loss).backward()
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(base.grad, ref_base.grad, **tolerances(dtype))


def test_inplace_backward_reuses_the_logits_storage():
    logits, target = make_case(5, 4, 16, dim=0, seed=2)
    base = logits.clone().requires_grad_(True)
    out = base + 0.0
    storage = out.untyped_storage().data_ptr()
    loss = fm.worst_of_k_cross_entropy(out, target, dim=0, inplace_backward=True)
    assert not torch.equal(out.detach(), logits)  # the logits now hold the gradient
    assert out.untyped_storage().data_ptr() == storage
    loss.backward()
    x = logits.clone().requires_grad_(True)
    fm.worst_of_k_cross_entropy(x, target, dim=0).backward()
    torch.testing.assert_close(base.grad, x.grad)


def test_inplace_backward_rejects_unreduced_loss_and_is_plain_without_grad():
    logits, target = make_case(4, 2, 6)
    with pytest.raises(ValueError, match="inplace_backward"):
        fm.worst_of_k_cross_entropy(
            logits.requires_grad_(True), target, dim=1, reduction="none", inplace_backward=True
        )
    plain = logits.detach().clone()
    before = plain.clone()
    fm.worst_of_k_cross_entropy(plain, target, dim=1, inplace_backward=True)  # no grad wanted
    assert torch.equal(plain, before)


def test_inplace_backward_is_ignored_under_compile():
    torch._dynamo.reset()
    logits, target = make_case(4, 3, 10, seed=5)
    x = logits.clone().requires_grad_(True)
    fn = torch.compile(
        lambda z, y: fm.worst_of_k_cross_entropy(z, y, dim=1, inplace_backward=True),
        fullgraph=True,
        backend="aot_eager",
    )
    fn(x, target).backward()
    assert torch.equal(x.detach(), logits)
    ref_x = logits.clone().requires_grad_(True)
    fm.worst_of_k_cross_entropy(ref_x, target, dim=1).backward()
    torch.testing.assert_close(x.grad, ref_x.grad)


def test_inplace_op_opcheck():
    logits, target = make_case(4, 3, 9, seed=3)
    loss, lse, weight, _idx, _dr = torch.ops.fastmargin.worst_of_k_ce_fwd(
        logits, target, None, 0.0, 0.1, -100
    )
    torch.library.opcheck(
        torch.ops.fastmargin.worst_of_k_ce_bwd_inplace.default,
        (torch.rand(4), logits.clone(), target, None, lse, weight, 0.1, -100),
        test_utils=("test_schema", "test_faketensor"),
    )


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("C", [7, 1000, 4099])
def test_cuda_inplace_backward(dtype, C):
    logits, target = make_case(16, 4, C, dim=0, dtype=dtype, device="cuda", ignore_frac=0.2)
    base = logits.clone().requires_grad_(True)
    fm.worst_of_k_cross_entropy(base * 1.0, target, dim=0, inplace_backward=True).backward()
    ref_base = logits.clone().requires_grad_(True)
    fm.worst_of_k_cross_entropy(ref_base * 1.0, target, dim=0).backward()
    torch.testing.assert_close(base.grad, ref_base.grad, **tolerances(dtype))
