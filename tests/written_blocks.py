"""Small modules written the way research code writes them, for the torch.export capture tests.

Each one uses a construct symbolic_trace refuses or cannot see through: slice assignment on a
padded border, weights computed in forward, shape-dependent Python, modules built inside forward.
The Diverse Branch Block here follows the structure of DingXiaoH/DiverseBranchBlock (written anew).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class BNAndPad(nn.Module):
    """BatchNorm, then a pad whose border holds the BN's shift (what a padded 1x1 -> BN gives)."""

    def __init__(self, channels: int, pad: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.pad = pad

    def forward(self, x):
        out = self.bn(x)
        if self.pad > 0:
            shift = self.bn.bias.detach() - self.bn.running_mean * self.bn.weight.detach() / \
                torch.sqrt(self.bn.running_var + self.bn.eps)
            out = F.pad(out, [self.pad] * 4)
            shift = shift.view(1, -1, 1, 1)
            out[:, :, 0:self.pad, :] = shift
            out[:, :, -self.pad:, :] = shift
            out[:, :, :, 0:self.pad] = shift
            out[:, :, :, -self.pad:] = shift
        return out


class IdentityBased1x1(nn.Conv2d):
    """A 1x1 conv whose kernel is its weight plus the identity, added in forward."""

    def __init__(self, channels: int, groups: int = 1):
        super().__init__(channels, channels, 1, groups=groups, bias=False)
        per_group = channels // groups
        identity = torch.zeros(channels, per_group, 1, 1)
        for i in range(channels):
            identity[i, i % per_group, 0, 0] = 1
        self.id_tensor = identity  # a plain attribute, as in DBB: neither parameter nor buffer
        nn.init.normal_(self.weight, std=0.1)

    def forward(self, x):
        kernel = self.weight + self.id_tensor.to(self.weight.device)
        return F.conv2d(x, kernel, None, stride=1, padding=0, dilation=self.dilation, groups=self.groups)


def conv_bn(cin, cout, k, stride=1, padding=0, groups=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, padding, groups=groups, bias=False), nn.BatchNorm2d(cout))


class DiverseBranchBlock(nn.Module):
    """KxK, 1x1, 1x1 -> BN-and-pad -> average, identity-based 1x1 -> BN-and-pad -> KxK; summed."""

    def __init__(self, cin, cout, k=3, stride=1, groups=1):
        super().__init__()
        padding = k // 2
        self.origin = conv_bn(cin, cout, k, stride, padding, groups)
        self.avg = nn.Sequential()
        self.avg.add_module("conv", nn.Conv2d(cin, cout, 1, groups=groups, bias=False))
        self.avg.add_module("bn", BNAndPad(cout, padding))
        self.avg.add_module("pool", nn.AvgPool2d(k, stride, 0))
        self.avg.add_module("avgbn", nn.BatchNorm2d(cout))
        self.one = conv_bn(cin, cout, 1, stride, 0, groups)
        self.kxk = nn.Sequential()
        self.kxk.add_module("idconv1", IdentityBased1x1(cin, groups))
        self.kxk.add_module("bn1", BNAndPad(cin, padding))
        self.kxk.add_module("conv2", nn.Conv2d(cin, cout, k, stride, 0, groups=groups, bias=False))
        self.kxk.add_module("bn2", nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.origin(x)
        out += self.one(x)
        out += self.avg(x)
        out += self.kxk(x)
        return out


class SameConv(nn.Conv2d):
    """timm's Conv2dSame way: the padding computed in forward from the input's size."""

    def forward(self, x):
        ih, iw = x.shape[-2:]
        pads = []
        for size, k, s, d in zip((ih, iw), self.kernel_size, self.stride, self.dilation):
            pads.append(max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0))
        if pads[0] > 0 or pads[1] > 0:
            x = F.pad(x, [pads[1] // 2, pads[1] - pads[1] // 2, pads[0] // 2, pads[0] - pads[0] // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, (0, 0), self.dilation, self.groups)


class ShapeChecked(nn.Module):
    """Shape-dependent Python around a conv and BN (`if H == ...`), a conv made by SameConv."""

    def __init__(self, cin=3, cout=8, k=3, stride=2):
        super().__init__()
        self.conv = SameConv(cin, cout, k, stride)
        self.bn = nn.BatchNorm2d(cout)
        self.size = None

    def forward(self, x):
        y = self.bn(self.conv(x))
        if y.shape[-1] % 2 == 0:
            y = y * 2.0
        return torch.relu(y)


class MaskedWeight(nn.Module):
    """A conv whose weight is `weight * mask`, and a scale `sigmoid(alpha)[i]` per branch."""

    def __init__(self, cin=4, cout=6, k=3):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, k, k) * 0.2)
        self.register_buffer("mask", (torch.rand(cout, cin, k, k) > 0.3).float())
        self.alpha = nn.Parameter(torch.randn(2))
        self.bn = nn.BatchNorm2d(cout)
        self.side = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        main = F.conv2d(x, self.weight * self.mask, None, 1, 1)
        scale = torch.sigmoid(self.alpha)
        return self.bn(main * scale[0] + self.side(x) * scale[1])


class ChannelAdd(nn.Module):
    """An in-place add on the first channels (`out[:, :c] += x[:, :c]`)."""

    def __init__(self, channels=8, part=3):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)
        self.part = part

    def forward(self, x):
        out = self.bn(self.conv(x))
        out[:, :self.part] += x[:, :self.part]
        return out


class PoolBuiltInForward(nn.Module):
    """A module built inside forward (`nn.AvgPool2d(2)(x)`)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return nn.AvgPool2d(2)(self.bn(self.conv(x)))


class ValueDependent(nn.Module):
    """Control flow on tensor values: neither symbolic_trace nor torch.export can capture it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        if y.sum() > 0:
            return y
        return -y


class StandardizedConv(nn.Conv2d):
    """NFNet's ScaledStdConv way: the weight standardized in forward with F.batch_norm, no running statistics."""

    def __init__(self, cin, cout, k, eps=1e-6):
        super().__init__(cin, cout, k, padding=k // 2)
        self.gain = nn.Parameter(torch.rand(cout, 1, 1, 1) + 0.5)
        self.scale, self.eps = (cin * k * k) ** -0.5, eps

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                         weight=(self.gain * self.scale).view(-1), training=True, momentum=0.0, eps=self.eps)
        return F.conv2d(x, w.reshape_as(self.weight), self.bias, self.stride, self.padding)


class StandardizedConvBN(nn.Module):
    def __init__(self, cin=3, cout=6, k=3):
        super().__init__()
        self.conv, self.bn = StandardizedConv(cin, cout, k), nn.BatchNorm2d(cout)

    def forward(self, x):
        return self.bn(self.conv(x))


class FakeQuantizedWeight(nn.Module):
    """A weight fake-quantized in forward (round to a grid, clamp), with weights on the rounding ties
    of the grid, and a magnitude mask `w * (|w| > t)` with weights at the threshold: step functions,
    which float64 arithmetic would put on the other side of the step from the float32 model."""

    def __init__(self, cin=4, cout=6, step=0.1, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.step = step
        self.weight = nn.Parameter((torch.randint(-80, 70, (cout, cin, 3, 3), generator=g).float() + 0.5) * step)
        ratios = torch.tensor([0.5, 1.0, 2.0])[torch.randint(0, 3, (cout, cout, 1, 1), generator=g)]
        self.pruned = nn.Parameter(torch.full((cout, cout, 1, 1), step) * ratios)  # some exactly at the threshold
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        w = torch.round(self.weight / self.step).clamp(-8, 7) * self.step
        y = self.bn(F.conv2d(x, w, None, 1, 1))
        return F.conv2d(y, self.pruned * (self.pruned.abs() > self.step))
