"""remove_residual: RM (Reserve and Merge) residual removal, exact or refused, on any graph.

A residual site is `add(S(x), F(x))`: S a linear shortcut (identity, or 1x1 convs and BNs), F a
chain of convs (BNs folded in) and ReLU-family activations. The first conv of F reserves extra
output channels carrying x (Dirac kernels at its stride), every later conv carries them (Dirac,
whole extra groups for grouped convs), and the last conv merges them back through S's weights,
so the add disappears here, not in a later pass.

Exactness of the reserved signal through the activations:
- x provably >= 0 (rewrite.analysis.ranges), or no ReLU on the path: C reserved channels carry x;
  each ReLU6 / Hardtanh / clamp becomes a per-channel clamp whose reserved channels are unbounded.
- otherwise: 2C channels carry relu(x) and relu(-x), merged as their difference (RMNet's split),
  or, with option signed="clamp", C channels and each ReLU becomes a per-channel clamp.
Options: signed ("split" | "clamp"), nonnegative_inputs (bool: trust graph inputs to be >= 0).
The result's notes hold the cost per site and in total ("sites", "total", "summary").
"""
from __future__ import annotations

import os

from rewrite.analysis.ranges import NonNegativity
from rewrite.ir import Graph
from rewrite.pass_manager import PassResult, RulePass, register_pass
from rewrite.pattern import P
from rewrite.rule import rule
from rewrite.sites import account_for

from .channel_concat import merge_sliced_concat, unmerged_concat
from .residual_build import BlockBuilder, Signals
from .residual_site import ResidualSite, SiteRefusal, block_input, find_site

_STATE = "_remove_residual_state"  # per-run state the pass hands its rule through the options


def _signals(site: ResidualSite, x_nonnegative: bool, signed: str) -> tuple[Signals, bool]:
    """How the reserved channels carry x, and whether ReLUs become per-channel clamps."""
    channels = site.stages[0].weight.shape[1]  # the reserve conv is ungrouped, so this is all of x
    has_relu = any(node.kind == "relu" for node in site.activations)
    if x_nonnegative or not has_relu:
        return Signals(list(range(channels)), [1.0] * channels, rectify=False), False
    if signed == "clamp":
        return Signals(list(range(channels)), [1.0] * channels, rectify=False), True
    return Signals(list(range(channels)) * 2, [1.0] * channels + [-1.0] * channels, rectify=True), False


@rule(P.op("add", P.any("a"), P.any("b"), name="add"))
def reserve_and_merge(ctx, add):
    """add(S(x), F(x)) becomes F's convs widened to carry x and merge S into the last one."""
    state = ctx.options.get(_STATE)
    if state is None:  # the rule used on its own, outside the pass
        state = {"ranges": NonNegativity(ctx.graph, bool(ctx.options.get("nonnegative_inputs"))), "sites": []}
    try:
        site = find_site(ctx.graph, add, state["ranges"])
        if site is None:
            return None
        signed = ctx.options.get("signed", "split")
        if signed not in ("split", "clamp"):
            return ctx.fail(f"option signed must be 'split' or 'clamp', not {signed!r}")
        x_nonnegative = state["ranges"](site.x)
        signals, relu_as_clamp = _signals(site, x_nonnegative, signed)
        built = BlockBuilder(ctx, site, signals, relu_as_clamp).build()
    except SiteRefusal as refusal:
        return ctx.fail(refusal.reason)
    # the new value equals the old one, so whatever was proved about the add's output still holds
    state["ranges"].assume(built.output, state["ranges"](add.output))
    state["sites"].append(_site_note(site, built, x_nonnegative))
    return built.output


def _block_label(site) -> str:
    """The site's module path (e.g. layer1.0): the common prefix of its layers' paths, else the add's name."""
    scopes = [n.scope.split(".") for n in site.main_nodes + site.shortcut.nodes if n.scope]
    prefix = os.path.commonprefix(scopes) if scopes else []
    return ".".join(prefix) or site.add.label


def _site_note(site, built, x_nonnegative: bool) -> dict:
    convs = built.convs
    flops_known = all(c.flops_before is not None for c in convs)
    shortcut_params = sum(sum(t.numel() for k, t in n.params.items() if t is not None and k in ("weight", "bias"))
                          for n in site.shortcut.nodes)
    return {
        "add": _block_label(site),
        "x": site.x.name,
        "x_nonnegative": x_nonnegative,
        "reserved_channels": built.reserved,
        "convs": [{"name": c.name, "channels": [c.channels_before, c.channels_after],
                   "params": [c.params_before, c.params_after], "flops": [c.flops_before, c.flops_after]}
                  for c in convs],
        "params_before": sum(c.params_before for c in convs) + shortcut_params,
        "params_after": sum(c.params_after for c in convs),
        "flops_before": sum(c.flops_before for c in convs) if flops_known else None,
        "flops_after": sum(c.flops_after for c in convs) if flops_known else None,
    }


class RemoveResidualPass(RulePass):
    """The RM rule plus one range analysis shared by all sites and a cost table in the notes."""

    def run(self, graph: Graph, options: dict | None = None) -> PassResult:
        options = dict(options or {})
        state = {"ranges": NonNegativity(graph, bool(options.get("nonnegative_inputs"))), "sites": []}
        options[_STATE] = state
        result = super().run(graph, options)
        account_for(graph, result, ["add"], self.name, _no_residual)
        account_for(graph, result, ["concat"], self.name, unmerged_concat)
        sites = state["sites"]
        result.notes["sites"] = sites
        if sites:
            total = {key: sum(s[key] for s in sites) for key in ("params_before", "params_after")}
            known = all(s["flops_before"] is not None for s in sites)
            total["flops_before"] = sum(s["flops_before"] for s in sites) if known else None
            total["flops_after"] = sum(s["flops_after"] for s in sites) if known else None
            result.notes["total"] = total
            result.notes["summary"] = _summary(sites, total)
        return result


def _no_residual(add) -> str:
    """Why an add no rule refused is no residual block (find_site returned None for it)."""
    if len(add.inputs) != 2:
        return f"{add.label} adds {len(add.inputs)} tensors; a residual block adds two"
    if any(v.producer is not None and v.producer.kind == "constant" for v in add.inputs):
        return f"{add.label} adds a constant, not a shortcut"
    if add.inputs[0] is add.inputs[1]:
        return f"{add.label} adds a tensor to itself (x + x), not a shortcut to a block"
    x = block_input(add)
    if x is None:
        return f"{add.label}'s operands share no input nearby, so no block S(x) + F(x) ends here"
    if x.producer is not None and x.producer.kind == "constant":
        return f"{add.label}'s operands meet only at a constant, so no block S(x) + F(x) ends here"
    return f"{add.label} is not a block S(x) + F(x) over {x.name} (neither operand is a chain from it)"


def _ratio(before, after) -> str:
    if before is None or after is None:
        return "?"
    return f"{before:,} -> {after:,} (x{after / before:.2f})" if before else f"{before} -> {after}"


TOP_SITES = 3  # sites the printed report names; every site is in notes["sites"] (and the JSON report)


def _summary(sites: list[dict], total: dict) -> list[str]:
    """The total, then the sites that grew the most: one line per site read badly on a deep network."""
    lines = [_summary_line(dict(total, add="total")) + f" over {len(sites)} site{'s' if len(sites) > 1 else ''}"]
    if len(sites) > 1:
        top = sorted(sites, key=lambda s: s["params_after"] - s["params_before"], reverse=True)[:TOP_SITES]
        lines += [f"  most params added: {_summary_line(s)}" for s in top]
        if len(sites) > TOP_SITES:
            lines.append(f"  ... {len(sites) - TOP_SITES} more sites in the report's notes (sites; --report-json)")
    return lines


def _summary_line(note: dict) -> str:
    channels = ""
    if "convs" in note:
        channels = " channels " + ", ".join(f"{c['channels'][0]}->{c['channels'][1]}" for c in note["convs"]) + ";"
    return f"{note['add']}:{channels} params {_ratio(note['params_before'], note['params_after'])}; " \
           f"FLOPs {_ratio(note['flops_before'], note['flops_after'])}"


remove_residual = register_pass(RemoveResidualPass(
    "remove_residual", [reserve_and_merge, merge_sliced_concat],
    "RM residual removal: widen each residual block's convs to carry its input and merge the shortcut, "
    "so the add disappears (exact, or refused with the reason)",
    options={"signed": "'split' (default: a signed input as relu(x), relu(-x)) or 'clamp' (C channels, "
                       "per-channel clamps)",
             "nonnegative_inputs": "trust the graph inputs to be >= 0 (images in [0, 1])"},
    option_values={"signed": ("split", "clamp"), "nonnegative_inputs": (False, True)},
))
