"""fm.weight_noise_worst_of_k_cross_entropy: kernels vs the reference that materialises the same
noise, the statistics of z + s*xi vs explicit last-layer weight noise, gradients, RNG discipline,
torch.library / torch.compile integration and bad inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastmargin as fm
from fastmargin import reference as ref
from fastmargin import weight_noise as wn

ops = torch.ops.fastmargin

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=2e-5, atol=2e-5),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
}


def make_inputs(N, C, dtype, device, *, ignore=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(N, C, generator=g)).to(dtype).to(device)
    target = torch.randint(0, C, (N,), generator=g)
    if ignore and N > 1:
        target[1] = -100
    scale = (0.2 + 1.5 * torch.rand(N, generator=g)).to(device)
    return logits, target.to(device), scale


def fused_and_reference(logits, target, scale, *, k, generator_seed=123, **kw):
    """Runs the public function with a seeded generator and the reference with the exact noise
    that generator's draw gives (both in float32 for half inputs, as the kernels accumulate)."""
    device = logits.device
    gen = torch.Generator(device=device).manual_seed(generator_seed)
    out = fm.weight_noise_worst_of_k_cross_entropy(
        logits, target, scale, k=k, generator=gen, return_index=True, **kw
    )
    gen = torch.Generator(device=device).manual_seed(generator_seed)
    xi = wn.noise_from_state(wn.draw_philox_state(device, gen), logits.shape[0], k, logits.shape[1])
    acc = logits.detach().double() if logits.dtype == torch.float64 else logits.detach().float()
    acc.requires_grad_(logits.requires_grad)
    if isinstance(scale, torch.Tensor):
        s = scale.detach().to(acc.dtype).requires_grad_(scale.requires_grad)
    else:
        s = scale
    expected = ref.weight_noise_worst_of_k_cross_entropy(
        acc, target, s, xi, k=k, return_index=True, **kw
    )
    return out, expected, acc, s


def assert_worst_index(index, exp_index, logits, target, scale, xi, eps):
    """The kernels' worst copy is the reference's, or (a tie up to rounding, e.g. C = 1 where
    every copy's CE is 0) a copy with the same loss."""
    N, C = logits.shape
    s = torch.as_tensor(scale, dtype=torch.float64, device=logits.device).expand(N)
    noisy = logits.detach().double().unsqueeze(1) + s.view(N, 1, 1) * xi.double()
    per_copy = ref.cross_entropy_per_copy(noisy, target, label_smoothing=eps)
    rows = torch.arange(N, device=logits.device)
    valid = target != -100
    chosen, best = per_copy[rows, index], per_copy[rows, exp_index]
    assert torch.allclose(chosen[valid], best[valid], rtol=1e-5, atol=1e-5)


CASES = [
    # N, C, k, temperature, label_smoothing
    (1, 5, 1, 0.0, 0.0),
    (4, 7, 3, 0.0, 0.0),
    (5, 8, 4, 0.0, 0.1),
    (6, 33, 9, 0.0, 0.0),  # k > 8: the CUDA forward sweeps the row in chunks of 8 copies
    (3, 2, 5, 0.5, 0.0),
    (4, 1, 2, 0.0, 0.2),
    (3, 19, 4, 0.7, 0.3),
    (2, 2100, 3, 0.0, 0.05),  # a block per row on CUDA, with a tail of 2100 mod 8 classes
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("N,C,k,tau,eps", CASES)
def test_matches_reference_values_and_gradients(device, N, C, k, tau, eps):
    logits, target, scale = make_inputs(N, C, torch.float32, device, ignore=True)
    logits.requires_grad_(True)
    scale.requires_grad_(True)
    (loss, index), (exp_loss, exp_index), acc, s = fused_and_reference(
        logits, target, scale, k=k, temperature=tau, label_smoothing=eps, reduction="sum"
    )
    torch.testing.assert_close(loss, exp_loss, **TOL[torch.float32])
    if tau == 0.0:
        gen = torch.Generator(device=device).manual_seed(123)
        xi = wn.noise_from_state(wn.draw_philox_state(device, gen), N, k, C)
        assert_worst_index(index, exp_index, logits, target, scale, xi, eps)
    (g_logits, g_scale) = torch.autograd.grad(loss, (logits, scale))
    (e_logits, e_scale) = torch.autograd.grad(exp_loss, (acc, s))
    torch.testing.assert_close(g_logits, e_logits, **TOL[torch.float32])
    torch.testing.assert_close(g_scale, e_scale, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("C", [1, 2, 3, 10, 17])
@pytest.mark.parametrize("tau", [0.0, 0.5])
def test_many_rows_with_skipped_masked_and_nan_rows(C, tau):
    # The CPU kernels generate the noise of several rows at once (about 512 Philox blocks per
    # batch, only for the rows and copies that are used): with 300 rows the batches end mid-row,
    # and ignored / NaN rows and (tau = 0) unselected copies must not shift any row's noise.
    N, k = 300, 4
    logits, target, scale = make_inputs(N, C, torch.float32, "cpu", seed=C)
    target[::7] = -100
    if C > 1:
        logits[1::5, C - 1] = float("-inf")
        target[1::5] = 0
    logits[3::11, 0] = float("nan")
    target[3::11] = C - 1  # NaN rows take part (an ignored row is never read)
    logits.requires_grad_(True)
    scale.requires_grad_(True)
    (loss, _), (exp_loss, _), acc, s = fused_and_reference(
        logits, target, scale, k=k, temperature=tau, reduction="none"
    )
    nan_rows = torch.zeros(N, dtype=torch.bool)
    nan_rows[3::11] = True
    assert torch.isnan(loss[nan_rows]).all()
    keep = ~nan_rows
    torch.testing.assert_close(loss[keep], exp_loss[keep], **TOL[torch.float32])
    assert (loss[target == -100] == 0).all()
    (g_logits, g_scale) = torch.autograd.grad(loss[keep].sum(), (logits, scale))
    (e_logits, e_scale) = torch.autograd.grad(exp_loss[keep].sum(), (acc, s))
    # (A NaN row's gradient is NaN times its zero upstream gradient: compared elsewhere.)
    torch.testing.assert_close(g_logits[keep], e_logits[keep], **TOL[torch.float32])
    torch.testing.assert_close(g_scale[keep], e_scale[keep], rtol=1e-4, atol=1e-4)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    N=st.integers(1, 6),
    C=st.sampled_from([1, 2, 3, 4, 5, 8, 9, 31, 64, 67]),
    k=st.integers(1, 10),
    tau=st.sampled_from([0.0, 0.3, 2.0]),
    eps=st.sampled_from([0.0, 0.15]),
    row_stride_pad=st.integers(0, 3),
    seed=st.integers(0, 2**62),
)
def test_property_shapes_strides_and_copies(N, C, k, tau, eps, row_stride_pad, seed):
    base, target, scale = make_inputs(N, C + row_stride_pad, torch.float32, "cpu", seed=seed % 97)
    logits = base[:, :C]  # row stride C + pad: rows read in place
    target = target % C
    philox = wn.philox_state(seed, seed // 3)
    loss, lse, weight, index = ops.weight_noise_ce_fwd(
        logits, target, scale, philox, k, tau, eps, -100
    )
    xi = wn.noise_from_state(philox, N, k, C)
    exp, exp_index = ref.weight_noise_worst_of_k_cross_entropy(
        logits,
        target,
        scale,
        xi,
        k=k,
        temperature=tau,
        label_smoothing=eps,
        reduction="none",
        return_index=True,
    )
    torch.testing.assert_close(loss, exp, **TOL[torch.float32])
    if tau == 0.0:
        assert_worst_index(index, exp_index, logits, target, scale, xi, eps)
    torch.testing.assert_close(weight.sum(1), torch.ones(N), **TOL[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tau", [0.0, 0.4])
def test_dtypes_against_the_reference_on_rounded_inputs(device, dtype, tau):
    logits, target, scale = make_inputs(5, 37, dtype, device, ignore=True)
    logits.requires_grad_(True)
    scale = scale.double() if dtype == torch.float64 else scale
    scale.requires_grad_(True)
    (loss, _), (exp_loss, _), acc, s = fused_and_reference(
        logits, target, scale, k=3, temperature=tau, label_smoothing=0.1, reduction="none"
    )
    assert loss.dtype == dtype
    torch.testing.assert_close(loss, exp_loss.to(dtype), **TOL[dtype])
    g_logits, g_scale = torch.autograd.grad(loss.float().sum(), (logits, scale))
    e_logits, e_scale = torch.autograd.grad(exp_loss.sum(), (acc, s))
    assert g_logits.dtype == dtype
    torch.testing.assert_close(g_logits.to(e_logits.dtype), e_logits, **TOL[dtype])
    torch.testing.assert_close(g_scale.to(e_scale.dtype), e_scale, **TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions_ignore_index_and_float_scale(device, reduction):
    logits, target, _ = make_inputs(6, 10, torch.float32, device, ignore=True)
    (loss, _), (exp_loss, _), _, _ = fused_and_reference(
        logits, target, 0.8, k=2, reduction=reduction
    )
    torch.testing.assert_close(loss, exp_loss, **TOL[torch.float32])
    if reduction == "none":
        assert float(loss[1]) == 0.0  # the ignored sample


@pytest.mark.parametrize("device", DEVICES)
def test_zero_scale_is_plain_cross_entropy(device):
    logits, target, _ = make_inputs(7, 11, torch.float32, device, ignore=True)
    logits.requires_grad_(True)
    loss, index = fm.weight_noise_worst_of_k_cross_entropy(
        logits, target, 0.0, k=4, return_index=True
    )
    expected = F.cross_entropy(logits, target)
    torch.testing.assert_close(loss, expected, **TOL[torch.float32])
    assert torch.equal(index, torch.zeros_like(index))  # all copies tie: the lowest j wins
    (g,) = torch.autograd.grad(loss, logits)
    (e,) = torch.autograd.grad(expected, logits)
    torch.testing.assert_close(g, e, **TOL[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
def test_masked_classes_and_nan_rows(device):
    logits, target, scale = make_inputs(3, 9, torch.float32, device)
    logits[0, 4] = float("-inf")
    target[0] = 2
    logits[2, 3] = float("nan")
    logits.requires_grad_(True)
    (loss, _), (exp_loss, _), acc, _ = fused_and_reference(
        logits, target, scale, k=3, reduction="none"
    )
    assert torch.isfinite(loss[:2]).all() and torch.isnan(loss[2])
    torch.testing.assert_close(loss[:2], exp_loss[:2], **TOL[torch.float32])
    (g,) = torch.autograd.grad(loss[:2].sum(), logits)
    assert float(g[0, 4]) == 0.0
    (e,) = torch.autograd.grad(exp_loss[:2].sum(), acc)
    torch.testing.assert_close(g[:2], e[:2], **TOL[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
def test_class_dim_strided_rows_and_batch_of_one(device):
    base, target, scale = make_inputs(4, 24, torch.float32, device)
    target = target % 12
    view = base[:, ::2]  # class stride 2: copied once
    (loss, _), (exp_loss, _), _, _ = fused_and_reference(view, target, scale, k=2)
    torch.testing.assert_close(loss, exp_loss, **TOL[torch.float32])
    rows = base[::2, 3:15]  # row stride 48, class stride 1, unaligned start: read in place
    (loss, _), (exp_loss, _), _, _ = fused_and_reference(rows, target[::2], scale[::2], k=3)
    torch.testing.assert_close(loss, exp_loss, **TOL[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device):
    logits = torch.randn(0, 5, device=device, requires_grad=True)
    target = torch.zeros(0, dtype=torch.long, device=device)
    loss = fm.weight_noise_worst_of_k_cross_entropy(logits, target, 1.0, reduction="sum")
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert logits.grad.shape == (0, 5)
    mean = fm.weight_noise_worst_of_k_cross_entropy(logits, target, 1.0)
    assert torch.isnan(mean)  # as F.cross_entropy: 0 / 0


# --- RNG discipline --------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_consecutive_calls_differ_and_seeding_reproduces(device):
    logits, target, scale = make_inputs(8, 12, torch.float32, device)
    f = fm.weight_noise_worst_of_k_cross_entropy
    a = f(logits, target, scale, reduction="none")
    b = f(logits, target, scale, reduction="none")
    assert not torch.equal(a, b)
    torch.manual_seed(7)
    c = f(logits, target, scale, reduction="none")
    torch.manual_seed(7)
    d = f(logits, target, scale, reduction="none")
    assert torch.equal(c, d)
    gen = torch.Generator(device=device)
    e = f(logits, target, scale, reduction="none", generator=gen.manual_seed(3))
    g2 = f(logits, target, scale, reduction="none", generator=gen.manual_seed(3))
    assert torch.equal(e, g2)


def test_same_state_is_bitwise_deterministic_and_backward_regenerates_the_noise():
    logits, target, scale = make_inputs(5, 13, torch.float32, "cpu")
    philox = wn.philox_state(11, 22)
    out1 = ops.weight_noise_ce_fwd(logits, target, scale, philox, 3, 0.3, 0.1, -100)
    out2 = ops.weight_noise_ce_fwd(logits, target, scale, philox, 3, 0.3, 0.1, -100)
    for x, y in zip(out1, out2):
        assert torch.equal(x, y)
    # The backward with the same state gives the reference gradient (noise regenerated); with a
    # different state it does not.
    g = torch.ones(5)
    grad, grad_scale = ops.weight_noise_ce_bwd(
        g, logits, target, scale, philox, out1[1], out1[2], 0.1, -100
    )
    xi = wn.noise_from_state(philox, 5, 3, 13)
    acc = logits.clone().requires_grad_(True)
    s = scale.clone().requires_grad_(True)
    exp = ref.weight_noise_worst_of_k_cross_entropy(
        acc, target, s, xi, k=3, temperature=0.3, label_smoothing=0.1, reduction="sum"
    )
    e_grad, e_scale = torch.autograd.grad(exp, (acc, s))
    torch.testing.assert_close(grad, e_grad, **TOL[torch.float32])
    torch.testing.assert_close(grad_scale, e_scale, rtol=1e-4, atol=1e-5)
    other, _ = ops.weight_noise_ce_bwd(
        g, logits, target, scale, wn.philox_state(11, 23), out1[1], out1[2], 0.1, -100
    )
    assert not torch.allclose(other, e_grad, atol=1e-3)


def test_module_form_matches_the_function():
    logits, target, scale = make_inputs(6, 9, torch.float32, "cpu")
    mod = fm.WeightNoiseWorstOfKCrossEntropy(k=3, temperature=0.2, label_smoothing=0.1)
    assert "k=3" in repr(mod)
    gen = torch.Generator()
    a, ia = mod(logits, target, scale, return_index=True, generator=gen.manual_seed(5))
    b, ib = fm.weight_noise_worst_of_k_cross_entropy(
        logits,
        target,
        scale,
        k=3,
        temperature=0.2,
        label_smoothing=0.1,
        return_index=True,
        generator=gen.manual_seed(5),
    )
    assert torch.equal(a, b) and torch.equal(ia, ib)
    with pytest.raises(ValueError, match="k: expected 1 <= k"):
        fm.WeightNoiseWorstOfKCrossEntropy(k=0)


# --- the weight-perturbation argument -----------------------------------------------------------


def ks_two_sample(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic sup |F_a - F_b| (own implementation)."""
    a, b = np.sort(a), np.sort(b)
    grid = np.concatenate([a, b])
    fa = np.searchsorted(a, grid, side="right") / a.size
    fb = np.searchsorted(b, grid, side="right") / b.size
    return float(np.abs(fa - fb).max())


def test_logit_noise_matches_explicit_last_layer_weight_noise():
    """z + s xi (s = sigma ||h||, xi the kernels' noise) vs (W + E) h + b with E_cd ~ N(0, sigma^2):
    per class the same mean, variance and distribution (two-sample KS at alpha = 0.001)."""
    C, D, M, sigma = 3, 6, 20000, 0.7
    g = torch.Generator().manual_seed(0)
    W = torch.randn(C, D, generator=g, dtype=torch.float64)
    b = torch.randn(C, generator=g, dtype=torch.float64)
    h = torch.randn(D, generator=g, dtype=torch.float64)
    z = W @ h + b
    E = sigma * torch.randn(M, C, D, generator=g, dtype=torch.float64)
    explicit = (W + E) @ h + b  # (M, C)
    s = sigma * h.norm()
    xi = wn.noise(2718, 28, 1, M, C)[0].double()  # M copies of one row
    fused = z + s * xi
    critical = 1.949 * math.sqrt(2.0 / M)  # c(0.001) * sqrt((n + m) / (n m))
    for c in range(C):
        x, y = fused[:, c], explicit[:, c]
        se = float(s) * math.sqrt(2.0 / M)
        assert abs(float(x.mean() - y.mean())) < 4.5 * se
        assert abs(float(x.var() / y.var()) - 1.0) < 4.5 * 2.0 / math.sqrt(M)
        assert abs(float(x.var()) / float(s) ** 2 - 1.0) < 4.5 * math.sqrt(2.0 / M)
        assert ks_two_sample(x.numpy(), y.numpy()) < critical
    # Different classes are independent, as rows of E are.
    corr = torch.corrcoef(fused.T)
    assert (corr - torch.eye(C, dtype=corr.dtype)).abs().max() < 4.5 / math.sqrt(M)
    stats = pytest.importorskip("scipy.stats")
    for c in range(C):
        assert stats.ks_2samp(fused[:, c].numpy(), explicit[:, c].numpy()).pvalue > 1e-3


def test_scale_gradient_is_unbiased_for_the_explicit_weight_noise_gradient():
    """E[d loss / d h] with the reparameterised scale equals the explicit-E gradient's mean."""
    C, D, M, sigma = 4, 5, 4000, 0.5
    g = torch.Generator().manual_seed(1)
    W = torch.randn(C, D, generator=g)
    h = torch.randn(D, generator=g)
    y = torch.tensor([2])
    # Explicit: mean over E of grad_h CE((W + E) h).
    E = sigma * torch.randn(M, C, D, generator=g)
    hh = h.clone().requires_grad_(True)
    explicit = F.cross_entropy((W + E) @ hh, y.expand(M), reduction="sum") / M
    (g_explicit,) = torch.autograd.grad(explicit, hh)
    # Fused, k = 1: the same h repeated M times, one noise draw per row.
    hf = h.clone().requires_grad_(True)
    rows = (W @ hf).expand(M, C)
    scale = (sigma * hf.norm()).expand(M)
    fused = fm.weight_noise_worst_of_k_cross_entropy(
        rows, y.expand(M), scale, k=1, generator=torch.Generator().manual_seed(2)
    )
    (g_fused,) = torch.autograd.grad(fused, hf)
    # Both are Monte-Carlo means of M draws: compare within a few standard errors.
    # Per-draw explicit gradients (W + E)^T (softmax - onehot) give the standard error; the fused
    # estimator has no larger variance (Rao-Blackwell), so sqrt(2) * se bounds the difference's.
    WE = W + E
    resid = torch.softmax(WE @ h, dim=1) - F.one_hot(y, C).float()
    per_sample = torch.einsum("mcd,mc->md", WE, resid)
    torch.testing.assert_close(per_sample.mean(0), g_explicit, rtol=1e-4, atol=1e-5)
    se = per_sample.std(dim=0) / math.sqrt(M)
    assert ((g_fused - g_explicit).abs() < 5 * math.sqrt(2) * se + 1e-4).all()


# --- gradcheck, opcheck, compile ---------------------------------------------------------------


@pytest.mark.parametrize("tau,eps", [(0.0, 0.0), (0.6, 0.1)])
def test_gradcheck_with_the_noise_fixed(tau, eps):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    scale = (0.3 + torch.rand(4, generator=g, dtype=torch.float64)).requires_grad_(True)
    target = torch.tensor([0, 5, -100, 2])
    philox = wn.philox_state(4, 5)

    def f(lg, sc):
        return ops.weight_noise_ce_fwd(lg, target, sc, philox, 3, tau, eps, -100)[0]

    assert torch.autograd.gradcheck(f, (logits, scale))


def opcheck_args(device):
    logits, target, scale = make_inputs(5, 11, torch.float32, device, ignore=True)
    philox = wn.philox_state(1, 2, device)
    return logits.requires_grad_(True), target, scale.requires_grad_(True), philox


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    logits, target, scale, philox = opcheck_args(device)
    for args in [
        (logits, target, scale, philox, 3, 0.0, 0.0, -100),
        (logits, target, scale, philox, 9, 0.5, 0.1, -100),
        (logits.detach().half(), target, scale.detach(), philox, 2, 0.0, 0.0, -100),
    ]:
        torch.library.opcheck(ops.weight_noise_ce_fwd, args)
    out = ops.weight_noise_ce_fwd(
        logits.detach(), target, scale.detach(), philox, 3, 0.0, 0.0, -100
    )
    torch.library.opcheck(
        ops.weight_noise_ce_bwd,
        (torch.ones(5, device=device), logits.detach(), target, scale.detach(), philox)
        + (out[1], out[2], 0.0, -100),
    )


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph(device):
    torch._dynamo.reset()
    logits, target, scale, philox = opcheck_args(device)

    def step(lg, tg, sc, ph):
        return ops.weight_noise_ce_fwd(lg, tg, sc, ph, 3, 0.2, 0.0, -100)[0].sum()

    eager = step(logits, target, scale, philox)
    compiled = torch.compile(step, fullgraph=True)(logits, target, scale, philox)
    torch.testing.assert_close(compiled, eager, **TOL[torch.float32])
    grads = [torch.autograd.grad(x, (logits, scale)) for x in (eager, compiled)]
    torch.testing.assert_close(grads[1], grads[0], **TOL[torch.float32])
    scale.grad = None
    # The public function, drawing its state inside the graph, also traces without a break.
    public = torch.compile(fm.weight_noise_worst_of_k_cross_entropy, fullgraph=True)
    loss = public(logits, target, scale, k=3)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(scale.grad).all()
    assert not torch.equal(public(logits, target, scale, k=3), loss)


# --- bad inputs ------------------------------------------------------------------------------


BAD_LOGITS = torch.randn(4, 5)
BAD_TARGET = torch.tensor([0, 1, 2, 3])
BAD_SCALE = torch.rand(4)


def _f(logits=BAD_LOGITS, target=BAD_TARGET, scale=BAD_SCALE, **kw):
    return fm.weight_noise_worst_of_k_cross_entropy(logits, target, scale, **kw)


def _op(scale=BAD_SCALE, philox=None, k=2):
    philox = wn.philox_state(0, 0) if philox is None else philox
    return ops.weight_noise_ce_fwd(BAD_LOGITS, BAD_TARGET, scale, philox, k, 0.0, 0.0, -100)


BAD_CASES = {
    "negative_scale": (lambda: _f(scale=-0.5), ValueError, "scale: expected a finite value >= 0"),
    "nan_scale": (lambda: _f(scale=float("nan")), ValueError, "scale"),
    "negative_scale_tensor": (lambda: _f(scale=BAD_SCALE - 1.0), ValueError, "scale: expected"),
    "inf_scale_tensor": (lambda: _f(scale=torch.full((4,), math.inf)), ValueError, "scale"),
    "scale_shape": (lambda: _f(scale=torch.ones(3)), ValueError, "scale: expected a float"),
    "scale_dtype": (lambda: _f(scale=torch.ones(4, dtype=torch.long)), TypeError, "scale"),
    "scale_type": (lambda: _f(scale="1"), TypeError, "scale"),
    "k_zero": (lambda: _f(k=0), ValueError, "k: expected 1 <= k"),
    "k_negative": (lambda: _f(k=-2), ValueError, "k: expected 1 <= k"),
    "k_too_large": (lambda: _f(k=2**21), ValueError, "k: expected 1 <= k"),
    "k_float": (lambda: _f(k=2.0), TypeError, "k: expected an int"),
    "k_bool": (lambda: _f(k=True), TypeError, "k: expected an int"),
    "logits_rank": (lambda: _f(logits=BAD_LOGITS[None]), ValueError, "logits: expected a 2-D"),
    "logits_no_classes": (lambda: _f(logits=BAD_LOGITS[:, :0]), ValueError, "logits"),
    "logits_dtype": (lambda: _f(logits=BAD_LOGITS.long()), TypeError, "logits"),
    "logits_type": (lambda: _f(logits=BAD_LOGITS.numpy()), TypeError, "logits"),
    "target_shape": (lambda: _f(target=BAD_TARGET[:3]), ValueError, "target: expected shape"),
    "target_dtype": (lambda: _f(target=BAD_TARGET.float()), TypeError, "target"),
    "target_range": (lambda: _f(target=BAD_TARGET + 5), IndexError, "target"),
    "temperature": (lambda: _f(temperature=-1.0), ValueError, "temperature"),
    "label_smoothing": (lambda: _f(label_smoothing=1.5), ValueError, "label_smoothing"),
    "reduction": (lambda: _f(reduction="avg"), ValueError, "reduction"),
    "generator_type": (lambda: _f(generator=0), TypeError, "generator"),
    "op_k_zero": (lambda: _op(k=0), RuntimeError, "k: expected 1 <= k"),
    "op_philox_dtype": (lambda: _op(philox=torch.zeros(2)), RuntimeError, "philox: expected"),
    "op_scale_dtype": (lambda: _op(scale=BAD_SCALE.double()), RuntimeError, "scale: expected"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_inputs_raise_clear_errors_and_leave_inputs_unchanged(case):
    call, exc, fragment = BAD_CASES[case]
    before = [t.clone() for t in (BAD_LOGITS, BAD_TARGET, BAD_SCALE)]
    with pytest.raises(exc, match=fragment):
        call()
    for t, b in zip((BAD_LOGITS, BAD_TARGET, BAD_SCALE), before):
        assert torch.equal(t, b)


def test_validation_off_skips_value_checks_but_stays_safe():
    logits, target, scale = make_inputs(3, 4, torch.float32, "cpu")
    fm.set_validation(False)
    out = fm.weight_noise_worst_of_k_cross_entropy(
        logits, torch.tensor([0, 9, 1]), scale, reduction="none"
    )
    assert torch.isnan(out[1]) and torch.isfinite(out[[0, 2]]).all()


# --- CUDA only -------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("tau", [0.0, 0.5])
@pytest.mark.parametrize("C", [1031, 4099])  # a warp per row; a block per row with a tail
def test_cuda_matches_cpu_for_the_same_state(dtype, tau, C):
    """The same Philox state draws the same noise; the worst copy may differ between devices
    only at a near-tie (different rounding), so the index is checked through the losses of the
    copies it picks, and the backward runs on both devices from the CPU's statistics."""
    logits, target, scale = make_inputs(9, C, dtype, "cpu", ignore=True)
    scale = scale.double() if dtype == torch.float64 else scale
    k, eps = 6, 0.1
    args = (k, tau, eps, -100)
    cpu = ops.weight_noise_ce_fwd(logits, target, scale, wn.philox_state(8, 9), *args)
    gpu = ops.weight_noise_ce_fwd(
        logits.cuda(), target.cuda(), scale.cuda(), wn.philox_state(8, 9, "cuda"), *args
    )
    xi = ops.weight_noise_normal(wn.philox_state(8, 9), 9, k, C)
    assert torch.equal(ops.weight_noise_normal(wn.philox_state(8, 9, "cuda"), 9, k, C).cpu(), xi)
    torch.testing.assert_close(gpu[0].cpu(), cpu[0], rtol=1e-4, atol=1e-4)  # loss
    torch.testing.assert_close(gpu[1].cpu(), cpu[1], rtol=1e-4, atol=1e-4)  # lse
    assert_worst_index(gpu[3].cpu(), cpu[3], logits, target, scale, xi, eps)
    if tau > 0:  # smooth weights: continuous in the losses
        torch.testing.assert_close(gpu[2].cpu(), cpu[2], rtol=1e-4, atol=1e-4)
    bw = (torch.ones(9, dtype=scale.dtype), logits, target, scale)
    cpu_g = ops.weight_noise_ce_bwd(*bw, wn.philox_state(8, 9), cpu[1], cpu[2], eps, -100)
    gpu_g = ops.weight_noise_ce_bwd(
        *(t.cuda() for t in bw),
        wn.philox_state(8, 9, "cuda"),
        cpu[1].cuda(),
        cpu[2].cuda(),
        eps,
        -100,
    )
    for c, g in zip(cpu_g, gpu_g):
        torch.testing.assert_close(g.cpu().double(), c.double(), rtol=2e-2, atol=2e-3)


@pytest.mark.cuda
def test_cuda_graph_capture_draws_fresh_noise_per_replay():
    logits, target, scale = make_inputs(16, 100, torch.float32, "cuda")
    f = fm.weight_noise_worst_of_k_cross_entropy
    fm.set_validation(False)  # value checks sync the host, which capture forbids
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up on a side stream, as capture requires
        f(logits, target, scale, reduction="none")
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = f(logits, target, scale, reduction="none")
    graph.replay()
    first = out.clone()
    graph.replay()
    assert torch.isfinite(first).all() and not torch.equal(first, out)


@pytest.mark.cuda
def test_cuda_non_default_stream_and_repeat_is_bitwise_identical():
    logits, target, scale = make_inputs(33, 4099, torch.bfloat16, "cuda")
    philox = wn.philox_state(3, 4, "cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())  # the inputs were made on the default one
    with torch.cuda.stream(stream):
        a = ops.weight_noise_ce_fwd(logits, target, scale, philox, 4, 0.0, 0.0, -100)
        b = ops.weight_noise_ce_fwd(logits, target, scale, philox, 4, 0.0, 0.0, -100)
    stream.synchronize()
    c = ops.weight_noise_ce_fwd(logits, target, scale, philox, 4, 0.0, 0.0, -100)
    for x, y, z in zip(a, b, c):
        assert torch.equal(x, y) and torch.equal(x, z)


@pytest.mark.cuda
def test_cuda_int64_indexing_beyond_2_31_elements():
    N, C = 2**16 + 3, 2**15  # 2^31 + 3 * 2^15 logits (4.3 GB in bfloat16)
    try:
        logits = torch.randn(N, C, device="cuda", dtype=torch.bfloat16)
    except torch.cuda.OutOfMemoryError:
        pytest.skip("not enough GPU memory")
    target = torch.randint(0, C, (N,), device="cuda")
    # scale 0: every copy is the clean row, so the result is F.cross_entropy row by row, which
    # checks the kernels' offsets for the rows past 2^31 elements.
    logits.requires_grad_(True)
    loss = fm.weight_noise_worst_of_k_cross_entropy(logits, target, 0.0, k=2, reduction="none")
    tail = slice(N - 4, N)
    expected = F.cross_entropy(logits[tail].float(), target[tail], reduction="none")
    torch.testing.assert_close(loss[tail].float(), expected, rtol=2e-2, atol=2e-2)
    (grad,) = torch.autograd.grad(loss[tail].float().sum(), logits)
    exp_grad = torch.softmax(logits[tail].float(), 1) - F.one_hot(target[tail], C)
    torch.testing.assert_close(grad[tail].float(), exp_grad, rtol=2e-2, atol=2e-2)
