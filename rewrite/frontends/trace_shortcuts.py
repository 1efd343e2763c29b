"""Forwards of well-known library modules, traced without their shape assertions.

timm's BatchNormAct2d starts its forward with `_assert(x.ndim == 4, f"... {x.ndim} ...")`: three fx
nodes (a getattr, an eq, the assert) per norm layer, a fifth of a timm model's nodes, which the
import drops at once (a traced assertion guards nothing in the rewritten graph). Tracing the same
forward without that line records exactly the other nodes, in the same order with the same names.

A shortcut is taken only for the stock forward (not a subclass overriding it), in eval mode (the
training branch updates a buffer in place), with no hooks on the module, and only when the forward's
source text is the one the shortcut was written from (another timm release's forward is traced as
written). tests/test_trace_shortcuts.py checks, on the timm models the suite traces, that the graph
equals a full trace less its assertions.

Most of those norm layers apply no activation (a re-parameterizable block's branches: MobileOne,
RepVGG, FastViT): with an identity `drop` and `act`, calling the layer computes exactly an eval-mode
batch norm. Such a layer is recorded as one call of it (a leaf, as fx records nn.BatchNorm2d) instead of
seven nodes (four parameter reads, the batch_norm, two identity calls); the import reads it as the batch
norm it is (`plain_batch_norm`), and a kept one is called as it was. On mobileone_s0 that is 766 traced
nodes instead of 2122.
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import sys
from typing import Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.overrides import _is_torch_function_mode_enabled

from . import fx_internals
from .module_calls import global_hooks_set, runs_class_forward

# The objects whose source fx_internals checked: a later patch of either takes the general path.
_BATCH_NORM = F.batch_norm
_PROXY_TORCH_FUNCTION = fx.Proxy.__dict__["__torch_function__"]


def _batch_norm(x, mean, var, weight, bias, training, momentum, eps):
    """F.batch_norm(x, mean, var, weight, bias, training, momentum, eps), recorded directly when the
    torch-function dispatch would only reach fx.Proxy's handler (every tensor operand a plain Proxy of one
    tracer, no torch-function mode): that handler records this call, under this name."""
    operands = (x, mean, var, weight, bias)
    if type(x) is fx.Proxy and all(o is None or (type(o) is fx.Proxy and o.tracer is x.tracer) for o in operands) \
            and F.batch_norm is _BATCH_NORM and fx.Proxy.__dict__.get("__torch_function__") is _PROXY_TORCH_FUNCTION \
            and torch._C._is_torch_function_enabled() and not _is_torch_function_mode_enabled() \
            and fx_internals.shortcuts_valid():
        tracer = x.tracer
        return tracer.create_proxy("call_function", _BATCH_NORM, (x, mean, var),
                                   {"weight": weight, "bias": bias, "training": training, "momentum": momentum,
                                    "eps": eps}, name=tracer.graph._target_to_str(_BATCH_NORM.__name__))
    return F.batch_norm(x, mean, var, weight, bias, training, momentum, eps)


def _timm_batch_norm_act(m: torch.nn.Module, x):
    """timm.layers.BatchNormAct2d.forward in eval mode, less its shape assertion."""
    factor = 0.0 if m.momentum is None else m.momentum
    bn_training = (m.running_mean is None) and (m.running_var is None)
    x = _batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias, bn_training, factor, m.eps)
    x = m.drop(x)
    return m.act(x)


# The source text of the forward each shortcut reproduces (sha256), as the timm releases it was checked
# against write it (1.0.x). A forward with any other text, from a release that changed it, is traced as
# written: a shortcut of a forward that computes something else would give a silently wrong model.
_KNOWN_SOURCES = {"timm.layers.norm_act.BatchNormAct2d.forward":
                  {"0d3810e96688422c6834852827204032694343c2f69f59e908bbbd0d99317947"}}


@functools.lru_cache(maxsize=None)
def _source_is_known(fn: Callable, key: str) -> bool:
    try:
        text = inspect.getsource(fn)
    except (OSError, TypeError):
        return False
    return hashlib.sha256(text.encode()).hexdigest() in _KNOWN_SOURCES[key]


def _shortcuts() -> dict[Callable, Callable]:
    """stock forward function -> its traced form; only for libraries already imported (never imports them),
    and only where the forward's source is the one the shortcut was written from."""
    found: dict[Callable, Callable] = {}
    norm_act = sys.modules.get("timm.layers.norm_act")
    if norm_act is not None and hasattr(norm_act, "BatchNormAct2d"):
        forward = norm_act.BatchNormAct2d.forward
        if _source_is_known(forward, "timm.layers.norm_act.BatchNormAct2d.forward"):
            found[forward] = _timm_batch_norm_act
    return found


_IDENTITY_FORWARD = torch.nn.Identity.forward


def _plain_identity(m: torch.nn.Module) -> bool:
    return type(m) is torch.nn.Identity and type(m).forward is _IDENTITY_FORWARD and runs_class_forward(m)


def plain_batch_norm(m: torch.nn.Module) -> bool:
    """Does calling `m` compute exactly an eval-mode batch norm over its own statistics and affine: a timm
    BatchNormAct2d with the stock forward (known source), in eval mode, no hooks, identity drop and act?"""
    if type(m).__name__ != "BatchNormAct2d" or m.training or not runs_class_forward(m):
        return False
    if _shortcuts().get(type(m).forward) is not _timm_batch_norm_act:
        return False
    drop, act = m.__dict__["_modules"].get("drop"), m.__dict__["_modules"].get("act")
    return drop is not None and act is not None and _plain_identity(drop) and _plain_identity(act) \
        and m.running_mean is not None and m.running_var is not None


class Shortcuts:
    """The shortcuts of one trace (the table is read once, when tracing starts)."""

    def __init__(self):
        self.forms = {} if global_hooks_set() else _shortcuts()

    def forward_for(self, m: torch.nn.Module) -> Callable | None:
        """A forward to trace in place of `m`'s own, or None to trace `m` as it is."""
        form = self.forms.get(type(m).forward) if self.forms else None
        if form is None or m.training or not runs_class_forward(m):
            return None
        return lambda *args, **kwargs: form(m, *args, **kwargs)

    def is_leaf(self, m: torch.nn.Module) -> bool:
        """Record a call of `m` as one node: it computes exactly a batch norm (see the module docstring)."""
        return bool(self.forms) and plain_batch_norm(m)

