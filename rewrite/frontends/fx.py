"""The torch frontend: nn.Module <-> IR through torch.fx."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterable, NamedTuple

import torch
import torch.fx as fx

from ..errors import RewriteError
from ..ir import Graph
from .capture import capture_module, check_compiled_wrapper
from .fx_emit import emit_graph_module
from .fx_graph import check_attribute_names
from .fx_import import FxImporter
from .meta_shapes import record_meta_shapes
from .module_calls import compiled_original
from .param_folding import fold_parameter_expressions
from .scatter_forms import rewrite_scatters


class _BufferGuard:
    """Copies of a module's buffers, taken when asked (`arm`), put back on `restore`."""

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.saved: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def arm(self) -> None:
        """Copy every buffer now (once): code that may write one is about to run."""
        if self.saved is None:
            self.saved = [(b, b.detach().clone()) for b in self.module.buffers()]

    def restore(self) -> None:
        with torch.no_grad():
            for buffer, copy in self.saved or ():
                buffer.copy_(copy)


@contextmanager
def preserved_buffers(module: torch.nn.Module, lazy: bool = False):
    """Run code that may update buffers (BN statistics in training mode) without changing `module`.

    lazy: the buffers are copied only at the guard's first `arm()` (most imports run no code at all)."""
    guard = _BufferGuard(module)
    if not lazy:
        guard.arm()
    try:
        yield guard
    finally:
        guard.restore()


class TensorShape(NamedTuple):
    """What the import reads of a traced tensor. torch's TensorMetadata also finds the memory format,
    trying each in turn: about 90 us a node, 15 ms on a ResNet-50, all unread."""

    shape: torch.Size
    dtype: torch.dtype


class _ShapeRecorder(fx.Interpreter):
    """Runs the traced graph once and records each tensor's shape and dtype in node.meta["tensor_meta"].

    (torch's ShapeProp does the same but prints a traceback of its own when the model fails.)
    """

    failure: RewriteError | None = None

    def run_node(self, n: fx.Node):
        try:
            result = super().run_node(n)
        except Exception as exc:
            if self.failure is None:  # the innermost failing node names the place
                place = f"module '{n.target}'" if n.op == "call_module" else f"node {n.name} ({n.target})"
                cause = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                self.failure = RewriteError(
                    f"the model does not run on the example inputs: {type(exc).__name__}: {cause}", where=place)
            raise
        if isinstance(result, torch.Tensor):
            n.meta["tensor_meta"] = TensorShape(result.shape, result.dtype)
        elif isinstance(result, (tuple, list)) and result and all(isinstance(r, torch.Tensor) for r in result):
            n.meta["tensor_meta"] = tuple(TensorShape(r.shape, r.dtype) for r in result)  # split / chunk pieces
        return result


def as_tuple(example_inputs) -> tuple:
    if example_inputs is None:
        return ()
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


def import_module(module: torch.nn.Module, example_inputs=None, concrete_args: dict[str, Any] | None = None,
                  leaf_modules: Iterable[type | str] = (), capture: str = "auto", fold: bool = True) -> Graph:
    """Capture `module` (capture.py says how) and build its IR; shapes and dtypes are filled in when
    example inputs are given. Parameter expressions are folded to constants on either path, unless
    `fold=False` (an analysis of the model's own structure: which parameters forward reads directly)."""
    if not isinstance(module, torch.nn.Module):
        raise RewriteError(f"expected an nn.Module, got {type(module).__name__}")
    inputs = as_tuple(example_inputs)
    wrapper, (module, unwrapped) = module, compiled_original(module)
    if module is not wrapper:
        check_compiled_wrapper(wrapper, module)
    captured = capture_module(module, inputs, capture, concrete_args, leaf_modules)
    graph = import_captured(captured.root, captured.graph, inputs, model_name=type(module).__name__, fold=fold)
    graph.meta["capture"] = captured.how
    graph.meta["capture_note"] = "; ".join(filter(None, (unwrapped, captured.note)))
    return graph


def import_captured(root: torch.nn.Module, fx_graph: fx.Graph, inputs: tuple, model_name: str,
                    fold: bool = True) -> Graph:
    """The IR of a captured graph: shapes recorded on the example inputs, parameter expressions folded."""
    module = root
    if inputs:
        check_attribute_names({n.target.split(".")[0] for n in fx_graph.nodes if n.op in ("call_module", "get_attr")})
        gm = fx.GraphModule(module, fx_graph)
        _record_shapes(module, gm, inputs, model_name)
    folded = {}
    if fold:
        with preserved_buffers(module, lazy=True) as guard:
            folded = fold_parameter_expressions(module, fx_graph, before_call=guard.arm)
    rewrite_scatters(fx_graph, folded)
    return FxImporter(module, fx_graph, folded).run()


def _record_shapes(module: torch.nn.Module, gm: fx.GraphModule, inputs: tuple, model_name: str) -> None:
    """node.meta["tensor_meta"] of every tensor: from a pass on meta tensors where that is safe (no arithmetic),
    else from running the model on the example inputs."""
    found = record_meta_shapes(gm, inputs)
    if found is not None:
        for n, meta in found.items():
            n.meta["tensor_meta"] = TensorShape(*meta) if isinstance(meta[0], torch.Size) else \
                tuple(TensorShape(*m) for m in meta)
        return
    recorder = _ShapeRecorder(gm)
    try:
        with preserved_buffers(module), torch.no_grad():
            recorder.run(*inputs)
    except Exception as exc:
        if recorder.failure is not None:
            raise recorder.failure from None
        raise RewriteError(f"the model does not run on the example inputs: {type(exc).__name__}: {exc}",
                           where=f"model {model_name}") from None


def export_module(graph: Graph, copy_originals: bool = True) -> fx.GraphModule:
    """Build a GraphModule from the IR. With copy_originals, nothing is shared with the input model."""
    return emit_graph_module(graph, copy_originals)
