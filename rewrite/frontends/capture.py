"""Which capture path builds a torch model's graph: symbolic_trace, torch.export, or the first that works.

`capture="auto"` (the default) traces with torch.fx (milliseconds) and only when that fails, and
example inputs were given, exports with torch.export (seconds), saying so in the report.
`capture="fx"` never falls back; `capture="export"` always exports. When every path tried fails,
one TraceError gives each path's place and cause.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.fx as fx

from ..errors import RewriteError, TraceError
from .export_capture import export_program, program_graph
from .fx_trace import trace
from .module_calls import own_code

CAPTURES = ("auto", "fx", "export")


@dataclass
class Captured:
    root: torch.nn.Module  # resolves the graph's get_attr and call_module targets
    graph: fx.Graph
    how: str  # "fx" or "export"
    note: str = ""  # for the report: why this path was taken


def check_capture(capture: Any) -> str:
    if capture not in CAPTURES:
        import difflib

        near = difflib.get_close_matches(str(capture), CAPTURES, n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise RewriteError(f"capture={capture!r} is not a capture path{hint} (one of {', '.join(CAPTURES)})")
    return capture


def capture_module(module: torch.nn.Module, example_inputs: tuple, capture: str = "auto",
                   concrete_args: dict | None = None, leaf_modules: Iterable = ()) -> Captured:
    check_capture(capture)
    leaf_modules = _checked_leaves(leaf_modules)
    _check_root_call(module)
    if capture == "export":
        if not example_inputs:
            raise RewriteError("capture='export' needs example_inputs (torch.export runs the model on them)")
        return _exported(module, example_inputs, "torch.export (capture='export')")
    try:
        return Captured(module, trace(module, concrete_args, leaf_modules), "fx", _backward_hooks_note(module))
    except TraceError as fx_error:
        if capture == "fx":
            raise
        if not example_inputs:
            raise TraceError(f"{_body(fx_error)}\n  or pass example_inputs, so that torch.export can capture it "
                             "(capture='auto' falls back to it)", where=fx_error.where) from None
        try:
            return _exported(module, example_inputs, f"symbolic_trace failed ({fx_error.where}: "
                                                    f"{_body(fx_error).splitlines()[0]}); captured with torch.export")
        except TraceError as export_error:
            raise TraceError("neither capture path can take this model\n"
                             f"  symbolic_trace: {_indented(fx_error)}\n"
                             f"  torch.export: {_indented(export_error)}", where=fx_error.where) from None


def _checked_leaves(leaf_modules) -> tuple:
    """leaf_modules as a tuple of module classes and qualified names (one of them alone is taken too)."""
    if isinstance(leaf_modules, (str, type)):
        leaf_modules = (leaf_modules,)
    if not isinstance(leaf_modules, (list, tuple, set, frozenset)) or \
            not all(isinstance(leaf, str) or (isinstance(leaf, type) and issubclass(leaf, torch.nn.Module))
                    for leaf in leaf_modules):
        raise RewriteError(f"leaf_modules must list nn.Module classes or module paths, not {leaf_modules!r}",
                           where="leaf_modules")
    return tuple(leaf_modules)


def _check_root_call(module: torch.nn.Module) -> None:
    """A graph is captured from the model's forward: forward hooks on the model itself (or a forward set on
    the instance) would not be in it, and the result would silently compute something else."""
    _refuse_root_code(type(module).__name__, own_code(module, global_hooks=False, backward=False))


def check_compiled_wrapper(wrapper: torch.nn.Module, original: torch.nn.Module) -> None:
    """Forward hooks on a torch.compile wrapper run around the module it wraps, which is what is captured:
    they would be left out just the same. (Its forward, set on the instance, runs that module.)"""
    why = own_code(wrapper, global_hooks=False, backward=False, instance_forward=False)
    _refuse_root_code(f"the torch.compile wrapper of {type(original).__name__}", why)


def _refuse_root_code(what: str, why: str | None) -> None:
    if why:
        raise TraceError(f"cannot capture module '<root>' ({what}): {why}, which a captured graph would leave "
                         "out\n  try: remove them before rewriting and register them on the result, or rewrite "
                         "the submodule they wrap", where="module '<root>'")


def _backward_hooks_note(module: torch.nn.Module) -> str:
    """Backward hooks on the model change no output; the rewritten model does not carry them, which the
    report says."""
    if own_code(module, global_hooks=False) and not own_code(module, global_hooks=False, backward=False):
        return "the model's own backward hooks are not on the result (register them on it again if wanted)"
    return ""


def _exported(module: torch.nn.Module, example_inputs: tuple, note: str) -> Captured:
    program = export_program(module, example_inputs)
    root, graph = program_graph(program)
    return Captured(root, graph, "export", "; ".join(filter(None, (note, _backward_hooks_note(module)))))


def _body(error: RewriteError) -> str:
    """The message without its `where: ` prefix."""
    text = str(error)
    prefix = f"{error.where}: " if error.where else ""
    return text[len(prefix):] if text.startswith(prefix) else text


def _indented(error: RewriteError) -> str:
    return f"{error.where}: {_body(error)}".replace("\n", "\n    ")
