"""Frontends turn a model into the IR and back. Each one is a `Frontend`; `frontend_for` picks it."""
from __future__ import annotations

import os
from typing import Any

import torch

from ..errors import RewriteError
from ..ir import Graph


class Frontend:
    """How one kind of model is loaded into the IR, written back, and checked numerically."""

    name = "frontend"
    options: tuple[str, ...] = ()  # the keyword arguments `load` takes beyond the model and inputs

    def load(self, model: Any, example_inputs=None, **options) -> Graph:
        raise NotImplementedError

    def export(self, graph: Graph, copy_originals: bool = True) -> Any:
        raise NotImplementedError

    def verify(self, original: Any, rewritten: Any, example_inputs=None, **options):
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


def is_onnx_model(model: Any) -> bool:
    if isinstance(model, (str, os.PathLike)):
        return str(model).endswith(".onnx")
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
