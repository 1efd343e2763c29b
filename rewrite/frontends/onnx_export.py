"""IR -> ONNX ModelProto, assembled with onnx-graphsurgeon.

Untouched nodes are written back from their origin: same op, name, domain and attributes
(copied from the original NodeProto, so subgraphs come back byte for byte), with their
original constant inputs. Rebuilt nodes are made from the canonical form in the model's own
opset, with fresh initializer names. Graph input/output names and types, opset imports,
metadata and functions are copied from the original model.
"""
from __future__ import annotations

import re
from typing import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch

from ..errors import RewriteError
from ..ir import Graph, Node, Value, fresh_name
from . import chain, onnx_fold, onnx_forms, onnx_weights
from .onnx_arrays import numpy_type_of, to_numpy
from .onnx_import import EMPTY, In, OnnxOrigin, Orig, untouched


class OnnxEmitter:
    def __init__(self, graph: Graph):
        self.graph = graph
        self.model: onnx.ModelProto = graph.meta["onnx_model"]
        self.opset: int = graph.meta["onnx_opset"]
        self.nodes: list[gs.Node] = []
        self.restore: list[tuple[int, onnx.NodeProto]] = []  # exported index -> original NodeProto
        self.env: dict[int, gs.Tensor] = {}  # id(Value) -> tensor
        self.emitted: dict[int, list[gs.Tensor]] = {}  # id(OnnxOrigin) -> output tensors
        self.node_names: set[str] = {n.origin.proto.name for n in graph.nodes
                                     if untouched(n) and not n.origin.is_initializer and n.origin.proto.name}
        self.used_node_names: set[str] = set()
        # Every original tensor name is reserved: original nodes may need to be re-emitted under it.
        self.tensor_names: set[str] = _all_tensor_names(self.model.graph)
        self.outer_initializers: dict[str, gs.Constant] = {}  # captured by subgraphs, exported by hand
        self.fixed_names: dict[int, str] = {}
        self.identity_outputs: list[tuple[Value, str]] = []
        self.folded_written = 0  # nodes folded at import and written back (see onnx_fold)
        self.folded_nodes: list[gs.Node] = []  # those written back as the nodes they were
        # Big arrays are handed to graphsurgeon as stubs and written afterwards, one at a time (onnx_weights).
        self.weights: onnx_weights.ExternalData | None = graph.meta.get("onnx_weights")
        self.pending: dict[str, np.ndarray] = {}

    # -- naming -------------------------------------------------------------------------
    def fresh_tensor_name(self, base: str) -> str:
        base = re.sub(r"\s", "_", base) or "t"
        return fresh_name(base, self.tensor_names.__contains__, self.tensor_names)

    def node_name(self, base: str, original: bool = False) -> str:
        """A unique node name; names of original nodes still written back are kept for them."""
        return fresh_name(base, lambda name: name in self.used_node_names or (not original and name in self.node_names),
                          self.used_node_names)

    def _plan_output_names(self) -> None:
        """Graph outputs keep their names; a value that cannot take one gets an Identity node."""
        names = self.graph.meta["onnx_output_names"]
        for value, name in zip(self.graph.outputs, names):
            producer = value.producer
            takes_name = (producer is not None and id(value) not in self.fixed_names
                          and not (producer.kind == "constant" and isinstance(producer.origin, OnnxOrigin)
                                   and producer.origin.is_initializer and untouched(producer)))
            if takes_name:
                self.fixed_names[id(value)] = name
            else:
                self.identity_outputs.append((value, name))

    # -- the export proper --------------------------------------------------------------------
    def run(self) -> onnx.ModelProto:
        graph = self.graph
        graph.topological_sort()
        self._plan_output_names()
        inputs = []
        for value in graph.inputs:
            tensor = gs.Variable(value.name, dtype=numpy_type_of(value.dtype), shape=_gs_shape(value.shape))
            self.env[id(value)] = tensor
            inputs.append(tensor)
        for node in graph.nodes:
            if node.kind == "constant" and not any(graph.external_uses(v) for v in node.outputs):
                continue  # a constant only read as a parameter is written where it is needed
            self.emit(node)
        outputs = []
        for value, name in zip(graph.outputs, graph.meta["onnx_output_names"]):
            tensor = self.env[id(value)]
            if tensor.name != name:
                out = gs.Variable(name)
                self.add_node(gs.Node("Identity", self.node_name(f"{name}_output"), inputs=[tensor], outputs=[out]))
                tensor = out
            outputs.append(tensor)
        gs_graph = gs.Graph(nodes=self.nodes, inputs=inputs, outputs=outputs, name=self.model.graph.name,
                            doc_string=self.model.graph.doc_string, opset=self.opset)
        exported = gs.export_onnx(gs_graph, do_type_check=False)
        self.graph.meta["onnx_folded_written"] = self.folded_written
        self.graph.meta["onnx_folded_kept"] = onnx_fold.kept_folds(self.folded_nodes)
        model = self._finish(exported)
        # The final export of apply(): the graph is dropped next, so each tensor it holds is let go once written.
        release = _releaser(self.graph) if self.graph.meta.get("final_export") else None
        onnx_weights.fill_initializers(model.graph, self.pending, self.weights, release)
        return model

    def emit(self, node: Node) -> None:
        if id(node) in self.emitted:
            return
        if untouched(node):
            outs = self.emit_original(node.origin, node)
        else:
            outs = self.emit_canonical(node)
        self.emitted[id(node)] = outs
        for value, tensor in zip(node.outputs, outs):
            self.env[id(value)] = tensor

    def add_node(self, gs_node: gs.Node, original: onnx.NodeProto | None = None) -> gs.Node:
        if original is not None:
            self.restore.append((len(self.nodes), original))
        self.nodes.append(gs_node)
        return gs_node

    # -- untouched nodes ------------------------------------------------------------------------
    def emit_original(self, origin: OnnxOrigin, node: Node | None) -> list[gs.Tensor]:
        """Write the original node again (once), its IR inputs wired to their exported tensors."""
        if id(origin) in self.emitted:
            return self.emitted[id(origin)]
        self.folded_written += origin.folded
        if origin.is_initializer:
            outs = [origin.gs_node]
            self.emitted[id(origin)] = outs
            return outs
        inputs = []
        for slot in origin.slots:
            if isinstance(slot, In):
                inputs.append(self.env[id(node.inputs[slot.index])])
            else:
                inputs.append(self.resolve_orig(slot))
        if node is not None:
            for name, index in origin.captures:
                self.capture(node.inputs[index], name)
        outs = []
        for i, name in enumerate(origin.output_names):
            value = node.outputs[i] if node is not None else None
            if not name:
                outs.append(gs.Variable.empty())
                continue
            if value is not None and id(value) in self.fixed_names:
                name = self.fixed_names[id(value)]
            elif value is not None and name in self.graph.meta["onnx_output_names"]:
                name = self.fresh_tensor_name(name)  # the output now comes from elsewhere
            outs.append(gs.Variable(name, dtype=numpy_type_of(value.dtype) if value is not None else None,
                                    shape=_gs_shape(value.shape) if value is not None else None))
        proto = origin.proto
        gs_node = gs.Node(proto.op_type, self.node_name(proto.name, original=True) if proto.name else "", inputs=inputs,
                          outputs=outs, domain=proto.domain or None)
        self.add_node(gs_node, proto)
        if origin.folded:
            self.folded_nodes.append(gs_node)
        self.emitted[id(origin)] = outs
        return outs

    def resolve_orig(self, slot: Orig) -> gs.Tensor:
        if slot is EMPTY or slot.tensor is None:
            return gs.Variable.empty()
        if isinstance(slot.tensor, gs.Constant):
            return slot.tensor
        if slot.producer is None:
            raise RewriteError(f"cannot find what makes the constant {slot.tensor.name!r}")
        index = slot.producer.output_names.index(slot.tensor.name)
        return self.emit_original(slot.producer, None)[index]

    def capture(self, value: Value, name: str) -> None:
        """A subgraph reads `name` from this scope: make sure a tensor of that name holds `value`."""
        tensor = self.env[id(value)]
        if tensor.name == name:
            if isinstance(tensor, gs.Constant):
                self.outer_initializers[name] = tensor
            return
        out = gs.Variable(name)
        self.add_node(gs.Node("Identity", self.node_name(f"{name}_capture"), inputs=[tensor], outputs=[out]))

    # -- rebuilt nodes --------------------------------------------------------------------------
    def emit_canonical(self, node: Node) -> list[gs.Tensor]:
        emitter = EMITTERS.get(node.kind) or onnx_forms.EMITTERS.get(node.kind)
        if emitter is None and node.kind != "constant":
            if node.kind == "opaque":
                raise RewriteError("cannot write a changed opaque node to ONNX", where=f"node {node.name}")
            emitter = onnx_forms.emit_generic
        outs = []
        for value in node.outputs:
            name = self.fixed_names.get(id(value)) or self.fresh_tensor_name(value.name or node.name)
            outs.append(gs.Variable(name, dtype=numpy_type_of(value.dtype), shape=_gs_shape(value.shape)))
        if node.kind == "constant":
            const = self.constant(node, "value", node.params["value"])
            if id(node.output) in self.fixed_names:
                self.add_node(gs.Node("Identity", self.node_name(node.name), inputs=[const], outputs=outs))
                return outs
            return [const]
        emitter(self, node, [self.env[id(v)] for v in node.inputs], outs)
        return outs

    def constant(self, node: Node, suffix: str, tensor: torch.Tensor | np.ndarray) -> gs.Constant:
        array = to_numpy(tensor) if isinstance(tensor, torch.Tensor) else np.asarray(tensor)
        name, array = self.fresh_tensor_name(f"{node.name}.{suffix}"), np.ascontiguousarray(array)
        return onnx_weights.stub_constant(name, array, self.pending) or gs.Constant(name, array)

    def op(self, node: Node, op_type: str, inputs: list, outputs: list | None = None, **attrs) -> list[gs.Tensor]:
        """Add one ONNX node for `node`; intermediate outputs get fresh names."""
        if outputs is None:
            outputs = [gs.Variable(self.fresh_tensor_name(f"{node.name}/{op_type}"))]
        attrs = {k: v for k, v in attrs.items() if v is not None}
        self.add_node(gs.Node(op_type, self.node_name(node.name), attrs=attrs, inputs=inputs, outputs=outputs))
        return outputs

    # -- the model around the graph -----------------------------------------------------------------
    def _finish(self, exported: onnx.ModelProto) -> onnx.ModelProto:
        original = self.model
        graph = exported.graph
        for index, proto in self.restore:
            target = graph.node[index]
            del target.attribute[:]
            target.attribute.extend(proto.attribute)
            for field in ("domain", "doc_string", "overload"):
                if field not in proto.DESCRIPTOR.fields_by_name:
                    continue
                if proto.HasField(field):  # proto2: an empty string set is not the same bytes as unset
                    setattr(target, field, getattr(proto, field))
                else:
                    target.ClearField(field)
            del target.metadata_props[:]
            target.metadata_props.extend(proto.metadata_props)
        present = {t.name for t in graph.initializer}
        # Initializers no node of the exported graph holds: those subgraphs capture, and the defaults of
        # graph inputs that have one (the IR reads those as inputs; see overridable_initializers).
        inputs = {v.name for v in self.graph.inputs}
        defaults = {name: t for name, t in self.graph.meta.get("onnx_input_defaults", {}).items() if name in inputs}
        for name, tensor in {**self.outer_initializers, **defaults}.items():
            if name not in present:
                graph.initializer.append(onnx.numpy_helper.from_array(np.asarray(tensor.values), name))
                present.add(name)
        # Names, types and docs of the graph's inputs and outputs, exactly as they were.
        by_name = {i.name: i for i in original.graph.input}
        del graph.input[:]
        graph.input.extend(by_name[v.name] for v in self.graph.inputs)
        if original.ir_version < 4:  # IR 3 lists every initializer as a graph input too, new ones included
            graph.input.extend(by_name.get(t.name) or onnx.helper.make_tensor_value_info(t.name, t.data_type, t.dims)
                               for t in graph.initializer)
        del graph.output[:]
        graph.output.extend(original.graph.output)
        _keep_value_info(graph, original.graph)
        if hasattr(graph, "metadata_props"):
            del graph.metadata_props[:]
            graph.metadata_props.extend(original.graph.metadata_props)
        # The model around the graph, from the original (edited in place: the graph is not copied again).
        exported.ir_version = original.ir_version
        del exported.opset_import[:]
        exported.opset_import.extend(original.opset_import)
        exported.producer_name = original.producer_name
        exported.producer_version = original.producer_version
        exported.domain = original.domain
        exported.model_version = original.model_version
        exported.doc_string = original.doc_string
        del exported.metadata_props[:]
        exported.metadata_props.extend(original.metadata_props)
        del exported.functions[:]
        exported.functions.extend(original.functions)
        return exported


def _releaser(graph: Graph) -> Callable[[np.ndarray], None]:
    """release(array): drop the graph's parameters that hold `array`'s memory, so it is freed once written."""
    holders: dict[int, list[tuple[Node, str]]] = {}
    for node in graph.nodes:
        for key, tensor in node.params.items():
            if isinstance(tensor, torch.Tensor) and tensor.numel():
                holders.setdefault(tensor.data_ptr(), []).append((node, key))

    def release(array: np.ndarray) -> None:
        for node, key in holders.pop(array.__array_interface__["data"][0], ()):
            node.params[key] = None
    return release


def _keep_value_info(graph: onnx.GraphProto, original: onnx.GraphProto) -> None:
    """Keep the original value_info of the tensors still made under their original names; no guesses."""
    made_now = {name for node in graph.node for name in node.output}
    # A node written back as it was may now compute a different shape (channels removed upstream):
    # its original declaration would then contradict the IR's shape, written on the exported tensors.
    now = {v.name: _dims(v) for v in graph.value_info}
    kept = [v for v in original.value_info if v.name in made_now and _agree(_dims(v), now.get(v.name))]
    del graph.value_info[:]
    graph.value_info.extend(kept)


def _dims(info: onnx.ValueInfoProto) -> list | None:
    tensor_type = info.type.tensor_type
    if not tensor_type.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]


def _agree(declared: list | None, current: list | None) -> bool:
    """No static dim of the declaration differs from the shape the IR gives the tensor now."""
    if declared is None or current is None:
        return True
    return len(declared) == len(current) and all(a is None or b is None or a == b for a, b in zip(declared, current))


def _all_tensor_names(graph: onnx.GraphProto) -> set[str]:
    names = {i.name for i in graph.input} | {o.name for o in graph.output} | {i.name for i in graph.initializer}
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
    names.discard("")
    return names




def _gs_shape(shape):
    return None if shape is None else [d if d is not None else "?" for d in shape]


# -- canonical emitters: (emitter, node, input tensors, output tensors) -------------------------------------
def _flat_pads(pairs) -> list[int]:
    return [p[0] for p in pairs] + [p[1] for p in pairs]


def _emit_conv(e: OnnxEmitter, node: Node, ins, outs):
    a = node.attrs
    if a.get("padding_mode", "zeros") != "zeros":
        raise RewriteError(f"ONNX Conv pads with zeros only, not {a['padding_mode']!r}", where=f"node {node.name}")
    weight, bias = node.params["weight"], node.params.get("bias")
    inputs = [ins[0], e.constant(node, "weight", weight)] + ([e.constant(node, "bias", bias)] if bias is not None else [])
    e.op(node, "Conv", inputs, outs, kernel_shape=list(weight.shape[2:]), strides=list(a["stride"]),
         pads=_flat_pads(a["padding"]), dilations=list(a["dilation"]), group=int(a["groups"]))


def _emit_conv_transpose(e: OnnxEmitter, node: Node, ins, outs):
    a = node.attrs
    weight, bias = node.params["weight"], node.params.get("bias")
    inputs = [ins[0], e.constant(node, "weight", weight)] + ([e.constant(node, "bias", bias)] if bias is not None else [])
    e.op(node, "ConvTranspose", inputs, outs, kernel_shape=list(weight.shape[2:]), strides=list(a["stride"]),
         pads=_flat_pads(a["padding"]), dilations=list(a["dilation"]), group=int(a["groups"]),
         output_padding=list(a["output_padding"]) if any(a["output_padding"]) else None)


def _emit_linear(e: OnnxEmitter, node: Node, ins, outs):
    weight, bias = node.params["weight"], node.params.get("bias")
    rank = None if node.inputs[0].shape is None else len(node.inputs[0].shape)
    if rank == 2 and bias is not None:
        e.op(node, "Gemm", [ins[0], e.constant(node, "weight", weight), e.constant(node, "bias", bias)], outs,
             transB=1)
        return
    w_t = e.constant(node, "weight", weight.detach().t().contiguous())
    if bias is None:
        e.op(node, "MatMul", [ins[0], w_t], outs)
        return
    (product,) = e.op(node, "MatMul", [ins[0], w_t])
    e.op(node, "Add", [product, e.constant(node, "bias", bias)], outs)


def _emit_batch_norm(e: OnnxEmitter, node: Node, ins, outs):
    p, a = node.params, node.attrs
    mean = p["running_mean"]
    if mean is None:
        raise RewriteError("ONNX BatchNormalization needs running statistics", where=f"node {node.name}")
    weight = p.get("weight") if p.get("weight") is not None else torch.ones_like(mean)
    bias = p.get("bias") if p.get("bias") is not None else torch.zeros_like(mean)
    inputs = [ins[0]] + [e.constant(node, k, t) for k, t in
                         (("weight", weight), ("bias", bias), ("running_mean", mean), ("running_var", p["running_var"]))]
    training = bool(a.get("training"))
    if training and e.opset < 14:
        raise RewriteError("training-mode BatchNormalization needs opset 14", where=f"node {node.name}")
    momentum = a.get("momentum")
    e.op(node, "BatchNormalization", inputs, outs, epsilon=float(a["eps"]),
         momentum=None if momentum is None else 1.0 - float(momentum),
         training_mode=1 if training else None)


def _emit_chain(op_type: str):
    def emit(e: OnnxEmitter, node: Node, ins, outs):
        acc = chain(ins, lambda acc, other, last: e.op(node, op_type, [acc, other], outs if last else None)[0])
        if len(ins) == 1:
            e.op(node, "Identity", [acc], outs)
    return emit


def _scalar_const(e: OnnxEmitter, node: Node, suffix: str, value: float) -> gs.Constant:
    dtype = numpy_type_of(node.inputs[0].dtype) or np.float32
    return gs.Constant(e.fresh_tensor_name(f"{node.name}.{suffix}"), np.array(value, dtype=dtype))


def _emit_clamp(e: OnnxEmitter, node: Node, ins, outs):
    lo_t, hi_t = node.params.get("min"), node.params.get("max")
    lo = lo_t.item() if lo_t is not None and lo_t.dim() == 0 else None
    hi = hi_t.item() if hi_t is not None and hi_t.dim() == 0 else None
    if lo is not None:
        lo_t = None
    if hi is not None:
        hi_t = None
    x = ins[0]
    if lo_t is not None or hi_t is not None:
        # Per-channel bounds: Clip takes scalars only, so Max then Min with broadcast tensors.
        steps = [("Max", lo_t if lo_t is not None else lo, "min"), ("Min", hi_t if hi_t is not None else hi, "max")]
        steps = [s for s in steps if s[1] is not None]
        for i, (op_type, bound, suffix) in enumerate(steps):
            const = e.constant(node, suffix, bound) if isinstance(bound, torch.Tensor) \
                else _scalar_const(e, node, suffix, bound)
            (x,) = e.op(node, op_type, [x, const], outs if i == len(steps) - 1 else None)
        return
    if e.opset < 11:
        e.op(node, "Clip", [x], outs, min=lo, max=hi)
        return
    inputs = [x, _scalar_const(e, node, "min", lo) if lo is not None else gs.Variable.empty()]
    if hi is not None:
        inputs.append(_scalar_const(e, node, "max", hi))
    e.op(node, "Clip", inputs, outs)


def _emit_pool(op_type: str):
    def emit(e: OnnxEmitter, node: Node, ins, outs):
        a = node.attrs
        attrs = {"kernel_shape": list(a["kernel_size"]), "strides": list(a["stride"]),
                 "pads": _flat_pads(a["padding"])}
        if a.get("ceil_mode"):
            attrs["ceil_mode"] = 1
        if op_type == "AveragePool":
            if a.get("divisor_override"):
                raise RewriteError("ONNX AveragePool has no divisor_override", where=f"node {node.name}")
            attrs["count_include_pad"] = int(bool(a.get("count_include_pad")))
        elif any(d != 1 for d in a.get("dilation", ())):
            attrs["dilations"] = list(a["dilation"])
        e.op(node, op_type, ins, outs, **attrs)
    return emit


def _emit_adaptive(e: OnnxEmitter, node: Node, ins, outs):
    if any(s != 1 for s in node.attrs["output_size"]):
        raise RewriteError("adaptive_avg_pool to a size other than 1 has no ONNX operator", where=f"node {node.name}")
    e.op(node, "GlobalAveragePool", ins, outs)


def _emit_split(e: OnnxEmitter, node: Node, ins, outs):
    sizes = [int(s) for s in node.attrs["sizes"]]
    if e.opset >= 13:
        e.op(node, "Split", [ins[0], e.constant(node, "split", np.array(sizes, dtype=np.int64))], outs,
             axis=int(node.attrs["dim"]))
    else:
        e.op(node, "Split", [ins[0]], outs, axis=int(node.attrs["dim"]), split=sizes)


def _emit_flatten(e: OnnxEmitter, node: Node, ins, outs):
    start, end = node.attrs["start_dim"], node.attrs["end_dim"]
    rank = None if node.inputs[0].shape is None else len(node.inputs[0].shape)
    if start == 1 and (end == -1 or (rank is not None and end == rank - 1)):
        e.op(node, "Flatten", ins, outs, axis=1)
        return
    raise RewriteError(f"flatten({start}, {end}) has no exact ONNX Flatten form", where=f"node {node.name}")


def _emit_reshape(e: OnnxEmitter, node: Node, ins, outs):
    shape = np.array([int(s) for s in node.attrs["shape"]], dtype=np.int64)
    e.op(node, "Reshape", [ins[0], e.constant(node, "shape", shape)], outs,
         allowzero=1 if 0 in shape and e.opset >= 14 else None)


def _emit_dropout(e: OnnxEmitter, node: Node, ins, outs):
    if node.attrs.get("training"):
        raise RewriteError("a new training-mode dropout is not written to ONNX", where=f"node {node.name}")
    e.op(node, "Identity", ins, outs)


EMITTERS: dict[str, Callable] = {
    "conv": _emit_conv,
    "conv_transpose": _emit_conv_transpose,
    "linear": _emit_linear,
    "batch_norm": _emit_batch_norm,
    "add": _emit_chain("Add"),
    "mul": _emit_chain("Mul"),
    "sub": lambda e, n, i, o: e.op(n, "Sub", i, o),
    "relu": lambda e, n, i, o: e.op(n, "Relu", i, o),
    "clamp": _emit_clamp,
    "identity": lambda e, n, i, o: e.op(n, "Identity", i, o),
    "dropout": _emit_dropout,
    "avg_pool": _emit_pool("AveragePool"),
    "max_pool": _emit_pool("MaxPool"),
    "adaptive_avg_pool": _emit_adaptive,
    "concat": lambda e, n, i, o: e.op(n, "Concat", i, o, axis=int(n.attrs["dim"])),
    "split": _emit_split,
    "flatten": _emit_flatten,
    "reshape": _emit_reshape,
}


def emit_model(graph: Graph) -> onnx.ModelProto:
    return OnnxEmitter(graph).run()
