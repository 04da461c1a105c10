"""Times benchmark cases and reports them: median time, effective GB/s against the byte model,
% of the device-to-device copy bandwidth measured in the same run, peak extra memory, and the
speedup of fastmargin over each peer."""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional

import torch

from .cases import Case
from .memory import peak_extra_bytes


@dataclass
class Result:
    case: str
    provider: str
    median_ms: float
    gbps: float
    pct_copy: Optional[float]
    peak_extra_mb: Optional[float]
    error: Optional[str] = None


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_median(fn, device: str, *, warmup: int = 3, reps: int = 10) -> float:
    """Median wall time of ``fn`` in milliseconds (CUDA events on the GPU)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    samples = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def copy_bandwidth_gbps(device: str, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth (read + write bytes per second), in GB/s."""
    if device != "cuda":
        nbytes = min(nbytes, 1 << 28)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = time_median(lambda: dst.copy_(src), device, warmup=2, reps=10)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def peak_extra_mb(fn, device: str) -> Optional[float]:
    """Peak memory allocated during ``fn`` beyond what was allocated before, in MiB (on the
    CPU from the profiler's allocation records: see :mod:`fastmargin.benchmarks.memory`)."""
    return peak_extra_bytes(fn, device) / 2**20


def run_case(case: Case, device: str, copy_gbps: float, *, reps: int = 10) -> List[Result]:
    results = []
    providers = case.setup(device)
    for name, fn in providers.items():
        try:
            ms = time_median(fn, device, reps=reps)
            gbps = case.bytes_moved / (ms * 1e-3) / 1e9
            mem = peak_extra_mb(fn, device)
            results.append(Result(case.name, name, ms, gbps, 100 * gbps / copy_gbps, mem))
        except Exception as exc:  # e.g. out of memory for the eager reference
            results.append(Result(case.name, name, float("nan"), 0.0, None, None, repr(exc)[:120]))
            if device == "cuda":
                torch.cuda.empty_cache()
    del providers
    return results


def markdown_table(results: List[Result], copy_gbps: float, device_name: str) -> str:
    by_case: Dict[str, Dict[str, Result]] = {}
    for r in results:
        by_case.setdefault(r.case, {})[r.provider] = r
    lines = [
        f"Device: {device_name}; measured copy bandwidth {copy_gbps:.0f} GB/s (read + write).",
        "",
        "| case | provider | median ms | GB/s (byte model) | % of copy bw | peak extra MB "
        "| fastmargin speedup |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for case, rows in by_case.items():
        ours = rows.get("fastmargin")
        for name, r in rows.items():
            if r.error:
                lines.append(f"| {case} | {name} | failed: {r.error} | | | | |")
                continue
            speedup = (
                ""
                if ours is None or name == "fastmargin"
                else f"{r.median_ms / ours.median_ms:.2f}x"
            )
            mem = "-" if r.peak_extra_mb is None else f"{r.peak_extra_mb:.0f}"
            pct = "-" if r.pct_copy is None else f"{r.pct_copy:.0f}%"
            cells = [case, name, f"{r.median_ms:.3f}", f"{r.gbps:.0f}", pct, mem, speedup]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: List[Result], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys(r.case for r in results))
    providers = list(dict.fromkeys(r.provider for r in results))
    width = 0.8 / max(1, len(providers))
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(cases)), 4))
    for i, p in enumerate(providers):
        vals = []
        for c in cases:
            match = [r for r in results if r.case == c and r.provider == p and not r.error]
            vals.append(match[0].gbps if match else 0.0)
        ax.bar([j + i * width for j in range(len(cases))], vals, width, label=p)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))])
    ax.set_xticklabels(cases, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("effective GB/s (byte model)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run(cases: List[Case], device: str, *, json_path=None, plot_path=None, reps=10) -> str:
    copy_gbps = copy_bandwidth_gbps(device)
    device_name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    meta = {"device": device_name, "torch": torch.__version__, "copy_gbps": copy_gbps}
    results: List[Result] = []
    for case in cases:
        results.extend(run_case(case, device, copy_gbps, reps=reps))
        if json_path:  # after every case: a run stopped by a time limit keeps what it measured
            meta["cases_done"] = f"{len({r.case for r in results})} of {len(cases)}"
            with open(json_path, "w") as f:
                json.dump({"meta": meta, "results": [asdict(r) for r in results]}, f, indent=1)
    table = markdown_table(results, copy_gbps, device_name)
    if plot_path:
        plot(results, plot_path)
    return table
