"""Forward-mode AD and functorch transforms over every op: exact, never a silent zero.

jvp (torch.func and dual tensors) against central finite differences and against the
plain-PyTorch reference's jvp, and at k = 1 against F.cross_entropy; torch.func.grad and vmap
against the reference.
"""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from _autograd_cases import cases, directions, fresh_inputs

import fastmargin as fm

D = torch.float64


def _plain(case):
    return tuple(t.detach() for t in fresh_inputs(case))


@cases
def test_jvp_matches_finite_differences_and_reference(case):
    inputs = _plain(case)
    tangents = directions(inputs, seed=4)
    out, jvp = torch.func.jvp(case.fm_fn, inputs, tangents)
    ref_out, ref_jvp = torch.func.jvp(case.ref_fn, inputs, tangents)
    h = 1e-6
    with torch.no_grad():
        plus = case.fm_fn(*(x + h * t for x, t in zip(inputs, tangents)))
        minus = case.fm_fn(*(x - h * t for x, t in zip(inputs, tangents)))
    assert jvp.abs().max() > 1e-3  # not a silent zero
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(jvp, ref_jvp, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(jvp, (plus - minus) / (2 * h), rtol=1e-5, atol=1e-7)


@cases
def test_dual_tensors_match_reference_jvp(case):
    inputs = _plain(case)
    tangents = directions(inputs, seed=5)
    with fwAD.dual_level():
        out = case.fm_fn(*(fwAD.make_dual(x, t) for x, t in zip(inputs, tangents)))
        tangent = fwAD.unpack_dual(out).tangent
    _, expected = torch.func.jvp(case.ref_fn, inputs, tangents)
    assert tangent is not None
    torch.testing.assert_close(tangent, expected, rtol=1e-9, atol=1e-11)


@cases
def test_func_grad_matches_reference(case):
    inputs = _plain(case)
    (v,) = directions((case.ref_fn(*inputs),), seed=6)
    argnums = tuple(range(len(inputs)))

    def scalar(fn):
        return lambda *a: (fn(*a) * v).sum()

    got = torch.func.grad(scalar(case.fm_fn), argnums=argnums)(*inputs)
    expected = torch.func.grad(scalar(case.ref_fn), argnums=argnums)(*inputs)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@cases
def test_vmap_over_first_input_matches_reference(case):
    inputs = _plain(case)
    (t,) = directions(inputs[:1], seed=7)
    batch = torch.stack([inputs[0], inputs[0] + 0.5 * t, inputs[0] - t])
    rest = inputs[1:]
    # The weight-noise loss draws its Philox state inside the call: vmap must be told the
    # randomness is shared (its default refuses random ops, as for dropout).
    randomness = "same" if case.name.startswith("noise") else "error"
    got = torch.func.vmap(lambda x: case.fm_fn(x, *rest), randomness=randomness)(batch)
    expected = torch.stack([case.ref_fn(x, *rest) for x in batch])
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_vmap_of_weight_noise_without_randomness_raises():
    x = torch.randn(3, 4, 5, dtype=D)
    y = torch.randint(0, 5, (4,))
    with pytest.raises(RuntimeError, match="randomness"):
        torch.func.vmap(lambda x: fm.weight_noise_worst_of_k_cross_entropy(x, y, 0.1, k=2))(x)


def test_jacfwd_hessian_matches_reference():
    # jacfwd over jacrev: forward mode over reverse mode through the differentiable backward.
    x = torch.randn(2, 2, 4, dtype=D)
    y = torch.tensor([1, 3])

    def loss(fn):
        return lambda x: fn(x, y, dim=1, temperature=0.4, label_smoothing=0.1)

    from fastmargin import reference as R

    got = torch.func.hessian(loss(fm.worst_of_k_cross_entropy))(x)
    expected = torch.func.hessian(loss(R.worst_of_k_cross_entropy))(x)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-11)


# --- k = 1 against F.cross_entropy ---------------------------------------------------------

_W = torch.tensor([0.5, 1.0, 2.0, 1.5, 0.7], dtype=D)


_K1 = {
    "plain": dict(),
    "smooth": dict(label_smoothing=0.2),
    "weight-none": dict(weight=_W, reduction="none"),
    "ignore": dict(ignore_index=1),  # index targets only, as in F.cross_entropy
}
_K1_CASES = [(name, soft) for name in _K1 for soft in (False, True) if name != "ignore" or not soft]


@pytest.mark.parametrize(
    "name, soft", _K1_CASES, ids=[f"{n}-{'prob' if s else 'index'}" for n, s in _K1_CASES]
)
def test_jvp_k1_matches_cross_entropy(name, soft):
    opts = _K1[name]
    g = torch.Generator().manual_seed(8)
    z, tz = (torch.randn(6, 5, dtype=D, generator=g) for _ in range(2))
    if soft:
        y = torch.softmax(torch.randn(6, 5, dtype=D, generator=g), 1)
        primals, tangents = (z, y), (tz, torch.randn(6, 5, dtype=D, generator=g))
    else:
        y = torch.randint(0, 5, (6,), generator=g)
        primals, tangents = (z,), (tz,)

    def ours(z, *t):
        return fm.worst_of_k_cross_entropy(z.unsqueeze(1), t[0] if t else y, dim=1, **opts)

    def theirs(z, *t):
        return F.cross_entropy(z, t[0] if t else y, **opts)

    got = torch.func.jvp(ours, primals, tangents)
    expected = torch.func.jvp(theirs, primals, tangents)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_jvp_primal_of_low_precision_inputs_equals_the_fused_value():
    # The composite forms compute in float32 for half inputs, as the kernels do.
    x = torch.randn(6, 3, 7).to(torch.bfloat16)
    yx = torch.randint(0, 7, (6,))
    for opts in (dict(), dict(temperature=0.5, label_smoothing=0.1, reduction="none")):
        primal, _ = torch.func.jvp(
            lambda x, o=opts: fm.worst_of_k_cross_entropy(x, yx, dim=1, **o),
            (x,),
            (torch.ones_like(x),),
        )
        assert primal.dtype == torch.bfloat16
        torch.testing.assert_close(primal, fm.worst_of_k_cross_entropy(x, yx, dim=1, **opts))
    z32 = torch.randn(6, 7)
    s = torch.rand(6)

    def noisy(z):
        gen = torch.Generator().manual_seed(3)
        return fm.weight_noise_worst_of_k_cross_entropy(z, yx, s, k=3, generator=gen)

    primal, _ = torch.func.jvp(noisy, (z32,), (torch.ones_like(z32),))
    torch.testing.assert_close(primal, noisy(z32))
    z = torch.randn(5, 7).to(torch.bfloat16)
    y = torch.randint(0, 7, (5,))
    primal, _ = torch.func.jvp(lambda z: fm.multiclass_margin(z, y), (z,), (torch.ones_like(z),))
    assert primal.dtype == torch.bfloat16
    torch.testing.assert_close(primal, fm.multiclass_margin(z, y))
    u = torch.randn(3, 4, 5).to(torch.float16)
    delta = torch.randn(3, 4, 5)
    out, _ = torch.func.jvp(lambda u: fm.all_layer_perturb(u, delta), (u,), (torch.ones_like(u),))
    torch.testing.assert_close(out, fm.all_layer_perturb(u, delta))


def test_jvp_with_inplace_backward_takes_the_differentiable_path():
    x = torch.randn(4, 2, 5, dtype=D, requires_grad=True)
    y = torch.randint(0, 5, (4,))
    t = torch.randn_like(x)
    with fwAD.dual_level():
        loss = fm.worst_of_k_cross_entropy(
            fwAD.make_dual(x, t), y, dim=1, temperature=0.3, inplace_backward=True
        )
        got = fwAD.unpack_dual(loss).tangent
    from fastmargin import reference as R

    _, expected = torch.func.jvp(
        lambda x: R.worst_of_k_cross_entropy(x, y, dim=1, temperature=0.3), (x.detach(),), (t,)
    )
    torch.testing.assert_close(got, expected)


def test_jvp_inside_a_compiled_function_is_exact():
    g = torch.Generator().manual_seed(9)
    x, t = (torch.randn(4, 1, 5, generator=g) for _ in range(2))
    y = torch.randint(0, 5, (4,), generator=g)

    def f(x):
        return fm.worst_of_k_cross_entropy(x, y, dim=1)

    got = torch.compile(lambda x, t: torch.func.jvp(f, (x,), (t,)))(x, t)
    expected = torch.func.jvp(lambda x: F.cross_entropy(x[:, 0], y), (x,), (t,))
    torch.testing.assert_close(got, expected)


def test_vmap_over_radius_and_scale_with_validation_on():
    from fastmargin import reference as R

    g = torch.Generator().manual_seed(10)
    x = torch.randn(3, 5, dtype=D, generator=g)
    y = torch.randint(0, 5, (3,), generator=g)
    radii = torch.rand(2, 3, dtype=D, generator=g)
    got = torch.func.vmap(lambda r: fm.weight_robust_cross_entropy(x, y, r))(radii)
    expected = torch.stack([R.weight_robust_cross_entropy(x, y, r) for r in radii])
    torch.testing.assert_close(got, expected)
    got = torch.func.vmap(
        lambda s: fm.weight_noise_worst_of_k_cross_entropy(x, y, s, k=1), randomness="same"
    )(radii * 0)
    torch.testing.assert_close(got, torch.nn.functional.cross_entropy(x, y).expand(2))


def test_vmap_over_class_index_targets_with_validation_on():
    # Batched targets cannot be read on the host under vmap: the range check is skipped for
    # them (as with validation off) instead of raising a data-dependent control-flow error.
    g = torch.Generator().manual_seed(11)
    x = torch.randn(4, 6, dtype=D, generator=g)
    targets = torch.randint(0, 6, (3, 4), generator=g)
    got = torch.func.vmap(lambda t: fm.worst_of_k_cross_entropy(x, t))(targets)
    expected = torch.stack([torch.nn.functional.cross_entropy(x, t) for t in targets])
    torch.testing.assert_close(got, expected)
