"""The ops' own checks (the last line of defence for direct torch.ops calls), on the CPU build;
the CUDA build shares these checks (csrc/include/fastmargin/*.h) and runs them in the emulated
tests (tests/emu).

Inputs on another device are passed to the CPU kernel by redispatching to the CPU key: the
dispatcher would otherwise pick the other device's kernel, and the check must stop a kernel from
dereferencing a pointer of a device it does not run on.
"""

from __future__ import annotations

import pytest
import torch

import fastmargin  # noqa: F401  (loads the ops)

ops = torch.ops.fastmargin
CPU_KEYS = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)


def wok_forward(B=3, k=2, C=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, k, C, generator=g)
    t = torch.randint(0, C, (B,), generator=g)
    _, lse, w, _, _ = ops.worst_of_k_ce_fwd(x, t, None, 0.0, 0.0, -100)
    return x, t, lse, w


@pytest.mark.parametrize("which", ["grad_loss", "lse", "weight"])
def test_worst_of_k_backward_refuses_inputs_on_another_device(which):
    x, t, lse, w = wok_forward()
    args = {"grad_loss": torch.ones(3), "lse": lse, "weight": w}
    args[which] = args[which].to("meta")
    for op in (ops.worst_of_k_ce_bwd, ops.worst_of_k_ce_bwd_inplace):
        before = x.clone()
        with pytest.raises(RuntimeError, match=f"{which}: expected device cpu, got meta"):
            op.default.redispatch(
                CPU_KEYS,
                args["grad_loss"],
                x,
                t,
                None,
                args["lse"],
                args["weight"],
                0.0,
                -100,
                None,
            )
        assert torch.equal(x, before)


@pytest.mark.parametrize("which", ["grad_loss", "lse", "weight"])
def test_weight_noise_backward_refuses_inputs_on_another_device(which):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 6, generator=g)
    t = torch.randint(0, 6, (4,), generator=g)
    scale, philox = torch.rand(4, generator=g), torch.tensor([3, 4])
    _, lse, w, _ = ops.weight_noise_ce_fwd(x, t, scale, philox, 3, 0.0, 0.0, -100)
    args = {"grad_loss": torch.ones(4), "lse": lse, "weight": w}
    args[which] = args[which].to("meta")
    with pytest.raises(RuntimeError, match=f"{which}: expected device cpu, got meta"):
        ops.weight_noise_ce_bwd.default.redispatch(
            CPU_KEYS, args["grad_loss"], x, t, scale, philox, args["lse"], args["weight"], 0.0, -100
        )


def test_inplace_backward_refuses_expanded_logits():
    """Every copy of an expanded row is the same memory: the unselected copies' zeros would
    overwrite the selected copy's gradient, and z itself."""
    g = torch.Generator().manual_seed(2)
    z = torch.randn(3, 7, generator=g)
    x = z.unsqueeze(1).expand(3, 4, 7)
    t = torch.randint(0, 7, (3,), generator=g)
    _, lse, w, _, _ = ops.worst_of_k_ce_fwd(x, t, None, 0.0, 0.0, -100)
    before = z.clone()
    with pytest.raises(RuntimeError, match="logits: the in-place backward needs logits whose"):
        ops.worst_of_k_ce_bwd_inplace(torch.ones(3), x, t, None, lse, w, 0.0, -100)
    assert torch.equal(z, before)


def test_inplace_backward_refuses_overlapping_rows():
    g = torch.Generator().manual_seed(3)
    buf = torch.randn(20, generator=g)
    x = buf.as_strided((3, 2, 6), (4, 2, 1))  # rows overlap without a zero stride
    t = torch.randint(0, 6, (3,), generator=g)
    _, lse, w, _, _ = ops.worst_of_k_ce_fwd(x, t, None, 0.0, 0.0, -100)
    before = buf.clone()
    with pytest.raises(RuntimeError, match="do not share memory"):
        ops.worst_of_k_ce_bwd_inplace(torch.ones(3), x, t, None, lse, w, 0.0, -100)
    assert torch.equal(buf, before)


def test_inplace_backward_accepts_padded_and_transposed_logits():
    """Strided but non-overlapping layouts keep the in-place path: the result is the gradient."""
    g = torch.Generator().manual_seed(4)
    for x in (
        torch.randn(3, 2, 9, generator=g)[..., :7],  # padded class stride
        torch.randn(2, 3, 7, generator=g).transpose(0, 1),  # (k, B, C) memory
    ):
        t = torch.randint(0, 7, (3,), generator=g)
        _, lse, w, _, _ = ops.worst_of_k_ce_fwd(x, t, None, 0.0, 0.0, -100)
        expected = ops.worst_of_k_ce_bwd(torch.ones(3), x, t, None, lse, w, 0.0, -100)
        ops.worst_of_k_ce_bwd_inplace(torch.ones(3), x, t, None, lse, w, 0.0, -100)
        assert torch.equal(x, expected)


def test_inplace_backward_refuses_a_soft_target_in_the_logits_memory():
    g = torch.Generator().manual_seed(5)
    buf = torch.randn(3, 12, generator=g)
    x = buf[:, :8].unsqueeze(1)  # (3, 1, 8)
    target = torch.softmax(buf[:, 4:12], -1)  # a fresh tensor: fine
    _, lse, w, _, _ = ops.worst_of_k_ce_fwd(x, target, None, 0.0, 0.0, -100)
    overlapping = buf[:, 4:12]  # shares columns 4..7 of every logits row
    before = buf.clone()
    with pytest.raises(RuntimeError, match="target: the probability target shares memory"):
        ops.worst_of_k_ce_bwd_inplace(torch.ones(3), x, overlapping, None, lse, w, 0.0, -100)
    assert torch.equal(buf, before)
    ops.worst_of_k_ce_bwd_inplace(torch.ones(3), x, target, None, lse, w, 0.0, -100)


@pytest.mark.parametrize("shape", [(3, 0), (3, 2, 0)])
def test_soft_target_with_no_classes_is_refused(shape):
    """C == 0: the empty target has no data, and must not be taken for an index target."""
    x = torch.randn(3, 2, 0)
    target = torch.randn(*shape)
    with pytest.raises(RuntimeError, match="probability targets need at least one class"):
        ops.worst_of_k_ce_fwd(x, target, None, 0.0, 0.0, -100)
    lse, w = torch.zeros(3, 2), torch.zeros(3, 2)
    with pytest.raises(RuntimeError, match="probability targets need at least one class"):
        ops.worst_of_k_ce_bwd(torch.ones(3), x, target, None, lse, w, 0.0, -100)
