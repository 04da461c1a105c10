"""The guards of ``inplace_backward``: a second backward raises, leaf logits are refused,
memory that cannot take the gradient element for element takes the out-of-place path (inputs
unchanged, same gradient), a node that saved the logits notices the write, and the shapes
without a copy dim work too."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastmargin as fm


def _case(B=5, k=3, C=11, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(B, k, C, generator=gen), torch.randint(0, C, (B,), generator=gen)


def test_second_backward_raises_a_clear_error():
    logits, y = _case()
    base = logits.clone().requires_grad_(True)
    loss = fm.worst_of_k_cross_entropy(base * 1.0, y, dim=1, inplace_backward=True)
    loss.backward(retain_graph=True)
    first = base.grad.clone()
    with pytest.raises(RuntimeError, match="inplace_backward: .*second backward"):
        loss.backward()
    assert torch.equal(base.grad, first)  # the first gradient stands, untouched


@pytest.mark.parametrize("make", ["parameter", "leaf", "view of a leaf"])
def test_leaf_logits_are_refused_and_left_unchanged(make):
    logits, y = _case()
    leaf = nn.Parameter(logits.clone()) if make == "parameter" else logits.clone()
    leaf.requires_grad_(True)
    x = leaf.view(5, 3, 11) if make == "view of a leaf" else leaf
    with pytest.raises(RuntimeError, match="inplace_backward: logits are a leaf"):
        fm.worst_of_k_cross_entropy(x, y, dim=1, inplace_backward=True)
    assert torch.equal(leaf.detach(), logits)


def test_overlapping_logits_take_the_out_of_place_path():
    """One row expanded into k copies: writing the gradient over it would mix the copies."""
    gen = torch.Generator().manual_seed(1)
    z0 = torch.randn(6, 9, generator=gen)
    y = torch.randint(0, 9, (6,), generator=gen)
    noise = torch.randn(6, 3, 9, generator=gen)

    def gradient(inplace):
        base = z0.clone().requires_grad_(True)
        z = base * 1.0
        expanded = z.unsqueeze(1).expand(6, 3, 9)
        loss = fm.worst_of_k_cross_entropy(
            expanded, y, dim=1, temperature=0.5, inplace_backward=inplace
        )
        # The expanded logits feed the loss only; z also feeds a second term.
        (loss + (z * noise[:, 0]).sum()).backward()
        return z.detach(), base.grad

    z_after, g_inplace = gradient(True)
    assert torch.equal(z_after, z0)
    _z, g_plain = gradient(False)
    torch.testing.assert_close(g_inplace, g_plain)


def test_strided_window_of_a_larger_buffer_takes_the_out_of_place_path():
    logits, y = _case(seed=2)
    big = torch.zeros(5, 3, 20)
    big[..., :11] = logits
    base = big.clone().requires_grad_(True)
    out = base * 1.0
    window = out[..., :11]  # not dense: the write must not go through it
    fm.worst_of_k_cross_entropy(window, y, dim=1, inplace_backward=True).backward()
    assert torch.equal(out.detach(), big)
    ref = logits.clone().requires_grad_(True)
    fm.worst_of_k_cross_entropy(ref, y, dim=1).backward()
    torch.testing.assert_close(base.grad[..., :11], ref.grad)
    assert (base.grad[..., 11:] == 0).all()


def test_a_node_that_saved_the_logits_notices_the_write():
    """exp's backward needs its output: after the gradient overwrote it, autograd raises
    instead of reading the gradient as logits."""
    logits, y = _case(seed=3)
    base = logits.clone().requires_grad_(True)
    z = base.exp()
    loss = fm.worst_of_k_cross_entropy(z, y, dim=1, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("shape", [(7,), (6, 7), (3, 7, 4), (2, 7, 3, 2)])
@pytest.mark.parametrize("class_last", [False, True])
def test_shapes_without_a_copy_dim(shape, class_last):
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(shape, generator=gen, dtype=torch.float64)
    if class_last and len(shape) > 2:  # channels-last-like memory: the rows are a view
        logits = logits.movedim(1, -1).contiguous().movedim(-1, 1)
    samples = list(shape)
    del samples[min(1, len(shape) - 1)]
    y = torch.randint(0, 7, samples, generator=gen)
    base = logits.clone().requires_grad_(True)
    loss = fm.worst_of_k_cross_entropy(base * 1.0, y, label_smoothing=0.1, inplace_backward=True)
    (0.5 * loss).backward()
    ref = logits.clone().requires_grad_(True)
    want = F.cross_entropy(ref, y, label_smoothing=0.1)
    (0.5 * want).backward()
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(base.grad, ref.grad)
