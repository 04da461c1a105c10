"""Helpers shared by test_soft_targets.py and test_class_weights.py: inputs in either copy
layout, dtype tolerances, the reference evaluated in float32 on the same rounded inputs, and
the comparison of values and gradients (logits, and probability targets when they are
differentiable)."""

from __future__ import annotations

import pytest
import torch

import fastmargin as fm
from fastmargin import reference as R

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]

# (loss rtol/atol, grad rtol/atol) against a float32 (float64 for float64) reference.
TOLS = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1e-2),
}


def make_logits(B, k, C, dim, dtype, device, gen, scale=3.0):
    shape = (k, B, C) if dim == 0 else (B, k, C)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
    return x.to(device=device, dtype=dtype).requires_grad_(True)


def make_probs(shape, dtype, device, gen):
    """Rows of class probabilities (a softmax of random scores, so not one-hot)."""
    t = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2).softmax(-1)
    return t.to(device=device, dtype=dtype)


def ref_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_against_reference(x, target, kwargs, weight=None):
    """fm vs reference on the same (rounded) inputs: loss, index, d/dlogits and, for
    floating targets that require grad, d/dtarget."""
    kwargs = {"dim": 1, **kwargs}  # (B, k, C) logits unless the caller names the layout
    tol = TOLS[x.dtype]
    rd = ref_dtype(x.dtype)
    xr = x.detach().to(rd).requires_grad_(True)
    soft = target.is_floating_point()
    tr = target.detach().to(rd).requires_grad_(target.requires_grad) if soft else target
    wr = None if weight is None else weight.to(rd)

    loss, index = fm.worst_of_k_cross_entropy(x, target, weight=weight, return_index=True, **kwargs)
    ref, ref_index = R.worst_of_k_cross_entropy(xr, tr, weight=wr, return_index=True, **kwargs)
    assert loss.dtype == x.dtype
    torch.testing.assert_close(loss.to(rd), ref, rtol=tol[0], atol=tol[0])
    if kwargs.get("temperature", 0.0) == 0.0 and x.dtype in (torch.float32, torch.float64):
        assert torch.equal(index.cpu(), ref_index.cpu())

    # A non-trivial upstream gradient, representable in the logits' dtype.
    grad_out = (torch.rand_like(ref) + 0.5).to(x.dtype).to(rd)
    inputs = [x] + ([target] if soft and target.requires_grad else [])
    ref_inputs = [xr] + ([tr] if soft and target.requires_grad else [])
    grads = torch.autograd.grad(loss, inputs, grad_out.to(loss.dtype))
    ref_grads = torch.autograd.grad(ref, ref_inputs, grad_out)
    for inp, g, rg in zip(inputs, grads, ref_grads):
        assert g.dtype == inp.dtype and g.shape == inp.shape
        torch.testing.assert_close(g.to(rd), rg, rtol=tol[1], atol=tol[1])
