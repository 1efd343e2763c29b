"""A sum of branches read off the IR: leaf values, each times a per-channel factor, plus shifts.

`expand` walks down from a value through adds, batch_norms, multiplications by constants and
identities (each read only along the walk) and returns the terms of the linear expression they
form. `classify` says which input each leaf reads (a conv, linear or avg_pool branch reads its
input; anything else is the identity of itself), which is how branches of one input are grouped.
`obstacle` explains why a leaf that reaches a branch input cannot be merged with it.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from rewrite.ir import Graph, Node, Value
from rewrite.params import bn_affine, bn_refusal, channel_values

WEIGHTED = ("conv", "linear")
SUMS = ("add", "sub")  # a sub is a sum whose second operand has the sign -1
_MINUS_ONE = torch.tensor(-1.0, dtype=torch.float64)
BRANCH_KINDS = WEIGHTED + ("avg_pool",)


@dataclass(frozen=True)
class Layout:
    """Where channels are: axis 1 of a conv-like value with `spatial` dims, or the last axis (linear)."""

    family: str  # "conv" or "linear"
    spatial: int
    rank: int | None  # rank of the values involved, when shapes are known


@dataclass
class Term:
    leaf: Value
    scale: torch.Tensor | None  # float64 scalar or one value per channel; None is 1


@dataclass
class Expansion:
    terms: list[Term] = field(default_factory=list)
    shifts: list[torch.Tensor] = field(default_factory=list)  # float64 scalars or per-channel vectors
    loose: list[Value] = field(default_factory=list)  # constants that stay operands of the sum as they are


def layout_of(node: Node, rank: int | None) -> Layout:
    if node.kind == "linear":
        return Layout("linear", 0, rank)
    return Layout("conv", node.params["weight"].dim() - 2, rank)


def find_layout(value: Value, depth: int = 16) -> tuple[Layout, torch.dtype] | None:
    """Layout and weight dtype of the first conv / linear reached down through a sum's linear ops."""
    rank = None if value.shape is None else len(value.shape)
    stack = [(value, 0)]
    while stack:
        v, d = stack.pop()
        node = v.producer
        if node is None or d > depth:
            continue
        if node.kind in WEIGHTED:
            return layout_of(node, rank), node.params["weight"].dtype
        if node.kind in SUMS + ("mul", "batch_norm", "identity", "dropout"):
            stack.extend((i, d + 1) for i in node.inputs)
    return None


def is_constant(value: Value) -> bool:
    return value.producer is not None and value.producer.kind == "constant"


def channel_vector(tensor: torch.Tensor, layout: Layout, dtype: torch.dtype | None) -> torch.Tensor | None:
    """`tensor` as a float64 scalar or per-channel vector, or None when it broadcasts any other way."""
    max_dims = layout.rank if layout.rank is not None else layout.spatial + 1
    found = channel_values(tensor, layout.spatial + 1, max_dims, dtype)
    return None if found is None else found[0]


def times(a: torch.Tensor | None, b: torch.Tensor) -> torch.Tensor:
    return b if a is None else a * b


def unaliased(value: Value) -> Value:
    """The value behind identities and inference-mode dropouts."""
    while value.producer is not None and (value.producer.kind == "identity" or (
            value.producer.kind == "dropout" and not value.producer.attrs.get("training"))):
        value = value.producer.inputs[0]
    return value


def expand(graph: Graph, value: Value, layout: Layout, dtype: torch.dtype | None,
           through_adds: bool = True, top: bool = True) -> Expansion:
    """The terms of `value` as a linear expression. Values read elsewhere are leaves."""
    out = Expansion()

    def walk(v: Value, scale: torch.Tensor | None, top: bool) -> None:
        node = v.producer
        if node is None or (not top and graph.external_uses(v) > 1):
            out.terms.append(Term(v, scale))
            return
        kind = node.kind
        if kind in SUMS and (through_adds or top) and _walkable_add(node, layout, dtype, scale):
            for i, operand in enumerate(node.inputs):
                signed = times(scale, _MINUS_ONE) if kind == "sub" and i == 1 else scale
                if is_constant(operand):
                    vector = channel_vector(operand.producer.params["value"], layout, dtype)
                    if vector is None:  # only unscaled (see _walkable_add): stays an operand as it is
                        out.loose.append(operand)
                    else:
                        out.shifts.append(times(signed, vector))
                else:
                    walk(operand, signed, False)
            return
        if kind == "mul" and len(node.inputs) == 2 and sum(map(is_constant, node.inputs)) == 1:
            const, other = sorted(node.inputs, key=lambda i: not is_constant(i))
            vector = channel_vector(const.producer.params["value"], layout, dtype)
            if vector is not None:
                walk(other, times(scale, vector), False)
                return
        if kind == "batch_norm" and bn_refusal(node) is None and _bn_on_channels(layout):
            bn_scale, bn_shift = bn_affine(node)
            out.shifts.append(times(scale, bn_shift))
            walk(node.inputs[0], times(scale, bn_scale), False)
            return
        if kind == "identity" or (kind == "dropout" and not node.attrs.get("training")):
            walk(node.inputs[0], scale, False)
            return
        out.terms.append(Term(v, scale))

    walk(value, None, top)
    del walk  # it refers to itself through its closure: a cycle only the collector would free, with `out` in it
    return out


def _walkable_add(node: Node, layout: Layout, dtype, scale) -> bool:
    """An add or sub can be split into terms unless a constant operand that is not per channel would be
    scaled (a subtracted one is scaled by -1)."""
    scaled = [i for k, i in enumerate(node.inputs) if scale is not None or (node.kind == "sub" and k == 1)]
    return all(channel_vector(i.producer.params["value"], layout, dtype) is not None
               for i in scaled if is_constant(i))


def _bn_on_channels(layout: Layout) -> bool:
    """batch_norm normalizes axis 1: the channel axis of batched conv values, and of (N, C) linear values."""
    if layout.family == "linear":
        return layout.rank == 2
    return layout.rank is None or layout.rank == layout.spatial + 2


@dataclass
class Branch:
    kind: str  # "conv", "linear", "avg_pool" or "identity"
    input: Value  # the value the branch reads (identities and dropouts looked through)
    node: Node | None  # the conv / linear / avg_pool node, None for the identity
    term: Term
    # a conv reading a spatial crop of `input` (ACNet's x[:, :, :, c:-c]): (before, after) cut per spatial axis
    crop: tuple[tuple[int, int], ...] | None = None
    # what a conv reading a crop would read uncropped: (the value under the slices, the crop); see anchor_crops
    cropped: tuple[Value, tuple[tuple[int, int], ...]] | None = None


def classify(graph: Graph, term: Term, crops: bool = False) -> Branch:
    """The branch a term is. With `crops`, a conv reading spatial slices also says what it crops (`cropped`)."""
    node = term.leaf.producer
    if node is not None and node.kind in BRANCH_KINDS and graph.external_uses(term.leaf) == 1:
        read = unaliased(node.inputs[0])
        cropped = _cropped(read, node.params["weight"].dim() - 2) if crops and node.kind == "conv" else None
        return Branch(node.kind, read, node, term, cropped=cropped)
    return Branch("identity", unaliased(term.leaf), None, term)


def anchor_crops(branches: list[Branch]) -> list[Branch]:
    """Branches reading crops of a value another branch reads whole read that value, cropped: a crop is a
    smaller padding, so they can join its sum (ACNet with padding < k // 2). Crops with no such anchor stay
    as they are: branches of one crop merge as before."""
    whole = {id(b.input) for b in branches if b.cropped is None}
    return [replace(b, input=b.cropped[0], crop=b.cropped[1]) if b.cropped is not None and id(b.cropped[0]) in whole
            and not _pads_a_cropped_side(b) else b for b in branches]


def crop_refusals(branches: list[Branch]) -> list[tuple[str, Node]]:
    """(why, conv) for each branch reading a crop of a value another branch reads whole that was not
    anchored to it (anchor_crops)."""
    whole = {id(b.input) for b in branches if b.cropped is None}
    return [(f"{b.node.label} reads a crop {list(b.cropped[1])} of what another branch reads whole and pads a "
             f"side the crop cut (padding {list(b.node.attrs['padding'])}): its zeros there stand where the whole "
             "input has pixels, so it cannot join that branch's conv", b.node) for b in branches
            if b.cropped is not None and b.crop is None and id(b.cropped[0]) in whole]


def _pads_a_cropped_side(branch: Branch) -> bool:
    """Whether the conv pads a side its crop cut: its zeros there stand where the whole value has pixels,
    so reading the whole value with less padding would not be the same (only padding 0 there is)."""
    pads = branch.node.attrs["padding"]
    return any((cut_before and pad_before) or (cut_after and pad_after)
               for (cut_before, cut_after), (pad_before, pad_after) in zip(branch.cropped[1], pads))


def _cropped(value: Value, spatial: int) -> tuple[Value, tuple[tuple[int, int], ...]] | None:
    """The value under a chain of unit-step slices of spatial axes, and how much they cut off each side."""
    crop = [[0, 0] for _ in range(spatial)]
    found = False
    while value.producer is not None and value.producer.kind == "slice":
        node = value.producer
        source = node.inputs[0]
        shape, a = source.shape, node.attrs
        if shape is None or len(shape) != spatial + 2 or a["step"] != 1 or a["dim"] % len(shape) < 2:
            break
        axis = a["dim"] % len(shape) - 2
        crop[axis][0] += a["start"]
        crop[axis][1] += shape[a["dim"] % len(shape)] - a["end"]
        value, found = unaliased(source), True
    return (value, tuple((b, e) for b, e in crop)) if found else None


_LINEAR_KINDS = BRANCH_KINDS + SUMS + ("batch_norm", "mul", "identity", "dropout")


def obstacle(graph: Graph, leaf: Value, inputs: set[int]) -> str | None:
    """Why `leaf`, which reaches one of the branch `inputs` (ids of values), cannot join their sum."""
    node = leaf.producer
    if node is None or not node.inputs or not _reaches(node, inputs):
        return None
    if graph.external_uses(leaf) > 1 and node.kind in _LINEAR_KINDS:
        readers = [u.label for u in leaf.users][:3] + (["<graph output>"] if graph.is_output(leaf) else [])
        return (f"the branch output of {node.label} is also read by {', '.join(readers)}; "
                "a branch used elsewhere cannot be merged")
    if node.kind == "batch_norm" and bn_refusal(node):
        return bn_refusal(node)
    if node.kind == "mul" and any(map(is_constant, node.inputs)):
        return f"{node.label} multiplies a branch by a constant that does not act per channel"
    if node.kind == "mul":
        return (f"{node.label} multiplies a branch by a computed, input-dependent factor "
                "(selective-kernel / dynamic weights); only constant factors can be folded")
    if node.kind not in _LINEAR_KINDS:
        return f"a branch passes through {node.kind} {node.label}, which is not linear"
    return None


def _reaches(node: Node, inputs: set[int], depth: int = 4) -> bool:
    frontier = [node]
    for _ in range(depth):
        following = []
        for n in frontier:
            for v in n.inputs:
                if id(unaliased(v)) in inputs:
                    return True
                if v.producer is not None:
                    following.append(v.producer)
        frontier = following
    return False
