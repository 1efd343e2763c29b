"""Numerical equivalence of two ONNX models in onnxruntime, on random inputs of the declared shapes."""
from __future__ import annotations

import os
import re
from typing import Any

import numpy as np
import onnx
import torch

from ..errors import NotVerifiableError, RewriteError
from ..files import first_line
from ..verify import DEFAULT_TOLERANCE, VerifyResult, compare_outputs
from .onnx_io import describe, load_onnx

SYMBOLIC_DIM = 2  # the size drawn for a symbolic dimension (a dynamic batch, say)


def _model(model_or_path) -> onnx.ModelProto:
    if isinstance(model_or_path, (str, os.PathLike)):
        return load_onnx(model_or_path)
    return model_or_path


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
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        message = first_line(exc)
        if original and _UNKNOWN_OP.search(message):
            raise NotVerifiableError(f"onnxruntime cannot run the model, so the rewrite cannot be checked "
                                     f"numerically: {message}", where=where) from None
        raise RewriteError(f"onnxruntime cannot load the model: {message}", where=where) from None


def run_session(sess, feeds, model: onnx.ModelProto, source=None) -> list:
    """sess.run, with a failure (a malformed node onnxruntime only notices when it runs) named as the model's."""
    try:
        return sess.run(None, feeds)
    except Exception as exc:
        raise RewriteError(f"onnxruntime cannot run the model: {first_line(exc)}",
                           where=describe(source if source is not None else model)) from None


def random_inputs(model: onnx.ModelProto, seed: int = 0, symbolic_size: int = SYMBOLIC_DIM) -> dict[str, np.ndarray]:
    """One random array per graph input (initializers excluded); symbolic dims get `symbolic_size`."""
    rng = np.random.default_rng(seed)
    initializers = {i.name for i in model.graph.initializer}
    sizes: dict[str, int] = {}
    feeds = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        shape = []
        for dim in tensor_type.shape.dim:
            if dim.HasField("dim_value"):
                shape.append(dim.dim_value)
            else:  # the same symbol gets the same size everywhere
                shape.append(sizes.setdefault(dim.dim_param or f"?{len(sizes)}", symbolic_size))
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


def verify_onnx(original, rewritten, example_inputs: Any = None, dtype=None, tolerance: float | None = None,
                seed: int = 0, **_) -> VerifyResult:
    """Run both models in onnxruntime on the same inputs; max abs/rel error per output, by output name."""
    a, b = _model(original), _model(rewritten)
    feeds = random_inputs(a, seed) if example_inputs is None else as_feeds(a, example_inputs)
    source_a = original if not isinstance(original, onnx.ModelProto) else None
    source_b = rewritten if not isinstance(rewritten, onnx.ModelProto) else None
    out_a = run_session(session(a, source_a, original=True), feeds, a, source_a)
    out_b = run_session(session(b, source_b), feeds, b, source_b)
    first_float = next((o.dtype for o in out_a if np.issubdtype(o.dtype, np.floating)), np.dtype(np.float32))
    run_dtype = torch.from_numpy(np.empty(0, dtype=first_float)).dtype
    tol = tolerance if tolerance is not None else DEFAULT_TOLERANCE.get(run_dtype, 1e-5)
    result = compare_outputs([torch.from_numpy(np.asarray(o)) for o in out_a],
                             [torch.from_numpy(np.asarray(o)) for o in out_b], tol, str(run_dtype).replace("torch.", ""))
    for entry, proto in zip(result.outputs, a.graph.output):
        entry.name = proto.name
    return result
