"""Value range analysis: which values are provably non-negative for every input.

RM residual removal needs it: a block input x >= 0 survives the block's ReLUs in C reserved
channels, a signed x needs relu(x) and relu(-x). The analysis is sound, not complete: `False`
means "not proved", never "negative". Results are memoized per `Value`; a rewrite that replaces
a value with an equal one can carry the fact over with `assume`.
"""
from __future__ import annotations

from ..ir import Graph, Node, Value

# Kinds whose outputs are >= 0 when every data input is >= 0 (monotone or averaging, no sign change).
_PRESERVING = frozenset({"max_pool", "avg_pool", "adaptive_avg_pool", "flatten", "reshape", "identity",
                         "dropout", "split", "concat", "add", "mul", "slice", "mean",
                         "stochastic_depth", "index_select"})



def _min_bound(node: Node) -> float | None:
    """The smallest lower bound of a clamp over its channels (None: no lower bound)."""
    tensor = node.params.get("min")
    return None if tensor is None else float(tensor.min())


def _max_bound(node: Node) -> float | None:
    tensor = node.params.get("max")
    return None if tensor is None else float(tensor.min())  # the smallest upper bound decides the sign


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
        if node.kind in ("clamp", "pad"):
            return node.inputs[:1]
        return []

    def _rule(self, value: Value) -> bool:
        node = value.producer
        if node is None:
            return self.nonnegative_inputs and value.graph_input
        kind = node.kind
        if node.op.nonnegative or node.attrs.get("nonnegative"):
            return True  # relu, sigmoid, softmax, ...; opaque calls a frontend knows (exp, abs, ...)
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
        if kind == "pad":  # reflect / replicate copy x; constant mode adds its fill value
            fill = node.params.get("value")
            return self._memo[id(node.inputs[0])] and (fill is None or bool((fill >= 0).all()))
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
