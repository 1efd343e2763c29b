"""IR -> torch.fx.GraphModule.

Untouched nodes are written back from their FxOrigin, so their modules keep their names, their
state_dict keys and their parameters. Rebuilt nodes become real modules (an nn.Conv2d with bias,
say) named after the module they replace, or plain torch calls for stateless ops.
"""
from __future__ import annotations

import copy
import operator
import re
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..errors import RewriteError
from ..ir import Graph, Node, Value, fresh_name
from ..params import pad_border
from . import chain
from .fx_forms import emit_call, function_form
from .fx_import import Attr, FxOrigin, In
from .fx_internals import add_node
from .fx_trace import MODULE_FIELDS
from .fx_graph import WeaklyOwnedGraph, check_attribute_names

_CONV_CLASSES = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONV_T_CLASSES = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}
_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_ADAPTIVE = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}


def _clone(obj: Any, memo: dict) -> Any:
    """A deep copy. A module with no children and no hooks (ReLU, pooling, a conv kept as it was) is cloned
    directly: same class, its own containers, parameters and buffers deep-copied through the shared memo
    (ties kept), other attributes deep-copied; copy.deepcopy's generic reduce path costs far more per module
    and dominated emission of long chains. A hooked module takes deepcopy, which rebinds a hook that is a
    method of the module to the copy."""
    if id(obj) in memo:
        return memo[id(obj)]  # a module installed at two paths stays one module, as in a deep copy
    if isinstance(obj, nn.Module) and not obj._modules and not _has_hooks(obj):
        clone = obj.__class__.__new__(obj.__class__)
        memo[id(obj)] = clone
        tensors = ("_parameters", "_buffers")
        # State containers (empty hook dicts, flags) are copied one level.
        clone.__dict__.update({k: type(v)((n, copy.deepcopy(t, memo)) for n, t in v.items()) if k in tensors
                               else v.copy() if isinstance(v, (dict, set)) else copy.deepcopy(v, memo)
                               for k, v in obj.__dict__.items()})
        return clone
    return copy.deepcopy(obj, memo)


def _has_hooks(module: nn.Module) -> bool:
    """Any hook on the module itself (a deep copy rebinds a hook that is a method of the module)."""
    return any(v for k, v in module.__dict__.items() if "hook" in k and isinstance(v, dict))


def _attach(parent: nn.Module, name: str, obj: Any) -> None:
    """setattr(parent, name, obj). A module goes straight into `parent._modules` when no other
    container holds the name and no global registration hook is set: what Module.__setattr__ ends in,
    without its checks (a fifth of writing back a ResNet went to them)."""
    if isinstance(obj, nn.Module) and not _registration_hooks(("module",)) and name not in parent.__dict__ \
            and name not in parent._parameters and name not in parent._buffers:
        parent._modules[name] = obj
    else:
        setattr(parent, name, obj)


def _registration_hooks(kinds=("module", "parameter", "buffer")) -> bool:
    """Any global hook on registering these kinds of attribute (it may replace what is registered)?"""
    from torch.nn.modules import module as module_impl

    return any(getattr(module_impl, f"_global_{kind}_registration_hooks", True) for kind in kinds)


class _Staging:
    """The module tree the GraphModule is built from: copies of what is used, plus new modules."""

    def __init__(self, root: nn.Module, copy_originals: bool):
        self.root = root
        self.tree = nn.Module()
        self.tree.training = root.training  # stand-ins for a path's parents take the mode of what they stand for
        self.copy_originals = copy_originals
        self.memo: dict[int, Any] = {}  # one deepcopy memo, so tied parameters stay tied
        self.taken: set[str] = set()
        self.placeholders: set[int] = set()  # ids of the empty modules standing in for a path's parents

    def reserve(self, path: str) -> None:
        parts = path.split(".")
        for i in range(1, len(parts) + 1):
            self.taken.add(".".join(parts[:i]))

    def install_original(self, path: str) -> None:
        """Put the root's attribute at `path` (a module or tensor) into the tree, copied if asked."""
        *prefix, field = path.split(".")
        src_parent = self.root
        dst_parent = self.tree
        for item in prefix:
            src_parent = getattr(src_parent, item)
            existing = getattr(dst_parent, item, None)
            if existing is None:
                existing = self._placeholder(src_parent)
                _attach(dst_parent, item, existing)
            dst_parent = existing
        present = dst_parent._modules.get(field)
        if present is not None and id(present) in self.placeholders:
            # The path was first reached as the parent of an attribute (`self.proj.weight.dtype` read
            # before `self.proj(x)`): the real module replaces its stand-in, keeping what was put there.
            self.placeholders.discard(id(present))
            setattr(dst_parent, field, self._with_entries_of(present, self._source(getattr(src_parent, field))))
            return
        if any(field in d for d in (dst_parent._modules, dst_parent._parameters, dst_parent._buffers,
                                    dst_parent.__dict__)):
            return  # already there (a module called twice, or an attribute of an installed module)
        obj = self._source(getattr(src_parent, field))
        if isinstance(obj, nn.Module) or isinstance(obj, nn.Parameter):
            _attach(dst_parent, field, obj)
        elif isinstance(obj, torch.Tensor):
            persistent = field not in getattr(src_parent, "_non_persistent_buffers_set", set())
            dst_parent.register_buffer(field, obj, persistent=persistent)
        else:
            setattr(dst_parent, field, obj)

    def _source(self, obj: Any) -> Any:
        return _clone(obj, self.memo) if self.copy_originals else obj

    def _placeholder(self, like: nn.Module) -> nn.Module:
        module = nn.Module()
        module.training = like.training
        self.placeholders.add(id(module))
        return module

    def _with_entries_of(self, placeholder: nn.Module, module: nn.Module) -> nn.Module:
        """`module`, plus anything installed in `placeholder` (and its stand-in children) that it lacks:
        new modules named under the path. A module of the caller's own (no copy asked) is
        shallow-copied first, never changed."""
        modules = {}
        for k, v in placeholder._modules.items():
            if k not in module._modules:
                modules[k] = v
            elif id(v) in self.placeholders and module._modules[k] is not None:
                merged = self._with_entries_of(v, module._modules[k])
                if merged is not module._modules[k]:
                    modules[k] = merged
        tensors = {k: v for k, v in {**placeholder._parameters, **placeholder._buffers}.items()
                   if not hasattr(module, k)}
        if not (modules or tensors):
            return module
        if not self.copy_originals:
            shallow = copy.copy(module)
            shallow._modules, shallow._parameters, shallow._buffers = (
                dict(module._modules), dict(module._parameters), dict(module._buffers))
            module = shallow
        module._modules.update(modules)
        for k, v in tensors.items():
            (module._parameters if isinstance(v, nn.Parameter) else module._buffers)[k] = v
        return module

    def install_new(self, base: str, obj: Any) -> str:
        """Install a new module or tensor under a free path derived from `base`."""
        base = re.sub(r"[^0-9A-Za-z_.]", "_", base).strip(".") or "fused"
        path = fresh_name(base, self.taken.__contains__)
        *prefix, field = path.split(".")
        parent, source = self.tree, self.root  # `source`: the model's module at the same path, if any
        for item in prefix:
            source = getattr(source, "_modules", {}).get(item)
            child = getattr(parent, item, None)
            if child is None:
                child = self._placeholder(source if isinstance(source, nn.Module) else parent)
                _attach(parent, item, child)
            parent = child
        if isinstance(obj, nn.Module) or isinstance(obj, nn.Parameter):
            _attach(parent, field, obj)
        else:
            parent.register_buffer(field, obj)
        self.reserve(path)
        return path


class FxEmitter:
    def __init__(self, graph: Graph, copy_originals: bool):
        self.graph = graph
        self.root: nn.Module = graph.meta["fx_root"]
        self.staging = _Staging(self.root, copy_originals)
        self.fx_graph = WeaklyOwnedGraph()  # no GraphModule <-> graph cycle: see fx_graph.py
        self.env: dict[int, fx.Node] = {}
        self.lazy: dict[int, Node] = {}
        self.attr_nodes: dict[str, fx.Node] = {}

    def fx_value(self, value: Value) -> fx.Node:
        key = id(value)
        if key not in self.env:
            node = self.lazy.pop(key)
            self.env[key] = _emit_constant(self, node, [])
        return self.env[key]

    def run(self) -> fx.GraphModule:
        graph = self.graph
        graph.topological_sort()
        for node in graph.nodes:  # what untouched nodes read keeps its path; new modules go elsewhere
            if _from_origin(node):
                for path in _original_paths(node.origin):
                    self.staging.reserve(path)
        for value, (target, default) in zip(graph.inputs, graph.meta["fx_placeholders"]):
            self.env[id(value)] = self.fx_graph.placeholder(target, default_value=default)
        for node in graph.nodes:
            if _from_origin(node):
                out = self._emit_origin(node)
            elif node.kind == "constant":
                self.lazy[id(node.output)] = node  # emitted on first use: an origin may hold it as a literal
                continue
            else:
                out = self._emit_canonical(node)
            if len(node.outputs) == 1:
                self.env[id(node.output)] = out
            else:
                for i, value in enumerate(node.outputs):
                    self.env[id(value)] = self.call(operator.getitem, out, i)
        template = graph.meta["fx_output"]
        self.fx_graph.output(fx.node.map_aggregate(
            template, lambda a: self.fx_value(graph.outputs[a.index]) if isinstance(a, In) else a))
        return _adopt(self.staging.tree, self.fx_graph, type(self.root).__name__)

    # Untouched nodes ---------------------------------------------------------------------
    def _emit_origin(self, node: Node) -> fx.Node:
        origin: FxOrigin = node.origin

        def resolve(a):
            if isinstance(a, In):
                return self.fx_value(node.inputs[a.index])
            if isinstance(a, Attr):
                return self._get_attr(a.target)
            return a

        args = fx.node.map_aggregate(origin.args, resolve)
        kwargs = fx.node.map_aggregate(origin.kwargs, resolve)
        if origin.op == "get_attr":
            return self._get_attr(origin.target)
        if origin.op == "call_module":
            self.staging.install_original(origin.target)
        return add_node(self.fx_graph, origin.op, origin.target, args, kwargs, name=origin.name)

    def _get_attr(self, target: str) -> fx.Node:
        if target not in self.attr_nodes:
            self.staging.install_original(target)
            self.attr_nodes[target] = add_node(self.fx_graph, "get_attr", target)
        return self.attr_nodes[target]

    # Rebuilt nodes -------------------------------------------------------------------------
    def _emit_canonical(self, node: Node) -> fx.Node:
        emitter = _EMITTERS.get(node.kind)
        if emitter is None and function_form(node.op) is None:
            what = "a changed opaque node" if node.kind == "opaque" else \
                f"a new '{node.kind}' node: its definition gives no fx function form (define_op(..., fx=[...]))"
            raise RewriteError(f"cannot write {what} back to torch.fx", where=f"node {node.name}")
        inputs = [self.fx_value(v) for v in node.inputs]
        return (emitter or emit_call)(self, node, inputs)

    def new_module(self, node: Node, module: nn.Module) -> str:
        module.eval()
        return self.staging.install_new(_base_path(node), module)

    def new_tensor(self, node: Node, suffix: str, tensor: torch.Tensor, parameter: bool = False) -> fx.Node:
        obj = nn.Parameter(tensor, requires_grad=tensor.is_floating_point()) if parameter else tensor
        path = self.staging.install_new(f"{_base_path(node)}_{suffix}", obj)
        return add_node(self.fx_graph, "get_attr", path)

    def call(self, fn: Callable, *args, **kwargs) -> fx.Node:
        return add_node(self.fx_graph, "call_function", fn, args, kwargs)

    def call_module(self, path: str, *args) -> fx.Node:
        return add_node(self.fx_graph, "call_module", path, args)


def _adopt(tree: nn.Module, graph: fx.Graph, class_name: str) -> fx.GraphModule:
    """A GraphModule running `graph` whose module tree is `tree` itself.

    fx.GraphModule(tree, graph) would copy every attribute a node names into a second tree of new
    empty modules (left in training mode whatever the model's mode): the staging tree already holds
    exactly those attributes, so the GraphModule is made over an empty graph and takes the tree's
    contents as they are."""
    # plain attributes a node names (a script object, say) sit in the tree's own __dict__
    plain = {k: v for k, v in tree.__dict__.items() if k not in MODULE_FIELDS}
    check_attribute_names((*tree._modules, *tree._parameters, *tree._buffers, *plain))
    if _registration_hooks():  # fx's copy registers each attribute through setattr, so such hooks see them
        gm = fx.GraphModule(tree, graph, class_name=class_name)
        gm.training = tree.training
        return gm
    empty = WeaklyOwnedGraph()
    empty.output(None)
    gm = fx.GraphModule(nn.Module(), empty, class_name=class_name)
    gm._modules.update(tree._modules)
    gm._parameters.update(tree._parameters)
    gm._buffers.update(tree._buffers)
    gm._non_persistent_buffers_set.update(tree._non_persistent_buffers_set)
    for k, v in plain.items():
        setattr(gm, k, v)
    gm.training = tree.training
    gm.graph = graph  # generates and compiles forward
    return gm


def _original_paths(origin: FxOrigin) -> list[str]:
    """The root's attributes an untouched node reads: its module or attribute, and those its arguments
    get (F.conv2d(x, self.c.weight): a conv folded in place of `c` must not take `c.weight`'s path)."""
    paths = [origin.target] if origin.op in ("call_module", "get_attr") else []
    for args in (origin.args, origin.kwargs):
        fx.node.map_aggregate(args, lambda a: paths.append(a.target) if isinstance(a, Attr) else None)
    return paths


def _from_origin(node: Node) -> bool:
    return isinstance(node.origin, FxOrigin) and node.untouched


def _base_path(node: Node) -> str:
    """Where a rebuilt node's module goes: after the module it replaces, or its new name if renamed."""
    return node.name if node.renamed else (node.scope or node.name)


def _symmetric(pads) -> bool:
    return all(a == b for a, b in pads)


def _torch_pad(pads) -> list[int]:
    """(before, after) pairs per spatial dim -> F.pad's last-dim-first list."""
    out: list[int] = []
    for before, after in reversed(pads):
        out += [before, after]
    return out


_TEMPLATES: dict[type, tuple[dict, tuple[str, ...]]] = {}  # class -> (a built instance's fields, its containers)


def _blank(cls: type, **attrs) -> nn.Module:
    """A new module of `cls` with the given attributes, without running its weight initialisation.

    Building a conv runs a kaiming init we throw away at once; on large models that was most of the
    emission time. A blank is a fresh instance sharing no container with the cached template.
    """
    template = _TEMPLATES.get(cls)
    if template is None:
        module = cls(1, 1, 1) if cls is not nn.Linear else cls(1, 1)
        containers = tuple(k for k, v in module.__dict__.items() if isinstance(v, (dict, set)))
        template = _TEMPLATES[cls] = (module.__dict__, containers)
    fields, containers = template
    module = cls.__new__(cls)
    module.__dict__.update(fields)
    for key in containers:  # a module's own dicts and sets (hooks, buffers, ...), never the template's
        module.__dict__[key] = fields[key].copy()
    module._parameters = {}
    module.__dict__.update(attrs)  # plain attributes (ints, tuples, strings): no Module bookkeeping needed
    return module


def _conv_module(cls: type, weight: torch.Tensor, bias: torch.Tensor | None, in_channels: int, out_channels: int,
                 **attrs) -> nn.Module:
    kernel = tuple(weight.shape[2:])
    module = _blank(cls, in_channels=in_channels, out_channels=out_channels, kernel_size=kernel, **attrs)
    # What _ConvNd.__init__ derives for padding modes other than zeros.
    module._reversed_padding_repeated_twice = [p for p in reversed(module.padding) for _ in range(2)]
    _set_weights(module, weight, bias)
    return module


def _emit_conv(e: FxEmitter, node: Node, inputs):
    weight, bias = node.params["weight"], node.params.get("bias")
    a = node.attrs
    dims = weight.dim() - 2
    x = inputs[0]
    pads = a["padding"]
    mode = a.get("padding_mode", "zeros")
    if not _symmetric(pads):
        x = e.call(F.pad, x, _torch_pad(pads), mode="constant" if mode == "zeros" else mode)
        pads, mode = ((0, 0),) * dims, "zeros"
    groups = a["groups"]
    conv = _conv_module(_CONV_CLASSES[dims], weight, bias, weight.shape[1] * groups, weight.shape[0],
                        stride=tuple(a["stride"]), padding=tuple(p[0] for p in pads), dilation=tuple(a["dilation"]),
                        groups=groups, padding_mode=mode, transposed=False, output_padding=(0,) * dims)
    return e.call_module(e.new_module(node, conv), x)


def _set_weights(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    # Straight into the blank's own parameter dict: what Module.__setattr__ ends in, without its
    # search of every other container for a name that a blank cannot hold.
    module._parameters["weight"] = nn.Parameter(weight.detach())
    module._parameters["bias"] = nn.Parameter(bias.detach()) if bias is not None else None


def _emit_conv_transpose(e: FxEmitter, node: Node, inputs):
    weight, bias = node.params["weight"], node.params.get("bias")
    a = node.attrs
    dims = weight.dim() - 2
    if not _symmetric(a["padding"]):
        raise RewriteError("asymmetric conv_transpose padding has no torch module form", where=f"node {node.name}")
    groups = a["groups"]
    conv = _conv_module(_CONV_T_CLASSES[dims], weight, bias, weight.shape[0], weight.shape[1] * groups,
                        stride=tuple(a["stride"]), padding=tuple(p[0] for p in a["padding"]),
                        output_padding=tuple(a["output_padding"]), groups=groups, dilation=tuple(a["dilation"]),
                        padding_mode="zeros", transposed=True)
    return e.call_module(e.new_module(node, conv), inputs[0])


def _emit_linear(e: FxEmitter, node: Node, inputs):
    weight, bias = node.params["weight"], node.params.get("bias")
    linear = _blank(nn.Linear, in_features=weight.shape[1], out_features=weight.shape[0])
    _set_weights(linear, weight, bias)
    return e.call_module(e.new_module(node, linear), inputs[0])


_BN_CLASSES = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


def _emit_batch_norm(e: FxEmitter, node: Node, inputs):
    """A real BatchNorm module when the input rank is known (state_dict and parameter counts as
    usual); otherwise F.batch_norm over the same tensors, gamma and beta still as parameters."""
    p, a = node.params, node.attrs
    shape = node.inputs[0].shape
    cls = _BN_CLASSES.get(len(shape)) if shape is not None else None
    if cls is not None and p["running_mean"] is not None:
        affine = p.get("weight") is not None and p.get("bias") is not None
        bn = cls(p["running_mean"].numel(), eps=a["eps"], momentum=a.get("momentum"), affine=affine,
                 device="meta")
        bn.running_mean = p["running_mean"].detach()
        bn.running_var = p["running_var"].detach()
        bn.num_batches_tracked = torch.tensor(0, dtype=torch.long, device=p["running_mean"].device)
        if affine:
            bn.weight, bn.bias = nn.Parameter(p["weight"].detach()), nn.Parameter(p["bias"].detach())
        bn.train(bool(a["training"]))
        return e.call_module(e.staging.install_new(_base_path(node), bn), inputs[0])
    tensors = {k: (e.new_tensor(node, k, t.detach(), parameter=k in ("weight", "bias")) if t is not None else None)
               for k, t in p.items()}
    return e.call(F.batch_norm, inputs[0], tensors["running_mean"], tensors["running_var"],
                  weight=tensors.get("weight"), bias=tensors.get("bias"), training=a["training"],
                  momentum=a.get("momentum") or 0.0, eps=a["eps"])


def _emit_chain(fn):
    def emit(e: FxEmitter, node: Node, inputs):
        return chain(inputs, lambda acc, other, last: e.call(fn, acc, other))
    return emit


def _emit_clamp(e: FxEmitter, node: Node, inputs):
    def bound(key):  # a 0-d bound is written as a Python number: it never changes the result's dtype
        t = node.params.get(key)
        if t is None or t.dim() == 0:
            return None if t is None else t.item()
        return e.new_tensor(node, key, t)

    return e.call(torch.clamp, inputs[0], bound("min"), bound("max"))


def _emit_pool(table, *keys):
    def emit(e: FxEmitter, node: Node, inputs):
        a = node.attrs
        if not _symmetric(a["padding"]):
            raise RewriteError("asymmetric pooling padding has no torch form", where=f"node {node.name}")
        dims = len(a["kernel_size"])
        extra = {k: a[k] for k in keys if k in a}
        return e.call(table[dims], inputs[0], a["kernel_size"], a["stride"], tuple(p[0] for p in a["padding"]),
                      **extra)
    return emit


def _emit_constant(e: FxEmitter, node: Node, inputs):
    return e.new_tensor(node, "const", node.params["value"].detach())


def _emit_pad(e: FxEmitter, node: Node, inputs):
    mode, fill = node.attrs["mode"], node.params.get("value")
    flat = _torch_pad(node.attrs["padding"])
    if fill is None or fill.dim() == 0 or mode != "constant":
        extra = {"value": 0.0 if fill is None else fill.item()} if mode == "constant" else {}
        return e.call(F.pad, inputs[0], flat, mode=mode, **extra)
    try:
        border = pad_border(node).to(node.inputs[0].dtype or torch.float32)
    except ValueError as exc:
        raise RewriteError(str(exc), where=f"node {node.name}") from None
    return e.call(operator.add, e.call(F.pad, inputs[0], flat), e.new_tensor(node, "border", border))


def _emit_slice(e: FxEmitter, node: Node, inputs):
    a = node.attrs
    index = (slice(None),) * a["dim"] + (slice(a["start"], a["end"], a["step"]),)
    return e.call(operator.getitem, inputs[0], index)


def _emit_dropout(e: FxEmitter, node: Node, inputs):
    if node.attrs.get("training"):
        return e.call(F.dropout, inputs[0], node.attrs["p"], True)
    return inputs[0]


_EMITTERS: dict[str, Callable] = {
    "conv": _emit_conv,
    "conv_transpose": _emit_conv_transpose,
    "linear": _emit_linear,
    "batch_norm": _emit_batch_norm,
    "add": _emit_chain(operator.add),
    "mul": _emit_chain(operator.mul),
    "sub": lambda e, n, i: e.call(operator.sub, i[0], i[1]),
    "relu": lambda e, n, i: e.call(torch.relu, i[0]),
    "clamp": _emit_clamp,
    "identity": lambda e, n, i: i[0],
    "dropout": _emit_dropout,
    "avg_pool": _emit_pool(_AVG_POOL, "ceil_mode", "count_include_pad", "divisor_override"),
    "max_pool": _emit_pool(_MAX_POOL, "dilation", "ceil_mode"),
    "adaptive_avg_pool": lambda e, n, i: e.call(_ADAPTIVE[len(n.attrs["output_size"])], i[0], n.attrs["output_size"]),
    "concat": lambda e, n, i: e.call(torch.cat, list(i), dim=n.attrs["dim"]),
    "split": lambda e, n, i: e.call(torch.split, i[0], list(n.attrs["sizes"]), dim=n.attrs["dim"]),
    "flatten": lambda e, n, i: e.call(torch.flatten, i[0], n.attrs["start_dim"], n.attrs["end_dim"]),
    "reshape": lambda e, n, i: e.call(torch.reshape, i[0], tuple(n.attrs["shape"])),
    "constant": _emit_constant,
    "pad": _emit_pad,
    "slice": _emit_slice,
}


def emit_graph_module(graph: Graph, copy_originals: bool = True) -> fx.GraphModule:
    return FxEmitter(graph, copy_originals).run()
