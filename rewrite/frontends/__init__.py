"""Frontends turn a model into the IR and back. Each one is a `Frontend`; `frontend_for` picks it."""
from __future__ import annotations

import os
from typing import Any

import torch

from ..errors import RewriteError
from ..ir import Graph
from ..model_files import is_onnx_file


def chain(operands: list, step):
    """An n-ary add / mul as a chain of binary steps: step(acc, operand, last) for each operand after
    the first (`last` tells the final step, which backends write to the node's own output)."""
    acc = operands[0]
    for i, operand in enumerate(operands[1:]):
        acc = step(acc, operand, i == len(operands) - 2)
    return acc


class Frontend:
    """How one kind of model is loaded into the IR, written back, and checked numerically."""

    name = "frontend"
    options: tuple[str, ...] = ()  # the keyword arguments `load` takes beyond the model and inputs

    def load(self, model: Any, example_inputs=None, **options) -> Graph:
        raise NotImplementedError

    def export(self, graph: Graph, copy_originals: bool = True) -> Any:
        raise NotImplementedError

    def checkable(self, graph: Graph) -> Any:
        """The graph written back in a form `reference(...).check` runs (by default, the exported model)."""
        return self.export(graph, copy_originals=False)

    def notes(self, graph: Graph) -> list[str]:
        """Lines for the report about what loading the model did (constants folded, shapes used)."""
        return []

    def verify(self, original: Any, rewritten: Any, example_inputs=None, **options):
        return self.reference(original, example_inputs, **options).check(rewritten)

    def reference(self, original: Any, example_inputs=None, tolerance=None, **options):
        """The original's outputs (and a float64 reference), computed once; `.check(rewritten)` judges."""
        raise NotImplementedError

    def float64_copy(self, model: Any, example_inputs=None) -> tuple[Any, Any, str | None]:
        """(a float64 copy of the model, matching inputs, a note when the copy is not fully float64)."""
        raise NotImplementedError


class TorchFrontend(Frontend):
    name = "torch"
    options = ("concrete_args", "leaf_modules", "capture")

    def load(self, model, example_inputs=None, concrete_args=None, leaf_modules=(), capture="auto", **_):
        from .fx import import_module

        return import_module(model, example_inputs, concrete_args, leaf_modules, capture)

    def export(self, graph, copy_originals=True):
        from .fx import export_module

        return export_module(graph, copy_originals)

    def verify(self, original, rewritten, example_inputs=None, dtype=None, tolerance=None, **_):
        from ..verify import verify_torch

        return verify_torch(original, rewritten, example_inputs, dtype, tolerance)

    def reference(self, original, example_inputs=None, tolerance=None, **_):
        from ..verify import TorchReference
        from .module_calls import compiled_original

        return TorchReference(compiled_original(original)[0], example_inputs, tolerance)  # compiling takes seconds

    def float64_copy(self, model, example_inputs=None):
        from ..verify import cast_floats, float64_copy

        return float64_copy(model), cast_floats(example_inputs, torch.float64), None


class ExportedProgramFrontend(TorchFrontend):
    """A torch.export ExportedProgram in, an ExportedProgram out (re-exported from the rewritten graph,
    so its graph signature, state dict and constants are torch.export's own). Without example inputs,
    random ones of the shapes it was exported with are used."""

    name = "exported_program"
    options = ()

    def load(self, model, example_inputs=None, **_):
        from .export_capture import example_inputs_of, program_graph
        from .fx import as_tuple, import_captured

        inputs = as_tuple(example_inputs) or example_inputs_of(model)
        root, fx_graph = program_graph(model)
        graph = import_captured(root, fx_graph, inputs, model_name="ExportedProgram")
        graph.meta.update(capture="export", capture_note="", export_inputs=inputs)
        return graph

    def export(self, graph, copy_originals=True):
        from .export_capture import reexport
        from .fx import export_module

        return reexport(export_module(graph, copy_originals), graph.meta["export_inputs"])

    def checkable(self, graph):
        from .fx import export_module

        return export_module(graph, copy_originals=False)  # checked as a module: no re-export per pass

    def verify(self, original, rewritten, example_inputs=None, dtype=None, tolerance=None, **_):
        from ..verify import verify_torch
        from .export_capture import as_module

        inputs = _program_inputs(original, example_inputs)
        return verify_torch(as_module(original), as_module(rewritten), inputs, dtype, tolerance)

    def reference(self, original, example_inputs=None, tolerance=None, **_):
        from ..verify import TorchReference
        from .export_capture import as_module

        inputs = _program_inputs(original, example_inputs)
        return _ModuleReference(TorchReference(as_module(original), inputs, tolerance))

    def float64_copy(self, model, example_inputs=None):
        from ..verify import cast_floats, float64_copy
        from .export_capture import as_module

        inputs = _program_inputs(model, example_inputs)
        return float64_copy(as_module(model)), cast_floats(inputs, torch.float64), \
            "the float64 copy of an ExportedProgram is checked as its module"


def _program_inputs(program, example_inputs):
    """The given inputs, or random ones of the shapes the program was exported with."""
    from .export_capture import example_inputs_of

    return example_inputs if example_inputs is not None else example_inputs_of(program)


class _ModuleReference:
    """A TorchReference that also judges an ExportedProgram, through its module."""

    def __init__(self, reference):
        self.reference = reference

    def check(self, candidate):
        from .export_capture import as_module

        return self.reference.check(as_module(candidate))


def is_exported_program(model: Any) -> bool:
    return type(model).__name__ == "ExportedProgram" and hasattr(model, "graph_signature")


def is_onnx_model(model: Any) -> bool:
    """A ModelProto, or a path that is ONNX by its name (any case) or its content."""
    if isinstance(model, (str, os.PathLike)):
        return is_onnx_file(model)
    return type(model).__name__ == "ModelProto"


def frontend_for(model: Any) -> Frontend:
    if isinstance(model, torch.nn.Module):
        return TorchFrontend()
    if is_exported_program(model):
        return ExportedProgramFrontend()
    if is_onnx_model(model):
        try:
            from .onnx import OnnxFrontend
        except ImportError as exc:  # the ONNX path is a separate module; say so plainly
            raise RewriteError(f"ONNX support is not available: {exc}") from None
        return OnnxFrontend()
    raise RewriteError(f"cannot rewrite a {type(model).__name__}: expected an nn.Module, a torch.export "
                       "ExportedProgram, an onnx.ModelProto or a path to a .onnx file")
