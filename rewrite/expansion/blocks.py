"""The training-time blocks `expand` puts in place of a conv or linear, and their initializations.

Every block is a plain composition of nn.Conv / nn.BatchNorm / nn.Linear modules (no custom
forward arithmetic beyond a sum), so that tracing it shows fuse_branches exactly the forms it
contracts: a sum of branches of one input (`BranchSum`), or a cascade (`nn.Sequential`).
Branch names become state-dict prefixes: `layer1.0.conv1.rbr_1x1.conv.weight`.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn as nn

from .geometry import ConvGeometry

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


class BranchSum(nn.Module):
    """The sum of named branches, all reading the same input."""

    def __init__(self, branches: dict[str, nn.Module]):
        super().__init__()
        for name, branch in branches.items():
            self.add_module(name, branch)

    def forward(self, x):
        out = None
        for branch in self.children():
            y = branch(x)
            out = y if out is None else out + y
        return out


def like(reference: torch.Tensor) -> dict:
    return {"device": reference.device, "dtype": reference.dtype}


def conv(g: ConvGeometry, ref: torch.Tensor, *, in_channels=None, out_channels=None, kernel=None, stride=None,
         padding=0, dilation=None, groups=None, bias=False, padding_mode=None) -> nn.Module:
    """A conv of the geometry's dimensionality; anything not given is the original's."""
    return _CONV[g.dims](in_channels or g.in_channels, out_channels or g.out_channels,
                         kernel or g.kernel, stride=stride or g.stride, padding=padding,
                         dilation=dilation or g.dilation, groups=groups or g.groups, bias=bias,
                         padding_mode=padding_mode or g.padding_mode, **like(ref))


def bn(g: ConvGeometry, channels: int, ref: torch.Tensor) -> nn.Module:
    return _BN[g.dims](channels, **like(ref))


def conv_bn(conv_module: nn.Module, g: ConvGeometry, ref: torch.Tensor) -> nn.Sequential:
    return nn.Sequential(OrderedDict(conv=conv_module, bn=bn(g, conv_module.out_channels, ref)))


def average_conv(g: ConvGeometry, channels: int, ref: torch.Tensor, padding=0, padding_mode=None) -> nn.Module:
    """A frozen depthwise conv that averages each K-window (DBB's avg-pool branch).

    A conv rather than nn.AvgPool: it keeps the original's dilation and padding mode, and
    fuse_branches composes a conv cascade (1x1 -> average) where it has no conv -> pool rule.
    Its weight has requires_grad=False; optimizers skip it.
    """
    m = conv(g, ref, in_channels=channels, out_channels=channels, groups=channels, padding=padding,
             padding_mode=padding_mode)
    with torch.no_grad():
        m.weight.fill_(1.0 / math.prod(g.kernel))
    m.weight.requires_grad_(False)
    return m


# -- initializations --------------------------------------------------------------------------
@torch.no_grad()
def pass_through(norm: nn.Module, shift: torch.Tensor | None = None) -> None:
    """Make a BN the identity (plus `shift`) in eval mode: mean 0, var 1, gamma sqrt(1 + eps)."""
    norm.running_mean.zero_()
    norm.running_var.fill_(1.0)
    norm.weight.fill_(math.sqrt(1.0 + norm.eps))
    norm.bias.copy_(shift if shift is not None else torch.zeros_like(norm.bias))


@torch.no_grad()
def silence(norm: nn.Module) -> None:
    """Make a BN output exactly 0 (gamma = beta = 0), so its branch starts switched off but trainable."""
    norm.weight.zero_()
    norm.bias.zero_()


@torch.no_grad()
def load_main(branch: nn.Sequential, original: nn.Module) -> None:
    """The original weights in a conv -> BN branch; the BN passes them through (with the original bias)."""
    branch.conv.weight.copy_(original.weight)
    pass_through(branch.bn, original.bias)


def orthonormal_columns(rows: int, cols: int, ref: torch.Tensor, generator=None) -> torch.Tensor:
    """A float64 (rows, cols) matrix Q with Q^T Q = I (rows >= cols): an exact embedding and its inverse."""
    q, _ = torch.linalg.qr(torch.randn(rows, cols, dtype=torch.float64, generator=generator, device=ref.device))
    return q
