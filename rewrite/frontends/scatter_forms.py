"""Slice assignment, functionalized, in the forms the passes read: a padded border, or slices and a concat.

torch.export writes `out[:, :, 0:p, :] = v` as `slice_scatter(out, copy(out[...], v), dim, start, end)`.
Two shapes of it are rewritten in the fx graph before import (shapes recorded, parameter
expressions folded):
- a zero pad whose whole border is overwritten with one per-channel constant (Diverse Branch
  Block's BN-and-pad: pad, then write the BN's shift on each border strip) is `pad_per_channel`,
  imported as a `pad` with per-channel values;
- any other slice_scatter with step 1 is the concatenation of the untouched pieces of its base and
  the written piece (`out[:, :c] += x[:, :c]` becomes cat(out[:, :c] + x[:, :c], out[:, c:])).
Both are exact: the same elements, from the same places.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.fx.passes.shape_prop import _extract_tensor_metadata

aten = torch.ops.aten


def pad_per_channel(x: torch.Tensor, pad: list, value: torch.Tensor) -> torch.Tensor:
    """F.pad's zero padding of `x` with the border filled by `value` (broadcast per channel)."""
    out = F.pad(x, pad)
    inside = torch.zeros((1, 1) + tuple(out.shape[2:]), dtype=torch.bool, device=x.device)
    spatial = len(out.shape) - 2
    index = [slice(None), slice(None)]
    for d in range(spatial):
        before, after = pad[2 * (spatial - 1 - d)], pad[2 * (spatial - 1 - d) + 1]
        index.append(slice(before, out.shape[2 + d] - after))
    inside[tuple(index)] = True
    return torch.where(inside, out, value.to(out.dtype).reshape(1, -1, *([1] * spatial)))


def _shape(node) -> tuple | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _scatter_args(node: fx.Node):
    names = ("base", "src", "dim", "start", "end", "step")
    values = dict(zip(names, (None, None, 0, None, None, 1)))
    values.update(zip(names, node.args))
    values.update(node.kwargs)
    return values


def _is_scatter(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is aten.slice_scatter.default


def _written_constant(src: fx.Node, folded: dict):
    """The folded value a scatter writes (through copy and expand), or None."""
    node = src
    if isinstance(node, fx.Node) and node.target is aten.copy.default:
        node = node.args[1]
    if isinstance(node, fx.Node) and node.target is aten.expand.default:
        node = node.args[0]
    return (node, folded[node]) if node in folded else None


def _range(a: dict, size: int) -> tuple[int, int] | None:
    start, end, step = slice(a["start"], a["end"], a["step"]).indices(size)
    return (start, end) if step == 1 and end > start else None


def rewrite_scatters(graph: fx.Graph, folded: dict) -> None:
    """Rewrite every slice_scatter chain of `graph` in place (see the module docstring)."""
    _drop_plain_copies(graph)
    for node in reversed(list(graph.nodes)):
        if node.graph is not graph or not _is_scatter(node) or any(_is_scatter(u) for u in node.users):
            continue  # erased already, or not the last write of its chain
        if not _border_pad(graph, node, folded):
            _as_concat(graph, node)


def _border_pad(graph: fx.Graph, last: fx.Node, folded: dict) -> bool:
    writes, node = [], last
    while _is_scatter(node):
        a = _scatter_args(node)
        constant = _written_constant(a["src"], folded)
        if constant is None:
            return False
        writes.append((a, constant))
        node = a["base"]  # earlier writes; what else reads them keeps reading them
    padded = node
    if not (isinstance(padded, fx.Node) and padded.target is F.pad):
        return False
    x, pad = padded.args[0], padded.args[1]
    mode = padded.kwargs.get("mode", "constant")
    if mode != "constant" or padded.kwargs.get("value") not in (None, 0, 0.0) or len(padded.args) > 2:
        return False
    shape, in_shape = _shape(last), _shape(x)
    if shape is None or in_shape is None or len(pad) % 2 or len(pad) // 2 > len(shape) - 2:
        return False
    spatial = len(shape) - 2
    pairs = [(0, 0)] * spatial
    for i in range(len(pad) // 2):
        pairs[spatial - 1 - i] = (pad[2 * i], pad[2 * i + 1])
    if any(b < 0 or e < 0 for b, e in pairs):
        return False
    value_node, value = writes[0][1]
    channels = shape[1]
    vector = _per_channel(value, len(shape), channels)
    covered = {d: set() for d in range(spatial)}
    for a, (_, v) in writes:
        dim = a["dim"] % len(shape)
        span = _range(a, shape[dim])
        other = _per_channel(v, len(shape), channels)
        if dim < 2 or span is None or other is None or vector is None or not torch.equal(other, vector):
            return False
        before, after = pairs[dim - 2]
        border = set(range(before)) | set(range(shape[dim] - after, shape[dim]))
        written = set(range(*span))
        if not written <= border:
            return False  # a write inside the picture: not a border
        covered[dim - 2] |= written
    for d, (before, after) in enumerate(pairs):
        if covered[d] != set(range(before)) | set(range(shape[2 + d] - after, shape[2 + d])):
            return False  # part of the border keeps the zero padding
    with graph.inserting_before(last):
        fill = graph.call_function(operator.getitem, (value_node, ...))  # the folded vector, read as it is
        fill.meta = dict(value_node.meta)
        new = graph.call_function(pad_per_channel, (x, list(pad), fill))
    new.meta = dict(last.meta)
    folded[fill] = vector
    last.replace_all_uses_with(new)
    _erase_dead(graph, last)
    return True


def _feeds_copy(node: fx.Node) -> bool:
    return all(u.target is aten.copy.default for u in node.users)


def _per_channel(value: torch.Tensor, rank: int, channels: int) -> torch.Tensor | None:
    """`value` as a (C,) vector when it broadcasts as one value per channel, else None."""
    if value.dim() > rank:
        return None
    shape = (1,) * (rank - value.dim()) + tuple(value.shape)
    if any(s != 1 for i, s in enumerate(shape) if i != 1) or shape[1] not in (1, channels):
        return None
    return value.reshape(-1).expand(channels).clone()


def _drop_plain_copies(graph: fx.Graph) -> None:
    """copy(dst, src) of the same shape and dtype is src: only dst's shape and dtype matter to it."""
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is aten.copy.default and len(node.args) == 2 \
                and not node.kwargs:
            dst, src = node.args
            a, b = (n.meta.get("tensor_meta") if isinstance(n, fx.Node) else None for n in (dst, src))
            if a is not None and b is not None and hasattr(a, "shape") and hasattr(b, "shape") \
                    and tuple(a.shape) == tuple(b.shape) and a.dtype == b.dtype:
                node.replace_all_uses_with(src)
                graph.erase_node(node)


def _reads_back(src, base: fx.Node, dim: int, start: int, end: int, size: int) -> bool:
    """Whether `src` is base[start:end] along `dim`: writing it back changes nothing."""
    if not (isinstance(src, fx.Node) and src.target is operator.getitem and src.args[0] is base):
        return False
    index = src.args[1] if isinstance(src.args[1], tuple) else (src.args[1],)
    if len(index) != dim + 1 or any(i != slice(None) for i in index[:dim]) or not isinstance(index[dim], slice):
        return False
    lo, hi, step = index[dim].indices(size)
    return (lo, hi, step) == (start, end, 1)


def _as_concat(graph: fx.Graph, last: fx.Node) -> None:
    a = _scatter_args(last)
    base, src = a["base"], a["src"]
    shape = _shape(base)
    if shape is None or _shape(src) is None or not isinstance(a["dim"], int):
        return
    dim = a["dim"] % len(shape)
    span = _range(a, shape[dim])
    if span is None:
        return
    start, end = span
    if _reads_back(src, base, dim, start, end, shape[dim]):
        last.replace_all_uses_with(base)
        _erase_dead(graph, last)
        return
    meta = base.meta["tensor_meta"]
    pieces = []
    with graph.inserting_before(last):
        for lo, hi, piece in ((0, start, None), (start, end, src), (end, shape[dim], None)):
            if hi <= lo:
                continue
            if piece is None:
                piece = graph.call_function(operator.getitem, (base, (slice(None),) * dim + (slice(lo, hi, 1),)))
                sizes = list(shape)
                sizes[dim] = hi - lo
                piece.meta["tensor_meta"] = _extract_tensor_metadata(torch.empty(sizes, dtype=meta.dtype,
                                                                                 device="meta"))
            pieces.append(piece)
        new = graph.call_function(torch.cat, (pieces, dim))
    new.meta = dict(last.meta)
    last.replace_all_uses_with(new)
    graph.erase_node(last)


def _erase_dead(graph: fx.Graph, node: fx.Node) -> None:
    """Erase `node` and whatever only it read, back to the first node something else still reads."""
    stack = [node]
    while stack:
        n = stack.pop()
        if getattr(n, "_erased", False) or n.users or n.op in ("placeholder", "output", "get_attr"):
            continue
        inputs = n.all_input_nodes
        graph.erase_node(n)
        stack.extend(inputs)
