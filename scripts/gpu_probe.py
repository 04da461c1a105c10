"""Measurements on a GPU that ``make gpu-check`` does not make, for questions its results raised.

    python scripts/gpu_probe.py autocast           F.cross_entropy under CUDA autocast vs float32
    python scripts/gpu_probe.py graph KIND         capture + replay one CUDA graph of a training
                                                   step's loss (KIND: torch, fm, wok, margin,
                                                   perturb, noise; see graph_capture); run under
                                                   compute-sanitizer to tell a tool's limit from
                                                   a fault of fastmargin's
    python scripts/gpu_probe.py profile            CUDA kernel times of the benchmark cases that
                                                   are far from the byte model (torch.profiler)
    python scripts/gpu_probe.py overhead           microseconds per call at 8 x 10 (fwd + bwd,
                                                   no_grad fwd), target validation on and off

Each prints one JSON line (``profile``: also the profiler's tables) and exits 0 on success.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.nn.functional as F

import fastmargin as fm


def autocast_error() -> dict:
    """Relative error of the loss per sample against the float32 loss of the same half logits:
    F.cross_entropy inside autocast, and fastmargin inside autocast."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    out = {}
    for dtype in (torch.bfloat16, torch.float16):
        x = (3 * torch.randn(4096, 1000, device="cuda", generator=gen)).to(dtype)
        y = torch.randint(0, 1000, (4096,), device="cuda", generator=gen)
        for eps in (0.0, 0.1):
            exact = F.cross_entropy(x.float(), y, reduction="none", label_smoothing=eps)
            with torch.autocast("cuda", dtype=dtype):
                pt = F.cross_entropy(x, y, reduction="none", label_smoothing=eps)
                ours = fm.worst_of_k_cross_entropy(x, y, reduction="none", label_smoothing=eps)
            key = f"{str(dtype).removeprefix('torch.')}_eps{eps}"
            out[key] = {
                "F.cross_entropy dtype": str(pt.dtype),
                "F.cross_entropy max rel": float(((pt - exact).abs() / exact.abs()).max()),
                "F.cross_entropy mean rel": float(((pt - exact).abs() / exact.abs()).mean()),
                "fastmargin max rel": float(((ours - exact).abs() / exact.abs()).max()),
            }
    return out


GRAPH_KINDS = ("torch", "fm", "wok", "margin", "perturb", "noise")


def graph_capture(kind: str) -> dict:
    """Capture one forward + backward of one loss after a side stream's warm-up, replay it
    twice. ``torch``: F.cross_entropy; ``fm``: the worst-of-k loss at C = 37 (warp rows);
    ``wok``, ``margin``, ``perturb``, ``noise``: each op of the self-check's all-ops step alone,
    with its shapes, to find the one whose capture a sanitizer invalidates."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    fm.set_validation(False)  # the target check synchronises: not capturable

    def leaf(*shape, dtype=torch.float32, scale=1.0):
        t = scale * torch.randn(*shape, device="cuda", generator=gen)
        return t.to(dtype).requires_grad_(True)

    if kind in ("torch", "fm"):
        x = leaf(64, 4, 37)
        y = torch.randint(0, 37, (64,), device="cuda", generator=gen)
        if kind == "torch":
            tensors, fn = [x], lambda: F.cross_entropy(x.reshape(-1, 37), y.repeat_interleave(4))
        else:
            tensors, fn = [x], lambda: fm.worst_of_k_cross_entropy(x, y, dim=1)
    elif kind in ("wok", "margin", "noise"):
        y = torch.randint(0, 1003, (64,), device="cuda", generator=gen)
        if kind == "wok":
            x = leaf(4, 64, 1003, dtype=torch.bfloat16)
            tensors = [x]
            fn = lambda: fm.worst_of_k_cross_entropy(x, y, dim=0, temperature=0.5)  # noqa: E731
        elif kind == "margin":
            m = leaf(64, 1003)
            tensors, fn = [m], lambda: fm.multiclass_margin(m, y).sum()
        else:
            xn, sn = leaf(64, 1003), leaf(64)
            tensors = [xn, sn]
            fn = lambda: fm.weight_noise_worst_of_k_cross_entropy(xn, y, sn.abs(), k=4)  # noqa: E731
    else:
        u, d = leaf(3, 70000, dtype=torch.bfloat16), leaf(3, 70000, scale=1e-2)
        tensors, fn = [u, d], lambda: fm.all_layer_perturb(u, d).float().square().sum()

    def step() -> torch.Tensor:
        loss = fn()
        torch.autograd.grad(loss, tensors)
        return loss.detach()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static = step()
    g.replay()
    g.replay()
    torch.cuda.synchronize()
    return {"graph": kind, "captured": True, "loss": float(static)}


def profile() -> dict:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    gen = torch.Generator(device="cuda").manual_seed(0)
    cases = {
        "spatial 16x21x512x512 bf16": (
            torch.randn(16, 21, 512, 512, device="cuda", generator=gen, dtype=torch.bfloat16),
            torch.randint(0, 21, (16, 512, 512), device="cuda", generator=gen),
            {},
        ),
        "rows 1024x4x1000 bf16 dim=1": (
            torch.randn(1024, 4, 1000, device="cuda", generator=gen, dtype=torch.bfloat16),
            torch.randint(0, 1000, (1024,), device="cuda", generator=gen),
            {"dim": 1},
        ),
        "rows 65536x4x10 bf16 dim=1": (
            torch.randn(65536, 4, 10, device="cuda", generator=gen, dtype=torch.bfloat16),
            torch.randint(0, 10, (65536,), device="cuda", generator=gen),
            {"dim": 1},
        ),
    }
    out = {}
    for name, (x, y, kw) in cases.items():
        x.requires_grad_(True)
        for _ in range(3):
            fm.worst_of_k_cross_entropy(x, y, **kw).backward()
        torch.cuda.synchronize()
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                x.grad = None
                fm.worst_of_k_cross_entropy(x, y, **kw).backward()
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=12)
        print(f"== {name}: 5 steps\n{table}", flush=True)
        try:  # per-step device microseconds of each kernel
            events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
            out[name] = {e.key[:80]: round(e.device_time_total / 5, 1) for e in events}
        except (AttributeError, TypeError) as err:  # the printed table still has them
            out[name] = f"no per-kernel times: {err}"
    return out


def overhead() -> dict:
    import time

    x = torch.randn(8, 10, device="cuda", requires_grad=True)
    y = torch.randint(0, 10, (8,), device="cuda")

    def per_call_us(fn, calls: int = 300) -> float:
        for _ in range(30):
            fn()
        torch.cuda.synchronize()
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            torch.cuda.synchronize()
            best = min(best, (time.perf_counter() - t0) / calls * 1e6)
        return round(best, 1)

    def fwd_bwd(loss_fn):
        def step():
            x.grad = None
            loss_fn(x, y).backward()

        return step

    def no_grad(loss_fn):
        def step():
            with torch.no_grad():
                loss_fn(x, y)

        return step

    out = {}
    for validate in (True, False):
        fm.set_validation(validate)
        tag = "validation on" if validate else "validation off"
        out[f"fm fwd+bwd, {tag}"] = per_call_us(fwd_bwd(fm.worst_of_k_cross_entropy))
        out[f"fm no_grad fwd, {tag}"] = per_call_us(no_grad(fm.worst_of_k_cross_entropy))
    fm.set_validation(True)
    out["F.cross_entropy fwd+bwd"] = per_call_us(fwd_bwd(F.cross_entropy))
    out["F.cross_entropy no_grad fwd"] = per_call_us(no_grad(F.cross_entropy))
    return out


def main(argv: list[str]) -> int:
    what = argv[1] if len(argv) > 1 else ""
    if what == "autocast":
        result = autocast_error()
    elif what == "graph" and len(argv) > 2 and argv[2] in GRAPH_KINDS:
        result = graph_capture(argv[2])
    elif what == "profile":
        result = profile()
    elif what == "overhead":
        result = overhead()
    else:
        print(__doc__, file=sys.stderr)
        return 2
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
