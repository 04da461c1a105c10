"""The emulation harness must be able to fail: seeded defects it has to report.

Collective violations come back as a RuntimeError from the launch; sanitizer findings abort the
process, so those defects run in a child process with the same environment.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

EMU_LIB = os.environ.get("FASTMARGIN_EMU_LIB", "")


def run_defect(name: str) -> torch.Tensor:
    return torch.ops.fastmargin_emu_selftest.run_defect(name)


def test_clean_kernel_passes_with_the_same_collectives():
    out = run_defect("clean")
    assert torch.equal(out, torch.full((64,), float(sum(range(64)))))


@pytest.mark.parametrize(
    "defect, message",
    [
        # How many of the 16 threads already wait when the first of the others exits depends
        # on the OS threads' timing: any count from 1 to 16 is the same defect.
        ("divergent_syncthreads", r"exited while (1[0-6]|[1-9]) thread\(s\) wait in __syncthreads"),
        ("split_syncthreads", re.escape("divergent __syncthreads")),
        ("lane_exit_before_shuffle", re.escape("lane 31 of warp 0 exited")),
        ("partial_mask", re.escape("with mask 0xffff")),
    ],
)
def test_collective_violations_are_reported(defect, message):
    with pytest.raises(RuntimeError, match="collective violation") as err:
        run_defect(defect)
    assert re.search(message, str(err.value)), str(err.value)


def test_a_grid_beyond_2_31_blocks_is_refused_not_narrowed():
    torch.ops.fastmargin_emu_selftest.launch_rows(1000)  # a normal grid launches
    with pytest.raises(RuntimeError, match="too many rows for one launch"):
        torch.ops.fastmargin_emu_selftest.launch_rows(8 * 2**31)


@pytest.mark.parametrize(
    "defect, report",
    [
        ("misaligned_vector_load", "misaligned address"),
        ("out_of_bounds_read", "heap-buffer-overflow"),
    ],
)
def test_sanitizers_report_memory_defects(defect, report):
    code = (
        f"import torch; torch.ops.load_library({EMU_LIB!r}); "
        f"torch.ops.fastmargin_emu_selftest.run_defect({defect!r})"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0, proc.stderr[-2000:]
    assert report in proc.stderr, proc.stderr[-2000:]
