"""Command line: ``python -m fastmargin {demo,bench,info,check}``."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def _info(_args) -> int:
    """What the kernels were compiled against, beside the torch running them."""
    from pathlib import Path

    import torch

    import fastmargin  # (loads the kernels; a load failure explains itself)

    from ._loader import build_record, built_for, describe_torch, rebuild_command, running_torch

    has_cuda_kernels = torch._C._dispatch_has_kernel_for_dispatch_key(
        "fastmargin::worst_of_k_ce_fwd", "CUDA"
    )
    running = running_torch()
    record = build_record()
    print(f"fastmargin {fastmargin.__version__} ({Path(fastmargin.__file__).parent})")
    if record is None:
        print("built against:  unknown (this build wrote no record)")
    else:
        kernels = "CPU + CUDA" if record.get("cuda_kernels") else "CPU only"
        if record.get("cuda_kernels"):
            kernels += f" (nvcc {record.get('nvcc')}, architectures {record.get('cuda_arch_list')})"
        print(
            f"built against:  {describe_torch(record.get('torch'), record.get('torch_cuda'))}, "
            f"Python {record.get('python')}"
        )
        print(f"  kernels:      {kernels}")
        print(f"  compiler:     {record.get('compiler')}")
    here = describe_torch(running.version, running.cuda)
    print(f"running:        {here}, Python {running.python}")
    if record is not None and not built_for(record, running):
        print(f"  MISMATCH:     compiled against another torch; rebuild: {rebuild_command()}")
    print(f"CUDA kernels registered: {has_cuda_kernels}; GPU visible: {torch.cuda.is_available()}")
    return 0


def _bench(args) -> int:
    import torch

    from .benchmarks import cases, overhead, runner

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.set == "gpu-check":
        selected = cases.gpu_check_cases(device, quick=args.quick)
    else:
        selected = cases.default_cases(device, quick=args.quick)
    wanted = set(args.ops.split(",")) if args.ops else None
    if wanted is not None:
        selected = [c for c in selected if c.op in wanted]
    with_overhead = wanted is None or overhead.OP in wanted
    if device == "cpu":
        torch.set_num_threads(max(1, torch.get_num_threads()))
    with_cases = bool(selected) or not with_overhead
    if with_cases:
        table = runner.run(
            selected, device, json_path=args.json, plot_path=args.plot, reps=args.reps
        )
        print(table)
    if with_overhead:
        rows = overhead.measure(device, quick=args.quick, repeats=args.reps)
        device_name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
        section = overhead.markdown_table(rows, device_name, quick=args.quick, repeats=args.reps)
        print(("\n" if with_cases else "") + section)
        if args.json:
            overhead.write_json(args.json, rows, device_name, merge=with_cases)
    if device == "cpu":
        print("\n(CPU timings: only the ratios between providers are meaningful.)")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="fastmargin", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    from .demo import add_demo_arguments, main_demo

    p_demo = sub.add_parser(
        "demo", help="train a small CNN on scikit-learn's digits with each objective"
    )
    add_demo_arguments(p_demo)
    p_demo.set_defaults(func=main_demo)

    p_info = sub.add_parser("info", help="build and device information")
    p_info.set_defaults(func=_info)

    p_bench = sub.add_parser("bench", help="fastmargin vs eager vs torch.compile, per op")
    p_bench.add_argument("--device", choices=["cpu", "cuda"], default=None)
    p_bench.add_argument(
        "--ops",
        default=None,
        help="comma-separated op names to run (call_overhead: the per-call overhead section)",
    )
    p_bench.add_argument("--quick", action="store_true", help="a few small cases only")
    p_bench.add_argument(
        "--set",
        choices=["default", "gpu-check"],
        default="default",
        help="gpu-check: the time-boxed bfloat16 set of make gpu-check",
    )
    p_bench.add_argument("--reps", type=int, default=10, help="timed repetitions per provider")
    p_bench.add_argument("--json", default=None, help="write the results as JSON here")
    p_bench.add_argument("--plot", default=None, help="draw a bar chart (PNG) here")
    p_bench.set_defaults(func=_bench)

    from .check import add_check_arguments, main_check

    p_check = sub.add_parser(
        "check", help="self-check: every op against the reference on this device"
    )
    add_check_arguments(p_check)
    p_check.set_defaults(func=main_check)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
