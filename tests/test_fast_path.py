"""The eager fast path (fastmargin._fast_path, csrc/python/module.cpp, the reduced-loss C++
autograd node) against the general op path: the same values, indices and gradients bit for bit,
the same errors, and the general path wherever something must see the ops (compile, modes,
subclasses, transforms)."""

from __future__ import annotations

import contextlib
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import fastmargin as fm
from fastmargin import _fast_path

FAST_NODE = "WorstOfKCrossEntropy"  # the C++ node's name contains the autograd Function's


@contextlib.contextmanager
def counting_fast_calls():
    """Counts the calls the fast path's C entry answered (not handed back with None)."""
    entry = _fast_path.worst_of_k_cross_entropy
    answered = []

    def counted(*args):
        out = entry(*args)
        answered.append(out is not None)
        return out

    _fast_path.worst_of_k_cross_entropy = counted
    try:
        yield answered
    finally:
        _fast_path.worst_of_k_cross_entropy = entry


@contextlib.contextmanager
def general_path():
    """The block runs with the fast path switched off: the general path of the same calls."""
    available = _fast_path.available
    _fast_path.available = lambda *tensors: False
    try:
        yield
    finally:
        _fast_path.available = available


def _call(x, y, **kw):
    x = x.detach().requires_grad_(True)
    out = fm.worst_of_k_cross_entropy(x, y, **kw)
    loss = out[0] if isinstance(out, tuple) else out
    g_out = (
        torch.linspace(0.5, 1.5, loss.numel()).to(loss.dtype).reshape(loss.shape)
        if loss.dim()
        else None
    )
    (grad,) = torch.autograd.grad(loss, x, g_out)
    return out, grad, loss.grad_fn


def _layouts(B=6, k=3, C=7, dtype=torch.float32):
    """(logits, dim) of every layout the fast path takes: (N, C) without dim, (k, B, C) and
    (B, k, C) with every spelling of dim."""
    g = torch.Generator().manual_seed(B * 100 + k * 10 + C)
    yield torch.randn(B, C, generator=g).to(dtype), None
    for dim in (0, -3):
        yield torch.randn(k, B, C, generator=g).to(dtype), dim
    for dim in (1, -2):
        yield torch.randn(B, k, C, generator=g).to(dtype), dim


CASES = list(
    itertools.product(
        ["mean", "sum", "none"],
        [0.0, 0.7],  # temperature
        [0.0, 0.1],  # label smoothing
        [False, True],  # class weights
    )
)


@pytest.mark.parametrize("reduction,tau,eps,weighted", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_fast_path_equals_op_path_bit_for_bit(reduction, tau, eps, weighted, dtype):
    for logits, dim in _layouts(dtype=dtype):
        B = logits.shape[0] if dim in (None, 1, -2) else logits.shape[1]
        C = logits.shape[-1]
        y = torch.randint(0, C, (B,))
        y[1] = -100  # one ignored sample
        stats = torch.float64 if dtype == torch.float64 else torch.float32
        w = torch.rand(C, dtype=stats) + 0.5 if weighted else None
        kw = dict(
            dim=dim, temperature=tau, label_smoothing=eps, reduction=reduction, weight=w,
            return_index=True,
        )  # fmt: skip
        with counting_fast_calls() as answered:
            (fast, fast_index), fast_grad, _ = _call(logits, y, **kw)
        assert answered == [True]
        with general_path(), counting_fast_calls() as answered:
            (slow, slow_index), slow_grad, _ = _call(logits, y, **kw)
        assert answered == []
        torch.testing.assert_close(fast, slow, rtol=0, atol=0)
        assert fast.dtype == slow.dtype == dtype and fast.shape == slow.shape
        assert torch.equal(fast_index, slow_index)
        torch.testing.assert_close(fast_grad, slow_grad, rtol=0, atol=0)
        assert fast_grad.shape == logits.shape


def test_no_dim_matches_cross_entropy_through_the_fast_path():
    x = torch.randn(9, 5, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3, 4, -100, 1, 2, 3])
    for reduction in ("mean", "sum", "none"):
        got = fm.worst_of_k_cross_entropy(x, y, reduction=reduction, label_smoothing=0.2)
        assert FAST_NODE in got.grad_fn.name()
        want = F.cross_entropy(x, y, reduction=reduction, label_smoothing=0.2)
        torch.testing.assert_close(got, want)
        g = torch.ones_like(want)
        torch.testing.assert_close(
            torch.autograd.grad(got, x, g)[0], torch.autograd.grad(want, x, g)[0]
        )


def test_autocast_gives_a_float32_loss_on_the_fast_path():
    x = torch.randn(4, 3, 10, dtype=torch.bfloat16)
    y = torch.randint(0, 10, (4,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fm.worst_of_k_cross_entropy(x, y, dim=1)
    assert loss.dtype == torch.float32
    assert fm.worst_of_k_cross_entropy(x, y, dim=1).dtype == torch.bfloat16


def test_all_ignored_mean_is_nan_as_in_cross_entropy():
    x = torch.randn(3, 4, requires_grad=True)
    y = torch.full((3,), -100)
    got = fm.worst_of_k_cross_entropy(x, y)
    assert FAST_NODE in got.grad_fn.name()
    assert torch.isnan(got) and torch.isnan(F.cross_entropy(x, y))


def test_empty_batch_matches_cross_entropy():
    x = torch.randn(0, 4, requires_grad=True)
    y = torch.zeros(0, dtype=torch.long)
    for reduction in ("mean", "sum", "none"):
        got = fm.worst_of_k_cross_entropy(x, y, reduction=reduction)
        want = F.cross_entropy(x, y, reduction=reduction)
        torch.testing.assert_close(got, want, equal_nan=True)


# --- errors: the fast path hands every invalid call to the general path ---------------------

BAD_CALLS = [
    ("target out of range", lambda x, y: (x, torch.tensor([0, 1, 9, 2])), {}),
    ("negative target", lambda x, y: (x, torch.tensor([0, -1, 2, 2])), {}),
    ("ignore_index bool", lambda x, y: (x, y), {"ignore_index": True}),
    ("nan temperature", lambda x, y: (x, y), {"temperature": float("nan")}),
    ("inf temperature", lambda x, y: (x, y), {"temperature": float("inf")}),
    ("negative temperature", lambda x, y: (x, y), {"temperature": -1.0}),
    ("label smoothing > 1", lambda x, y: (x, y), {"label_smoothing": 1.5}),
    ("temperature str", lambda x, y: (x, y), {"temperature": "0"}),
    ("reduction", lambda x, y: (x, y), {"reduction": "avg"}),
    ("dim 2", lambda x, y: (x.unsqueeze(1), y), {"dim": 2}),
    ("dim bool", lambda x, y: (x.unsqueeze(1), y), {"dim": True}),
    ("int logits", lambda x, y: (x.long(), y), {}),
    ("short target", lambda x, y: (x, y[:3]), {}),
    ("2-D class target", lambda x, y: (x, y[:, None]), {}),
    ("weight shape", lambda x, y: (x, y), {"weight": torch.ones(3)}),
    ("weight grad", lambda x, y: (x, y), {"weight": torch.ones(5, requires_grad=True)}),
    ("weight int", lambda x, y: (x, y), {"weight": torch.ones(5, dtype=torch.long)}),
    ("empty copies", lambda x, y: (x[:, :0].reshape(4, 0, 5), y), {"dim": 1}),
]


@pytest.mark.parametrize("name,make,kw", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_errors_are_the_general_paths(name, make, kw):
    x = torch.randn(4, 5)
    y = torch.tensor([0, 1, 2, 3])
    args = make(x, y)
    with pytest.raises(Exception) as fast:
        fm.worst_of_k_cross_entropy(*args, **kw)
    with general_path(), pytest.raises(Exception) as slow:
        fm.worst_of_k_cross_entropy(*args, **kw)
    assert type(fast.value) is type(slow.value)
    assert str(fast.value) == str(slow.value)


def test_validation_off_skips_the_range_check_on_the_fast_path():
    x = torch.randn(3, 4)
    y = torch.tensor([0, 7, 1])
    fm.set_validation(False)
    per_sample = fm.worst_of_k_cross_entropy(x, y, reduction="none")
    assert torch.isnan(per_sample[1]) and torch.isfinite(per_sample[[0, 2]]).all()


def test_strided_targets_are_range_checked():
    x = torch.randn(3, 4)
    y = torch.tensor([0, 9, 7, 9, 1, 9])[::2]  # (0, 7, 1): 7 is out of range
    with pytest.raises(IndexError, match="value 7 is out of range"):
        fm.worst_of_k_cross_entropy(x, y)


def test_other_valid_inputs_fall_back_and_agree():
    """Valid calls the fast path does not take (int32 targets, float16 weights, strided class
    dim, probability targets) give the general path's answer; int scalars are taken."""
    x = torch.randn(5, 6)
    y = torch.randint(0, 6, (5,))
    calls = [
        ((x, y.int()), {}),
        ((x, y), {"weight": torch.rand(6, dtype=torch.float16)}),
        ((x.t().contiguous().t(), y), {}),
        ((x, torch.softmax(torch.randn(5, 6), 1)), {}),
    ]
    with counting_fast_calls() as answered:
        fast = [fm.worst_of_k_cross_entropy(*a, **kw) for a, kw in calls]
    assert answered == [False] * len(calls)
    with general_path():
        slow = [fm.worst_of_k_cross_entropy(*a, **kw) for a, kw in calls]
    for f, s in zip(fast, slow):
        torch.testing.assert_close(f, s, rtol=0, atol=0)
    with counting_fast_calls() as answered:
        fast = fm.worst_of_k_cross_entropy(x, y, temperature=1, label_smoothing=0)
    assert answered == [True]
    with general_path():
        slow = fm.worst_of_k_cross_entropy(x, y, temperature=1, label_smoothing=0)
    torch.testing.assert_close(fast, slow, rtol=0, atol=0)


# --- where the fast path must not run -----------------------------------------------------------


class _CountingDispatch(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


class _CountingFunctions(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def test_modes_see_the_ops():
    x = torch.randn(4, 2, 5)
    y = torch.randint(0, 5, (4,))
    with _CountingDispatch() as mode:
        fm.worst_of_k_cross_entropy(x, y, dim=1)
    assert any("fastmargin.worst_of_k_ce_fwd" in op for op in mode.ops)
    with _CountingFunctions() as fmode:
        fm.worst_of_k_cross_entropy(x, y, dim=1)
    assert fmode.calls > 0


def test_subclass_logits_take_the_general_path():
    class Tagged(torch.Tensor):
        pass

    x = torch.randn(4, 5).as_subclass(Tagged).requires_grad_(True)
    y = torch.randint(0, 5, (4,))
    loss = fm.worst_of_k_cross_entropy(x, y)
    assert FAST_NODE not in loss.grad_fn.name()
    torch.testing.assert_close(loss.as_subclass(torch.Tensor), F.cross_entropy(x, y))


def test_compiled_call_traces_the_ops():
    x = torch.randn(4, 3, 5, requires_grad=True)
    y = torch.randint(0, 5, (4,))
    seen = []

    def backend(gm, example_inputs):
        seen.append(str(gm.graph))
        return gm.forward

    fn = torch.compile(lambda x, y: fm.worst_of_k_cross_entropy(x, y, dim=1), backend=backend)
    got = fn(x, y)
    assert seen and "worst_of_k_ce_fwd" in seen[0]
    torch.testing.assert_close(got, fm.worst_of_k_cross_entropy(x, y, dim=1), rtol=0, atol=0)


def test_double_backward_through_the_fast_path():
    x = torch.randn(5, 2, 4, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 4, (5,))
    for reduction in ("mean", "sum"):
        for dim in (0, 1):
            xx = x if dim == 1 else x.detach().transpose(0, 1).contiguous().requires_grad_(True)

            def f(z, dim=dim, reduction=reduction):
                return fm.worst_of_k_cross_entropy(
                    z, y, dim=dim, reduction=reduction, temperature=0.5
                )

            assert FAST_NODE in f(xx).grad_fn.name()
            assert torch.autograd.gradcheck(f, (xx,))
            assert torch.autograd.gradgradcheck(f, (xx,))


def test_gradient_penalty_matches_cross_entropy():
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 5, (6,))
    penalties = []
    for loss_fn in (fm.worst_of_k_cross_entropy, F.cross_entropy):
        (g,) = torch.autograd.grad(loss_fn(x, y), x, create_graph=True)
        (gg,) = torch.autograd.grad(g.pow(2).sum(), x)
        penalties.append(gg)
    torch.testing.assert_close(penalties[0], penalties[1])


def test_the_entries_refuse_wrong_arguments():
    with pytest.raises(TypeError, match="expected 11 arguments"):
        _fast_path.worst_of_k_cross_entropy(torch.randn(2, 3))
    with pytest.raises(TypeError, match="expected 10 arguments"):
        _fast_path.worst_of_k_ce_loss(torch.randn(2, 3))
    with pytest.raises(RuntimeError, match="1-D int64 CPU tensor"):
        _fast_path.first_bad_class_target(torch.zeros(2, 2, dtype=torch.long), 3, None)
    assert _fast_path.first_bad_class_target(torch.tensor([0, 5, -1]), 3, -1) == 5
    assert _fast_path.first_bad_class_target(torch.tensor([0, 2, -1]), 3, -1) is None
    assert _fast_path.first_bad_class_target(torch.tensor([0, 2, -1]), 3, None) == -1


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_weight_robust_fast_path_equals_op_path(reduction):
    x = torch.randn(7, 5, requires_grad=True)
    r = (torch.rand(7) * 0.3).requires_grad_(True)
    y = torch.tensor([0, 1, 2, 3, 4, -100, 2])
    results = []
    for ctx in (contextlib.nullcontext(), general_path()):
        with ctx:
            loss = fm.weight_robust_cross_entropy(x, y, r, label_smoothing=0.1, reduction=reduction)
        g_out = torch.linspace(0.5, 1.5, loss.numel()) if loss.dim() else None
        results.append((loss, *torch.autograd.grad(loss, (x, r), g_out)))
    for fast, slow in zip(*results):
        torch.testing.assert_close(fast, slow, rtol=0, atol=0)


@pytest.mark.parametrize("fast", [True, False])
def test_compiled_autograd_runs_the_node(fast):
    """Compiled autograd (a compiled backward of an eager forward) takes the C++ node on both
    paths: it supports no mark_non_differentiable, so the node has no such outputs."""
    from torch._dynamo import compiled_autograd

    x = torch.randn(8, 3, 10, requires_grad=True)
    y = torch.randint(0, 10, (8,))
    y[0] = -100
    want = torch.autograd.grad(fm.worst_of_k_cross_entropy(x, y, dim=1), x)[0]
    x.grad = None
    with contextlib.nullcontext() if fast else general_path():
        with compiled_autograd._enable(lambda gm: torch.compile(gm, backend="eager")):
            fm.worst_of_k_cross_entropy(x, y, dim=1).backward()
    torch.testing.assert_close(x.grad, want, rtol=0, atol=0)


def test_first_negative_or_nonfinite():
    find = _fast_path.first_negative_or_nonfinite
    assert find(torch.tensor([0.0, 1.0, 2.0])) is None
    assert find(torch.tensor([0.0, -0.5, float("nan")])) == 1
    assert find(torch.tensor([0.0, 1.0, float("inf")], dtype=torch.float64)) == 2
    assert find(torch.tensor([1.0, 9.0, float("nan")])[::2]) == 1  # strided
    assert find(torch.tensor(2.0).expand(5)) is None
    with pytest.raises(RuntimeError, match="1-D float32 or float64 CPU tensor"):
        find(torch.tensor([1, 2]))


def test_radius_errors_name_the_first_bad_value():
    x = torch.randn(4, 3)
    y = torch.tensor([0, 1, 2, 0])
    for bad, shown in ((-0.5, "-0.5"), (float("nan"), "nan"), (float("inf"), "inf")):
        r = torch.tensor([0.1, 0.2, bad, 0.3])
        with pytest.raises(ValueError, match=rf"got {shown} \(at index 2\)"):
            fm.weight_robust_cross_entropy(x, y, r)


@pytest.mark.parametrize("shape", [(3, 5, 7), (2, 4, 3, 5), (1, 21, 8, 8)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_spatial_fast_path_equals_op_path_bit_for_bit(shape, reduction, dtype):
    g = torch.Generator().manual_seed(sum(shape))
    logits = torch.randn(shape, generator=g).to(dtype)
    y = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=g)
    y.view(-1)[1] = -100
    stats = torch.float64 if dtype == torch.float64 else torch.float32
    kw = dict(reduction=reduction, label_smoothing=0.1, weight=torch.rand(shape[1], dtype=stats))
    with counting_fast_calls() as answered:
        fast, fast_grad, _ = _call(logits, y, **kw, return_index=True)
    assert answered == [True]
    with general_path():
        slow, slow_grad, _ = _call(logits, y, **kw, return_index=True)
    for f, s in zip(fast, slow):
        assert f.shape == s.shape and f.dtype == s.dtype
        torch.testing.assert_close(f, s, rtol=0, atol=0)
    torch.testing.assert_close(fast_grad, slow_grad, rtol=0, atol=0)
    want = F.cross_entropy(logits.double(), y, **{**kw, "weight": kw["weight"].double()})
    torch.testing.assert_close(fast[0].double(), want, rtol=2e-2, atol=2e-2)


def test_spatial_layouts_the_fast_path_leaves_to_the_general_path():
    x = torch.randn(2, 3, 4, 5)
    y = torch.randint(0, 3, (2, 4, 5))
    with counting_fast_calls() as answered:
        fm.worst_of_k_cross_entropy(x.to(memory_format=torch.channels_last), y)  # not contiguous
        fm.worst_of_k_cross_entropy(x[:, :1], y.clamp(max=0))  # one class
        fm.worst_of_k_cross_entropy(x[..., :1, :1], y[:, :1, :1])  # one position
        fm.worst_of_k_cross_entropy(x, y.int())  # int32 target
    assert answered == [False] * 4


def test_spatial_double_backward_through_the_fast_path():
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 3, (2, 4))
    with counting_fast_calls() as answered:
        fm.worst_of_k_cross_entropy(x, y)
    assert answered == [True]
    assert torch.autograd.gradcheck(lambda z: fm.worst_of_k_cross_entropy(z, y), (x,))
    assert torch.autograd.gradgradcheck(lambda z: fm.worst_of_k_cross_entropy(z, y), (x,))
    (g,) = torch.autograd.grad(fm.worst_of_k_cross_entropy(x, y), x, create_graph=True)
    (gg,) = torch.autograd.grad(g.pow(2).sum(), x)
    (g_ce,) = torch.autograd.grad(F.cross_entropy(x, y), x, create_graph=True)
    (gg_ce,) = torch.autograd.grad(g_ce.pow(2).sum(), x)
    torch.testing.assert_close(gg, gg_ce)


@pytest.mark.cuda
@pytest.mark.parametrize("validate", [True, False])
def test_cuda_fast_path_equals_op_path(validate):
    fm.set_validation(validate)
    for logits, dim in _layouts():
        logits = logits.cuda()
        B = logits.shape[0] if dim in (None, 1, -2) else logits.shape[1]
        y = torch.randint(0, logits.shape[-1], (B,), device="cuda")
        y[0] = -100
        with counting_fast_calls() as answered:
            (fast, fast_index), fast_grad, _ = _call(logits, y, dim=dim, return_index=True)
        assert answered == [True]
        with general_path():
            (slow, slow_index), slow_grad, _ = _call(logits, y, dim=dim, return_index=True)
        torch.testing.assert_close(fast, slow, rtol=0, atol=0)
        assert torch.equal(fast_index, slow_index)
        torch.testing.assert_close(fast_grad, slow_grad, rtol=0, atol=0)
        if validate:
            with pytest.raises(IndexError, match="out of range"):
                fm.worst_of_k_cross_entropy(logits, y.clamp(min=0) + 1000, dim=dim)
