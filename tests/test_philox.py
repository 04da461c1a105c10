"""The in-kernel noise: Philox4x32-10 integers, the Box-Muller normals, the (seed, offset, row,
copy, class) layout, and its distribution.

A pure-Python Philox4x32-10, checked against the Random123 known-answer vectors, is the oracle:
the kernels' noise must be its Box-Muller transform at the documented counter for every element
(the integers exactly; the normals up to float32 rounding of log/cos/sin).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fastmargin import weight_noise as wn

MASK32 = 0xFFFFFFFF
MASK64 = 2**64 - 1


def philox4x32_10(ctr, key):
    c, k0, k1 = list(ctr), key[0], key[1]
    for _ in range(10):
        p0 = 0xD2511F53 * c[0]
        p1 = 0xCD9E8D57 * c[2]
        c = [
            ((p1 >> 32) ^ c[1] ^ k0) & MASK32,
            p1 & MASK32,
            ((p0 >> 32) ^ c[3] ^ k1) & MASK32,
            p0 & MASK32,
        ]
        k0 = (k0 + 0x9E3779B9) & MASK32
        k1 = (k1 + 0xBB67AE85) & MASK32
    return tuple(c)


# Random123 kat_vectors, the three `philox4x32 10` lines.
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    (
        (MASK32, MASK32, MASK32, MASK32),
        (MASK32, MASK32),
        (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD),
    ),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


def box_muller(a: int, b: int) -> tuple[float, float]:
    f = np.float32
    u1 = (f(a >> 9) + f(0.5)) * f(2.0**-23)
    u2 = f(b >> 8) * f(2.0**-24)
    radius = np.sqrt(f(-2.0) * np.log(u1))
    angle = 2.0 * math.pi * float(u2)  # the exact angle (philox.h: sincos_2pi), rounded once
    return float(radius * f(math.cos(angle))), float(radius * f(math.sin(angle)))


def expected_normal(seed: int, offset: int, row: int, copy: int, cls: int) -> float:
    """The documented layout (philox.h): counter (w, row), w = offset + (copy << 32) + cls // 4."""
    seed, offset = seed % 2**64, offset % 2**64
    w = (offset + (copy << 32) + cls // 4) & MASK64
    ctr = (w & MASK32, w >> 32, row & MASK32, row >> 32)
    r = philox4x32_10(ctr, (seed & MASK32, seed >> 32))
    pair = box_muller(r[0], r[1]) + box_muller(r[2], r[3])
    return pair[cls % 4]


@pytest.mark.parametrize("ctr,key,want", KAT)
def test_python_oracle_matches_random123_known_answers(ctr, key, want):
    assert philox4x32_10(ctr, key) == want


def test_zero_counter_noise_is_box_muller_of_the_known_answer():
    xi = wn.noise(0, 0, 1, 1, 4)[0, 0]
    a, b, c, d = KAT[0][2]
    want = torch.tensor(box_muller(a, b) + box_muller(c, d), dtype=torch.float32)
    torch.testing.assert_close(xi, want, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize(
    "seed,offset",
    [(0, 0), (12345, 678), (2**64 - 1, 2**64 - 3), (-5, 2**63 + 11), (0x243F6A8885A308D3, 2**40)],
)
def test_noise_follows_the_documented_counter_layout(seed, offset):
    n, k, c = 3, 3, 10
    xi = wn.noise(seed, offset, n, k, c)
    want = torch.tensor(
        [
            [[expected_normal(seed, offset, i, j, cl) for cl in range(c)] for j in range(k)]
            for i in range(n)
        ],
        dtype=torch.float32,
    )
    torch.testing.assert_close(xi, want, rtol=2e-6, atol=2e-6)


def test_noise_of_a_copy_does_not_depend_on_n_k_or_c():
    big = wn.noise(7, 9, 6, 5, 13)
    small = wn.noise(7, 9, 2, 3, 6)
    assert torch.equal(big[:2, :3, :6], small)


def test_seed_and_offset_wrap_modulo_2_64():
    assert torch.equal(wn.noise(-1, -2, 2, 2, 5), wn.noise(2**64 - 1, 2**64 - 2, 2, 2, 5))
    assert torch.equal(wn.philox_state(2**64 + 3, 4), wn.philox_state(3, 4))


def test_different_seeds_and_offsets_give_different_noise():
    a = wn.noise(1, 0, 4, 2, 8)
    assert not torch.equal(a, wn.noise(2, 0, 4, 2, 8))
    assert not torch.equal(a, wn.noise(1, 1, 4, 2, 8))
    # Rows and copies are distinct streams too.
    assert not torch.equal(a[0, 0], a[1, 0])
    assert not torch.equal(a[0, 0], a[0, 1])


def philox4x32_10_np(ctr: list, key: tuple) -> list:
    """philox4x32_10 above on numpy uint64 arrays holding 32-bit words (products fit in 64 bits)."""
    c = [np.asarray(v, dtype=np.uint64) for v in ctr]
    k0, k1 = np.uint64(key[0]), np.uint64(key[1])
    m0, m1, w0, w1 = (np.uint64(v) for v in (0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85))
    mask, shift = np.uint64(MASK32), np.uint64(32)
    for _ in range(10):
        p0, p1 = m0 * c[0], m1 * c[2]
        c = [(p1 >> shift) ^ c[1] ^ k0, p1 & mask, (p0 >> shift) ^ c[3] ^ k1, p0 & mask]
        k0, k1 = (k0 + w0) & mask, (k1 + w1) & mask
    return c


def float64_noise(seed: int, offset: int, n: int, k: int, c: int) -> np.ndarray:
    """The (n, k, c) noise of the documented layout with the Box-Muller transform evaluated in
    float64 on the same (exact) u1, u2: the values the float32 kernels approximate."""
    seed, offset = seed % 2**64, offset % 2**64
    groups = (c + 3) // 4
    row, copy, group = np.meshgrid(
        np.arange(n, dtype=np.uint64),
        np.arange(k, dtype=np.uint64),
        np.arange(groups, dtype=np.uint64),
        indexing="ij",
    )
    with np.errstate(over="ignore"):  # w wraps modulo 2^64, as in the kernels
        w = np.uint64(offset) + (copy << np.uint64(32)) + group
    mask, shift = np.uint64(MASK32), np.uint64(32)
    r = philox4x32_10_np(
        [w & mask, w >> shift, row & mask, row >> shift], (seed & MASK32, seed >> 32)
    )
    out = []
    for a, b in ((r[0], r[1]), (r[2], r[3])):
        u1 = ((a >> np.uint64(9)).astype(np.float64) + 0.5) * 2.0**-23
        u2 = (b >> np.uint64(8)).astype(np.float64) * 2.0**-24
        radius = np.sqrt(-2.0 * np.log(u1))
        out += [radius * np.cos(2.0 * np.pi * u2), radius * np.sin(2.0 * np.pi * u2)]
    return np.stack(out, axis=-1).reshape(n, k, 4 * groups)[..., :c]


# The float32 transform (philox.h: box_muller) is within this many float32 ulps of the float64
# Box-Muller of the same (u1, u2): measured 3.2 ulp worst case without FMA contraction (2.6 with),
# from log (0.8 ulp), sqrt (0.5), sin / cos (1.6 / 1.0) and the final product (0.5).
NOISE_ULP_BOUND = 4.0


def ulp_distance(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    """|got - want| in float32 ulps of want (the spacing of float32 at |want|)."""
    spacing = np.spacing(np.abs(want).astype(np.float32)).astype(np.float64)
    return np.abs(got.astype(np.float64) - want) / spacing


@pytest.mark.parametrize(
    "n,k,c",
    [(257, 3, 1), (200, 2, 2), (150, 4, 3), (120, 4, 10), (90, 3, 17), (9, 2, 1030)],
)
def test_noise_is_within_the_ulp_bound_of_float64_box_muller(n, k, c):
    # Many rows of small C cross the CPU generator's batches (512 Philox blocks) mid-row.
    for seed, offset in [(2024, 17), (2**64 - 1, 2**64 - 7)]:
        got = wn.noise(seed, offset, n, k, c).numpy()
        want = float64_noise(seed, offset, n, k, c)
        dist = ulp_distance(got, want)
        assert dist.max() <= NOISE_ULP_BOUND, f"max {dist.max():.2f} ulp at {np.argmax(dist)}"


def test_float64_oracle_agrees_with_the_scalar_oracle():
    want = float64_noise(12345, 678, 3, 2, 9)
    scalar = np.array(
        [
            [[expected_normal(12345, 678, i, j, cl) for cl in range(9)] for j in range(2)]
            for i in range(3)
        ]
    )
    np.testing.assert_allclose(scalar, want, rtol=1e-6, atol=1e-6)


def test_noise_moments_up_to_the_sixth():
    x = wn.noise(7, 0, 256, 4, 256).flatten().double().numpy()  # 262144 normals
    m = x.size
    # E x^p of N(0, 1) and Var x^p = E x^2p - (E x^p)^2 (its sample mean has sd sqrt(Var / m)).
    for p, mean, var in [
        (1, 0.0, 1.0),
        (2, 1.0, 2.0),
        (3, 0.0, 15.0),
        (4, 3.0, 96.0),
        (6, 15.0, 10170.0),
    ]:
        assert abs(float(np.mean(x**p)) - mean) < 5.0 * math.sqrt(var / m), p


def ks_statistic_vs_normal(x: np.ndarray) -> float:
    """One-sample Kolmogorov-Smirnov statistic sup |F_n - Phi| (own implementation)."""
    x = np.sort(x.astype(np.float64))
    n = x.size
    cdf = 0.5 * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))
    upper = np.arange(1, n + 1) / n - cdf
    lower = cdf - np.arange(0, n) / n
    return float(max(upper.max(), lower.max()))


def test_noise_is_standard_normal_and_uncorrelated():
    xi = wn.noise(2024, 17, 64, 4, 250)  # 64000 normals
    x = xi.flatten().double()
    m = x.numel()
    # Mean 0 (4.5 standard errors), variance 1 (sd of the sample variance is sqrt(2 / m)).
    assert abs(float(x.mean())) < 4.5 / math.sqrt(m)
    assert abs(float(x.var()) - 1.0) < 4.5 * math.sqrt(2.0 / m)
    # Kurtosis 3 (sd ~ sqrt(96 / m)): catches wrong tails that mean/variance miss.
    assert abs(float((x**4).mean()) - 3.0) < 4.5 * math.sqrt(96.0 / m)
    # KS against N(0, 1) on 20000 values: critical value 1.949 / sqrt(n) at alpha = 0.001.
    sample = x[:20000].numpy()
    assert ks_statistic_vs_normal(sample) < 1.949 / math.sqrt(sample.size)
    # Neighbouring classes (same Philox block and across blocks), copies and rows: |corr| small.
    bound = 4.5 / math.sqrt(xi[..., :-1].numel())
    for a, b in [
        (xi[..., :-1], xi[..., 1:]),
        (xi[:, :-1], xi[:, 1:]),
        (xi[:-1], xi[1:]),
    ]:
        corr = torch.corrcoef(torch.stack([a.flatten(), b.flatten()]).double())[0, 1]
        assert abs(float(corr)) < max(bound, 4.5 / math.sqrt(a.numel()))


def test_noise_matches_scipy_kstest_when_available():
    stats = pytest.importorskip("scipy.stats")
    sample = wn.noise(99, 3, 10, 2, 1000).flatten().double().numpy()
    assert stats.kstest(sample, "norm").pvalue > 1e-3
    assert stats.kstest(sample, "norm").statistic == pytest.approx(
        ks_statistic_vs_normal(sample), abs=1e-9
    )


def test_noise_rejects_bad_arguments():
    with pytest.raises(RuntimeError, match="k: expected 1 <= k"):
        wn.noise(0, 0, 2, 0, 3)
    with pytest.raises(RuntimeError, match="n: expected >= 0"):
        wn.noise(0, 0, -1, 1, 3)
    with pytest.raises(RuntimeError, match="philox: expected an int64 tensor of shape"):
        wn.noise_from_state(torch.zeros(3, dtype=torch.int64), 1, 1, 1)
    with pytest.raises(RuntimeError, match="philox: expected an int64 tensor of shape"):
        wn.noise_from_state(torch.zeros(2), 1, 1, 1)


def test_noise_opcheck():
    torch.library.opcheck(
        torch.ops.fastmargin.weight_noise_normal, (wn.philox_state(5, 6), 3, 2, 7)
    )


@pytest.mark.cuda
def test_cuda_noise_equals_cpu_noise():
    for seed, offset in [(0, 0), (2**64 - 1, 2**63 + 5), (31337, 42)]:
        n, k, c = 17, 3, 1029
        cpu = wn.noise(seed, offset, n, k, c).numpy()
        gpu = wn.noise(seed, offset, n, k, c, device="cuda").cpu().numpy()
        # One box_muller definition serves both: they differ only by FMA contraction, and each
        # is within the bound of the float64 transform.
        want = float64_noise(seed, offset, n, k, c)
        assert ulp_distance(gpu, want).max() <= NOISE_ULP_BOUND
        assert ulp_distance(gpu, cpu.astype(np.float64)).max() <= NOISE_ULP_BOUND


@pytest.mark.cuda
def test_cuda_noise_opcheck():
    torch.library.opcheck(
        torch.ops.fastmargin.weight_noise_normal, (wn.philox_state(5, 6, "cuda"), 3, 2, 7)
    )
