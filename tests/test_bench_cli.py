"""The benchmark suite runs (small CPU shapes): every case's providers agree with each other,
and the CLI writes its table, JSON and plot."""

from __future__ import annotations

import json

import pytest
import torch

from fastmargin.__main__ import main
from fastmargin.benchmarks import cases


def _flat(result):
    if isinstance(result, torch.Tensor):
        return [result]
    return [t for t in result if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize("case", cases.default_cases("cpu", quick=True), ids=lambda c: c.name)
def test_every_case_runs_and_providers_agree(case):
    providers = case.setup("cpu")
    assert {"fastmargin", "eager", "compile"} <= set(providers)
    ours = _flat(providers["fastmargin"]())
    eager = _flat(providers["eager"]())
    assert len(ours) == len(eager) > 0
    for a, b in zip(ours, eager):
        assert a.shape == b.shape and torch.isfinite(a).all()
        if case.op == "weight_noise_ce" or case.dtype != torch.float32:
            # Each noise provider draws its own noise; the eager reference computes half
            # precision cases in half precision (the op tests compare those against fp32).
            continue
        scale = float(b.float().abs().max())
        torch.testing.assert_close(a.float(), b.float(), atol=1e-3 * scale, rtol=2e-3)
    assert case.bytes_moved > 0 and case.byte_model


def test_cli_writes_table_json_and_plot(tmp_path, capsys):
    out_json, out_png = tmp_path / "b.json", tmp_path / "b.png"
    code = main(
        [
            "bench",
            "--device",
            "cpu",
            "--quick",
            "--reps",
            "1",
            "--ops",
            "multiclass_margin",
            "--json",
            str(out_json),
            "--plot",
            str(out_png),
        ]
    )
    assert code == 0
    table = capsys.readouterr().out
    assert "| multiclass_margin[4096x10,float32] | fastmargin |" in table
    data = json.loads(out_json.read_text())
    providers = {r["provider"] for r in data["results"]}
    assert providers == {"fastmargin", "eager", "compile"}
    assert all(r["error"] is None and r["median_ms"] > 0 for r in data["results"])
    assert out_png.stat().st_size > 1000


def test_gpu_sets_hold_the_few_row_shapes_and_every_op():
    """The few-row worst-of-k shapes (B = 256, k = 4, C = 1000; B = 64, k = 8, C = 32000) are
    in the GPU matrix and first in the time-boxed gpu-check set, which covers every op."""
    few = {"worst_of_k_ce[1024x1000,k=4,bfloat16]", "worst_of_k_ce[512x32000,k=8,bfloat16]"}
    assert few <= {c.name for c in cases.default_cases("cuda")}
    check_set = cases.gpu_check_cases("cuda")
    assert {c.name for c in check_set[:2]} == few
    assert {c.op for c in check_set} == set(cases.OPS)
    assert len(cases.gpu_check_cases("cuda", quick=True)) == 3
