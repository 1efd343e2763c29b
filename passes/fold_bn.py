"""fold_bn: BatchNorm and per-channel constant affines folded into the adjacent conv / linear.

Exact by construction: each rule checks the conditions under which the fold is an identity
(inference-mode statistics, no zero padding to break a shift, channels on the right axis),
and refuses with the reason otherwise.
"""
from __future__ import annotations

import torch

from rewrite.ir import Value
from rewrite.params import (bias_f64, bn_affine, bn_refusal, channel_values, copied_weight, in_channels,
                            input_shift_to_bias, out_channels, scale_input_channels, scaled_weight, weight_bias,
                            zero_padded)
from rewrite.pass_manager import RulePass, register_pass
from rewrite.rule import rule
from rewrite.sites import account_for, neighbours
from rewrite.patterns import (bn_alias_conv, bn_conv, concat_bn, conv_bn, conv_scale, conv_shift, linear_bn,
                              linear_reshape_bn)


def _rebuilt(ctx, conv, x: Value, weight: torch.Tensor, bias: torch.Tensor, like: Value) -> Value:
    """A copy of `conv` (same kind and attributes) with a new weight and a new float64-computed bias.

    A weight already in the parameter's dtype and device (from `scaled_weight`) is used as it is.
    """
    ref = conv.params["weight"]
    if weight.dtype != ref.dtype or weight.device != ref.device:
        weight = ctx.param(weight, ref)
    return ctx.op(conv.kind, x, params={"weight": weight, "bias": ctx.param(bias, ref)},
                  like=like, named_after=conv, **conv.attrs)


def _rank(value: Value) -> int | None:
    return None if value.shape is None else len(value.shape)


def _not_2d(value: Value, where: str) -> str | None:
    """Why a BN next to a linear cannot fold: BN normalizes axis 1, a linear acts on the last axis."""
    if _rank(value) == 2:
        return None
    rank = "unknown: pass example_inputs" if value.shape is None else str(_rank(value))
    return f"batch_norm {where} linear folds only on 2-D (N, C) activations; the rank is {rank}"


def _not_batched(conv, value: Value, where: str) -> str | None:
    """Why a BN next to a conv cannot fold: BN normalizes axis 1, which is the conv's channel axis only
    on batched activations. BatchNorm2d/3d insist on batched input; BatchNorm1d also takes (N, C), the
    same rank as a Conv1d's unbatched (C, L), so there the rank must be known."""
    rank, batched = _rank(value), conv.params["weight"].dim()
    if rank == batched or (rank is None and batched > 3):
        return None
    seen = "unknown: pass example_inputs" if rank is None else f"{rank}, unbatched"
    return f"batch_norm {where} {conv.label} folds only on batched activations of rank {batched}; the rank is {seen}"


def _layout_refusal(conv, value: Value, where: str) -> str | None:
    return _not_2d(value, where) if conv.kind == "linear" else _not_batched(conv, value, where)


def _fold_after(ctx, x, conv, bn):
    """Fold an inference-mode BN into the conv / conv_transpose / linear that feeds it."""
    why = bn_refusal(bn) or _layout_refusal(conv, conv.output, "after")
    if why:
        return ctx.fail(why)
    scale, shift = bn_affine(bn)
    if scale.numel() != out_channels(conv):
        return ctx.fail(f"{bn.label} has {scale.numel()} channels, {conv.label} outputs {out_channels(conv)}")
    return _rebuilt(ctx, conv, x, scaled_weight(conv, scale), bias_f64(conv) * scale + shift, bn.output)


@rule(conv_bn)
def fold_bn_into_conv(ctx, x, conv, bn):
    """conv / conv_transpose -> batch_norm becomes one conv."""
    return _fold_after(ctx, x, conv, bn)


@rule(linear_bn)
def fold_bn_into_linear(ctx, x, linear, bn):
    """linear -> batch_norm1d on (N, C) becomes one linear."""
    return _fold_after(ctx, x, linear, bn)


@rule(bn_conv)
def fold_bn_before_conv(ctx, x, bn, conv):
    """batch_norm -> conv / linear becomes one conv, when no zero padding sees the BN shift."""
    return _fold_before(ctx, x, bn, conv)


@rule(bn_alias_conv)
def fold_bn_before_conv_through_dropout(ctx, x, bn, alias, conv):
    """batch_norm -> inference-mode dropout (or identity) -> conv / linear becomes one (LeViT's NormLinear)."""
    return _fold_before(ctx, x, bn, conv)


def _fold_before(ctx, x, bn, conv):
    why = bn_refusal(bn) or _layout_refusal(conv, bn.output, "before")
    if why:
        return ctx.fail(why)
    scale, shift = bn_affine(bn)
    if scale.numel() != in_channels(conv):
        return ctx.fail(f"{bn.label} has {scale.numel()} channels, {conv.label} reads {in_channels(conv)}")
    if conv.kind == "conv" and zero_padded(conv) \
            and bool(shift.abs().max() > 0):
        return ctx.fail(f"{conv.label} zero-pads its input, so the border would see {bn.label}'s shift; "
                        "folding is exact only without padding or with a zero shift")
    weight, bias = weight_bias(conv)
    new_bias = bias + input_shift_to_bias(conv, weight, shift)
    return _rebuilt(ctx, conv, x, scale_input_channels(conv, weight, scale), new_bias, conv.output)


# Opaque calls that read only the shape of an input (index given): the value behind it may change.
_SHAPE_ONLY = {("call_method", "reshape_as"): 1, ("call_method", "view_as"): 1, ("call_method", "expand_as"): 1,
               ("call_method", "size"): 0, ("call_method", "dim"): 0, ("onnx", "Shape"): 0}


def _reads_only_shape(node, index: int) -> bool:
    if node.kind != "opaque":
        return False
    form = ("onnx", node.attrs.get("op_type")) if "op_type" in node.attrs else \
        (node.attrs.get("fx_op"), node.attrs.get("target"))
    return _SHAPE_ONLY.get(form) == index and not node.attrs.get("domain")


def _keeps_channels(linear, reshape) -> str | None:
    """Why `reshape` of a linear's output is not (rows, C) with each row one output vector of the linear."""
    before, after = linear.output.shape, reshape.output.shape
    if before is None or after is None:
        return (f"{reshape.label} reshapes {linear.label}'s output to a shape unknown here: pass example_inputs "
                "to fold the batch_norm after it")
    if len(after) != 2 or after[-1] != before[-1]:
        return (f"{reshape.label} reshapes {linear.label}'s output {tuple(before)} to {tuple(after)}: batch_norm "
                "folds through a reshape only to (rows, features) with the features axis kept whole")
    return None


@rule(linear_reshape_bn, allow_shared=True)
def fold_bn_into_linear_through_reshape(ctx, x, linear, reshape, bn):
    """linear -> flatten / reshape to (rows, features) -> batch_norm1d becomes linear -> reshape (LeViT)."""
    why = bn_refusal(bn) or _keeps_channels(linear, reshape)
    if why:
        return ctx.fail(why)
    graph = ctx.graph
    others = [(u, i) for u, i in linear.output.uses if u is not reshape]
    if graph.is_output(linear.output) or graph.is_output(reshape.output) or len(reshape.output.uses) != 1 \
            or not all(_reads_only_shape(u, i) for u, i in others):
        readers = [u.label for u, i in others if not _reads_only_shape(u, i)] + \
            [u.label for u in reshape.output.users if u is not bn]
        return ctx.fail(f"{linear.label}'s output is also read by {', '.join(readers[:3]) or '<graph output>'} "
                        "(not only for its shape), so the batch_norm cannot move into it")
    scale, shift = bn_affine(bn)
    if scale.numel() != out_channels(linear):
        return ctx.fail(f"{bn.label} has {scale.numel()} channels, {linear.label} outputs {out_channels(linear)}")
    folded = _rebuilt(ctx, linear, x, scaled_weight(linear, scale), bias_f64(linear) * scale + shift, linear.output)
    reshaped = ctx.op(reshape.kind, folded, like=bn.output, named_after=reshape, **reshape.attrs)
    # the shape-only readers (reshape_as(x), x.size()) read the folded linear: same shape
    return {bn.output: reshaped, linear.output: folded}


def _concat_refusal(graph, concat, bn) -> str | None:
    """Why the batch_norm after `concat` cannot be split into its operands' convs."""
    rank = _rank(concat.output)
    dim = concat.attrs["dim"]
    if rank is None:
        return f"the rank of {concat.label}'s output is unknown: pass example_inputs to fold {bn.label} into its convs"
    if dim % rank != 1:
        return f"{concat.label} concatenates along axis {dim}, not the channel axis batch_norm normalizes"
    for value in concat.inputs:
        producer = value.producer
        if graph.external_uses(value) != 1 or sum(v is value for v in concat.inputs) != 1:
            return f"{producer.label}'s output is also read elsewhere, so {bn.label}'s slice cannot move into it"
        why = _layout_refusal(producer, value, "after")
        if why:
            return why
    if graph.external_uses(concat.output) != 1:
        return f"{concat.label}'s output is also read elsewhere, so {bn.label} cannot move into its convs"
    return None


@rule(concat_bn, allow_shared=True)  # a concat read elsewhere too is refused below, naming the BN's neighbours
def fold_bn_into_concatenated_convs(ctx, concat, bn):
    """concat of convs (each read only there) -> batch_norm: each slice of the BN folds into its conv (MixNet)."""
    if not all(v.producer is not None and v.producer.kind in ("conv", "conv_transpose") for v in concat.inputs):
        return None  # not a concat of convs (DenseNet's): the pass's account of BNs left says why
    why = bn_refusal(bn) or _concat_refusal(ctx.graph, concat, bn)
    if why:
        source, readers = neighbours(bn)
        return ctx.fail(f"{bn.label} reads {source} and is read by {readers}: {why}")
    scale, shift = bn_affine(bn)
    widths = [out_channels(v.producer) for v in concat.inputs]
    if sum(widths) != scale.numel():
        return ctx.fail(f"{bn.label} has {scale.numel()} channels, {concat.label} makes {sum(widths)}")
    parts, start = [], 0
    for value, width in zip(concat.inputs, widths):
        conv, part = value.producer, slice(start, start + width)
        start += width
        parts.append(_rebuilt(ctx, conv, conv.inputs[0], scaled_weight(conv, scale[part]),
                              bias_f64(conv) * scale[part] + shift[part], value))
    return ctx.op("concat", *parts, like=bn.output, named_after=concat, **concat.attrs)


def _channel_vector(conv, out: Value, const: torch.Tensor) -> torch.Tensor | None:
    """`const` as one float64 factor per output channel of `conv`, or None if it broadcasts otherwise.

    Broadcasting aligns from the right: a conv's channels sit just left of its spatial axes (batched
    or not), a linear's on the last axis. A constant with more axes than the output would widen it.
    """
    rank = _rank(out)
    from_right = 1 if conv.kind == "linear" else conv.params["weight"].dim() - 1  # channel axis, counted from the end
    max_dims = rank if rank is not None else from_right  # unknown rank: only what fits every layout
    found = channel_values(const, from_right, max_dims, conv.params["weight"].dtype)
    if found is None:
        return None
    values, axis = found
    if axis is None:
        return values.expand(out_channels(conv)).clone()
    return values if values.numel() == out_channels(conv) else None


@rule(conv_scale)
def fold_scale_into_conv(ctx, x, conv, factor, mul):
    """conv * per-channel constant becomes one conv."""
    scale = _channel_vector(conv, conv.output, factor)
    if scale is None:
        return ctx.fail(f"the factor of shape {tuple(factor.shape)} does not act per output channel of {conv.label}")
    bias = bias_f64(conv)
    return _rebuilt(ctx, conv, x, scaled_weight(conv, scale), bias * scale, mul.output)


@rule(conv_shift)
def fold_shift_into_conv(ctx, x, conv, shift, add):
    """conv + per-channel constant becomes one conv with that bias."""
    vector = _channel_vector(conv, conv.output, shift)
    if vector is None:
        return ctx.fail(f"the constant of shape {tuple(shift.shape)} does not act per output channel of {conv.label}")
    return _rebuilt(ctx, conv, x, copied_weight(conv), bias_f64(conv) + vector, add.output)


def _unfoldable(bn) -> str:
    """Why a batch_norm no fold_bn rule matched stays (a BN after a concat, an add or a pool, say)."""
    source, readers = neighbours(bn)
    why = bn_refusal(bn)
    producer = bn.inputs[0].producer if bn.inputs else None
    if producer is not None and producer.attrs.get("unmapped"):  # a conv the frontend could not read as one
        return (f"{why}; " if why else "") + (f"{bn.label} reads {source}; a batch_norm folds only into a conv "
                                              "whose padding, weight and bias are known")
    after_concat = bn.inputs[0].producer is not None and bn.inputs[0].producer.kind == "concat"
    return (f"{why}; " if why else "") + (
        f"{bn.label} reads {source} and is read by {readers}: a batch_norm folds only into a conv, conv_transpose "
        "or linear whose sole reader it is, or into a conv / linear that alone reads it") + (
        " (after a concat, only when every operand is a conv that nothing else reads)" if after_concat else "")


def _kept_as_is(node) -> str | None:
    """Why a BatchNorm module or ONNX BatchNormalization a frontend kept as the call it is (an opaque node,
    not a batch_norm) stays; None for any other opaque node."""
    if not node.attrs.get("is_batch_norm"):
        return None
    why = node.attrs.get("unmapped") or "it is not an inference-mode batch norm with constant statistics"
    return f"{node.label} is kept as the call it is: {why}; a batch_norm folds only as the plain op"


class FoldBnPass(RulePass):
    """The folding rules, then a reason for every batch_norm left (and every BN op kept opaque)."""

    def run(self, graph, options=None):
        result = super().run(graph, options)
        account_for(graph, result, ["batch_norm"], "fold_bn", _unfoldable)
        account_for(graph, result, ["opaque"], "fold_bn", _kept_as_is)
        return result


fold_bn = register_pass(FoldBnPass(
    "fold_bn",
    [fold_bn_into_conv, fold_bn_into_linear, fold_bn_into_linear_through_reshape, fold_bn_into_concatenated_convs,
     fold_bn_before_conv,
     fold_bn_before_conv_through_dropout, fold_scale_into_conv, fold_shift_into_conv],
    "fold BatchNorm and per-channel constant affines into the adjacent conv / conv_transpose / linear",
))
