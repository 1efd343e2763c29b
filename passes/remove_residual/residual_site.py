"""Recognize a residual site: add(S(x), F(x)) with S a linear 1x1 shortcut and F a conv chain.

The block input x is the nearest common ancestor of the add's two operands. Each operand must
reach x through a simple chain (single-input ops whose intermediate values nobody else reads).
The shortcut chain may hold only identities, eval dropouts, batch_norms and unpadded 1x1 convs;
it is collapsed into one float64 affine map per pixel. The main chain may hold convs (each with
the batch_norms right after it folded in), ReLU-family activations, identities and eval dropouts.
Anything else is a refusal whose reason names the node that stopped us.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from rewrite.ir import Graph, Node, Value
from rewrite.numerics.kernels import regroup
from rewrite.params import bn_affine, bn_refusal, channel_values, has_padding, weight_bias

SKIPPED = ("identity", "dropout")  # the identity in inference mode
ACTIVATIONS = ("relu", "clamp")
ANCESTOR_SEARCH_LIMIT = 64  # values visited backwards from each operand when looking for x


class SiteRefusal(Exception):
    """The add is a residual site, but it cannot be converted exactly; the message says why.

    `depth` says how far the recognition got (0: shortcut, 1: main path, 2: both recognized), so
    of the two operand orders the more informative reason is reported.
    """

    def __init__(self, reason: str, depth: int = 0):
        super().__init__(reason)
        self.reason = reason
        self.depth = depth
        self.shortcut_length = 0


@dataclass
class Stage:
    """A conv of the main path with the batch_norms that directly follow it, folded (float64)."""

    conv: Node
    bns: list[Node]
    weight: torch.Tensor
    bias: torch.Tensor
    virtual: bool = False  # a 1x1 reserve conv made for a pre-activation block (not in the graph before)

    @property
    def output(self) -> Value:
        return (self.bns[-1] if self.bns else self.conv).output

    @property
    def groups(self) -> int:
        return self.conv.attrs["groups"]


@dataclass
class Activation:
    node: Node


@dataclass
class Shortcut:
    """S(x)[i] = matrix @ x[stride * i] + bias, per pixel, in float64."""

    nodes: list[Node]
    matrix: torch.Tensor  # (out_channels, in_channels)
    bias: torch.Tensor
    stride: tuple[int, ...]


@dataclass
class ResidualSite:
    add: Node
    x: Value
    main: list[Stage | Activation]
    shortcut: Shortcut
    main_nodes: list[Node] = field(default_factory=list)

    @property
    def stages(self) -> list[Stage]:
        return [item for item in self.main if isinstance(item, Stage)]

    @property
    def activations(self) -> list[Node]:
        return [item.node for item in self.main if isinstance(item, Activation)]


def _describe(node: Node) -> str:
    if node.kind == "opaque":
        return f"{node.label} ({node.attrs.get('call', '?')})"
    return f"{node.label} ({node.kind})"


# -- finding x ---------------------------------------------------------------------------------
def _ancestor_distances(value: Value) -> dict[int, tuple[int, Value]]:
    """Values reachable backwards from `value` (itself included), with their hop counts."""
    seen = {id(value): (0, value)}
    queue = deque([value])
    while queue and len(seen) < ANCESTOR_SEARCH_LIMIT:
        v = queue.popleft()
        if v.producer is None:
            continue
        for parent in v.producer.inputs:
            if id(parent) not in seen and not (parent.producer is not None and parent.producer.kind == "constant"):
                seen[id(parent)] = (seen[id(v)][0] + 1, parent)
                queue.append(parent)
    return seen


def block_input(add: Node) -> Value | None:
    """The nearest common ancestor of the add's two operands, or None when they share none nearby."""
    a, b = add.inputs
    da, db = _ancestor_distances(a), _ancestor_distances(b)
    common = [(da[k][0] + db[k][0], da[k][1]) for k in da.keys() & db.keys()]
    if not common:
        return None
    return min(common, key=lambda item: item[0])[1]


def chain_to(graph: Graph, operand: Value, x: Value) -> tuple[list[Node], str | None]:
    """The ops from x to `operand` in order, or what stops them from being a simple chain."""
    nodes: list[Node] = []
    v = operand
    while v is not x:
        producer = v.producer
        if producer is None:
            return nodes[::-1], f"{v.name} is a graph input, not computed from {x.name}"
        data = _data_inputs(producer)
        if len(data) != 1:
            return nodes[::-1], (f"{_describe(producer)} has {len(data)} inputs: the path has a branch "
                                 "of its own (a gate or a nested block)")
        if v is not operand and graph.external_uses(v) != 1:
            readers = [n.name for n in v.users if n is not nodes[-1]] or ["<graph output>"]
            return nodes[::-1], f"{v.name} is also read by {', '.join(readers[:3])}: the path has a branch of its own"
        nodes.append(producer)
        v = data[0]
    return nodes[::-1], None


def _data_inputs(node: Node) -> list[Value]:
    """The inputs of `node` that are not constants (a mul / add by a constant is a one-input op here)."""
    if node.kind not in ("mul", "add"):
        return list(node.inputs)
    return [v for v in node.inputs if v.producer is None or v.producer.kind != "constant"]


def constant_operand(node: Node, channels: int, spatial_dims: int) -> torch.Tensor | None:
    """The constant of a mul / add by a scalar or per-channel constant, as float64 per channel; else None."""
    consts = [v.producer.params["value"] for v in node.inputs if v.producer is not None and v.producer.kind == "constant"]
    if node.kind not in ("mul", "add") or len(consts) != 1 or len(node.inputs) != 2:
        return None
    found = channel_values(consts[0], spatial_dims + 1, spatial_dims + 2)
    if found is None or (found[1] is not None and found[0].numel() != channels):
        return None
    return found[0].expand(channels) if found[1] is None else found[0]


def _skipped(node: Node, where: str = "") -> bool:
    """Identity and inference dropout carry their input unchanged; a training dropout refuses the site."""
    if node.kind not in SKIPPED:
        return False
    if node.attrs.get("training"):
        raise SiteRefusal(f"{where}{node.label} is a dropout in training mode; it is random, not linear")
    return True


# -- the shortcut -----------------------------------------------------------------------------
def collapse_shortcut(nodes: list[Node], channels: int, spatial_dims: int,
                      x_nonnegative: Callable[[], bool] = lambda: False) -> Shortcut:
    """The shortcut chain as one affine map per pixel; raises SiteRefusal if it is not one.

    A ReLU on the shortcut is linear when what it reads is a per-channel scale d * x of an x proved
    >= 0: relu(d * x) = max(d, 0) * x (RMNet's pruning blocks, relu(depthwise 1x1(x)))."""
    matrix = torch.eye(channels, dtype=torch.float64)
    bias = torch.zeros(channels, dtype=torch.float64)
    stride = [1] * spatial_dims
    for node in nodes:
        if _skipped(node, "the shortcut's "):
            continue
        if node.kind in ("mul", "add"):  # by a per-channel constant (BN folded by fuse_branches)
            vector = constant_operand(node, matrix.shape[0], spatial_dims)
            if vector is None:
                raise SiteRefusal(f"the shortcut's {node.label} ({node.kind}) is not by a per-channel constant")
            if node.kind == "mul":
                matrix, bias = vector[:, None] * matrix, vector * bias
            else:
                bias = bias + vector
            continue
        if node.kind == "slice":  # x[:, start:end]: a selection of rows (checked by _is_shortcut_op)
            matrix, bias = matrix[node.attrs["start"]:node.attrs["end"]], bias[node.attrs["start"]:node.attrs["end"]]
            continue
        if node.kind == "relu":
            diagonal = torch.equal(matrix, torch.diag(torch.diagonal(matrix)))
            if not diagonal or bool(bias.ne(0).any()):
                raise SiteRefusal(f"the shortcut's relu {node.label} reads a shortcut that mixes channels or adds a "
                                  "shift, so it is not linear in x")
            if not x_nonnegative():
                raise SiteRefusal(f"the shortcut's relu {node.label} is linear only for a block input proved >= 0 "
                                  "(relu(d * x) = max(d, 0) * x), and this one is not proved >= 0")
            matrix = matrix.clamp_min(0)
            continue
        if node.kind == "batch_norm":
            why = bn_refusal(node)
            if why:
                raise SiteRefusal(why)
            scale, shift = bn_affine(node)
            if scale.numel() != matrix.shape[0]:
                raise SiteRefusal(f"the shortcut's {node.label} has {scale.numel()} channels, its input {matrix.shape[0]}")
            matrix, bias = scale[:, None] * matrix, scale * bias + shift
            continue
        if node.kind == "conv":
            weight, conv_bias = weight_bias(node)
            if any(k != 1 for k in weight.shape[2:]) or has_padding(node):
                raise SiteRefusal(f"the shortcut conv {node.label} is not an unpadded 1x1 conv; only those merge "
                                  "into the main path's last conv")
            if weight.dim() - 2 != spatial_dims:
                raise SiteRefusal(f"the shortcut conv {node.label} has {weight.dim() - 2} spatial dims, the main path "
                                  f"{spatial_dims}")
            dense = _dense_1x1(weight, node.attrs["groups"])
            if dense.shape[1] != matrix.shape[0]:
                raise SiteRefusal(f"the shortcut conv {node.label} reads {dense.shape[1]} channels, "
                                  f"its input has {matrix.shape[0]}")
            matrix, bias = dense @ matrix, dense @ bias + conv_bias
            stride = [s * t for s, t in zip(stride, node.attrs["stride"])]
            continue
        raise SiteRefusal(f"the shortcut passes through {_describe(node)}, which is not linear "
                          "(only identities, batch_norms and 1x1 convs are merged)")
    return Shortcut(nodes, matrix, bias, tuple(stride))


def _dense_1x1(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """A grouped 1x1 conv weight as one block-diagonal (out, in) matrix."""
    return regroup(weight, groups, 1).reshape(weight.shape[0], -1)


# -- the main path ----------------------------------------------------------------------------
def _pre_activation_stage(lead: list[Node], bns: list[Node], first_conv: Node | None) -> Stage:
    """The reserve conv of a pre-activation block (BN / activation before the first conv).

    RMNet's own deploy() starts such a block with a 1x1 Dirac conv copying x into reserved channels,
    which pass the leading BN as an identity and the ReLUs as slope-1 PReLUs. Here that 1x1 conv is
    made up front and holds the leading BNs (per-channel affine maps), so the BN vanishes into it and
    the reserved channels never see it; the ReLUs then treat reserved channels as usual.
    """
    if first_conv is None:
        raise SiteRefusal("the main path has no conv after its pre-activation BN / activation, so nothing "
                          "can carry or merge the reserved channels")
    x = lead[0].inputs[0]
    channels = first_conv.params["weight"].shape[1] * first_conv.attrs["groups"]
    dims = first_conv.params["weight"].dim() - 2
    scale = torch.ones(channels, dtype=torch.float64)
    shift = torch.zeros(channels, dtype=torch.float64)
    for bn in bns:
        why = bn_refusal(bn)
        if why:
            raise SiteRefusal(why)
        s, t = bn_affine(bn)
        if s.numel() != channels:
            raise SiteRefusal(f"{bn.label} has {s.numel()} channels, the block input {channels}")
        scale, shift = s * scale, s * shift + t
    ref = first_conv.params["weight"]
    conv = Node("conv", f"{lead[0].name}_reserve", attrs={"stride": (1,) * dims, "padding": ((0, 0),) * dims,
                                                          "dilation": (1,) * dims, "groups": 1},
                params={"weight": torch.zeros((channels, channels) + (1,) * dims, dtype=ref.dtype, device=ref.device)})
    conv.scope = f"{lead[0].scope}_reserve" if lead[0].scope else None  # a new module beside the BN it holds
    conv.output.shape, conv.output.dtype = x.shape, x.dtype
    weight = torch.diag(scale).reshape((channels, channels) + (1,) * dims)
    return Stage(conv, bns, weight, shift, virtual=True)


def parse_main_path(nodes: list[Node]) -> list[Stage | Activation]:
    """Group the main chain into conv stages and activations; raises SiteRefusal otherwise.

    BNs and activations before the first conv (a pre-activation block) get a 1x1 reserve conv of
    their own (see _pre_activation_stage)."""
    items: list[Stage | Activation] = []
    lead: list[Node] = []  # pre-activation nodes before the first conv
    lead_bns: list[Node] = []
    nodes = [node for node in nodes if not _skipped(node)]
    for node in nodes:
        if node.kind == "conv":
            break
        if node.kind == "batch_norm" and any(n.kind != "batch_norm" for n in lead):
            raise SiteRefusal(f"batch_norm {node.label} follows the activation {lead[-1].label} before any conv: "
                              "neither a conv before it nor the block's reserve conv can absorb it")
        if node.kind not in ("batch_norm",) + ACTIVATIONS:
            break
        lead.append(node)
        if node.kind == "batch_norm":
            lead_bns.append(node)
    if lead:
        first_conv = next((n for n in nodes if n.kind == "conv"), None)
        items.append(_pre_activation_stage(lead, lead_bns, first_conv))
        items += [Activation(n) for n in lead if n.kind != "batch_norm"]
        nodes = nodes[len(lead):]
    for node in nodes:
        if node.kind == "conv":
            weight, bias = weight_bias(node)
            items.append(Stage(node, [], weight, bias))
        elif node.kind == "batch_norm":
            if not items or not isinstance(items[-1], Stage):
                where = "starts the main path" if not items else f"follows {items[-1].node.label}"
                raise SiteRefusal(f"batch_norm {node.label} {where}, not a conv, so it cannot be folded and its shift "
                                  "would reach the reserved channels (a pre-activation block)")
            why = bn_refusal(node)
            if why:
                raise SiteRefusal(why)
            stage = items[-1]
            scale, shift = bn_affine(node)
            if scale.numel() != stage.weight.shape[0]:
                raise SiteRefusal(f"{node.label} has {scale.numel()} channels, {stage.conv.label} outputs "
                                  f"{stage.weight.shape[0]}")
            stage.weight = stage.weight * scale.reshape(-1, *([1] * (stage.weight.dim() - 1)))
            stage.bias = stage.bias * scale + shift
            stage.bns.append(node)
        elif node.kind in ACTIVATIONS:
            items.append(Activation(node))
        elif node.kind == "avg_pool":
            raise SiteRefusal(f"{node.label} (avg_pool) on the main path would average the reserved channels")
        elif node.kind == "conv_transpose":
            raise SiteRefusal(f"{node.label} is a conv_transpose; reserved channels are carried only through convs")
        else:
            raise SiteRefusal(f"the main path has {_describe(node)}, which is neither linear nor a ReLU-family "
                              "activation (ReLU, ReLU6, Hardtanh, clamp)")
    if not items or not isinstance(items[0], Stage):
        first = "nothing" if not items else _describe(items[0].node)
        raise SiteRefusal(f"the main path starts with {first}, not a conv that can reserve channels for x "
                          "(a pre-activation block)")
    if not isinstance(items[-1], Stage):
        raise SiteRefusal(f"the main path ends with the activation {items[-1].node.label}; the shortcut can only be "
                          "merged into a conv")
    return items


def find_site(graph: Graph, add: Node, nonnegative: Callable[[Value], bool] | None = None) -> ResidualSite | None:
    """The residual site rooted at `add`, None if the add is no residual, SiteRefusal if it cannot convert.

    `nonnegative` proves values >= 0 (rewrite.analysis.ranges), for a ReLU on the shortcut."""
    if len(add.inputs) != 2 or add.inputs[0] is add.inputs[1]:
        return None
    x = block_input(add)
    if x is None or (x.producer is not None and x.producer.kind == "constant"):
        return None
    reasons: list[tuple[tuple[int, int], str]] = []
    for main, short in (add.inputs, add.inputs[::-1]):
        if main is x:
            continue
        try:
            return _site(graph, add, x, main, short, nonnegative)
        except SiteRefusal as why:
            # The order that got further is the one the user needs to hear about; on a tie, the one
            # whose shortcut is shorter is the likelier reading of the block.
            reasons.append(((why.depth, -why.shortcut_length), why.reason))
    if not reasons:
        return None
    raise SiteRefusal(max(reasons, key=lambda r: r[0])[1])


def channel_slice(node: Node) -> bool:
    """A contiguous slice of the channel axis (axis 1 of a batched tensor of known rank)."""
    x = node.inputs[0] if node.inputs else None
    if node.kind != "slice" or x is None or x.shape is None or len(x.shape) < 3:
        return False
    return node.attrs["dim"] % len(x.shape) == 1 and node.attrs["step"] == 1


def _shortcut_shape(x: Value, shortcut: Shortcut) -> tuple | None:
    """S(x)'s shape when a rule that built S left it unset: x's, with S's channels (stride 1 only)."""
    if x.shape is None or len(x.shape) < 3 or any(s != 1 for s in shortcut.stride):
        return None
    return (x.shape[0], shortcut.matrix.shape[0]) + tuple(x.shape[2:])


def _is_shortcut_op(node: Node) -> bool:
    if node.kind in SKIPPED or node.kind in ("batch_norm", "relu"):  # a relu: see collapse_shortcut
        return True
    if channel_slice(node) or (node.kind in ("mul", "add") and len(_data_inputs(node)) == 1):
        return True
    return node.kind == "conv" and all(k == 1 for k in node.params["weight"].shape[2:]) and not has_padding(node)


def _site(graph: Graph, add: Node, x: Value, main: Value, short: Value,
          nonnegative: Callable[[Value], bool] | None) -> ResidualSite:
    def refuse(reason: str, depth: int, length: int = 0) -> SiteRefusal:
        refusal = SiteRefusal(reason, depth)
        refusal.shortcut_length = length
        return refusal

    short_nodes, why = chain_to(graph, short, x)
    if why:
        raise refuse(f"the shortcut is not a chain from {x.name}: {why}", 0, 1 << 30)
    n = len(short_nodes)
    main_nodes, why = chain_to(graph, main, x)
    if why:
        raise refuse(f"the main path from {x.name} is not a chain: {why}", 1, n)
    if graph.external_uses(main) != 1:
        raise refuse(f"{main.name}, the main path's result, is also read outside the block", 1, n)
    bad = [node for node in short_nodes if not _is_shortcut_op(node)]
    if bad:
        raise refuse(f"the shortcut passes through {_describe(bad[0])}; only a linear shortcut (identities, "
                     "batch_norms and unpadded 1x1 convs) can be merged", 1, n)
    try:
        items = parse_main_path(main_nodes)
        first = items[0].conv
        channels = first.params["weight"].shape[1] * first.attrs["groups"]
    except SiteRefusal as refusal:
        raise refuse(refusal.reason, 2, n) from None
    try:
        shortcut = collapse_shortcut(short_nodes, channels, first.params["weight"].dim() - 2,
                                     lambda: nonnegative is not None and nonnegative(x))
    except SiteRefusal as refusal:
        raise refuse(refusal.reason, 3, n) from None
    short_shape = short.shape if short.shape is not None else _shortcut_shape(x, shortcut)
    if x.shape is None or main.shape is None or short_shape is None:
        raise refuse("the shapes around the add are unknown; pass example_inputs", 3, n)
    if len(x.shape) != first.params["weight"].dim():
        # BatchNorm normalizes axis 1, the channel axis only of batched activations.
        raise refuse(f"the block input has rank {len(x.shape)}, not the batched rank {first.params['weight'].dim()} "
                     "of its convs (unbatched input)", 3, n)
    if tuple(main.shape) != tuple(short_shape):
        raise refuse(f"the add broadcasts ({tuple(main.shape)} + {tuple(short_shape)}); only equal shapes are merged",
                     3, n)
    if shortcut.matrix.shape[0] != items[-1].weight.shape[0]:
        raise refuse(f"the shortcut gives {shortcut.matrix.shape[0]} channels, the main path "
                     f"{items[-1].weight.shape[0]}", 3, n)
    return ResidualSite(add, x, items, shortcut, main_nodes)
