"""Which layers of a traced model can be replaced by a block, read off the IR.

A layer is a site when its module is a plain nn.Conv1d/2d/3d or nn.Linear called exactly once in
the traced forward, with nothing else reading its parameters. Beyond that, the graph decides:
a layer whose output is summed or concatenated with another linear branch of its own input is
refused, because fuse_branches reads such a sum as one, so the block would not contract back to
this layer alone (and a merge refused for the whole sum would leave the block uncontracted).
Likewise a layer in a linear cascade with another conv (conv -> BN -> conv): the contraction
composes cascades, so it could fuse across the block's boundary.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch.nn as nn

from ..frontends.fx import import_module
from ..ir import Graph, Node, Value
from .geometry import CONVS

_LINEAR_STEPS = ("batch_norm", "identity", "dropout", "mul")


def _linear_step(node: Node) -> bool:
    """A per-channel affine step the contraction walks through (a mul only by a constant, not a gate)."""
    if node.kind == "mul":
        return any(i.producer is not None and i.producer.kind == "constant" for i in node.inputs)
    return node.kind in _LINEAR_STEPS
_BRANCH_KINDS = ("conv", "linear", "avg_pool")


@dataclass
class Site:
    path: str
    module: nn.Module
    refusal: str | None = None  # why the graph forbids expanding it
    input_rank: int | None = None


def _plain_layer(module: nn.Module) -> bool:
    return type(module) in CONVS or type(module) is nn.Linear


def _unaliased(value: Value) -> Value:
    while value.producer is not None and value.producer.kind in ("identity", "dropout"):
        value = value.producer.inputs[0]
    return value


def _reads(value: Value, x: Value, depth: int = 8) -> bool:
    """Whether `value` is a linear function of `x` that fuse_branches could take for a branch of it."""
    value = _unaliased(value)
    if value is x:
        return True
    node = value.producer
    if node is None or depth == 0:
        return False
    if node.kind in _BRANCH_KINDS and _unaliased(node.inputs[0]) is x:
        return True
    if _linear_step(node) or node.kind == "add":
        return any(_reads(i, x, depth - 1) for i in node.inputs)
    return False


def _joined_branch(graph: Graph, node: Node) -> str | None:
    """Why `node`'s output cannot stand alone: it joins a sum or concat with another branch of its input."""
    x = _unaliased(node.inputs[0])
    value = node.output
    while len(value.uses) == 1 and not graph.is_output(value):
        reader = value.uses[0][0]
        if reader.kind in ("add", "concat"):
            for other in reader.inputs:
                if other is not value and _reads(other, x):
                    verb = "added to" if reader.kind == "add" else "concatenated with"
                    return (f"its output is {verb} another branch of its input ({reader.label}): fuse_branches "
                            "would contract them as one, not give back this layer")
            if reader.kind == "concat":
                return None
        elif not _linear_step(reader):
            return None
        value = reader.output
    return None


def _cascade_neighbour(graph: Graph, node: Node) -> str | None:
    """Why `node` cannot stand alone: a conv or linear reads its output, or made its input, with only linear
    steps between. fuse_branches composes such cascades, so it could fuse across the block's boundary."""
    value = node.output
    while len(value.uses) == 1 and not graph.is_output(value):
        reader = value.uses[0][0]
        if reader.kind in ("conv", "linear"):
            return (f"{reader.label} reads its output with nothing nonlinear between: fuse_branches could fuse "
                    "across the block, not give back this layer")
        if not _linear_step(reader):
            break
        value = reader.output
    value = node.inputs[0]
    while value.producer is not None and len(value.uses) == 1:
        producer = value.producer
        if producer.kind in ("conv", "linear"):
            return (f"its input comes from {producer.label} with nothing nonlinear between: fuse_branches could "
                    "fuse across the block, not give back this layer")
        if not _linear_step(producer):
            break
        value = producer.inputs[0]
    return None


def find_sites(model: nn.Module, example_inputs=None, concrete_args=None,
               leaf_modules: Iterable = ()) -> tuple[list[Site], list[tuple[str, str]]]:
    """The candidate layers in module order, and the conv-like modules that are not candidates, with why."""
    graph = import_module(model, example_inputs, concrete_args, leaf_modules, fold=False)  # direct reads kept
    calls: dict[str, list[Node]] = {}
    direct: dict[str, Node] = {}
    for node in graph.nodes:
        if node.scope is None:
            continue
        if node.kind == "constant":
            direct.setdefault(node.scope.rpartition(".")[0], node)
        else:
            calls.setdefault(node.scope, []).append(node)
    sites, others = [], []
    for path, module in model.named_modules():
        if not _plain_layer(module):
            if isinstance(module, CONVS + (nn.Linear,)):
                others.append((path, f"a subclass ({type(module).__name__}) of a conv/linear: its forward may do "
                                     "more than the layer it extends"))
            continue
        found = calls.get(path, [])
        site = Site(path, module)
        if not found:
            site.refusal = "not called in the traced forward (unused, or inside a leaf module)"
        elif len(found) > 1:
            site.refusal = f"called {len(found)} times (shared weights): one block per call would not stay shared"
        elif path in direct:
            site.refusal = f"its parameters are also read directly ({direct[path].label})"
        else:
            node = found[0]
            shape = node.inputs[0].shape
            site.input_rank = None if shape is None else len(shape)
            site.refusal = _joined_branch(graph, node) or _cascade_neighbour(graph, node)
        sites.append(site)
    return sites, others
