"""Loading, checking and saving ONNX models, with errors that name the file and the node.

Saving is atomic (rewrite.files.atomic_write: a temporary file, then `os.replace`), so a failed save
never leaves a partial model behind. Models too big for one protobuf (2 GB) keep their weights
in an external data file written next to the model.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import onnx

from ..errors import ModelLoadError
from ..files import atomic_write, first_line
from .onnx_checks import _is_repeated, check_text, node_subgraphs

# Protobuf refuses to serialize a message of 2 GB or more; stay clearly below it.
PROTOBUF_LIMIT = 2**31 - 2**20
MIN_IR_VERSION = 3  # the first IR version with opset imports


def approx_size(model: onnx.ModelProto) -> int:
    """Bytes of tensor data in the main graph (external data counted by its declared length), a cheap stand-in
    for ByteSize() (which is slow on big models)."""
    total = 0
    for tensor in model.graph.initializer:
        total += len(tensor.raw_data) + 8 * (len(tensor.float_data) + len(tensor.int64_data) + len(tensor.double_data)
                                             + len(tensor.int32_data))
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            total += next((int(e.value) for e in tensor.external_data if e.key == "length" and e.value.isdigit()), 0)
    return total + 4 * len(model.graph.node) * 64


BIG_TENSOR = 4096  # bytes; tensors above this are stubbed in the weightless copies below


def weightless_copy(model: onnx.ModelProto, keep_dims: bool) -> onnx.ModelProto:
    """The model without its big weights, for the checker and shape inference (which copy whatever they get).

    keep_dims=True keeps each big initializer's name, type and dims with no data (enough for shape
    inference); False replaces it by a one-element tensor of the same type (enough for the checker,
    which wants exactly one data field but does not relate initializer dims to the nodes).
    """
    light = onnx.ModelProto()
    for field in ("ir_version", "domain", "producer_name", "model_version"):
        setattr(light, field, getattr(model, field))
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    graph, source = light.graph, model.graph
    graph.name = source.name
    graph.node.extend(source.node)
    graph.input.extend(source.input)
    graph.output.extend(source.output)
    graph.value_info.extend(source.value_info)
    graph.sparse_initializer.extend(source.sparse_initializer)
    for tensor in source.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL and len(tensor.raw_data) <= BIG_TENSOR:
            graph.initializer.append(tensor)
            continue
        stub = graph.initializer.add()
        stub.name, stub.data_type = tensor.name, tensor.data_type
        if keep_dims:
            stub.dims.extend(tensor.dims)
        else:
            stub.dims.append(1)
            stub.raw_data = b"\0" * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return light


def _check_opset(model: onnx.ModelProto, where: str) -> None:
    """The standard opset must be one this onnx knows: op semantics (and our import of them) change with it."""
    known = onnx.defs.onnx_opset_version()
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and not 1 <= opset.version <= known:
            raise ModelLoadError(f"opset {opset.version} of the standard domain is not one this onnx "
                                 f"{onnx.__version__} knows (1..{known})", where=where)


def _check_tensor_data(model: onnx.ModelProto, where: str) -> None:
    """Every initializer's type is one onnx knows, and its raw data is exactly what its dims need.

    onnx.checker only says when raw data is too short (and never sees the big tensors, stubbed in
    its weightless copy); too long, the data cannot be reshaped to the tensor it claims to be.
    """
    for tensor in model.graph.initializer:
        try:
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
        except Exception:
            raise ModelLoadError(f"initializer {tensor.name!r} has data type {tensor.data_type}, which this onnx "
                                 f"{onnx.__version__} does not know", where=where) from None
        if any(d < 0 for d in tensor.dims):
            raise ModelLoadError(f"initializer {tensor.name!r} has a negative dimension: {list(tensor.dims)}",
                                 where=where)
        if tensor.data_location == onnx.TensorProto.EXTERNAL or not tensor.HasField("raw_data"):
            continue
        if tensor.data_type in _UNSIZED_TYPES:
            continue  # 4-bit types pack two values a byte; strings are the checker's business
        expected = itemsize
        for d in tensor.dims:
            expected *= d
        if len(tensor.raw_data) != expected:
            raise ModelLoadError(f"initializer {tensor.name!r} holds {len(tensor.raw_data)} bytes, its type "
                                 f"{onnx.TensorProto.DataType.Name(tensor.data_type)} and dims {list(tensor.dims)} "
                                 f"need {expected}", where=where)


_KNOWN_TYPES = frozenset(onnx.TensorProto.DataType.values())


def _check_value_types(graph: onnx.GraphProto, where: str) -> None:
    """Every declared input, output and value_info (subgraphs too) has an element type onnx knows: onnx.checker
    lets an unknown one through, and onnx-graphsurgeon fails on it with a bare KeyError."""
    for info in list(graph.input) + list(graph.output) + list(graph.value_info):
        kind = info.type
        while kind.HasField("sequence_type") or kind.HasField("optional_type"):
            kind = kind.sequence_type.elem_type if kind.HasField("sequence_type") else kind.optional_type.elem_type
        field = "tensor_type" if kind.HasField("tensor_type") else \
            "sparse_tensor_type" if kind.HasField("sparse_tensor_type") else None
        elem = getattr(kind, field).elem_type if field else 0
        if elem not in _KNOWN_TYPES:
            raise ModelLoadError(f"value {info.name!r} is declared with element type {elem}, which this onnx "
                                 f"{onnx.__version__} does not know", where=where)
    for node in graph.node:
        for sub in node_subgraphs(node):
            _check_value_types(sub, f"{where}, node {node.name or node.op_type}")


_UNSIZED_TYPES = {getattr(onnx.TensorProto, name) for name in ("STRING", "INT4", "UINT4", "FLOAT4E2M1")
                  if hasattr(onnx.TensorProto, name)}


def describe(source) -> str:
    """How errors name a model: its path, or 'ModelProto <graph name>'."""
    if isinstance(source, (str, os.PathLike)):
        return f"file {os.fspath(source)}"
    graph_name = getattr(getattr(source, "graph", None), "name", "") or "?"
    return f"ModelProto {graph_name!r}"


def load_onnx(path: str | os.PathLike, load_external_data: bool = True, check: bool = True) -> onnx.ModelProto:
    """Read and check an ONNX file (check=False: read only). Any problem is a ModelLoadError naming the file
    (and node)."""
    path = os.fspath(path)
    where = f"file {path}"
    if not os.path.isfile(path):
        raise ModelLoadError("no such file", where=where)
    try:
        model = onnx.load(path, load_external_data=load_external_data)
    except Exception as exc:  # protobuf DecodeError, missing external data, ...
        raise ModelLoadError(f"not a readable ONNX model ({type(exc).__name__}: {first_line(exc)})",
                             where=where) from None
    if not model.HasField("graph") or (not model.graph.node and not model.graph.output):
        # An arbitrary byte string often parses as an empty ModelProto.
        raise ModelLoadError("not an ONNX model: the file holds no graph", where=where)
    if check:
        check_onnx(model, path)
    return model


def check_onnx(model: onnx.ModelProto, source=None) -> None:
    """IR version and onnx.checker; errors name the source and, when the checker does, the node."""
    where = describe(source if source is not None else model)
    if not isinstance(model, onnx.ModelProto):
        raise ModelLoadError(f"expected an onnx.ModelProto, got {type(model).__name__}", where=where)
    check_text(model, where)
    if model.ir_version < MIN_IR_VERSION or model.ir_version > onnx.IR_VERSION:
        raise ModelLoadError(f"unsupported IR version {model.ir_version} (this onnx {onnx.__version__} reads "
                             f"{MIN_IR_VERSION}..{onnx.IR_VERSION})", where=where)
    _check_opset(model, where)
    _check_tensor_data(model, where)
    _check_value_types(model.graph, where)
    try:
        onnx.checker.check_model(weightless_copy(model, keep_dims=False))
    except Exception as exc:  # ValidationError, and the C++ checker's other complaints
        node = _node_in(str(exc))
        raise ModelLoadError(f"the model fails onnx.checker: {first_line(exc)}",
                             where=where + (f", node {node}" if node else "")) from None


def save_onnx(model: onnx.ModelProto, path: str | os.PathLike, external_data: bool | None = None) -> Path:
    """Write `model` to `path` atomically. Over 2 GB (or when asked), weights go to `<name>.data` beside it.

    `model` is not changed: external data is written from a copy.
    """
    path = Path(os.fspath(path))
    if external_data is None:
        external_data = approx_size(model) >= PROTOBUF_LIMIT
    data_name = path.name + ".data"

    def write(tmp: str) -> None:
        if not external_data:
            onnx.save_model(model, tmp)
            return
        # The data file is written under a temporary name too, and moved into place before the model.
        tmp_data = tmp + ".data"
        try:
            _save_external(model, tmp, tmp_data)
            _relocate_external_data(tmp, data_name)
            os.replace(tmp_data, path.parent / data_name)
        finally:
            if os.path.exists(tmp_data):
                os.unlink(tmp_data)

    return atomic_write(path, write)


def _save_external(model: onnx.ModelProto, path: str, data_path: str) -> None:
    """Save with the main graph's raw tensors in `data_path`, one tensor in memory at a time and no copy of
    the model: the saved proto is the model's skeleton (all but the initializers' bytes) with external
    references, and `model` is left as it was."""
    skeleton = onnx.ModelProto()
    _copy_fields(model, skeleton, skip="graph")
    graph = skeleton.graph
    _copy_fields(model.graph, graph, skip="initializer")
    location = os.path.basename(data_path)

    def move(stub: onnx.TensorProto, raw: bytes, data) -> None:
        offset = data.tell()
        length = data.write(raw)
        for key, entry in (("location", location), ("offset", str(offset)), ("length", str(length))):
            item = stub.external_data.add()
            item.key, item.value = key, entry
        stub.data_location = onnx.TensorProto.EXTERNAL

    with open(data_path, "wb") as data:
        for tensor in model.graph.initializer:
            stub = graph.initializer.add()
            if not tensor.HasField("raw_data") or tensor.data_location == onnx.TensorProto.EXTERNAL:
                stub.CopyFrom(tensor)  # typed fields (small by nature) stay inline
                continue
            stub.name, stub.data_type = tensor.name, tensor.data_type
            if tensor.HasField("doc_string"):
                stub.doc_string = tensor.doc_string
            stub.dims.extend(tensor.dims)
            move(stub, tensor.raw_data, data)  # one tensor's bytes at a time
        for node in graph.node:  # Constant values, in the skeleton's own copy of the nodes
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR and attr.t.HasField("raw_data"):
                    raw = attr.t.raw_data
                    attr.t.ClearField("raw_data")
                    move(attr.t, raw, data)
    onnx.save_model(skeleton, path)


def _copy_fields(source, target, skip: str) -> None:
    """Every set field of `source` but `skip`, copied into `target`."""
    for field, value in source.ListFields():
        if field.name == skip:
            continue
        if _is_repeated(field):
            getattr(target, field.name).extend(value)
        elif field.message_type is not None:
            getattr(target, field.name).CopyFrom(value)
        else:
            setattr(target, field.name, value)


def _relocate_external_data(model_path: str, location: str) -> None:
    """Point the saved model's tensors at their final data file name (read without loading the data)."""
    model = onnx.load(model_path, load_external_data=False)
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save_model(model, model_path)


def _node_in(message: str) -> str | None:
    """The node a checker message is about, when it says."""
    for pattern in (r"name:\s*(\S+)\s+OpType", r"node name:\s*([^\s)]+)", r"Node \(([^)]+)\)"):
        found = re.search(pattern, message)
        if found:
            return found.group(1).strip("'\"")
    return None
