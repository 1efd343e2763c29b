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

from rewrite.analysis.cost import conv_flops
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
            raise SiteRefusal(f"{conv.label}: no kernel tap is aligned with the input pixels (padding {before} "
                              f"before, dilation {d}, kernel {k}), so reserved channels cannot pass it exactly")
        c = before // d
        if after > (k - 1 - c) * d:
            raise SiteRefusal(f"{conv.label} pads {after} after a kernel of {k} (dilation {d}): its last outputs "
                              "read padding, which the shortcut does not see")
        taps.append(c)
    return tuple(taps)


@dataclass(frozen=True)
class Slots:
    """A conv that carries reserved channels in whole extra groups of `width_in` -> `width_out` channels."""

    width_in: int
    width_out: int

    @property
    def carried(self) -> int:
        return min(self.width_in, self.width_out)


def carry_slots(stages: list[Stage], reserved: int) -> list[Slots | None]:
    """For each stage, how it carries the reserved channels: whole extra groups (Slots) or densely (None).

    A grouped conv must use extra groups. An ungrouped conv uses them too when cheaper: a dense carry
    costs (out + R) * (in + R) weights per tap, extra groups (1 + e) * out * in with e = ceil(R / min(in, out)).
    The first conv (reserve) and the last (merge) are always dense.
    """
    plan: list[Slots | None] = [None] * len(stages)
    for i in range(1, len(stages) - 1):
        stage = stages[i]
        width_in = stage.weight.shape[1]
        width_out = stage.weight.shape[0] // stage.groups
        slots = Slots(width_in, width_out)
        previous = plan[i - 1]
        fits_previous = previous is None or previous.width_out == width_in
        if stage.groups > 1:
            if not fits_previous:
                raise SiteRefusal(f"{stages[i - 1].conv.label} and {stage.conv.label} are grouped convs of different "
                                  "widths in a row; the reserved channels cannot be regrouped between them")
            plan[i] = slots
            continue
        extra = math.ceil(reserved / slots.carried)
        grouped_cost = (1 + extra) * width_out * width_in
        dense_cost = (width_out + reserved) * (width_in + reserved)
        plan[i] = slots if fits_previous and grouped_cost < dense_cost else None
    return plan


def _layout_for(signals: int, next_slots: Slots | None) -> Layout:
    """The reserved layout a conv emits so that the next conv can carry (or merge) it."""
    if next_slots is None:
        return list(range(signals))
    layout: Layout = []
    for start in range(0, signals, next_slots.carried):
        chunk = list(range(start, min(start + next_slots.carried, signals)))
        layout += chunk + [None] * (next_slots.width_in - len(chunk))
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
    return conv_flops(out.shape, weight_shape, _channel_axis(out, spatial_dims) if out.shape else 0)


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
        taps = {id(s): dirac_tap(s.conv) for s in stages}
        self._check_strides(stages)
        plan = carry_slots(stages, self.signals.count)
        if stages[0].groups != 1:
            raise SiteRefusal(f"the first conv {stages[0].conv.label} is grouped ({stages[0].groups} groups); its "
                              "groups cannot reserve channels for all of x")
        if stages[-1].groups != 1:
            raise SiteRefusal(f"the last conv {stages[-1].conv.label} is grouped ({stages[-1].groups} groups); its "
                              "groups cannot read the reserved channels to merge the shortcut")
        value, layout, channels, index = self.site.x, [], 0, 0
        for item in self.site.main:
            if isinstance(item, Activation):
                value = self._activation(item.node, value, channels, layout)
                continue
            tap = taps[id(item)]
            next_slots = plan[index + 1] if index + 1 < len(stages) else None
            if index == 0:
                value, layout = self._reserve(item, value, tap, _layout_for(self.signals.count, next_slots))
            elif index == len(stages) - 1:
                value = self._merge(item, value, tap, layout)
            elif plan[index] is None:
                value, layout = self._carry_dense(item, value, tap, layout, _layout_for(self.signals.count, next_slots))
            else:
                value, layout = self._carry_grouped(item, value, tap, layout, plan[index])
            channels = item.weight.shape[0]
            index += 1
        return BuildResult(value, self.signals.count, self.costs)

    def _check_strides(self, stages: list[Stage]) -> None:
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
            raise SiteRefusal(f"{stage.conv.label} strides by {tuple(stage.conv.attrs['stride'])}, the shortcut by "
                              f"{tuple(self.site.shortcut.stride)}: their pixels do not align")
        weight, bias = stage.weight.clone(), stage.bias + self.site.shortcut.bias
        matrix = self.site.shortcut.matrix
        in_per_group = weight.shape[1]
        out_per_group = weight.shape[0] // stage.groups
        rows, cols = torch.nonzero(matrix, as_tuple=True)
        if bool((rows // out_per_group != cols // in_per_group).any()):
            raise SiteRefusal(f"the shortcut mixes channels across the groups of {stage.conv.label}")
        weight[(rows, cols % in_per_group) + taps] += matrix[rows, cols]
        return self._emit_conv(stage, self.site.x, self._cast(weight), bias, stage.groups)

    # -- reserve, carry, merge ------------------------------------------------------------
    def _reserve(self, stage: Stage, x: Value, taps, layout: Layout) -> tuple[Value, Layout]:
        """Extra output rows: reserved channel p reads sign * x[source] at the Dirac tap."""
        out_channels = stage.weight.shape[0]
        weight = self._grown(stage.weight, out_channels + len(layout), stage.weight.shape[1])
        positions, signals = _present(layout)
        weight[(out_channels + positions, self._source(signals)) + taps] = self._cast(self._sign(signals))
        return self._emit_conv(stage, x, weight, _grow_vector(stage.bias, weight.shape[0]), 1), layout

    def _carry_dense(self, stage: Stage, value: Value, taps, layout: Layout, new_layout: Layout):
        out_channels, in_channels = stage.weight.shape[0], stage.weight.shape[1]
        weight = self._grown(stage.weight, out_channels + len(new_layout), in_channels + len(layout))
        where = {j: p for p, j in enumerate(layout) if j is not None}
        positions, signals = _present(new_layout)
        inputs = torch.tensor([where[j] for j in signals.tolist()], dtype=torch.long)
        weight[(out_channels + positions, in_channels + inputs) + taps] = 1
        out = self._emit_conv(stage, value, weight, _grow_vector(stage.bias, weight.shape[0]), 1)
        return out, new_layout

    def _carry_grouped(self, stage: Stage, value: Value, taps, layout: Layout, slots: Slots):
        """Reserved channels as whole extra groups: slot position u < min(in, out) carries input u."""
        if len(layout) % slots.width_in or any(j is not None and p % slots.width_in >= slots.width_out
                                               for p, j in enumerate(layout)):
            raise SiteRefusal(f"the reserved channels reaching {stage.conv.label} do not fill its groups")
        extra = len(layout) // slots.width_in
        new_layout: Layout = []
        for g in range(extra):
            group = layout[g * slots.width_in:(g + 1) * slots.width_in]
            new_layout += [group[u] if u < slots.width_in else None for u in range(slots.width_out)]
        out_channels = stage.weight.shape[0]
        weight = self._grown(stage.weight, out_channels + len(new_layout), slots.width_in)
        positions, _ = _present(new_layout)
        weight[(out_channels + positions, positions % slots.width_out) + taps] = 1
        out = self._emit_conv(stage, value, weight, _grow_vector(stage.bias, weight.shape[0]), stage.groups + extra)
        return out, new_layout

    def _merge(self, stage: Stage, value: Value, taps, layout: Layout) -> Value:
        """Extra input columns: reserved channel p enters through the shortcut's matrix at the Dirac tap."""
        out_channels, in_channels = stage.weight.shape[0], stage.weight.shape[1]
        weight = self._grown(stage.weight, out_channels, in_channels + len(layout))
        positions, signals = _present(layout)
        columns = self.site.shortcut.matrix[:, self._source(signals)] * self._sign(signals)  # (out, present)
        weight[(slice(None), in_channels + positions) + taps] = self._cast(columns)
        return self._emit_conv(stage, value, weight, stage.bias + self.site.shortcut.bias, 1)

    def _source(self, signals: torch.Tensor) -> torch.Tensor:
        return torch.tensor(self.signals.source, dtype=torch.long)[signals]

    def _sign(self, signals: torch.Tensor) -> torch.Tensor:
        # the reserve writes sign * x; the merge reads x = relu(x) - relu(-x), the same signs
        return torch.tensor(self.signals.sign, dtype=torch.float64)[signals]

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
            params = {"min": self.ctx.param(low.reshape(bound_shape), self.first_weight, allow_infinite=True),
                      "max": self.ctx.param(high.reshape(bound_shape), self.first_weight, allow_infinite=True)}
            out = self.ctx.op("clamp", value, params=params, name=node.name)
        out.producer.scope = node.scope
        out.shape = _shape_with_channels(node.output, total, self.spatial_dims)
        out.dtype = node.output.dtype
        return out

    # -- tensors and emission ---------------------------------------------------------------
    def _cast(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(dtype=self.first_weight.dtype)

    def _grown(self, weight: torch.Tensor, out_channels: int, in_channels: int) -> torch.Tensor:
        """Zeros of the new size in the model's dtype, with the float64 `weight` cast into its corner.

        Zeros and the Dirac ones are exact in any dtype, so only the computed entries need float64,
        and each is cast once, as if the whole tensor had been built in float64.
        """
        grown = torch.zeros((out_channels, in_channels) + tuple(weight.shape[2:]), dtype=self.first_weight.dtype)
        grown[:weight.shape[0], :weight.shape[1]] = self._cast(weight)
        return grown

    def _emit_conv(self, stage: Stage, value: Value, weight: torch.Tensor, bias: torch.Tensor, groups: int) -> Value:
        conv, like = stage.conv, stage.output
        ref = conv.params["weight"]
        attrs = dict(conv.attrs, groups=groups)
        params = {"weight": weight.to(ref.device), "bias": self.ctx.param(bias, ref)}
        out = self.ctx.op("conv", value, params=params, name=conv.name, **attrs)
        out.producer.scope = conv.scope
        out.shape = _shape_with_channels(like, weight.shape[0], self.spatial_dims)
        out.dtype = like.dtype
        before = 0 if stage.virtual else _numel(conv.params["weight"], conv.params.get("bias"))
        before += sum(_numel(bn.params.get("weight"), bn.params.get("bias")) for bn in stage.bns)
        self.costs.append(ConvCost(conv.label, stage.weight.shape[0], weight.shape[0], before,
                                   weight.numel() + bias.numel(),
                                   0 if stage.virtual else _conv_flops(like, tuple(stage.weight.shape), self.spatial_dims),
                                   _conv_flops(out, tuple(weight.shape), self.spatial_dims)))
        return out


def _present(layout: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions in a layout that hold a signal, and those signals, as index tensors."""
    pairs = [(p, j) for p, j in enumerate(layout) if j is not None]
    positions = torch.tensor([p for p, _ in pairs], dtype=torch.long)
    signals = torch.tensor([j for _, j in pairs], dtype=torch.long)
    return positions, signals


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
            bounds.append(torch.full((channels,), missing, dtype=torch.float64))
            continue
        flat = tensor.detach().to(torch.float64).reshape(-1)
        shape = list(tensor.shape)
        while shape and shape[0] == 1 and len(shape) > spatial_dims + 1:
            shape.pop(0)  # leading ones broadcast over the batch
        if flat.numel() == 1:
            flat = flat.expand(channels)
        elif shape != [channels] + [1] * spatial_dims:
            raise SiteRefusal(f"{node.label}'s {key} bound of shape {tuple(tensor.shape)} is not one per channel")
        bounds.append(flat.clone())
    return bounds[0], bounds[1]
