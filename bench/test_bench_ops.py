"""fastmargin vs the eager reference vs torch.compile(reference), per case and provider.

Each benchmark synchronises the GPU inside the timed call, so pytest-benchmark's wall-clock
timer measures the kernels; the byte model and GB/s go into ``extra_info``.
"""

from __future__ import annotations

import pytest
import torch

from fastmargin.benchmarks.cases import default_cases

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = default_cases(DEVICE, quick=DEVICE == "cpu")
PROVIDERS = ["fastmargin", "eager", "compile", "liger"]


@pytest.fixture(scope="module")
def providers_cache():
    return {}


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bench(benchmark, providers_cache, case, provider):
    if case.name not in providers_cache:
        providers_cache.clear()  # keep one case's inputs alive at a time
        providers_cache[case.name] = case.setup(DEVICE)
    providers = providers_cache[case.name]
    if provider not in providers:
        pytest.skip(f"{provider} does not apply to {case.name} here")
    fn = providers[provider]

    def timed():
        fn()
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark.extra_info["bytes_moved"] = case.bytes_moved
    benchmark.extra_info["byte_model"] = case.byte_model
    benchmark.pedantic(timed, rounds=10, warmup_rounds=3, iterations=1)
    median_s = benchmark.stats.stats.median
    benchmark.extra_info["gbps"] = case.bytes_moved / median_s / 1e9
