"""`Report.to_html()`: one self-contained page showing what a rewrite changed.

Op counts before and after, per-pass timings, verification errors and refusals grouped by reason, and
the graph before and after drawn by graphviz's `dot` into inline SVG (nothing loaded from the network).
Rewritten nodes are green, refused sites orange. Without `dot` the page says so and lists the nodes.
"""
from __future__ import annotations

import html
import shutil
import subprocess
from dataclasses import dataclass, field

from .ir import Graph

MAX_DRAWN_NODES = 2500  # beyond this, dot takes minutes and the drawing is unreadable anyway
DOT_TIMEOUT = 120  # seconds per graph

REWRITTEN_COLOR = "#7fd17f"
REFUSED_COLOR = "#ffb347"


@dataclass
class GraphSnapshot:
    """The shape of an IR graph at one moment: node names, kinds, labels and edges (no tensors)."""

    nodes: list[tuple[str, str, str]] = field(default_factory=list)  # (name, kind, label)
    edges: list[tuple[str, str]] = field(default_factory=list)  # (producer name or input name, consumer name)
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)


def snapshot(graph: Graph) -> GraphSnapshot:
    shot = GraphSnapshot()
    shot.inputs = [f"input:{v.name}" for v in graph.inputs]
    source = {id(v): f"input:{v.name}" for v in graph.inputs}
    for node in graph.nodes:
        if node.kind == "constant":
            continue
        shot.nodes.append((node.name, node.kind, node.label))
        for v in node.outputs:
            source[id(v)] = node.name
    for node in graph.nodes:
        if node.kind == "constant":
            continue
        for v in node.inputs:
            if id(v) in source:
                shot.edges.append((source[id(v)], node.name))
    shot.outputs = [source[id(v)] for v in graph.outputs if id(v) in source]
    return shot


def dot_available() -> bool:
    return shutil.which("dot") is not None


def to_dot(shot: GraphSnapshot, marks: dict[str, str]) -> str:
    """DOT text for a snapshot; `marks` maps node names to a fill colour."""
    def q(text: str) -> str:
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'

    lines = ["digraph G {", "  rankdir=TB; node [shape=box, style=\"rounded,filled\", fillcolor=\"#eeeeee\", "
             "fontname=\"Helvetica\", fontsize=10]; edge [color=\"#888888\"];"]
    for name in shot.inputs:
        lines.append(f"  {q(name)} [label={q(name.split(':', 1)[1])}, shape=ellipse, fillcolor=\"#cfe2ff\"];")
    for name, kind, label in shot.nodes:
        color = marks.get(name)
        fill = f", fillcolor={q(color)}" if color else ""
        text = kind if label == kind else f"{kind}\n{label}"
        lines.append(f"  {q(name)} [label={q(text)}, id={q('n_' + name)}{fill}];")
    for a, b in shot.edges:
        lines.append(f"  {q(a)} -> {q(b)};")
    for i, name in enumerate(shot.outputs):
        lines.append(f"  {q(f'output:{i}')} [label=\"output\", shape=ellipse, fillcolor=\"#cfe2ff\"];")
        lines.append(f"  {q(name)} -> {q(f'output:{i}')};")
    lines.append("}")
    return "\n".join(lines)


def render_svg(dot_text: str) -> str:
    """dot's SVG for the text (its XML prologue dropped, so it inlines into HTML)."""
    done = subprocess.run(["dot", "-Tsvg"], input=dot_text, capture_output=True, text=True, timeout=DOT_TIMEOUT)
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip().splitlines()[0] if done.stderr.strip() else "dot failed")
    svg = done.stdout
    return svg[svg.index("<svg"):]


def _graph_section(title: str, shot: GraphSnapshot | None, marks: dict[str, str]) -> str:
    if shot is None:
        return f"<h2>{title}</h2><p class=note>no graph recorded</p>"
    head = f"<h2>{title} ({len(shot.nodes)} nodes)</h2>"
    if not dot_available():
        items = "".join(f"<li>{html.escape(kind)} {html.escape(label)}</li>" for _, kind, label in shot.nodes[:500])
        return (head + "<p class=note>graphviz's <code>dot</code> was not found, so the graph is not drawn "
                "(install graphviz, e.g. <code>apt-get install graphviz</code>). Its nodes:</p><ol>" + items + "</ol>")
    if len(shot.nodes) > MAX_DRAWN_NODES:
        return head + f"<p class=note>not drawn: more than {MAX_DRAWN_NODES} nodes</p>"
    try:
        svg = render_svg(to_dot(shot, marks))
    except (RuntimeError, subprocess.TimeoutExpired, OSError) as exc:
        return head + f"<p class=note>dot could not draw it: {html.escape(str(exc))}</p>"
    return head + f"<div class=graph>{svg}</div>"


def _marks(report, after: bool) -> dict[str, str]:
    """Colours per node name: refused sites orange; rewritten nodes green (before: the matched nodes;
    after: nodes that were not in the graph before, or are of another kind now)."""
    marks: dict[str, str] = {}
    for p in report.passes:
        for r in p.result.refused:
            for name in r.node_names:
                marks[name] = REFUSED_COLOR
    if after:
        before = {name: kind for name, kind, _ in report.graph_before.nodes} if report.graph_before else {}
        for name, kind, _ in report.graph_after.nodes:
            if before.get(name) != kind:
                marks[name] = REWRITTEN_COLOR
    else:
        for p in report.passes:
            for r in p.result.rewritten:
                for name in r.node_names:
                    marks[name] = REWRITTEN_COLOR
    return marks


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def to_html(report, title: str = "rewrite report") -> str:
    from .report import group_refusals

    e = html.escape
    kinds = sorted(set(report.nodes_before) | set(report.nodes_after))
    counts = _table(["op", "before", "after"],
                    [[e(k), str(report.nodes_before.get(k, 0)), str(report.nodes_after.get(k, 0))] for k in kinds])
    pass_rows = []
    for p in report.passes:
        rewritten = ", ".join(f"{e(rule)} {n}" for rule, n in sorted(p.result.counts.items())) or "nothing"
        check = e(p.verification.summary()) if p.verification is not None else "not verified"
        pass_rows.append([e(p.name), f"{p.seconds:.3f} s", rewritten, str(len(p.result.refused)), check])
    passes = _table(["pass", "time", "rewritten", "refused", "verification"], pass_rows)
    refusal_rows = [[e(p.name), e(rule), str(len(sites)), e(reason), e(", ".join(sites[:5]) +
                                                                        (" ..." if len(sites) > 5 else ""))]
                    for p in report.passes for rule, reason, sites in group_refusals(p.result.refused)]
    refusals = _table(["pass", "rule", "count", "reason", "sites"], refusal_rows) if refusal_rows else \
        "<p>none</p>"
    legend = (f"<p><span class=swatch style='background:{REWRITTEN_COLOR}'></span> rewritten "
              f"<span class=swatch style='background:{REFUSED_COLOR}'></span> refused site</p>")
    graphs = (_graph_section("Graph before", report.graph_before, _marks(report, after=False)) +
              _graph_section("Graph after", report.graph_after, _marks(report, after=True))) \
        if report.graph_after is not None else "<p class=note>no graph recorded</p>"
    style = ("body{font-family:Helvetica,Arial,sans-serif;margin:1.5em}table{border-collapse:collapse;margin:.5em 0}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top}"
             ".note{color:#a33}.graph{overflow:auto;border:1px solid #ddd;max-height:90vh}"
             ".swatch{display:inline-block;width:1em;height:1em;border:1px solid #888;vertical-align:middle}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{e(title)}</title><style>{style}</style>"
            f"</head><body><h1>{e(title)}</h1><p>frontend: {e(report.frontend)}</p>"
            f"<h2>Op counts</h2>{counts}<h2>Passes</h2>{passes}<h2>Refusals by reason</h2>{refusals}"
            f"{legend}{graphs}</body></html>")
