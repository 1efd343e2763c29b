"""Parameter arithmetic shared by rules: float64 views, BN affines, conv weight layout.

All arithmetic is done in float64 on the CPU; `cast_like` brings the result back to the
original dtype and device, so fp16/bf16 and non-CPU models keep their kind.
"""
from __future__ import annotations

import torch

from .ir import Node


def f64(t: torch.Tensor | None) -> torch.Tensor | None:
    """A fresh float64 CPU copy (a copy even when `t` is float64 already: results must never alias inputs)."""
    return None if t is None else t.detach().to(device="cpu", dtype=torch.float64, copy=True)


def cast_like(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A fresh tensor with `like`'s dtype and device (never a view of a shared tensor)."""
    return t.detach().to(device=like.device, dtype=like.dtype, copy=True)


def scaled_weight(node: Node, scale: torch.Tensor) -> torch.Tensor:
    """A fresh copy of node's weight scaled per output channel, in the weight's own dtype and device.

    `scale` is float64. A float32/float64 weight is multiplied in its own precision by the rounded
    scale (at most 1.5 ulp per element, far inside the tolerances, and several times faster than a
    float64 round trip of every weight); fp16/bf16 weights are multiplied in float64 and rounded once.
    """
    weight = node.params["weight"].detach()
    if weight.dtype in (torch.float32, torch.float64):
        work = weight.cpu()
        return scale_output_channels(node, work, scale.to(work.dtype)).to(weight.device)
    return cast_like(scale_output_channels(node, f64(weight), scale), weight)


def bn_affine(bn: Node) -> tuple[torch.Tensor, torch.Tensor]:
    """The (scale, shift) per channel of an inference-mode batch_norm, in float64."""
    var = f64(bn.params["running_var"])
    mean = f64(bn.params["running_mean"])
    inv_std = 1.0 / torch.sqrt(var + float(bn.attrs["eps"]))
    gamma = f64(bn.params.get("weight"))
    beta = f64(bn.params.get("bias"))
    scale = inv_std if gamma is None else gamma * inv_std
    shift = -mean * scale if beta is None else beta - mean * scale
    return scale, shift


def bn_refusal(bn: Node) -> str | None:
    """Why a batch_norm has no fixed affine, or None when it does."""
    if bn.attrs.get("training"):
        return f"{bn.label} uses batch statistics (training mode or track_running_stats=False); call model.eval() first"
    if bn.params.get("running_mean") is None or bn.params.get("running_var") is None:
        return f"{bn.label} has no running statistics"
    return None


def weight_bias(node: Node) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 weight and bias of a conv/conv_transpose/linear; a missing bias is zeros."""
    return f64(node.params["weight"]), bias_f64(node)


def bias_f64(node: Node) -> torch.Tensor:
    """Float64 bias of a conv/conv_transpose/linear; a missing bias is zeros."""
    bias = f64(node.params.get("bias"))
    return torch.zeros(out_channels(node), dtype=torch.float64) if bias is None else bias


def out_channels(node: Node) -> int:
    weight = node.params["weight"]
    if node.kind == "conv_transpose":
        return weight.shape[1] * node.attrs["groups"]
    return weight.shape[0]


def in_channels(node: Node) -> int:
    weight = node.params["weight"]
    if node.kind == "conv":
        return weight.shape[1] * node.attrs["groups"]
    if node.kind == "conv_transpose":
        return weight.shape[0]
    return weight.shape[1]  # linear


def scale_output_channels(node: Node, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """weight scaled per output channel. ConvTranspose keeps its output channels on axis 1, per group."""
    if node.kind == "conv_transpose":
        groups = node.attrs["groups"]
        in_per_group, out_per_group = weight.shape[0] // groups, weight.shape[1]
        w = weight.reshape(groups, in_per_group, out_per_group, *weight.shape[2:])
        s = scale.reshape(groups, 1, out_per_group, *([1] * (weight.dim() - 2)))
        return (w * s).reshape(weight.shape)
    return weight * scale.reshape(-1, *([1] * (weight.dim() - 1)))


def scale_input_channels(node: Node, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """weight scaled per input channel of a conv (grouped) or linear."""
    if node.kind == "linear":
        return weight * scale.reshape(1, -1)
    groups = node.attrs["groups"]
    out_total, in_per_group = weight.shape[0], weight.shape[1]
    w = weight.reshape(groups, out_total // groups, in_per_group, *weight.shape[2:])
    s = scale.reshape(groups, 1, in_per_group, *([1] * (weight.dim() - 2)))
    return (w * s).reshape(weight.shape)


def input_shift_to_bias(node: Node, weight: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """The output bias a per-input-channel shift adds through a conv (unpadded) or linear."""
    if node.kind == "linear":
        return weight @ shift
    groups = node.attrs["groups"]
    out_total, in_per_group = weight.shape[0], weight.shape[1]
    w = weight.reshape(groups, out_total // groups, in_per_group, -1).sum(-1)
    s = shift.reshape(groups, in_per_group, 1)
    return torch.bmm(w, s).reshape(out_total)


def has_padding(node: Node) -> bool:
    return any(a or b for a, b in node.attrs.get("padding", ()))


def pad_border(node: Node) -> torch.Tensor:
    """For a `pad` with per-channel fill values: a (1, C, *out_spatial) tensor holding each channel's
    value on the padded border and 0 inside, so zero padding plus this tensor is the pad, exactly
    (x + 0 is x, 0 + v is v). Needs the output shape."""
    shape = node.output.shape
    fill = node.params["value"]
    if shape is None:
        raise ValueError("a pad with per-channel values needs the output shape (pass example_inputs)")
    inside = torch.zeros((1, 1) + tuple(shape[2:]), dtype=torch.bool)
    index = [slice(None), slice(None)] + [slice(b, size - a) for (b, a), size in zip(node.attrs["padding"], shape[2:])]
    inside[tuple(index)] = True
    values = f64(fill).reshape(1, -1, *([1] * (len(shape) - 2)))
    return torch.where(inside, torch.zeros((), dtype=torch.float64), values.expand(1, shape[1], *shape[2:]))
