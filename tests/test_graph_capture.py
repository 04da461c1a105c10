"""CUDA-graph capture through the public API with validation on: the target value check needs
a host synchronisation, which capture forbids, so it is skipped while the current stream
captures (the kernels stay memory-safe: an out-of-range target gives NaN for its row)."""

from __future__ import annotations

import pytest
import torch

import fastmargin as fm
from fastmargin import _validation


def test_value_checks_are_skipped_while_a_cuda_graph_is_captured(monkeypatch):
    logits = torch.randn(3, 2, 5)
    bad = torch.tensor([0, 7, 1])  # 7 is out of range for 5 classes
    with pytest.raises(IndexError, match="target: value 7 is out of range"):
        fm.worst_of_k_cross_entropy(logits, bad, dim=1)
    # A capturing stream, as torch.cuda.graph() leaves it (no GPU is needed to model it).
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert not _validation.validation_enabled()
    loss = fm.worst_of_k_cross_entropy(logits, bad, dim=1, reduction="none")
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all()


def test_capture_state_is_not_queried_before_cuda_is_initialised(monkeypatch):
    def must_not_run():
        raise AssertionError("queried the capture state without a CUDA context")

    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", must_not_run)
    assert _validation.validation_enabled()


@pytest.mark.cuda
def test_public_api_captures_in_a_cuda_graph_with_validation_on():
    fm.set_validation(True)
    logits = torch.randn(8, 4, 100, device="cuda", requires_grad=False)
    target = torch.randint(0, 100, (8,), device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up on a side stream, as capture requires
        fm.worst_of_k_cross_entropy(logits, target, dim=1)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = fm.worst_of_k_cross_entropy(logits, target, dim=1)
    logits.normal_()
    graph.replay()
    expected = fm.worst_of_k_cross_entropy(logits, target, dim=1)
    torch.testing.assert_close(loss, expected)
