"""Reference networks for benchmarks and examples."""

from __future__ import annotations

import torch
from torch import nn


class _WideBasic(nn.Module):
    """Pre-activation wide residual block: BN-ReLU-conv3x3(stride)-BN-ReLU-conv3x3 + shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.shortcut = (
            nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)
            if stride != 1 or c_in != c_out
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = torch.relu(self.bn1(x))
        # The projection shortcut reads the pre-activated input (as in the WRN reference code).
        skip = x if self.shortcut is None else self.shortcut(o)
        o = self.conv1(o)
        o = self.conv2(torch.relu(self.bn2(o)))
        return o + skip


class WideResNet(nn.Module):
    """WideResNet-depth-widen (Zagoruyko & Komodakis 2016) for 32x32 inputs.

    depth = 6n + 4: three groups of n blocks with 16·widen, 32·widen, 64·widen channels (the
    last two downsample by 2), then BN-ReLU, global average pooling and a linear classifier
    (``self.fc``). WideResNet(16, 4) is the WRN-16-4 of the MaxUp and AMO benchmarks.
    """

    def __init__(
        self, depth: int = 16, widen: int = 4, num_classes: int = 10, in_channels: int = 3
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"depth: expected 6n + 4 with n >= 1 (10, 16, 22, 28...), got {depth}")
        if widen < 1:
            raise ValueError(f"widen: expected an int >= 1, got {widen}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        blocks = []
        c_in = widths[0]
        for g, c_out in enumerate(widths[1:]):
            for i in range(n):
                blocks.append(_WideBasic(c_in, c_out, stride=2 if (g > 0 and i == 0) else 1))
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(c_in)
        self.fc = nn.Linear(c_in, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The penultimate representation h (so the logits are ``self.fc(h)``)."""
        o = torch.relu(self.bn(self.blocks(self.conv(x))))
        return torch.flatten(nn.functional.adaptive_avg_pool2d(o, 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))
