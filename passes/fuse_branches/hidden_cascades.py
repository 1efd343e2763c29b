"""Cascades written in forms the branch rules do not read, rewritten into forms they do.

A padded border that is what a 1x1 conv gives on zero padding: the padding moves into the conv.
Diverse Branch Block's BN-and-pad pads a 1x1 conv's BN output with the BN's shift. On zeros a 1x1
conv (stride 1) gives its bias, and the BN maps that to bn(bias): so padding the conv's input gives
the same border, and the cascade that follows (1x1 -> KxK, 1x1 -> average) becomes one the
branch rules know. Exact when the fill equals bn(bias) per channel (up to the rounding of the
fill itself, which was computed from the same BN parameters); refused otherwise.

An average pool reading a conv (through its BN) is a depthwise conv with a uniform kernel, so the
conv -> average cascade of DBB's average branch merges like any conv -> conv.
"""
from __future__ import annotations

import torch

from rewrite.ir import Node
from rewrite.params import bias_f64, bn_affine, bn_refusal, f64
from rewrite.pattern import P
from rewrite.rule import rule


def _border_value(pad) -> torch.Tensor:
    fill = pad.params.get("value")
    return torch.zeros((), dtype=torch.float64) if fill is None else f64(fill).reshape(-1)


def _pointwise_refusal(conv) -> str | None:
    weight = conv.params["weight"]
    if conv.kind != "conv" or any(k != 1 for k in weight.shape[2:]):
        return f"{conv.label} is not a 1x1 conv: its output on the border would read the picture"
    if any(s != 1 for s in conv.attrs["stride"]):
        return f"{conv.label} is strided: padding its input would not pad its output by the same amount"
    if conv.attrs["padding_mode"] != "zeros" and any(p != (0, 0) for p in conv.attrs["padding"]):
        return f"{conv.label} pads with {conv.attrs['padding_mode']!r}, not zeros"
    return None


def _same(fill: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> bool:
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else 0.0
    scale = max(1.0, float(expected.abs().max()))
    return bool(((fill - expected).abs() <= 8 * eps * scale).all())


def _move_padding(ctx, x, conv, pad, bn=None):
    if pad.attrs["mode"] != "constant":
        return None
    refusal = _pointwise_refusal(conv)
    if refusal is not None:
        return ctx.fail(refusal)
    expected = bias_f64(conv)
    if bn is not None:
        why = bn_refusal(bn)
        if why:
            return ctx.fail(why)
        scale, shift = bn_affine(bn)
        expected = expected * scale + shift
    fill = _border_value(pad)
    if not _same(fill, expected, conv.params["weight"].dtype):
        return ctx.fail(f"the border {pad.label} writes is not what {conv.label} gives on zero padding "
                        f"({'its BN of ' if bn is not None else ''}its bias), so the padding cannot move into it")
    padding = tuple((a + c, b + d) for (a, b), (c, d) in zip(conv.attrs["padding"], pad.attrs["padding"]))
    attrs = dict(conv.attrs, padding=padding, padding_mode="zeros")
    out = ctx.op("conv", x, params=dict(conv.params), like=pad.output, named_after=conv, **attrs)
    if bn is not None:
        out = ctx.op("batch_norm", out, params=dict(bn.params), like=pad.output, named_after=bn, **bn.attrs)
    return out


@rule(P.op("pad", P.op("batch_norm", P.op("conv", P.any("x"), name="conv"), name="bn"), name="pad"))
def pad_into_pointwise_conv_bn(ctx, x, conv, bn, pad):
    """pad(bn(conv1x1(x)), fill = bn(bias)) is bn(conv1x1 with the padding(x))."""
    return _move_padding(ctx, x, conv, pad, bn)


@rule(P.op("pad", P.op("conv", P.any("x"), name="conv"), name="pad"))
def pad_into_pointwise_conv(ctx, x, conv, pad):
    """pad(conv1x1(x), fill = bias) is conv1x1 with the padding(x)."""
    return _move_padding(ctx, x, conv, pad)


def _conv_fed(node: Node | None) -> bool:
    if node is not None and node.kind == "batch_norm":
        node = node.inputs[0].producer
    return node is not None and node.kind == "conv"


def _branch_of_a_sum(graph, value) -> bool:
    """Whether `value` (through a BN) is read only by a sum of branches, where the composed cascade can be
    absorbed by a conv of the same input (DBB's 1x1 -> average branch); elsewhere it would stay a conv."""
    users = value.users
    if len(users) == 1 and graph.external_uses(value) == 1 and users[0].kind == "batch_norm":
        value = users[0].output
        users = value.users
    return len(users) == 1 and graph.external_uses(value) == 1 and users[0].kind in ("add", "sub")


@rule(P.op("avg_pool", P.any("x"), name="pool"))
def average_after_conv_as_conv(ctx, x, pool):
    """avg_pool(conv(x)) with a plain average (zero padding counted, no ceil): a depthwise conv."""
    source = x.producer
    if not _conv_fed(source) or not _branch_of_a_sum(ctx.graph, pool.output):
        return None  # an ordinary pooling layer: a conv would only cost more, with no sum to absorb it
    a = pool.attrs
    if a["ceil_mode"] or a["divisor_override"] is not None or \
            (not a["count_include_pad"] and any(p != (0, 0) for p in a["padding"])):
        return ctx.fail(f"{pool.label} is not a plain average of its window (ceil_mode, divisor_override or "
                        "count_include_pad=False with padding), so it is no conv")
    channels = x.shape[1] if x.shape is not None and len(x.shape) == len(a["kernel_size"]) + 2 else None
    if channels is None:
        return ctx.fail(f"the channel count of {pool.label}'s input is unknown (pass example_inputs)")
    like = (source if source.kind == "conv" else source.inputs[0].producer).params["weight"]
    kernel = tuple(a["kernel_size"])
    weight = torch.full((channels, 1) + kernel, 1.0 / float(torch.tensor(kernel).prod()), dtype=torch.float64)
    return ctx.op("conv", x, params={"weight": ctx.param(weight, like), "bias": None}, like=pool.output,
                  named_after=pool, stride=a["stride"], padding=a["padding"], dilation=(1,) * len(kernel),
                  groups=channels, padding_mode="zeros")
