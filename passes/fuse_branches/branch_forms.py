"""Branches written as kernels (`KernelForm`), and the three ways to merge them exactly.

- `sum_forms`: parallel branches of one input added together become one kernel. Each branch is
  placed inside a common kernel so that every tap reads the same input position it read before.
- `stack_forms`: branches of one input concatenated on channels become one kernel with stacked rows.
- `plan_cascade` / `composed`: a conv applied to another conv's output becomes one conv; the plan says
  where the taps go and what the result costs, so a costly cascade is refused before any kernel is composed.

Each returns a KernelForm, or a string saying why the merge would not be exact (or would make
the model costlier, unless allowed). A linear layer is the case with no spatial dims.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from rewrite.numerics.kernels import (accumulate, avg_pool_kernel, bias_through, compose, dirac, embed, regroup,
                                      scale_rows_)
from rewrite.params import bias_f64, weight_bias

from .branch_terms import Branch, Layout


@dataclass
class KernelForm:
    weight: torch.Tensor  # float64 (O, C / groups, *k)
    bias: torch.Tensor  # float64 (O,)
    groups: int
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    padding: tuple[tuple[int, int], ...]
    padding_mode: str
    source: str  # what the report calls this branch

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    @property
    def in_channels(self) -> int:
        return self.weight.shape[1] * self.groups

    @property
    def kernel(self) -> tuple[int, ...]:
        return tuple(self.weight.shape[2:])

    @property
    def padded(self) -> bool:
        return any(a or b for a, b in self.padding)

    @property
    def macs(self) -> int:
        """Multiply-adds per output position."""
        return self.weight.numel()


# -- branches as kernels -------------------------------------------------------------------------
def node_form(node, sketch: bool = False) -> KernelForm:
    """A conv or linear node as it stands. A sketch has the float64 bias but only the weight's shape (a meta
    tensor): enough to plan a cascade and refuse it without converting any weight."""
    if sketch:
        weight = torch.empty(node.params["weight"].shape, dtype=torch.float64, device="meta")
        bias = bias_f64(node)
    else:
        weight, bias = weight_bias(node)
    if node.kind == "linear":
        return KernelForm(weight, bias, 1, (), (), (), "zeros", node.label)
    a = node.attrs
    return KernelForm(weight, bias, a["groups"], tuple(a["stride"]), tuple(a["dilation"]), tuple(a["padding"]),
                      a.get("padding_mode", "zeros"), node.label)


def identity_form(channels: int, layout: Layout, source: str) -> KernelForm:
    dims = layout.spatial
    zeros = torch.zeros(channels, dtype=torch.float64)
    if layout.family == "linear":
        return KernelForm(torch.eye(channels, dtype=torch.float64), zeros, 1, (), (), (), "zeros", source)
    return KernelForm(dirac(channels, dims), zeros, channels, (1,) * dims, (1,) * dims, ((0, 0),) * dims,
                      "zeros", source)


def pool_form(node, channels: int) -> KernelForm | str:
    a = node.attrs
    if a.get("ceil_mode"):
        return f"{node.label} uses ceil_mode, whose last window is averaged over fewer positions: not a conv"
    padded = any(p or q for p, q in a["padding"])
    if padded and not a.get("count_include_pad", True) and not a.get("divisor_override"):
        return (f"{node.label} pads without counting the padding (count_include_pad=False), so its divisor "
                "changes at the border: not a conv")
    kernel = tuple(a["kernel_size"])
    dims = len(kernel)
    return KernelForm(avg_pool_kernel(channels, kernel, a.get("divisor_override")),
                      torch.zeros(channels, dtype=torch.float64), channels, tuple(a["stride"]), (1,) * dims,
                      tuple(a["padding"]), "zeros", node.label)


def branch_form(branch: Branch, layout: Layout, channels: int, sketch: bool = False) -> KernelForm | str:
    """The kernel of one branch, its per-channel factor included (a sketch: see node_form)."""
    if branch.kind in ("conv", "linear"):
        if branch.kind != layout.family or branch.node.params["weight"].dim() != layout.spatial + 2:
            return f"{branch.node.label} does not lay out channels like the other branches"
        form = node_form(branch.node, sketch)
        if branch.crop is not None:  # a crop of the input is padding taken away: negative until aligned
            form = replace(form, padding=tuple((pb - cb, pa - ca) for (pb, pa), (cb, ca) in
                                               zip(form.padding, branch.crop)))
    elif branch.kind == "avg_pool":
        if layout.family != "conv":
            return f"{branch.node.label} pools a value that a linear layer reads on its last axis"
        form = pool_form(branch.node, channels)
        if isinstance(form, str):
            return form
    else:
        form = identity_form(channels, layout, branch.input.producer.label if branch.input.producer else
                             branch.input.name)
    scale = branch.term.scale
    if scale is None:
        return form
    if scale.numel() not in (1, form.out_channels):
        return f"a factor of {scale.numel()} values scales the {form.out_channels} channels of {form.source}"
    # the form's weight is its own fresh float64 copy (node_form, identity_form, pool_form above): scaled in place
    weight = form.weight if form.weight.is_meta else scale_rows_(form.weight, scale)
    return replace(form, weight=weight, bias=form.bias * scale)


# -- alignment -----------------------------------------------------------------------------------
@dataclass
class Alignment:
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    padding: tuple[tuple[int, int], ...]
    padding_mode: str
    size: tuple[int, ...]
    offsets: list[tuple[int, ...]]  # per form: where its first tap sits in the common kernel


def _names(forms) -> str:
    return ", ".join(f.source for f in forms[:4]) + (", ..." if len(forms) > 4 else "")


def align(forms: list[KernelForm]) -> Alignment | str:
    """One kernel grid in which every form's taps read the input positions they read before."""
    dims = len(forms[0].kernel)
    modes = {f.padding_mode for f in forms if f.padded}
    if len(modes) > 1:
        return f"the branches pad differently ({', '.join(sorted(modes))}): {_names(forms)}"
    mode = modes.pop() if modes else "zeros"
    stride, dilation, padding, size = [], [], [], []
    offsets: list[list[int]] = [[] for _ in forms]
    for d in range(dims):
        strides = {f.stride[d] for f in forms}
        if len(strides) > 1:
            return f"the branches have different strides {sorted(strides)} on axis {d}: {_names(forms)}"
        dilations = {f.dilation[d] for f in forms if f.kernel[d] > 1}
        if len(dilations) > 1:
            return f"the branches have different dilations {sorted(dilations)} on axis {d}: {_names(forms)}"
        dil = dilations.pop() if dilations else 1
        # pad_before + pad_after - reach decides the output length; it must agree for every input length.
        spans = [f.padding[d][0] + f.padding[d][1] - dil * (f.kernel[d] - 1) for f in forms]
        if len(set(spans)) > 1:
            return (f"the branches' paddings do not line up on axis {d} (their output lengths would differ "
                    f"for some inputs): {_names(forms)}")
        befores = [f.padding[d][0] for f in forms]
        if len({b % dil for b in befores}) > 1:
            return (f"a branch would sit between the taps of the dilation-{dil} kernel on axis {d}, "
                    f"not on them: {_names(forms)}")
        before = max(befores)
        starts = [(before - b) // dil for b in befores]
        extent = max(s + f.kernel[d] for s, f in zip(starts, forms))
        after = spans[0] + dil * (extent - 1) - before
        if before < 0 or after < 0:
            return (f"every branch crops its input on axis {d} (a padding of {(before, after)}): a conv cannot crop: "
                    f"{_names(forms)}")
        stride.append(strides.pop())
        dilation.append(dil)
        padding.append((before, after))
        size.append(extent)
        for off, s in zip(offsets, starts):
            off.append(s)
    return Alignment(tuple(stride), tuple(dilation), tuple(padding), mode, tuple(size), [tuple(o) for o in offsets])


def _costlier(macs: int, before: int, allow: bool, what: str) -> str | None:
    if allow or macs <= before:
        return None
    return (f"{what} would cost {macs} multiply-adds per output position instead of {before} "
            "(a larger or denser kernel); pass options={'fuse_branches': {'allow_costlier': True}} to fuse anyway")


def sum_forms(forms: list[KernelForm], allow_costlier: bool = False) -> KernelForm | str:
    """Parallel branches of one input added together, as one kernel."""
    if len({f.out_channels for f in forms}) > 1 or len({f.in_channels for f in forms}) > 1:
        return f"the branches have different channel counts: {_names(forms)}"
    grid = align(forms)
    if isinstance(grid, str):
        return grid
    groups = math.gcd(*(f.groups for f in forms))
    shape = (forms[0].out_channels, forms[0].in_channels // groups, *grid.size)
    refusal = _costlier(math.prod(shape), sum(f.macs for f in forms), allow_costlier, "the merged kernel")
    if refusal:
        return refusal
    weight = torch.zeros(shape, dtype=torch.float64)
    for f, off in zip(forms, grid.offsets):
        accumulate(weight, groups, f.weight, f.groups, off)
    bias = torch.stack([f.bias for f in forms]).sum(0)
    return KernelForm(weight, bias, groups, grid.stride, grid.dilation, grid.padding, grid.padding_mode,
                      forms[0].source)


def stack_forms(forms: list[KernelForm], allow_costlier: bool = False) -> KernelForm | str:
    """Branches of one input concatenated on channels, as one kernel (ungrouped, rows stacked)."""
    if len({f.in_channels for f in forms}) > 1:
        return f"the branches read different channel counts: {_names(forms)}"
    grid = align(forms)
    if isinstance(grid, str):
        return grid
    macs = sum(f.out_channels for f in forms) * forms[0].in_channels * math.prod(grid.size)
    refusal = _costlier(macs, sum(f.macs for f in forms), allow_costlier, "the stacked kernel")
    if refusal:
        return refusal
    weight = torch.cat([regroup(embed(f.weight, grid.size, off), f.groups, 1) for f, off in zip(forms, grid.offsets)])
    return KernelForm(weight, torch.cat([f.bias for f in forms]), 1, grid.stride, grid.dilation, grid.padding,
                      grid.padding_mode, forms[0].source)


@dataclass
class CascadePlan:
    """Where `second` applied after `first` puts its taps, known before any kernel arithmetic, so the
    cost of the composed kernel is decided from the kernels' sizes alone (a refused 7x7 depthwise ->
    dense 1x1 with 384 channels would otherwise compose a 384 x 384 x 7 x 7 kernel in float64 first)."""

    first: KernelForm
    second: KernelForm
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    padding: tuple[tuple[int, int], ...]
    size: tuple[int, ...]
    second_steps: tuple[int, ...]
    first_steps: tuple[int, ...]
    groups: int

    @property
    def macs(self) -> int:
        """Multiply-adds per output position of the composed kernel."""
        return self.second.out_channels * (self.first.in_channels // self.groups) * math.prod(self.size)

    @property
    def macs_before(self) -> int:
        """Those of the cascade: the first runs once per position the second reads."""
        return self.second.macs + self.first.macs * math.prod(self.second.stride)


def plan_cascade(first: KernelForm, second: KernelForm) -> CascadePlan | str:
    """The geometry of `second` applied to the output of `first`, or why it is not one conv."""
    if first.out_channels != second.in_channels:
        return f"{second.source} reads {second.in_channels} channels, {first.source} makes {first.out_channels}"
    why = _padding_breaks_cascade(first, second)
    if why:
        return why
    stride, dilation, padding, size, second_steps, first_steps = [], [], [], [], [], []
    for d in range(len(second.kernel)):
        s1, k1, k2 = first.stride[d], first.kernel[d], second.kernel[d]
        reach2 = second.dilation[d] * s1 if k2 > 1 else 0  # second's tap spacing, in input positions
        reach1 = first.dilation[d] if k1 > 1 else 0
        dil = math.gcd(reach2, reach1) or 1
        step2, step1 = max(reach2 // dil, 1), max(reach1 // dil, 1)
        stride.append(s1 * second.stride[d])
        dilation.append(dil)
        padding.append((first.padding[d][0] + s1 * second.padding[d][0],
                        first.padding[d][1] + s1 * second.padding[d][1]))
        size.append((k2 - 1) * step2 + (k1 - 1) * step1 + 1)
        second_steps.append(step2)
        first_steps.append(step1)
    return CascadePlan(first, second, tuple(stride), tuple(dilation), tuple(padding), tuple(size),
                       tuple(second_steps), tuple(first_steps), math.gcd(first.groups, second.groups))


def cascade_refusal(plan: CascadePlan, allow_costlier: bool = False) -> str | None:
    """Why the planned composition is not made on cost grounds (None: it is cheap enough, or allowed)."""
    return _costlier(plan.macs, plan.macs_before, allow_costlier, "the composed kernel")


def composed(plan: CascadePlan) -> KernelForm:
    """The kernel of a planned cascade (float64 arithmetic: call it once the plan is accepted)."""
    first, second, groups = plan.first, plan.second, plan.groups
    outer = regroup(second.weight, second.groups, groups)
    weight = compose(outer, regroup(first.weight, first.groups, groups), groups, plan.size,
                     plan.second_steps, plan.first_steps)
    bias = second.bias + bias_through(outer, groups, first.bias)
    mode = first.padding_mode if first.padded else "zeros"
    return KernelForm(weight, bias, groups, plan.stride, plan.dilation, plan.padding, mode, second.source)


def _padding_breaks_cascade(first: KernelForm, second: KernelForm) -> str | None:
    """Zero padding of the second conv is exact only where the first conv's output would be zero anyway."""
    if not second.padded:
        return None
    if second.padding_mode != "zeros":
        return f"{second.source} pads in {second.padding_mode} mode, which mirrors {first.source}'s output, not its input"
    if first.padded and first.padding_mode != "zeros":
        return f"{first.source} pads in {first.padding_mode} mode and {second.source} pads with zeros"
    if bool(first.bias.abs().max() > 0):
        return (f"{second.source} zero-pads its input, so the border sees zeros where {first.source}'s bias "
                "would be: exact only when that bias is zero")
    for d, ((p2b, p2a), (p1b, p1a)) in enumerate(zip(second.padding, first.padding)):
        reach = first.dilation[d] * (first.kernel[d] - 1)
        # Before the border the first conv, shifted out, must read only padding; past it likewise.
        if (p2b and reach - p1b > first.stride[d] - 1) or (p2a and p1a < reach):
            return (f"{second.source} zero-pads its input on axis {d}, where {first.source} extended past the "
                    "border would still read the input: not zero, so the cascade is not one conv")
    return None
