"""Second-order autograd: every op's backward is itself differentiable and exact.

The fused backward ops are first-order only; with ``create_graph=True`` the registered
backwards differentiate the ops' composite forms. These tests check that path against
gradgradcheck, against the plain-PyTorch reference (Hessian-vector products), against the
fused first-order gradient, and at k = 1 against F.cross_entropy (a gradient-penalty step).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from _autograd_cases import CASES, cases, directions, fresh_inputs

import fastmargin as fm
from fastmargin import _composite

D = torch.float64


@cases
def test_gradgradcheck(case):
    assert torch.autograd.gradgradcheck(case.fm_fn, fresh_inputs(case))


@cases
def test_differentiable_gradient_equals_fused_gradient(case):
    inputs = fresh_inputs(case)
    out = case.fm_fn(*inputs)
    (v,) = directions((out,), seed=2)
    fused = torch.autograd.grad(out, inputs, v, retain_graph=True)
    graph = torch.autograd.grad(out, inputs, v, create_graph=True)
    for a, b in zip(fused, graph):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


def _second_derivatives(fn, case):
    """d/d inputs of <grad L, w> + ||grad L||^2 for L = <v, out> + |out|^2 / 2: a Hessian-vector
    product and a gradient penalty in one (non-zero even for piecewise-linear ops)."""
    inputs = fresh_inputs(case)
    out = fn(*inputs)
    (v,) = directions((out,), seed=2)
    loss = (out * v).sum() + 0.5 * out.pow(2).sum()
    grads = torch.autograd.grad(loss, inputs, create_graph=True)
    w = directions(inputs, seed=3)
    penalty = sum((g * wi).sum() + g.pow(2).sum() for g, wi in zip(grads, w))
    return torch.autograd.grad(penalty, inputs)


@cases
def test_second_derivatives_match_reference(case):
    got = _second_derivatives(case.fm_fn, case)
    expected = _second_derivatives(case.ref_fn, case)
    assert any(g.abs().max() > 1e-3 for g in got)  # not a silent zero
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


def test_cases_cover_every_op():
    names = {c.name.split("-")[0] for c in CASES}
    assert names == {"wok", "robust", "noise", "margin", "all_layer_perturb"}


# --- k = 1 against F.cross_entropy ---------------------------------------------------------

_W = torch.tensor([0.5, 1.0, 2.0, 1.5, 0.7], dtype=D)
K1_VARIANTS = {
    "plain": dict(),
    "smooth": dict(label_smoothing=0.2),
    "weight": dict(weight=_W),
    "weight-smooth-sum": dict(weight=_W, label_smoothing=0.1, reduction="sum"),
    "ignore": dict(ignore_index=2),
}


def _k1_losses(opts):
    return {
        "worst_of_k": lambda z, y: fm.worst_of_k_cross_entropy(z.unsqueeze(1), y, dim=1, **opts),
        "worst_of_k_tau": lambda z, y: fm.worst_of_k_cross_entropy(
            z.unsqueeze(0), y, dim=0, temperature=0.7, **opts
        ),
    }


def _penalty_step(loss_fn, model, x0, y, lam=0.3):
    """One SGD step on loss + lam * ||d loss / d x||^2; returns the new parameters."""
    model = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x = x0.clone().requires_grad_(True)
    loss = loss_fn(model(x), y)
    (gx,) = torch.autograd.grad(loss, x, create_graph=True)
    total = loss + lam * gx.pow(2).sum()
    opt.zero_grad()
    total.backward()
    opt.step()
    return [p.detach() for p in model.parameters()], total.detach()


@pytest.mark.parametrize("variant", list(K1_VARIANTS))
def test_gradient_penalty_step_matches_cross_entropy(variant):
    opts = K1_VARIANTS[variant]
    g = torch.Generator().manual_seed(5)
    model = torch.nn.Linear(4, 5).to(D)
    x0 = torch.randn(6, 4, dtype=D, generator=g)
    y = torch.randint(0, 5, (6,), generator=g)
    expected, expected_total = _penalty_step(
        lambda z, y: F.cross_entropy(z, y, **opts), model, x0, y
    )
    losses = dict(_k1_losses(opts))
    ce_opts = {k: v for k, v in opts.items() if k != "weight"}
    if "weight" not in opts:
        losses["weight_robust_r0"] = lambda z, y: fm.weight_robust_cross_entropy(
            z, y, 0.0, **ce_opts
        )
        losses["weight_noise_s0"] = lambda z, y: fm.weight_noise_worst_of_k_cross_entropy(
            z, y, 0.0, k=1, **ce_opts
        )
    for name, loss_fn in losses.items():
        got, total = _penalty_step(loss_fn, model, x0, y)
        torch.testing.assert_close(total, expected_total, msg=name)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)


def test_second_derivative_with_probability_targets_matches_cross_entropy():
    g = torch.Generator().manual_seed(6)
    z = torch.randn(4, 5, dtype=D, generator=g, requires_grad=True)
    p = torch.softmax(torch.randn(4, 5, dtype=D, generator=g), 1).requires_grad_(True)
    opts = dict(weight=_W, label_smoothing=0.1)

    def hessian_terms(loss):
        gz, gp = torch.autograd.grad(loss, (z, p), create_graph=True)
        return torch.autograd.grad(gz.pow(2).sum() + (gz * gp).sum(), (z, p))

    got = hessian_terms(fm.worst_of_k_cross_entropy(z.unsqueeze(1), p, dim=1, **opts))
    expected = hessian_terms(F.cross_entropy(z, p, **opts))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# --- the first-order path stays fused ------------------------------------------------------


def _forbid_composite(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the composite path ran on a first-order call")

    for name in ("worst_of_k_ce", "weight_noise_ce", "multiclass_margin", "all_layer_perturb"):
        monkeypatch.setattr(_composite, name, fail)
    monkeypatch.setattr(_composite, "differentiable_backward", fail)


@cases
def test_first_order_backward_does_not_use_the_composite(case, monkeypatch):
    inputs = fresh_inputs(case)
    _forbid_composite(monkeypatch)
    case.fm_fn(*inputs).sum().backward()
    assert all(t.grad is not None for t in inputs)


def test_compiled_first_order_does_not_use_the_composite(monkeypatch):
    _forbid_composite(monkeypatch)
    x = torch.randn(4, 3, 6, requires_grad=True)
    y = torch.randint(0, 6, (4,))
    fn = torch.compile(
        lambda x: fm.worst_of_k_cross_entropy(x, y, dim=1, temperature=0.5), fullgraph=True
    )
    fn(x).backward()
    expected = torch.autograd.grad(fm.worst_of_k_cross_entropy(x, y, dim=1, temperature=0.5), x)[0]
    torch.testing.assert_close(x.grad, expected)


def test_inplace_backward_refuses_create_graph():
    x = torch.randn(4, 2, 5, dtype=D, requires_grad=True)
    y = torch.randint(0, 5, (4,))
    loss = fm.worst_of_k_cross_entropy(x * 1.0, y, dim=1, inplace_backward=True)
    with pytest.raises(RuntimeError, match="inplace_backward"):
        torch.autograd.grad(loss, x, create_graph=True)
