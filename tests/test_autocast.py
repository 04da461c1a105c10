"""Under torch.autocast every fastmargin loss returns float32 as F.cross_entropy does (same
value), without a float32 copy of the logits; outside autocast the loss keeps the logits'
dtype."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import fastmargin as fm

HALF = [torch.bfloat16, torch.float16]


def _inputs(dtype, device="cpu", N=64, C=37, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(N, C, generator=gen)).to(device=device, dtype=dtype)
    y = torch.randint(0, C, (N,), generator=gen).to(device)
    return x.requires_grad_(True), y


def _losses(x, y):
    """Each loss in a form whose value is F.cross_entropy's (k = 1, radius 0, no noise)."""
    return {
        "worst_of_k (N, C)": lambda: fm.worst_of_k_cross_entropy(x, y, label_smoothing=0.1),
        "worst_of_k dim=0": lambda: fm.worst_of_k_cross_entropy(
            x.unsqueeze(0), y, dim=0, label_smoothing=0.1
        ),
        "module": lambda: fm.WorstOfKCrossEntropy(label_smoothing=0.1)(x, y),
        "weight_robust": lambda: fm.weight_robust_cross_entropy(x, y, 0.0, label_smoothing=0.1),
        "weight_robust module": lambda: fm.WeightRobustCrossEntropy(label_smoothing=0.1)(x, y, 0.0),
        "weight_noise": lambda: fm.weight_noise_worst_of_k_cross_entropy(
            x, y, 0.0, k=3, label_smoothing=0.1
        ),
        "weight_noise module": lambda: fm.WeightNoiseWorstOfKCrossEntropy(k=3, label_smoothing=0.1)(
            x, y, 0.0
        ),
    }


# F.cross_entropy's own value under autocast, against the float32 loss: exact on the CPU
# (autocast casts cross_entropy_loss to float32); on CUDA autocast has no cross_entropy_loss rule
# and its log_softmax keeps the half dtype, so the log-probabilities are rounded once first.
PYTORCH_AUTOCAST_TOL = {"cpu": (1e-5, 1e-5), "cuda": (1e-2, 1e-2)}


def _check_under_autocast(device, dtype):
    x, y = _inputs(dtype, device)
    exact = F.cross_entropy(x.detach().float(), y, label_smoothing=0.1)
    with torch.autocast(device, dtype=dtype):
        want = F.cross_entropy(x, y, label_smoothing=0.1)
        assert want.dtype == torch.float32
        (gw,) = torch.autograd.grad(want, x, retain_graph=True)
        for name, loss in _losses(x, y).items():
            got = loss()
            assert got.dtype == torch.float32, name
            torch.testing.assert_close(
                got, exact, rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}"
            )
            rtol, atol = PYTORCH_AUTOCAST_TOL[device]
            torch.testing.assert_close(
                got, want, rtol=rtol, atol=atol, msg=lambda m, name=name: f"{name}: {m}"
            )
            (g,) = torch.autograd.grad(got, x)
            assert g.dtype == dtype
            torch.testing.assert_close(
                g.float(), gw.float(), rtol=1e-2, atol=1e-4, msg=lambda m, name=name: f"{name}: {m}"
            )


@pytest.mark.parametrize("dtype", HALF)
def test_cpu_autocast_returns_float32_like_cross_entropy(dtype):
    _check_under_autocast("cpu", dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", HALF)
def test_cuda_autocast_returns_float32_like_cross_entropy(dtype):
    _check_under_autocast("cuda", dtype)


@pytest.mark.parametrize("dtype", HALF + [torch.float32])
def test_outside_autocast_the_loss_keeps_the_logits_dtype(dtype):
    x, y = _inputs(dtype)
    for name, loss in _losses(x, y).items():
        assert loss().dtype == F.cross_entropy(x, y).dtype == dtype, name


def test_autocast_of_another_device_or_float64_logits_changes_nothing():
    x, y = _inputs(torch.bfloat16)
    with torch.autocast("cuda", dtype=torch.float16, enabled=torch.cuda.is_available()):
        assert fm.worst_of_k_cross_entropy(x, y).dtype == torch.bfloat16  # CPU logits
    x64, y64 = _inputs(torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fm.worst_of_k_cross_entropy(x64, y64).dtype == torch.float64
        assert F.cross_entropy(x64, y64).dtype == torch.float64


def test_spatial_and_none_reduction_under_autocast():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 7, 3, 5, generator=gen).bfloat16()
    y = torch.randint(0, 7, (2, 3, 5), generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for reduction in ("mean", "sum", "none"):
            got = fm.worst_of_k_cross_entropy(x, y, reduction=reduction)
            want = F.cross_entropy(x, y, reduction=reduction)
            assert got.dtype == want.dtype == torch.float32
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


class _LogitsSizedFloat32(TorchDispatchMode):
    """Records every op that produces a float32 tensor with as many elements as the logits."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.seen = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.numel() == self.numel:
                self.seen.append(str(func))
        return out


def test_no_float32_copy_of_the_logits_under_autocast():
    x, y = _inputs(torch.bfloat16, N=32, C=129)
    x = x.detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with _LogitsSizedFloat32(x.numel()) as ours:
            fm.worst_of_k_cross_entropy(x, y)
            fm.weight_robust_cross_entropy(x, y, 0.1)
            fm.weight_noise_worst_of_k_cross_entropy(x, y, 0.1)
        with _LogitsSizedFloat32(x.numel()) as theirs:
            F.cross_entropy(x, y)
    assert ours.seen == []
    assert theirs.seen  # the probe sees F.cross_entropy's own float32 copy


def test_compiled_loss_under_autocast_is_float32():
    x, y = _inputs(torch.bfloat16)
    fn = torch.compile(lambda z, t: fm.worst_of_k_cross_entropy(z, t), fullgraph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fn(x, y)
        want = F.cross_entropy(x, y)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert fn(x, y).dtype == torch.bfloat16  # outside autocast: recompiled, the logits' dtype


def test_inplace_backward_under_autocast():
    x, y = _inputs(torch.bfloat16, N=16, C=21)
    base = x.detach().clone().requires_grad_(True)
    ref = x.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fm.worst_of_k_cross_entropy(base * 1.0, y, inplace_backward=True)
        want = fm.worst_of_k_cross_entropy(ref * 1.0, y)
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want)
    (0.7 * got).backward()
    (0.7 * want).backward()
    assert base.grad.dtype == torch.bfloat16
    torch.testing.assert_close(base.grad, ref.grad)
