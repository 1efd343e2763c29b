"""Reserved channels by concatenation: cat([x[:, a:b], conv(x), ...], dim=1) becomes one conv.

RMNet's RMBlock keeps part of its input as it is and concatenates it with the block's output
(`cat([x[:, :r], out])`); its own conversion gives the kept channels Dirac kernels in the block's
conv. Here every contiguous channel slice of x in a channel concat becomes Dirac rows of one conv,
stacked with the convs of x beside it. The Dirac sits at the tap that reads input pixel i, so it
never reads padding, whatever the padding mode.
"""
from __future__ import annotations

import torch

from rewrite.params import weight_bias
from rewrite.pattern import P
from rewrite.rule import rule

from .residual_build import dirac_tap
from .residual_site import SiteRefusal, channel_slice

_GEOMETRY = ("stride", "padding", "dilation", "groups", "padding_mode")


def _channel_concat(concat) -> bool:
    out = concat.output
    return out.shape is not None and len(out.shape) >= 3 and concat.attrs["dim"] % len(out.shape) == 1


@rule(P.op("concat", any_inputs=True, name="concat"))
def merge_sliced_concat(ctx, concat):
    """cat([x[:, a:b], conv(x)]) along channels becomes one conv: Dirac rows for the slices."""
    if not _channel_concat(concat):
        return None
    producers = [v.producer for v in concat.inputs]
    if any(p is None or not (p.kind == "conv" or channel_slice(p)) for p in producers):
        return None  # an operand that is neither a channel slice nor a conv: not this construct
    x = producers[0].inputs[0]
    if any(p.inputs[0] is not x for p in producers):
        return None
    convs = [p for p in producers if p.kind == "conv"]
    if not convs or len(convs) == len(producers):
        return None  # no slice (a concat of convs is fuse_branches' job) or nothing to carry the slices
    first = convs[0]
    for conv in convs:
        if ctx.graph.external_uses(conv.output) != 1:
            return ctx.fail(f"{conv.label} is also read outside {concat.label}, so it cannot be stacked into one conv")
        differ = [k for k in _GEOMETRY if conv.attrs[k] != first.attrs[k]]
        if conv.params["weight"].shape[2:] != first.params["weight"].shape[2:]:
            differ.append("kernel size")
        if differ:
            return ctx.fail(f"the convs {first.label} and {conv.label} beside the channel slices of {concat.label} "
                            f"differ in {', '.join(differ)}")
    if first.attrs["groups"] != 1:
        return ctx.fail(f"{first.label} is grouped; a channel slice of its input crosses its groups")
    if any(s != 1 for s in first.attrs["stride"]):
        return ctx.fail(f"{first.label} strides by {first.attrs['stride']}, while the channel slices of "
                        f"{concat.label} keep the full resolution")
    try:
        tap = dirac_tap(first)
    except SiteRefusal as refusal:
        return ctx.fail(refusal.reason)
    channels = first.params["weight"].shape[1]
    weights, biases = [], []
    for p in producers:
        if p.kind == "conv":
            w, b = weight_bias(p)
        else:
            n = p.attrs["end"] - p.attrs["start"]
            w = torch.zeros((n, channels) + tuple(first.params["weight"].shape[2:]), dtype=torch.float64)
            w[(torch.arange(n), p.attrs["start"] + torch.arange(n)) + tap] = 1
            b = torch.zeros(n, dtype=torch.float64)
        weights.append(w)
        biases.append(b)
    ref = first.params["weight"]
    params = {"weight": ctx.param(torch.cat(weights), ref), "bias": ctx.param(torch.cat(biases), ref)}
    out = ctx.op("conv", x, params=params, name=first.name, like=concat.output, named_after=first,
                 **{k: first.attrs[k] for k in _GEOMETRY})
    return out


def unmerged_concat(concat) -> str | None:
    """Why a channel concat of convs of x and other operands of x is left (the report's reason); None when
    it is no such concat (a concat of unrelated values, or of convs only: fuse_branches' construct)."""
    if not _channel_concat(concat):
        return None
    producers = [v.producer for v in concat.inputs]
    convs = [p for p in producers if p is not None and p.kind == "conv"]
    after_bn = [p for p in producers if p is not None and p.kind == "batch_norm"
                and p.inputs[0].producer is not None and p.inputs[0].producer.kind == "conv"]
    sources = {id(c.inputs[0]) for c in convs} | {id(b.inputs[0].producer.inputs[0]) for b in after_bn}
    others = [(v, p) for v, p in zip(concat.inputs, producers) if p not in convs and p not in after_bn]
    if not sources or not others or not any(id(v) in sources or (p is not None and any(id(i) in sources
                                                                                    for i in p.inputs))
                                            for v, p in others):
        return None
    if after_bn:
        return (f"{after_bn[0].label} sits between {after_bn[0].inputs[0].producer.label} and {concat.label}: run "
                "fold_bn first, so that the concat reads the conv itself")
    described = [("the input itself" if p is None or id(v) in sources else f"{p.describe()}") for v, p in others
                 if not (p is not None and channel_slice(p))]
    return (f"{concat.label} concatenates its convs' input with {', '.join(described[:3]) or 'other values'}: only "
            "contiguous channel slices x[:, a:b] of that input (step 1) beside convs of it become one conv")
