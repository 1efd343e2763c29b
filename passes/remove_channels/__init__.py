"""remove_channels: physically remove channels that are provably dead, keeping outputs equal.

A channel is dead when every layer that reads it sees a constant that can be folded exactly into
that layer's bias (a BN with gamma 0 outputs beta; a zero filter outputs its bias; after a ReLU a
non-positive constant is 0). Removal is propagated through the channel dependency groups of
rewrite.analysis.channels: a residual add loses a channel only if it is dead in every operand,
concat / split map offsets, a grouped conv loses whole groups, flatten -> linear loses the columns
of a channel. At least one channel of every tensor is kept.

options:
    threshold: explicitly lossy. First zero every BN gamma with |gamma| <= threshold, then remove.
               The report says so and how far the outputs moved on the example inputs.
"""
from __future__ import annotations

from collections import Counter, defaultdict

import networkx as nx
import torch

from rewrite.analysis.channels import ChannelGraph, channel_graph
from rewrite.ir import Graph
from rewrite.errors import PassError
from rewrite.pass_manager import Pass, PassResult, Refused, Rewritten, register_pass
from rewrite.report import reason_template

from .channels_surgery import Surgery

RULE = "remove_channels"


class Decision:
    """Which channels go, which dead channels stay, and why."""

    def __init__(self, cg: ChannelGraph):
        self.cg = cg
        self.labels = labels = cg.labels()
        n = cg.size
        const = torch.cat([cg.const[id(sp)] for sp in cg.order]) if cg.order else torch.zeros(0)
        self.varying = torch.isnan(const)
        blocked = torch.zeros(n, dtype=torch.bool)
        seen_varying = torch.zeros(n, dtype=torch.bool)
        self.block_index = []
        for b in cg.blocks:
            idx = b.space.offset + b.mask.nonzero().flatten()
            self.block_index.append(idx)
            blocked[idx] = True
            seen_varying[idx[self.varying[idx]]] = True
        self.class_blocked = torch.zeros(n, dtype=torch.bool)
        self.class_blocked[labels[blocked]] = True
        # A class whose every reader sees a constant is dead; blocked anyway, it is reported.
        self.class_alive = torch.zeros(n, dtype=torch.bool)
        self.class_alive[labels[seen_varying]] = True
        self.removable = ~self.class_blocked.index_select(0, labels)  # index_select: ~30x cheaper than [labels]
        self.kept_one: list[tuple[str, str]] = []
        self.uneven: Counter = Counter()  # (conv, tensor, reason) -> dead channels kept to keep groups even
        while True:  # keeping one channel or evening out groups can keep more: repeat until stable
            changed = self._keep_one_each()
            changed = self._even_groups() or changed
            if not changed:
                break

    def _block(self, channels: torch.Tensor) -> None:
        """Keep the classes of these channels (global indices)."""
        self.class_blocked[self.labels[channels]] = True
        self.removable &= ~self.class_blocked.index_select(0, self.labels)

    def _keep_one_each(self) -> bool:
        """Never empty a tensor: keep the class of its first channel."""
        changed = False
        for sp in self.cg.order:
            if sp.channels and bool(self.removable[sp.offset:sp.offset + sp.channels].all()):
                self._block(torch.tensor([sp.offset]))
                producer = sp.value.producer
                self.kept_one.append((producer.label if producer is not None else "<input>", tensor_name(sp.value)))
                changed = True
        return changed

    def _even_groups(self) -> bool:
        """A grouped conv keeps equal groups: whole groups may go, the others all lose the same number of
        inputs and of outputs; a group's surplus dead channels stay, with the reason."""
        changed = False
        for node, sx, so, groups in self.cg.grouped:
            ipg, opg = sx.channels // groups, so.channels // groups
            rin = self.removable[sx.offset:sx.offset + sx.channels].reshape(groups, ipg)
            rout = self.removable[so.offset:so.offset + so.channels].reshape(groups, opg)
            whole = rin.all(1) & rout.all(1)
            if bool(whole.all()):
                whole[0] = False
            kept = ~whole
            k_in = min(int(rin.sum(1)[kept].min()), ipg - 1)
            k_out = min(int(rout.sum(1)[kept].min()), opg - 1)
            for sp, r, k, side in ((sx, rin, k_in, "inputs"), (so, rout, k_out, "outputs")):
                surplus = r & (r.cumsum(1) > k) & kept.unsqueeze(1)
                n = int(surplus.sum())
                if not n:
                    continue
                self._block(sp.offset + surplus.flatten().nonzero().flatten())
                reason = (f"grouped conv {node.label} keeps its {groups} groups equal: every kept group can lose "
                          f"only {k} of its {r.shape[1]} {side} (the fewest dead in any group)")
                self.uneven[(node.label, tensor_name(sp.value), reason)] += n
                changed = True
        return changed

    def refusals(self) -> list[Refused]:
        dead_kept = (self.class_blocked & ~self.class_alive).index_select(0, self.labels)
        counts: Counter = Counter()
        for b, idx in zip(self.cg.blocks, self.block_index):
            if b.reason:
                n = int(dead_kept[idx].sum())
                if n:
                    counts[(b.node, tensor_name(b.space.value), b.reason)] += n
        for b in self.cg.breaks:
            idx = b.space.offset + b.mask.nonzero().flatten()
            n = int((~self.removable[idx]).sum())
            if n:
                counts[(b.node, tensor_name(b.space.value), b.reason)] += n
        counts.update(self.uneven)
        counts.update(self._met_live(dead_kept, counts))
        out = [Refused(RULE, node, f"{n} dead channel(s) of {value} kept: {reason}")
               for (node, value, reason), n in counts.items()]
        out += [Refused(RULE, node, f"1 dead channel of {value} kept so that it keeps at least one channel")
                for node, value in self.kept_one]
        self.kept_per_reason = Counter()  # the report's tally: like reasons (site names taken out) summed
        for (node, value, reason), n in counts.items():
            self.kept_per_reason[reason_template(Refused(RULE, node, reason))] += n
        if self.kept_one:
            self.kept_per_reason["kept so that the tensor keeps at least one channel"] += len(self.kept_one)
        return out

    def _met_live(self, dead_kept: torch.Tensor, explained: Counter) -> Counter:
        """Constant channels kept because their class also holds a channel that varies: named by the node
        whose input channel is constant and whose output channel varies (a residual add, a gate, ...).
        Couplings run from a node's input to its output, so only that direction is a meeting."""
        constant_kept = ~self.varying & ~self.removable & ~dead_kept
        out: Counter = Counter()
        if not bool(constant_kept.any()):
            return out
        by_offset = sorted(self.cg.order, key=lambda sp: sp.offset)
        starts = torch.tensor([sp.offset for sp in by_offset])
        noted = torch.zeros_like(constant_kept)
        nodes = {n.label: n for n in self.cg.graph.nodes}
        # the couplings of values flowing from a node's input channel to its output channel (a grouped
        # conv's tie channels of a group instead: see below)
        carried = [(a, b, label) for (a, b), label, carries in zip(self.cg.pairs, self.cg.pair_nodes,
                                                                   self.cg.pair_carries) if carries]
        for a, b, label in carried:
            meet = constant_kept[a] & self.varying[b] & ~noted[a]
            if not bool(meet.any()):
                continue
            idx = a[meet]
            noted[idx] = True
            sp = by_offset[int(torch.searchsorted(starts, idx[0], right=True)) - 1]
            node = nodes.get(label)
            kind = node.kind if node is not None else "op"
            where = label if label.startswith(kind) else f"{kind} {label}"
            reason = (f"it meets a channel that varies at {where}, so it is not dead there"
                      + (" (a residual add keeps a channel unless it is dead in every operand)"
                         if kind == "add" else ""))
            out[(label, tensor_name(sp.value), reason)] += len(idx)
        # The rest: one count per channel where it becomes constant, not again for each tensor it is carried
        # on to (through a ReLU, ...), nor for a class already counted at a meeting.
        left = constant_kept & ~torch.isin(self.labels, torch.unique(self.labels[noted]))
        for a, b, _ in carried:
            left[b[~self.varying[a]]] = False
        if not bool(left.any()):
            return out
        # It met the varying channel away from any node's input-to-output edge: through the groups of a
        # grouped conv (a depthwise conv's outputs go with the input of their group), say...
        classes = torch.unique(self.labels[left])
        for (a, _), label, carries in zip(self.cg.pairs, self.cg.pair_nodes, self.cg.pair_carries):
            node = nodes.get(label)
            groups = node.attrs.get("groups", 1) if node is not None else 1
            if carries or groups <= 1 or not bool(torch.isin(self.labels[a], classes).any()):
                continue
            here = (left & torch.isin(self.labels, torch.unique(self.labels[a]))).nonzero().flatten()
            left[here] = False
            self._name_by_tensor(out, by_offset, starts, here, label,
                                 f"it shares a group of {node.kind} {label} ({groups} groups) with a channel that "
                                 "varies, and a grouped conv loses whole groups only")
        # ... or a node made it constant from an input channel that varies and stays (a BN with gamma 0
        # reading a channel of a concat that other layers read where it lives).
        for a, b, label in carried:
            born = left[b] & self.varying[a]
            if not bool(born.any()):
                continue
            idx = b[born]
            left[idx] = False
            node = nodes.get(label)
            kind = node.kind if node is not None else "op"
            source = by_offset[int(torch.searchsorted(starts, a[born][0], right=True)) - 1].value
            out[(label, tensor_name(by_offset[int(torch.searchsorted(starts, idx[0], right=True)) - 1].value),
                 f"it is constant only after {kind} {label}, whose input channel{_read_elsewhere(source)} varies "
                 "and is coupled to channels that stay (a channel leaves every tensor it is coupled to, or none)"
                 )] += len(idx)
        self._name_by_tensor(out, by_offset, starts, left.nonzero().flatten(), "",
                             "it is coupled to a channel that varies")
        return out

    @staticmethod
    def _name_by_tensor(out: Counter, by_offset, starts, idx: torch.Tensor, label: str, reason: str) -> None:
        """Count the channels `idx` under `reason`, by the tensor each is in."""
        if not len(idx):
            return
        owners, counts = torch.unique(torch.searchsorted(starts, idx, right=True) - 1, return_counts=True)
        for owner, n in zip(owners.tolist(), counts.tolist()):
            name = tensor_name(by_offset[owner].value)
            out[(label or name, name, reason)] += n

    def groups(self) -> list[dict]:
        """The dependency groups (networkx components of coupled tensors) that lost channels."""
        by_name = {sp.value.name: sp for sp in self.cg.order}
        out = []
        for component in nx.connected_components(self.cg.deps):
            members = sorted((by_name[v] for v in component), key=lambda sp: sp.offset)
            gone = {tensor_name(sp.value): n for sp in members
                    if (n := int(self.removable[sp.offset:sp.offset + sp.channels].sum()))}
            if gone:
                out.append({"tensors": [tensor_name(sp.value) for sp in members], "removed": gone})
        return out


def tensor_name(value) -> str:
    """How the report names a tensor: by the module (or node) that produces it."""
    producer = value.producer
    if producer is None:
        return value.name
    return producer.label if len(producer.outputs) == 1 else f"{producer.label}[{value.index}]"


def zero_small_gammas(graph: Graph, threshold: float) -> int:
    """The lossy step: BN gammas with 0 < |gamma| <= threshold become 0 (fresh tensors). Returns how many."""
    count = 0
    for node in graph.nodes:
        gamma = node.params.get("weight") if node.kind == "batch_norm" else None
        if gamma is None:
            continue
        small = (gamma.detach().abs() <= threshold) & (gamma.detach() != 0)
        n = int(small.sum())
        if n:
            node.params = dict(node.params, weight=torch.where(small, torch.zeros_like(gamma), gamma.detach()))
            node.origin = None
            count += n
    return count


class RemoveChannels(Pass):
    name = RULE
    description = "physically remove provably dead channels (BN gamma 0, zero filters) across the whole graph"
    options = {"threshold": "lossy: first zero every BN gamma with abs <= threshold (the report says how far "
                            "the outputs moved)"}

    def run(self, graph: Graph, options: dict | None = None) -> PassResult:
        options = dict(options or {})
        result = PassResult(self.name)
        missing = [v.name for v in graph.inputs if v.shape is None]
        if missing:
            result.refused.append(Refused(RULE, "<graph>", "remove_channels needs example_inputs: tensor ranks and "
                                                           f"channel counts are unknown (inputs {missing})"))
            return result
        threshold = _threshold(options.get("threshold"))
        probe = _OutputProbe(graph, options.get("example_inputs")) if threshold is not None else None
        if threshold is not None:
            result.counts["zeroed_gammas"] += zero_small_gammas(graph, threshold)
        graph.topological_sort()
        cg = channel_graph(graph)
        decision = Decision(cg)
        surgery = Surgery(graph, cg, decision.removable)
        changed = surgery.run()
        graph.eliminate_dead_code()
        graph.topological_sort()
        removed = int(decision.removable.sum())
        by_layer = defaultdict(int)
        for sp in cg.order:
            n = int(decision.removable[sp.offset:sp.offset + sp.channels].sum())
            producer = sp.value.producer
            if n and producer is not None and producer.kind in ("conv", "conv_transpose", "linear"):
                by_layer[producer.label] += n
        if by_layer:
            result.counts["channels_removed"] += sum(by_layer.values())
        if surgery.folded:
            result.counts["constants_folded"] += surgery.folded
        # One `rewritten` entry per rebuilt node; the counts say what happened to channels.
        result.rewritten += [Rewritten(RULE, (node.label,)) for node in changed]
        result.refused = decision.refusals()
        groups = decision.groups()
        result.notes["kept_per_reason"] = dict(decision.kept_per_reason.most_common())
        result.notes.update(groups=groups, removed_per_layer=dict(by_layer),
                            dependency_groups=nx.number_connected_components(cg.deps), channel_elements_removed=removed)
        summary = [f"removed {sum(by_layer.values())} channels from {len(by_layer)} layers in {len(groups)} "
                   f"dependency groups; rebuilt {len(changed)} nodes; folded {surgery.folded} constants into biases"]
        for reason, n in list(decision.kept_per_reason.most_common())[:3]:
            summary.append(f"kept {n} dead channel(s): {reason}")
        if threshold is not None:
            summary.append(f"LOSSY: zeroed {result.counts['zeroed_gammas']} BN gammas with |gamma| <= {threshold:g}")
            result.notes["lossy"] = True
            if probe is not None:
                moved = probe.compare(graph)
                if moved is not None:
                    result.notes["output_max_abs"], result.notes["output_max_rel"] = moved
                    summary.append(f"LOSSY: outputs moved by max abs {moved[0]:.3e}, max rel {moved[1]:.3e} "
                                   "on the example inputs")
        result.notes["summary"] = summary
        return result


class _OutputProbe:
    """Outputs of the graph before a lossy change, to say how far the change moved them (torch graphs only)."""

    def __init__(self, graph: Graph, example_inputs):
        self.inputs = example_inputs
        self.before = None
        if graph.meta.get("frontend") == "fx" and example_inputs is not None:
            self.before = self._run(graph)

    def _run(self, graph: Graph):
        from rewrite.frontends.fx import as_tuple, preserved_buffers
        from rewrite.frontends.fx_emit import emit_graph_module

        module = emit_graph_module(graph, copy_originals=False)
        with torch.no_grad(), preserved_buffers(module):
            return module(*as_tuple(self.inputs))

    def compare(self, graph: Graph) -> tuple[float, float] | None:
        if self.before is None:
            return None
        from rewrite.verify import compare_outputs

        moved = compare_outputs(self.before, self._run(graph), tolerance=0.0, dtype="")
        return moved.max_abs, moved.max_rel


remove_channels = register_pass(RemoveChannels())


def _threshold(value) -> float | None:
    """The lossy mode's threshold, checked: a non-negative number, or None for the exact mode."""
    if value is None:
        return None
    try:
        threshold = float(value)
    except (TypeError, ValueError):
        threshold = float("nan")
    if not threshold >= 0:
        raise PassError(f"threshold must be a non-negative number, not {value!r}", where="pass remove_channels")
    return threshold


def _read_elsewhere(value) -> str:
    """Where a varying channel comes from and who else reads it, said for a report."""
    producer = value.producer
    made = f" (of {producer.kind} {producer.label}" if producer is not None and producer.kind == "concat" \
        else f" (of {tensor_name(value)}"
    readers = len(value.users)
    return f"{made}, which {readers} ops read)" if readers > 1 else f"{made})"
