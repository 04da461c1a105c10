"""Every op and path as a small float64 case, for the higher-order and forward-mode AD tests.

A case is a public fastmargin function and its plain-PyTorch reference over the same inputs
(all differentiable, all float64 on the CPU), so a test can compare any derivative of one with
the other's: gradients of gradients, Hessian-vector products, jvps, func.grad, vmap.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Callable, Tuple

import pytest
import torch

import fastmargin as fm
from fastmargin import reference as R
from fastmargin.weight_noise import draw_philox_state, noise_from_state

D = torch.float64
B, K, C = 3, 2, 5
NOISE_SEED = 7


@dataclass
class Case:
    name: str
    fm_fn: Callable[..., torch.Tensor]
    ref_fn: Callable[..., torch.Tensor]
    inputs: Tuple[torch.Tensor, ...]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, g):
    return torch.randn(*shape, dtype=D, generator=g).requires_grad_(True)


def _index_target(g, ignore=True):
    y = torch.randint(0, C, (B,), generator=g)
    if ignore:
        y[1] = -100  # one ignored sample in every index case
    return y


def _wok_case(name, *, dim, temperature=0.0, eps=0.0, weighted=False, reduction="mean",
              target="index"):  # fmt: skip
    g = _gen(zlib.crc32(name.encode()))
    shape = (B, K, C) if dim == 1 else (K, B, C)
    x = _randn(*shape, g=g)
    w = torch.rand(C, dtype=D, generator=g) + 0.5 if weighted else None
    opts = dict(
        dim=dim, temperature=temperature, label_smoothing=eps, reduction=reduction, weight=w
    )
    if target == "index":
        y = _index_target(g)
        return Case(
            name,
            lambda x: fm.worst_of_k_cross_entropy(x, y, **opts),
            lambda x: R.worst_of_k_cross_entropy(x, y, **opts),
            (x,),
        )
    p_shape = (B, C) if target == "shared" else shape
    p = torch.softmax(torch.randn(*p_shape, dtype=D, generator=g), dim=-1).requires_grad_(True)
    return Case(
        name,
        lambda x, p: fm.worst_of_k_cross_entropy(x, p, **opts),
        lambda x, p: R.worst_of_k_cross_entropy(x, p, **opts),
        (x, p),
    )


def _robust_case(name, *, eps=0.0, reduction="mean"):
    g = _gen(11)
    x, r = _randn(B, C, g=g), (torch.rand(B, dtype=D, generator=g) * 0.5).requires_grad_(True)
    y = _index_target(g)
    opts = dict(label_smoothing=eps, reduction=reduction)
    return Case(
        name,
        lambda x, r: fm.weight_robust_cross_entropy(x, y, r, **opts),
        lambda x, r: R.weight_robust_cross_entropy(x, y, r, **opts),
        (x, r),
    )


def _noise_case(name, *, temperature=0.0, eps=0.0, reduction="mean"):
    g = _gen(13)
    x, s = _randn(B, C, g=g), (torch.rand(B, dtype=D, generator=g) + 0.2).requires_grad_(True)
    y = _index_target(g)
    k = 3
    opts = dict(k=k, temperature=temperature, label_smoothing=eps, reduction=reduction)
    xi = noise_from_state(draw_philox_state("cpu", _gen(NOISE_SEED)), B, k, C)
    return Case(
        name,
        # A generator in the same state on every call: the same noise, a deterministic function.
        lambda x, s: fm.weight_noise_worst_of_k_cross_entropy(
            x, y, s, generator=_gen(NOISE_SEED), **opts
        ),
        lambda x, s: R.weight_noise_worst_of_k_cross_entropy(x, y, s, xi, **opts),
        (x, s),
    )


def _margin_case():
    g = _gen(17)
    x = _randn(B + 1, C, g=g)
    y = torch.randint(0, C, (B + 1,), generator=g)
    return Case(
        "margin", lambda x: fm.multiclass_margin(x, y), lambda x: R.multiclass_margin(x, y), (x,)
    )


def _perturb_case():
    g = _gen(19)
    u, delta = _randn(B, 2, 3, g=g), _randn(B, 2, 3, g=g)
    return Case("all_layer_perturb", fm.all_layer_perturb, R.all_layer_perturb, (u, delta))


CASES = [
    _wok_case("wok-index-hard", dim=1),
    _wok_case("wok-index-hard-smooth-dim0", dim=0, eps=0.2, reduction="none"),
    _wok_case("wok-index-tau", dim=1, temperature=0.5, reduction="sum"),
    _wok_case("wok-index-tau-smooth-weight-dim0", dim=0, temperature=0.3, eps=0.1, weighted=True),
    _wok_case("wok-index-hard-weight", dim=1, weighted=True, reduction="none"),
    _wok_case("wok-prob-shared-hard", dim=1, eps=0.1, target="shared"),
    _wok_case("wok-prob-shared-tau-weight", dim=0, temperature=0.5, weighted=True, target="shared"),
    _wok_case("wok-prob-per-copy-hard", dim=1, target="per_copy", reduction="none"),
    _wok_case("wok-prob-per-copy-tau-dim0", dim=0, temperature=0.4, eps=0.2, target="per_copy"),
    _robust_case("robust"),
    _robust_case("robust-smooth", eps=0.2, reduction="none"),
    _noise_case("noise-hard"),
    _noise_case("noise-tau-smooth", temperature=0.3, eps=0.1, reduction="none"),
    _margin_case(),
    _perturb_case(),
]

cases = pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])


def fresh_inputs(case: Case) -> Tuple[torch.Tensor, ...]:
    """The case's inputs as new leaves (tests must not share autograd state)."""
    return tuple(t.detach().clone().requires_grad_(True) for t in case.inputs)


def directions(inputs, seed: int = 1) -> Tuple[torch.Tensor, ...]:
    """Random tangent / cotangent directions shaped like ``inputs``."""
    g = _gen(seed)
    return tuple(torch.randn(t.shape, dtype=t.dtype, generator=g) for t in inputs)
