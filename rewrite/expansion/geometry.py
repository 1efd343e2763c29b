"""The geometry of a conv to expand, and where a smaller kernel sits inside it.

A side branch (a 1x1, a 1xK line) must read, for every output position, input positions the
original kernel reads: the contraction (passes/branch_forms.align) places it at a tap of the
big kernel. With nn.Conv's symmetric paddings that tap is the centre, so the branch's padding
is the original's minus the centre's reach. Every function here returns a value or a string
saying why the placement is impossible.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class ConvGeometry:
    dims: int
    in_channels: int
    out_channels: int
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    padding: tuple[tuple[int, int], ...]  # (before, after) per spatial axis
    groups: int
    padding_mode: str
    bias: bool

    @property
    def pointwise(self) -> bool:
        return all(k == 1 for k in self.kernel)


def _explicit_padding(conv: nn.Module) -> tuple[tuple[int, int], ...]:
    dims = len(conv.kernel_size)
    if conv.padding == "valid":
        return ((0, 0),) * dims
    if conv.padding == "same":  # torch puts the odd one out after
        total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
        return tuple((t // 2, t - t // 2) for t in total)
    return tuple((p, p) for p in conv.padding)


def geometry(conv: nn.Module) -> ConvGeometry:
    return ConvGeometry(len(conv.kernel_size), conv.in_channels, conv.out_channels, tuple(conv.kernel_size),
                        tuple(conv.stride), tuple(conv.dilation), _explicit_padding(conv), conv.groups,
                        conv.padding_mode, conv.bias is not None)


def module_padding(g: ConvGeometry) -> tuple[int, ...] | str:
    """The geometry's padding as nn.Conv takes it (one int per axis), or why it cannot be."""
    if any(b != a for b, a in g.padding):
        return f"its padding {g.padding} is asymmetric (padding='same' with an even reach): no branch can copy it"
    return tuple(b for b, _ in g.padding)


def centred_padding(g: ConvGeometry, axes=None) -> tuple[int, ...] | str:
    """Padding of a branch whose kernel is 1 on `axes` (default all) and the original's elsewhere."""
    axes = range(g.dims) if axes is None else axes
    pads = []
    for d in range(g.dims):
        before, after = g.padding[d]
        if d not in axes:
            if before != after:
                return f"its padding on axis {d} is asymmetric: no branch can copy it"
            pads.append(before)
            continue
        reach = g.dilation[d] * (g.kernel[d] - 1)
        if (g.kernel[d] - 1) % 2 or before != after:  # the centre must be a tap, not between two
            return (f"kernel {g.kernel} (dilation {g.dilation}, padding {g.padding}) has no centre tap on axis {d}: "
                    "a smaller branch cannot sit at the same input positions")
        pad = before - reach // 2
        if pad < 0:
            return (f"its padding {before} on axis {d} is less than half the kernel's reach ({reach}): a smaller "
                    "branch would need negative padding (cropping), which no conv can express")
        pads.append(pad)
    return tuple(pads)


def identity_refusal(g: ConvGeometry) -> str | None:
    """Why the output of this conv cannot have an identity branch (None when it can)."""
    if g.in_channels != g.out_channels:
        return f"in_channels {g.in_channels} != out_channels {g.out_channels}"
    if any(s != 1 for s in g.stride):
        return f"stride {g.stride} is not 1"
    for d in range(g.dims):
        before, after = g.padding[d]
        reach = g.dilation[d] * (g.kernel[d] - 1)
        if before + after != reach or before % g.dilation[d]:
            return f"the output is not aligned with the input on axis {d} (padding {g.padding}, kernel {g.kernel})"
    return None
