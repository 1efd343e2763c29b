"""The bundled default model of the demo: a small network with every structure the passes rewrite.

It is built with fixed random weights and randomized BatchNorm statistics, so the demo needs no
download and its report is the same on every machine.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .testing import randomize_bn


def conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout))


class RepVGGBlock(nn.Module):
    """Train-time RepVGG block: 3x3 + 1x1 + identity-BN branches added, then ReLU."""

    def __init__(self, channels: int):
        super().__init__()
        self.dense = conv_bn(channels, channels, 3)
        self.point = conv_bn(channels, channels, 1)
        self.identity = nn.BatchNorm2d(channels)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.dense(x) + self.point(x) + self.identity(x))


class BasicBlock(nn.Module):
    """ResNet basic block with a strided 1x1 downsample shortcut."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = conv_bn(cin, cout, 3, stride)
        self.relu = nn.ReLU()
        self.conv2 = conv_bn(cout, cout, 3)
        self.downsample = conv_bn(cin, cout, 1, stride)

    def forward(self, x):
        return self.relu(self.conv2(self.relu(self.conv1(x))) + self.downsample(x))


class DemoNet(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, 16, 3, 2), nn.ReLU())
        self.rep = RepVGGBlock(16)
        self.block = BasicBlock(16, 32, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.1), nn.Linear(32, num_classes))

    def forward(self, x):
        return self.head(self.pool(self.block(self.rep(self.stem(x)))))


def default_model() -> nn.Module:
    """The demo model, in eval mode, deterministic."""
    torch.manual_seed(0)
    return randomize_bn(DemoNet(), seed=0).eval()
