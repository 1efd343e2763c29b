"""Channel dependency groups and per-channel constants, for exact channel removal.

Every tensor with a channel axis (axis 1, shapes known from example inputs) gets a channel
*space*. Ops couple channels of their inputs and outputs (BN, activations, pools and residual
adds one to one; concat and split by offset; a grouped conv couples a whole group of inputs with
that group's outputs): coupled channels can only be removed together. The value-level coupling
graph is a networkx graph (its components are the dependency groups reported to the user); the
per-channel classes inside it are found by a vectorized union-find, since a real network has
~10^5 channels.

A forward *constant analysis* gives, per channel, the constant it carries (NaN when it varies):
a BN with gamma 0 outputs beta, a conv output with all-zero weights outputs its bias, constants
go through BN, ReLU, pools and adds, and stop being constant at zero-padded borders.

Channels leave a class through *exits*: a conv / linear reading them. An exit folds a constant
input channel into its bias, which is exact only if the constant is the same at every position
the kernel sees (no zero padding, or a zero constant). Everything the analysis cannot reason
about *pins* the channels it touches, with a reason.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import networkx as nx
import torch

from ..ir import Graph, Node, Value
from ..params import bias_f64, bn_affine, bn_refusal, channel_values, f64, out_channels, zero_padded

_ELEMENTWISE = ("relu", "clamp", "identity", "dropout", "max_pool", "avg_pool", "adaptive_avg_pool")


@dataclass(eq=False)
class Space:
    """The channel axis of one value: `channels` channels of `mult` columns each (mult > 1 after flatten)."""

    value: Value
    channels: int
    mult: int
    offset: int  # first index of this space in the global channel numbering


@dataclass
class Block:
    """Channels of `space` (mask) that may not be removed, or may not leave the class, and why."""

    space: Space
    mask: torch.Tensor
    reason: str
    node: str


@dataclass
class ChannelGraph:
    graph: Graph
    spaces: dict[int, Space] = field(default_factory=dict)  # id(value) -> Space
    order: list[Space] = field(default_factory=list)
    const: dict[int, torch.Tensor] = field(default_factory=dict)  # id(space) -> float64 (channels,), NaN = varies
    blocks: list[Block] = field(default_factory=list)
    # Places where a constant stops being constant (a zero-padded border): reported if the channel stays.
    breaks: list[Block] = field(default_factory=list)
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    deps: nx.Graph = field(default_factory=nx.Graph)
    # (add/mul node, input index, constant's channel axis): per-channel constants to slice on removal
    channel_constants: list[tuple[Node, int, int]] = field(default_factory=list)
    # (conv, input space, output space, groups) of grouped convs whose groups must all shrink alike
    grouped: list[tuple[Node, Space, Space, int]] = field(default_factory=list)
    # the node that made each of `pairs`, to say where a dead channel meets a live one
    pair_nodes: list[str] = field(default_factory=list)
    # whether each of `pairs` carries values (input channel -> the output channel it becomes); a grouped
    # conv's couplings do not: they tie channels of one group, which leave together
    pair_carries: list[bool] = field(default_factory=list)
    size: int = 0

    def space(self, value: Value) -> Space | None:
        return self.spaces.get(id(value))

    def constants(self, space: Space) -> torch.Tensor:
        return self.const[id(space)]

    def labels(self) -> torch.Tensor:
        """The class of every channel: coupled channels share a label."""
        if not self.pairs:
            return torch.arange(self.size)
        a = torch.cat([p[0] for p in self.pairs])
        b = torch.cat([p[1] for p in self.pairs])
        return _union_find(self.size, a, b)


def _union_find(n: int, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Connected components of n elements linked by edges (a[i], b[i]); label = smallest member."""
    # index_select, not parent[a]: advanced indexing with an index tensor costs ~30x more on CPU
    parent = torch.arange(n)
    while True:
        pa, pb = parent.index_select(0, a), parent.index_select(0, b)
        lo, hi = torch.minimum(pa, pb), torch.maximum(pa, pb)
        hooked = parent.clone()
        hooked.scatter_reduce_(0, hi, lo, reduce="amin")
        while True:  # pointer jumping until every element points at its root
            jumped = hooked.index_select(0, hooked)
            if torch.equal(jumped, hooked):
                break
            hooked = jumped
        if torch.equal(hooked, parent):
            return parent
        parent = hooked


def _rows_reading_nonzero(flat: torch.Tensor, columns: torch.Tensor | None) -> torch.Tensor:
    """Per row of `flat` (O, I, K): whether it has a non-zero among `columns` of I (all when None). Most rows
    show one in their first two columns, so only the others are scanned in full: the same answer as one
    count over the whole weight, which cost a quarter of remove_channels on a ResNet-50."""
    rows = flat.shape[0]
    if columns is not None and len(columns) == 0:
        return torch.zeros(rows, dtype=torch.bool)
    head = flat[:, :2] if columns is None else flat.index_select(1, columns[:2])
    found = torch.count_nonzero(head.reshape(rows, -1), dim=1) > 0
    rest = (~found).nonzero().flatten()
    if len(rest):
        tail = flat.index_select(0, rest)
        tail = tail if columns is None else tail.index_select(1, columns)
        found[rest] = torch.count_nonzero(tail.reshape(len(rest), -1), dim=1) > 0
    return found


def _varying(n: int) -> torch.Tensor:
    return torch.full((n,), math.nan, dtype=torch.float64)


def _all(n: int) -> torch.Tensor:
    return torch.ones(n, dtype=torch.bool)


def _rank(value: Value) -> int | None:
    return None if value.shape is None else len(value.shape)


class _Builder:
    def __init__(self, graph: Graph):
        self.g = ChannelGraph(graph)

    # -- spaces, couplings, blocks ---------------------------------------------------------
    def new_space(self, value: Value, channels: int, mult: int = 1, const: torch.Tensor | None = None) -> Space:
        sp = Space(value, channels, mult, self.g.size)
        self.g.size += channels
        self.g.spaces[id(value)] = sp
        self.g.order.append(sp)
        self.g.const[id(sp)] = _varying(channels) if const is None else const
        self.g.deps.add_node(value.name, channels=channels)
        return sp

    def default_space(self, value: Value, reason: str, node: str) -> Space | None:
        """A space for a value whose producer cannot drop channels: pinned."""
        if id(value) in self.g.spaces:
            return self.g.spaces[id(value)]
        if value.shape is None or len(value.shape) < 2:
            return None
        sp = self.new_space(value, int(value.shape[1]))
        self.pin(sp, reason, node)
        return sp

    def pin(self, sp: Space | None, reason: str, node: str, mask: torch.Tensor | None = None) -> None:
        if sp is not None and sp.channels:
            self.g.blocks.append(Block(sp, _all(sp.channels) if mask is None else mask, reason, node))

    def couple(self, a: Space, a_idx: torch.Tensor, b: Space, b_idx: torch.Tensor, node: Node,
               carries: bool = True) -> None:
        self.g.pairs.append((a.offset + a_idx, b.offset + b_idx))
        self.g.pair_nodes.append(node.label)
        self.g.pair_carries.append(carries)
        self.g.deps.add_edge(a.value.name, b.value.name, node=node.label, kind=node.kind)

    def couple_same(self, a: Space, b: Space, node: Node) -> None:
        idx = torch.arange(a.channels)
        self.couple(a, idx, b, idx, node)

    # -- the walk ----------------------------------------------------------------------------
    def run(self) -> ChannelGraph:
        graph = self.g.graph
        for value in graph.inputs:
            self.default_space(value, "it is a model input", "<input>")
        for node in graph.nodes:
            weight = node.params.get("weight")
            if weight is not None and not weight.numel():  # valid ONNX: a layer of zero channels in or out
                self._inputs_pinned(node, f"it flows into {_describe(node)}, whose weight has no elements")
            else:
                visit = getattr(self, f"_visit_{node.kind}", None) or \
                    (self._visit_pointwise if node.op.pointwise and node.op.evaluate else self._visit_other)
                visit(node)
            for out in node.outputs:  # anything a visitor did not explain is pinned
                self.default_space(out, f"it is produced by {_describe(node)}, which cannot drop channels",
                                   node.label)
        for value in graph.outputs:
            self.pin(self.g.space(value), "it is a model output", "<output>")
        return self.g

    def _inputs_pinned(self, node: Node, reason: str) -> None:
        for value in node.inputs:
            self.pin(self.g.space(value), reason, node.label)

    def _visit_other(self, node: Node) -> None:
        self._inputs_pinned(node, f"it flows into {_describe(node)}")

    def _visit_constant(self, node: Node) -> None:
        pass  # an operand of add / mul, handled there; elsewhere its readers pin what they read

    # -- convolutions and linear layers -------------------------------------------------------
    def _enter_conv(self, node: Node) -> tuple[Space, Space] | None:
        """Couple a conv's / conv_transpose's input and output channel spaces (whole groups when grouped)."""
        x, out = node.inputs[0], node.output
        sx = self.g.space(x)
        w = node.params["weight"]
        groups = node.attrs["groups"]
        if sx is None or _rank(x) != w.dim() or sx.mult != 1 or _rank(out) != w.dim():
            self.pin(sx, f"{node.label} reads it in a layout other than (N, C, ...)", node.label)
            return None
        so = self.new_space(out, out_channels(node))
        if groups > 1 and (node.kind == "conv_transpose" or sx.channels == groups):
            self._couple_groups(node, sx, so, groups)  # depthwise (or transposed): a channel goes with its group
        elif groups > 1:
            self._even_groups(node, sx, so, groups)
        else:
            self._exit(node, sx)
        return sx, so

    def _visit_conv(self, node: Node) -> None:
        spaces = self._enter_conv(node)
        if spaces is not None:
            sx, so = spaces
            self.g.const[id(so)] = self._conv_constants(node, self.g.constants(sx), so)

    def _visit_conv_transpose(self, node: Node) -> None:
        spaces = self._enter_conv(node)
        if spaces is None:
            return
        sx, so = spaces
        w, groups = node.params["weight"], node.attrs["groups"]
        # Each output position sums a different set of taps: constant only when its inputs are all 0.
        c = self.g.constants(sx).reshape(groups, -1)  # (g, in per group)
        nz = w.detach().reshape(groups, c.shape[1], -1, *w.shape[2:]).flatten(3).ne(0).any(-1)  # (g, ipg, opg)
        bad = (nz & ~(c == 0).unsqueeze(-1)).any(1).reshape(-1)  # NaN compares unequal to 0
        bias = bias_f64(node)
        self.g.const[id(so)] = torch.where(bad, torch.full_like(bias, math.nan), bias)

    def _visit_linear(self, node: Node) -> None:
        x, out = node.inputs[0], node.output
        sx = self.g.space(x)
        w = node.params["weight"]
        if sx is not None and (_rank(x) != 2 or sx.channels * sx.mult != w.shape[1]):
            self.pin(sx, f"linear {node.label} reads the last axis of a rank-{_rank(x)} tensor; only (N, C) "
                         "inputs are handled", node.label)
            sx = None
        if sx is not None:
            self._exit(node, sx)
        if _rank(out) != 2:
            return  # its channels are on the last axis of a higher-rank tensor: not a space we track
        so = self.new_space(out, w.shape[0])
        if sx is None:
            self.pin(so, f"linear {node.label} reads an input whose channels are not tracked", node.label)
            return
        self.g.const[id(so)] = self._conv_constants(node, self.g.constants(sx), so, mult=sx.mult)

    def _couple_groups(self, node: Node, sx: Space, so: Space, groups: int) -> None:
        """Removing an input channel of a grouped conv removes its group: couple each group's ins and outs."""
        if sx.channels % groups or so.channels % groups:
            self.pin(sx, f"{node.label} has {groups} groups that do not divide its channels", node.label)
            self.pin(so, f"{node.label} has {groups} groups that do not divide its channels", node.label)
            return
        ipg, opg = sx.channels // groups, so.channels // groups
        g_in = torch.arange(sx.channels) // ipg
        g_out = torch.arange(so.channels) // opg
        if ipg == 1:  # each output reads its group's one input: a value carried on from it
            self.couple(sx, g_out, so, torch.arange(so.channels), node)
            if opg > 1:  # a depthwise multiplier's outputs of a group leave together
                self.couple(so, torch.arange(so.channels), so, g_out * opg, node, carries=False)
            return
        self.couple(sx, torch.arange(sx.channels), sx, g_in * ipg, node, carries=False)  # to its group's first
        self.couple(so, torch.arange(so.channels), sx, g_out * ipg, node, carries=False)  # every output likewise

    def _even_groups(self, node: Node, sx: Space, so: Space, groups: int) -> None:
        """A grouped conv with several inputs per group: its inputs exit like an ungrouped conv's, and the
        decision later keeps every group the same size (see ChannelGraph.grouped)."""
        if sx.channels % groups or so.channels % groups:
            self.pin(sx, f"{node.label} has {groups} groups that do not divide its channels", node.label)
            self.pin(so, f"{node.label} has {groups} groups that do not divide its channels", node.label)
            return
        self._exit(node, sx)
        self.g.grouped.append((node, sx, so, groups))

    def _exit(self, node: Node, sx: Space) -> None:
        """A conv / linear reading channels of `sx`: removing one folds its constant into the bias."""
        c = self.g.constants(sx)
        varying = torch.isnan(c)
        if varying.any():
            self.pin(sx, "", node.label, varying)  # not dead: no reason to report
        if node.kind == "conv_transpose":
            bad = ~varying & (c != 0)
            if bad.any():
                self.pin(sx, f"conv_transpose {node.label} reads a non-zero constant, which it spreads unevenly "
                             "over the output", node.label, bad)
        elif node.kind == "conv" and zero_padded(node):
            bad = ~varying & (c != 0)
            if bad.any():
                self.pin(sx, f"{node.label} zero-pads its input, so the channel's non-zero constant would differ "
                             "at the border; folding it is exact only without zero padding", node.label, bad)

    def _conv_constants(self, node: Node, c: torch.Tensor, so: Space, mult: int = 1) -> torch.Tensor:
        """Per output channel of a conv / linear: the constant it outputs, or NaN."""
        w = node.params["weight"].detach()
        groups = node.attrs.get("groups", 1)
        out = w.shape[0]
        flat = w.reshape(out, -1, mult) if node.kind == "linear" else w.reshape(out, w.shape[1], -1)
        total = bias_f64(node)
        if groups == 1:
            # Fast path (most layers). An output row is constant when it reads no varying column; only those
            # rows need the float64 sum of their constant inputs, and the zero-padding check only the columns
            # whose constant is non-zero.
            known_in = ~torch.isnan(c)
            unknown_cols, cols = (~known_in).nonzero().flatten(), known_in.nonzero().flatten()
            varying = _rows_reading_nonzero(flat, None if len(cols) == 0 else unknown_cols)
            rows = (~varying).nonzero().flatten()
            if len(cols) and len(rows):
                sub = flat.index_select(0, rows).index_select(1, cols)
                total = total.clone()
                total[rows] = total[rows] + (f64(sub).sum(-1) * c[cols].expand(len(rows), -1)).sum(1)
            if node.kind == "conv" and zero_padded(node) and len(rows):
                lit = cols[c[cols] != 0]  # constant, non-zero: differs at the zero-padded border
                border = torch.zeros_like(varying)
                if len(lit):
                    border[rows] = _rows_reading_nonzero(flat.index_select(0, rows), lit)
                if border.any():
                    self.g.breaks.append(Block(so, border, f"{node.label} zero-pads its input, so the constant "
                                                          "becomes non-constant at the border", node.label))
                varying = varying | border
            return torch.where(varying, torch.full_like(total, math.nan), total)
        nz = flat.ne(0).any(-1)  # (O, in per group): which inputs each output reads
        xg = c.reshape(groups, -1)[torch.arange(out) // (out // groups)]  # (O, in per group): the constants seen
        known = ~torch.isnan(xg)
        varying = (nz & ~known).any(1)
        cols = known.any(0).nonzero().flatten()  # only columns with a constant need float64 sums
        if len(cols):
            wsum = f64(flat.index_select(1, cols)).sum(-1)
            total = total + (wsum * torch.where(known[:, cols], xg[:, cols], torch.zeros(()))).sum(1)
        if node.kind == "conv" and zero_padded(node):
            border = (nz & known & (xg != 0)).any(1) & ~varying
            if border.any():
                self.g.breaks.append(Block(so, border, f"{node.label} zero-pads its input, so the constant becomes "
                                                      "non-constant at the border", node.label))
            varying = varying | border
        return torch.where(varying, torch.full_like(total, math.nan), total)

    # -- one-to-one ops -------------------------------------------------------------------------
    def _follow(self, node: Node, x: Value | None = None) -> tuple[Space, Space] | None:
        """Couple a one-to-one op's output channels with its input's; None (and pins) if shapes disagree."""
        x = node.inputs[0] if x is None else x
        sx = self.g.space(x)
        out = node.output
        if sx is None or out.shape is None or len(out.shape) < 2 or out.shape[1] != sx.channels * sx.mult:
            self.pin(sx, f"{_describe(node)} changes its channel axis", node.label)
            return None
        so = self.new_space(out, sx.channels, sx.mult)
        self.couple_same(sx, so, node)
        return sx, so

    def _visit_batch_norm(self, node: Node) -> None:
        sx = self.g.space(node.inputs[0])
        why = bn_refusal(node)
        if sx is not None and sx.mult != 1:
            why = why or f"{node.label} normalizes the columns of a flattened tensor"
        if why:
            self.pin(sx, why, node.label)
            gamma = node.params.get("weight")
            if sx is not None and gamma is not None and gamma.numel() == sx.channels and bool((gamma == 0).any()):
                self.g.breaks.append(Block(sx, (gamma == 0).detach().cpu(), why, node.label))  # say why they stay
            return
        spaces = self._follow(node)
        if spaces is None:
            return
        sx, so = spaces
        scale, shift = bn_affine(node)
        c = self.g.constants(sx)
        self.g.const[id(so)] = torch.where(scale == 0, shift, c * scale + shift)  # gamma 0: beta, whatever x is

    def _visit_relu(self, node: Node) -> None:
        spaces = self._follow(node)
        if spaces:
            self.g.const[id(spaces[1])] = self.g.constants(spaces[0]).clamp_min(0)

    def _visit_clamp(self, node: Node) -> None:
        lo, hi = node.params.get("min"), node.params.get("max")
        if any(b is not None and b.numel() != 1 for b in (lo, hi)):
            return self._visit_other(node)  # per-channel bounds: not modelled
        spaces = self._follow(node)
        if spaces:
            lo, hi = (None if b is None else float(b) for b in (lo, hi))
            self.g.const[id(spaces[1])] = torch.clamp(self.g.constants(spaces[0]), lo, hi)

    def _visit_pointwise(self, node: Node) -> None:
        """An activation of a constant channel is a constant (SiLU, GELU, sigmoid, hardswish, ...)."""
        spaces = self._follow(node)
        if spaces:
            self.g.const[id(spaces[1])] = node.op.evaluate(self.g.constants(spaces[0]), **node.attrs)

    def _visit_identity(self, node: Node) -> None:
        spaces = self._follow(node)
        if spaces:
            self.g.const[id(spaces[1])] = self.g.constants(spaces[0])

    def _visit_dropout(self, node: Node) -> None:
        if node.attrs.get("training"):
            return self._inputs_pinned(node, f"dropout {node.label} is in training mode")
        self._visit_identity(node)

    def _visit_stochastic_depth(self, node: Node) -> None:
        if node.attrs.get("training"):
            return self._inputs_pinned(node, f"stochastic depth {node.label} is in training mode")
        self._visit_identity(node)

    def _visit_slice(self, node: Node) -> None:
        """x[:, start:end] on the channel axis: output channel j is input channel start + j."""
        a = node.attrs
        if channel_dim(a["dim"], node.inputs[0]) != 1:
            return self._visit_identity(node) if channel_dim(a["dim"], node.inputs[0]) > 1 else \
                self._visit_other(node)
        if a["step"] != 1:
            return self._inputs_pinned(node, f"slice {node.label} takes every {a['step']}th channel; only "
                                             "contiguous channel slices are followed")
        self._select(node, torch.arange(a["start"], a["end"]))

    def _visit_index_select(self, node: Node) -> None:
        """x.index_select(1, index) with a constant index: output channel j is input channel index[j]."""
        dim = channel_dim(node.attrs["dim"], node.inputs[0])
        if dim != 1:
            return self._visit_identity(node) if dim > 1 else self._visit_other(node)
        self._select(node, node.params["index"].detach().long().reshape(-1).cpu())

    def _select(self, node: Node, index: torch.Tensor) -> None:
        x, out = node.inputs[0], node.output
        sx = self.g.space(x)
        if sx is None or sx.mult != 1 or out.shape is None or out.shape[1] != len(index):
            return self._inputs_pinned(node, f"{_describe(node)} selects channels of a tensor whose channels are "
                                             "not tracked")
        so = self.new_space(out, len(index), const=self.g.constants(sx)[index].clone())
        self.couple(sx, index, so, torch.arange(len(index)), node)

    def _visit_max_pool(self, node: Node) -> None:
        sx = self.g.space(node.inputs[0])
        if sx is not None and sx.mult != 1:
            return self._visit_other(node)
        self._visit_identity(node)  # padding is -inf for max: a constant stays constant

    def _visit_adaptive_avg_pool(self, node: Node) -> None:
        self._visit_max_pool(node)  # an average of a constant

    def _visit_avg_pool(self, node: Node) -> None:
        sx = self.g.space(node.inputs[0])
        if sx is not None and sx.mult != 1:
            return self._visit_other(node)
        spaces = self._follow(node)
        if not spaces:
            return
        c = self.g.constants(spaces[0])
        a = node.attrs
        padded = any(p or q for p, q in a.get("padding", ()))
        counts_zeros = padded and a.get("count_include_pad", True)
        if counts_zeros or a.get("divisor_override"):
            # Border windows average in padding zeros (or a fixed divisor rescales partial windows).
            border = ~torch.isnan(c) & (c != 0)
            if border.any():
                self.g.breaks.append(Block(spaces[1], border, f"avg_pool {node.label} counts its zero padding, so "
                                                              "the constant changes at the border", node.label))
            c = torch.where(border, torch.full_like(c, math.nan), c)
        self.g.const[id(spaces[1])] = c

    # -- many-to-one ops --------------------------------------------------------------------
    def _visit_add(self, node: Node) -> None:
        self._elementwise(node, lambda cs: torch.stack(cs).sum(0))

    def _visit_mul(self, node: Node) -> None:
        def product(cs):
            prod = torch.stack(cs).prod(0)
            zero = torch.stack([c == 0 for c in cs]).any(0)  # 0 times anything finite is 0
            return torch.where(zero, torch.zeros_like(prod), prod)
        self._elementwise(node, product)

    def _elementwise(self, node: Node, combine) -> None:
        out = node.output
        rank = _rank(out)
        if rank is None or rank < 2:
            return self._visit_other(node)
        channels = int(out.shape[1])
        operands: list[Space] = []
        consts: list[torch.Tensor] = []
        sliced: list[tuple[int, int]] = []
        mult = None
        for i, value in enumerate(node.inputs):
            producer = value.producer
            if producer is not None and producer.kind == "constant":
                vector, axis = _per_channel(producer.params["value"], rank, channels)
                if vector is None:
                    return self._inputs_pinned(node, f"{node.label} has a constant operand that does not broadcast "
                                                     "per channel")
                consts.append(vector)
                if axis is not None:
                    sliced.append((i, axis))
                continue
            sv = self.g.space(value)
            if sv is None or _rank(value) != rank or sv.channels * sv.mult != channels:
                return self._inputs_pinned(node, f"{node.label} broadcasts an operand across channels")
            if mult is not None and sv.mult != mult:
                return self._inputs_pinned(node, f"{node.label} adds tensors flattened differently")
            mult = sv.mult
            operands.append(sv)
        if not operands:
            return
        if mult != 1 and sliced:
            return self._inputs_pinned(node, f"{node.label} has a per-column constant on a flattened tensor")
        so = self.new_space(out, operands[0].channels, mult)
        for sv in operands:
            self.couple_same(sv, so, node)
        self.g.channel_constants += [(node, i, axis) for i, axis in sliced]
        self.g.const[id(so)] = combine([self.g.constants(sv) for sv in operands] + consts)

    def _visit_concat(self, node: Node) -> None:
        out = node.output
        rank = _rank(out)
        dim = node.attrs["dim"] + (rank or 0) if node.attrs["dim"] < 0 else node.attrs["dim"]
        spaces = [self.g.space(v) for v in node.inputs]
        if dim != 1 or any(s is None or s.mult != 1 or _rank(s.value) != rank for s in spaces):
            return self._inputs_pinned(node, f"concat {node.label} joins along dim {node.attrs['dim']}, "
                                             "not the channel axis")
        so = self.new_space(out, sum(s.channels for s in spaces))
        start = 0
        for s in spaces:
            idx = torch.arange(s.channels)
            self.couple(s, idx, so, start + idx, node)
            start += s.channels
        self.g.const[id(so)] = torch.cat([self.g.constants(s) for s in spaces])

    def _visit_split(self, node: Node) -> None:
        x = node.inputs[0]
        sx = self.g.space(x)
        rank = _rank(x)
        dim = node.attrs["dim"] + (rank or 0) if node.attrs["dim"] < 0 else node.attrs["dim"]
        if sx is None or dim != 1 or sx.mult != 1 or sum(node.attrs["sizes"]) != sx.channels:
            return self._inputs_pinned(node, f"split {node.label} cuts along dim {node.attrs['dim']}, "
                                             "not the channel axis")
        start = 0
        c = self.g.constants(sx)
        for size, out in zip(node.attrs["sizes"], node.outputs):
            so = self.new_space(out, size, const=c[start:start + size].clone())
            idx = torch.arange(size)
            self.couple(sx, start + idx, so, idx, node)
            start += size

    def _visit_flatten(self, node: Node) -> None:
        x = node.inputs[0]
        sx = self.g.space(x)
        rank = _rank(x)
        if sx is None or rank is None:
            return self._visit_other(node)
        start = node.attrs["start_dim"] % rank
        end = node.attrs["end_dim"] % rank
        if start >= 2 or start == end:
            return self._visit_identity(node)  # the channel axis is untouched
        if start != 1 or sx.mult != 1:
            return self._inputs_pinned(node, f"flatten {node.label} merges the batch and channel axes")
        mult = math.prod(x.shape[2:end + 1])
        so = self.new_space(node.output, sx.channels, mult, const=self.g.constants(sx))
        self.couple_same(sx, so, node)


def channel_dim(dim: int, value: Value) -> int:
    """`dim` as a non-negative axis of `value` (-1 when its rank is unknown)."""
    rank = _rank(value)
    if dim >= 0:
        return dim
    return -1 if rank is None else dim + rank


def _describe(node: Node) -> str:
    return node.describe()


def _per_channel(t: torch.Tensor, rank: int, channels: int) -> tuple[torch.Tensor | None, int | None]:
    """A constant operand as one value per channel, and its channel axis when it must be sliced."""
    found = channel_values(t, rank - 1, rank)
    if found is None or (found[1] is not None and t.shape[found[1]] != channels):
        return None, None
    values, axis = found
    return (values.reshape(1).expand(channels).clone(), None) if axis is None else (values, axis)


def channel_graph(graph: Graph) -> ChannelGraph:
    """Spaces, couplings, constants, exits and pins of every channel of `graph` (shapes must be known)."""
    return _Builder(graph).run()
