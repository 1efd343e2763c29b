"""Build the plain block for a residual site: Reserve, Carry and Merge, in float64.

Reserved channels are described by a *layout*: the list of what each extra channel (after a
layer's own channels) holds, a signal index j or None for a zero channel. Signal j is
`sign[j] * x[source[j]]`, possibly rectified by the activations on the way. Zero channels appear
where a grouped conv needs whole groups (a group carries min(in, out) channels per group).

Every conv samples the reserved channels with a Dirac tap that reads input pixel stride * i:
the tap c with c * dilation == padding_before (and no padding beyond the kernel after), so the
tap never reads padding, whatever the padding mode. The shortcut samples x at its own stride;
the two agree when the strides multiply to the same value.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from rewrite.ir import Node, Value
from rewrite.rule import RewriteContext

from .residual_site import Activation, ResidualSite, SiteRefusal, Stage

Layout = list  # list[int | None]


@dataclass
class Signals:
    """What the reserved channels carry: signal j is sign[j] * x[source[j]] (rectified when `rectified`)."""

    source: list[int]
    sign: list[float]
    rectify: bool  # activations clip reserved channels at 0 (the relu(x), relu(-x) split)

    @property
    def count(self) -> int:
        return len(self.source)

    def merge_coefficient(self, j: int) -> float:
        # x = relu(x) - relu(-x): with the split, the negative half enters the merge with a minus sign
        return self.sign[j]


@dataclass
class ConvCost:
    name: str
    channels_before: int
    channels_after: int
    params_before: int
    params_after: int
    flops_before: int | None
    flops_after: int | None


@dataclass
class BuildResult:
    output: Value
    reserved: int
    convs: list[ConvCost] = field(default_factory=list)


def dirac_tap(conv: Node) -> tuple[int, ...]:
    """Per spatial dim, the kernel tap that reads input pixel stride * i; SiteRefusal if there is none."""
    weight = conv.params["weight"]
    taps = []
    for k, d, (before, after) in zip(weight.shape[2:], conv.attrs["dilation"], conv.attrs["padding"]):
        if before % d or before // d >= k:
            raise SiteRefusal(f"{conv.name}: no kernel tap is aligned with the input pixels (padding {before} "
                              f"before, dilation {d}, kernel {k}), so reserved channels cannot pass it exactly")
        c = before // d
        if after > (k - 1 - c) * d:
            raise SiteRefusal(f"{conv.name} pads {after} after a kernel of {k} (dilation {d}): its last outputs "
                              "read padding, which the shortcut does not see")
        taps.append(c)
    return tuple(taps)


def _layout_for(signals: int, next_conv: Stage | None) -> Layout:
    """The reserved layout a conv should emit so that `next_conv` can carry or merge it."""
    if next_conv is None or next_conv.groups == 1:
        return list(range(signals))
    in_per_group = next_conv.weight.shape[1]
    out_per_group = next_conv.weight.shape[0] // next_conv.groups
    carried = min(in_per_group, out_per_group)
    layout: Layout = []
    for start in range(0, signals, carried):
        chunk = list(range(start, min(start + carried, signals)))
        layout += chunk + [None] * (in_per_group - len(chunk))
    return layout


def _channel_axis(value: Value, spatial_dims: int) -> int:
    return len(value.shape) - spatial_dims - 1


def _shape_with_channels(value: Value, channels: int, spatial_dims: int) -> tuple | None:
    if value.shape is None:
        return None
    shape = list(value.shape)
    shape[_channel_axis(value, spatial_dims)] = channels
    return tuple(shape)


def _conv_flops(out: Value, weight_shape, spatial_dims: int) -> int | None:
    """2 x MACs, as torch's FLOP counter counts a conv (bias not counted)."""
    if out.shape is None:
        return None
    axis = _channel_axis(out, spatial_dims)
    positions = math.prod(s for i, s in enumerate(out.shape) if i != axis)
    return 2 * positions * weight_shape[0] * math.prod(weight_shape[1:])


def _numel(*tensors) -> int:
    return sum(t.numel() for t in tensors if t is not None)


class BlockBuilder:
    """Emits the widened convs and activations of one site into the graph through `ctx`."""

    def __init__(self, ctx: RewriteContext, site: ResidualSite, signals: Signals, relu_as_clamp: bool):
        self.ctx = ctx
        self.site = site
        self.signals = signals
        self.relu_as_clamp = relu_as_clamp
        self.first_weight = site.stages[0].conv.params["weight"]
        self.spatial_dims = self.first_weight.dim() - 2
        self.costs: list[ConvCost] = []

    # -- the whole block ------------------------------------------------------------------
    def build(self) -> BuildResult:
        stages = self.site.stages
        if len(stages) == 1:
            return BuildResult(self._single_conv(stages[0]), 0, self.costs)
        self._check_strides([dirac_tap(s.conv) for s in stages], stages)
        value, layout, channels = self.site.x, None, 0
        for index, item in enumerate(self.site.main):
            if isinstance(item, Activation):
                value = self._activation(item.node, value, channels, layout)
                continue
            later = [s for s in self.site.main[index + 1:] if isinstance(s, Stage)]
            next_stage = later[0] if later else None
            if item is stages[0]:
                value, layout = self._reserve(item, value, next_stage)
            elif item is stages[-1]:
                value = self._merge(item, value, layout)
            else:
                value, layout = self._carry(item, value, layout, next_stage)
            channels = item.weight.shape[0]
        return BuildResult(value, self.signals.count, self.costs)

    def _check_strides(self, taps, stages: list[Stage]) -> None:
        total = [1] * self.spatial_dims
        for stage in stages:
            total = [t * s for t, s in zip(total, stage.conv.attrs["stride"])]
        if tuple(total) != tuple(self.site.shortcut.stride):
            raise SiteRefusal(f"the main path strides by {tuple(total)}, the shortcut by "
                              f"{tuple(self.site.shortcut.stride)}: their pixels do not align")

    # -- one conv, reserve and merge at once --------------------------------------------------
    def _single_conv(self, stage: Stage) -> Value:
        """F is one conv: the shortcut is added into its kernel at the Dirac tap (no reserved channels)."""
        taps = dirac_tap(stage.conv)
        if tuple(stage.conv.attrs["stride"]) != tuple(self.site.shortcut.stride):
            raise SiteRefusal(f"{stage.conv.name} strides by {tuple(stage.conv.attrs['stride'])}, the shortcut by "
                              f"{tuple(self.site.shortcut.stride)}: their pixels do not align")
        weight, bias = stage.weight.clone(), stage.bias + self.site.shortcut.bias
        matrix = self.site.shortcut.matrix
        in_per_group = weight.shape[1]
        out_per_group = weight.shape[0] // stage.groups
        rows, cols = torch.nonzero(matrix, as_tuple=True)
        for o, i in zip(rows.tolist(), cols.tolist()):
            if o // out_per_group != i // in_per_group:
                raise SiteRefusal(f"the shortcut mixes channels across the groups of {stage.conv.name}")
            weight[(o, i % in_per_group) + taps] += matrix[o, i]
        return self._emit_conv(stage, self.site.x, weight, bias, stage.groups, stage.output)

    # -- reserve, carry, merge ------------------------------------------------------------
    def _reserve(self, stage: Stage, x: Value, next_stage: Stage | None) -> tuple[Value, Layout]:
        if stage.groups != 1:
            raise SiteRefusal(f"the first conv {stage.conv.name} is grouped ({stage.groups} groups); its groups cannot "
                              "reserve channels for all of x")
        taps = dirac_tap(stage.conv)
        layout = _layout_for(self.signals.count, next_stage)
        out_channels = stage.weight.shape[0]
        weight = _grow(stage.weight, out_channels + len(layout), stage.weight.shape[1])
        for pos, j in enumerate(layout):
            if j is not None:
                weight[(out_channels + pos, self.signals.source[j]) + taps] = self.signals.sign[j]
        bias = _grow_vector(stage.bias, out_channels + len(layout))
        return self._emit_conv(stage, x, weight, bias, 1, stage.output), layout

    def _carry(self, stage: Stage, value: Value, layout: Layout, next_stage: Stage | None) -> tuple[Value, Layout]:
        taps = dirac_tap(stage.conv)
        out_channels, in_per_group = stage.weight.shape[0], stage.weight.shape[1]
        if stage.groups == 1:
            new_layout = _layout_for(self.signals.count, next_stage)
            weight = _grow(stage.weight, out_channels + len(new_layout), in_per_group + len(layout))
            position = {j: p for p, j in enumerate(layout) if j is not None}
            for pos, j in enumerate(new_layout):
                if j is not None:
                    weight[(out_channels + pos, in_per_group + position[j]) + taps] = 1.0
            bias = _grow_vector(stage.bias, out_channels + len(new_layout))
            return self._emit_conv(stage, value, weight, bias, 1, stage.output), new_layout
        out_per_group = out_channels // stage.groups
        if len(layout) % in_per_group or any(j is not None and p % in_per_group >= out_per_group
                                             for p, j in enumerate(layout)):
            raise SiteRefusal(f"{stage.conv.name} is grouped ({in_per_group} in, {out_per_group} out per group) and "
                              "its input's reserved channels do not fill its groups (two grouped convs of different "
                              "widths in a row)")
        extra = len(layout) // in_per_group
        new_layout: Layout = []
        for g in range(extra):
            group = layout[g * in_per_group:(g + 1) * in_per_group]
            new_layout += [group[u] if u < in_per_group else None for u in range(out_per_group)]
        weight = _grow(stage.weight, out_channels + extra * out_per_group, in_per_group)
        for pos, j in enumerate(new_layout):
            if j is not None:
                weight[(out_channels + pos, pos % out_per_group) + taps] = 1.0
        bias = _grow_vector(stage.bias, out_channels + len(new_layout))
        if next_stage is not None and next_stage.groups != 1 and next_stage.weight.shape[1] != out_per_group:
            raise SiteRefusal(f"{stage.conv.name} and {next_stage.conv.name} are grouped convs of different widths in "
                              "a row; the reserved channels cannot be regrouped between them")
        out = self._emit_conv(stage, value, weight, bias, stage.groups + extra, stage.output)
        return out, new_layout

    def _merge(self, stage: Stage, value: Value, layout: Layout) -> Value:
        if stage.groups != 1:
            raise SiteRefusal(f"the last conv {stage.conv.name} is grouped ({stage.groups} groups); its groups cannot "
                              "read the reserved channels to merge the shortcut")
        taps = dirac_tap(stage.conv)
        out_channels, in_channels = stage.weight.shape[0], stage.weight.shape[1]
        weight = _grow(stage.weight, out_channels, in_channels + len(layout))
        matrix = self.site.shortcut.matrix
        for pos, j in enumerate(layout):
            if j is not None:
                column = matrix[:, self.signals.source[j]] * self.signals.merge_coefficient(j)
                weight[(slice(None), in_channels + pos) + taps] = column
        bias = stage.bias + self.site.shortcut.bias
        return self._emit_conv(stage, value, weight, bias, 1, stage.output)

    # -- activations ----------------------------------------------------------------------
    def _activation(self, node: Node, value: Value, channels: int, layout: Layout) -> Value:
        """The same activation on the original channels; reserved ones pass (or are rectified)."""
        total = channels + len(layout)
        reserved_low = 0.0 if self.signals.rectify else -math.inf
        if node.kind == "relu" and (self.signals.rectify or not self.relu_as_clamp):
            out = self.ctx.op("relu", value, name=node.name)
        else:
            low, high = _clamp_bounds(node, channels, self.spatial_dims)
            low = torch.cat([low, torch.full((len(layout),), reserved_low, dtype=torch.float64)])
            high = torch.cat([high, torch.full((len(layout),), math.inf, dtype=torch.float64)])
            bound_shape = (total,) + (1,) * self.spatial_dims
            params = {"min": self.ctx.param(low.reshape(bound_shape), self.first_weight),
                      "max": self.ctx.param(high.reshape(bound_shape), self.first_weight)}
            out = self.ctx.op("clamp", value, params=params, name=node.name, min=None, max=None)
        out.producer.scope = node.scope
        out.shape = _shape_with_channels(node.output, total, self.spatial_dims)
        out.dtype = node.output.dtype
        return out

    # -- emission -------------------------------------------------------------------------
    def _emit_conv(self, stage: Stage, value: Value, weight: torch.Tensor, bias: torch.Tensor, groups: int,
                   like: Value) -> Value:
        conv = stage.conv
        ref = conv.params["weight"]
        attrs = dict(conv.attrs, groups=groups)
        out = self.ctx.op("conv", value, params={"weight": self.ctx.param(weight, ref),
                                                 "bias": self.ctx.param(bias, ref)},
                          name=conv.name, **attrs)
        out.producer.scope = conv.scope
        out.shape = _shape_with_channels(like, weight.shape[0], self.spatial_dims)
        out.dtype = like.dtype
        before = _numel(conv.params["weight"], conv.params.get("bias"))
        before += sum(_numel(bn.params.get("weight"), bn.params.get("bias")) for bn in stage.bns)
        self.costs.append(ConvCost(conv.name, stage.weight.shape[0], weight.shape[0], before, weight.numel() + bias.numel(),
                                   _conv_flops(like, tuple(stage.weight.shape), self.spatial_dims),
                                   _conv_flops(out, tuple(weight.shape), self.spatial_dims)))
        return out


def _grow(weight: torch.Tensor, out_channels: int, in_channels: int) -> torch.Tensor:
    """A zero float64 weight of the new size with `weight` in its top-left corner."""
    grown = torch.zeros((out_channels, in_channels) + tuple(weight.shape[2:]), dtype=torch.float64)
    grown[:weight.shape[0], :weight.shape[1]] = weight
    return grown


def _grow_vector(vector: torch.Tensor, size: int) -> torch.Tensor:
    grown = torch.zeros(size, dtype=torch.float64)
    grown[:vector.numel()] = vector
    return grown


def _clamp_bounds(node: Node, channels: int, spatial_dims: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel float64 (low, high) bounds of a relu or clamp; +-inf where it has none."""
    if node.kind == "relu":
        return torch.zeros(channels, dtype=torch.float64), torch.full((channels,), math.inf, dtype=torch.float64)
    bounds = []
    for key, missing in (("min", -math.inf), ("max", math.inf)):
        tensor = node.params.get(key)
        if tensor is None:
            scalar = node.attrs.get(key)
            bounds.append(torch.full((channels,), missing if scalar is None else float(scalar), dtype=torch.float64))
            continue
        flat = tensor.detach().to(torch.float64).reshape(-1)
        shape = list(tensor.shape)
        while shape and shape[0] == 1 and len(shape) > spatial_dims + 1:
            shape.pop(0)  # leading ones broadcast over the batch
        if flat.numel() == 1:
            flat = flat.expand(channels)
        elif shape != [channels] + [1] * spatial_dims:
            raise SiteRefusal(f"{node.name}'s {key} bound of shape {tuple(tensor.shape)} is not one per channel")
        bounds.append(flat.clone())
    return bounds[0], bounds[1]
