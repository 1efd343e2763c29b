"""The channel analysis' fast paths give what the plain computations give."""
from __future__ import annotations

import networkx as nx
import torch
from hypothesis import given, settings, strategies as st

from rewrite.analysis.channels import _rows_reading_nonzero, _union_find


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 60), st.lists(st.tuples(st.integers(0, 59), st.integers(0, 59)), max_size=80))
def test_union_find_labels_each_channel_with_the_smallest_of_its_component(n, edges):
    edges = [(a % n, b % n) for a, b in edges]
    a = torch.tensor([e[0] for e in edges], dtype=torch.long)
    b = torch.tensor([e[1] for e in edges], dtype=torch.long)
    labels = _union_find(n, a, b)
    g = nx.Graph()
    g.add_nodes_from(range(n))
    g.add_edges_from(edges)
    expected = torch.empty(n, dtype=torch.long)
    for component in nx.connected_components(g):
        expected[list(component)] = min(component)
    assert torch.equal(labels, expected)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 12), st.integers(1, 9), st.integers(1, 5), st.floats(0.0, 1.0), st.integers(0, 2**31 - 1),
       st.booleans())
def test_rows_reading_nonzero_matches_a_full_count(rows, cols, taps, zero_share, seed, some_columns):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, taps, generator=g)
    w[torch.rand(rows, cols, taps, generator=g) < zero_share] = 0
    w[torch.rand(rows, generator=g) < zero_share] = 0  # whole rows of zeros
    if torch.rand((), generator=g) < 0.2:
        w[0, -1, 0] = float("nan")  # NaN counts as non-zero, as count_nonzero has it
    if some_columns:
        columns = torch.randperm(cols, generator=g)[: int(torch.randint(0, cols + 1, (), generator=g))].sort().values
        expected = torch.count_nonzero(w.index_select(1, columns).reshape(rows, -1), dim=1) > 0
    else:
        columns = None
        expected = torch.count_nonzero(w.reshape(rows, -1), dim=1) > 0
    assert torch.equal(_rows_reading_nonzero(w, columns), expected)
