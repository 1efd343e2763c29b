"""Parameter expressions folded at import: what forward computes from parameters, buffers and constants only.

A weight built in forward (`self.weight + self.id_tensor`, `weight * mask`), a scale
`sigmoid(alpha)[i]`, BN statistics arithmetic: none depends on the input, so each is a constant
the rules can read. The expression is evaluated once on float64 copies of its leaves and rounded
once to the dtype the model computes it in (so a float32 model gets the correctly rounded value,
and the folds that read it start from it). A buffer forward may update (a training-mode BN's
statistics, anything an unknown call receives) is not a constant. Only pure calls are evaluated (aten overloads without
mutation or randomness; a list of torch functions and methods for fx graphs), and a result larger
than the tensors it reads (a broadcast to the batch) is left to be computed where it was.
"""
from __future__ import annotations

import operator
from typing import Callable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

_PURE_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.pow, operator.getitem,
    getattr, torch.add, torch.sub, torch.mul, torch.div, torch.neg, torch.sigmoid, torch.sqrt, torch.rsqrt,
    torch.exp, torch.log, torch.tanh, torch.abs, torch.square, torch.pow, torch.cat, torch.stack, torch.reshape,
    torch.flatten, torch.transpose, torch.permute, torch.squeeze, torch.unsqueeze, torch.clamp, torch.softmax,
    torch.zeros_like, torch.ones_like, torch.sum, torch.mean, torch.diag, torch.matmul, torch.t, F.pad,
    F.normalize, F.softmax, torch.sign, torch.reciprocal, torch.where,
}
_PURE_METHODS = {
    "view", "view_as", "reshape", "reshape_as", "sigmoid", "sqrt", "rsqrt", "exp", "log", "tanh", "abs", "detach", "expand", "expand_as",
    "unsqueeze", "squeeze", "permute", "transpose", "t", "flatten", "contiguous", "add", "mul", "sub", "div",
    "clone", "pow", "mean", "sum", "neg", "float", "double", "half", "to", "type_as", "repeat", "__getitem__",
    "softmax", "square", "clamp", "reciprocal", "sign",
}


def _stateless_batch_norm(node: fx.Node) -> bool:
    """F.batch_norm without running statistics writes nothing: a normalization of its input (weight
    standardization in NFNet's ScaledStdConv, a batch_norm of the weight in forward)."""
    mean = node.args[1] if len(node.args) > 1 else node.kwargs.get("running_mean")
    var = node.args[2] if len(node.args) > 2 else node.kwargs.get("running_var")
    return mean is None and var is None


def pure_call(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _PURE_METHODS
    if node.op != "call_function":
        return False
    target = node.target
    if target is F.batch_norm:
        return _stateless_batch_norm(node)
    if isinstance(target, torch._ops.OpOverload):
        return not target._schema.is_mutable and torch.Tag.nondeterministic_seeded not in target.tags
    try:
        return target in _PURE_FUNCTIONS
    except TypeError:
        return False


_READ_ONLY_CALLS = {F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d, F.linear}


def _may_write(node: fx.Node) -> bool:
    """Whether a call might write into a tensor argument (a training-mode batch_norm updates its statistics)."""
    if node.op not in ("call_function", "call_method", "call_module") or pure_call(node):
        return False
    if node.op == "call_function" and node.target is F.batch_norm:
        training = node.args[5] if len(node.args) > 5 else node.kwargs.get("training", False)
        return training is not False
    return not (node.op == "call_function" and node.target in _READ_ONLY_CALLS)


def _changing_buffers(root: torch.nn.Module, graph: fx.Graph) -> set | None:
    """The get_attr nodes of buffers forward may change (None: any buffer may, a module trains)."""
    changing = set()
    training = any(m.training for m in root.modules())  # else no called module can be (one walk, not one per call)
    for node in graph.nodes:
        if training and node.op == "call_module" and \
                any(m.training for m in root.get_submodule(node.target).modules()):
            return None
        if _may_write(node):
            changing.update(n for n in node.all_input_nodes if n.op == "get_attr")
    return changing


def _fetch(root: torch.nn.Module, target: str):
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _numel(value) -> int:
    return value.numel() if isinstance(value, torch.Tensor) else 0


def _call(node: fx.Node, args, kwargs):
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    return node.target(*args, **kwargs)


def _as_float64(value):
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.detach().to(torch.float64)
    return value


# Calls whose result moves continuously with their inputs, so computing them from float64 leaves only
# removes rounding. Anything else (round, floor, sign, comparisons, casts: fake quantization, pruning masks)
# is evaluated as the model evaluates it: float64 could land on the other side of a step.
_CONTINUOUS = frozenset({
    "add", "sub", "rsub", "mul", "div", "truediv", "neg", "pow", "sqrt", "rsqrt", "exp", "log", "tanh", "sigmoid",
    "abs", "square", "reciprocal", "clamp", "softmax", "_softmax", "batch_norm", "_native_batch_norm_legit",
    "native_batch_norm", "normalize", "sum", "mean", "matmul", "mm", "bmm", "diag", "cat", "stack", "view", "reshape",
    "_unsafe_view", "view_as", "reshape_as", "expand", "expand_as", "permute", "transpose", "t", "squeeze",
    "unsqueeze", "flatten", "contiguous", "clone", "detach", "alias", "select", "slice", "index", "getitem",
    "__getitem__", "repeat", "pad", "constant_pad_nd", "zeros_like", "ones_like",
})


def _continuous(node: fx.Node) -> bool:
    target = node.target
    if isinstance(target, str):
        name = target
    elif isinstance(target, torch._ops.OpOverload):
        name = target._schema.name.split("::")[-1]
    else:
        name = getattr(target, "__name__", "")
    return name in _CONTINUOUS


def fold_parameter_expressions(root: torch.nn.Module, graph: fx.Graph,
                               before_call: Callable[[], None] = lambda: None) -> dict[fx.Node, torch.Tensor]:
    """The computed tensors of `graph` that depend on no input, each as its value (the leaves read
    directly, get_attr nodes, are left out: they are parameters already). Only values some node not
    folded reads are returned; the rest are intermediate steps of those. `before_call` runs before each
    call of the model's code is evaluated (the import's buffer guard copies the buffers at the first)."""
    native: dict[fx.Node, object] = {}
    wide: dict[fx.Node, object] = {}  # the same values computed from float64 leaves

    def wide_of(n: fx.Node):
        # a leaf's float64 copy, made when a continuous call reads it (most parameters are only read
        # by the calls that use them, never folded: converting each up front was most of this pass)
        if n not in wide:
            wide[n] = _as_float64(native[n])
        return wide[n]

    budget: dict[fx.Node, int] = {}  # how many elements the leaves of a value hold
    changing = _changing_buffers(root, graph)
    for node in graph.nodes:
        if node.op == "get_attr":
            try:
                value = _fetch(root, node.target)
            except AttributeError:
                continue
            if not isinstance(value, nn.Parameter) and (changing is None or node in changing):
                continue  # a buffer forward updates (BN statistics in training): read when it runs
            native[node], budget[node] = value, _numel(value)
            continue
        if not pure_call(node):
            continue
        inputs = node.all_input_nodes
        if not all(n in native for n in inputs):
            continue
        env_native = lambda n: native[n]  # noqa: E731
        before_call()
        try:
            with torch.no_grad():
                value = _call(node, fx.node.map_arg(node.args, env_native), fx.node.map_arg(node.kwargs, env_native))
        except Exception:
            continue  # what the model would fail on, it fails on when it runs
        cap = sum(budget[n] for n in inputs)
        if isinstance(value, torch.Tensor) and value.numel() > max(cap, 1):
            continue  # a broadcast to activation size: cheaper computed where it is
        precise = value
        if _continuous(node):
            try:
                with torch.no_grad():
                    precise = _call(node, fx.node.map_arg(node.args, wide_of), fx.node.map_arg(node.kwargs, wide_of))
            except Exception:
                pass
        native[node], wide[node], budget[node] = value, precise, cap
    folded = {}
    for node, value in native.items():
        if node.op == "get_attr" or not isinstance(value, torch.Tensor):
            continue
        if any(user not in native for user in node.users):
            folded[node] = _rounded(wide[node], value)
    return folded


def _rounded(precise, value: torch.Tensor) -> torch.Tensor:
    """The float64 result in the model's dtype; the model's own result when the two do not correspond.

    They correspond when the same elements are finite and every finite one differs by rounding only:
    within 4 units of the dtype's precision of that element (the dtype's smallest normal for a subnormal).
    More anywhere means the model's own rounding was the point, and float64 skipped it: the round-to-integer
    trick (w + 1.5 * 2**23) - 1.5 * 2**23 of a fake quantizer is the identity in float64. The check is per
    element: a bound on the largest value would let a small channel's grid through. Below float32's precision
    (float16, bfloat16) 4 units are a grid a quantizer may use (2**-5 of the value in bfloat16), so there the
    model's own result is always taken: it is what the model computes."""
    if isinstance(precise, torch.Tensor) and precise.shape == value.shape and value.is_floating_point() \
            and precise.is_floating_point() and torch.finfo(value.dtype).eps <= torch.finfo(torch.float32).eps:
        finite = torch.isfinite(value)
        if value.dtype == torch.float64 or not torch.equal(finite, torch.isfinite(precise)):
            return value.detach().clone()  # float64 is the model's own arithmetic; or it overflowed elsewhere
        rounded = precise.to(value.dtype).detach().clone()
        native = value.detach().double()[finite]
        gap = (rounded.double()[finite] - native).abs()
        info = torch.finfo(value.dtype)
        if bool((gap <= (4 * info.eps) * native.abs().clamp_min(info.tiny)).all()):
            rounded[~finite] = value.detach()[~finite]  # the model's own infinities and NaNs, bit for bit
            return rounded
    return value.detach().clone()

