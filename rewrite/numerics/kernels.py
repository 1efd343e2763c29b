"""Kernel arithmetic for re-parameterization, on float64 weights in conv layout (O, I/groups, *k).

Pure tensor functions: identity and average pooling written as kernels, a grouped kernel
rewritten with fewer groups, a kernel placed inside a larger one, and the kernel of one
convolution applied after another. Linear layers are the zero-spatial-dims case.
"""
from __future__ import annotations

import itertools
import math

import torch

F64 = torch.float64


def dirac(channels: int, dims: int) -> torch.Tensor:
    """The identity as a depthwise kernel (groups = channels): one tap of weight 1 per channel."""
    return torch.ones(channels, 1, *([1] * dims), dtype=F64)


def avg_pool_kernel(channels: int, kernel: tuple[int, ...], divisor: int | None = None) -> torch.Tensor:
    """Average pooling (padding counted in the divisor) as a depthwise kernel."""
    divisor = divisor or math.prod(kernel)
    return torch.full((channels, 1, *kernel), 1.0 / divisor, dtype=F64)


def regroup(weight: torch.Tensor, groups: int, new_groups: int) -> torch.Tensor:
    """The same convolution written with `new_groups` blocks (a divisor of `groups`).

    Each new block is block-diagonal in the old ones; the off-diagonal parts are zeros.
    """
    if groups == new_groups:
        return weight
    if groups % new_groups:
        raise ValueError(f"cannot write {groups} groups as {new_groups}")
    ratio = groups // new_groups
    out_total, in_per_group, kernel = weight.shape[0], weight.shape[1], weight.shape[2:]
    out_per_group = out_total // groups
    blocks = weight.reshape(new_groups, ratio, out_per_group, in_per_group, *kernel)
    dense = weight.new_zeros(new_groups, ratio, out_per_group, ratio, in_per_group, *kernel)
    diagonal = torch.arange(ratio)
    # Advanced indices on dims 1 and 3 move to the front: (ratio, new_groups, out/g, in/g, *k).
    dense[:, diagonal, :, diagonal] = blocks.transpose(0, 1)
    return dense.reshape(out_total, ratio * in_per_group, *kernel)


def accumulate(out: torch.Tensor, out_groups: int, weight: torch.Tensor, groups: int,
               offsets: tuple[int, ...]) -> torch.Tensor:
    """out += `weight` (with `groups` blocks, a multiple of out_groups) placed at `offsets` in `out`'s kernel.

    The same as adding regroup(embed(weight, ...), groups, out_groups), without building either.
    """
    ratio = groups // out_groups
    out_total, in_per_group, kernel = weight.shape[0], weight.shape[1], weight.shape[2:]
    window = tuple(slice(o, o + k) for o, k in zip(offsets, kernel))
    if ratio == 1:
        out[(slice(None), slice(None)) + window] += weight
        return out
    view = out.view(out_groups, ratio, out_total // groups, ratio, in_per_group, *out.shape[2:])
    blocks = weight.reshape(out_groups, ratio, out_total // groups, in_per_group, *kernel).transpose(0, 1)
    diagonal = torch.arange(ratio)
    index = (slice(None), diagonal, slice(None), diagonal, slice(None)) + window
    view[index] = view[index] + blocks
    return out


def embed(weight: torch.Tensor, size: tuple[int, ...], offsets: tuple[int, ...],
          steps: tuple[int, ...] | None = None) -> torch.Tensor:
    """`weight` placed in a zero kernel of spatial `size`, tap i of dim d at offsets[d] + i * steps[d]."""
    kernel = weight.shape[2:]
    steps = steps or (1,) * len(kernel)
    if tuple(kernel) == tuple(size) and not any(offsets):
        return weight
    out = weight.new_zeros(*weight.shape[:2], *size)
    window = tuple(slice(o, o + (k - 1) * s + 1, s) for o, k, s in zip(offsets, kernel, steps))
    out[(slice(None), slice(None)) + window] = weight
    return out


def compose(second: torch.Tensor, first: torch.Tensor, groups: int, size: tuple[int, ...],
            second_steps: tuple[int, ...], first_steps: tuple[int, ...]) -> torch.Tensor:
    """The kernel of `second` applied after `first`, both written with `groups` blocks.

    Tap j of `second` and tap i of `first` meet at j * second_steps + i * first_steps of the
    result (in units of the result's dilation), summed over the middle channels.
    """
    out_total, mid_per_group = second.shape[:2]
    mid_total, in_per_group = first.shape[:2]
    b = second.reshape(groups, out_total // groups, mid_per_group, *second.shape[2:])
    a = first.reshape(groups, mid_total // groups, in_per_group, *first.shape[2:])
    out = second.new_zeros(groups, out_total // groups, in_per_group, *size)
    first_kernel = first.shape[2:]
    for tap in itertools.product(*(range(k) for k in second.shape[2:])):
        contribution = torch.einsum("gom,gmc...->goc...", b[(slice(None),) * 3 + tap], a)
        window = tuple(slice(j * s2, j * s2 + (k - 1) * s1 + 1, s1)
                       for j, s2, k, s1 in zip(tap, second_steps, first_kernel, first_steps))
        out[(slice(None),) * 3 + window] += contribution
    return out.reshape(out_total, in_per_group, *size)


def bias_through(second: torch.Tensor, groups: int, bias: torch.Tensor) -> torch.Tensor:
    """What a per-channel input `bias` adds to the output of `second` where no padding is read."""
    out_total, mid_per_group = second.shape[:2]
    summed = second.reshape(groups, out_total // groups, mid_per_group, -1).sum(-1)
    return torch.bmm(summed, bias.reshape(groups, mid_per_group, 1)).reshape(out_total)


def scale_rows_(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`weight` scaled in place per output channel (axis 0); `scale` is a scalar or one value per channel.
    In place: the same products as `weight * scale`, without a second kernel-sized tensor."""
    return weight.mul_(scale.reshape(-1, *([1] * (weight.dim() - 1))))
