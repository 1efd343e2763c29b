"""Physical channel removal: slice every layer a removed channel touches, fold constants into biases.

Given the channel graph and a per-channel `removable` mask, each node is rebuilt with fresh,
smaller parameters (index_select copies, nothing is edited in place). A removed input channel of
a conv / linear that carried a constant c adds sum_k W[o, c, k] * c to the bias: exact because
the analysis only lets it go where every position sees the full constant.
"""
from __future__ import annotations

import torch

from rewrite.analysis.channels import ChannelGraph, Space, channel_dim
from rewrite.ir import Graph, Node
from rewrite.params import all_finite, cast_like, f64


class Surgery:
    def __init__(self, graph: Graph, cg: ChannelGraph, removable: torch.Tensor):
        self.graph = graph
        self.cg = cg
        self.keep = {id(sp): (~removable[sp.offset:sp.offset + sp.channels]).nonzero().flatten() for sp in cg.order}
        self.changed: list[Node] = []
        self.folded = 0

    def kept(self, sp: Space | None) -> torch.Tensor | None:
        return None if sp is None else self.keep[id(sp)]

    def shrunk(self, sp: Space | None) -> bool:
        return sp is not None and len(self.keep[id(sp)]) < sp.channels

    def run(self) -> list[Node]:
        for node in self.graph.nodes:
            handler = getattr(self, f"_{node.kind}", None)
            if handler is not None:
                handler(node)
        self._slice_channel_constants()
        for sp in self.cg.order:  # keep shape metadata true for later passes
            if self.shrunk(sp) and sp.value.shape is not None:
                shape = list(sp.value.shape)
                shape[1] = len(self.keep[id(sp)]) * sp.mult
                sp.value.shape = tuple(shape)
        return self.changed

    def _rebuilt(self, node: Node, params: dict, **attrs) -> None:
        node.params = params
        node.attrs.update(attrs)
        node.origin = None  # re-emitted from its canonical form, with the new parameters
        self.changed.append(node)

    # -- layers with weights ----------------------------------------------------------------
    def _shrunk_spaces(self, node: Node) -> tuple[Space | None, Space] | None:
        """The input and output channel spaces of a conv / conv_transpose, if either lost channels."""
        sx, so = self.cg.space(node.inputs[0]), self.cg.space(node.output)
        if so is None or not (self.shrunk(sx) or self.shrunk(so)):
            return None
        return sx, so

    def _conv(self, node: Node) -> None:
        spaces = self._shrunk_spaces(node)
        if spaces is None:
            return
        sx, so = spaces
        w, bias = node.params["weight"], node.params.get("bias")
        groups = node.attrs["groups"]
        out_keep = self.kept(so)
        if groups == 1:
            bias = self._folded_bias(node, sx, bias)
            w = w.index_select(0, out_keep).index_select(1, self.kept(sx))
            new_groups = 1
        elif sx.channels == groups:
            # Depthwise: whole groups go (the analysis coupled each group's input and outputs).
            per_group = so.channels // groups
            new_groups = _whole_groups(out_keep, per_group, node)
            w = w.index_select(0, out_keep)
        else:
            w, bias, new_groups = self._even_groups(node, sx, so, bias)
        bias = None if bias is None else bias.index_select(0, out_keep)
        self._rebuilt(node, {"weight": w, "bias": bias}, groups=new_groups)

    def _even_groups(self, node: Node, sx: Space, so: Space, bias):
        """A grouped conv whose kept groups all keep the same number of inputs and outputs (the decision saw
        to it): each output row keeps its own group's kept inputs; removed inputs fold into its bias."""
        w = node.params["weight"]
        groups = node.attrs["groups"]
        ipg, opg = sx.channels // groups, so.channels // groups
        in_mask = torch.zeros(sx.channels, dtype=torch.bool)
        in_mask[self.kept(sx)] = True
        out_keep = self.kept(so)
        group_of_out = out_keep // opg
        kept_groups = torch.unique(group_of_out)
        in_mask = in_mask.reshape(groups, ipg)
        per_group = in_mask[kept_groups].sum(1)
        outs = torch.bincount(group_of_out, minlength=groups)[kept_groups]
        if len(set(per_group.tolist())) != 1 or len(set(outs.tolist())) != 1:
            raise AssertionError(f"{node.name}: its groups would shrink unevenly")  # the decision forbids it
        local = torch.stack([in_mask[g].nonzero().flatten() for g in kept_groups.tolist()])  # (kept groups, ins)
        rows = torch.searchsorted(kept_groups, group_of_out)  # each kept output's row of `local`
        gone = ~in_mask  # (groups, ipg): removed inputs, whose constants fold into their group's outputs
        c = torch.nan_to_num(self.cg.constants(sx).reshape(groups, ipg), nan=0.0)
        taps = f64(w.detach()).flatten(2).sum(-1)  # (O, ipg)
        contrib = (taps * torch.where(gone, c, torch.zeros(())).repeat_interleave(opg, 0)).sum(1)
        if bool(contrib[out_keep].ne(0).any()):
            self.folded += int((gone & c.ne(0))[kept_groups].sum())
            base = torch.zeros(so.channels, dtype=torch.float64) if bias is None else f64(bias)
            bias = cast_like(base + contrib, w if bias is None else bias)
        w_kept = w.index_select(0, out_keep)
        index = local[rows].reshape(len(out_keep), -1, *([1] * (w.dim() - 2))).expand(-1, -1, *w.shape[2:])
        return torch.gather(w_kept, 1, index).clone(), bias, len(kept_groups)

    def _conv_transpose(self, node: Node) -> None:
        spaces = self._shrunk_spaces(node)
        if spaces is None:
            return
        sx, so = spaces
        w, bias = node.params["weight"], node.params.get("bias")
        groups = node.attrs["groups"]
        out_keep = self.kept(so)
        w = w.index_select(0, self.kept(sx))  # removed inputs carried 0: nothing to fold
        if groups == 1:
            w = w.index_select(1, out_keep)
            new_groups = 1
        else:
            new_groups = _whole_groups(out_keep, w.shape[1], node)
        bias = None if bias is None else bias.index_select(0, out_keep)
        self._rebuilt(node, {"weight": w, "bias": bias}, groups=new_groups)

    def _linear(self, node: Node) -> None:
        sx, so = self.cg.space(node.inputs[0]), self.cg.space(node.output)
        if not (self.shrunk(sx) or self.shrunk(so)):
            return
        w, bias = node.params["weight"], node.params.get("bias")
        bias = self._folded_bias(node, sx, bias)
        if sx is not None:
            cols = (self.kept(sx).unsqueeze(1) * sx.mult + torch.arange(sx.mult)).flatten()
            w = w.index_select(1, cols)
        if so is not None:
            w = w.index_select(0, self.kept(so))
            bias = None if bias is None else bias.index_select(0, self.kept(so))
        self._rebuilt(node, {"weight": w, "bias": bias})

    def _folded_bias(self, node: Node, sx: Space | None, bias: torch.Tensor | None) -> torch.Tensor | None:
        """The bias after folding the constants of removed input channels (unchanged if they were all 0)."""
        if not self.shrunk(sx):
            return bias
        keep = torch.ones(sx.channels, dtype=torch.bool)
        keep[self.kept(sx)] = False
        gone = keep.nonzero().flatten()
        c = self.cg.constants(sx)[gone]
        w = node.params["weight"].detach()
        if not bool(c.ne(0).any()) and all_finite(w):
            return bias  # zeros times finite weights fold nothing: decided without the float64 sums
        out = w.shape[0]
        w = w.reshape(out, sx.channels, -1)  # linear: the `mult` columns of each channel; conv: its taps
        delta = (f64(w.index_select(1, gone)).sum(-1) * c).sum(1)  # float64 on the removed columns only
        if not bool(delta.ne(0).any()):
            return bias
        self.folded += int(c.ne(0).sum())
        base = torch.zeros(out, dtype=torch.float64) if bias is None else f64(bias)
        return cast_like(base + delta, node.params["weight"] if bias is None else bias)

    # -- per-channel state and channel-count attributes ----------------------------------------
    def _batch_norm(self, node: Node) -> None:
        so = self.cg.space(node.output)
        if not self.shrunk(so):
            return
        keep = self.kept(so)
        self._rebuilt(node, {k: (None if t is None else t.index_select(0, keep)) for k, t in node.params.items()})

    def _split(self, node: Node) -> None:
        spaces = [self.cg.space(v) for v in node.outputs]
        if not any(self.shrunk(sp) for sp in spaces):
            return
        sizes = tuple(len(self.kept(sp)) for sp in spaces)
        self._rebuilt(node, node.params, sizes=sizes)

    def _slice(self, node: Node) -> None:
        sx = self.cg.space(node.inputs[0])
        if sx is None or channel_dim(node.attrs["dim"], sx.value) != 1 or not self.shrunk(sx):
            return  # a slice of another axis keeps its bounds
        kept = self.kept(sx)  # the kept channels of [start, end) are contiguous in the smaller input
        start, end = (int((kept < node.attrs[k]).sum()) for k in ("start", "end"))
        self._rebuilt(node, node.params, start=start, end=end)

    def _index_select(self, node: Node) -> None:
        sx, so = self.cg.space(node.inputs[0]), self.cg.space(node.output)
        if so is None or sx is None or not (self.shrunk(sx) or self.shrunk(so)):
            return
        index = node.params["index"]
        picked = index.reshape(-1).long().cpu()[self.kept(so)]
        new_index = torch.searchsorted(self.kept(sx), picked).to(index.device, index.dtype)
        self._rebuilt(node, {"index": new_index})

    def _flatten(self, node: Node) -> None:
        if self.shrunk(self.cg.space(node.inputs[0])):
            self._rebuilt(node, node.params)  # a view(N, 512 * 7 * 7) would hard-code the old count

    def _slice_channel_constants(self) -> None:
        """Per-channel constant operands of add / mul lose the removed channels (in a new constant node)."""
        for node, index, axis in self.cg.channel_constants:
            so = self.cg.space(node.output)
            if not self.shrunk(so):
                continue
            old = node.inputs[index].producer
            value = old.params["value"].index_select(axis, self.kept(so))
            const = Node("constant", f"{old.name}_kept", params={"value": value})
            const.scope = old.scope
            self.graph.append(const)
            const.output.shape, const.output.dtype = tuple(value.shape), value.dtype
            node.set_input(index, const.output)
            if node not in self.changed:
                self.changed.append(node)


def _whole_groups(out_keep: torch.Tensor, per_group: int, node: Node) -> int:
    groups = out_keep // per_group
    kept_groups = torch.unique(groups)
    if len(out_keep) != len(kept_groups) * per_group:
        raise AssertionError(f"{node.name}: a group lost only some of its channels")  # the coupling forbids it
    return len(kept_groups)
