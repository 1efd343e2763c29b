"""Shapes and dtypes of a traced graph from one pass on meta tensors (no arithmetic), when that is safe.

The shape pass used to run the model on the example inputs: on a ResNet-50 that is a third of a
remove_channels call, all of it convolution arithmetic whose values nobody reads. On meta tensors
torch's own shape functions give the same shapes and dtypes, and check the same argument shapes,
without computing anything.

Only what cannot have side effects or read values runs this way: torch functions, tensor methods,
operators, and torch.nn's own leaf modules without hooks. Anything else (a user function or leaf
module, a value-dependent op that meta tensors cannot answer, a tensor off the CPU, operands of
different dtypes, which the real kernels may refuse where their shape functions do not) makes
`record_meta_shapes` return None, and the caller runs the real forward as before: its errors name
the place where the model fails.

Batch norm's meta form is a Python decomposition (about 4 ms a call); its output is its input's
shape and dtype, so that is written directly after the checks the real kernel makes.
"""
from __future__ import annotations

import inspect
import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.func import functional_call
from torch.utils._pytree import tree_map

from .module_calls import runs_class_forward
from .trace_shortcuts import plain_batch_norm

_PURE_MODULES = ("torch", "_operator", "operator", "math", "builtins")
_BATCH_NORMS = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)
# Ops whose output has their one input's shape and dtype (a floating input), many of them Python
# decompositions on meta tensors (milliseconds a call): answered directly.
_SAME_SHAPE_MODULES = tuple(getattr(torch.nn, n) for n in (
    "ReLU", "ReLU6", "Hardswish", "Hardsigmoid", "SiLU", "GELU", "Sigmoid", "Tanh", "Mish", "Dropout", "Hardtanh",
    "LeakyReLU", "ELU", "Softplus") if hasattr(torch.nn, n))
_SAME_SHAPE_FUNCTIONS = frozenset(f for f in (
    F.relu, F.relu6, F.gelu, F.silu, F.hardswish, F.hardsigmoid, F.mish, F.leaky_relu, F.hardtanh, F.elu,
    torch.relu, torch.sigmoid, torch.tanh, F.sigmoid, F.tanh, torch.Tensor.relu, torch.Tensor.sigmoid,
    torch.Tensor.tanh) if callable(f))
_SAME_SHAPE_METHODS = frozenset(("relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_"))
_BN_SIGNATURE = inspect.signature(lambda input, running_mean, running_var, weight=None, bias=None, training=False,
                                  momentum=0.1, eps=1e-5: None)


class _Unsupported(Exception):
    """This node cannot be answered on meta tensors: the caller runs the real forward instead."""


def _to_meta(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        if value.device.type != "cpu" or value.is_sparse or value.is_quantized or value.is_nested:
            raise _Unsupported
        return value.to("meta")
    return value


def _bn_output(x: Any, stats: list, training: bool) -> torch.Tensor:
    """Batch norm in evaluation mode: the input's shape and dtype, once the real kernel's checks pass."""
    if training or not isinstance(x, torch.Tensor) or x.dim() < 2 or stats[0] is None or stats[1] is None:
        raise _NotDirect  # training checks batch sizes, missing statistics are an error: the op's own checks say
    channels = x.shape[1]
    for t in stats:
        if t is not None and (not isinstance(t, torch.Tensor) or t.numel() != channels or t.dtype != x.dtype):
            raise _NotDirect
    return x.new_empty(x.shape)


def _functional_bn(*args, **kwargs) -> torch.Tensor:
    try:
        a = _BN_SIGNATURE.bind(*args, **kwargs).arguments
    except TypeError:
        raise _NotDirect from None
    return _bn_output(a["input"], [a["running_mean"], a["running_var"], a.get("weight"), a.get("bias")],
                      bool(a.get("training", False)))


def _same_shape(*args, gelu: bool = False, **kwargs) -> torch.Tensor:
    """A unary elementwise op on a floating tensor: the same shape and dtype. Anything more (a tensor
    argument, another option) goes to the op's own shape function, which checks it."""
    if len(args) != 1 or not isinstance(args[0], torch.Tensor) or not args[0].is_floating_point():
        raise _NotDirect
    for key, value in kwargs.items():
        if not (key == "inplace" and isinstance(value, bool)) and \
                not (gelu and key == "approximate" and value in ("none", "tanh")):
            raise _NotDirect
    return args[0].new_empty(args[0].shape)


def _gelu(*args, **kwargs) -> torch.Tensor:
    return _same_shape(*args, gelu=True, **kwargs)


def _broadcast(*args, either: bool = False, **kwargs) -> torch.Tensor:
    """a + b, a * b, ... of floating tensors of one dtype, or of one with a Python number: the broadcast shape.
    (Binary ops on meta tensors go through Python references, milliseconds a call.) The tensor comes first
    except for operators (`either`: 2 * x)."""
    if len(args) != 2 or kwargs:
        raise _NotDirect
    a, b = args
    if either and not isinstance(a, torch.Tensor):
        a, b = b, a
    if not isinstance(a, torch.Tensor) or not a.is_floating_point():
        raise _NotDirect
    if isinstance(b, torch.Tensor):
        if b.dtype != a.dtype:
            raise _NotDirect
        return a.new_empty(torch.broadcast_shapes(a.shape, b.shape))
    if type(b) in (int, float):
        return a.new_empty(a.shape)
    raise _NotDirect


def _layer_norm_output(input, normalized_shape, weight=None, bias=None, eps=1e-5) -> torch.Tensor:
    """Layer norm: the input's shape and dtype, when the normalized shape ends it and the affine tensors have it."""
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if not isinstance(input, torch.Tensor) or not input.is_floating_point() or not shape or \
            input.dim() < len(shape) or tuple(input.shape[-len(shape):]) != shape or not isinstance(eps, float):
        raise _NotDirect
    for t in (weight, bias):
        if t is not None and (not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or t.dtype != input.dtype):
            raise _NotDirect
    return input.new_empty(input.shape)


class _NotDirect(Exception):
    """No direct answer: ask the op's meta function."""


_UNARY = {f: _same_shape for f in _SAME_SHAPE_FUNCTIONS}
def _operator(*args, **kwargs) -> torch.Tensor:
    return _broadcast(*args, either=True, **kwargs)


_BINARY = {**{f: _operator for f in (operator.add, operator.sub, operator.mul, operator.truediv)},
           **{f: _broadcast for f in (torch.add, torch.sub, torch.mul, torch.div)}}
_DIRECT_FUNCTIONS = {**_UNARY, **_BINARY, F.gelu: _gelu, F.layer_norm: _layer_norm_output,
                     F.batch_norm: _functional_bn, torch.batch_norm: _functional_bn}
_DIRECT_METHODS = {**{m: _same_shape for m in _SAME_SHAPE_METHODS},
                   **{m: _broadcast for m in ("add", "sub", "mul", "div", "__add__", "__mul__")}}


# Direct answers for ops whose real kernels take floating tensors only (the arithmetic ones take any).
_FLOATING_RULES = frozenset((_same_shape, _gelu, _layer_norm_output, _functional_bn))


def _direct(rule, args, kwargs, otherwise):
    try:
        return rule(*args, **kwargs)
    except _NotDirect:
        return otherwise(*args, **kwargs)


def _dtypes_one(args: tuple, kwargs: dict) -> None:
    """Real kernels (conv, matmul, batch norm) refuse operands of different dtypes that shape functions accept."""
    seen = None
    for v in (*args, *kwargs.values()):
        for t in (v if isinstance(v, (list, tuple)) else (v,)):
            if isinstance(t, torch.Tensor) and t.dim() > 0:
                if seen is None:
                    seen = t.dtype
                elif t.dtype != seen:
                    raise _Unsupported


def _floating_only(args: tuple, kwargs: dict) -> None:
    """Activations, norms and torch.nn layers: their real kernels refuse integer and boolean tensors that
    their meta functions accept (GELU of a long tensor), so such inputs run the real forward, which says
    where the model fails. (An nn.Embedding's index input goes that way too, only slower.)"""
    for v in (*args, *kwargs.values()):
        if isinstance(v, torch.Tensor) and not (v.is_floating_point() or v.is_complex()):
            raise _Unsupported


class _MetaShapes(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm, garbage_collect_values=True)
        self.found: dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node):
        result = super().run_node(n)
        if isinstance(result, torch.Tensor):
            self.found[n] = (result.shape, result.dtype)
        elif isinstance(result, (tuple, list)) and result and all(isinstance(r, torch.Tensor) for r in result):
            self.found[n] = tuple((r.shape, r.dtype) for r in result)
        return result

    def placeholder(self, target, args, kwargs):
        return tree_map(_to_meta, super().placeholder(target, args, kwargs))

    def get_attr(self, target, args, kwargs):
        return _to_meta(super().get_attr(target, args, kwargs))

    def call_function(self, target, args, kwargs):
        if not isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
            module = getattr(target, "__module__", None) or ""
            if module.split(".")[0] not in _PURE_MODULES:
                raise _Unsupported  # a user function (fx.wrap) may read values or have side effects
        _dtypes_one(args, kwargs)
        rule = _DIRECT_FUNCTIONS.get(target)
        if rule in _FLOATING_RULES:
            _floating_only(args, kwargs)
        return target(*args, **kwargs) if rule is None else _direct(rule, args, kwargs, target)

    def call_method(self, target, args, kwargs):
        _dtypes_one(args, kwargs)
        rule = _DIRECT_METHODS.get(target)
        if rule in _FLOATING_RULES:
            _floating_only(args, kwargs)
        if rule is None:
            return super().call_method(target, args, kwargs)
        return _direct(rule, args, kwargs, lambda *a, **k: super(_MetaShapes, self).call_method(target, a, k))

    def call_module(self, target, args, kwargs):
        module = self.fetch_attr(target)
        kind = type(module)
        if plain_batch_norm(module):
            kind = torch.nn.BatchNorm2d  # computes exactly that (its forward's _assert is BatchNorm2d's dim check)
        elif not kind.__module__.startswith("torch.nn.") or not runs_class_forward(module):
            raise _Unsupported  # a user leaf module, or code of its own around or in place of the forward
        own = [*module._parameters.values(), *module._buffers.values()]
        _dtypes_one((*args, *own), kwargs)
        _floating_only(args, kwargs)
        if kind is torch.nn.Identity and len(args) == 1 and not kwargs:
            return args[0]
        if kind in _SAME_SHAPE_MODULES and not own:
            return _direct(_same_shape, args, kwargs, module)
        if kind in _BATCH_NORMS and len(args) == 1 and not kwargs:
            module._check_input_dim(args[0])
            try:
                return _bn_output(args[0], [module.running_mean, module.running_var, module.weight, module.bias],
                                  module.training)
            except _NotDirect:
                pass
        elif kind in _CONVS and len(args) == 1 and not kwargs:
            bias = None if module.bias is None else _to_meta(module.bias)
            return module._conv_forward(args[0], _to_meta(module.weight), bias)
        if not own and not module._modules:
            return module(*args, **kwargs)
        state = module.state_dict(keep_vars=True)
        return functional_call(module, {k: _to_meta(v) for k, v in state.items()}, args, kwargs)


_CONVS = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)


def record_meta_shapes(gm: fx.GraphModule, inputs: tuple) -> dict[fx.Node, Any] | None:
    """node -> (shape, dtype), or a tuple of them for split pieces, for every tensor-valued node of `gm` on
    `inputs`; None when some node cannot be answered on meta tensors (then run the real forward)."""
    interpreter = _MetaShapes(gm)
    try:
        with torch.no_grad():
            interpreter.run(*inputs)
    except Exception:  # noqa: BLE001 - any failure: the real forward decides, and words its error
        return None
    return interpreter.found
