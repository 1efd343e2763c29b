"""An fx.Graph that refers to its GraphModule weakly, so a dropped result frees its weights at once.

A GraphModule holds its graph and an fx.Graph holds its `owning_module`: every GraphModule is a
reference cycle. Reference counting never frees it; the cyclic collector does, but only in a full
collection, which CPython runs rarely when a process makes few new long-lived objects (and a model
is few objects holding many bytes). A loop of `rewrite.apply` calls whose results were dropped grew
by the size of a model per call. With the back reference weak, dropping the module frees it and its
tensors by reference counting; only the small node/graph cycle waits for the collector.
"""
from __future__ import annotations

import weakref

import torch.fx as fx


class WeaklyOwnedGraph(fx.Graph):
    @property
    def owning_module(self):
        owner = self._owning_module
        return owner() if isinstance(owner, weakref.ref) else owner

    @owning_module.setter
    def owning_module(self, module) -> None:
        self._owning_module = None if module is None else weakref.ref(module)
