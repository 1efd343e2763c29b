"""ONNX (through onnx-graphsurgeon) -> IR.

Standard ops are mapped to canonical kinds only where the mapping is exact; anything else
becomes an `opaque` node. Every IR node keeps an `OnnxOrigin`: the original NodeProto and how
its input slots map to IR inputs or to the original constant tensors, plus a snapshot of its
kind, attributes and parameters. The backend writes a node back verbatim from its origin while
that snapshot still holds, and rebuilds it from the canonical form otherwise.

Initializers, Constant nodes and Identity(constant) chains all become `constant` nodes, so
rules see a constant whichever form the exporter chose.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch

from ..errors import ModelLoadError
from ..ir import Graph, Node, Value, clamp_bound
from . import onnx_weights, onnx_fold, onnx_forms
from .onnx_arrays import to_numpy, to_torch, torch_type_of
from .onnx_checks import check_batch_norm_params, check_conv_channels, node_subgraphs


@dataclass(frozen=True)
class In:
    """Input slot written from the IR node's input number `index`."""
    index: int


@dataclass(frozen=True)
class Orig:
    """Input slot written from the original tensor (an initializer, or a constant node's output)."""
    tensor: Any  # gs.Constant or gs.Variable
    producer: "OnnxOrigin | None" = None  # the constant-making node behind a Variable


EMPTY = Orig(None)  # an omitted optional input


@dataclass(frozen=True)
class Unmapped:
    """A handler's answer for a node it keeps as it is, with the reason (reports of the sites next to it
    quote it: a BN after a conv kept opaque is left for that reason, not for a generic one)."""
    reason: str


@dataclass(eq=False)
class OnnxOrigin:
    proto: onnx.NodeProto | None  # None for an initializer
    gs_node: Any  # gs.Node, or the gs.Constant of an initializer
    slots: list  # per original input: In / Orig / EMPTY
    output_names: list[str]
    pinned: dict = field(default_factory=dict)  # IR input index -> Value that must still be there
    captures: list = field(default_factory=list)  # (outer tensor name, IR input index) read by subgraphs
    folded: bool = False  # a node folded into a constant at import (see onnx_fold)

    @property
    def is_initializer(self) -> bool:
        return self.proto is None


def record(node: Node, origin: OnnxOrigin) -> None:
    """Give `node` its ONNX original and snapshot it (see Node.untouched)."""
    node.origin = origin
    node.mark_imported()


def untouched(node: Node) -> bool:
    """Can `node` be written back from its origin? The IR's one decision, plus this frontend's pinned
    inputs: constant inputs written from the original tensors must still be the values they were."""
    o = node.origin
    return isinstance(o, OnnxOrigin) and node.untouched and all(node.inputs[i] is v for i, v in o.pinned.items())


# -- dtype helpers -------------------------------------------------------------------------------
def torch_dtype(dtype) -> torch.dtype | None:
    if dtype is None:
        return None
    try:
        if isinstance(dtype, int):
            dtype = onnx.helper.tensor_dtype_to_np_dtype(dtype)
    except (TypeError, KeyError, ValueError):
        return None
    return torch_type_of(dtype)


def overridable_initializers(model: onnx.ModelProto) -> list[str]:
    """Initializers also listed as graph inputs, from IR 4 on: each is only the default of an input the
    caller may feed (onnxruntime does not fold them either), so not a constant. IR 3 lists every
    initializer as an input and means them as constants."""
    if model.ir_version < 4 or not len(model.graph.input):
        return []
    names = {t.name for t in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name in names]


def subgraph_captures(proto: onnx.NodeProto) -> list[str]:
    """Outer-scope tensor names the node's subgraphs read (If/Loop/Scan bodies), in first-use order."""
    found: dict[str, None] = {}

    def walk(graph: onnx.GraphProto, outer_defined: set[str]) -> None:
        defined = set(outer_defined)
        defined.update(i.name for i in graph.input)
        defined.update(i.name for i in graph.initializer)
        defined.update(i.values.name for i in graph.sparse_initializer)
        for node in graph.node:
            for name in node.input:
                if name and name not in defined:
                    found.setdefault(name, None)
            for sub in node_subgraphs(node):
                walk(sub, defined)
            defined.update(node.output)

    for sub in node_subgraphs(proto):
        walk(sub, set())
    del walk  # it refers to itself through its closure: a cycle left for the collector
    return list(found)


class OnnxImporter:
    """Builds the IR of one ModelProto."""

    def __init__(self, model: onnx.ModelProto, inferred: onnx.ModelProto, source: str, fold_constants: bool = False,
                 weights: onnx_weights.ExternalData | None = None):
        self.model = model
        self.weights = weights  # reads the initializers kept in external data (see onnx_weights)
        self.fold_constants = fold_constants  # write folded nodes as initializers, not as they were
        self.folded = 0  # nodes folded into constants
        self.source = source
        self.gs_graph = gs.import_onnx(model)
        onnx_weights.read_external_through(self.gs_graph, weights)
        _add_inferred_types(self.gs_graph, inferred)
        self.graph = Graph()
        self.env: dict[str, Value] = {}
        self.init_values: dict[str, torch.Tensor] = {}
        self.opset = default_opset(model)
        # gs imports nodes in file order, so node i is the original model's node i.
        self.protos = list(model.graph.node)
        self._initializers: dict | None = None
        self.overridable = overridable_initializers(model)  # graph inputs with a default: not constants
        self.forms = onnx_forms.onnx_index()  # op types of the ops defined with one (user ops included)

    def run(self) -> Graph:
        if len(self.gs_graph.nodes) != len(self.protos):
            raise ModelLoadError("onnx-graphsurgeon read a different number of nodes than the file holds",
                                 where=self.source)
        for tensor in self._graph_inputs():
            value = self.graph.add_input(tensor.name, shape=_shape(tensor), dtype=torch_dtype(tensor.dtype))
            value.name = tensor.name
            self.env[tensor.name] = value
        for gs_node, proto in zip(self.gs_graph.nodes, self.protos):
            self._import(gs_node, proto)
        outputs = []
        for tensor in self.gs_graph.outputs:
            outputs.append(self.value_of(tensor, f"graph output {tensor.name!r}"))
        self.graph.outputs = outputs
        self._drop_unread_folds()
        self.graph.meta.update(frontend="onnx", onnx_model=self.model, onnx_opset=self.opset,
                               onnx_input_defaults=self._input_defaults(),
                               onnx_output_names=[t.name for t in self.gs_graph.outputs],
                               onnx_source=self.source, onnx_folded=self.folded, onnx_weights=self.weights)
        return self.graph

    def _graph_inputs(self) -> list:
        """gs's graph inputs, and the initializers that are inputs too (see overridable_initializers), in
        the file's order."""
        if not self.overridable:
            return list(self.gs_graph.inputs)
        tensors, defaults = self.gs_graph.tensors(), self._input_defaults()
        return [tensors[i.name] if i.name in tensors else defaults[i.name] for i in self.model.graph.input
                if i.name in tensors or i.name in defaults]

    def _input_defaults(self) -> dict:
        """The initializers that are inputs too, as gs tensors; gs lists none that no node reads, so those
        are made from the file's own initializer (the input stays, so does its default)."""
        tensors = self.gs_graph.tensors() if self.overridable else {}
        protos = self._initializer_protos() if self.overridable else {}
        return {name: tensors[name] if name in tensors
                else gs.Constant(name, onnx_weights.lazy_values(protos[name], self.weights)) for name in self.overridable}

    def _drop_unread_folds(self) -> None:
        """Folded constants read only as parameters are not nodes of the model (they are written back
        from their readers' origins when needed), so `cleanup` does not count them as dead code."""
        for node in list(self.graph.nodes):
            if (node.kind == "constant" and isinstance(node.origin, OnnxOrigin) and node.origin.folded
                    and self.graph.external_uses(node.output) == 0):
                self.graph.erase(node)

    # -- values ---------------------------------------------------------------------------
    def value_of(self, tensor, where: str) -> Value:
        """The IR value of an input tensor; an initializer becomes a constant node when first read as data."""
        value = self.env.get(tensor.name)
        if value is not None:
            return value
        if isinstance(tensor, gs.Constant):
            array = self.initializer(tensor)
            if array is None:  # no torch form (strings, int4): written back as it is, read by nothing here
                node = Node("opaque", tensor.name, attrs={"op_type": "initializer", "domain": "", "pure": True,
                                                          "call": f"initializer {tensor.name}", "nonnegative": False})
            else:
                node = Node("constant", tensor.name, params={"value": array})
            record(node, OnnxOrigin(None, tensor, [], [tensor.name]))
            self.graph.append(node)
            node.output.name = tensor.name
            node.output.shape, node.output.dtype = _shape(tensor), torch_dtype(tensor.dtype)
            self.env[tensor.name] = node.output
            return node.output
        raise ModelLoadError(f"input {tensor.name!r} is neither a graph input, an initializer nor a node output",
                             where=f"{self.source}, {where}")

    def initializer(self, tensor) -> torch.Tensor | None:
        """One torch tensor per initializer, so every reader of a shared initializer holds the same object;
        None for one of a type torch does not have (see onnx_arrays)."""
        if tensor.name not in self.init_values:
            proto = self._initializer_protos().get(tensor.name)
            try:
                # From the TensorProto itself: gs's `tensor.values` would keep a second copy cached in the gs graph.
                value = to_torch(tensor.values) if proto is None else self._read(proto)
            except TypeError:
                value = None
            self.init_values[tensor.name] = value
        return self.init_values[tensor.name]

    def _initializer_protos(self) -> dict:
        if self._initializers is None:
            self._initializers = {t.name: t for t in self.model.graph.initializer}
        return self._initializers

    def constant_of(self, tensor) -> torch.Tensor | None:
        """The tensor's value if it is a constant (initializer, Constant node, Identity of one)."""
        if isinstance(tensor, gs.Constant) and tensor.name not in self.env:  # env: an input with a default
            return self.initializer(tensor)
        value = self.env.get(tensor.name)
        if value is not None and value.producer is not None and value.producer.kind == "constant":
            return value.producer.params["value"]
        return None

    def why_not_constant(self, tensor, what: str) -> str:
        """Why a handler keeps a node whose `what` is `tensor` and not a constant (quoted by the reports)."""
        if tensor.name in self.overridable:
            return (f"its {what} {tensor.name!r} is an initializer listed as a graph input too, so only the default "
                    "of an input the caller may feed (IR 4 and later), not a constant")
        if tensor.name in self.init_values and self.init_values[tensor.name] is None:
            return f"its {what} {tensor.name!r} is of type {tensor.dtype}, which torch has no type for"
        value = self.env.get(tensor.name)
        if value is not None and value.producer is None:
            return f"its {what} {tensor.name!r} is a graph input, not a constant"
        maker = value.producer.label if value is not None and value.producer is not None else "?"
        return f"its {what} {tensor.name!r} is computed (by {maker}), not a constant"

    def outer_initializer(self, name: str):
        """An initializer of the main graph read only inside subgraphs (gs does not list it)."""
        proto = self._initializer_protos().get(name)
        if proto is None:
            return None
        return gs.Constant(name, to_numpy(self._read(proto)))

    def _read(self, proto: onnx.TensorProto) -> torch.Tensor:
        """An initializer's values in a tensor of their own; external data is read once, into it."""
        if self.weights is not None and proto.data_location == onnx.TensorProto.EXTERNAL:
            return to_torch(self.weights.array(proto), copy=False)
        return to_torch(onnx.numpy_helper.to_array(proto))  # a copy: to_array may view the proto's bytes

    def orig(self, tensor) -> Orig:
        """How an untouched node writes this input back: the original tensor, with its maker."""
        if tensor is None or tensor.name == "":
            return EMPTY
        value = self.env.get(tensor.name)
        producer = value.producer if value is not None else None
        return Orig(tensor, producer.origin if producer is not None and not isinstance(tensor, gs.Constant) else None)

    # -- nodes ----------------------------------------------------------------------------
    def _import(self, gs_node, proto: onnx.NodeProto) -> None:
        where = f"node {proto.name or proto.op_type}"
        for tensor in gs_node.inputs:
            if tensor.name and not isinstance(tensor, gs.Constant) and tensor.name not in self.env:
                raise ModelLoadError(f"input {tensor.name!r} is neither a graph input, an initializer nor the "
                                     "output of an earlier node", where=f"{self.source}, {where}")
        handler = None
        if (proto.domain or "") in ("", "ai.onnx"):
            handler = HANDLERS.get(gs_node.op) or onnx_forms.HANDLERS.get(gs_node.op)
            if handler is None and gs_node.op in self.forms:
                handler = onnx_forms.generic_handler(self.forms[gs_node.op])
        node = self._fold(gs_node, proto) if onnx_fold.foldable(proto) else None
        unmapped = None  # why a handler kept the node as it is, when it says
        if node is None:
            node = handler(self, gs_node, proto) if handler is not None else None
        if isinstance(node, Unmapped):
            node, unmapped = None, node.reason
        if node is None:
            node = self._opaque(gs_node, proto, unmapped)
        for value, tensor in zip(node.outputs, gs_node.outputs):
            value.name = tensor.name
            if value.shape is None:
                value.shape, value.dtype = _shape(tensor), torch_dtype(tensor.dtype)
            if tensor.name:
                self.env[tensor.name] = value

    def _array_of(self, tensor) -> np.ndarray | None:
        value = self.constant_of(tensor)
        if value is None:
            return None
        try:
            return value.numpy()
        except TypeError:  # bfloat16 and kin have no numpy form
            return None

    def _fold(self, gs_node, proto) -> Node | None:
        """The node as a constant when its value does not depend on the graph's inputs (see onnx_fold)."""
        tensors = list(gs_node.inputs)
        if proto.op_type in ("Shape", "Size") and self.constant_of(tensors[0]) is None:
            value = onnx_fold.static_shape_value(proto, _shape(tensors[0]))
            return None if value is None else self._folded_value(gs_node, proto, value, as_initializer=True)
        like = proto.op_type == "CastLike" and len(tensors) == 2 and self.constant_of(tensors[1]) is None
        if like:  # CastLike reads only the type of its second input
            if tensors[1].dtype is None:
                return None
        arrays = []
        for i, tensor in enumerate(tensors):
            if not tensor.name:
                arrays.append(None)
            elif like and i == 1:
                arrays.append(np.empty(0, dtype=np.dtype(tensors[1].dtype)))
            else:
                array = self._array_of(tensor)
                if array is None:
                    return None
                arrays.append(array)
        out = gs_node.outputs[0]
        if onnx_fold.too_big(_shape(out), np.dtype(out.dtype).itemsize if out.dtype is not None else 1, arrays):
            return None  # known before running it from the inferred shape
        value = onnx_fold.evaluate(proto, arrays, self.opset)
        if value is None:
            return None
        return self._folded_value(gs_node, proto, value, as_initializer=like or self.fold_constants)

    def _folded_value(self, gs_node, proto, array: np.ndarray, as_initializer: bool) -> Node | None:
        """A constant node for a folded node: written back as the original node (its constant inputs
        with it) while no rewrite consumes it, or as an initializer of its value when `as_initializer`
        (a node that also reads a non-constant, like Shape(x), has nothing else to be written from)."""
        try:
            value = onnx_fold.as_tensor(array)
        except TypeError:  # a numpy type torch does not have
            return None
        self.folded += 1
        name = gs_node.outputs[0].name
        if not as_initializer:
            node = self.make("constant", gs_node, proto, [], [self.orig(t) for t in gs_node.inputs],
                             params={"value": value})
            node.origin.folded = True
            return node
        node = Node("constant", name, params={"value": value})
        record(node, OnnxOrigin(None, gs.Constant(name, array), [], [name], folded=True))
        self.graph.append(node)
        return node

    def make(self, kind: str, gs_node, proto, inputs: list[Value], slots: list, attrs: dict | None = None,
             params: dict | None = None, pinned: dict | None = None, num_outputs: int = 1) -> Node:
        node = Node(kind, proto.name or f"{proto.op_type}_{len(self.graph)}", inputs, attrs, params, num_outputs)
        node.scope = proto.name or None
        origin = OnnxOrigin(proto, gs_node, slots, [t.name for t in gs_node.outputs], pinned=pinned or {})
        self.graph.append(node)
        record(node, origin)
        return node

    def _opaque(self, gs_node, proto, unmapped: str | None = None) -> Node:
        inputs, slots = [], []
        for tensor in gs_node.inputs:
            if tensor.name:
                slots.append(In(len(inputs)))
                inputs.append(self.value_of(tensor, f"node {proto.name}"))
            else:
                slots.append(EMPTY)
        captures = []
        for name in subgraph_captures(proto):
            value = self.env.get(name)
            if value is None:
                tensor = self.outer_initializer(name)
                if tensor is None:
                    raise ModelLoadError(f"a subgraph reads {name!r}, which the outer graph does not define",
                                         where=f"{self.source}, node {proto.name or proto.op_type}")
                value = self.value_of(tensor, f"node {proto.name}")
            captures.append((name, len(inputs)))
            inputs.append(value)
        # Standard ops have no side effects, so an unused one may go; custom-domain ops stay.
        pure = (proto.domain or "") in ("", "ai.onnx") and not captures
        call = f"{proto.domain}.{proto.op_type}" if proto.domain else proto.op_type
        attrs = {"op_type": proto.op_type, "domain": proto.domain, "pure": pure, "call": call,
                 "nonnegative": call in _NONNEG_OP_TYPES, "is_batch_norm": call == "BatchNormalization"}
        if unmapped:
            attrs["unmapped"] = unmapped  # read by the reports of the sites next to it
        node = self.make("opaque", gs_node, proto, inputs, slots, attrs, num_outputs=len(gs_node.outputs))
        node.origin.captures = captures
        return node


# Standard ops whose result is >= 0 whatever their input (read by the range analysis as a fact).
_NONNEG_OP_TYPES = frozenset({"Exp", "Abs", "Softmax", "Sqrt", "Softplus", "Sigmoid", "Relu"})


def _add_inferred_types(gs_graph, inferred: onnx.ModelProto) -> None:
    """Give gs Variables without a declared type the inferred one (the inferred model has no weights)."""
    infos = {v.name: v for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    for tensor in gs_graph.tensors().values():
        info = infos.get(tensor.name)
        if info is None or not isinstance(tensor, gs.Variable) or tensor.shape is not None:
            continue
        tensor_type = info.type.tensor_type
        if not tensor_type.HasField("shape"):
            continue
        tensor.shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor_type.shape.dim]
        if tensor.dtype is None and tensor_type.elem_type:
            tensor.dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)


def default_opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    return 1


def _shape(tensor) -> tuple | None:
    shape = getattr(tensor, "shape", None)
    if shape is None:
        return None
    return tuple(d if isinstance(d, int) else (d if isinstance(d, str) and d else None) for d in shape)


# -- op handlers: return an IR node when the mapping is exact, None to keep the node opaque -------------
def _data(imp: OnnxImporter, tensor) -> Value:
    return imp.value_of(tensor, "")


def _input(gs_node, i: int):
    return gs_node.inputs[i] if len(gs_node.inputs) > i and gs_node.inputs[i].name else None


def _pairs(pads: list[int], dims: int, where: str = "") -> tuple:
    if len(pads) != 2 * dims:
        raise ModelLoadError(f"pads has {len(pads)} values; a {dims}-D window needs {2 * dims} "
                             "(a begin and an end per spatial axis)", where=where)
    return tuple((int(pads[i]), int(pads[i + dims])) for i in range(dims))


def _auto_pad(gs_node) -> str:
    auto = gs_node.attrs.get("auto_pad", "NOTSET")
    return (auto.decode() if isinstance(auto, bytes) else auto) or "NOTSET"


def _fixed_pads(gs_node, stride, dilation, dims: int, where: str) -> tuple | None:
    """(before, after) pads per spatial dim for auto_pad NOTSET / VALID; None for SAME_UPPER / SAME_LOWER,
    whose pads the caller derives. Attributes of the wrong length or an unknown auto_pad are bad input."""
    for name, values in (("strides", stride), ("dilations", dilation)):
        if len(values) != dims:
            raise ModelLoadError(f"{name} has {len(values)} values for a {dims}-D window", where=where)
    auto = _auto_pad(gs_node)
    if auto == "NOTSET":
        return _pairs(gs_node.attrs.get("pads", [0] * 2 * dims), dims, where)
    if auto == "VALID":
        return ((0, 0),) * dims
    if auto not in ("SAME_UPPER", "SAME_LOWER"):
        raise ModelLoadError(f"auto_pad {auto!r} is not one of NOTSET, VALID, SAME_UPPER, SAME_LOWER", where=where)
    return None


def _same_split(total: int, auto: str) -> tuple[int, int]:
    """SAME_UPPER puts the odd pad at the end, SAME_LOWER at the start."""
    small, big = total // 2, total - total // 2
    return (small, big) if auto == "SAME_UPPER" else (big, small)


def _spatial_pads(imp, gs_node, kernel, stride, dilation) -> tuple | Unmapped:
    """(before, after) pads per spatial dim, auto_pad resolved: VALID is none, SAME_* is exact for any
    size along a stride-1 axis or with a one-tap window, and needs a static size along a strided one
    (else Unmapped: kept as it is)."""
    dims = len(kernel)
    fixed = _fixed_pads(gs_node, stride, dilation, dims, f"{imp.source}, node {gs_node.name or gs_node.op}")
    if fixed is not None:
        return fixed
    auto = _auto_pad(gs_node)
    shape = _data(imp, gs_node.inputs[0]).shape
    if shape is not None and len(shape) != dims + 2:
        return Unmapped(f"its input has rank {len(shape)}, not the {dims + 2} of a {dims}-D window")
    pads = []
    for axis, (k, s, d) in enumerate(zip(kernel, stride, dilation)):
        size = shape[2 + axis] if shape is not None else None
        if s == 1:
            total = (k - 1) * d  # the output is as long as the input, whatever its size
        elif isinstance(size, int):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
        elif (k - 1) * d == 0:
            total = 0  # ceil(size / s) * s - size < s: a one-tap window never pads, whatever the size
        else:
            named = f"of symbolic size {size!r}" if size is not None else "of unknown size"
            return Unmapped(f"auto_pad={auto} with stride {s} along spatial axis {axis} {named}: its padding "
                            f"depends on that size modulo {s}, so it has no one explicit form (pass example_inputs "
                            "to fix the size)")
        pads.append(_same_split(total, auto))
    return tuple(pads)


def _transpose_pads(gs_node, kernel, stride, dilation, output_padding, where: str) -> tuple | Unmapped:
    """ConvTranspose's (before, after) crop per spatial dim. SAME makes the output input * stride long, so
    the crop is output_padding + (k - 1) * d + 1 - s whatever the input size, split as Conv splits it."""
    if "output_shape" in gs_node.attrs:
        return Unmapped("output_shape derives its padding from the input's size; only explicit pads and "
                        "auto_pad are mapped")
    if len(output_padding) != len(kernel):
        raise ModelLoadError(f"output_padding has {len(output_padding)} values for a {len(kernel)}-D window",
                             where=where)
    fixed = _fixed_pads(gs_node, stride, dilation, len(kernel), where)
    if fixed is not None:
        return fixed
    auto = _auto_pad(gs_node)
    pads = []
    for axis, (k, s, d, extra) in enumerate(zip(kernel, stride, dilation, output_padding)):
        total = extra + (k - 1) * d + 1 - s
        if total < 0:  # the output would be longer than the full transposed conv
            return Unmapped(f"auto_pad={auto} with stride {s} and a {(k - 1) * d + 1}-tap window along spatial "
                            f"axis {axis} asks for {-total} more output than the transposed conv computes "
                            "(onnxruntime and the ONNX reference evaluator disagree on that output)")
        pads.append(_same_split(total, auto))
    return tuple(pads)


def _conv(imp: OnnxImporter, gs_node, proto) -> Node | Unmapped | None:
    weight = imp.constant_of(gs_node.inputs[1]) if len(gs_node.inputs) > 1 else None
    b = _input(gs_node, 2)
    bias = imp.constant_of(b) if b is not None else None
    if len(gs_node.inputs) > 1 and weight is None:
        return Unmapped(imp.why_not_constant(gs_node.inputs[1], "weight"))
    if b is not None and bias is None:
        return Unmapped(imp.why_not_constant(b, "bias"))
    if weight is None or weight.dim() < 3:
        return None
    transpose = gs_node.op == "ConvTranspose"
    dims = weight.dim() - 2
    a = gs_node.attrs
    kernel = tuple(a.get("kernel_shape", weight.shape[2:]))
    if kernel != tuple(weight.shape[2:]):
        return None
    stride = tuple(a.get("strides", [1] * dims))
    dilation = tuple(a.get("dilations", [1] * dims))
    groups = int(a.get("group", 1))
    in_shape = _shape(gs_node.inputs[0])
    check_conv_channels(tuple(weight.shape), groups, transpose, in_shape[1] if in_shape and len(in_shape) > 1 else None,
                        None if bias is None else bias.numel(), f"{imp.source}, node {proto.name or proto.op_type}")
    if transpose:
        output_padding = tuple(a.get("output_padding", [0] * dims))
        pads = _transpose_pads(gs_node, kernel, stride, dilation, output_padding,
                               f"{imp.source}, node {proto.name or proto.op_type}")
        if isinstance(pads, Unmapped):
            return pads
        attrs = {"stride": stride, "padding": pads, "output_padding": output_padding, "dilation": dilation,
                 "groups": groups}
    else:
        pads = _spatial_pads(imp, gs_node, kernel, stride, dilation)
        if isinstance(pads, Unmapped):
            return pads
        attrs = {"stride": stride, "padding": pads, "dilation": dilation, "groups": groups, "padding_mode": "zeros"}
    slots = [In(0), imp.orig(gs_node.inputs[1])] + ([imp.orig(b)] if len(gs_node.inputs) > 2 else [])
    return imp.make("conv_transpose" if transpose else "conv", gs_node, proto, [_data(imp, gs_node.inputs[0])], slots,
                    attrs, {"weight": weight, "bias": bias})


def _batch_norm(imp, gs_node, proto) -> Node | None:
    a = gs_node.attrs
    training = bool(a.get("training_mode", 0))
    if len(gs_node.inputs) != 5:
        return Unmapped(f"it has {len(gs_node.inputs)} inputs, not the 5 of a BatchNormalization")
    if len(proto.output) != 1 and not training:
        return Unmapped(f"it has {len(proto.output)} outputs in inference mode (the statistics of old opsets too)")
    # Training mode (opset 14+) also outputs the updated statistics; kept as a batch_norm with
    # training=True and those outputs, so fold_bn can say why it leaves it alone.
    if imp.opset < 9 and not a.get("spatial", 1):
        return Unmapped("spatial=0 (opset 7-8): statistics per element, not per channel")
    if imp.opset < 7:
        return Unmapped(f"opset {imp.opset}'s is_test / consumed_inputs semantics are not read here")
    scale, shift, mean, var = (imp.constant_of(t) for t in gs_node.inputs[1:])
    for t, value, what in zip(gs_node.inputs[1:], (scale, shift, mean, var), ("scale", "bias", "mean", "variance")):
        if value is None:
            return Unmapped(imp.why_not_constant(t, what))
    # epsilon is a float32 attribute; the runtime adds exactly that float32 value.
    attrs = {"eps": float(np.float32(a.get("epsilon", 1e-5))), "momentum": 1.0 - float(a.get("momentum", 0.9)),
             "training": training}
    params = {"running_mean": mean, "running_var": var, "weight": scale, "bias": shift}
    in_shape = _shape(gs_node.inputs[0])
    check_batch_norm_params(params, in_shape[1] if in_shape and len(in_shape) > 1 else None,
                            f"{imp.source}, node {proto.name or proto.op_type}")
    slots = [In(0)] + [imp.orig(t) for t in gs_node.inputs[1:]]
    return imp.make("batch_norm", gs_node, proto, [_data(imp, gs_node.inputs[0])], slots, attrs, params,
                    num_outputs=len(gs_node.outputs))


def _gemm(imp, gs_node, proto) -> Node | None:
    """Gemm is linear when B and C are constants and C is a bias along the last axis."""
    a = gs_node.attrs
    if a.get("transA", 0):
        return None
    b = imp.constant_of(gs_node.inputs[1])
    c_tensor = _input(gs_node, 2)
    c = imp.constant_of(c_tensor) if c_tensor is not None else None
    if b is None or b.dim() != 2 or (c_tensor is not None and c is None) or not b.is_floating_point():
        return None
    alpha, beta = float(np.float32(a.get("alpha", 1.0))), float(np.float32(a.get("beta", 1.0)))
    weight = b if a.get("transB", 0) else b.t()
    out_features = weight.shape[0]
    bias = None
    if c is not None:
        if c.dim() > 2 or (c.dim() == 2 and c.shape[0] != 1) or c.numel() not in (1, out_features):
            return None  # C varies along the batch axis: not a bias
        bias = c.reshape(-1).expand(out_features).clone() if c.numel() == 1 else c.reshape(-1)
        if beta != 1.0:
            bias = (bias.double() * beta).to(c.dtype)
    if alpha != 1.0:
        # alpha (A @ B) becomes A @ (alpha B): equal up to one rounding of the product.
        weight = (weight.double() * alpha).to(b.dtype)
    slots = [In(0), imp.orig(gs_node.inputs[1])] + ([imp.orig(c_tensor)] if c_tensor is not None else [])
    return imp.make("linear", gs_node, proto, [_data(imp, gs_node.inputs[0])], slots, {},
                    {"weight": weight, "bias": bias})


def _matmul(imp, gs_node, proto) -> Node | None:
    w = imp.constant_of(gs_node.inputs[1])
    if w is None or w.dim() != 2 or imp.constant_of(gs_node.inputs[0]) is not None or not w.is_floating_point():
        return None
    x = _data(imp, gs_node.inputs[0])
    if x.shape is not None and len(x.shape) < 2:
        return None  # a vector times a matrix drops an axis; linear keeps it
    return imp.make("linear", gs_node, proto, [x], [In(0), imp.orig(gs_node.inputs[1])], {},
                    {"weight": w.t(), "bias": None})


def _binary(kind: str):
    def handler(imp, gs_node, proto) -> Node | None:
        if len(gs_node.inputs) != 2 or all(imp.constant_of(t) is not None for t in gs_node.inputs):
            return None
        if proto.domain not in ("", "ai.onnx") or (imp.opset < 7 and "broadcast" in gs_node.attrs):
            return None  # legacy explicit broadcasting
        inputs = [_data(imp, t) for t in gs_node.inputs]
        return imp.make(kind, gs_node, proto, inputs, [In(0), In(1)])
    return handler


def _inverted(kind: str, invert: Callable[[torch.Tensor], torch.Tensor | None]):
    """x - c as x + (-c), x / c as x * (1/c): only with a constant right operand, and only when exact."""
    def handler(imp, gs_node, proto) -> Node | None:
        c = imp.constant_of(gs_node.inputs[1])
        if c is None or imp.constant_of(gs_node.inputs[0]) is not None or not c.is_floating_point():
            return None
        inverse = invert(c)
        if inverse is None:
            return None
        const = Node("constant", f"{proto.name or proto.op_type}_inverse", params={"value": inverse})
        imp.graph.append(const)
        const.output.shape, const.output.dtype = tuple(inverse.shape), inverse.dtype
        return imp.make(kind, gs_node, proto, [_data(imp, gs_node.inputs[0]), const.output],
                        [In(0), imp.orig(gs_node.inputs[1])], pinned={1: const.output})
    return handler


def _first_of(*handlers):
    """The first handler that recognizes the node (x - c as an add of -c, else a plain sub)."""
    def handler(imp, gs_node, proto) -> Node | None:
        for h in handlers:
            node = h(imp, gs_node, proto)
            if node is not None:
                return node
        return None
    return handler


def _exact_reciprocal(c: torch.Tensor) -> torch.Tensor | None:
    """1/c when every element is a power of two, so x * (1/c) rounds exactly like x / c."""
    mantissa, _ = torch.frexp(c.double())
    if not bool(torch.isfinite(c).all()) or not bool((mantissa.abs() == 0.5).all()):
        return None
    return (1.0 / c.double()).to(c.dtype)


def _unary(kind: str, **attrs):
    def handler(imp, gs_node, proto) -> Node | None:
        if len(proto.output) != 1:
            return None
        return imp.make(kind, gs_node, proto, [_data(imp, gs_node.inputs[0])], [In(0)], dict(attrs))
    return handler


def _identity(imp, gs_node, proto) -> Node:
    value = imp.constant_of(gs_node.inputs[0])
    if value is not None:
        # Identity of a constant is that constant (exporters dedupe initializers this way).
        return imp.make("constant", gs_node, proto, [], [imp.orig(gs_node.inputs[0])], params={"value": value})
    return imp.make("identity", gs_node, proto, [_data(imp, gs_node.inputs[0])], [In(0)])


def _constant(imp, gs_node, proto) -> Node | None:
    a = gs_node.attrs
    if "value" in a and isinstance(a["value"], gs.Constant):
        try:
            value = to_torch(a["value"].values)
        except TypeError:
            return Unmapped(f"its value is of type {a['value'].dtype}, which torch has no type for")
    elif "value_float" in a:
        value = torch.tensor(a["value_float"], dtype=torch.float32)
    elif "value_floats" in a:
        value = torch.tensor(list(a["value_floats"]), dtype=torch.float32)
    elif "value_int" in a:
        value = torch.tensor(a["value_int"], dtype=torch.int64)
    elif "value_ints" in a:
        value = torch.tensor(list(a["value_ints"]), dtype=torch.int64)
    else:
        return None
    return imp.make("constant", gs_node, proto, [], [], params={"value": value})


def _scalar(value: torch.Tensor | None) -> float | None:
    return None if value is None or value.numel() != 1 else float(value.reshape(()))


def _clip(imp, gs_node, proto) -> Node | None:
    if imp.opset < 11:
        bounds = {k: gs_node.attrs.get(k) for k in ("min", "max")}
        params = {k: clamp_bound(None if v is None else float(np.float32(v))) for k, v in bounds.items()}
        return imp.make("clamp", gs_node, proto, [_data(imp, gs_node.inputs[0])], [In(0)], params=params)
    bounds = []
    for i in (1, 2):
        tensor = _input(gs_node, i)
        if tensor is None:
            bounds.append(None)
            continue
        value = imp.constant_of(tensor)
        if value is None or value.numel() != 1:
            return None
        bounds.append(_scalar(value))
    slots = [In(0)] + [imp.orig(_input(gs_node, i)) for i in range(1, len(gs_node.inputs))]
    return imp.make("clamp", gs_node, proto, [_data(imp, gs_node.inputs[0])], slots,
                    params={"min": clamp_bound(bounds[0]), "max": clamp_bound(bounds[1])})


def _concat(imp, gs_node, proto) -> Node | None:
    inputs = [_data(imp, t) for t in gs_node.inputs]
    return imp.make("concat", gs_node, proto, inputs, [In(i) for i in range(len(inputs))],
                    {"dim": int(gs_node.attrs["axis"])})


def _split(imp, gs_node, proto) -> Node | None:
    x = _data(imp, gs_node.inputs[0])
    axis = int(gs_node.attrs.get("axis", 0))
    n = len(gs_node.outputs)
    sizes_tensor = _input(gs_node, 1)
    if sizes_tensor is not None:
        sizes = imp.constant_of(sizes_tensor)
        if sizes is None:
            return None
        sizes = tuple(int(s) for s in sizes.reshape(-1))
    elif "split" in gs_node.attrs:
        sizes = tuple(int(s) for s in gs_node.attrs["split"])
    else:
        total = x.shape[axis] if x.shape is not None and -len(x.shape) <= axis < len(x.shape) else None
        if not isinstance(total, int) or total % n:
            return None  # uneven or unknown: the runtime's rule for the last piece would need a size
        sizes = (total // n,) * n
    slots = [In(0)] + ([imp.orig(sizes_tensor)] if len(gs_node.inputs) > 1 else [])
    return imp.make("split", gs_node, proto, [x], slots, {"dim": axis, "sizes": sizes}, num_outputs=n)


def _pool(kind: str):
    def handler(imp, gs_node, proto) -> Node | None:
        if len(proto.output) != 1:
            return None  # MaxPool with indices
        a = gs_node.attrs
        kernel = tuple(a["kernel_shape"])
        dims = len(kernel)
        stride = tuple(a.get("strides", [1] * dims))
        dilation = tuple(a.get("dilations", [1] * dims))
        pads = _spatial_pads(imp, gs_node, kernel, stride, dilation)
        if isinstance(pads, Unmapped):
            return pads
        if a.get("storage_order", 0):
            return None
        attrs = {"kernel_size": kernel, "stride": stride, "padding": pads, "ceil_mode": bool(a.get("ceil_mode", 0))}
        if kind == "avg_pool":
            if any(d != 1 for d in dilation):
                return None
            attrs.update(count_include_pad=bool(a.get("count_include_pad", 0)), divisor_override=None)
        else:
            attrs["dilation"] = dilation
        return imp.make(kind, gs_node, proto, [_data(imp, gs_node.inputs[0])], [In(0)], attrs)
    return handler


def _global_avg_pool(imp, gs_node, proto) -> Node | None:
    x = _data(imp, gs_node.inputs[0])
    if x.shape is None or len(x.shape) < 3:
        return None
    return imp.make("adaptive_avg_pool", gs_node, proto, [x], [In(0)], {"output_size": (1,) * (len(x.shape) - 2)})


def _flatten(imp, gs_node, proto) -> Node | None:
    x = _data(imp, gs_node.inputs[0])
    axis = int(gs_node.attrs.get("axis", 1))
    rank = None if x.shape is None else len(x.shape)
    if axis < 0 and rank is not None:
        axis += rank
    if axis != 1:
        return None  # ONNX Flatten always gives 2-D; only axis 1 matches flatten(x, 1)
    return imp.make("flatten", gs_node, proto, [x], [In(0)], {"start_dim": 1, "end_dim": -1})


def _flattens(x_shape, target, allowzero: bool) -> bool:
    """Is Reshape(x, target) flatten(x, 1)? It is when the result is 2-D and its first dim is x's first:
    the element count then fixes the second. `target` is the constant shape, or the inferred output
    shape (symbols as strings), so a dynamic batch counts only when onnx's symbolic inference proved
    that it is x's own."""
    if x_shape is None or len(x_shape) < 2 or target is None or len(target) != 2:
        return False
    first = x_shape[0] if target[0] == 0 and not allowzero else target[0]
    return first is not None and first == x_shape[0] and (not isinstance(first, int) or first > 0)


def _reshape(imp, gs_node, proto) -> Node | None:
    x = _data(imp, gs_node.inputs[0])
    shape = imp.constant_of(gs_node.inputs[1])
    allowzero = bool(gs_node.attrs.get("allowzero", 0))
    if shape is None:
        # A shape computed from the input's own (symbolic) size, as view(x.size(0), -1) exports: a flatten
        # when symbolic inference proves it. Written anew as Flatten: its shape subgraph has no constant form.
        if not _flattens(x.shape, _shape(gs_node.outputs[0]), allowzero):
            return None
        node = Node("flatten", proto.name or f"Reshape_{len(imp.graph)}", [x], {"start_dim": 1, "end_dim": -1})
        node.scope = proto.name or None
        imp.graph.append(node)
        return node
    shape = tuple(int(s) for s in shape.reshape(-1))
    if _flattens(x.shape, shape, allowzero):  # channel removal follows a flatten into the classifier
        return imp.make("flatten", gs_node, proto, [x], [In(0), imp.orig(gs_node.inputs[1])],
                        {"start_dim": 1, "end_dim": -1})
    if 0 in shape and not gs_node.attrs.get("allowzero", 0):
        return None  # ONNX 0 copies an input dim; torch 0 means an empty dim
    return imp.make("reshape", gs_node, proto, [_data(imp, gs_node.inputs[0])],
                    [In(0), imp.orig(gs_node.inputs[1])], {"shape": shape})


def _dropout(imp, gs_node, proto) -> Node | None:
    if len(proto.output) != 1:
        return None
    training = _input(gs_node, 2)
    if training is not None:
        mode = imp.constant_of(training)
        if mode is None or bool(mode.reshape(-1)[0]):
            return None
    ratio_tensor = _input(gs_node, 1)
    ratio = _scalar(imp.constant_of(ratio_tensor)) if ratio_tensor is not None else gs_node.attrs.get("ratio", 0.5)
    if ratio is None:
        return None
    slots = [In(0)] + [imp.orig(_input(gs_node, i)) for i in range(1, len(gs_node.inputs))]
    return imp.make("dropout", gs_node, proto, [_data(imp, gs_node.inputs[0])], slots,
                    {"p": float(ratio), "training": False})


HANDLERS: dict[str, Callable] = {
    "Conv": _conv, "ConvTranspose": _conv,
    "BatchNormalization": _batch_norm,
    "Gemm": _gemm, "MatMul": _matmul,
    "Add": _binary("add"), "Mul": _binary("mul"),
    "Sub": _first_of(_inverted("add", lambda c: -c), _binary("sub")),
    "Div": _inverted("mul", _exact_reciprocal),
    "Relu": _unary("relu"),
    "Clip": _clip,
    "Concat": _concat, "Split": _split,
    "AveragePool": _pool("avg_pool"), "MaxPool": _pool("max_pool"),
    "GlobalAveragePool": _global_avg_pool,
    "Flatten": _flatten, "Reshape": _reshape,
    "Identity": _identity, "Constant": _constant,
    "Dropout": _dropout,
}
