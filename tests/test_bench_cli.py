"""The benchmark suite runs (small CPU shapes): every case's providers agree with each other,
and the CLI writes its table, JSON and plot; the per-call overhead section runs and prints its
rows."""

from __future__ import annotations

import json

import pytest
import torch

from fastmargin.__main__ import main
from fastmargin.benchmarks import cases, overhead


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
            "multiclass_margin,call_overhead",
            "--json",
            str(out_json),
            "--plot",
            str(out_png),
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    # The byte-model table first, then the per-call overhead section.
    table = out.index("| multiclass_margin[4096x10,float32] | fastmargin |")
    assert table < out.index("| fwd+bwd | fm(x3, y, dim=1) |")
    data = json.loads(out_json.read_text())
    providers = {r["provider"] for r in data["results"]}
    assert providers == {"fastmargin", "eager", "compile"}
    assert len(data["overhead"]) == 4
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


def test_overhead_providers_compute_the_same_loss():
    """Every call the overhead section times gives F.cross_entropy's loss and gradient."""
    by_work = overhead.providers("cpu")
    assert set(by_work) == {"fwd+bwd", "no_grad fwd"}
    for work, calls in by_work.items():
        assert len(calls) == 3
        results = {call: _flat(fn()) for call, fn in calls.items()}
        expected = results.pop("F.cross_entropy(x2, y)")
        for call, got in results.items():
            assert len(got) == len(expected) == 1, (work, call)
            # The gradient of (8, 1, 10) logits is compared as the (8, 10) it views.
            torch.testing.assert_close(got[0].reshape(expected[0].shape), expected[0])


def test_cli_prints_the_overhead_section(tmp_path, capsys):
    """``--ops call_overhead`` prints only the per-call section (every row, none timed
    against a threshold here: speed goals are read off the benchmark, not asserted) and
    restores the thread count it lowered to 1."""
    out_json = tmp_path / "o.json"
    threads = torch.get_num_threads()
    argv = ["bench", "--device", "cpu", "--quick", "--reps", "1", "--ops", "call_overhead"]
    assert main(argv + ["--json", str(out_json)]) == 0
    assert torch.get_num_threads() == threads
    out = capsys.readouterr().out
    assert "| case | provider |" not in out  # no byte-model cases were selected
    assert "| work | fastmargin call | F.cross_entropy us | fastmargin us |" in out
    for work in ("fwd+bwd", "no_grad fwd"):
        for call in ("fm(x3, y, dim=1)", "fm(x2, y)"):
            assert f"| {work} | {call} |" in out
    rows = json.loads(out_json.read_text())["overhead"]
    assert len(rows) == 4
    for r in rows:
        assert r["fastmargin_us"] > 0 and r["reference_us"] > 0
        assert r["goal"] == (1.5 if r["work"] == "fwd+bwd" else 2.0)
        assert r["met"] == (r["ratio"] <= r["goal"])
