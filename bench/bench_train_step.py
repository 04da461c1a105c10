"""Training-step benchmarks: MaxUp (joint vs select vs eager) and AMO (fused vs hooks).

One forward + backward of a training step on a WideResNet-16-4, batch 512 of 32x32 inputs,
under bf16 autocast. ``--method maxup`` (k = 4 augmented copies, random crop + flip):

* ``eager reference``: torch.cat of the k copies, the model, then the plain-PyTorch
  ``fastmargin.reference.worst_of_k_cross_entropy`` (what public implementations do);
* ``fastmargin joint``: ``fm.MaxUp(mode="joint")`` (copy-major batch, fused worst-of-k CE);
* ``fastmargin select``: ``fm.MaxUp(mode="select")`` (no-grad selection, then B copies).

``--method amo`` (one ascent step, lr 0.01, every conv/linear but the classifier):

* ``reference (hooks)``: ``fastmargin.reference.all_layer_margin_loss`` (plain forward hooks);
* ``fastmargin AMO``: ``fm.AllLayerMargin(model)``.

Both add ``plain CE step`` (one clean batch with ``F.cross_entropy``) for scale. Reports the
median step time and the peak extra memory over the step (CUDA events on a GPU); ``--small``
shrinks everything for a quick smoke run on the CPU (ratios only).

    python bench/bench_train_step.py --method maxup      # WRN-16-4, batch 512, k = 4 (GPU)
    python bench/bench_train_step.py --method amo --small
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


def maxup_providers(model, augment, k):
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


def amo_providers(model):
    fused = fm.AllLayerMargin(model)

    def hooks(x, y):
        fused.trace(x)  # the same layers as the fused step (execution order)
        layers = [m for _, m in fused.layers]
        return fm.reference.all_layer_margin_loss(model, layers, x, y, lr=0.01, steps=1)

    def plain(x, y):
        return F.cross_entropy(model(x), y)

    return {"reference (hooks)": hooks, "fastmargin AMO": fused, "plain CE step": plain}


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
    p.add_argument("--method", choices=["maxup", "amo"], default="maxup")
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
    providers = (
        maxup_providers(model, augment, a.k) if a.method == "maxup" else amo_providers(model)
    )
    for name, step in providers.items():
        ms, peak = time_step(
            step, model, x, y, autocast_dtype=dtype, iters=a.iters, warmup=a.warmup
        )
        rows.append({"provider": name, "median_ms": ms, "peak_extra_MiB": peak})
    first_ms, plain_ms = rows[0]["median_ms"], rows[-1]["median_ms"]
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(
        f"{a.method} step: WRN-{a.depth}-{a.widen}, batch {a.batch}, {a.size}x{a.size}, k={a.k}, "
        f"{a.dtype}, {gpu}, torch {torch.__version__}\n"
    )
    first = rows[0]["provider"]
    print(f"| provider | median ms | peak extra MiB | speedup vs {first} | x plain step |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['provider']} | {r['median_ms']:.2f} | {r['peak_extra_MiB']:.0f} "
            f"| {first_ms / r['median_ms']:.2f}x | {r['median_ms'] / plain_ms:.2f}x |"
        )
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"config": vars(a), "device": gpu, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
