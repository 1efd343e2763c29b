"""Value range analysis: which values are provably non-negative for every input.

RM residual removal needs it: a block input x >= 0 survives the block's ReLUs in C reserved
channels, a signed x needs relu(x) and relu(-x). The analysis is sound, not complete: `False`
means "not proved", never "negative". Results are memoized per `Value`; a rewrite that replaces
a value with an equal one can carry the fact over with `assume`.
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F

from ..ir import Graph, Node, Value

# Kinds whose outputs are >= 0 when every data input is >= 0 (monotone or averaging, no sign change).
_PRESERVING = frozenset({"max_pool", "avg_pool", "adaptive_avg_pool", "flatten", "reshape", "identity",
                         "dropout", "split", "concat", "add", "mul"})

# Opaque calls that are non-negative whatever their input (torch targets and ONNX op types).
_NONNEG_TARGETS = {torch.sigmoid, torch.exp, torch.abs, torch.softmax, F.softmax, F.sigmoid, F.relu6,
                   torch.square, operator.abs, "sigmoid", "exp", "abs", "softmax", "square"}
_NONNEG_OP_TYPES = frozenset({"Sigmoid", "Exp", "Abs", "Softmax", "Relu", "Sqrt", "Softplus"})


def _min_bound(node: Node) -> float | None:
    """The smallest lower bound of a clamp over its channels (None: no lower bound)."""
    tensor = node.params.get("min")
    if tensor is not None:
        return float(tensor.min())
    return node.attrs.get("min")


def _max_bound(node: Node) -> float | None:
    tensor = node.params.get("max")
    if tensor is not None:
        return float(tensor.min())  # the smallest upper bound decides whether a result can be < 0
    return node.attrs.get("max")


def _opaque_nonnegative(node: Node) -> bool:
    target = node.attrs.get("target")
    try:
        if target in _NONNEG_TARGETS:
            return True
    except TypeError:  # an unhashable target
        pass
    return node.attrs.get("op_type") in _NONNEG_OP_TYPES


class NonNegativity:
    """Lazily proves `value >= 0` elementwise, memoized per value."""

    def __init__(self, graph: Graph | None = None, nonnegative_inputs: bool = False):
        self.graph = graph
        self.nonnegative_inputs = nonnegative_inputs
        self._memo: dict[int, bool] = {}
        self._keep: list[Value] = []  # keep memoized values alive so their ids stay unique

    def assume(self, value: Value, nonnegative: bool) -> None:
        """Record a fact, e.g. for a value that replaced an equal one."""
        self._memo[id(value)] = nonnegative
        self._keep.append(value)

    def __call__(self, value: Value) -> bool:
        return self.is_nonnegative(value)

    def is_nonnegative(self, value: Value) -> bool:
        # Iterative post-order over producers, so deep graphs do not hit the recursion limit.
        stack = [value]
        while stack:
            top = stack[-1]
            if id(top) in self._memo:
                stack.pop()
                continue
            pending = [v for v in self._needed_inputs(top) if id(v) not in self._memo]
            if pending:
                stack.extend(pending)
                continue
            stack.pop()
            self.assume(top, self._rule(top))
        return self._memo[id(value)]

    def _needed_inputs(self, value: Value) -> list[Value]:
        node = value.producer
        if node is None:
            return []
        if node.kind in _PRESERVING:
            return list(node.inputs)
        if node.kind == "clamp":
            return node.inputs[:1]
        return []

    def _rule(self, value: Value) -> bool:
        node = value.producer
        if node is None:
            return self.nonnegative_inputs and value.graph_input
        kind = node.kind
        if kind == "relu":
            return True
        if kind == "constant":
            tensor = node.params.get("value")
            return tensor is not None and tensor.numel() > 0 and bool((tensor >= 0).all())
        if kind == "clamp":
            lo, hi = _min_bound(node), _max_bound(node)
            floor_ok = (lo is not None and lo >= 0) or self._memo[id(node.inputs[0])]
            # torch.clamp returns max when max < min, so a negative upper bound can make it negative
            return floor_ok and (hi is None or hi >= 0)
        if kind in _PRESERVING:
            return bool(node.inputs) and all(self._memo[id(v)] for v in node.inputs)
        if kind == "opaque":
            return _opaque_nonnegative(node)
        return False


def nonnegative_values(graph: Graph, nonnegative_inputs: bool = False) -> set[str]:
    """Names of the values of `graph` proved non-negative (a convenience for reports and tests)."""
    analysis = NonNegativity(graph, nonnegative_inputs)
    names = set()
    for value in graph.inputs:
        if analysis(value):
            names.add(value.name)
    for node in graph.nodes:
        for value in node.outputs:
            if analysis(value):
                names.add(value.name)
    return names
