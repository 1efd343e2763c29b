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
    options = ("concrete_args", "leaf_modules")

    def load(self, model, example_inputs=None, concrete_args=None, leaf_modules=(), **_):
        from .fx import import_module

        return import_module(model, example_inputs, concrete_args, leaf_modules)

    def export(self, graph, copy_originals=True):
        from .fx import export_module

        return export_module(graph, copy_originals)

    def verify(self, original, rewritten, example_inputs=None, dtype=None, tolerance=None, **_):
        from ..verify import verify_torch

        return verify_torch(original, rewritten, example_inputs, dtype, tolerance)

    def reference(self, original, example_inputs=None, tolerance=None, **_):
        from ..verify import TorchReference

        return TorchReference(original, example_inputs, tolerance)

    def float64_copy(self, model, example_inputs=None):
        from ..verify import cast_floats, float64_copy

        return float64_copy(model), cast_floats(example_inputs, torch.float64), None


def is_onnx_model(model: Any) -> bool:
    """A ModelProto, or a path that is ONNX by its name (any case) or its content."""
    if isinstance(model, (str, os.PathLike)):
        return is_onnx_file(model)
    return type(model).__name__ == "ModelProto"


def frontend_for(model: Any) -> Frontend:
    if isinstance(model, torch.nn.Module):
        return TorchFrontend()
    if is_onnx_model(model):
        try:
            from .onnx import OnnxFrontend
        except ImportError as exc:  # the ONNX path is a separate module; say so plainly
            raise RewriteError(f"ONNX support is not available: {exc}") from None
        return OnnxFrontend()
    raise RewriteError(f"cannot rewrite a {type(model).__name__}: expected an nn.Module, an onnx.ModelProto "
                       "or a path to a .onnx file")
