"""Constant folding at ONNX import, with onnx's reference evaluator.

Exporters and tools often leave a weight or a shape as a small computation on constants: the dynamo
exporter (optimize=False) writes a conv bias as Expand(CastLike(0)), onnxoptimizer's fuse_bn_into_conv
leaves Cast / Sqrt / Div / Mul chains of initializers, `x.view(x.size(0), -1)` becomes
Shape -> Gather -> Unsqueeze -> Concat. A node whose inputs are all constants (and a Shape / Size whose
input's shape is static) becomes an IR `constant`, so the passes see a conv with a constant weight.

The value comes from `onnx.reference.ReferenceEvaluator` running the node itself, never from code of
ours. The constant keeps the node as its origin: a folded node that no rewrite consumed is written back
exactly as it was; with `fold_constants=True` it is written as an initializer instead.
"""
from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx.reference
import torch

from .onnx_arrays import to_torch

# Ops whose result is not a function of their inputs, or whose outputs are not plain tensors.
_NOT_FOLDABLE = frozenset({
    "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli",
    "If", "Loop", "Scan", "SequenceConstruct", "SequenceEmpty", "SequenceInsert", "SequenceAt", "SequenceErase",
    "SequenceLength", "SplitToSequence", "ConcatFromSequence", "Optional", "OptionalGetElement",
    "OptionalHasElement", "Constant", "Identity",
})

# A folded value bigger than this many bytes, and bigger than the node's inputs together, stays a
# computation: folding an Expand or ConstantOfShape must not turn a few bytes into gigabytes.
MAX_GROWTH_BYTES = 1 << 24


def _has_subgraph(proto: onnx.NodeProto) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in proto.attribute)


def foldable(proto: onnx.NodeProto) -> bool:
    return ((proto.domain or "") in ("", "ai.onnx") and proto.op_type not in _NOT_FOLDABLE
            and len(proto.output) == 1 and len(proto.input) > 0 and not _has_subgraph(proto))


def too_big(inferred_shape, itemsize: int, inputs: list[np.ndarray | None]) -> bool:
    """Would the result (of this inferred shape) grow past MAX_GROWTH_BYTES and past the inputs?"""
    grown = sum(a.nbytes for a in inputs if a is not None)
    return inferred_shape is not None and all(isinstance(d, int) for d in inferred_shape) and \
        int(np.prod(inferred_shape, dtype=np.int64)) * itemsize > max(MAX_GROWTH_BYTES, grown)


def evaluate(proto: onnx.NodeProto, inputs: list[np.ndarray | None], opset: int) -> np.ndarray | None:
    """The node's one output on these constant inputs (None for an omitted optional input), or None
    when the reference evaluator cannot run it or the result is not a plain numeric tensor."""
    names = [name for name in proto.input]
    feeds = {name: array for name, array in zip(names, inputs) if name}
    try:
        (result,) = onnx.reference.ReferenceEvaluator(proto, opsets={"": opset}).run(None, feeds)
    except Exception:  # an op or attribute the evaluator does not implement: the node stays as it is
        return None
    if not isinstance(result, np.ndarray) or result.dtype == object:
        return None
    if too_big(result.shape, result.itemsize, inputs):
        return None
    return result


def static_shape_value(proto: onnx.NodeProto, shape) -> np.ndarray | None:
    """The value of Shape(x) / Size(x) when x's shape is fully static (ints in the symbolic inference)."""
    if shape is None or not all(isinstance(d, int) for d in shape):
        return None
    if proto.op_type == "Size":
        return np.array(int(np.prod(shape, dtype=np.int64)), dtype=np.int64)
    attrs = {a.name: a.i for a in proto.attribute}
    start, end = attrs.get("start", 0), attrs.get("end", len(shape))
    # Shape's start / end clamp and count from the back like a Python slice.
    return np.array(list(shape)[start:end] if "end" in attrs else list(shape)[start:], dtype=np.int64)


def as_tensor(array: np.ndarray) -> torch.Tensor:
    return to_torch(array)  # a private, writable copy


def kept_folds(written: list) -> dict:
    """The folded nodes written back as they were (gs nodes of the exported graph): how many of each op,
    and the nodes outside those chains that read them. The passes never see these nodes (they were
    constants), so this is the report's only word on why an Add or Mul is still in the file."""
    chains = {id(node) for node in written}
    readers: list[str] = []
    for node in written:
        for tensor in node.outputs:
            for reader in tensor.outputs:
                name = reader.name or reader.op
                if id(reader) not in chains and name not in readers:
                    readers.append(name)
    return {"ops": dict(collections.Counter(node.op for node in written)), "readers": readers}
