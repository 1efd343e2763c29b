"""Capture an nn.Module as a torch.fx graph, turning tracer failures into a clear TraceError."""
from __future__ import annotations

import os
import traceback
from typing import Any, Iterable

import torch
import torch.fx as fx

from ..errors import TraceError

_TORCH_DIR = os.path.dirname(torch.__file__)


class _Tracer(fx.Tracer):
    """The default tracer, plus user leaf modules and a record of where a failure happened."""

    def __init__(self, leaf_modules: Iterable[type | str] = ()):
        super().__init__()
        self.extra_leaves = tuple(leaf_modules)

    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        for leaf in self.extra_leaves:
            if (isinstance(leaf, str) and leaf == qualname) or (isinstance(leaf, type) and isinstance(m, leaf)):
                return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as exc:  # remember the innermost module that failed
            if not hasattr(exc, "_rewrite_module"):
                try:
                    exc._rewrite_module = (self.path_of_module(m) or "<root>", type(m).__name__)
                except Exception:
                    exc._rewrite_module = ("?", type(m).__name__)
            raise


def trace(module: torch.nn.Module, concrete_args: dict[str, Any] | None = None,
          leaf_modules: Iterable[type | str] = ()) -> fx.Graph:
    """Trace `module` to an fx.Graph, or raise TraceError naming the module and source line."""
    tracer = _Tracer(leaf_modules)
    try:
        return tracer.trace(module, concrete_args=concrete_args)
    except Exception as exc:
        raise _trace_error(module, exc) from None


def _trace_error(module: torch.nn.Module, exc: Exception) -> TraceError:
    path, cls = getattr(exc, "_rewrite_module", ("<root>", type(module).__name__))
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith(_TORCH_DIR)]
    line = f"{frames[-1].filename}:{frames[-1].lineno}: {frames[-1].line}" if frames else "unknown line"
    hint = _hint(exc)
    message = (f"cannot trace module '{path}' ({cls}) at {line}\n  cause: {type(exc).__name__}: {exc}\n"
               f"  try: {hint}")
    return TraceError(message, where=f"module '{path}'")


def _hint(exc: Exception) -> str:
    text = str(exc)
    if "control flow" in text or "iteration" in text or "len(" in text or "__len__" in text or "__bool__" in text:
        return ("the forward depends on tensor values or sizes; pass concrete_args for the inputs that "
                "steer it, mark that submodule as a leaf (leaf_modules=[...]), or rewrite a smaller submodule")
    return ("mark the failing submodule as a leaf (leaf_modules=[...]), pass concrete_args, or rewrite a "
            "smaller submodule")
