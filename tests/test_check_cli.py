"""``python -m fastmargin check``: the self-check passes on this build and fails on a wrong one."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

import fastmargin as fm
from fastmargin import check

PUBLIC_OPS = {
    "worst_of_k_cross_entropy",
    "multiclass_margin",
    "weight_robust_cross_entropy",
    "weight_perturbation_radius",
    "all_layer_perturb",
    "weight_noise_worst_of_k_ce",
}


def _run_cli(*args: str, tmp_path) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "check.json"
    proc = subprocess.run(
        [sys.executable, "-m", "fastmargin", "check", *args, "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    return proc, (json.loads(out.read_text()) if out.exists() else {})


def test_quick_cpu_check_passes_and_covers_every_op(tmp_path):
    proc, result = _run_cli("--device", "cpu", "--quick", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "op" in proc.stdout and "max error" in proc.stdout and "0 failed" in proc.stdout
    rows = result["rows"]
    assert {r["op"] for r in rows} == PUBLIC_OPS
    assert all(r["passed"] for r in rows)
    cases = " ".join(r["case"] for r in rows)
    for needed in (
        "dim=0",
        "dim=1",
        "tau=0.5",
        "probs shared",
        "probs per copy",
        "bfloat16",
        "class weights",
        "misaligned",
        "NaN",
        "-inf",
        "inplace_backward",
        "noise",
    ):
        assert needed in cases, needed


def test_a_wrong_kernel_fails_the_check(monkeypatch):
    """The check is not vacuous: a loss off by 1e-3 fails its rows."""
    right = fm.worst_of_k_cross_entropy

    def off(*args, **kwargs):
        out = right(*args, **kwargs)
        return (out[0] + 1e-3, out[1]) if isinstance(out, tuple) else out + 1e-3

    monkeypatch.setattr(fm, "worst_of_k_cross_entropy", off)
    report = check.Report()
    check.check_worst_of_k(report, check.Inputs("cpu"), [torch.float32], quick=True)
    failed = report.failed
    assert failed and all(r.op == "worst_of_k_cross_entropy" for r in failed)
    assert any("value" in r.note for r in failed)


def test_max_error_requires_the_same_non_finite_entries():
    want = torch.tensor([1.0, float("nan"), float("inf")])
    assert check.max_error(want.clone(), want, torch.float32)[1]
    err, ok, note = check.max_error(torch.tensor([1.0, 2.0, float("inf")]), want, torch.float32)
    assert not ok and math.isinf(err) and "non-finite" in note
    err, ok, _ = check.max_error(
        torch.tensor([1.0, float("nan"), -float("inf")]), want, torch.float32
    )
    assert not ok
    err, ok, _ = check.max_error(torch.tensor([1.001]), torch.tensor([1.0]), torch.float32)
    assert not ok and err == pytest.approx(1e-3, rel=1e-3)
    assert check.max_error(torch.tensor([1.001]), torch.tensor([1.0]), torch.bfloat16)[1]


def test_missing_kernel_image_is_recognised():
    msg = "CUDA error: no kernel image is available for execution on the device"
    assert check._is_missing_image(RuntimeError(msg))
    assert not check._is_missing_image(RuntimeError("CUDA out of memory"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
def test_cuda_check_without_a_gpu_says_so(tmp_path):
    proc, _ = _run_cli("--device", "cuda", "--quick", tmp_path=tmp_path)
    assert proc.returncode == 2
    assert "no CUDA GPU is visible" in proc.stdout


@pytest.mark.cuda
def test_quick_cuda_check_passes(tmp_path):
    proc, result = _run_cli("--device", "cuda", "--quick", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "CUDA graph replay == eager (new inputs)" in {r["case"] for r in result["rows"]}
