"""Reusable patterns over the IR, importable as `rewrite.patterns`.

Each is a noun naming what it matches; rules combine them with their own checks.
"""
from rewrite.pattern import P

WEIGHTED = ("conv", "conv_transpose", "linear")

#: conv or conv_transpose followed by batch_norm; captures x, conv, bn
conv_bn = P.op("batch_norm", P.op(("conv", "conv_transpose"), P.any("x"), name="conv"), name="bn")

#: linear followed by batch_norm; captures x, linear, bn
linear_bn = P.op("batch_norm", P.op("linear", P.any("x"), name="linear"), name="bn")

#: batch_norm followed by conv or linear; captures x, bn, conv
bn_conv = P.op(("conv", "linear"), P.op("batch_norm", P.any("x"), name="bn"), name="conv")

#: a weighted op multiplied by a constant (either operand order); captures x, conv, factor, mul
conv_scale = P.mul(P.op(WEIGHTED, P.any("x"), name="conv"), P.const("factor"), name="mul")

#: a weighted op plus a constant (either operand order); captures x, conv, shift, add
conv_shift = P.add(P.op(WEIGHTED, P.any("x"), name="conv"), P.const("shift"), name="add")

# -- issue 11 (BN folding reach) ---------------------------------------------------------------------


def _inference_alias(node) -> bool:
    """An identity, or a dropout in inference mode: the identity on its input."""
    return node.kind == "identity" or not node.attrs.get("training")


#: batch_norm, then an identity or inference-mode dropout, then conv or linear (LeViT's NormLinear head);
#: captures x, bn, alias, conv
bn_alias_conv = P.op(("conv", "linear"), P.op(("dropout", "identity"), P.op("batch_norm", P.any("x"), name="bn"),
                                              name="alias", where=_inference_alias), name="conv")

#: linear, then a flatten / reshape, then batch_norm (LeViT's `bn(linear(x).flatten(0, 1)).reshape_as(x)`);
#: captures x, linear, reshape, bn
linear_reshape_bn = P.op("batch_norm", P.op(("flatten", "reshape"), P.op("linear", P.any("x"), name="linear"),
                                            name="reshape"), name="bn")

#: a concatenation of any operands, then batch_norm (MixNet's mixed convs); captures concat, bn
concat_bn = P.op("batch_norm", P.op("concat", name="concat", any_inputs=True), name="bn")

__all__ = ["WEIGHTED", "conv_bn", "linear_bn", "bn_conv", "conv_scale", "conv_shift", "bn_alias_conv",
           "linear_reshape_bn", "concat_bn"]

from . import branches  # noqa: E402  (multi-branch patterns: rewrite.patterns.branches)
