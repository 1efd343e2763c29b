"""The intermediate representation shared by every frontend and every rule.

A `Graph` is a list of `Node`s in topological order. A node has a canonical op `kind`
(`conv`, `batch_norm`, `add`, ...), input `Value`s, output `Value`s, plain attributes and
tensor parameters. Every value keeps a use-list, so rules can ask who reads a value and the
driver can erase dead nodes. Anything a frontend does not understand becomes an `opaque`
node; the frontend keeps what it needs in `node.origin` to write it back exactly.

Parameters are tensors owned by the node (`node.params`). Two nodes may hold the same tensor
object (a module called twice, a shared initializer); rules never edit a tensor in place,
they build fresh ones, so sharing is safe.
"""
from __future__ import annotations

from typing import Any, Iterable, Iterator

import torch

from .ops import OpDef, op_def

def is_pure(node: "Node") -> bool:
    """Declared pure by its op definition; an opaque node only when its frontend vouched for it."""
    return node.op.pure or bool(node.attrs.get("pure"))


def fresh_name(base: str, taken, reserve: set | None = None) -> str:
    """`base`, or `base_1`, `base_2`, ... : the first that `taken(name)` rejects not; added to `reserve`."""
    name, n = base, 1
    while taken(name):
        name = f"{base}_{n}"
        n += 1
    if reserve is not None:
        reserve.add(name)
    return name


class Value:
    """One tensor flowing in the graph: produced by at most one node, read by any number."""

    __slots__ = ("name", "producer", "index", "uses", "shape", "dtype", "graph_input")

    def __init__(self, name: str, producer: "Node | None" = None, index: int = 0,
                 shape: tuple | None = None, dtype: torch.dtype | None = None):
        self.name = name
        self.producer = producer
        self.index = index
        self.uses: list[tuple[Node, int]] = []
        self.shape = shape
        self.dtype = dtype
        self.graph_input = False

    @property
    def users(self) -> list["Node"]:
        """Distinct nodes that read this value, in first-use order."""
        seen: dict[int, Node] = {}
        for node, _ in self.uses:
            seen.setdefault(id(node), node)
        return list(seen.values())

    def __repr__(self) -> str:
        return f"%{self.name}"


class Node:
    """One operation. `attrs` hold plain data, `params` hold tensors (weights, statistics)."""

    __slots__ = ("kind", "op", "name", "inputs", "outputs", "attrs", "params", "origin", "scope", "graph",
                 "_snapshot")

    def __init__(self, kind: str, name: str, inputs: Iterable[Value] = (), attrs: dict | None = None,
                 params: dict[str, torch.Tensor | None] | None = None, num_outputs: int | None = None,
                 origin: Any = None):
        where = f"node {name}"
        self.op: OpDef = op_def(kind, where)  # unknown kinds, attributes and params fail here
        self.kind = kind
        self.name = name
        self.inputs: list[Value] = []
        self.attrs: dict[str, Any] = self.op.check_attrs(attrs or {}, where)
        self.params: dict[str, torch.Tensor | None] = self.op.check_params(params or {}, where)
        self.origin = origin  # frontend data to write this node back unchanged (see `untouched`)
        self.scope: str | None = None  # the module path this node came from, used to name what replaces it
        self.graph: Graph | None = None
        self._snapshot: tuple | None = None
        for value in inputs:
            self.add_input(value)
        if num_outputs is None:
            num_outputs = len(self.attrs["sizes"]) if kind == "split" else 1
        self.outputs = [Value(name if i == 0 else f"{name}.{i}", self, i) for i in range(num_outputs)]

    # -- the one "untouched" decision, shared by every backend ------------------------------------
    def _state(self) -> tuple:
        params = tuple((k, id(t), t._version if t is not None else None) for k, t in self.params.items())
        return (self.kind, self.name, len(self.inputs), len(self.outputs), params)

    def mark_imported(self) -> None:
        """Snapshot what this node is as a frontend imported it (called once, at the end of import)."""
        self._snapshot = (self._state(), dict(self.attrs))

    @property
    def untouched(self) -> bool:
        """True while the node computes exactly what its origin did, so a backend may write the origin.

        Changing the kind, the name, an attribute, a parameter (replaced, or edited in place), or the
        number of inputs or outputs makes a node touched, and every backend writes it anew from the IR.
        Rewiring an input to another value does not: the origin is written with the new input.
        """
        if self.origin is None or self._snapshot is None:
            return False
        state, attrs = self._snapshot
        return self._state() == state and self.attrs == attrs

    @property
    def renamed(self) -> bool:
        """Has the node been given a new name since import? Backends then name what they write after it."""
        return self._snapshot is not None and self._snapshot[0][1] != self.name

    @property
    def output(self) -> Value:
        return self.outputs[0]

    @property
    def label(self) -> str:
        """How reports name this node: its module path when it came from one, else its graph name."""
        return self.scope or self.name

    def describe(self) -> str:
        """How reports name what this node does: its kind, or for an opaque node the call it keeps."""
        if self.kind == "opaque":
            return f"opaque op {self.label} ({self.attrs.get('call', '?')})"
        return f"{self.kind} {self.label}"

    def add_input(self, value: Value) -> None:
        value.uses.append((self, len(self.inputs)))
        self.inputs.append(value)

    def set_input(self, index: int, value: Value) -> None:
        old = self.inputs[index]
        old.uses.remove((self, index))
        value.uses.append((self, index))
        self.inputs[index] = value

    def drop_inputs(self) -> None:
        for i, value in enumerate(self.inputs):
            value.uses.remove((self, i))
        self.inputs = []

    def param(self, key: str) -> torch.Tensor | None:
        return self.params.get(key)

    def __repr__(self) -> str:
        ins = ", ".join(map(repr, self.inputs))
        outs = ", ".join(map(repr, self.outputs))
        return f"{outs} = {self.kind}[{self.name}]({ins})"


class Graph:
    """Nodes in a topological order, graph inputs and outputs, and frontend bookkeeping.

    Nodes live in an insertion-ordered dict so erasing is O(1); new nodes are appended and
    `topological_sort()` (run by the pass driver and the backends) restores a valid order.
    """

    def __init__(self):
        self._nodes: dict[Node, None] = {}
        self.inputs: list[Value] = []
        self.outputs: list[Value] = []
        self.meta: dict[str, Any] = {}
        self._names: set[str] = set()
        self._erased: list[Node] = []  # kept for dispose(): an erased node and its outputs are a cycle

    @property
    def nodes(self) -> list[Node]:
        return list(self._nodes)

    def __iter__(self) -> Iterator[Node]:
        return iter(list(self._nodes))

    def __len__(self) -> int:
        return len(self._nodes)

    # -- construction -------------------------------------------------------------------
    def unique_name(self, base: str) -> str:
        return fresh_name(base, self._names.__contains__, self._names)

    def add_input(self, name: str, shape=None, dtype=None) -> Value:
        value = Value(self.unique_name(name), shape=shape, dtype=dtype)
        value.graph_input = True
        self.inputs.append(value)
        return value

    def append(self, node: Node) -> Node:
        """Add a node. Its name is made unique within the graph."""
        if node.name in self._names:
            node.name = self.unique_name(node.name)
            for i, out in enumerate(node.outputs):
                out.name = node.name if i == 0 else f"{node.name}.{i}"
        else:
            self._names.add(node.name)
        node.graph = self
        self._nodes[node] = None
        return node

    # -- queries ------------------------------------------------------------------------
    def is_output(self, value: Value) -> bool:
        return any(v is value for v in self.outputs)

    def external_uses(self, value: Value) -> int:
        """Number of reads of a value, counting each graph output as one read."""
        return len(value.uses) + sum(1 for v in self.outputs if v is value)

    def mark_imported(self) -> None:
        """Snapshot every node that has an origin: from now on `node.untouched` tells edits apart."""
        for node in self._nodes:
            if node.origin is not None:
                node.mark_imported()

    def count(self, kind: str) -> int:
        return sum(1 for n in self._nodes if n.kind == kind)

    # -- mutation -----------------------------------------------------------------------
    def replace_all_uses(self, old: Value, new: Value) -> None:
        for node, index in list(old.uses):
            node.set_input(index, new)
        self.outputs = [new if v is old else v for v in self.outputs]

    def erase(self, node: Node) -> None:
        node.drop_inputs()
        del self._nodes[node]
        node.graph = None
        # Its tensors go now: node <-> value cycles would keep them until a collection (paused in apply).
        node.params = {}
        self._erased.append(node)

    def dispose(self) -> None:
        """Break the graph's reference cycles (node <-> value, node <-> graph, erased nodes included),
        so that reference counting frees it at once instead of the cyclic collector, which walked
        every object of it. The graph is empty afterwards; call it only when nothing will read it."""
        for node in list(self._nodes) + self._erased:
            for value in node.outputs:
                value.producer = None
                value.uses = []
            node.inputs = []
            node.graph = None
            node.origin = None
        self._nodes, self._erased = {}, []
        self.inputs, self.outputs, self.meta = [], [], {}

    def eliminate_dead_code(self) -> int:
        """Erase pure nodes whose outputs nobody reads. Returns how many were erased."""
        erased = 0
        for node in reversed(list(self._nodes)):
            if is_pure(node) and all(self.external_uses(v) == 0 for v in node.outputs):
                self.erase(node)
                erased += 1
        return erased

    def topological_sort(self) -> None:
        """Restore a topological order; stable, so nodes already in order keep it. O(nodes)."""
        if self._in_order():
            return  # the common case (every pass sorts on entry and exit): nothing to rebuild
        ordered: dict[Node, None] = {}
        visiting: set[Node] = set()
        for root in self._nodes:
            stack = [(root, False)]
            while stack:
                node, expanded = stack.pop()
                if node in ordered:
                    continue
                if expanded:
                    visiting.discard(node)
                    ordered[node] = None
                    continue
                if node in visiting:
                    raise ValueError(f"graph has a cycle through {node.name}")
                visiting.add(node)
                stack.append((node, True))
                for value in reversed(node.inputs):
                    producer = value.producer
                    if producer is not None and producer not in ordered and producer.graph is self:
                        stack.append((producer, False))
        self._nodes = ordered

    def _in_order(self) -> bool:
        """Does every node come after the producers of its inputs? (Then the sort would keep the order.)"""
        placed: set[Node] = set()
        for node in self._nodes:
            for value in node.inputs:
                producer = value.producer
                if producer is not None and producer.graph is self and producer not in placed:
                    return False
            placed.add(node)
        return True

    def __repr__(self) -> str:
        lines = [f"graph({', '.join(map(repr, self.inputs))}):"]
        lines += [f"  {node!r}" for node in self._nodes]
        lines.append(f"  return {', '.join(map(repr, self.outputs))}")
        return "\n".join(lines)
