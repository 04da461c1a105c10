"""MaxUp training-step benchmark: joint vs select vs the eager reference.

One forward + backward of a MaxUp step (k augmented copies, random crop + flip) on a
WideResNet-16-4, batch 512 of 32x32 inputs, k = 4, under bf16 autocast. Providers:

* ``eager reference``: torch.cat of the k copies, the model, then the plain-PyTorch
  ``fastmargin.reference.worst_of_k_cross_entropy`` (what public implementations do);
* ``fastmargin joint``: ``fm.MaxUp(mode="joint")`` (copy-major batch, fused worst-of-k CE);
* ``fastmargin select``: ``fm.MaxUp(mode="select")`` (no-grad selection, then B copies);
* ``plain CE step``: one clean batch with ``F.cross_entropy``, for scale.

Reports the median step time and the peak extra memory over the step. On a GPU it times with
CUDA events; ``--small`` shrinks everything for a quick smoke run on the CPU (ratios only).

    python bench/bench_maxup_step.py            # the issue's configuration (needs a GPU)
    python bench/bench_maxup_step.py --small    # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

# Run as a script from a checkout: import the in-place build next to this folder.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fastmargin as fm  # noqa: E402
from fastmargin.benchmarks import runner  # noqa: E402
from fastmargin.models import WideResNet  # noqa: E402


def make_providers(model, augment, k):
    def eager(x, y):
        copies = torch.cat([augment(x) for _ in range(k)])
        logits = model(copies).view(k, x.shape[0], -1)
        return fm.reference.worst_of_k_cross_entropy(logits, y, dim=0)

    joint = fm.MaxUp(model, augment, k=k, mode="joint")
    select = fm.MaxUp(model, augment, k=k, mode="select")

    def plain(x, y):
        return F.cross_entropy(model(x), y)

    return {
        "eager reference": eager,
        "fastmargin joint": joint,
        "fastmargin select": select,
        "plain CE step": plain,
    }


def time_step(step, model, x, y, *, autocast_dtype, iters, warmup):
    """Median ms of one step (forward + backward) and its peak extra memory in MB (GPU)."""
    dev = x.device.type

    def once():
        model.zero_grad(set_to_none=True)
        with torch.autocast(dev, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = step(x, y)
        loss.backward()

    median_ms = runner.time_median(once, dev, warmup=warmup, reps=iters)
    model.zero_grad(set_to_none=True)
    peak = runner.peak_extra_mb(once, dev)
    return median_ms, float("nan") if peak is None else peak


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--small", action="store_true", help="tiny CPU-sized configuration")
    p.add_argument("--depth", type=int, default=16)
    p.add_argument("--widen", type=int, default=4)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None, help="write the results here")
    a = p.parse_args(argv)
    if a.small:
        a.depth, a.widen, a.batch, a.size, a.iters, a.warmup = 10, 1, 16, 16, 3, 1

    torch.manual_seed(0)
    fm.set_validation(False)  # no host sync in the timed loop (targets are valid here)
    dev = torch.device(a.device)
    model = WideResNet(a.depth, a.widen).to(dev)
    mf = torch.channels_last if a.channels_last else torch.contiguous_format
    model = model.to(memory_format=mf)
    x = torch.randn(a.batch, 3, a.size, a.size, device=dev).to(memory_format=mf)
    y = torch.randint(0, 10, (a.batch,), device=dev)
    augment = fm.augment.random_crop_flip(padding=4)
    dtype = torch.bfloat16 if a.dtype == "bf16" else None

    rows = []
    for name, step in make_providers(model, augment, a.k).items():
        ms, peak = time_step(
            step, model, x, y, autocast_dtype=dtype, iters=a.iters, warmup=a.warmup
        )
        rows.append({"provider": name, "median_ms": ms, "peak_extra_MiB": peak})
    eager_ms = rows[0]["median_ms"]
    joint_ms = rows[1]["median_ms"]
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(
        f"MaxUp step: WRN-{a.depth}-{a.widen}, batch {a.batch}, {a.size}x{a.size}, k={a.k}, "
        f"{a.dtype}, {gpu}, torch {torch.__version__}\n"
    )
    print("| provider | median ms | peak extra MiB | vs eager | vs joint |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['provider']} | {r['median_ms']:.2f} | {r['peak_extra_MiB']:.0f} "
            f"| {eager_ms / r['median_ms']:.2f}x | {joint_ms / r['median_ms']:.2f}x |"
        )
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"config": vars(a), "device": gpu, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
