"""The non-negativity analysis: sound on random op chains (a value it proves >= 0 never goes negative),
and it proves what RM relies on (ReLU, then max-pool, concat, add of non-negatives, ...)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from rewrite.analysis.ranges import NonNegativity, nonnegative_values
from rewrite.frontends.fx import import_module
from rewrite.ir import Graph, Node

OPS = {
    "relu": torch.relu,
    "conv": None,  # filled per module (needs weights)
    "max_pool": lambda h: F.max_pool2d(h, 3, 1, 1),
    "avg_pool": lambda h: F.avg_pool2d(h, 3, 1, 1),
    "relu6": F.relu6,
    "hardtanh": lambda h: F.hardtanh(h, -1.0, 1.0),
    "clamp_pos": lambda h: torch.clamp(h, min=0.5),
    "clamp_max_neg": lambda h: torch.clamp(h, max=-0.5),
    "neg_const": lambda h: h + (-1.0),
    "pos_const": lambda h: h + 1.0,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "flatten_view": lambda h: torch.flatten(h, 2).reshape(h.shape),
    "dropout": lambda h: F.dropout(h, 0.5, False),
    "self_add": lambda h: h + h,
    "self_mul": lambda h: h * h,
    "cat": lambda h: torch.cat([h, h], 1)[:, : h.shape[1]],
}


class Chain(nn.Module):
    def __init__(self, ops):
        super().__init__()
        self.ops = ops
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        for op in self.ops:
            x = self.conv(x) if op == "conv" else OPS[op](x)
        return x


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from(list(OPS)), min_size=1, max_size=5))
def test_analysis_is_sound_on_random_chains(ops):
    model = Chain(ops).eval()
    x = torch.randn(2, 3, 5, 5) * 4
    graph = import_module(model, x)
    analysis = NonNegativity(graph)
    proved = analysis(graph.outputs[0])
    out = model(x)
    if proved:
        assert bool((out >= 0).all()), f"{ops} was proved non-negative but gave {float(out.min())}"
    # the ops that always end non-negative must be recognised
    if ops[-1] in ("relu", "relu6", "clamp_pos", "sigmoid"):
        assert proved


class Stem(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.head = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        a = self.pool(torch.relu(self.conv(x)))
        b = F.adaptive_avg_pool2d(a, 2)
        c = torch.cat([a[:, :2, :2, :2], b[:, :2]], 1)  # getitem is opaque: not proved
        return torch.cat([a, a], 1) + torch.relu(x).mean(), b, c, self.head(a)


def test_what_rm_relies_on():
    x = torch.randn(1, 3, 8, 8)
    graph = import_module(Stem(), x)
    analysis = NonNegativity(graph)
    cat_plus, pooled, sliced, conv = graph.outputs
    assert analysis(cat_plus) is False  # .mean() is opaque: the analysis stays sound, not complete
    assert analysis(pooled) is True
    assert analysis(sliced) is False
    assert analysis(conv) is False
    assert analysis(graph.inputs[0]) is False
    assert NonNegativity(graph, nonnegative_inputs=True)(graph.inputs[0]) is True
    names = nonnegative_values(graph)
    assert pooled.name in names and conv.name not in names


def test_clamp_with_tensor_bounds_and_assume():
    graph = Graph()
    x = graph.add_input("x")
    lo = Node("clamp", "lo", [x], {},
              {"min": torch.tensor([0.0, -float("inf")]).reshape(2, 1, 1), "max": None})
    graph.append(lo)
    hi = Node("clamp", "hi", [x], {},
              {"min": torch.zeros(2, 1, 1), "max": torch.full((2, 1, 1), float("inf"))})
    graph.append(hi)
    analysis = NonNegativity(graph)
    assert analysis(lo.output) is False  # one channel is unbounded below
    assert analysis(hi.output) is True
    analysis.assume(x, True)
    assert analysis(x) is True
