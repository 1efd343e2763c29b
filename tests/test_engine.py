"""The engine itself: pattern matching, the worklist driver, the registry, custom rules and passes."""
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings, strategies as st

import rewrite
from rewrite import P, PassError, rule
from rewrite.frontends.fx import import_module
from rewrite.ir import Graph, Node
from rewrite.pattern import match
from rewrite.pass_manager import RulePass
from rewrite.testing import check_pass


def build_add_graph():
    g = Graph()
    x = g.add_input("x")
    a = g.append(Node("relu", "a", [x]))
    b = g.append(Node("identity", "b", [x]))
    s = g.append(Node("add", "s", [b.output, a.output]))
    g.outputs = [s.output]
    return g, x, a, b, s


def test_add_matches_commutatively():
    g, x, a, b, s = build_add_graph()
    pattern = P.add(P.op("relu", P.any("x"), name="r"), P.op("identity", P.any("x"), name="i"))
    found = list(match(pattern, s))
    assert len(found) == 1
    assert found[0].bindings["r"] is a and found[0].bindings["i"] is b and found[0].bindings["x"] is x


def test_a_capture_used_twice_must_bind_the_same_value():
    g = Graph()
    x, y = g.add_input("x"), g.add_input("y")
    a = g.append(Node("relu", "a", [x]))
    b = g.append(Node("relu", "b", [y]))
    s = g.append(Node("add", "s", [a.output, b.output]))
    g.outputs = [s.output]
    same_input = P.add(P.op("relu", P.any("x")), P.op("relu", P.any("x")))
    assert list(match(same_input, s)) == []
    any_inputs = P.add(P.op("relu", P.any("x")), P.op("relu", P.any("y")))
    assert len(list(match(any_inputs, s))) == 2  # both operand orders


def test_intermediate_values_read_elsewhere_are_reported():
    g, x, a, b, s = build_add_graph()
    extra = g.append(Node("relu", "extra", [a.output]))
    g.outputs.append(extra.output)
    pattern = P.add(P.op("relu", P.any(), name="r"), P.any())
    found = list(match(pattern, s))
    assert any(m.shared_with == ["extra"] for m in found)


def test_attribute_checks_and_predicates():
    g = Graph()
    x = g.add_input("x")
    c = g.append(Node("max_pool", "c", [x], attrs={"kernel_size": (3, 3), "stride": (2, 2), "padding": ((1, 1),) * 2,
                                                   "dilation": (1, 1)}))
    g.outputs = [c.output]
    assert list(match(P.op("max_pool", P.any(), stride=(2, 2)), c))
    assert list(match(P.op("max_pool", P.any(), stride=[2, 2]), c))  # written as a list, stored as a tuple
    assert not list(match(P.op("max_pool", P.any(), stride=(1, 1)), c))
    assert list(match(P.op("max_pool", P.any(), kernel_size=lambda k: k[0] >= 3), c))


def test_topological_sort_places_appended_producers_first():
    g = Graph()
    x = g.add_input("x")
    late_consumer = g.append(Node("relu", "consumer", [x]))
    producer = g.append(Node("relu", "producer", [x]))
    late_consumer.set_input(0, producer.output)
    g.outputs = [late_consumer.output]
    g.topological_sort()
    assert [n.name for n in g.nodes] == ["producer", "consumer"]


@rule(P.op("relu", P.op("relu", P.any("x"))))
def drop_double_relu(ctx, x):
    """relu(relu(x)) is relu(x)."""
    return ctx.op("relu", x)


class DoubleRelu(nn.Module):
    def forward(self, x):
        return torch.relu(torch.relu(torch.relu(x))) * 2


def test_custom_rule_runs_beside_builtin_passes():
    model = DoubleRelu()
    x = torch.randn(3, 4)
    out, report = rewrite.apply(model, [drop_double_relu, "cleanup"], example_inputs=x, return_report=True,
                                verify=True)
    assert report["drop_double_relu"].result.counts["drop_double_relu"] == 2
    assert out.code.count("torch.relu(") == 1 and "const" not in out.code
    assert torch.equal(out(x), model(x))


def test_custom_rule_with_check_pass():
    check_pass(RulePass("no_double_relu", [drop_double_relu]), DoubleRelu(), torch.randn(3, 4))


@rule(P.op("relu", P.any("x"), name="r"))
def flip_flop(ctx, x, r):
    """A broken rule: it always rewrites, so it never reaches a fixpoint."""
    return ctx.op("relu", x)


def test_fixpoint_bound_names_the_last_rules():
    with pytest.raises(PassError) as err:
        rewrite.apply(DoubleRelu(), [RulePass("flip", [flip_flop])])
    assert "flip_flop@" in str(err.value) and "no fixpoint" in str(err.value)


def test_refusal_reaches_the_report_and_modified_follows_counts():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))  # training mode
    _, report = rewrite.apply(model, ["fold_bn"], return_report=True)
    result = report["fold_bn"].result
    assert result.modified is False and sum(result.counts.values()) == 0
    assert result.refused and result.refused[0].rule == "fold_bn_into_conv" and result.refused[0].node == "1"
    text = str(report)
    assert "refused (1)" in text and "training mode" in text


def test_unknown_pass_name_lists_the_known_ones():
    with pytest.raises(PassError) as err:
        rewrite.apply(nn.ReLU(), ["fold_everything"])
    assert "fold_bn" in str(err.value)


def test_registry_lists_builtin_passes_with_descriptions():
    passes = rewrite.available_passes()
    assert {"fold_bn", "cleanup"} <= set(passes)
    assert all(p.description for p in passes.values())


def test_unknown_calls_stay_opaque_and_round_trip():
    class Custom(nn.Module):
        def forward(self, x):
            y = torch.nn.functional.gelu(x).sum(dim=1, keepdim=True)
            return torch.sigmoid(y) * x, y.shape[0]

    model = Custom()
    graph = import_module(model)
    assert {n.kind for n in graph.nodes} >= {"opaque", "mul"}
    x = torch.randn(2, 3)
    out = rewrite.apply(model, ["fold_bn", "cleanup"])
    ref, got = model(x), out(x)
    assert torch.equal(ref[0], got[0]) and ref[1] == got[1]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(0, 10**6), max_size=3), min_size=1, max_size=25), st.randoms())
def test_topological_sort_with_and_without_the_in_order_shortcut(edges, rnd):
    """A random DAG appended in a random order: the sort gives the same order whether the graph was
    already in order (the shortcut returns at once) or not (the full stable sort), and a sorted graph
    sorts to itself."""
    def build(shuffled: bool):
        g = Graph()
        x = g.add_input("x")
        nodes = [Node("add" if ins else "relu", f"n{i}", [x] if not ins else [x, x]) for i, ins in enumerate(edges)]
        order = list(range(len(nodes)))
        if shuffled:
            rnd.shuffle(order)
        for i in order:
            g.append(nodes[i])
        for i, ins in enumerate(edges):  # inputs only from earlier nodes: a DAG
            for slot, j in enumerate(ins[:2]):
                if i:
                    nodes[i].set_input(slot, nodes[j % i].output)
        g.outputs = [nodes[-1].output]
        return g

    in_order = build(False)
    assert in_order._in_order()
    before = [n.name for n in in_order.nodes]
    in_order.topological_sort()
    assert [n.name for n in in_order.nodes] == before
    full = build(False)
    full._in_order = lambda: False  # the full sort on the same graph: the same order
    full.topological_sort()
    assert [n.name for n in full.nodes] == before
    shuffled = build(True)
    shuffled.topological_sort()
    position = {n: k for k, n in enumerate(shuffled.nodes)}
    assert shuffled._in_order()
    assert all(position[v.producer] < position[n] for n in shuffled.nodes for v in n.inputs if v.producer)
