"""Capture an nn.Module as a torch.fx graph, turning tracer failures into a clear TraceError."""
from __future__ import annotations

import copy
import logging
import os
import traceback
from collections import OrderedDict
from typing import Any, Iterable

import torch
import torch.fx as fx
import torch.fx.traceback as fx_traceback
from torch.fx.proxy import Scope
from torch.fx.proxy import log as _proxy_log

from ..errors import TraceError
from .fx_internals import PLAIN_VALUES, add_node, shortcuts_valid
from .trace_shortcuts import Shortcuts

_TORCH_DIR = os.path.dirname(torch.__file__)
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _ModuleStack(OrderedDict):
    """fx's module call stack, copied into every traced node's meta. The copy is made directly
    (copy.copy's generic reduce path cost about 5% of tracing a timm model), once per state of the
    stack: the nodes traced between two module calls share it. Nothing edits or reads it after
    tracing (the import does not; the graph stays ours), so one object per state is the same data,
    with a few thousand fewer for the collector to walk."""

    _snapshot: OrderedDict | None = None

    def __setitem__(self, key, value):
        self._snapshot = None
        super().__setitem__(key, value)

    def __delitem__(self, key):
        self._snapshot = None
        super().__delitem__(key)

    def popitem(self, last: bool = True):
        self._snapshot = None
        return super().popitem(last)

    def pop(self, *args):
        self._snapshot = None
        return super().pop(*args)

    def clear(self):
        self._snapshot = None
        super().clear()

    def move_to_end(self, key, last: bool = True):
        self._snapshot = None
        super().move_to_end(key, last)

    def setdefault(self, key, default=None):
        self._snapshot = None
        return super().setdefault(key, default)

    def __copy__(self):
        if self._snapshot is None:
            self._snapshot = OrderedDict(self)
        return self._snapshot


class _Scope(Scope):
    """fx's current scope, saved on entry to every module call: the same copy, made directly."""

    def __copy__(self):
        return Scope(self.module_path, self.module_type)


class _Tracer(fx.Tracer):
    """The default tracer, plus user leaf modules and a record of where a failure happened."""

    def __init__(self, leaf_modules: Iterable[type | str] = (), shortcuts: bool = True):
        super().__init__()
        self.shortcuts = Shortcuts() if shortcuts else None
        self.known_internals = shortcuts_valid()  # fx's code is the code the dict path below was read from
        self.extra_leaves = tuple(leaf_modules)
        self.module_stack = _ModuleStack()
        self.scope = _Scope("", None)

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None) -> fx.Node:
        # fx's TracerBase.create_node and Graph.create_node, done directly for what a symbolic trace of a
        # module records (no mutable-operation check, no preserved node meta or stack traces, no debug log,
        # a graph of fx's own class without an owning module). Graph.create_node scans every node's
        # arguments with pytree for a raw SymInt to warn about, a fifth of tracing: here the arguments are
        # checked to hold only plain values and nodes (no SymInt among them), and anything else takes
        # fx's path.
        graph = self.graph
        if not (self.known_internals and type(graph) is fx.Graph
                and not self.check_mutable_operations and not self.record_stack_traces
                and not fx_traceback.has_preserved_node_meta() and not _proxy_log.isEnabledFor(logging.DEBUG)):
            return super().create_node(kind, target, args, kwargs, name, type_expr)
        node = add_node(graph, kind, target, args, kwargs, name, type_expr)
        self.node_name_to_scope[node.name] = (self.scope.module_path, self.scope.module_type)
        if self.module_stack:
            node.meta["nn_module_stack"] = copy.copy(self.module_stack)
        return node

    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        for leaf in self.extra_leaves:
            if (isinstance(leaf, str) and leaf == qualname) or (isinstance(leaf, type) and isinstance(m, leaf)):
                return True
        if self.shortcuts is not None and self.shortcuts.is_leaf(m):
            return True
        return super().is_leaf_module(m, qualname)

    def create_arg(self, a: Any):
        # Plain Python values, proxies and plain containers: what fx's own checks end in for these
        # exact types (none is a parameter, buffer, module, constant tensor or proxyable class),
        # without running every check on each of the ~10 arguments a node has.
        kind = type(a)
        if kind in PLAIN_VALUES:
            return a
        if kind is fx.Proxy:
            return a.node
        if kind is tuple:
            return tuple([self.create_arg(item) for item in a])
        if kind is list:
            return [self.create_arg(item) for item in a]
        # A call's kwargs, a plain dict keyed by names: fx's generic path (the parameter, tensor, module and
        # constant checks, none of which a dict passes) ends in converting each value. The keys are checked
        # first, as converting a value can record a node: any other key takes fx's path from the start.
        if kind is dict and self.known_internals and all(type(k) is str for k in a):
            return {k: self.create_arg(v) for k, v in a.items()}
        # torch.fx finds a parameter or buffer argument by scanning all of them, once per argument:
        # quadratic on models that hand their parameters to functions (timm's BatchNormAct2d). Same
        # answer (the first name of that tensor), looked up instead.
        if isinstance(a, torch.Tensor) and isinstance(getattr(self, "root", None), torch.nn.Module):
            names = self._tensor_names()
            name = names[0].get(id(a)) if isinstance(a, torch.nn.Parameter) else names[1].get(id(a))
            if name is not None:
                return self.create_node("get_attr", name, (), {})
        return super().create_arg(a)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict):
        # The same quadratic scan when a module reads its own parameter (self.weight) in forward.
        if isinstance(attr_val, torch.Tensor) and not self.param_shapes_constant and \
                isinstance(getattr(self, "root", None), torch.nn.Module):
            params, buffers = self._tensor_names()
            if isinstance(attr_val, torch.nn.Parameter):
                name = params.get(id(attr_val))
            else:
                name = buffers.get(id(attr_val)) if self.proxy_buffer_attributes else None
            if name is not None:
                if name not in parameter_proxy_cache:
                    parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {})
                return parameter_proxy_cache[name]
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def _tensor_names(self) -> tuple[dict[int, str], dict[int, str]]:
        cached = getattr(self, "_names_cache", None)
        if cached is None or cached[0] is not self.root:
            cached = self._names_cache = (self.root, _ModuleWalk(self.root).names())
        return cached[1]

    def call_module(self, m, forward, args, kwargs):
        shortcut = self.shortcuts.forward_for(m) if self.shortcuts is not None else None
        try:
            return super().call_module(m, shortcut or forward, args, kwargs)
        except Exception as exc:  # remember the innermost module that failed
            if not hasattr(exc, "_rewrite_module"):
                try:
                    exc._rewrite_module = (self.path_of_module(m) or "<root>", type(m).__name__)
                except Exception:  # not in the module tree: built inside forward
                    exc._rewrite_module = (f"<{type(m).__name__} built inside forward>", type(m).__name__)
            raise


def trace(module: torch.nn.Module, concrete_args: dict[str, Any] | None = None,
          leaf_modules: Iterable[type | str] = (), shortcuts: bool = True) -> fx.Graph:
    """Trace `module` to an fx.Graph, or raise TraceError naming the module and source line.

    shortcuts: trace known library forwards without their shape assertions (trace_shortcuts.py)."""
    tracer = _Tracer(leaf_modules, shortcuts)
    walk = _ModuleWalk(module)
    tracer._names_cache = (module, walk.names())
    saved, buffers = walk.containers, walk.buffer_copies()
    try:
        graph = tracer.trace(module, concrete_args=concrete_args)
    except Exception as exc:
        raise _trace_error(module, exc) from None
    finally:
        _restore(saved)
        # `.data` and views written in place do not all bump the buffer's version: compare the values too
        changed = [(name, b, value) for name, b, version, value in buffers
                   if b._version != version or not _same(b, value)]
        with torch.no_grad():
            for _, b, value in changed:
                b.copy_(value)
        written = [name for name, _, _ in changed]
    if written:
        # fx runs code on buffers eagerly (they are not proxied): the update would happen once, here, on
        # the user's model, and the graph would read a stale copy ever after
        raise TraceError(f"cannot trace module '<root>' ({type(module).__name__}): its forward writes buffer(s) "
                         f"{', '.join(written[:3])} in place, which fx would freeze as constants\n"
                         "  try: capture='export' (with example_inputs), which keeps buffer updates",
                         where=f"buffer '{written[0]}'")
    return graph


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a, b) or (a.is_floating_point() and torch.equal(a.nan_to_num(), b.nan_to_num()))


# Attributes every nn.Module has (its parameters, buffers, submodules and hooks): fx restores those.
MODULE_FIELDS = frozenset(vars(torch.nn.Module()))


class _ModuleWalk:
    """One walk of the module tree for what tracing needs of it (each walk of a timm model's ~1,300 modules
    costs about a millisecond): the first name of every parameter and buffer, as named_parameters() /
    named_buffers() give them, and the contents of every plain dict / list a module keeps in its own
    attributes. A forward that caches into one (timm LeViT's attention-bias cache in eval mode) would keep fx
    proxies there, changing the user's model, and break its next run."""

    def __init__(self, module: torch.nn.Module):
        self.params: dict[int, str] = {}
        self.buffers: dict[int, tuple[str, torch.Tensor]] = {}
        self.containers: list[tuple[Any, list]] = []
        for prefix, m in module.named_modules():
            dot = prefix + "." if prefix else ""
            for name, p in m._parameters.items():
                if p is not None:
                    self.params.setdefault(id(p), dot + name)
            for name, b in m._buffers.items():
                if b is not None and id(b) not in self.buffers:
                    self.buffers[id(b)] = (dot + name, b)
            for name, value in vars(m).items():
                if name in MODULE_FIELDS:
                    continue
                if type(value) in (dict, OrderedDict):
                    self.containers.append((value, list(value.items())))
                elif type(value) is list:
                    self.containers.append((value, list(value)))

    def names(self) -> tuple[dict[int, str], dict[int, str]]:
        return self.params, {key: name for key, (name, _) in self.buffers.items()}

    def buffer_copies(self) -> list[tuple[str, torch.Tensor, int, torch.Tensor]]:
        """(name, buffer, version, value) of every buffer, to find and undo what tracing writes."""
        return [(name, b, b._version, b.clone()) for name, b in self.buffers.values() if not b.is_meta]


def _restore(saved: list[tuple[Any, list]]) -> None:
    for container, contents in saved:
        if isinstance(container, dict):
            if len(container) != len(contents) or any(container.get(k, _MISSING) is not v for k, v in contents):
                container.clear()
                container.update(contents)
        elif len(container) != len(contents) or any(a is not b for a, b in zip(container, contents)):
            container[:] = contents


_MISSING = object()


def _trace_error(module: torch.nn.Module, exc: Exception) -> TraceError:
    path, cls = getattr(exc, "_rewrite_module", ("<root>", type(module).__name__))
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if not f.filename.startswith(_TORCH_DIR) and not f.filename.startswith(_PACKAGE_DIR)]
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
