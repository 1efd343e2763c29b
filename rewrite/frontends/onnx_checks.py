"""Checks of ONNX input that onnx.checker does not make and that would otherwise surface as raw errors later.

- Text fields (names, domains, doc strings) that are not valid UTF-8: protobuf hands them over as
  bytes, and writing the model back fails deep inside onnx.helper.
- A Conv / ConvTranspose whose group count does not divide its channels, or whose weight does not
  match its input's channels: onnxruntime rejects such a node when it runs, after we rewrote it.

`full_check_error` words the failures of onnx.checker's full check (strict, type-checked shape inference).
"""
from __future__ import annotations

import re

from google.protobuf.descriptor import FieldDescriptor

from ..errors import ModelLoadError

_SKIP = {"raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"}  # numbers, not text


def node_subgraphs(node) -> list:
    """The graphs a node's attributes hold (an If's branches, a Loop's or Scan's body)."""
    return [g for attr in node.attribute for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs)]


def _is_repeated(field) -> bool:
    repeated = getattr(field, "is_repeated", None)  # newer protobuf; `label` is gone from upb descriptors
    return repeated if repeated is not None else field.label == FieldDescriptor.LABEL_REPEATED


def invalid_text(message, path: str = "model"):
    """(field path, raw bytes) of the first string field that is not valid UTF-8, or None."""
    for field, value in message.ListFields():
        if field.name in _SKIP:
            continue
        repeated = _is_repeated(field)
        items = list(value) if repeated else [value]
        for i, item in enumerate(items):
            where = f"{path}.{field.name}" + (f"[{i}]" if repeated else "")
            if field.type == FieldDescriptor.TYPE_STRING and isinstance(item, bytes):
                return where, item
            if field.type == FieldDescriptor.TYPE_MESSAGE:
                found = invalid_text(item, where)
                if found is not None:
                    return found
    return None


def check_text(model, where: str) -> None:
    found = invalid_text(model)
    if found is not None:
        path, raw = found
        raise ModelLoadError(f"{path} is not valid UTF-8 text ({raw[:60]!r}); ONNX names and strings must be UTF-8",
                             where=where)


def check_conv_channels(weight_shape, groups: int, transpose: bool, in_channels, bias_len, where: str) -> None:
    """A conv's group count and weight against its channels (ONNX Conv: W is [C_out, C_in/group, k...];
    ConvTranspose: W is [C_in, C_out/group, k...])."""
    op = "ConvTranspose" if transpose else "Conv"
    if groups < 1:
        raise ModelLoadError(f"{op} with group={groups}; it must be at least 1", where=where)
    split_axis = weight_shape[0]  # C_out for Conv, C_in for ConvTranspose: both are split into the groups
    if split_axis % groups:
        axis = "input" if transpose else "output"
        raise ModelLoadError(f"{op} group={groups} does not divide its {split_axis} {axis} channels", where=where)
    expected_in = weight_shape[0] if transpose else weight_shape[1] * groups
    if isinstance(in_channels, int) and in_channels != expected_in:
        raise ModelLoadError(f"{op} input has {in_channels} channels, its weight {list(weight_shape)} with "
                             f"group={groups} needs {expected_in}", where=where)
    out_channels = weight_shape[1] * groups if transpose else weight_shape[0]
    if bias_len is not None and bias_len != out_channels:
        raise ModelLoadError(f"{op} bias has {bias_len} values for {out_channels} output channels", where=where)


def check_batch_norm_params(params: dict, in_channels, where: str) -> None:
    """BatchNormalization's scale, B, mean and var: 1-D, one value per channel of its input."""
    lengths = {name: tuple(t.shape) for name, t in params.items()}
    sizes = {shape[0] if len(shape) == 1 else None for shape in lengths.values()}
    expected = in_channels if isinstance(in_channels, int) else next(iter(sizes))
    if None in sizes or len(sizes) != 1 or expected not in sizes:
        described = ", ".join(f"{name} {list(shape)}" for name, shape in lengths.items())
        channels = f" for {in_channels} channels" if isinstance(in_channels, int) else ""
        raise ModelLoadError(f"BatchNormalization parameters must be 1-D, one value per channel{channels}: "
                             f"{described}", where=where)


_INFERENCE_NODE = re.compile(r"(?:\[(\w+)\]\s*)?\(op_type:(\w+), node name: ([^)]*)\):\s*(?:\[(\w+)\]\s*)?(.*)")


def full_check_error(exc: Exception, where: str) -> ModelLoadError:
    """The ModelLoadError for a model that fails `onnx.checker.check_model(full_check=True)`'s shape and
    type inference, naming the first node the inference names (its message lists one line per node)."""
    text = str(exc)
    found = _INFERENCE_NODE.search(text)
    if found is None:
        first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
        return ModelLoadError(f"the model fails onnx.checker's full check: {first}", where=where)
    outer, op_type, node, inner, message = found.groups()
    kind = inner or outer or "InferenceError"
    return ModelLoadError(f"the model fails onnx.checker's full check ({kind}): {op_type} {message.strip()}",
                          where=f"{where}, node {node or op_type}")
