"""Numerical equivalence of two ONNX models in onnxruntime, on random inputs of the declared shapes."""
from __future__ import annotations

import os
import re
import tempfile
from typing import Any

import numpy as np
import onnx
import torch

from ..errors import ModelLoadError, NotVerifiableError, RewriteError
from ..files import first_line
from ..verify import FLOAT64_REFERENCE, VerifyResult
from .onnx_io import PROTOBUF_LIMIT, approx_size, describe, load_onnx, save_onnx
from .onnx_weights import load_lazily

SYMBOLIC_DIM = 2  # the size drawn for a symbolic dimension (a dynamic batch, say)
FLOAT64_REFERENCE_LIMIT = 1 << 30  # bytes of weights past which verification judges against the float32 original


def _model(model_or_path, with_weights: bool = False) -> onnx.ModelProto:
    """The model, checked. A path's external data stays on disk (onnxruntime reads the file itself) unless
    `with_weights` and the weights are small enough for a float64 copy, which needs them in memory."""
    if not isinstance(model_or_path, (str, os.PathLike)):
        return model_or_path
    model, weights = load_lazily(model_or_path)
    if weights is not None and with_weights and approx_size(model) <= FLOAT64_REFERENCE_LIMIT:
        return load_onnx(model_or_path)
    return model


# onnxruntime's words for "no kernel for this op": a model it cannot run is not verifiable, not bad input.
_UNKNOWN_OP = re.compile(r"is not a registered function/op|Could not find an implementation|"
                         r"No opset import for domain", re.IGNORECASE)


def _ort():
    """onnxruntime, with its log (coloured, on stderr) down to errors it does not also raise."""
    import onnxruntime as ort

    ort.set_default_logger_severity(4)  # fatal only: every failure reaches us as an exception anyway
    return ort


def session(model: onnx.ModelProto, source=None, original: bool = False):
    """An onnxruntime session without graph optimizations, so the runtime does not fold BN itself.

    A model whose op onnxruntime has no kernel for (a custom domain, say) raises NotVerifiableError
    when it is the original: the rewrite may well be right, it just cannot be run to check it.
    """
    ort = _ort()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    options.log_severity_level = 4
    where = describe(source if source is not None else model)
    try:
        if isinstance(source, (str, os.PathLike)):
            return ort.InferenceSession(os.fspath(source), options, providers=["CPUExecutionProvider"])
        if approx_size(model) >= PROTOBUF_LIMIT:  # one protobuf cannot hold it: through a temporary file
            with tempfile.TemporaryDirectory(prefix="rewrite-verify-") as folder:
                path = save_onnx(model, os.path.join(folder, "model.onnx"), external_data=True)
                return ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        message = first_line(exc)
        if original and _UNKNOWN_OP.search(message):
            raise NotVerifiableError(f"onnxruntime cannot run the model, so the rewrite cannot be checked "
                                     f"numerically: {message}", where=where) from None
        raise _failure("load", message, where, original) from None


def _failure(step: str, message: str, where: str, original: bool) -> RewriteError:
    """An onnxruntime failure named as the model's and, when onnxruntime says, the node's: bad input
    (ModelLoadError) for the original; for a rewritten model a RewriteError, which `apply` reports as an
    EquivalenceError of the pass that made it."""
    found = _ORT_NODE.search(message)
    where += f", node {found.group(1) or found.group(2)}" if found else ""
    if original:
        return ModelLoadError(f"onnxruntime cannot {step} the model: {message}", where=where)
    return RewriteError(f"onnxruntime cannot {step} the model: {message}", where=where)


_ORT_NODE = re.compile(r"Node \(([^)]+)\)|[Nn]ode\.? Name:\s*'([^']*)'")


def run_session(sess, feeds, model: onnx.ModelProto, source=None, original: bool = False) -> list:
    """sess.run, with a failure (a malformed node onnxruntime only notices when it runs) named as the model's."""
    try:
        return sess.run(None, feeds)
    except Exception as exc:
        message = first_line(exc)
        if original and feeds:
            message += f" (on inputs {describe_feeds(feeds)}; give others with --input-shape NAME:dims)"
        raise _failure("run", message, describe(source if source is not None else model), original) from None


# Sizes tried for a symbolic dim past the batch axis (H, W, a sequence), first the common image sizes:
# the first that onnx's shape inference accepts through the whole graph is drawn (a flatten -> Gemm head
# admits one H / W only).
SPATIAL_CANDIDATES = (224, 32, 64, 128, 256, 16, 8, 299, 384, 512, 7, 14, 28, 56, 112, 96, 160, 192, 320, 448)


def graph_inputs(model: onnx.ModelProto) -> list:
    initializers = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in initializers]


def _symbols(model: onnx.ModelProto) -> list[tuple[str, int]]:
    """(symbol, axis of its first use) for every symbolic dim of the graph inputs; unnamed dims get a name."""
    found: dict[str, int] = {}
    for value in graph_inputs(model):
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            if not dim.HasField("dim_value"):
                found.setdefault(dim.dim_param or f"?{value.name}:{axis}", axis)
    return list(found.items())


def _infers(model: onnx.ModelProto, sizes: dict[str, int]) -> bool:
    """Does strict shape inference go through the graph with the inputs' symbols set to `sizes`?"""
    from .onnx_io import weightless_copy

    light = weightless_copy(model, keep_dims=True)
    for value in graph_inputs(light):
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            size = sizes.get(dim.dim_param or f"?{value.name}:{axis}")
            if not dim.HasField("dim_value") and size is not None:
                dim.dim_value = size
    try:
        inferred = onnx.shape_inference.infer_shapes(light, data_prop=True, strict_mode=True)
    except Exception:
        return False
    return _gemms_agree(inferred)


def _gemms_agree(model: onnx.ModelProto) -> bool:
    """onnx's Gemm inference does not compare A's K with B's: do it, for a constant B."""
    dims = {t.name: list(t.dims) for t in model.graph.initializer}
    for info in list(model.graph.value_info) + list(model.graph.input):
        shape = info.type.tensor_type.shape
        dims.setdefault(info.name, [d.dim_value if d.HasField("dim_value") else None for d in shape.dim])
    for node in model.graph.node:
        if node.op_type != "Gemm" or len(node.input) < 2:
            continue
        a, b = dims.get(node.input[0]), dims.get(node.input[1])
        if not a or not b or len(a) != 2 or len(b) != 2:
            continue
        attrs = {x.name: x.i for x in node.attribute}
        k_a, k_b = a[0 if attrs.get("transA") else 1], b[1 if attrs.get("transB") else 0]
        if None not in (k_a, k_b) and k_a != k_b:
            return False
    return True


def choose_sizes(model: onnx.ModelProto, given: dict[str, tuple] | None = None, everything: bool = True
                 ) -> dict[str, int]:
    """A size for each symbolic dim of the graph inputs: from the `given` input shapes, else SYMBOLIC_DIM for
    a batch (axis 0) and, when `everything`, the first SPATIAL_CANDIDATES size the graph's shapes accept."""
    given = given or {}
    sizes: dict[str, int] = {}
    for value in graph_inputs(model):
        shape = given.get(value.name)
        if shape is None:
            continue
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            if not dim.HasField("dim_value") and axis < len(shape):
                sizes.setdefault(dim.dim_param or f"?{value.name}:{axis}", int(shape[axis]))
    rest = []
    for symbol, axis in _symbols(model):
        if symbol not in sizes and axis == 0:
            sizes[symbol] = SYMBOLIC_DIM
        elif symbol not in sizes:
            rest.append(symbol)
    if everything and rest:  # one size for all of them (square images), the first the graph accepts
        size = next((c for c in SPATIAL_CANDIDATES if _infers(model, {**sizes, **dict.fromkeys(rest, c)})),
                    SPATIAL_CANDIDATES[0])
        sizes.update(dict.fromkeys(rest, size))
    return sizes


def check_input_shapes(model: onnx.ModelProto, shapes: dict[str, tuple], where: str) -> None:
    """User-given input shapes name real inputs and agree with their static dims."""
    from ..errors import ModelLoadError
    from ..pass_manager import _near

    inputs = {v.name: v for v in graph_inputs(model)}
    for name, shape in shapes.items():
        if name not in inputs:
            raise ModelLoadError(f"--input-shape names {name!r}{_near(name, inputs)}, which is not an input of the "
                                 f"model ({', '.join(inputs)})", where=where)
        dims = inputs[name].type.tensor_type.shape.dim
        declared = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]
        if len(shape) != len(dims) or any(isinstance(d, int) and d != s for d, s in zip(declared, shape)):
            raise ModelLoadError(f"input {name!r} is declared {declared}; the shape given, {list(shape)}, does not "
                                 "fit it", where=where)


def describe_feeds(feeds: dict[str, np.ndarray]) -> str:
    return ", ".join(f"{name} {'x'.join(map(str, a.shape)) or 'scalar'}" for name, a in feeds.items())


def random_inputs(model: onnx.ModelProto, seed: int = 0, shapes: dict[str, tuple] | None = None
                  ) -> dict[str, np.ndarray]:
    """One random array per graph input (initializers excluded), of the `shapes` given, else of the declared
    shapes with symbolic dims from choose_sizes (the same symbol gets the same size everywhere)."""
    rng = np.random.default_rng(seed)
    sizes = choose_sizes(model, shapes)
    feeds = {}
    for value in graph_inputs(model):
        tensor_type = value.type.tensor_type
        shape = []
        for axis, dim in enumerate(tensor_type.shape.dim):
            shape.append(dim.dim_value if dim.HasField("dim_value") else sizes[dim.dim_param or f"?{value.name}:{axis}"])
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        if np.issubdtype(dtype, np.floating):
            feeds[value.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            feeds[value.name] = rng.integers(0, 2, shape).astype(bool)
        else:
            feeds[value.name] = rng.integers(0, 4, shape).astype(dtype)
    return feeds


def as_feeds(model: onnx.ModelProto, example_inputs) -> dict[str, np.ndarray]:
    if isinstance(example_inputs, dict):
        return {k: np.asarray(v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v)
                for k, v in example_inputs.items()}
    inputs = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    initializers = {i.name for i in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in initializers]
    if len(inputs) != len(names):
        raise RewriteError(f"the model has {len(names)} inputs ({', '.join(names)}), got {len(inputs)} example inputs")
    return {n: (t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t))
            for n, t in zip(names, inputs)}


def _run(model: onnx.ModelProto, source, feeds, original: bool = False) -> list[np.ndarray]:
    source = source if not isinstance(source, onnx.ModelProto) else None
    return run_session(session(model, source, original), feeds, model, source, original)


def _tree(model: onnx.ModelProto, arrays) -> dict[str, torch.Tensor]:
    """Outputs by name, so a report names them as the model does."""
    return {proto.name: torch.from_numpy(np.asarray(a)) for proto, a in zip(model.graph.output, arrays)}


class OnnxReference:
    """The original's outputs in onnxruntime, and those of a float64 copy when it can be made and run."""

    def __init__(self, original, example_inputs: Any = None, tolerance: float | None = None, seed: int = 0, **_):
        self.model = _model(original, with_weights=tolerance is None)
        self.feeds = random_inputs(self.model, seed) if example_inputs is None else as_feeds(self.model, example_inputs)
        self.inputs_used = describe_feeds(self.feeds)
        self.tolerance = tolerance
        self.outputs = _tree(self.model, _run(self.model, original, self.feeds, original=True))
        self.high = None
        self.reference_name = "original"
        if approx_size(self.model) > FLOAT64_REFERENCE_LIMIT:
            self.reference_name = (f"original (no float64 copy: past {FLOAT64_REFERENCE_LIMIT >> 30} GB of weights it "
                                   "would take twice their memory again)")
        elif tolerance is None and any(t.is_floating_point() and t.dtype != torch.float64 for t in self.outputs.values()):
            try:
                high = float64_model(self.model)
                self.high = _tree(self.model, _run(high, high, float64_feeds(self.feeds)))
                self.reference_name = FLOAT64_REFERENCE
            except Exception as exc:  # an op without a double kernel: judge against the original, and say so
                why = _first_line(exc)
                why = why[why.index("Could not find"):] if "Could not find" in why else why  # the op, not the wrapper
                self.reference_name = f"original (onnxruntime cannot run its float64 copy: {why})"

    def check(self, rewritten) -> VerifyResult:
        from ..verify import judge

        candidate_model = _model(rewritten)
        try:
            candidate = _tree(candidate_model, _run(candidate_model, rewritten, self.feeds))
        except Exception as exc:
            result = VerifyResult(tolerance=self.tolerance, reference=self.reference_name)
            result.problems.append(f"the rewritten model does not run: {_first_line(exc)}")
            return result
        if list(candidate) != list(self.outputs):  # judge by position when the names changed
            candidate = dict(zip(self.outputs, candidate.values())) if len(candidate) == len(self.outputs) else candidate
        return judge(self.outputs, candidate, self.high, self.tolerance, self.reference_name)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


_FLOATS = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}


def _double_tensor(tensor: onnx.TensorProto) -> onnx.TensorProto:
    array = onnx.numpy_helper.to_array(tensor).astype(np.float64)
    return onnx.numpy_helper.from_array(array, tensor.name)


def float64_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` computing in double: float initializers, constants, casts and I/O types widened."""
    high = onnx.ModelProto()
    high.CopyFrom(model)
    graphs = [high.graph]
    while graphs:
        graph = graphs.pop()
        for i, tensor in enumerate(graph.initializer):
            if tensor.data_type in _FLOATS:
                graph.initializer[i].CopyFrom(_double_tensor(tensor))
        for value in list(graph.input) + list(graph.output) + list(graph.value_info):
            if value.type.tensor_type.elem_type in _FLOATS:
                value.type.tensor_type.elem_type = onnx.TensorProto.DOUBLE
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type in _FLOATS:
                    attr.t.CopyFrom(_double_tensor(attr.t))
                elif attr.name == "to" and node.op_type == "Cast" and attr.i in _FLOATS:
                    attr.i = onnx.TensorProto.DOUBLE
                elif attr.type == onnx.AttributeProto.GRAPH:
                    graphs.append(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    graphs.extend(attr.graphs)
    return high


def float64_feeds(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v.astype(np.float64) if np.issubdtype(v.dtype, np.floating) else v for k, v in feeds.items()}


def verify_onnx(original, rewritten, example_inputs: Any = None, dtype=None, tolerance: float | None = None,
                seed: int = 0, **_) -> VerifyResult:
    """Run both models in onnxruntime on the same inputs and judge every output, by output name."""
    return OnnxReference(original, example_inputs, tolerance, seed).check(rewritten)
