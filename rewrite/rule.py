"""Rules: a pattern plus a function from its captures to a replacement, or a refusal.

    @rule(P.op("relu", P.op("relu", P.any("x"))))
    def drop_double_relu(ctx, x):
        return ctx.op("relu", x)

The function receives the rewrite context and the pattern's captures by name. It returns the
value that replaces the root's output, a dict {old value: new value}, `ctx.fail("why")` to
refuse (the reason reaches the report), or None when the site is simply not its business.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .errors import RuleError
from .ir import Graph, Node, Value
from .params import cast_like
from .pattern import OpPattern, capture_names


@dataclass(frozen=True)
class Refusal:
    reason: str


@dataclass
class Rule:
    name: str
    pattern: OpPattern
    fn: Callable[..., Any]
    allow_shared: bool = False  # may intermediate values of the match be read elsewhere?
    description: str = ""

    @property
    def root_kinds(self) -> tuple[str, ...]:
        return self.pattern.kinds

    def __post_init__(self):
        params = list(inspect.signature(self.fn).parameters.values())
        takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
        captures = capture_names(self.pattern)
        plain = [p for p in params[1:] if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
        named = [p.name for p in plain]
        stray = [p.name for p in plain if p.name not in captures and p.default is inspect.Parameter.empty]
        if not params or stray:
            what = "takes no context argument" if not params else \
                f"parameter(s) {', '.join(map(repr, stray))} name no capture of its pattern"
            raise RuleError(f"{what}; the pattern captures {', '.join(sorted(captures)) or 'nothing'}",
                            where=f"rule {self.name}")
        self._accepted = None if takes_all else frozenset(named)

    def __call__(self, ctx: "RewriteContext", bindings: dict[str, Any]):
        if self._accepted is None:
            return self.fn(ctx, **bindings)
        return self.fn(ctx, **{k: v for k, v in bindings.items() if k in self._accepted})

    def check_outcome(self, outcome: Any) -> Any:
        """A rule returns a Value, a dict {old Value: new Value}, a refusal, or None; anything else is its bug."""
        ok = outcome is None or isinstance(outcome, (Value, Refusal)) or (
            isinstance(outcome, dict) and all(isinstance(k, Value) and isinstance(v, Value) for k, v in outcome.items()))
        if not ok:
            raise RuleError(f"returned a {type(outcome).__name__}; a rule returns a Value (ctx.op(...), a captured "
                            "value), a dict {old value: new value}, ctx.fail(reason) or None", where=f"rule {self.name}")
        return outcome


def rule(pattern: OpPattern, name: str | None = None, allow_shared: bool = False):
    """Decorator turning `fn(ctx, **captures)` into a Rule named after the function."""
    if not isinstance(pattern, OpPattern):
        raise TypeError("a rule's pattern must be rooted at an op (P.op / P.add)")

    def wrap(fn):
        doc = (fn.__doc__ or "").strip().splitlines()
        return Rule(name or fn.__name__, pattern, fn, allow_shared, doc[0] if doc else "")

    return wrap


class RewriteContext:
    """What a rule function may do to the graph: build nodes and parameters, or refuse."""

    def __init__(self, graph: Graph, root: Node, options: dict | None = None, rule: str | None = None):
        self.graph = graph
        self.root = root
        self.options = options or {}
        self.created: list[Node] = []
        self.where = f"rule {rule} at {root.label}" if rule else f"node {root.label}"

    def fail(self, reason: str) -> Refusal:
        return Refusal(reason)

    def op(self, kind: str, *inputs: Value, params: dict | None = None, name: str | None = None,
           like: Value | None = None, num_outputs: int = 1, named_after: Node | None = None, **attrs) -> Value:
        """Add a new node and return its (first) output.

        `like` copies shape and dtype metadata; `named_after` names the node (and the module the
        backend builds for it) after that node instead of the match root.
        """
        source = named_after or self.root
        for i, value in enumerate(inputs):
            if not isinstance(value, Value):
                raise RuleError(f"input {i} of the new '{kind}' node is a {type(value).__name__}, not a Value "
                                "(tensors go in params=..., constants through ctx.constant)", where=self.where)
        node = Node(kind, name or source.name, inputs, attrs, params, num_outputs)
        node.op.check_arity(len(node.inputs), f"node {node.name}")
        node.scope = source.scope
        self.graph.append(node)
        self.created.append(node)
        if like is not None:
            node.output.shape, node.output.dtype = like.shape, like.dtype
        return node.output

    def constant(self, tensor: torch.Tensor, name: str | None = None) -> Value:
        value = self.op("constant", params={"value": tensor}, name=name or f"{self.root.name}_const")
        value.shape, value.dtype = tuple(tensor.shape), tensor.dtype
        return value

    @staticmethod
    def param(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """A float64 result cast back to the dtype and device of an existing parameter."""
        return cast_like(value, like)
