"""The ONNX frontend: ModelProto (or a .onnx path) <-> IR, through onnx-graphsurgeon; checks in onnxruntime."""
from __future__ import annotations

import os
import re
from typing import Any

import numpy as np
import onnx

from ..errors import ModelLoadError, RewriteError
from ..files import first_line
from ..ir import Graph
from . import Frontend
from .onnx_export import emit_model
from .onnx_checks import full_check_error
from .onnx_import import OnnxImporter
from .onnx_io import check_onnx, describe, load_onnx, save_onnx, weightless_copy
from .onnx_weights import load_lazily
from .onnx_verify import OnnxReference, as_feeds, choose_sizes, float64_feeds, float64_model, random_inputs, verify_onnx

__all__ = ["OnnxFrontend", "load_onnx", "save_onnx", "import_onnx", "export_onnx", "verify_onnx", "random_inputs"]


# What strict shape inference says when a model's declared shapes (graph inputs, value_info) contradict
# what its ops compute: onnxruntime trusts the declarations of the original, so a rewrite that drops
# a stale one no longer loads. Such a model is bad input.
_CONTRADICTION = re.compile(r"Inferred shape and existing shape differ|Incompatible dimensions|"
                            r"Inferred elem type differs from existing elem type")


_STUB_DATA = re.compile(r"does not match the actual num elements 0")


def _inferred(model: onnx.ModelProto, where: str) -> tuple[onnx.ModelProto, ModelLoadError | None]:
    """A shape-inferred copy of `model` (left alone), value_info only: the weights are not copied.

    The strict, type-checked inference is the half of `onnx.checker.check_model(full_check=True)` that
    `check_onnx`'s checker call leaves out (it runs here on a copy without the weights, so a big model is
    not copied for it). A failure comes back as the error to raise once the importer has had its say:
    its own checks name the same fault more precisely (a group that does not divide, pads of the wrong length)."""
    light = weightless_copy(model, keep_dims=True)  # inference needs a weight's shape, never its values
    try:
        return onnx.shape_inference.infer_shapes(light, data_prop=True, strict_mode=True, check_type=True), None
    except Exception as exc:
        if _CONTRADICTION.search(str(exc)):
            raise ModelLoadError(f"the declared shapes contradict what the ops compute: {first_line(exc)}",
                                 where=where) from None
        # An op reading the values of a tensor the copy holds as dims only (external data not read yet) fails
        # on the copy, not on the model: no verdict then.
        failure = None if _STUB_DATA.search(str(exc)) else full_check_error(exc, where)
    try:  # the lenient inference still gives the importer the shapes it can
        return onnx.shape_inference.infer_shapes(light, data_prop=True), failure
    except Exception:  # inference helps with shapes; it is not a requirement
        return model, failure


def _symbol_sizes(model: onnx.ModelProto, example_inputs) -> dict[str, int]:
    """Sizes for the symbolic dims of graph inputs: from example inputs, else SYMBOLIC_DIM for a leading
    (batch) dim; other symbols stay unknown, so passes that need them refuse and ask for example inputs."""
    given = {}
    if example_inputs is not None:
        try:
            given = {name: tuple(np.shape(array)) for name, array in as_feeds(model, example_inputs).items()}
        except RewriteError:
            given = {}
    return choose_sizes(model, given, everything=False)


def _concretize_shapes(graph: Graph, model: onnx.ModelProto, example_inputs) -> None:
    """Value shapes for the passes: concrete ints (like the torch frontend's) or None.

    The importer decides on the symbolic shapes; passes see the shapes of one concrete run
    (symbols fixed from example inputs, or a leading batch symbol of SYMBOLIC_DIM). A value
    whose shape still depends on an unfixed symbol gets None, so passes refuse rather than guess.
    """
    sizes = _symbol_sizes(model, example_inputs)
    outputs = {id(v) for v in graph.outputs}
    values = list(graph.inputs) + [v for node in graph.nodes for v in node.outputs]
    unknown = []
    for value in values:
        if value.shape is not None and all(isinstance(d, int) for d in value.shape):
            continue
        # A graph output's symbols are names its user chose (dynamic_axes): one named like an input axis need
        # not have its size (a pooled [N, C, H, W] that is N x C x 1 x 1), so outputs take inference's shape.
        dims = None if value.shape is None or id(value) in outputs else \
            tuple(sizes.get(d) if isinstance(d, str) else d for d in value.shape)
        value.shape = dims if dims is not None and all(isinstance(d, int) for d in dims) else None
        if value.shape is None and value.name:
            unknown.append(value)
    if unknown and sizes:
        concrete = _concrete_shapes(model, sizes)
        for value in unknown:
            value.shape = concrete.get(value.name)
    graph.meta["onnx_input_sizes"] = sizes


def _concrete_shapes(model: onnx.ModelProto, sizes: dict[str, int]) -> dict[str, tuple]:
    """Every tensor's shape when the graph inputs' symbols take `sizes`: onnx's shape inference (with
    data propagation, so shape subgraphs count) on a weightless copy whose inputs are static."""
    light = weightless_copy(model, keep_dims=True)
    # The declared value_info too: the dynamo exporter writes intermediate shapes in the inputs' symbols
    # (s77 x 16 x 1 x 1), and inference keeps a declared symbol where it would have found the size.
    for value in list(light.graph.input) + list(light.graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if not dim.HasField("dim_value") and dim.dim_param in sizes:
                dim.dim_value = sizes[dim.dim_param]
    for value in light.graph.output:  # found by inference, not read from the names (above)
        if value.type.tensor_type.HasField("shape"):
            value.type.tensor_type.ClearField("shape")
    try:  # strict: a declared shape that these sizes contradict (a reused symbol name) is an error
        inferred = onnx.shape_inference.infer_shapes(light, data_prop=True, strict_mode=True)
    except Exception as exc:
        if _CONTRADICTION.search(str(exc)):
            raise ModelLoadError("the declared shapes contradict what the ops compute on the example inputs' sizes "
                                 f"({', '.join(f'{k}={v}' for k, v in sizes.items())}): {first_line(exc)}",
                                 where=describe(model)) from None
        try:
            inferred = onnx.shape_inference.infer_shapes(light, data_prop=True)
        except Exception:  # shapes help the passes; without them they refuse, saying so
            return {}
    found = {}
    for info in list(inferred.graph.value_info) + list(inferred.graph.output):
        tensor_type = info.type.tensor_type
        if tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in tensor_type.shape.dim):
            found[info.name] = tuple(d.dim_value for d in tensor_type.shape.dim)
    return found


def _check_external_data_loaded(model: onnx.ModelProto) -> None:
    """A ModelProto does not know its folder: external data left unloaded would be read against the working
    directory, so it is refused (a path is loaded with its data, from the model's folder)."""
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = next((e.value for e in tensor.external_data if e.key == "location"), "?")
            raise ModelLoadError(f"initializer {tensor.name!r} keeps its data in {location!r}, which was not loaded: "
                                 "pass the model's path, or onnx.load it with load_external_data=True",
                                 where=describe(model))


def import_onnx(model_or_path: Any, example_inputs=None, fold_constants: bool = False) -> Graph:
    """Load (and check) an ONNX model or path and build its IR. The input model is never changed.

    Constant subgraphs are folded for the passes; `fold_constants=True` also writes those no rewrite
    consumed as initializers (by default they are written back as they were)."""
    weights = None
    if isinstance(model_or_path, (str, os.PathLike)):
        model, weights = load_lazily(model_or_path)  # external data read by the importer, once
    elif isinstance(model_or_path, onnx.ModelProto):
        model = model_or_path
        _check_external_data_loaded(model)
        check_onnx(model)
    else:
        raise ModelLoadError(f"expected an onnx.ModelProto or a .onnx path, got {type(model_or_path).__name__}")
    inferred, check_failure = _inferred(model, describe(model_or_path))
    graph = OnnxImporter(model, inferred, describe(model_or_path), fold_constants=fold_constants,
                         weights=weights).run()
    if check_failure is not None:
        raise check_failure
    _concretize_shapes(graph, model, example_inputs)
    return graph


def export_onnx(graph: Graph) -> onnx.ModelProto:
    """The IR written back as a ModelProto; untouched nodes exactly as they came."""
    return emit_model(graph)


def import_notes(graph: Graph) -> list[str]:
    """What the import did that the passes' reports do not say: constants folded, and how they are written."""
    folded = graph.meta.get("onnx_folded", 0)
    if not folded:
        return []
    left = graph.meta.get("onnx_folded_written", 0)  # counted by the last export
    kept = graph.meta.get("onnx_folded_kept", {"ops": {}, "readers": []})
    as_nodes = sum(kept["ops"].values())
    parts = []
    if as_nodes:  # the passes never saw these: say what they are, or an Add left in the file has no reason
        ops = ", ".join(f"{n} {op}" for op, n in sorted(kept["ops"].items(), key=lambda item: (-item[1], item[0])))
        parts.append(f"{as_nodes} written back as they were ({ops}: computing constant inputs of "
                     f"{_some(kept['readers'])}, not sites of any pass; fold_constants=True writes them as initializers)")
    if left - as_nodes:
        why = "" if graph.meta.get("onnx_fold_constants") else " (a Shape / CastLike that reads a non-constant)"
        parts.append(f"{left - as_nodes} written back as initializers{why}")
    parts.append(f"{folded - left} no longer needed after the rewrites")
    return [f"constant folding at import: {folded} nodes folded; " + ", ".join(parts)]


def _some(names: list[str], shown: int = 3) -> str:
    more = len(names) - shown
    return ", ".join(names[:shown]) + (f" and {more} more" if more > 0 else "") if names else "the graph outputs"


class OnnxFrontend(Frontend):
    name = "onnx"
    options = ("fold_constants",)

    def load(self, model_or_path, example_inputs=None, fold_constants=False, **_):
        graph = import_onnx(model_or_path, example_inputs, fold_constants)
        graph.meta["onnx_fold_constants"] = fold_constants
        return graph

    def notes(self, graph):
        declared = {i.name: [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                             for d in i.type.tensor_type.shape.dim] for i in graph.meta["onnx_model"].graph.input}
        shapes = ", ".join(f"{v.name} " + ("x".join(map(str, v.shape)) if v.shape is not None else
                                           "x".join(map(str, declared.get(v.name, ["?"]))) + " (symbolic: pass "
                                           "example inputs / --input-shape to fix them)") for v in graph.inputs)
        lines = [f"input shapes for the passes: {shapes}"]
        if getattr(self, "verified_on", None):
            lines.append(f"verified on inputs: {self.verified_on}")
        return import_notes(graph) + lines

    def export(self, graph, copy_originals=True):
        return export_onnx(graph)  # always a new ModelProto; nothing is shared with the input

    def verify(self, original, rewritten, example_inputs=None, dtype=None, tolerance=None, **options):
        return verify_onnx(original, rewritten, example_inputs, dtype=dtype, tolerance=tolerance, **options)

    def reference(self, original, example_inputs=None, tolerance=None, **options):
        reference = OnnxReference(original, example_inputs, tolerance, **options)
        self.verified_on = reference.inputs_used  # for the report's notes
        return reference

    def float64_copy(self, model, example_inputs=None):
        source = load_onnx(model) if isinstance(model, (str, os.PathLike)) else model
        feeds = None if example_inputs is None else float64_feeds(as_feeds(source, example_inputs))
        return float64_model(source), feeds, None
