"""The nn.Module forms of the losses, tested as PyTorch tests nn.CrossEntropyLoss: arguments
checked in __init__, forward and gradient, non-contiguous inputs, pickling and deepcopy, repr."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import fastmargin as fm

MODULES = [fm.WorstOfKCrossEntropy, fm.WeightRobustCrossEntropy, fm.WeightNoiseWorstOfKCrossEntropy]

BAD_OPTIONS = [
    ({"reduction": "avg"}, ValueError, "reduction"),
    ({"label_smoothing": 1.5}, ValueError, "label_smoothing"),
    ({"label_smoothing": -0.1}, ValueError, "label_smoothing"),
    ({"ignore_index": 1.5}, TypeError, "ignore_index"),
]


@pytest.mark.parametrize("cls", MODULES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("options, exc, fragment", BAD_OPTIONS)
def test_shared_options_are_checked_in_init(cls, options, exc, fragment):
    with pytest.raises(exc, match=fragment):
        cls(**options)


@pytest.mark.parametrize(
    "cls, options, exc, fragment",
    [
        (fm.WorstOfKCrossEntropy, {"dim": 5}, ValueError, "dim: expected 0"),
        (fm.WorstOfKCrossEntropy, {"dim": True}, ValueError, "dim: expected 0"),
        (fm.WorstOfKCrossEntropy, {"temperature": -1.0}, ValueError, "temperature"),
        (fm.WorstOfKCrossEntropy, {"temperature": float("nan")}, ValueError, "temperature"),
        (fm.WeightNoiseWorstOfKCrossEntropy, {"temperature": -1.0}, ValueError, "temperature"),
        (fm.WeightNoiseWorstOfKCrossEntropy, {"k": 0}, ValueError, "k"),
        (fm.WeightRobustCrossEntropy, {"eps": -0.1}, ValueError, "eps"),
        (fm.WeightRobustCrossEntropy, {"p": 0.5}, ValueError, "p"),
    ],
)
def test_module_specific_options_are_checked_in_init(cls, options, exc, fragment):
    with pytest.raises(exc, match=fragment):
        cls(**options)


def _inputs(shape=(6, 9), seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=dtype)
    samples = list(shape)
    del samples[1]
    return x, torch.randint(0, shape[1], samples, generator=gen)


@pytest.mark.parametrize("shape", [(6, 9), (3, 9, 4), (2, 9, 3, 2)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_worst_of_k_module_is_a_drop_in_cross_entropy_loss(shape, reduction):
    x, y = _inputs(shape)
    weight = torch.rand(9, dtype=torch.float64) + 0.5
    ours = fm.WorstOfKCrossEntropy(weight=weight, label_smoothing=0.1, reduction=reduction)
    theirs = nn.CrossEntropyLoss(weight=weight, label_smoothing=0.1, reduction=reduction)
    a = x.clone().requires_grad_(True)
    b = x.clone().requires_grad_(True)
    got, want = ours(a, y), theirs(b, y)
    torch.testing.assert_close(got, want)
    g = torch.rand_like(want)
    got.backward(g)
    want.backward(g)
    torch.testing.assert_close(a.grad, b.grad)


def test_worst_of_k_module_with_copies_matches_the_function():
    x = torch.randn(3, 5, 7, dtype=torch.float64)  # (k, B, C)
    y = torch.randint(0, 7, (5,))
    module = fm.WorstOfKCrossEntropy(dim=0, temperature=0.5)
    torch.testing.assert_close(
        module(x, y), fm.worst_of_k_cross_entropy(x, y, dim=0, temperature=0.5)
    )
    loss, index = module(x, y, return_index=True)
    assert index.shape == (5,)


def _module_calls():
    """(name, module, call) with call(module) -> loss, on fixed inputs."""
    x, y = _inputs((6, 9))
    r = torch.rand(6, dtype=torch.float64)
    linear = nn.Linear(4, 9).double()
    h = torch.randn(6, 4, dtype=torch.float64)
    gen = torch.Generator()

    def noise(m):
        gen.manual_seed(7)  # the same draw on every call
        return m(x, y, 0.3, generator=gen)

    return [
        ("worst_of_k", fm.WorstOfKCrossEntropy(label_smoothing=0.1), lambda m: m(x, y)),
        (
            "worst_of_k weighted",
            fm.WorstOfKCrossEntropy(weight=torch.rand(9, dtype=torch.float64)),
            lambda m: m(x, y),
        ),
        ("weight_robust", fm.WeightRobustCrossEntropy(), lambda m: m(x, y, r)),
        ("weight_robust linear", fm.WeightRobustCrossEntropy(linear, eps=0.1), lambda m: m(h, y)),
        ("weight_noise", fm.WeightNoiseWorstOfKCrossEntropy(k=3, temperature=0.2), noise),
    ]


@pytest.mark.parametrize("case", _module_calls(), ids=lambda c: c[0])
def test_pickle_and_deepcopy_give_the_same_loss(case):
    _name, module, call = case
    want = call(module)
    for clone in (pickle.loads(pickle.dumps(module)), copy.deepcopy(module)):
        assert repr(clone) == repr(module)
        torch.testing.assert_close(call(clone), want, rtol=0, atol=0)


def test_repr_shows_the_options():
    assert repr(fm.WorstOfKCrossEntropy(dim=0, temperature=0.5)) == (
        "WorstOfKCrossEntropy(dim=0, temperature=0.5, label_smoothing=0.0, "
        "ignore_index=-100, reduction='mean')"
    )
    text = repr(fm.WeightNoiseWorstOfKCrossEntropy(k=3))
    assert text.startswith("WeightNoiseWorstOfKCrossEntropy(") and "k=3, temperature=0.0" in text
    assert "reduction='mean'" in repr(fm.WeightRobustCrossEntropy(eps=0.1))


@pytest.mark.parametrize("layout", ["class strided", "gapped rows", "spatial permuted"])
def test_non_contiguous_inputs(layout):
    if layout == "spatial permuted":
        x, y = _inputs((2, 9, 3, 4), seed=3)
        nc = x.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)
        y_nc = y.transpose(1, 2).contiguous().transpose(1, 2)
    else:
        x, y = _inputs((6, 9), seed=3)
        if layout == "class strided":
            nc = x.t().contiguous().t()
        else:
            nc = torch.zeros(12, 9, dtype=x.dtype)[::2].copy_(x)
        y_nc = torch.stack([y, y], 1)[:, 0]
    assert not nc.is_contiguous() and not y_nc.is_contiguous()
    torch.testing.assert_close(nc, x)
    module = fm.WorstOfKCrossEntropy(label_smoothing=0.2)
    a = nc.detach().requires_grad_(True)
    b = x.clone().requires_grad_(True)
    got = module(a, y_nc)
    want = nn.CrossEntropyLoss(label_smoothing=0.2)(b, y)
    torch.testing.assert_close(got, want)
    got.backward()
    want.backward()
    torch.testing.assert_close(a.grad, b.grad)
    if layout != "spatial permuted":  # the (N, C) row modules too
        r = torch.rand(6, dtype=x.dtype)
        torch.testing.assert_close(
            fm.WeightRobustCrossEntropy()(nc, y_nc, r), fm.WeightRobustCrossEntropy()(x, y, r)
        )


def test_weight_buffer_follows_to_and_state_dict():
    w = torch.rand(9)
    module = fm.WorstOfKCrossEntropy(weight=w).double()
    assert module.weight.dtype == torch.float64
    clone = fm.WorstOfKCrossEntropy(weight=torch.zeros(9))
    clone.load_state_dict(module.state_dict())
    x, y = _inputs((6, 9))
    torch.testing.assert_close(clone(x, y), module(x, y))
