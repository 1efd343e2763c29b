"""torch.fx graph -> IR. Modules, functions and methods that mean the same op become one kind.

Each IR node keeps an `FxOrigin`: the fx call it came from, with its tensor arguments replaced by
references to the IR node's inputs. The backend re-emits untouched nodes from it verbatim.
"""
from __future__ import annotations

import functools
import inspect
import math
import operator
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..ir import Graph, Node, OpDefinitionError, Value, clamp_bound
from .fx_forms import FxForms, bind_call, function_form, module_parts
from .module_calls import own_code, runs_class_forward
from .param_folding import pure_call
from .scatter_forms import pad_per_channel
from .trace_shortcuts import plain_batch_norm


@dataclass(frozen=True)
class In:
    """Placeholder in an origin template: the IR node's input number `index`."""
    index: int


@dataclass(frozen=True)
class Attr:
    """Placeholder in an origin template: a get_attr of `target` on the root module."""
    target: str


@dataclass
class FxOrigin:
    op: str
    target: Any
    args: tuple
    kwargs: dict
    name: str


def _pairs(value, dims: int) -> tuple:
    value = tuple(value) if isinstance(value, (tuple, list)) else (value,) * dims
    return tuple((int(v), int(v)) for v in value)


def _tuple(value, dims: int) -> tuple:
    return tuple(int(v) for v in value) if isinstance(value, (tuple, list)) else (int(value),) * dims


def _same_padding(kernel, dilation) -> tuple:
    pads = []
    for k, d in zip(kernel, dilation):
        total = d * (k - 1)
        pads.append((total // 2, total - total // 2))
    return tuple(pads)


def conv_attrs(weight: torch.Tensor, stride, padding, dilation, groups, padding_mode="zeros") -> dict:
    dims = weight.dim() - 2
    dilation = _tuple(dilation, dims)
    if isinstance(padding, str):
        pads = ((0, 0),) * dims if padding == "valid" else _same_padding(weight.shape[2:], dilation)
    else:
        pads = _pairs(padding, dims)
    return {"stride": _tuple(stride, dims), "padding": pads, "dilation": dilation, "groups": int(groups),
            "padding_mode": padding_mode}


def conv_transpose_attrs(weight, stride, padding, output_padding, groups, dilation) -> dict:
    dims = weight.dim() - 2
    return {"stride": _tuple(stride, dims), "padding": _pairs(padding, dims),
            "output_padding": _tuple(output_padding, dims), "dilation": _tuple(dilation, dims),
            "groups": int(groups)}


def bn_node_parts(running_mean, running_var, weight, bias, training, momentum, eps):
    attrs = {"eps": float(eps), "momentum": momentum, "training": bool(training) or running_mean is None}
    params = {"running_mean": running_mean, "running_var": running_var, "weight": weight, "bias": bias}
    return attrs, params


def pool_attrs(kernel_size, stride, padding, dims: int, **extra) -> dict:
    kernel = _tuple(kernel_size, dims)
    stride = kernel if stride is None or stride == [] or stride == () else _tuple(stride, dims)
    attrs = {"kernel_size": kernel, "stride": stride, "padding": _pairs(padding, dims)}
    attrs.update(extra)
    return attrs


# -- module recognizers: (module) -> (kind, attrs, params) or None ------------------------------
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_TS = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_BNS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_MAXPOOLS = {nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3}
_AVGPOOLS = {nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3}
_ADAPTIVE = {nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3}
_PAD_MODULES = {nn.ZeroPad1d: "constant", nn.ZeroPad2d: "constant", nn.ZeroPad3d: "constant",
                nn.ConstantPad1d: "constant", nn.ConstantPad2d: "constant", nn.ConstantPad3d: "constant",
                nn.ReflectionPad1d: "reflect", nn.ReflectionPad2d: "reflect", nn.ReflectionPad3d: "reflect",
                nn.ReplicationPad1d: "replicate", nn.ReplicationPad2d: "replicate", nn.ReplicationPad3d: "replicate"}
# Every stock class the import reads, in the order it asks about them (ReLU6 before Hardtanh, whose forward it runs)
_FAMILIES = (*_CONVS, *_CONV_TS, nn.Linear, *_BNS, nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.Identity, *_DROPOUTS,
             nn.Flatten, *_MAXPOOLS, *_AVGPOOLS, *_ADAPTIVE, *_PAD_MODULES)
_STOCK_FORWARDS = {c: c.forward for c in _FAMILIES}  # as torch defines them: a class patched later is not stock


def _family(m: nn.Module) -> type | None:
    """The first of _FAMILIES whose stock forward calling `m` runs (the class itself, or a subclass that does
    not override forward); None for anything else: a forward set on the instance or patched on the class, or
    a hook (the module's own or a global one) that runs code of its own around the call."""
    if not runs_class_forward(m):
        return None
    cls = type(m)
    return _family_of(cls, cls.forward)


@functools.lru_cache(maxsize=4096)
def _family_of(cls: type, forward) -> type | None:
    # Decided once per module class and forward (a class patched later is asked anew): the import asks
    # about every module call.
    return next((c for c in _FAMILIES if issubclass(cls, c) and forward is _STOCK_FORWARDS[c]), None)


def recognize_module(m: nn.Module, nargs: int):
    if nargs != 1:
        return None
    family = _family(m)
    if family in _CONVS:
        return "conv", conv_attrs(m.weight, m.stride, m.padding, m.dilation, m.groups, m.padding_mode), \
            {"weight": m.weight, "bias": m.bias}
    if family in _CONV_TS:
        if m.padding_mode != "zeros":
            return None
        return "conv_transpose", conv_transpose_attrs(m.weight, m.stride, m.padding, m.output_padding, m.groups,
                                                      m.dilation), {"weight": m.weight, "bias": m.bias}
    if family is nn.Linear:
        return "linear", {}, {"weight": m.weight, "bias": m.bias}
    if family in _BNS or (family is None and plain_batch_norm(m)):
        attrs, params = bn_node_parts(m.running_mean, m.running_var, m.weight, m.bias,
                                      m.training or m.running_mean is None, m.momentum, m.eps)
        return "batch_norm", attrs, params
    if family is nn.ReLU:
        return "relu", {}, {}
    if family is nn.ReLU6:
        return "clamp", {}, {"min": clamp_bound(0.0), "max": clamp_bound(6.0)}
    if family is nn.Hardtanh:
        return "clamp", {}, {"min": clamp_bound(m.min_val), "max": clamp_bound(m.max_val)}
    if family is nn.Identity:
        return "identity", {}, {}
    if family in _DROPOUTS:
        return "dropout", {"p": m.p, "training": m.training}, {}
    if family is nn.Flatten:
        return "flatten", {"start_dim": m.start_dim, "end_dim": m.end_dim}, {}
    if family in _MAXPOOLS:
        if m.return_indices:
            return None
        dims = _MAXPOOLS[family]
        return "max_pool", pool_attrs(m.kernel_size, m.stride, m.padding, dims,
                                      dilation=_tuple(m.dilation, dims), ceil_mode=m.ceil_mode), {}
    if family in _AVGPOOLS:
        return "avg_pool", pool_attrs(m.kernel_size, m.stride, m.padding, _AVGPOOLS[family], ceil_mode=m.ceil_mode,
                                      count_include_pad=m.count_include_pad,
                                      divisor_override=getattr(m, "divisor_override", None)), {}
    if family in _ADAPTIVE:
        return "adaptive_avg_pool", {"output_size": _tuple(m.output_size, _ADAPTIVE[family])}, {}
    return None


def pad_module_args(m: nn.Module):
    """(pad list, mode, value) of a stock padding module, as F.pad takes them; None for anything else."""
    mode = _PAD_MODULES.get(_family(m))
    return None if mode is None else (list(m.padding), mode, getattr(m, "value", 0.0))


# -- function recognizers: signature stand-ins bind args the way torch does ----------------------
def _sig_conv(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1): ...
def _sig_conv_t(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1): ...
def _sig_linear(input, weight, bias=None): ...
def _sig_bn(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5): ...
def _sig_unary(input, inplace=False): ...
def _sig_hardtanh(input, min_val=-1.0, max_val=1.0, inplace=False): ...
def _sig_clamp(input, min=None, max=None): ...
def _sig_binary(input, other, alpha=1): ...
def _sig_cat(tensors, dim=0): ...
def _sig_flatten(input, start_dim=0, end_dim=-1): ...
def _sig_dropout(input, p=0.5, training=True, inplace=False): ...
def _sig_adaptive(input, output_size): ...
def _sig_pad(input, pad, mode="constant", value=None): ...
def _sig_avg_pool(input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
                  divisor_override=None): ...
def _sig_max_pool(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False): ...


_POOL_DIMS = {F.avg_pool1d: 1, F.avg_pool2d: 2, F.avg_pool3d: 3, F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3}


@functools.lru_cache(maxsize=None)
def _signature(stand_in: Callable) -> inspect.Signature:
    """The signature of a stand-in above, built once (inspect.signature rebuilds it on every call)."""
    return inspect.signature(stand_in)


_FUNCTIONS: dict[Any, tuple[str, Callable]] = {
    F.conv1d: ("conv", _sig_conv), F.conv2d: ("conv", _sig_conv), F.conv3d: ("conv", _sig_conv),
    F.conv_transpose1d: ("conv_transpose", _sig_conv_t), F.conv_transpose2d: ("conv_transpose", _sig_conv_t),
    F.conv_transpose3d: ("conv_transpose", _sig_conv_t),
    F.linear: ("linear", _sig_linear),
    F.batch_norm: ("batch_norm", _sig_bn),
    F.relu: ("relu", _sig_unary), torch.relu: ("relu", _sig_unary),
    F.relu6: ("relu6", _sig_unary), F.hardtanh: ("hardtanh", _sig_hardtanh),
    torch.clamp: ("clamp", _sig_clamp), torch.clip: ("clamp", _sig_clamp),
    operator.add: ("add", _sig_binary), torch.add: ("add", _sig_binary),
    operator.mul: ("mul", _sig_binary), torch.mul: ("mul", _sig_binary),
    operator.sub: ("sub", _sig_binary), torch.sub: ("sub", _sig_binary),
    torch.cat: ("concat", _sig_cat), torch.concat: ("concat", _sig_cat),
    torch.flatten: ("flatten", _sig_flatten),
    F.dropout: ("dropout", _sig_dropout),
    F.adaptive_avg_pool2d: ("adaptive_avg_pool", _sig_adaptive),
    F.avg_pool1d: ("avg_pool", _sig_avg_pool), F.avg_pool2d: ("avg_pool", _sig_avg_pool),
    F.avg_pool3d: ("avg_pool", _sig_avg_pool),
    F.max_pool1d: ("max_pool", _sig_max_pool), F.max_pool2d: ("max_pool", _sig_max_pool),
    F.max_pool3d: ("max_pool", _sig_max_pool),
}
_METHODS: dict[str, tuple[str, Callable]] = {
    "add": ("add", _sig_binary), "mul": ("mul", _sig_binary), "sub": ("sub", _sig_binary), "relu": ("relu", _sig_unary),
    "flatten": ("flatten", _sig_flatten), "clamp": ("clamp", _sig_clamp),
}


class FxImporter:
    """Builds the IR for one traced fx graph of `root`."""

    def __init__(self, root: nn.Module, fx_graph: fx.Graph, folded: dict[fx.Node, torch.Tensor] | None = None):
        self.root = root
        self.fx_graph = fx_graph
        self.folded = folded or {}  # parameter expressions computed at import (param_folding.py)
        self.graph = Graph()
        self.values: dict[fx.Node, Value] = {}
        self.placeholders: list[tuple[str, Any]] = []
        self.splits: dict[fx.Node, Node] = {}  # recognized split / chunk calls, whose getitems become outputs
        self.forms = FxForms()  # the ops whose definitions give plain fx forms (activations, user ops)
        self._modules: dict[str, nn.Module] | None = None  # path -> module, built on first use

    # The import proper --------------------------------------------------------------------
    def run(self) -> Graph:
        skipped = _assertion_only(self.fx_graph)
        for fx_node in self.fx_graph.nodes:
            if fx_node in skipped:
                continue
            if fx_node.op == "placeholder":
                default = fx_node.args[0] if fx_node.args else inspect.Parameter.empty
                self.placeholders.append((fx_node.target, default))
                value = self.graph.add_input(fx_node.name)
                self._set_meta(value, fx_node)
                self.values[fx_node] = value
            elif fx_node.op == "output":
                self._import_output(fx_node)
            else:
                self.values[fx_node] = self._import_node(fx_node)
        self.graph.meta.update(frontend="fx", fx_root=self.root, fx_placeholders=self.placeholders)
        self.graph.eliminate_dead_code()
        self.graph.mark_imported()
        return self.graph

    def _import_output(self, fx_node: fx.Node) -> None:
        outputs: list[Value] = []

        def to_template(arg):
            if isinstance(arg, fx.Node):
                outputs.append(self.values[arg])
                return In(len(outputs) - 1)
            return arg

        template = fx.node.map_aggregate(fx_node.args[0], to_template)
        self.graph.outputs = outputs
        self.graph.meta["fx_output"] = template

    def _import_node(self, fx_node: fx.Node) -> Value | None:
        if fx_node.op == "call_function" and fx_node.target is torch._assert:
            return None  # a shape check traced from the model (timm's _assert); it guards nothing here
        piece = self._split_piece(fx_node)
        if piece is not None:
            return piece
        if fx_node in self.folded:  # a parameter expression: a new constant, written anew
            return self._finish(Node("constant", fx_node.name, params={"value": self.folded[fx_node]}), fx_node)
        if fx_node.op == "get_attr":
            tensor = self._fetch_attr(fx_node.target)
            if isinstance(tensor, torch.Tensor):
                node = Node("constant", fx_node.name, params={"value": tensor})
                node.origin = FxOrigin("get_attr", fx_node.target, (), {}, fx_node.name)
                return self._finish(node, fx_node)
        recognized = self._recognize(fx_node)
        if recognized is not None:
            return recognized
        return self._opaque(fx_node)

    def _finish(self, node: Node, fx_node: fx.Node) -> Value:
        node.scope = fx_node.target if fx_node.op in ("call_module", "get_attr") else None
        self.graph.append(node)
        self._set_meta(node.output, fx_node)
        return node.output

    # Opaque nodes keep their whole call; tensor args become inputs ----------------------------
    def _opaque(self, fx_node: fx.Node) -> Value:
        node = Node("opaque", fx_node.name)
        args, kwargs = self._template(node, fx_node.args, fx_node.kwargs)
        node.attrs["fx_op"] = fx_node.op
        node.attrs["target"] = fx_node.target
        node.attrs["pure"] = _is_pure_call(fx_node)
        node.attrs["call"] = getattr(fx_node.target, "__name__", str(fx_node.target))
        node.attrs["nonnegative"] = _is_nonnegative_call(fx_node)
        if fx_node.op == "call_module":  # a stock module kept opaque: the reports of its sites say why
            module = self._module(fx_node.target)
            node.attrs["is_batch_norm"] = isinstance(module, nn.modules.batchnorm._BatchNorm)
            why = own_code(module)
            if why:
                node.attrs["unmapped"] = why
        node.origin = FxOrigin(fx_node.op, fx_node.target, args, kwargs, fx_node.name)
        return self._finish(node, fx_node)

    def _template(self, node: Node, args, kwargs):
        def to_template(arg):
            if isinstance(arg, fx.Node):
                node.add_input(self.values[arg])
                return In(len(node.inputs) - 1)
            return arg

        return fx.node.map_aggregate(args, to_template), fx.node.map_aggregate(kwargs, to_template)

    # Recognized nodes --------------------------------------------------------------------
    def _recognize(self, fx_node: fx.Node) -> Value | None:
        if fx_node.op == "call_module":
            module = self._module(fx_node.target)
            nargs = len(fx_node.args) + len(fx_node.kwargs)
            padding = pad_module_args(module) if nargs == 1 else None
            if padding is not None:
                return self._pad_node(fx_node, fx_node.args[0], *padding)
            found = recognize_module(module, nargs) or self._module_form(module, nargs)
            if found is None or not isinstance(fx_node.args[0], fx.Node):
                return None
            kind, attrs, params = found
            try:
                return self._make(kind, fx_node, [fx_node.args[0]], attrs, params)
            except OpDefinitionError:
                return None  # module settings the definition does not accept (Softmax(dim=None), ...)
        shaped = self._recognize_shaped(fx_node)
        if shaped is not None:
            return shaped
        if fx_node.op == "call_function" and _hashable(fx_node.target) and fx_node.target in _FUNCTIONS:
            kind, sig = _FUNCTIONS[fx_node.target]
        elif fx_node.op == "call_method" and fx_node.target in _METHODS:
            kind, sig = _METHODS[fx_node.target]
        else:
            return self._call_form(fx_node)
        try:
            bound = _signature(sig).bind(*fx_node.args, **fx_node.kwargs)
        except TypeError:
            return None
        bound.apply_defaults()
        return self._recognize_call(kind, fx_node, dict(bound.arguments))

    def _module_form(self, module: nn.Module, nargs: int):
        op = self.forms.module_op(module)
        if op is None or nargs != len(op.inputs) or op.variadic:
            return None
        parts = module_parts(op, module)
        return None if parts is None else (op.kind, *parts)

    def _call_form(self, fx_node: fx.Node) -> Value | None:
        """A call of an op whose definition lists this function or method (activations, user ops)."""
        op = self.forms.call_op(fx_node)
        if op is None or op.variadic:
            return None
        fn = fx_node.target if fx_node.op == "call_function" else function_form(op)
        bound = bind_call(op, fn, fx_node.args, fx_node.kwargs, self._attr_tensor)
        if bound is None:
            return None
        operands, attrs, params = bound
        try:
            return self._make(op.kind, fx_node, operands, attrs, params)
        except OpDefinitionError:
            return None  # arguments of a form the definition does not accept (a None dim, ...): keep the call

    def _recognize_call(self, kind: str, fx_node: fx.Node, a: dict) -> Value | None:
        x = a.get("input")
        if kind in ("conv", "conv_transpose", "linear", "batch_norm"):
            tensor_keys = {"conv": ("weight", "bias"), "conv_transpose": ("weight", "bias"),
                           "linear": ("weight", "bias"),
                           "batch_norm": ("running_mean", "running_var", "weight", "bias")}[kind]
            params = {k: self._attr_tensor(a[k]) for k in tensor_keys}
            if not isinstance(x, fx.Node) or any(a[k] is not None and params[k] is None for k in tensor_keys):
                return None  # a parameter computed in forward: keep the call as it is
            if any(isinstance(v, fx.Node) for k, v in a.items() if k not in tensor_keys and k != "input"):
                return None
            if kind == "conv":
                attrs = conv_attrs(params["weight"], a["stride"], a["padding"], a["dilation"], a["groups"])
            elif kind == "conv_transpose":
                attrs = conv_transpose_attrs(params["weight"], a["stride"], a["padding"], a["output_padding"],
                                             a["groups"], a["dilation"])
            elif kind == "batch_norm":
                attrs, params = bn_node_parts(params["running_mean"], params["running_var"], params["weight"],
                                              params["bias"], a["training"], a["momentum"], a["eps"])
            else:
                attrs = {}
            return self._make(kind, fx_node, [x], attrs, params)
        if kind in ("relu", "relu6", "hardtanh", "clamp", "flatten", "dropout", "adaptive_avg_pool"):
            if not isinstance(x, fx.Node) or any(isinstance(v, fx.Node) for k, v in a.items() if k != "input"):
                return None
            attrs, params = {}, {}
            if kind == "relu6":
                kind, params = "clamp", {"min": clamp_bound(0.0), "max": clamp_bound(6.0)}
            elif kind == "hardtanh":
                kind, params = "clamp", {"min": clamp_bound(a["min_val"]), "max": clamp_bound(a["max_val"])}
            elif kind == "clamp":
                params = {"min": clamp_bound(_opt_float(a["min"])), "max": clamp_bound(_opt_float(a["max"]))}
            elif kind == "flatten":
                attrs = {"start_dim": a["start_dim"], "end_dim": a["end_dim"]}
            elif kind == "dropout":
                attrs = {"p": a["p"], "training": bool(a["training"])}
            elif kind == "adaptive_avg_pool":
                attrs = {"output_size": _tuple(a["output_size"], 2)}
            return self._make(kind, fx_node, [x], attrs, params)
        if kind in ("avg_pool", "max_pool"):
            if not isinstance(x, fx.Node) or any(isinstance(v, fx.Node) for k, v in a.items() if k != "input") \
                    or a.get("return_indices"):
                return None
            dims = _POOL_DIMS[fx_node.target]
            if kind == "avg_pool":
                attrs = pool_attrs(a["kernel_size"], a["stride"], a["padding"], dims, ceil_mode=bool(a["ceil_mode"]),
                                   count_include_pad=bool(a["count_include_pad"]),
                                   divisor_override=a["divisor_override"])
            else:
                attrs = pool_attrs(a["kernel_size"], a["stride"], a["padding"], dims, ceil_mode=bool(a["ceil_mode"]),
                                   dilation=_tuple(a["dilation"], dims))
            return self._make(kind, fx_node, [x], attrs, {})
        if kind in ("add", "mul", "sub"):
            if a.get("alpha", 1) != 1:
                return None
            operands = [a["input"], a["other"]]
            if not any(isinstance(o, fx.Node) for o in operands):
                return None
            return self._make(kind, fx_node, operands, {}, {})
        if kind == "concat":
            tensors = a["tensors"]
            if not isinstance(tensors, (list, tuple)) or not all(isinstance(t, fx.Node) for t in tensors):
                return None
            return self._make("concat", fx_node, list(tensors), {"dim": int(a["dim"])}, {})
        return None

    # split / chunk and flattening view / reshape: recognized only when example inputs gave shapes --------
    def _recognize_shaped(self, fx_node: fx.Node) -> Value | None:
        op, target = fx_node.op, fx_node.target
        if (op == "call_function" and target in (torch.split, torch.chunk)) or \
                (op == "call_method" and target in ("split", "chunk")):
            return self._recognize_split(fx_node)
        if (op == "call_method" and target in ("view", "reshape")) or (op == "call_function" and target is torch.reshape):
            return self._recognize_flattening_view(fx_node)
        if op == "call_function" and target is operator.getitem:
            return self._recognize_slice(fx_node)
        if op == "call_function" and target is F.pad:
            return self._recognize_pad(fx_node)
        if op == "call_function" and target is pad_per_channel:
            x, pad, fill = fx_node.args
            value = self._attr_tensor(fill)
            return None if value is None else self._pad_node(fx_node, x, pad, "constant", value)
        return None

    def _recognize_slice(self, fx_node: fx.Node) -> Value | None:
        """x[..., a:b:s, ...] with one sliced axis (constant bounds) on a tensor of known shape: a `slice`."""
        x, index = fx_node.args
        shape = _meta_shape(x)
        if shape is None or _meta_shape(fx_node) is None:
            return None
        index = index if isinstance(index, tuple) else (index,)
        if len(index) > len(shape) or not all(isinstance(i, slice) for i in index):
            return None
        cut = [(d, i) for d, i in enumerate(index) if i != slice(None)]
        if len(cut) != 1 or any(isinstance(v, fx.Node) for v in (cut[0][1].start, cut[0][1].stop, cut[0][1].step)):
            return None
        dim, s = cut[0]
        start, end, step = s.indices(shape[dim])
        if step <= 0:
            return None
        end = max(end, start)
        return self._make("slice", fx_node, [x], {"dim": dim, "start": start, "end": end, "step": step}, {})

    def _recognize_pad(self, fx_node: fx.Node) -> Value | None:
        try:
            bound = _signature(_sig_pad).bind(*fx_node.args, **fx_node.kwargs)
        except TypeError:
            return None
        bound.apply_defaults()
        a = bound.arguments
        return self._pad_node(fx_node, a["input"], a["pad"], a["mode"], a["value"])

    def _pad_node(self, fx_node: fx.Node, x, pad, mode, value) -> Value | None:
        """F.pad's last-axis-first list on a tensor of known rank, padding only spatial axes: a `pad`."""
        shape = _meta_shape(x)
        if shape is None or not isinstance(x, fx.Node) or not isinstance(pad, (list, tuple)) or len(pad) % 2 \
                or any(isinstance(p, fx.Node) or not isinstance(p, int) for p in pad) or isinstance(value, fx.Node):
            return None
        spatial = len(shape) - 2
        if len(pad) // 2 > spatial or mode not in ("constant", "reflect", "replicate") or any(p < 0 for p in pad):
            return None  # pads on the channel or batch axis, cropping, or circular: kept as a call
        pairs = [(0, 0)] * spatial
        for i in range(len(pad) // 2):
            pairs[spatial - 1 - i] = (pad[2 * i], pad[2 * i + 1])
        if isinstance(value, torch.Tensor):  # per-channel values (a border written in forward)
            fill = value
        else:
            fill = None if mode != "constant" or not value else torch.tensor(float(value), dtype=torch.float64)
        return self._make("pad", fx_node, [x], {"padding": tuple(pairs), "mode": mode}, {"value": fill})

    def _recognize_split(self, fx_node: fx.Node) -> Value | None:
        """torch.split / chunk whose pieces are only taken by constant getitems: one `split` node."""
        x = fx_node.args[0] if fx_node.args else None
        in_shape = _meta_shape(x)
        metas = fx_node.meta.get("tensor_meta")
        dim = fx_node.args[2] if len(fx_node.args) > 2 else fx_node.kwargs.get("dim", 0)
        if in_shape is None or not isinstance(metas, (tuple, list)) or len(metas) < 2 or not isinstance(dim, int):
            return None
        if any(isinstance(a, fx.Node) for a in list(fx_node.args[1:]) + list(fx_node.kwargs.values())):
            return None
        if not all(u.op == "call_function" and u.target is operator.getitem and isinstance(u.args[1], int)
                   for u in fx_node.users):
            return None
        dim %= len(in_shape)
        sizes = tuple(int(m.shape[dim]) for m in metas)
        if sum(sizes) != in_shape[dim]:
            return None
        node = Node("split", fx_node.name, attrs={"dim": dim, "sizes": sizes}, num_outputs=len(sizes))
        node.add_input(self.values[x])
        args, kwargs = self._template_without_inputs(node, fx_node)
        node.origin = FxOrigin(fx_node.op, fx_node.target, args, kwargs, fx_node.name)
        out = self._finish(node, fx_node)
        for value, meta in zip(node.outputs, metas):
            value.shape, value.dtype = tuple(meta.shape), meta.dtype
        self.splits[fx_node] = node
        return out

    def _split_piece(self, fx_node: fx.Node) -> Value | None:
        if fx_node.op == "call_function" and fx_node.target is operator.getitem and fx_node.args[0] in self.splits:
            outputs = self.splits[fx_node.args[0]].outputs
            return outputs[fx_node.args[1] % len(outputs)]
        return None

    def _recognize_flattening_view(self, fx_node: fx.Node) -> Value | None:
        """view / reshape that merges every axis from 1 (or 2) on, batch kept, or merges leading axes: a `flatten`."""
        x = fx_node.args[0] if fx_node.args else None
        in_shape, out_shape = _meta_shape(x), _meta_shape(fx_node)
        if in_shape is None or out_shape is None:
            return None
        spans = [(start, -1) for start in (1, 2)
                 if start < len(in_shape) - 1 and out_shape == in_shape[:start] + (math.prod(in_shape[start:]),)]
        # leading axes merged, the last ones kept: (B, N, C) -> (B * N, C) (LeViT's rows of tokens); only when
        # no merged axis is 1, where the call could as well be a squeeze whose result differs at other sizes
        spans += [(0, end) for end in range(1, len(in_shape) - 1)
                  if out_shape == (math.prod(in_shape[:end + 1]),) + in_shape[end + 1:] and min(in_shape[:end + 1]) > 1]
        for start, end in spans[:1]:
            node = Node("flatten", fx_node.name, attrs={"start_dim": start, "end_dim": end})
            node.add_input(self.values[x])
            # No origin: its shape arguments may be computed from sizes, which the IR does not carry,
            # and a literal channel count would break once channels are removed.
            return self._finish(node, fx_node)
        return None

    def _make(self, kind: str, fx_node: fx.Node, operands: list, attrs: dict, params: dict) -> Value:
        """Build a recognized node; non-tensor operands (Python numbers) become constant inputs."""
        node = Node(kind, fx_node.name, attrs=attrs, params=params)
        for operand in operands:
            if isinstance(operand, fx.Node):
                node.add_input(self.values[operand])
            else:
                # float64 keeps a Python float exact; a 0-d tensor does not promote a float32 operand.
                const = Node("constant", f"{fx_node.name}_scalar",
                             params={"value": torch.tensor(float(operand), dtype=torch.float64)})
                self.graph.append(const)
                node.add_input(const.output)
        if not any(arg in self.folded and all(v is not self.values[arg] for v in node.inputs)
                   for arg in fx_node.all_input_nodes):
            args, kwargs = self._template_without_inputs(node, fx_node)
            node.origin = FxOrigin(fx_node.op, fx_node.target, args, kwargs, fx_node.name)
        # else: a parameter computed in forward, folded: the call is written anew with the constant
        return self._finish(node, fx_node)

    def _template_without_inputs(self, node: Node, fx_node: fx.Node):
        """The fx call with each data operand replaced by In(i) and each get_attr by Attr(target)."""
        index = {id(v): i for i, v in enumerate(node.inputs)}

        def to_template(arg):
            if isinstance(arg, fx.Node):
                if arg.op == "get_attr" and id(self.values.get(arg)) not in index:
                    return Attr(arg.target)
                return In(index[id(self.values[arg])])
            return arg

        return fx.node.map_aggregate(fx_node.args, to_template), fx.node.map_aggregate(fx_node.kwargs, to_template)

    def _attr_tensor(self, arg) -> torch.Tensor | None:
        if isinstance(arg, fx.Node) and arg in self.folded:
            return self.folded[arg]
        if isinstance(arg, fx.Node) and arg.op == "get_attr":
            value = self._fetch_attr(arg.target)
            return value if isinstance(value, torch.Tensor) else None
        return None

    def _module_paths(self) -> dict[str, nn.Module]:
        # One walk of the module tree: a lookup per call walked its path (a sixth of the import)
        if self._modules is None:
            self._modules = dict(self.root.named_modules(remove_duplicate=False))
        return self._modules

    def _module(self, path: str) -> nn.Module:
        """root.get_submodule(path)."""
        module = self._module_paths().get(path)
        return module if module is not None else self.root.get_submodule(path)

    def _fetch_attr(self, target: str):
        """The root's attribute at the dotted path `target`."""
        parent, _, field = target.rpartition(".")
        owner = self._module_paths().get(parent)
        return getattr(owner, field) if owner is not None else _fetch_attr(self.root, target)

    @staticmethod
    def _set_meta(value: Value, fx_node: fx.Node) -> None:
        meta = fx_node.meta.get("tensor_meta")
        if meta is not None and hasattr(meta, "shape"):
            value.shape, value.dtype = tuple(meta.shape), meta.dtype


_PURE_FUNCTIONS = {getattr, operator.getitem, operator.eq, operator.ne, operator.lt, operator.le,
                   operator.gt, operator.ge, operator.floordiv, operator.truediv, operator.sub}
_PURE_METHODS = {"size", "dim", "view", "reshape", "permute", "transpose", "contiguous", "mean", "sigmoid",
                 "chunk", "split", "expand", "expand_as", "softmax", "squeeze", "unsqueeze", "t"}


def _assertion_only(fx_graph: fx.Graph) -> set[fx.Node]:
    """Traced shape checks (timm's `_assert(x.ndim == 4)`) and the pure calls that only feed them.

    The import drops the checks, so the calls feeding them would be built only to be erased as dead
    code: about one node in six of a timm model, skipped here instead.
    """
    skipped: set[fx.Node] = set()
    for node in reversed(fx_graph.nodes):
        if node.op == "call_function" and node.target is torch._assert:
            skipped.add(node)
        elif node.users and node.op != "get_attr" and _is_pure_call(node) and all(u in skipped for u in node.users):
            skipped.add(node)
    return skipped


def _is_pure_call(fx_node: fx.Node) -> bool:
    """Calls known to have no side effects, so an unused one may be dropped."""
    if pure_call(fx_node) or fx_node.target is pad_per_channel:
        return True
    if fx_node.op == "call_function":
        return _hashable(fx_node.target) and fx_node.target in _PURE_FUNCTIONS
    if fx_node.op == "call_method":
        return fx_node.target in _PURE_METHODS
    return fx_node.op == "get_attr"


# Calls whose result is >= 0 whatever their input (the range analysis reads the fact, not the target).
_NONNEG_FUNCTIONS = {torch.exp, torch.abs, torch.square, operator.abs, F.relu6}
_NONNEG_METHODS = {"exp", "abs", "square"}


def _is_nonnegative_call(fx_node: fx.Node) -> bool:
    if fx_node.op == "call_function":
        return _hashable(fx_node.target) and fx_node.target in _NONNEG_FUNCTIONS
    return fx_node.op == "call_method" and fx_node.target in _NONNEG_METHODS


def _meta_shape(node) -> tuple | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _opt_float(v):
    return None if v is None else float(v)


def _hashable(target) -> bool:
    try:
        hash(target)
        return True
    except TypeError:
        return False


def _fetch_attr(root: nn.Module, target: str):
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
