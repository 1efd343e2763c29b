"""An fx.Graph that refers to its GraphModule weakly, so a dropped result frees its weights at once.

A GraphModule holds its graph and an fx.Graph holds its `owning_module`: every GraphModule is a
reference cycle. Reference counting never frees it; the cyclic collector does, but only in a full
collection, which CPython runs rarely when a process makes few new long-lived objects (and a model
is few objects holding many bytes). A loop of `rewrite.apply` calls whose results were dropped grew
by the size of a model per call. With the back reference weak, dropping the module frees it and its
tensors by reference counting; only the small node/graph cycle waits for the collector.
"""
from __future__ import annotations

import functools
import weakref

import torch
import torch.fx as fx

from ..errors import RewriteError


class WeaklyOwnedGraph(fx.Graph):
    @property
    def owning_module(self):
        owner = self._owning_module
        return owner() if isinstance(owner, weakref.ref) else owner

    @owning_module.setter
    def owning_module(self, module) -> None:
        self._owning_module = None if module is None else weakref.ref(module)


@functools.lru_cache(maxsize=None)
def _graph_module_fields() -> frozenset[str]:
    empty = fx.Graph()
    empty.output(None)
    probe = fx.GraphModule(torch.nn.Module(), empty)
    return frozenset(vars(probe)) | frozenset(dir(type(probe)))  # its fields, and its class's (each instance's own)


def check_attribute_names(names) -> None:
    """Raise RewriteError for a top-level attribute a GraphModule cannot hold under its own name: one named
    like a field or method every GraphModule has (`meta`, `code`, `to_folder`). The generated forward would
    reach GraphModule's own, and fx.GraphModule fails on some of them with a raw TypeError."""
    fields = _graph_module_fields()
    for name in names:
        if name in fields:
            raise RewriteError(f"cannot write the model back to torch.fx: its attribute '{name}' has the name of a "
                               "field or method every GraphModule has; rename it, or rewrite the submodules below it",
                               where=f"module '{name}'")
