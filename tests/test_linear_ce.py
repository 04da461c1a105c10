"""fm.linear_worst_of_k_cross_entropy and fm.LinearWorstOfKCrossEntropy (the fused linear head)
against the unfused composition (fastmargin.reference: F.linear, then the worst-of-k CE) and,
at k = 1, F.cross_entropy(F.linear(...)): values and the gradients of hidden, weight and bias."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastmargin as fm
from fastmargin import reference

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
TOL = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
}
K, B, H, V = 3, 7, 16, 37  # V not a multiple of 8; chunk 3 does not divide B


def _hidden_shape(dim, k=K, b=B, h=H):
    return {None: (b, h), 0: (k, b, h), 1: (b, k, h)}[dim]


def _inputs(dim, dtype, *, device="cpu", bias=True, seed=0, ignore=False, k=K, b=B):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(_hidden_shape(dim, k, b), generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) / math.sqrt(H) * 3
    bias_t = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    target = torch.randint(0, V, (b,), generator=g)
    if ignore:
        target[1::3] = -100
    cast = lambda t: None if t is None else t.to(dtype).to(device)  # noqa: E731
    return cast(hidden), cast(weight), target.to(device), cast(bias_t)


def _leaves(tensors, dtype=None):
    return [
        None if t is None else t.detach().to(dtype or t.dtype).clone().requires_grad_(True)
        for t in tensors
    ]


def _check(hidden, weight, target, bias, *, dim, chunk_size=None, **kw):
    """Fused vs the reference (float32 on the same rounded inputs for bfloat16), values and
    all three gradients for a random upstream gradient; returns the fused loss."""
    ref_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    h, w, b = _leaves([hidden, weight, bias])
    hr, wr, br = _leaves([hidden, weight, bias], ref_dtype)
    out = fm.linear_worst_of_k_cross_entropy(h, w, target, b, dim=dim, chunk_size=chunk_size, **kw)
    ref = reference.linear_worst_of_k_cross_entropy(hr, wr, target, br, dim=dim, **kw)
    assert out.dtype == hidden.dtype and out.shape == ref.shape
    torch.testing.assert_close(out.to(ref_dtype), ref, **TOL[hidden.dtype], equal_nan=True)
    wrt = [t for t in (h, w, b) if t is not None]
    wrt_ref = [t for t in (hr, wr, br) if t is not None]
    g = torch.rand(ref.shape, dtype=torch.float64).to(device=out.device, dtype=ref_dtype) + 0.5
    grads = torch.autograd.grad(out, wrt, g.to(out.dtype))
    grads_ref = torch.autograd.grad(ref, wrt_ref, g.to(out.dtype).to(ref_dtype))
    for name, a, r in zip(("hidden", "weight", "bias"), grads, grads_ref):
        assert a.dtype == hidden.dtype, name
        torch.testing.assert_close(a.to(ref_dtype), r, **TOL[hidden.dtype], msg=name)
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim", [None, 0, 1])
@pytest.mark.parametrize("chunk_size", [1, 3, None, 100])
@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_matches_unfused(device, dtype, dim, chunk_size, temperature):
    x = _inputs(dim, dtype, device=device, ignore=True)
    for reduction in ("mean", "sum", "none"):
        _check(*x, dim=dim, chunk_size=chunk_size, temperature=temperature, reduction=reduction)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dim", [None, 0, 1])
@pytest.mark.parametrize(
    "options",
    [
        dict(label_smoothing=0.1),
        dict(class_weight=True),
        dict(class_weight=True, label_smoothing=0.2, temperature=0.5),
        dict(ignore_index=5, label_smoothing=0.05),
    ],
)
@pytest.mark.parametrize("bias", [True, False])
def test_options(device, dim, options, bias):
    options = dict(options)
    hidden, weight, target, b = _inputs(dim, torch.float32, device=device, bias=bias, ignore=True)
    if options.get("class_weight"):
        g = torch.Generator().manual_seed(1)
        options["class_weight"] = (torch.rand(V, generator=g) + 0.1).to(device)
    if options.get("ignore_index") == 5:
        target = torch.where(target == -100, 5, target)
    for reduction in ("mean", "sum", "none"):
        _check(hidden, weight, target, b, dim=dim, chunk_size=2, reduction=reduction, **options)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_k1_is_cross_entropy(reduction):
    """dim=None is F.cross_entropy(F.linear(...)) itself, also batch-less (H,)."""
    hidden, weight, target, bias = _inputs(None, torch.float32, ignore=True)
    kw = dict(label_smoothing=0.1, reduction=reduction)
    h, w, b = _leaves([hidden, weight, bias])
    h2, w2, b2 = _leaves([hidden, weight, bias])
    out = fm.linear_worst_of_k_cross_entropy(h, w, target, b, chunk_size=2, **kw)
    ref = F.cross_entropy(F.linear(h2, w2, b2), target, **kw)
    torch.testing.assert_close(out, ref)
    g = torch.rand_like(ref)
    for a, r in zip(
        torch.autograd.grad(out, (h, w, b), g), torch.autograd.grad(ref, (h2, w2, b2), g)
    ):
        torch.testing.assert_close(a, r)
    one = fm.linear_worst_of_k_cross_entropy(hidden[0], weight, target[0].clone().fill_(3), bias)
    torch.testing.assert_close(
        one, F.cross_entropy(F.linear(hidden[0], weight, bias), target[0].clone().fill_(3))
    )
    assert one.shape == ()


@pytest.mark.parametrize("dim", [0, 1])
def test_return_index_and_chunk_independence(dim):
    hidden, weight, target, bias = _inputs(dim, torch.float32, seed=3)
    logits = F.linear(hidden, weight, bias)
    _, idx_ref = reference.worst_of_k_cross_entropy(logits, target, dim=dim, return_index=True)
    for chunk in (1, 2, 5, 7):
        loss, idx = fm.linear_worst_of_k_cross_entropy(
            hidden, weight, target, bias, dim=dim, chunk_size=chunk, return_index=True
        )
        assert idx.dtype == torch.long
        assert torch.equal(idx, idx_ref)


def test_mean_normaliser_is_whole_batch():
    """'mean' divides by the samples not ignored in the whole batch, not per chunk: a chunk
    of ignored samples only must not change the other chunks' scale."""
    hidden, weight, target, bias = _inputs(0, torch.float32)
    target[:4] = -100
    _check(hidden, weight, target, bias, dim=0, chunk_size=4, temperature=0.3)
    target[:] = -100  # all ignored: 'mean' is NaN (0 / 0) as in F.cross_entropy, gradient 0
    h = hidden.clone().requires_grad_(True)
    out = fm.linear_worst_of_k_cross_entropy(h, weight, target, bias, dim=0, chunk_size=2)
    ref = F.cross_entropy(F.linear(hidden[0], weight, bias), target)
    assert out.isnan() and ref.isnan()
    out.backward()
    assert torch.equal(h.grad, torch.zeros_like(h))


def test_empty_batch():
    weight = torch.randn(V, H, requires_grad=True)
    h = torch.randn(0, H, requires_grad=True)
    t = torch.zeros(0, dtype=torch.long)
    for reduction in ("mean", "sum", "none"):
        out = fm.linear_worst_of_k_cross_entropy(h, weight, t, reduction=reduction)
        ref = F.cross_entropy(F.linear(h, weight), t, reduction=reduction)
        torch.testing.assert_close(out, ref, equal_nan=True)
    fm.linear_worst_of_k_cross_entropy(h, weight, t, reduction="sum").backward()
    assert torch.equal(weight.grad, torch.zeros_like(weight))


def test_frozen_head():
    """A head that does not require grad gets none, and the others are unchanged."""
    hidden, weight, target, bias = _inputs(1, torch.float32)
    h, b = _leaves([hidden, bias])
    out = fm.linear_worst_of_k_cross_entropy(h, weight, target, b, dim=1, chunk_size=3)
    out.backward()
    hr, br = _leaves([hidden, bias])
    reference.linear_worst_of_k_cross_entropy(hr, weight, target, br, dim=1).backward()
    assert weight.grad is None
    torch.testing.assert_close(h.grad, hr.grad)
    torch.testing.assert_close(b.grad, br.grad)
    # only the head trains (frozen features): no hidden gradient either
    w = weight.clone().requires_grad_(True)
    out = fm.linear_worst_of_k_cross_entropy(hidden, w, target, dim=1)
    (gw,) = torch.autograd.grad(out, (w,))
    w2 = weight.clone().requires_grad_(True)
    (gw2,) = torch.autograd.grad(
        reference.linear_worst_of_k_cross_entropy(hidden, w2, target, dim=1), (w2,)
    )
    torch.testing.assert_close(gw, gw2)


def test_no_grad_forward():
    hidden, weight, target, bias = _inputs(0, torch.float32)
    with torch.no_grad():
        out = fm.linear_worst_of_k_cross_entropy(
            hidden, weight.requires_grad_(), target, bias, dim=0
        )
    ref = reference.linear_worst_of_k_cross_entropy(hidden, weight, target, bias, dim=0)
    torch.testing.assert_close(out, ref.detach())
    assert out.grad_fn is None


class _TinyLM(nn.Module):
    def __init__(self, vocab=V, width=H):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.mix = nn.Linear(width, width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight  # tied input / output embeddings


@pytest.mark.parametrize("wrap", ["linear", "embedding"])
def test_module_tied_embedding(wrap):
    torch.manual_seed(0)
    lm = _TinyLM()
    tokens = torch.randint(0, V, (2, B))  # k = 2 noisy copies of B tokens
    target = torch.randint(0, V, (B,))
    noise = 0.1 * torch.randn(2, B, H)

    def features():
        return torch.tanh(lm.mix(lm.embed(tokens) + noise))  # (k, B, H)

    head = lm.head if wrap == "linear" else lm.embed
    loss_fn = fm.LinearWorstOfKCrossEntropy(head, dim=0, chunk_size=3, label_smoothing=0.1)
    assert "dim=0" in repr(loss_fn)
    loss = loss_fn(features(), target)
    loss.backward()
    fused = [p.grad.clone() for p in lm.parameters()]
    lm.zero_grad()
    ref = fm.reference.worst_of_k_cross_entropy(
        lm.head(features()), target, dim=0, label_smoothing=0.1
    )
    ref.backward()
    torch.testing.assert_close(loss, ref)
    for a, r in zip(fused, (p.grad for p in lm.parameters())):
        torch.testing.assert_close(a, r)


def test_module_class_weight_buffer_and_options():
    head = nn.Linear(H, V)
    w = torch.rand(V) + 0.5
    loss_fn = fm.LinearWorstOfKCrossEntropy(head, class_weight=w, reduction="sum")
    assert loss_fn.class_weight is not None and "class_weight" in dict(loss_fn.named_buffers())
    hidden, _, target, _ = _inputs(None, torch.float32)
    out = loss_fn(hidden, target)
    ref = F.cross_entropy(head(hidden), target, weight=w, reduction="sum")
    torch.testing.assert_close(out, ref)
    loss_fn.reduction = "mean"
    torch.testing.assert_close(
        loss_fn(hidden, target), F.cross_entropy(head(hidden), target, weight=w)
    )
    with pytest.raises(TypeError, match="head"):
        fm.LinearWorstOfKCrossEntropy(nn.Conv1d(1, 1, 1))


@pytest.mark.parametrize("p", [2.0, 1.0, math.inf, 3.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_robust(p, dtype):
    hidden, weight, target, bias = _inputs(None, dtype, ignore=True)
    for reduction in ("mean", "none"):
        _check(
            hidden,
            weight,
            target,
            bias,
            dim=None,
            chunk_size=3,
            robust_eps=0.05,
            robust_p=p,
            reduction=reduction,
            label_smoothing=0.1,
        )
    # and against the public weight-robust loss on the materialised logits
    h = hidden.float().requires_grad_(True)
    w = weight.float()
    out = fm.linear_worst_of_k_cross_entropy(h, w, target, robust_eps=0.05, robust_p=p)
    ref = fm.weight_robust_cross_entropy(
        F.linear(h, w), target, fm.weight_perturbation_radius(h, 0.05, p)
    )
    torch.testing.assert_close(out, ref)


def test_gradcheck_float64():
    for dim, kw in [
        (None, dict(label_smoothing=0.1)),
        (0, dict(temperature=0.5)),
        (1, dict(reduction="none", class_weight=torch.rand(5, dtype=torch.float64) + 0.5)),
        (None, dict(robust_eps=0.1, robust_p=3.0, reduction="none")),
    ]:
        g = torch.Generator().manual_seed(0)
        shape = {None: (4, 3), 0: (2, 4, 3), 1: (4, 2, 3)}[dim]
        h = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
        w = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
        b = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)
        y = torch.tensor([0, 4, -100, 2])

        def fn(h, w, b, dim=dim, kw=kw, y=y):
            return fm.linear_worst_of_k_cross_entropy(h, w, y, b, dim=dim, chunk_size=3, **kw)

        assert torch.autograd.gradcheck(fn, (h, w, b))


def test_double_backward_raises():
    hidden, weight, target, bias = _inputs(0, torch.float64)
    h, w = _leaves([hidden, weight])
    out = fm.linear_worst_of_k_cross_entropy(h, w, target, dim=0)
    with pytest.raises(RuntimeError, match="second derivatives"):
        torch.autograd.grad(out, (h,), create_graph=True)


def test_forward_mode_ad_raises():
    hidden, weight, target, _ = _inputs(None, torch.float32)
    tangent = torch.ones_like(hidden)
    with pytest.raises(RuntimeError, match="forward-mode AD"):
        torch.func.jvp(
            lambda h: fm.linear_worst_of_k_cross_entropy(h, weight, target), (hidden,), (tangent,)
        )
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level(), pytest.raises(RuntimeError, match="forward-mode AD"):
        w = fwAD.make_dual(weight, torch.ones_like(weight))
        fm.linear_worst_of_k_cross_entropy(hidden, w, target)


def test_autocast_matches_pytorch():
    hidden, weight, target, bias = _inputs(None, torch.float32)
    h, w, b = _leaves([hidden, weight, bias])
    h2, w2, b2 = _leaves([hidden, weight, bias])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fm.linear_worst_of_k_cross_entropy(h, w, target, b)
        ref = F.cross_entropy(F.linear(h2, w2, b2), target)
    assert out.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=1e-3, rtol=1e-3)
    ga = torch.autograd.grad(out, (h, w, b))
    gr = torch.autograd.grad(ref, (h2, w2, b2))
    for a, r in zip(ga, gr):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, r, atol=2e-2, rtol=2e-2)
    # bfloat16 hidden states with a float32 head, and float64 (left alone by autocast)
    for hd, wd in [(torch.bfloat16, torch.float32), (torch.float64, torch.float64)]:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fm.linear_worst_of_k_cross_entropy(hidden.to(hd), weight.to(wd), target)
            ref = F.cross_entropy(F.linear(hidden.to(hd), weight.to(wd)), target)
        assert out.dtype == ref.dtype
        torch.testing.assert_close(out, ref, atol=1e-3, rtol=1e-3)


def _bad_calls():
    hidden, weight, target, bias = _inputs(0, torch.float32)
    h2 = hidden[0]
    good = dict(hidden=hidden, weight=weight, target=target, bias=bias, dim=0)
    cases = [
        (dict(dim=None), ValueError, "dim=0 or dim=1"),
        (dict(dim=2), ValueError, "dim"),
        (dict(hidden=h2), ValueError, "hidden"),
        (dict(weight=weight.double()), TypeError, "weight"),
        (dict(weight=weight[:, :5]), ValueError, "hidden"),
        (dict(weight=weight[0]), ValueError, "weight"),
        (dict(bias=bias[:4]), ValueError, "bias"),
        (dict(target=target.float()), TypeError, "target"),
        (dict(target=target[:3]), ValueError, "target"),
        (dict(target=torch.full_like(target, V)), IndexError, "target"),
        (dict(hidden=hidden.long()), TypeError, "hidden"),
        (dict(chunk_size=0), ValueError, "chunk_size"),
        (dict(chunk_size=2.0), TypeError, "chunk_size"),
        (dict(temperature=-1.0), ValueError, "temperature"),
        (dict(label_smoothing=2.0), ValueError, "label_smoothing"),
        (dict(reduction="avg"), ValueError, "reduction"),
        (dict(class_weight=torch.ones(3)), ValueError, "class_weight"),
        (dict(robust_eps=0.1), ValueError, "robust_eps"),
        (dict(robust_p=0.5, robust_eps=0.1), ValueError, "p"),
        (dict(hidden=hidden[:0]), ValueError, "copy"),
    ]
    return good, cases


def test_bad_inputs():
    good, cases = _bad_calls()
    before = {k: v.clone() for k, v in good.items() if isinstance(v, torch.Tensor)}
    for change, exc, fragment in cases:
        kw = {**good, **change}
        args = [kw.pop(n) for n in ("hidden", "weight", "target", "bias")]
        with pytest.raises(exc, match=fragment):
            fm.linear_worst_of_k_cross_entropy(*args, **kw)
    for k, v in before.items():
        assert torch.equal(good[k], v), k


def _op_args(reduction, need, radius=False, copies_first=True):
    hidden, weight, target, bias = _inputs(0 if copies_first else 1, torch.float32, ignore=True)
    if radius:
        hidden = hidden[0].unsqueeze(1).contiguous()
        copies_first = False
    cw = torch.rand(V) + 0.5
    hidden.requires_grad_(need[0])
    weight.requires_grad_(need[1])
    bias.requires_grad_(need[2])
    return (
        hidden,
        weight,
        bias,
        target,
        cw,
        copies_first,
        0.3,
        0.1,
        -100,
        reduction,
        3,
        0.05 if radius else 0.0,
        2.0,
        list(need),
    )


@pytest.mark.parametrize(
    "reduction,need,radius,copies_first",
    [
        ("mean", (True, True, True), False, True),
        ("sum", (True, False, True), False, False),
        ("none", (True, True, True), False, True),
        ("mean", (True, True, False), True, False),
        ("none", (True, True, True), True, False),
    ],
)
def test_opcheck(reduction, need, radius, copies_first):
    args = _op_args(reduction, need, radius, copies_first)
    torch.library.opcheck(torch.ops.fastmargin.linear_worst_of_k_ce.default, args)


def test_opcheck_backward_op():
    hidden, weight, bias, target, cw, cf, tau, ls, ii, _red, chunk, re, rq, _ = _op_args(
        "none", (True, True, True)
    )
    out = torch.ops.fastmargin.linear_worst_of_k_ce(
        hidden, weight, bias, target, cw, cf, tau, ls, ii, "none", chunk, re, rq, [False] * 3
    )
    lse, wsel, dr = out[2], out[3], out[4]
    # The backward op is not itself differentiable (second derivatives raise): plain inputs.
    hidden, weight, bias = hidden.detach(), weight.detach(), bias.detach()
    args = (
        torch.rand(B),
        hidden,
        weight,
        bias,
        target,
        cw,
        lse,
        wsel,
        dr,
        cf,
        ls,
        ii,
        chunk,
        re,
        rq,
        [True] * 3,
    )
    torch.library.opcheck(torch.ops.fastmargin.linear_worst_of_k_ce_backward.default, args)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph(backend):
    torch._dynamo.reset()
    hidden, weight, target, bias = _inputs(0, torch.float32, ignore=True)

    def step(h, w, b, y):
        return fm.linear_worst_of_k_cross_entropy(h, w, y, b, dim=0, temperature=0.2, chunk_size=3)

    compiled = torch.compile(step, fullgraph=True, backend=backend)
    leaves_e, leaves_c = _leaves([hidden, weight, bias]), _leaves([hidden, weight, bias])
    out_e = step(*leaves_e, target)
    out_c = compiled(*leaves_c, target)
    torch.testing.assert_close(out_c, out_e)
    for a, r in zip(torch.autograd.grad(out_c, leaves_c), torch.autograd.grad(out_e, leaves_e)):
        torch.testing.assert_close(a, r)


def test_compile_none_reduction():
    torch._dynamo.reset()
    hidden, weight, target, bias = _inputs(1, torch.float32)
    step = lambda h, w, y: fm.linear_worst_of_k_cross_entropy(h, w, y, dim=1, reduction="none")  # noqa: E731
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    (h1, w1), (h2, w2) = _leaves([hidden, weight]), _leaves([hidden, weight])
    g = torch.rand(B)
    out_c, out_e = compiled(h1, w1, target), step(h2, w2, target)
    torch.testing.assert_close(out_c, out_e)
    for a, r in zip(
        torch.autograd.grad(out_c, (h1, w1), g), torch.autograd.grad(out_e, (h2, w2), g)
    ):
        torch.testing.assert_close(a, r)


def test_chunk_layouts_property():
    """Random k, B, chunk and layout (incl. k = 1 with dim set, B = 1, V = 1, 2)."""
    g = torch.Generator().manual_seed(7)
    for k, b, v, chunk, dim in itertools.islice(
        itertools.product([1, 2, 4], [1, 5], [1, 2, 9], [1, 2, 4], [0, 1]), 0, None, 5
    ):
        shape = (k, b, 4) if dim == 0 else (b, k, 4)
        hidden = torch.randn(shape, generator=g)
        weight = torch.randn(v, 4, generator=g)
        target = torch.randint(0, v, (b,), generator=g)
        _check(hidden, weight, target, None, dim=dim, chunk_size=chunk, temperature=0.1 * k)


def test_peak_memory_does_not_hold_the_logits():
    """Allocation records (profiler): the fused path's peak extra memory is the chunk's logits
    plus the gradients, far below the unfused path's (k * B, V) logits and their gradient."""
    from fastmargin.benchmarks.memory import peak_extra_bytes

    k, b, h, v = 2, 512, 16, 2000
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(k, b, h, generator=g).requires_grad_(True)
    weight = torch.randn(v, h, generator=g).requires_grad_(True)
    target = torch.randint(0, v, (b,), generator=g)

    def fused():
        loss = fm.linear_worst_of_k_cross_entropy(hidden, weight, target, dim=0, chunk_size=16)
        return torch.autograd.grad(loss, (hidden, weight))

    def unfused():
        logits = F.linear(hidden, weight)
        loss = fm.worst_of_k_cross_entropy(logits, target, dim=0)
        return torch.autograd.grad(loss, (hidden, weight))

    logits_bytes = k * b * v * 4
    fused_peak, unfused_peak = peak_extra_bytes(fused, "cpu"), peak_extra_bytes(unfused, "cpu")
    assert unfused_peak >= 2 * logits_bytes
    grads_bytes = 2 * (k * b * h + v * h) * 4  # the gradients and their scaled copies
    assert fused_peak <= 16 * k * v * 4 + grads_bytes + logits_bytes // 8
