"""Whether torch.fx's tracing internals are the ones the tracing shortcuts were written against.

fx_trace.py and trace_shortcuts.py skip some of fx's generic steps (a kwargs dict's argument checks,
the torch-function dispatch of a batch_norm call, node creation's scan of every argument for a raw SymInt)
by doing directly what those steps end in. That is
only the same when fx's code is the code they were read from (torch 2.14.1): every function a shortcut
stands in for is hashed (its source text), once, and any other text (a newer torch) turns the
shortcuts off, so that tracing takes fx's own path.
"""
from __future__ import annotations

import functools
import hashlib
import inspect

import torch
import torch.fx as fx
from torch.fx.immutable_collections import immutable_dict

# qualified name -> sha256 of the source text the shortcuts reproduce (torch 2.14.1)
_KNOWN = {
    "torch.fx._symbolic_trace.Tracer.create_arg": "9b552e42a895aab64c77f8c8d40cd6ef6a793dc0fc57ce5b827b68b293890ce3",
    "torch.fx.proxy.TracerBase.create_arg": "a1970ce919ed89cc6ec03cacfc9a724b0d994caf49aa4300a50d935c1c071332",
    "torch.fx.proxy._create_arg_dict": "add45d37164ba403568425e58443b969ae065ee7e32f1d520ac61f43ade89334",
    "torch.fx.proxy.TracerBase.create_proxy": "e231173e48cff542f59b8f4900d9f7a82f569349520060ae6905cb175ceed944",
    "torch.fx.proxy.TracerBase.create_node": "a31a10139c2eb3d8f6309cc525d249be94497f74a60458ecda8a725055266044",
    "torch.fx.graph.Graph.create_node": "7e8353cfe5d2ae96d58d42a0ea32081f98b2dc6bc4983578b3843d66cae21583",
    "torch.fx.proxy.Proxy.__torch_function__": "ed43f38602b72f690d6be0112d934445256970ae5bfe1f45eb9c472a97ddeff2",
    "torch.nn.functional.batch_norm": "93fe25afd4268873d049006818a607eebb383e4c8a03a1d192c83b30eb7ad4cc",
    "torch.overrides.handle_torch_function": "62abf82304edc1d96d0de6c7ef6863ab036251c4affcda9c9ce0f0d003cbdf54",
}

# Tests set this to False to trace through fx's own path everywhere (the reference the shortcuts must equal).
enabled = True


def _resolve(qualname: str):
    import importlib

    parts = qualname.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(qualname)


@functools.lru_cache(maxsize=None)
def _sources_known() -> bool:
    for qualname, digest in _KNOWN.items():
        try:
            text = inspect.getsource(_resolve(qualname))
        except (ImportError, AttributeError, OSError, TypeError):
            return False
        if hashlib.sha256(text.encode()).hexdigest() != digest:
            return False
    return True


def shortcuts_valid() -> bool:
    """May tracing skip fx's generic steps (the sources are the known ones and no test turned it off)?"""
    return enabled and _sources_known()


# Types fx.Tracer.create_arg passes through unchanged (fx's own fast path lists them, with tensors,
# which need their name looked up, and containers).
PLAIN_VALUES = frozenset({int, float, bool, complex, str, type(None), type(...), torch.dtype, torch.device,
                          torch.memory_format, torch.layout})


def plain_arguments(a) -> bool:
    """Only plain Python values and fx nodes, in tuples, lists, dicts and slices (so no SymInt)?"""
    kind = type(a)
    if kind in PLAIN_VALUES or kind is fx.Node:
        return True
    if kind is tuple or kind is list:
        return all(plain_arguments(item) for item in a)
    if kind is dict:
        return all(plain_arguments(item) for item in a.values())
    if kind is slice:
        return plain_arguments(a.start) and plain_arguments(a.stop) and plain_arguments(a.step)
    return False


def add_node(graph: fx.Graph, op: str, target, args: tuple = (), kwargs: dict | None = None,
             name: str | None = None, type_expr=None) -> fx.Node:
    """graph.create_node(op, target, args, kwargs, name, type_expr). Done directly (fx's Graph.create_node without its
    pytree scan of every argument for a raw SymInt to warn about, a fifth of tracing and of writing back)
    when fx's code is the known one, the graph's class keeps fx's node creation, no module owns the graph
    yet (so no creation hooks and no reference warnings) and the arguments hold only plain values and
    nodes; anything else takes fx's path."""
    kwargs = {} if kwargs is None else kwargs
    if not (shortcuts_valid() and type(graph).create_node is fx.Graph.create_node and graph.owning_module is None
            and type(args) is tuple and type(kwargs) in (dict, immutable_dict) and plain_arguments(args)
            and plain_arguments(tuple(kwargs.values()))):
        return graph.create_node(op, target, args, kwargs, name, type_expr)
    if not kwargs:
        kwargs = immutable_dict()
    candidate = name if name is not None else graph._target_to_str(target)
    name = graph._graph_namespace.create_name(candidate, None)
    node = fx.Node(graph, name, op, target, args, kwargs, type_expr)
    graph._graph_namespace.associate_name_with_obj(name, node)
    graph._insert(node)
    graph._find_nodes_lookup_table.insert(node)
    graph._len += 1
    return node
