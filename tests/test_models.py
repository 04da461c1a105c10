"""fastmargin.models: the WideResNet used by the step benchmarks."""

from __future__ import annotations

import pytest
import torch

from fastmargin.models import WideResNet


def test_wide_resnet_shapes_and_size():
    torch.manual_seed(0)
    m = WideResNet(10, 1, num_classes=7)
    x = torch.randn(2, 3, 32, 32)
    assert m(x).shape == (2, 7)
    torch.testing.assert_close(m.fc(m.features(x)), m(x))
    # WRN-16-4 has 2.75M parameters (Zagoruyko & Komodakis 2016, Table 1: 2.7M).
    n = sum(p.numel() for p in WideResNet(16, 4).parameters())
    assert 2.70e6 < n < 2.80e6


def test_wide_resnet_bad_depth():
    with pytest.raises(ValueError, match="depth:"):
        WideResNet(12, 1)
