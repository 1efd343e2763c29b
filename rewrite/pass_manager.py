"""Passes, their results, the worklist driver that runs rules to a bounded fixpoint, and the registry."""
from __future__ import annotations

from collections import Counter, defaultdict, deque
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from .errors import NonFiniteError, PassError, RewriteError
from .ir import Graph, Node, Value, is_pure
from .pattern import match
from .rule import Refusal, RewriteContext, Rule


@dataclass
class Rewritten:
    rule: str
    nodes: tuple[str, ...]  # labels of the matched nodes (module path, else graph name), root first
    node_names: tuple[str, ...] = ()  # their graph names
    modules: tuple[str, ...] = ()  # their module paths, where they came from one


@dataclass
class Refused:
    rule: str
    node: str  # label of the site's root
    reason: str
    node_names: tuple[str, ...] = ()  # graph names of the nodes the rule looked at, root first
    modules: tuple[str, ...] = ()


def site_nodes(nodes: Iterable[Node]) -> dict[str, tuple[str, ...]]:
    """The node_names / modules fields of a Rewritten or Refused for these nodes."""
    nodes = list(nodes)
    return {"node_names": tuple(n.name for n in nodes), "modules": tuple(dict.fromkeys(n.scope for n in nodes if n.scope))}


@dataclass
class PassResult:
    """What a pass did. `modified` is derived from the counts, never set by hand."""

    name: str
    counts: Counter = field(default_factory=Counter)
    rewritten: list[Rewritten] = field(default_factory=list)
    refused: list[Refused] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)  # pass-specific extras (costs, groups, ...)

    @property
    def modified(self) -> bool:
        return sum(self.counts.values()) > 0

    def record(self, rule: str, nodes: Iterable[str], matched: Iterable[Node] = ()) -> None:
        self.counts[rule] += 1
        self.rewritten.append(Rewritten(rule, tuple(nodes), **site_nodes(matched)))


class Pass:
    """A named transformation of a Graph. Subclasses implement `run`.

    `options` names the options the pass takes (name -> what it means); `apply(..., options=...)`
    refuses any other key, so a typo is an error rather than a silent no-op.
    """

    name: str = "pass"
    description: str = ""
    options: dict[str, str] = {}
    # The values an option takes, where it takes only some (a switch: (False, True)); checked like its name,
    # so a "no" for a switch is an error, not a True that changes what the pass assumes.
    option_values: dict[str, tuple] = {}

    def check_options(self, given: dict) -> None:
        if not isinstance(given, dict):
            raise PassError(f"options must be a dict of option -> value, not {type(given).__name__}",
                            where=f"pass {self.name}")
        for key, value in given.items():
            if key not in self.options:
                raise PassError(f"unknown option {key!r}{_near(key, self.options)}; "
                                f"its options: {', '.join(self.options) or 'none'}", where=f"pass {self.name}")
            allowed = self.option_values.get(key)
            if allowed is not None and not any(_same_kind(value, a) and value == a for a in allowed):
                raise PassError(f"option {key!r} takes {' or '.join(map(repr, allowed))}, not {value!r}",
                                where=f"pass {self.name}")

    def run(self, graph: Graph, options: dict | None = None) -> PassResult:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<pass {self.name}>"


def _same_kind(value, allowed) -> bool:
    """Is `value` of the kind of an allowed option value: a bool (numpy's too) for a switch, not 1 or a
    tensor; a str (a subclass too: numpy's) for a choice."""
    if isinstance(allowed, bool):
        return isinstance(value, (bool, np.bool_))
    return isinstance(value, type(allowed)) and not isinstance(value, bool)


class RulePass(Pass):
    """Applies its rules by pattern until none fires (a bounded fixpoint).

    Rules are dispatched on the root op kind, so each node only meets the rules that can match it.
    """

    def __init__(self, name: str, rules: Iterable[Rule], description: str = "", max_rewrites_per_node: int = 8,
                 options: dict[str, str] | None = None, option_values: dict[str, tuple] | None = None):
        self.name = name
        self.rules = list(rules)
        for r in self.rules:
            if not isinstance(r, Rule):
                raise PassError(f"a RulePass takes Rules (made with @rule), not {type(r).__name__}", where=f"pass {name}")
        self.description = description
        self.options = dict(options or {})
        self.option_values = dict(option_values or {})
        self.max_rewrites_per_node = max_rewrites_per_node
        self._by_kind: dict[str, list[Rule]] = defaultdict(list)
        for r in self.rules:
            for kind in r.root_kinds:
                self._by_kind[kind].append(r)

    def run(self, graph: Graph, options: dict | None = None) -> PassResult:
        result = PassResult(self.name)
        refusals: dict[tuple[str, str], tuple[Refused, list[Node]]] = {}
        graph.topological_sort()
        budget = self.max_rewrites_per_node * max(len(graph), 1) + 64
        recent: deque[str] = deque(maxlen=6)
        worklist = deque(graph.nodes)
        queued = set(worklist)
        while worklist:
            node = worklist.popleft()
            queued.discard(node)
            if node.graph is not graph:
                continue
            fired = self._rewrite_once(graph, node, options, result, refusals)
            if fired is None:
                continue
            rule_name, touched = fired
            recent.append(f"{rule_name}@{node.label}")
            if sum(result.counts.values()) > budget:
                raise PassError(f"no fixpoint after {budget} rewrites; last rules fired: {', '.join(recent)}",
                                where=f"pass {self.name}")
            for other in touched:
                if other.graph is graph and other not in queued:
                    worklist.append(other)
                    queued.add(other)
        graph.topological_sort()
        # Report a refusal only while every node it concerned is still there: a site that another
        # rule rewrote later is not a refusal the user needs to hear about.
        result.refused = [r for r, nodes in refusals.values() if all(n.graph is graph for n in nodes)]
        return result

    def _rewrite_once(self, graph, node, options, result, refusals):
        for r in self._by_kind.get(node.kind, ()):
            for found in match(r.pattern, node):
                if found.shared_with and not r.allow_shared:
                    reason = (f"an intermediate value of the match is also read by {', '.join(found.shared_with[:3])}; "
                              "rewriting would change that reader's input")
                    refusals[(r.name, node.name)] = (Refused(r.name, node.label, reason, **site_nodes(found.nodes)),
                                                      list(found.nodes))
                    continue
                ctx = RewriteContext(graph, node, options, r.name)
                try:
                    outcome = r.check_outcome(r(ctx, found.bindings))
                except NonFiniteError as exc:  # a parameter overflowed: refuse the site, with the reason
                    outcome = Refusal(str(exc))
                except RewriteError:
                    raise
                except Exception as exc:  # a rule's own bug: leave the site as it was, and say so
                    outcome = Refusal(f"internal error in rule {r.name}: {type(exc).__name__}: {exc} "
                                      "(the site was left unchanged; please report it)")
                if outcome is None or isinstance(outcome, Refusal):
                    _discard(graph, ctx.created)
                    if isinstance(outcome, Refusal):
                        refusals[(r.name, node.name)] = (
                            Refused(r.name, node.label, outcome.reason, **site_nodes(found.nodes)), list(found.nodes))
                    continue
                replacements = outcome if isinstance(outcome, dict) else {node.output: outcome}
                touched = _apply_replacements(graph, replacements)
                refusals.pop((r.name, node.name), None)
                result.record(r.name, [n.label for n in found.nodes], found.nodes)
                # Parts of the site the rule left (a partial merge): refusals while their nodes last.
                for i, (reason, kept) in enumerate(ctx.partial):
                    refusals[(r.name, node.name, i)] = (Refused(r.name, node.label, reason, **site_nodes(kept)), kept)
                _erase_dead(graph, found.nodes)
                touched += [n for n in ctx.created if n.graph is graph]
                return r.name, touched
        return None


def _apply_replacements(graph: Graph, replacements: dict[Value, Value]) -> list[Node]:
    touched: list[Node] = []
    for old, new in replacements.items():
        if new.shape is None:  # a replacement has the shape of what it replaces
            new.shape, new.dtype = old.shape, old.dtype
        touched += old.users
        graph.replace_all_uses(old, new)
        if new.producer is not None:
            touched.append(new.producer)
    return touched


def _discard(graph: Graph, created: list[Node]) -> None:
    """Undo the nodes a refusing rule built before it refused."""
    for node in reversed(created):
        if node.graph is graph:
            graph.erase(node)


def _erase_dead(graph: Graph, nodes: Iterable[Node]) -> None:
    """Erase the given nodes, and producers they kept alive, once nothing reads them."""
    stack = list(nodes)
    while stack:
        node = stack.pop()
        if node.graph is not graph or not is_pure(node):
            continue
        if any(graph.external_uses(v) for v in node.outputs):
            continue
        producers = [v.producer for v in node.inputs if v.producer is not None]
        graph.erase(node)
        stack.extend(producers)


# -- registry -----------------------------------------------------------------------------
_REGISTRY: dict[str, Pass] = {}


def register_pass(p: Pass, replace: bool = False) -> Pass:
    """Make `p` available by name to `apply` and the CLI. An existing name is kept unless `replace=True`."""
    if not isinstance(p, Pass):
        raise PassError(f"register_pass takes a Pass, not {type(p).__name__}")
    if p.name in _REGISTRY and _REGISTRY[p.name] is not p and not replace:
        raise PassError(f"a pass named {p.name!r} is already registered; pass replace=True to replace it",
                        where=f"pass {p.name}")
    _REGISTRY[p.name] = p
    return p


def _near(name: str, known) -> str:
    import difflib

    close = difflib.get_close_matches(str(name), list(known), n=2)
    return f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""


def get_pass(spec: str | Pass) -> Pass:
    if isinstance(spec, Pass):
        return spec
    if isinstance(spec, Rule):
        return RulePass(spec.name, [spec], spec.description)
    if isinstance(spec, str):
        _load_builtin_passes()
        if spec in _REGISTRY:
            return _REGISTRY[spec]
        raise PassError(f"unknown pass {spec!r}{_near(spec, _REGISTRY)}; known passes: {', '.join(sorted(_REGISTRY))}")
    raise PassError(f"a pass must be a name, a Pass or a Rule, not {type(spec).__name__}")


def available_passes() -> dict[str, Pass]:
    _load_builtin_passes()
    return dict(sorted(_REGISTRY.items()))


def _load_builtin_passes() -> None:
    import rewrite.passes  # noqa: F401  (registers the built-in passes on import)
