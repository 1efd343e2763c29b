"""Hypothesis strategies for property tests of passes: random conv configurations and small networks."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import strategies as st

from .check import randomize_bn


@dataclass
class ConvConfig:
    dims: int
    in_channels: int
    out_channels: int
    kernel: tuple
    stride: tuple
    padding: tuple
    dilation: tuple
    groups: int
    bias: bool
    size: int  # spatial size of the input

    def conv(self, transpose: bool = False) -> torch.nn.Module:
        if transpose:
            cls = {1: torch.nn.ConvTranspose1d, 2: torch.nn.ConvTranspose2d, 3: torch.nn.ConvTranspose3d}[self.dims]
            # A transposed conv crops its output by the padding: keep at least one output pixel.
            padding = tuple(min(p, d * (k - 1) // 2) for p, d, k in zip(self.padding, self.dilation, self.kernel))
            return cls(self.in_channels, self.out_channels, self.kernel, self.stride, padding,
                       groups=self.groups, bias=self.bias, dilation=self.dilation)
        cls = {1: torch.nn.Conv1d, 2: torch.nn.Conv2d, 3: torch.nn.Conv3d}[self.dims]
        return cls(self.in_channels, self.out_channels, self.kernel, self.stride, self.padding, self.dilation,
                   self.groups, self.bias)

    def bn(self, channels: int | None = None) -> torch.nn.Module:
        cls = {1: torch.nn.BatchNorm1d, 2: torch.nn.BatchNorm2d, 3: torch.nn.BatchNorm3d}[self.dims]
        return cls(channels or self.out_channels)

    def example(self, batch: int | None = 2, seed: int = 0) -> torch.Tensor:
        """A random input; batch=None gives an unbatched one, (C, *spatial)."""
        g = torch.Generator().manual_seed(seed)
        leading = () if batch is None else (batch,)
        return torch.randn(*leading, self.in_channels, *([self.size] * self.dims), generator=g)


@st.composite
def conv_configs(draw, dims=st.sampled_from([1, 2, 3]), max_channels_per_group: int = 4, max_groups: int = 3,
                 max_kernel: int = 5, allow_padding: bool = True) -> ConvConfig:
    """Random valid conv configurations: kernel sizes, strides, paddings, dilations, groups, bias."""
    d = draw(dims)
    groups = draw(st.integers(1, max_groups))
    in_ch = groups * draw(st.integers(1, max_channels_per_group))
    out_ch = groups * draw(st.integers(1, max_channels_per_group))
    kernel = tuple(draw(st.integers(1, max_kernel if d < 3 else 3)) for _ in range(d))
    stride = tuple(draw(st.integers(1, 2)) for _ in range(d))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(d))
    padding = tuple(draw(st.integers(0, (k - 1) * dl // 2 + 1)) if allow_padding else 0
                    for k, dl in zip(kernel, dilation))
    min_size = max((k - 1) * dl + 1 for k, dl in zip(kernel, dilation))
    size = draw(st.integers(min_size, min_size + (6 if d < 3 else 2)))
    return ConvConfig(d, in_ch, out_ch, kernel, stride, padding, dilation, groups, draw(st.booleans()), size)


class RandomNet(torch.nn.Module):
    """A small random network: a list of (op, module) steps over channel-preserving 2-D activations.

    Steps: "conv" (conv + BN, random kernel/groups/dilation, padding keeping the size), "bn", "relu",
    "relu6", "scale" (per-channel constant multiply), "residual" (add the input of the previous step),
    "concat" (cat with the previous activation, then a 1x1 conv back to `channels`).
    """

    def __init__(self, steps: list[tuple[str, dict]], channels: int):
        super().__init__()
        self.kinds = [kind for kind, _ in steps]
        self.layers = torch.nn.ModuleList()
        for kind, p in steps:
            if kind == "conv":
                k, d, g = p["kernel"], p["dilation"], p["groups"]
                self.layers.append(torch.nn.Sequential(
                    torch.nn.Conv2d(channels, channels, k, padding=d * (k - 1) // 2, dilation=d, groups=g,
                                    bias=p["bias"]),
                    torch.nn.BatchNorm2d(channels)))
            elif kind == "bn":
                self.layers.append(torch.nn.BatchNorm2d(channels))
            elif kind == "relu":
                self.layers.append(torch.nn.ReLU())
            elif kind == "relu6":
                self.layers.append(torch.nn.ReLU6())
            elif kind == "concat":
                self.layers.append(torch.nn.Conv2d(2 * channels, channels, 1))
            else:
                self.layers.append(torch.nn.Identity())
        self.register_buffer("factor", torch.randn(1, channels, 1, 1))

    def forward(self, x):
        previous = x
        for kind, layer in zip(self.kinds, self.layers):
            current = x
            if kind == "residual":
                x = x + previous
            elif kind == "scale":
                x = x * self.factor
            elif kind == "concat":
                x = layer(torch.cat([x, previous], 1))
            else:
                x = layer(x)
            previous = current
        return x


@st.composite
def random_networks(draw, max_steps: int = 8, channels=st.sampled_from([2, 4, 6])) -> tuple[RandomNet, torch.Tensor]:
    """A random small network (see RandomNet) with randomized BN statistics, in eval mode, and an input."""
    c = draw(channels)
    steps = []
    for _ in range(draw(st.integers(1, max_steps))):
        kind = draw(st.sampled_from(["conv", "conv", "bn", "relu", "relu6", "scale", "residual", "concat"]))
        params = {}
        if kind == "conv":
            params = {"kernel": draw(st.sampled_from([1, 3, 5])), "dilation": draw(st.integers(1, 2)),
                      "groups": draw(st.sampled_from([g for g in (1, 2, c) if c % g == 0])), "bias": draw(st.booleans())}
        steps.append((kind, params))
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    net = randomize_bn(RandomNet(steps, c), seed).eval()
    size = draw(st.integers(5, 9))
    return net, torch.randn(2, c, size, size, generator=torch.Generator().manual_seed(seed))
