"""Smoke test of examples/lm_maxup.py with tiny settings: it trains both objectives, reports
finite perplexities, and the fused head's peak memory is below the unfused head's."""

from __future__ import annotations

import importlib.util
import math
import pathlib

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "lm_maxup.py"


def test_lm_example_runs(capsys):
    spec = importlib.util.spec_from_file_location("lm_maxup", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = module.main(
        [
            "--seconds", "0", "--max-steps", "2", "--chars", "20000", "--vocab", "512",
            "--batch", "32", "--eval-tokens", "500", "--memory-tokens", "256", "--k", "2",
        ]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert "held-out perplexity" in out and "peak extra memory" in out
    ppls = [v for name, v in results.items() if name != "memory_mib"]
    assert len(ppls) == 2 and all(math.isfinite(p) and p > 1 for p in ppls)
    fused_mib, unfused_mib = results["memory_mib"]
    assert 0 < fused_mib < unfused_mib
