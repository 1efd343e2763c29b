"""The built-in op kinds. Each definition is the one place that says what its kind carries.

Layout conventions shared by every kind: `padding` is a tuple of (before, after) pairs, one per
spatial axis; `stride`, `dilation`, `kernel_size` are tuples with one entry per spatial axis;
per-channel tensors (clamp bounds, pad values, PReLU slopes) are broadcastable to the activation
(channels on axis 1), or 0-d for one value.
"""
from __future__ import annotations

import operator

import torch
import torch.nn as nn
import torch.nn.functional as F

from .ops import attr, define_op


def clamp_bound(value) -> torch.Tensor | None:
    """A clamp bound in the IR's one form: None, or a tensor (a number becomes a 0-d float64 one)."""
    if value is None or isinstance(value, torch.Tensor):
        return value
    return torch.tensor(float(value), dtype=torch.float64)

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")

_conv_common = {
    "stride": attr("ints"), "padding": attr("pairs"), "dilation": attr("ints"), "groups": attr(int, 1),
}
define_op("conv", attrs={**_conv_common, "padding_mode": attr(str, "zeros", choices=PADDING_MODES)},
          params=("weight", "bias"), required_params=("weight",),
          description="N-d convolution; weight (out, in/groups, *kernel)")
define_op("conv_transpose", attrs={**_conv_common, "output_padding": attr("ints")},
          params=("weight", "bias"), required_params=("weight",),
          description="N-d transposed convolution; weight (in, out/groups, *kernel)")
define_op("linear", params=("weight", "bias"), required_params=("weight",), description="x @ weight.T + bias")
define_op("batch_norm", attrs={"eps": attr(float), "momentum": attr("any", None), "training": attr(bool, False)},
          params=("running_mean", "running_var", "weight", "bias"),
          description="batch normalization over axis 1 (training: batch statistics)")
define_op("add", inputs=("*operands",), description="elementwise sum of its operands (broadcasting)")
define_op("mul", inputs=("*operands",), description="elementwise product of its operands (broadcasting)")
define_op("relu", pointwise=True, nonnegative=True, description="max(x, 0)")
define_op("clamp", params=("min", "max"), pointwise=True,
          description="clamp(x, min, max); each bound a 0-d or per-channel tensor, or None for no bound")
define_op("identity", pointwise=True, description="x")
define_op("dropout", attrs={"p": attr(float), "training": attr(bool)}, pointwise=True,
          description="dropout; the identity when not training")
_pool_common = {"kernel_size": attr("ints"), "stride": attr("ints"), "padding": attr("pairs"),
                "ceil_mode": attr(bool, False)}
define_op("avg_pool", attrs={**_pool_common, "count_include_pad": attr(bool),
                             "divisor_override": attr(int, None, optional=True)},
          description="average pooling; count_include_pad says whether zero padding counts in the mean")
define_op("max_pool", attrs={**_pool_common, "dilation": attr("ints")}, description="max pooling")
define_op("adaptive_avg_pool", attrs={"output_size": attr("any")}, description="adaptive average pooling")
define_op("mean", attrs={"dim": attr("ints"), "keepdim": attr(bool, False)},
          fx=[torch.mean, "mean"], description="mean over the axes `dim`")
define_op("concat", inputs=("*tensors",), attrs={"dim": attr(int)}, description="concatenation along `dim`")
define_op("split", attrs={"dim": attr(int), "sizes": attr("ints")}, num_outputs=None,
          description="pieces of `sizes` along `dim`, one output each")
define_op("slice", attrs={"dim": attr(int), "start": attr(int), "end": attr(int), "step": attr(int, 1)},
          description="x[start:end:step] along `dim` (non-negative, in range)")
define_op("pad", attrs={"padding": attr("pairs"), "mode": attr(str, "constant",
                                                               choices=("constant", "reflect", "replicate"))},
          params=("value",),
          description="padding of the spatial axes; constant mode fills `value` (0-d or per channel; None is 0)")
define_op("flatten", attrs={"start_dim": attr(int), "end_dim": attr(int, -1)}, description="torch.flatten")
define_op("reshape", attrs={"shape": attr("ints")}, description="reshape to a constant shape")
define_op("constant", inputs=(), params=("value",), required_params=("value",), description="a constant tensor")
define_op("opaque", inputs=("*inputs",), open_attrs=True, pure=False, num_outputs=None,
          description="anything a frontend does not understand, written back exactly as it came")

# Activations: plain calls in both frontends, so their definitions give every form.
define_op("sigmoid", pointwise=True, evaluate=torch.sigmoid, nonnegative=True, onnx="Sigmoid",
          fx=[nn.Sigmoid, F.sigmoid, torch.sigmoid, "sigmoid"], description="1 / (1 + exp(-x))")
define_op("silu", pointwise=True, evaluate=F.silu, fx=[nn.SiLU, F.silu], description="x * sigmoid(x)")
define_op("hardswish", pointwise=True, evaluate=F.hardswish, onnx="HardSwish", fx=[nn.Hardswish, F.hardswish],
          description="x * relu6(x + 3) / 6")
define_op("hardsigmoid", pointwise=True, evaluate=F.hardsigmoid, nonnegative=True, fx=[nn.Hardsigmoid, F.hardsigmoid],
          description="relu6(x + 3) / 6")
define_op("gelu", attrs={"approximate": attr(str, "none", choices=("none", "tanh"))}, pointwise=True, evaluate=F.gelu,
          fx=[nn.GELU, F.gelu], description="x * Phi(x)")
define_op("leaky_relu", attrs={"negative_slope": attr(float, 0.01)}, pointwise=True, evaluate=F.leaky_relu, onnx="LeakyRelu",
          onnx_attrs={"negative_slope": "alpha"}, fx=[nn.LeakyReLU, F.leaky_relu],
          description="x if x >= 0 else negative_slope * x")
define_op("prelu", params=("weight",), required_params=("weight",), pointwise=True, fx=[nn.PReLU, F.prelu],
          description="x if x >= 0 else weight * x (weight 0-d or per channel)")
define_op("softmax", attrs={"dim": attr(int)}, nonnegative=True, onnx="Softmax", onnx_attrs={"dim": "axis"},
          fx=[nn.Softmax, F.softmax, torch.softmax, "softmax"], fx_ignore=("_stacklevel",),
          description="softmax along `dim`")


# -- issue 11 (channel removal reach): channel selection and eval-mode stochastic depth -------------
def index_select(x: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """torch.index_select with keyword-friendly arguments: the form a rebuilt `index_select` is written as."""
    return torch.index_select(x, dim, index)


define_op("index_select", attrs={"dim": attr(int)}, params=("index",), required_params=("index",),
          fx=[index_select, torch.index_select, "index_select"],
          description="x.index_select(dim, index) with a constant index (network slimming's channel selection)")
def stochastic_depth(x: torch.Tensor, p: float, mode: str, training: bool = True) -> torch.Tensor:
    """torchvision.ops.stochastic_depth (imported when called): the form a rebuilt node is written as."""
    from torchvision.ops import stochastic_depth as torchvision_stochastic_depth

    return torchvision_stochastic_depth(x, p, mode, training)


# torchvision's StochasticDepth calls a function fx does not trace into; named, so torchvision stays optional.
define_op("stochastic_depth", attrs={"p": attr(float), "mode": attr(str, choices=("row", "batch")),
                                     "training": attr(bool, True)},
          fx=[stochastic_depth, "torchvision.ops.stochastic_depth.stochastic_depth", "torchvision.ops.stochastic_depth.StochasticDepth"],
          description="drops whole rows (or the batch) at random in training; the identity otherwise")


# -- issue 11, branch fusion and BN folding reach: subtraction (FastViT's RepMixer, EfficientViM) -------
define_op("sub", inputs=("x", "other"), onnx="Sub", fx=[operator.sub, torch.sub, "sub"],
          description="x - other (broadcasting); a sum of branches reads it as x + (-1) * other")
