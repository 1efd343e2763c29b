"""torch.fx forms of the ops whose definitions list them (`OpDef.fx`): import and write-back.

An op declared with `fx=[nn.Hardswish, F.hardswish, "hardswish"]` is recognized as a module of that
class (with its stock forward; attributes read from the module's fields of the same names, params
from its tensors), a call of the function, or a call of the method, and a rebuilt node is written
as a call of the first function form. No per-op code is needed here: ops whose calls are not plain
(conv, batch_norm, pad, slice, ...) have their own handlers in fx_import.py / fx_emit.py.
"""
from __future__ import annotations

import inspect
import sys
import weakref
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn

from ..errors import RewriteError
from ..ir import OpDef, defined_ops
from .module_calls import runs_class_forward


class FxForms:
    """An index of the fx forms of every op defined right now, built when an import or export starts."""

    def __init__(self):
        self.modules: dict[type, OpDef] = {}
        self.functions: dict[Any, OpDef] = {}
        self.methods: dict[str, OpDef] = {}
        for op in defined_ops().values():
            for form in op.fx:
                if isinstance(form, type) and issubclass(form, nn.Module):
                    self.modules.setdefault(form, op)
                elif isinstance(form, str) and "." in form:
                    self._add_named(form, op)
                elif isinstance(form, str):
                    self.methods.setdefault(form, op)
                elif callable(form):
                    self.functions.setdefault(form, op)

    def _add_named(self, form: str, op: OpDef) -> None:
        """A form named "package.module.name" (an optional package's function or module class): known once
        that package is imported, which it is whenever a model built with it is traced."""
        module_name, _, attr_name = form.rpartition(".")
        found = getattr(sys.modules.get(module_name), attr_name, None)
        if isinstance(found, type) and issubclass(found, nn.Module):
            self.modules.setdefault(found, op)
        elif callable(found):
            self.functions.setdefault(found, op)

    def module_op(self, m: nn.Module) -> OpDef | None:
        if not runs_class_forward(m):
            return None  # a forward on the instance or a hook runs code of its own: the call stays opaque
        for cls in type(m).__mro__:
            op = self.modules.get(cls)
            if op is not None:
                return op if type(m).forward is cls.forward else None  # a custom forward stays opaque
        return None

    def call_op(self, fx_node: fx.Node) -> OpDef | None:
        if fx_node.op == "call_function":
            try:
                return self.functions.get(fx_node.target)
            except TypeError:  # an unhashable target
                return None
        if fx_node.op == "call_method":
            return self.methods.get(fx_node.target)
        return None


def function_form(op: OpDef) -> Callable | None:
    """The callable a rebuilt node of `op` is written as: its first non-module fx form."""
    for form in op.fx:
        if callable(form) and not isinstance(form, type):
            return form
    return None


# Weak keys: a cached signature never keeps a user's function (or a method's module) alive.
_SIGNATURES: "weakref.WeakKeyDictionary[Any, inspect.Signature | None]" = weakref.WeakKeyDictionary()


def _signature(fn) -> inspect.Signature | None:
    """fn's signature, looked up once per function (inspect.signature rebuilds it on every call)."""
    try:
        return _SIGNATURES[fn]
    except KeyError:
        pass
    except TypeError:  # not weakly referable (a builtin): no cache
        return _build_signature(fn)
    sig = _SIGNATURES[fn] = _build_signature(fn)
    return sig


def _build_signature(fn) -> inspect.Signature | None:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):  # builtins such as torch.sigmoid have none
        return None


def bind_call(op: OpDef, fn: Callable | None, args: tuple, kwargs: dict, fetch_tensor) -> tuple | None:
    """(data operands, attrs, params) of a call of `op`, or None when the call is not a plain form of it.

    A call binds by `fn`'s signature when Python has one, else as (inputs..., attributes in declared
    order..., params...) with any of them also accepted by keyword. Every argument must be an input, an attribute, a parameter (a module's
    tensor, fetched by `fetch_tensor`), an argument the op ignores, or left at its default: anything
    else might change the result, so the call stays opaque.
    """
    n_inputs = len(op.inputs)
    sig = _signature(fn) if fn is not None else None
    if sig is not None:
        try:
            bound = sig.bind(*args, **kwargs)
        except TypeError:
            return None
        names = list(sig.parameters)
        given = dict(bound.arguments)
        defaults = {k: p.default for k, p in sig.parameters.items()}
    else:
        names = list(op.inputs) + list(op.attrs) + list(op.params)
        if len(args) > len(names) or any(k in names[:len(args)] for k in kwargs):
            return None
        given = dict(zip(names, args), **kwargs)
        defaults = {}
    operands = [given.get(name) for name in names[:n_inputs]]
    if len(operands) != n_inputs or not all(isinstance(o, fx.Node) for o in operands):
        return None
    attrs, params = {}, {}
    for name, value in list(given.items()):
        if name in names[:n_inputs]:
            continue
        if isinstance(value, fx.Node) and name not in op.params:
            return None  # a value computed in forward
        if name in op.attrs:
            attrs[name] = value
        elif name in op.params:
            tensor = fetch_tensor(value)
            if tensor is None:
                return None
            params[name] = tensor
        elif name in op.fx_ignore:
            continue
        elif name not in defaults or defaults[name] is not value and defaults[name] != value:
            return None
    return operands, attrs, params


def module_parts(op: OpDef, m: nn.Module) -> tuple[dict, dict] | None:
    """(attrs, params) of a module form: the module's fields named like the op's attributes and params."""
    attrs = {name: getattr(m, name) for name in op.attrs if hasattr(m, name)}
    params = {name: getattr(m, name, None) for name in op.params}
    if any(p is not None and not isinstance(p, torch.Tensor) for p in params.values()):
        return None
    return attrs, params


def emit_call(emitter, node, inputs: list) -> fx.Node:
    """Write a rebuilt node of a plainly callable op: its function form with inputs, attributes, params."""
    op = node.op
    fn = function_form(op)
    if fn is None:
        return None
    tensors = {k: emitter.new_tensor(node, k, t.detach(), parameter=t.is_floating_point())
               for k, t in node.params.items() if t is not None}
    sig = _signature(fn)
    if sig is not None:
        named = {**node.attrs, **tensors}
        missing = [k for k in named if k not in sig.parameters]
        if missing:
            raise RewriteError(f"the fx form {getattr(fn, '__name__', fn)} of '{op.kind}' takes no argument "
                               f"{', '.join(missing)}", where=f"node {node.name}")
        return emitter.call(fn, *inputs, **named)
    return emitter.call(fn, *inputs, *tensors.values(), **node.attrs)  # builtins take attributes by keyword
