"""Sites a pass looked at and left without a rule saying why: each gets a refusal naming its neighbours.

A rule reports a refusal when its pattern matched and a check failed. A BatchNorm after a concat or
an add, or an add of two unrelated tensors, matches no pattern at all, so nothing would be said about
it; `account_for` closes that gap, so the report has a reason for every site of the kinds a pass is about.
"""
from __future__ import annotations

from typing import Callable, Iterable

from .ir import Graph, Node
from .pass_manager import PassResult, Refused, site_nodes


def describe(node: Node | None) -> str:
    if node is None:
        return "a graph input"
    if node.attrs.get("unmapped"):  # a frontend kept it as it is and said why (an ONNX SAME conv, say)
        return f"{node.kind} {node.label} (kept as {node.attrs.get('call', 'it is')}: {node.attrs['unmapped']})"
    return f"{node.kind} {node.label}"


def _alias(node: Node | None) -> bool:
    """An identity or an inference-mode dropout: it says nothing about what a site really reads."""
    return node is not None and len(node.inputs) == 1 and (
        node.kind == "identity" or (node.kind == "dropout" and not node.attrs.get("training")))


def neighbours(node: Node) -> tuple[str, str]:
    """What feeds the node's first input, and what reads its output (both seen through identities and
    inference-mode dropouts, as timm's norm-act layers leave them)."""
    source = node.inputs[0].producer if node.inputs else None
    while _alias(source):
        source = source.inputs[0].producer
    readers, outputs, frontier = [], False, [node]
    while frontier:
        current = frontier.pop(0)
        if current.graph is not None and any(current.output is v for v in current.graph.outputs):
            outputs = True
        for user in current.output.users:
            (frontier if _alias(user) else readers).append(user)
    text = [describe(u) for u in readers][:3] + (["the graph output"] if outputs else [])
    return (describe(source) if node.inputs else "nothing"), ", ".join(text) or "nothing"


def account_for(graph: Graph, result: PassResult, kinds: Iterable[str], rule: str,
                explain: Callable[[Node], str | None]) -> None:
    """Append a refusal for every node of `kinds` still in `graph` that no rewrite or refusal names.

    `explain(node)` gives the reason, or None for a node that is no site of this pass.
    """
    kinds = set(kinds)
    named = {name for r in result.refused for name in r.node_names}
    named |= {name for r in result.rewritten for name in r.node_names}
    for node in graph.nodes:
        if node.kind not in kinds or node.name in named:
            continue
        reason = explain(node)
        if reason:
            result.refused.append(Refused(rule, node.label, reason, **site_nodes([node])))
