"""aten forms: the ops of a torch.export graph written as the torch calls the fx importer knows.

torch.export gives a functionalized graph of aten overloads (`aten.conv2d.default`, ...). Most of
them are a torch function under another name, with the same arguments; those are renamed here, so
one importer (fx_import.py) and one emitter serve both capture paths. An overload not listed stays
an aten call: an opaque node, written back exactly as it came. Each entry keeps the math: an
argument that would change it (alpha != 1 in add, a transposed convolution read as a plain one)
keeps the aten call.
"""
from __future__ import annotations

import operator
from typing import Callable

import torch
import torch.fx as fx
import torch.nn.functional as F

aten = torch.ops.aten

# Same arguments, same result: only the target changes.
RENAMED: dict = {
    aten.conv1d.default: F.conv1d, aten.conv2d.default: F.conv2d, aten.conv3d.default: F.conv3d,
    aten.conv_transpose1d.default: F.conv_transpose1d, aten.conv_transpose2d.input: F.conv_transpose2d,
    aten.conv_transpose3d.input: F.conv_transpose3d,
    aten.linear.default: F.linear,
    aten.relu.default: torch.relu, aten.sigmoid.default: torch.sigmoid, aten.silu.default: F.silu,
    aten.hardswish.default: F.hardswish, aten.hardsigmoid.default: F.hardsigmoid,
    aten.hardtanh.default: F.hardtanh, aten.clamp.default: torch.clamp,
    aten.gelu.default: F.gelu, aten.leaky_relu.default: F.leaky_relu,
    aten.cat.default: torch.cat, aten.flatten.using_ints: torch.flatten,
    aten.mean.dim: torch.mean, aten.adaptive_avg_pool2d.default: F.adaptive_avg_pool2d,
    aten.view.default: torch.reshape, aten.reshape.default: torch.reshape, aten._unsafe_view.default: torch.reshape,
    aten.split_with_sizes.default: torch.split, aten.split.Tensor: torch.split, aten.chunk.default: torch.chunk,
    aten.sub.Tensor: torch.sub, aten.div.Tensor: torch.div,
}

# Ops that only matter to autograd or memory layout: their output is their input.
PASS_THROUGH = {aten.detach.default, aten.alias.default, aten.lift_fresh_copy.default}


def _clone(node: fx.Node):
    return node.args[0] if not node.kwargs.get("memory_format") else None


def _add_or_mul(fn):
    def rewrite(node: fx.Node):
        alpha = node.kwargs.get("alpha", 1)
        if alpha != 1:
            return None
        return fn, node.args[:2], {}
    return rewrite


def _softmax(node: fx.Node):
    x, dim, *rest = node.args
    if rest and rest[0]:  # half_to_float
        return None
    return torch.softmax, (x, dim), {}


def _convolution(node: fx.Node):
    x, w, b, stride, padding, dilation, transposed, output_padding, groups = node.args[:9]
    dims = len(stride)
    if transposed:
        fn = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}.get(dims)
        return None if fn is None else (fn, (x, w, b, stride, padding, output_padding, groups, dilation), {})
    if any(output_padding):
        return None
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}.get(dims)
    return None if fn is None else (fn, (x, w, b, stride, padding, dilation, groups), {})


def _batch_norm(node: fx.Node):
    x, w, b, mean, var, training, momentum, eps = node.args[:8]
    return F.batch_norm, (x, mean, var, w, b, training, momentum, eps), {}


def _pool(table: dict, names: tuple, defaults: tuple):
    """aten pooling (x, kernel, stride=[], ...) -> F.*_poolNd with keyword arguments."""
    def rewrite(node: fx.Node):
        x, kernel, *rest = node.args
        values = dict(zip(names, defaults))
        values.update(zip(names, rest))
        values.update(node.kwargs)
        fn = table.get(len(kernel))
        if fn is None:
            return None
        if not values.get("stride"):
            values["stride"] = None
        return fn, (x, kernel), values
    return rewrite


def _constant_pad(node: fx.Node):
    x, pad, *rest = node.args
    value = rest[0] if rest else node.kwargs.get("value", 0)
    return F.pad, (x, list(pad)), {"mode": "constant", "value": value}


def _pad(node: fx.Node):
    x, pad, *rest = node.args
    mode = rest[0] if rest else node.kwargs.get("mode", "constant")
    value = rest[1] if len(rest) > 1 else node.kwargs.get("value")
    return F.pad, (x, list(pad)), {"mode": mode, "value": value}


def _slice(node: fx.Node):
    x, *rest = node.args
    dim, start, end, step = (list(rest) + [0, None, None, 1][len(rest):])[:4]
    dim = node.kwargs.get("dim", dim)
    if not isinstance(dim, int) or dim < 0:
        return None
    index = (slice(None),) * dim + (slice(start, end, step),)
    return operator.getitem, (x, index), {}


def _dropout(node: fx.Node):
    x, p, train = node.args[:3]
    return F.dropout, (x, p, train), {}


def _inference_dropout(node: fx.Node):
    """Dropout that is not training is its input (as in export's own inference IR)."""
    return node.args[0] if len(node.args) > 2 and node.args[2] is False else None


_AVG = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}
_MAX = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}

REWRITTEN: dict[object, Callable] = {
    aten.add.Tensor: _add_or_mul(torch.add), aten.mul.Tensor: _add_or_mul(torch.mul),
    aten.add.Scalar: _add_or_mul(torch.add), aten.mul.Scalar: _add_or_mul(torch.mul),
    aten._softmax.default: _softmax, aten.softmax.int: _softmax,
    aten.convolution.default: _convolution,
    aten.batch_norm.default: _batch_norm,
    aten.avg_pool1d.default: _pool(_AVG, ("stride", "padding", "ceil_mode", "count_include_pad"), ((), 0, False, True)),
    aten.avg_pool2d.default: _pool(_AVG, ("stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"),
                                   ((), 0, False, True, None)),
    aten.avg_pool3d.default: _pool(_AVG, ("stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"),
                                   ((), 0, False, True, None)),
    aten.max_pool1d.default: _pool(_MAX, ("stride", "padding", "dilation", "ceil_mode"), ((), 0, 1, False)),
    aten.max_pool2d.default: _pool(_MAX, ("stride", "padding", "dilation", "ceil_mode"), ((), 0, 1, False)),
    aten.max_pool3d.default: _pool(_MAX, ("stride", "padding", "dilation", "ceil_mode"), ((), 0, 1, False)),
    aten.constant_pad_nd.default: _constant_pad, aten.pad.default: _pad,
    aten.slice.Tensor: _slice,
    aten.dropout.default: _dropout,
}

# aten ops returning (output, saved statistics...): only the output is read in inference.
_NO_TRAINING_BN = aten._native_batch_norm_legit_no_training.default


def normalize(graph: fx.Graph) -> None:
    """Rewrite `graph` in place: aten calls with a torch form become that call."""
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        target = node.target
        if target in PASS_THROUGH or target in (aten.clone.default, aten.dropout.default):
            source = node.args[0] if target in PASS_THROUGH else \
                _clone(node) if target is aten.clone.default else _inference_dropout(node)
            if isinstance(source, fx.Node):
                node.replace_all_uses_with(source)
                graph.erase_node(node)
            continue
        if target is _NO_TRAINING_BN:
            _native_batch_norm(graph, node)
            continue
        if target in RENAMED:
            node.target = RENAMED[target]
            continue
        rewrite = REWRITTEN.get(target)
        if rewrite is None:
            continue
        found = rewrite(node)
        if found is not None:
            node.target, node.args, node.kwargs = found


def _native_batch_norm(graph: fx.Graph, node: fx.Node) -> None:
    """(output, mean, rstd) = aten._native_batch_norm_legit_no_training(...), output read through getitem 0."""
    users = list(node.users)
    if not all(u.target is operator.getitem and u.args[1] == 0 for u in users):
        return
    x, w, b, mean, var, momentum, eps = node.args[:7]
    with graph.inserting_after(node):
        bn = graph.call_function(F.batch_norm, (x, mean, var, w, b, False, momentum, eps))
    bn.meta = dict(node.meta)
    for u in users:
        u.replace_all_uses_with(bn)
        graph.erase_node(u)
    graph.erase_node(node)
