"""A small declarative pattern language over the IR.

    P.op("batch_norm", P.op("conv", P.any("x"), name="conv"), name="bn", training=False)

A pattern is a tree rooted at an op kind. `P.op` matches a node of a kind (its inputs matched
by sub-patterns, its attributes checked), `P.any` matches any value, `P.const` a value made by a
`constant` node, and `P.add` an `add` node whose operands match in any order. A capture name
used twice must bind the same object, which is how "two branches read the same input" is said.
Matching never mutates the graph.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from itertools import permutations
from typing import Any, Callable, Iterator

from .ir import Graph, Node, Value, op_def

Bindings = dict[str, Any]

# The kind-only check before a full match (could_match_node); tests turn it off for a reference run.
PREFILTER = True


class Pattern:
    name: str | None = None

    def could_match_value(self, value: Value) -> bool:
        """A cheap necessary condition for match_value (kinds only, no predicates): False means no match."""
        return True

    def match_value(self, value: Value, bindings: Bindings, nodes: list[Node]) -> Iterator[tuple[Bindings, list[Node]]]:
        raise NotImplementedError


def _bind(bindings: Bindings, name: str | None, obj: Any) -> Bindings | None:
    if name is None:
        return bindings
    if name in bindings:
        return bindings if bindings[name] is obj else None
    out = dict(bindings)
    out[name] = obj
    return out


@dataclass
class AnyPattern(Pattern):
    """Any value; optionally a predicate on it."""

    name: str | None = None
    where: Callable[[Value], bool] | None = None

    def match_value(self, value, bindings, nodes):
        if self.where is not None and not self.where(value):
            return
        bound = _bind(bindings, self.name, value)
        if bound is not None:
            yield bound, nodes


@dataclass
class ConstPattern(Pattern):
    """A value produced by a `constant` node. Captures the tensor, or the node with node=True."""

    name: str | None = None
    where: Callable[[Any], bool] | None = None
    capture_node: bool = False

    def could_match_value(self, value):
        if type(self) is not ConstPattern:  # a subclass may match otherwise: leave it to its full match
            return True
        producer = value.producer
        return producer is not None and producer.kind == "constant"

    def match_value(self, value, bindings, nodes):
        producer = value.producer
        if producer is None or producer.kind != "constant":
            return
        tensor = producer.params["value"]
        if self.where is not None and not self.where(tensor):
            return
        bound = _bind(bindings, self.name, producer if self.capture_node else tensor)
        if bound is not None:
            yield bound, nodes  # a constant is shared freely; it is not part of the match


@dataclass
class OpPattern(Pattern):
    """A node of `kind` (or one of several kinds) whose inputs match `inputs` in order."""

    kind: str | tuple[str, ...]
    inputs: tuple[Pattern, ...] | None = None  # None: any inputs
    name: str | None = None
    attrs: dict[str, Any] = field(default_factory=dict)
    where: Callable[[Node], bool] | None = None
    commutative: bool = False
    output_index: int = 0

    @property
    def kinds(self) -> tuple[str, ...]:
        return (self.kind,) if isinstance(self.kind, str) else tuple(self.kind)

    def check_node(self, node: Node) -> bool:
        if node.kind not in self.kinds:
            return False
        for key, expected in self.attrs.items():
            actual = node.attrs.get(key)
            if callable(expected):
                if not expected(actual):
                    return False
            elif actual != expected:
                return False
        return self.where is None or self.where(node)

    def could_match_node(self, node: Node) -> bool:
        """A necessary condition for match_node checking only kinds and arities down the tree, so most
        nodes are turned away without the generators, bindings and predicates of a full match. It calls
        no `where` and reads no attribute: it skips only work that would have yielded nothing."""
        if type(self) is not OpPattern:  # a subclass may match otherwise: leave it to its full match
            return True
        kind = self.kind
        if (node.kind != kind) if type(kind) is str else (node.kind not in kind):
            return False
        if self.inputs is None:
            return True
        if len(node.inputs) != len(self.inputs):
            return False
        if self.commutative:  # any order may match: leave the operands to the full match
            return True
        return all(p.could_match_value(v) for p, v in zip(self.inputs, node.inputs))

    def could_match_value(self, value):
        node = value.producer
        return node is not None and value.index == self.output_index and self.could_match_node(node)

    def match_value(self, value, bindings, nodes):
        node = value.producer
        if node is None or value.index != self.output_index:
            return
        yield from self.match_node(node, bindings, nodes)

    def match_node(self, node: Node, bindings: Bindings, nodes: list[Node]):
        if not self.check_node(node):
            return
        bound = _bind(bindings, self.name, node)
        if bound is None:
            return
        nodes = nodes + [node]
        if self.inputs is None:
            yield bound, nodes
            return
        if len(node.inputs) != len(self.inputs):
            return
        orders = permutations(range(len(self.inputs))) if self.commutative else [range(len(self.inputs))]
        for order in orders:
            yield from _match_inputs(self.inputs, [node.inputs[i] for i in order], bound, nodes)


def _match_inputs(patterns, values, bindings, nodes):
    if not patterns:
        yield bindings, nodes
        return
    for bound, seen in patterns[0].match_value(values[0], bindings, nodes):
        yield from _match_inputs(patterns[1:], values[1:], bound, seen)


def _checked_attrs(kinds: tuple[str, ...], attrs: dict) -> dict:
    """Attribute checks in the IR's form; a kind or attribute the registry does not know is an error here."""
    defs = [op_def(kind, where="pattern") for kind in kinds]
    out = {}
    for key, expected in attrs.items():
        for op in defs:
            converted = expected if callable(expected) else op.convert(key, expected, "pattern")
        out[key] = converted
    return out


def capture_names(pattern: Pattern) -> set[str]:
    """Every name a pattern binds."""
    names = {pattern.name} if pattern.name else set()
    for sub in getattr(pattern, "inputs", None) or ():
        names |= capture_names(sub)
    return names


class P:
    """Pattern constructors."""

    @staticmethod
    def op(kind, *inputs: Pattern, name: str | None = None, where=None, any_inputs: bool = False,
           **attrs) -> OpPattern:
        kinds = (kind,) if isinstance(kind, str) else tuple(kind)
        return OpPattern(kind, None if any_inputs else tuple(inputs), name, _checked_attrs(kinds, attrs), where)

    @staticmethod
    def any(name: str | None = None, where=None) -> AnyPattern:
        return AnyPattern(name, where)

    @staticmethod
    def const(name: str | None = None, where=None, node: bool = False) -> ConstPattern:
        return ConstPattern(name, where, node)

    @staticmethod
    def add(*operands: Pattern, name: str | None = None, where=None) -> OpPattern:
        """An `add` whose operands match `operands` in any order."""
        op_def("add")
        return OpPattern("add", tuple(operands), name, {}, where, commutative=True)

    @staticmethod
    def mul(*operands: Pattern, name: str | None = None, where=None) -> OpPattern:
        return OpPattern("mul", tuple(operands), name, {}, where, commutative=True)


@dataclass
class Match:
    root: Node
    bindings: Bindings
    nodes: list[Node]  # every op node matched, root first
    shared_with: list[str] = field(default_factory=list)  # outside readers of intermediate values


def match(pattern: OpPattern, node: Node) -> Iterator[Match]:
    """Yield every match of `pattern` rooted at `node`, each with its outside readers listed.

    An intermediate value read outside the match (or a graph output) is named in `shared_with`;
    the driver refuses such a match unless the rule allows it, since rewriting it would make
    another path lose its input.
    """
    if PREFILTER and not pattern.could_match_node(node):
        return
    for bindings, nodes in pattern.match_node(node, {}, []):
        yield Match(node, bindings, nodes, external_readers(node.graph, nodes))


def external_readers(graph: Graph | None, nodes: list[Node]) -> list[str]:
    """Names of what reads the intermediate values of `nodes` (all but the root, nodes[0]) from outside."""
    inside = {id(n) for n in nodes}
    readers: list[str] = []
    for node in nodes[1:]:
        for value in node.outputs:
            if graph is not None and graph.is_output(value):
                readers.append("<graph output>")
            readers += [user.name for user, _ in value.uses if id(user) not in inside]
    return readers
