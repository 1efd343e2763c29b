"""fuse_branches: structural re-parameterization (RepVGG, ACNet, DBB, MobileOne, ExpandNets) on any graph.

Three rules, each exact or refused with a reason:
- fuse_parallel_branches: a sum whose operands are branches of one input (KxK / 1x1 / 1xK convs,
  the identity, BN-only, avg-pool, each possibly scaled by a constant) becomes one conv.
- fuse_linear_cascade: a conv (or linear) applied to another conv's (linear's) output becomes one.
- fuse_concatenated_branches: branches of one input concatenated on channels become one conv.

BatchNorm and constant factors inside branches are folded as the branches are read, and the pass
also runs fold_bn's conv->BN and linear->BN rules, so `["fuse_branches"]` alone deploys a
train-form RepVGG or MobileOne; running fold_bn before it is harmless.

Options: allow_costlier (default False). A merge that would need more multiply-adds per output
position than the branches it replaces (a dense kernel for a depthwise branch, a 5x5 from two
3x3s in cascade) is refused unless this is set.
"""
from __future__ import annotations

import math

import torch

from rewrite.ir import Graph, Node, Value
from rewrite.params import in_channels
from rewrite.pass_manager import Pass, PassResult, RulePass, register_pass
from rewrite.patterns.branches import concatenated_branches, linear_cascade, parallel_branches
from rewrite.rule import rule

from .branch_forms import (CascadePlan, KernelForm, branch_form, cascade_refusal, composed, node_form, plan_cascade,
                           stack_forms, sum_forms)
from .branch_terms import (SUMS, WEIGHTED, Branch, Layout, Term, anchor_crops, classify, crop_refusals, expand,
                           find_layout, layout_of, obstacle, unaliased)
from ..cleanup import drop_zero_addend
from ..fold_bn import fold_bn_into_conv, fold_bn_into_linear
from .hidden_cascades import average_after_conv_as_conv, pad_into_pointwise_conv, pad_into_pointwise_conv_bn


def _rank(value: Value) -> int | None:
    return None if value.shape is None else len(value.shape)


def _emit(ctx, x: Value, form: KernelForm, layout: Layout, main: Node, like: Value | None) -> Value:
    ref = main.params["weight"]
    params = {"weight": ctx.param(form.weight, ref), "bias": ctx.param(form.bias, ref)}
    if layout.family == "linear":
        return ctx.op("linear", x, params=params, like=like, named_after=main)
    return ctx.op("conv", x, params=params, like=like, named_after=main, stride=form.stride,
                  padding=form.padding, dilation=form.dilation, groups=form.groups, padding_mode=form.padding_mode)


def _rescaled(ctx, term: Term, layout: Layout, dtype) -> Value:
    """A term left out of a merge, written back as its leaf times its factor."""
    if term.scale is None:
        return term.leaf
    scale = term.scale
    if scale.dim() == 1:
        scale = scale.reshape(-1, *([1] * layout.spatial))
    return ctx.op("mul", term.leaf, ctx.constant(scale.to(dtype or torch.float32)))


def _groups(branches: list[Branch]) -> list[list[Branch]]:
    by_input: dict[int, list[Branch]] = {}
    for b in branches:
        by_input.setdefault(id(b.input), []).append(b)
    return list(by_input.values())


def _main_branch(group: list[Branch]) -> Branch:
    """The weighted branch with the largest kernel: the merged conv is named after it."""
    weighted = [b for b in group if b.kind in WEIGHTED]
    return max(weighted, key=lambda b: math.prod(b.node.params["weight"].shape[1:]))  # one row's size, no view


def _merge_group(group: list[Branch], layout: Layout, shifts: list[torch.Tensor], allow: bool) -> KernelForm | str:
    main = _main_branch(group)
    channels = in_channels(main.node)  # from the weight's shape: its float64 form is built below, once
    forms = []
    for b in group:
        form = branch_form(b, layout, channels)
        if isinstance(form, str):
            return form
        forms.append(form)
    fused = sum_forms(forms, allow) if len(forms) > 1 else forms[0]
    if isinstance(fused, str) or not shifts:
        return fused
    shift = sum(shifts)
    if shift.numel() not in (1, fused.out_channels):
        return f"a shift of {shift.numel()} values does not match the {fused.out_channels} channels of {fused.source}"
    fused.bias = fused.bias + shift
    return fused


def _feeds_a_sum(graph: Graph, add: Node) -> bool:
    """The outermost add of a nested sum does the work, so inner ones wait for it."""
    value = add.output
    while len(value.uses) == 1 and not graph.is_output(value):
        reader = value.uses[0][0]
        if reader.kind in SUMS:
            return True
        if reader.kind != "identity" and not (reader.kind == "dropout" and not reader.attrs.get("training")):
            return False
        value = reader.output
    return False


def _computed_product(branch: Branch) -> bool:
    node = branch.term.leaf.producer
    return branch.kind == "identity" and node is not None and node.kind == "mul" and not any(
        i.producer is not None and i.producer.kind == "constant" for i in node.inputs)


def _obstacles(graph: Graph, branches: list[Branch], bases: set[int]) -> list[str]:
    reasons = []
    gated = [b for b in branches if _computed_product(b)]
    if len(gated) > 1:
        # Several branches each times a computed factor (selective kernels): what they read is shared.
        bases = bases | {id(unaliased(v)) for b in gated for i in b.term.leaf.producer.inputs
                         if i.producer is not None for v in i.producer.inputs}
    for b in branches:
        if b.kind != "identity":
            continue
        why = obstacle(graph, b.term.leaf, bases)
        if why and why not in reasons:
            reasons.append(why)
    return reasons


@rule(parallel_branches)
def fuse_parallel_branches(ctx, add):
    """Parallel branches of one input added together become one conv."""
    graph = ctx.graph
    if _feeds_a_sum(graph, add):
        return None
    found = find_layout(add.output)
    if found is None:
        return None
    layout, dtype = found
    expansion = expand(graph, add.output, layout, dtype)
    branches = anchor_crops([classify(graph, t, crops=True) for t in expansion.terms])
    groups = _groups(branches)
    mergeable = [g for g in groups if len(g) > 1 and any(b.kind in WEIGHTED for b in g)]
    if not mergeable:
        # Lone convs: one scaled by a factor (a BN after a sum of branches merged earlier) gets the factor
        # folded in, rather than written back as a mul; constant shifts (MobileOne's `0 + conv(x)`) become
        # the bias of the first lone conv.
        lone = [g for g in groups if len(g) == 1 and g[0].kind in WEIGHTED]
        mergeable = [g for g in lone if g[0].term.scale is not None] or (lone[:1] if expansion.shifts else [])
    operands, reasons, merged, shifts, left = [], [], 0, expansion.shifts, []
    for group in groups:
        fused = _merge_group(group, layout, shifts, ctx.options.get("allow_costlier", False)) \
            if any(group is g for g in mergeable) else None
        if isinstance(fused, KernelForm):
            main = _main_branch(group)
            like = add.output if len(groups) == 1 and not expansion.loose else main.node.output
            operands.append(_emit(ctx, main.input, fused, layout, main.node, like))
            merged += 1
            shifts = []
            continue
        if isinstance(fused, str):
            reasons.append(fused)
            left.append((fused, [b.node for b in group if b.node is not None]))
        operands += [_rescaled(ctx, b.term, layout, dtype) for b in group]
    if not merged:
        weighted_inputs = {id(b.input) for b in branches if b.kind in WEIGHTED}
        reasons += [why for why, _ in crop_refusals(branches)] + _obstacles(graph, branches, weighted_inputs)
        return ctx.fail("; ".join(reasons)) if reasons else None
    _leave_parts(ctx, add, left + [(why, [conv]) for why, conv in crop_refusals(branches)])
    operands += expansion.loose
    if len(operands) == 1:
        return operands[0]
    return ctx.op("add", *operands, like=add.output)


@rule(linear_cascade)
def fuse_linear_cascade(ctx, x, second):
    """A conv (linear) applied to another conv's (linear's) output becomes one conv (linear)."""
    graph = ctx.graph
    layout = layout_of(second, _rank(x))
    dtype = second.params["weight"].dtype
    expansion = expand(graph, x, layout, dtype, through_adds=False, top=False)
    if len(expansion.terms) != 1 or expansion.loose:
        return None
    branch = classify(graph, expansion.terms[0])
    leaf = expansion.terms[0].leaf.producer
    if branch.kind == "identity":
        if leaf is not None and leaf.kind in WEIGHTED and leaf.kind == second.kind:
            readers = [u.label for u in leaf.output.users if u is not second][:3]
            return ctx.fail(f"{leaf.label}'s output is also read by {', '.join(readers) or '<graph output>'}; "
                            "merging it into the next layer would leave that reader without it")
        return None
    if branch.kind != second.kind:
        return None  # avg_pool -> conv, or linear -> conv: not a cascade of one kind
    # Planned first on sketches (biases, and the weights' shapes only): most refused cascades (a zero-padded
    # conv after a biased one, a costlier kernel) are decided without converting either weight to float64.
    for sketch in (True, False):
        first = branch_form(branch, layout, in_channels(branch.node), sketch)
        if isinstance(first, str):
            return ctx.fail(first)
        if expansion.shifts:
            first.bias = first.bias + sum(expansion.shifts)
        plan = plan_cascade(first, node_form(second, sketch))
        if isinstance(plan, str):
            return ctx.fail(plan)
        # decided from the kernels' sizes, before any float64 composition
        refusal = cascade_refusal(plan, ctx.options.get("allow_costlier", False))
        if refusal and not _sum_absorbs(graph, second, branch.input, plan):
            return ctx.fail(refusal)
    return _emit(ctx, branch.input, composed(plan), layout, second, second.output)


_SCALING = ("batch_norm", "mul", "identity", "dropout")


def _sum_absorbs(graph: Graph, second: Node, x: Value, fused: CascadePlan) -> bool:
    """Whether a composed kernel that costs more than its cascade is free after all: the cascade is a branch
    of a sum that also holds a conv of the same input `x`, at the same stride, costing at least as much
    (DBB's 1x1 -> average branch beside its KxK). The parallel merge then absorbs it into that conv."""
    value = second.output
    while len(value.uses) == 1 and not graph.is_output(value):
        reader = value.uses[0][0]
        if reader.kind in SUMS and any(_costly_conv_of(graph, o, x, fused) for o in reader.inputs if o is not value):
            return True
        if reader.kind not in _SCALING + SUMS:
            return False
        value = reader.output
    return False


def _costly_conv_of(graph: Graph, value: Value, x: Value, fused: CascadePlan, depth: int = 16) -> bool:
    """Whether the sum operand `value` holds (through scalings and nested adds) such a conv."""
    node = value.producer
    if node is None or depth == 0 or graph.external_uses(value) != 1:
        return False
    if node.kind in _SCALING + SUMS:
        return any(_costly_conv_of(graph, i, x, fused, depth - 1) for i in node.inputs)
    return node.kind == "conv" and unaliased(node.inputs[0]) is x and \
        tuple(node.attrs["stride"]) == fused.stride and node.params["weight"].numel() >= fused.macs


def _channel_axis(concat: Node, layout: Layout) -> bool:
    """Whether the concatenation runs along the channel axis."""
    dim, rank = concat.attrs["dim"], _rank(concat.output)
    if dim < 0:
        return dim == (-1 if layout.family == "linear" else -(layout.spatial + 1))
    if rank is None:
        return False  # a positive axis names channels only for a known rank
    return dim == (rank - 1 if layout.family == "linear" else rank - layout.spatial - 1)


@rule(concatenated_branches)
def fuse_concatenated_branches(ctx, concat):
    """Branches of one input concatenated on channels become one conv with stacked weights."""
    graph = ctx.graph
    found = find_layout(concat.inputs[0]) if concat.inputs else None
    if found is None:
        return None
    layout, dtype = found
    layout = Layout(layout.family, layout.spatial, _rank(concat.output))
    if not _channel_axis(concat, layout):
        return None if concat.output.shape is not None or concat.attrs["dim"] < 0 else \
            ctx.fail("the concatenation axis is positive and the rank unknown: pass example_inputs")
    parts: list[tuple[Value, Branch | None, list]] = []
    for operand in concat.inputs:
        expansion = expand(graph, operand, layout, dtype, through_adds=False, top=False)
        single = len(expansion.terms) == 1 and not expansion.loose
        parts.append((operand, classify(graph, expansion.terms[0], crops=True) if single else None, expansion.shifts))
    anchored = iter(anchor_crops([b for _, b, _ in parts if b is not None]))
    parts = [(operand, next(anchored) if b is not None else None, shifts) for operand, b, shifts in parts]
    runs: list[list] = []
    for part in parts:
        if runs and part[1] is not None and runs[-1][-1][1] is not None and part[1].input is runs[-1][-1][1].input:
            runs[-1].append(part)
        else:
            runs.append([part])
    operands, reasons, merged, left = [], [], 0, []
    for run in runs:
        weighted = [p[1] for p in run if p[1].kind in WEIGHTED] if run[0][1] is not None else []
        fused = _stack_run(run, layout, weighted, ctx.options.get("allow_costlier", False)) \
            if len(run) > 1 and weighted else None
        if isinstance(fused, KernelForm):
            operands.append(_emit(ctx, run[0][1].input, fused, layout, weighted[0].node, None))
            merged += 1
            continue
        if isinstance(fused, str):
            reasons.append(fused)
            left.append((fused, [p[1].node for p in run if p[1] is not None and p[1].node is not None]))
        operands += [p[0] for p in run]
    if not merged:
        return ctx.fail("; ".join(reasons)) if reasons else None
    _leave_parts(ctx, concat, left)
    if len(operands) == 1:
        return operands[0]
    return ctx.op("concat", *operands, like=concat.output, dim=concat.attrs["dim"])


_PARTIAL = " not merged with the rest: "


def _leave_parts(ctx, root: Node, left: list[tuple[str, list[Node]]]) -> None:
    """A partial merge: each group of branches that stayed apart is reported with its reason."""
    for reason, nodes in left:
        names = ", ".join(n.label for n in nodes[:4]) or "identity branches"
        ctx.leave(f"branches {names} of {root.label}{_PARTIAL}{reason}", nodes)


def _stack_run(run, layout: Layout, weighted: list[Branch], allow: bool) -> KernelForm | str:
    channels = in_channels(weighted[0].node)
    forms = []
    for _, branch, shifts in run:
        form = branch_form(branch, layout, channels)
        if isinstance(form, str):
            return form
        if shifts:
            form.bias = form.bias + sum(shifts)
        forms.append(form)
    return stack_forms(forms, allow)


class FuseBranchesPass(Pass):
    """The branch rules first, so BN inside branches is folded once, as the branches are read;
    then fold_bn's conv->BN rules for BN outside any branch; the branch rules again if those fired."""

    name = "fuse_branches"
    description = ("merge parallel, concatenated and cascaded linear branches (RepVGG, ACNet, DBB, MobileOne, "
                   "ExpandNets) into one conv, folding BatchNorm on the way")
    options = {"allow_costlier": "also merge when the fused kernel costs more multiply-adds than the branches"}
    option_values = {"allow_costlier": (False, True)}

    def __init__(self):
        # drop_zero_addend after fuse_parallel_branches: a sum's outer `+ 0` (MobileOne's `out += 0`) is where
        # the parallel rule reads the whole sum, whose inner adds wait for it
        self.branch_rules = RulePass(self.name, [fuse_parallel_branches, drop_zero_addend,
                                                 fuse_concatenated_branches, fuse_linear_cascade])
        self.bn_rules = RulePass(self.name, [fold_bn_into_conv, fold_bn_into_linear])
        # first, so the cascades a padded border hid (DBB's BN-and-pad) are there for the branch rules
        self.border_rules = RulePass(self.name, [pad_into_pointwise_conv_bn, pad_into_pointwise_conv,
                                                 average_after_conv_as_conv])

    def run(self, graph: Graph, options: dict | None = None) -> PassResult:
        result = PassResult(self.name)
        _merge(result, self.border_rules.run(graph, options))
        _merge(result, self.branch_rules.run(graph, options))
        folded = self.bn_rules.run(graph, options)
        _merge(result, folded)
        if folded.modified:
            _merge(result, self.border_rules.run(graph, options))
            _merge(result, self.branch_rules.run(graph, options))
        # a site reported in an earlier round and rewritten in a later one is no refusal any more
        alive = {n.name for n in graph.nodes}
        result.refused = [r for r in result.refused if all(n in alive for n in r.node_names)]
        # after a partial merge the rule meets the new sum again and refuses what is left, for the same
        # reason: the partial report (which names the branches) says it already
        said = {(r.rule, r.reason.split(_PARTIAL, 1)[1]) for r in result.refused if _PARTIAL in r.reason}
        result.refused = [r for r in result.refused if (r.rule, r.reason) not in said]
        return result


def _merge(total: PassResult, part: PassResult) -> None:
    total.counts.update(part.counts)
    total.rewritten += part.rewritten
    total.refused = [r for r in total.refused if (r.rule, r.node) not in {(p.rule, p.node) for p in part.refused}]
    total.refused += part.refused
    total.notes.update(part.notes)


fuse_branches = register_pass(FuseBranchesPass())
