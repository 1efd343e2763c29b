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
