"""Parameter arithmetic shared by rules: float64 views, BN affines, conv weight layout.

All arithmetic is done in float64 on the CPU; `cast_like` brings the result back to the
original dtype and device, so fp16/bf16 and non-CPU models keep their kind.
"""
from __future__ import annotations

import functools
import math
import weakref

import torch

from .errors import NonFiniteError
from .ir import Node
from .wording import batch_statistics_fix


def f64(t: torch.Tensor | None) -> torch.Tensor | None:
    """A fresh float64 CPU copy (a copy even when `t` is float64 already: results must never alias inputs)."""
    return None if t is None else t.detach().to(device="cpu", dtype=torch.float64, copy=True)


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or inf in `t`: one pass, no copy (NaN propagates through aminmax)."""
    if not t.is_floating_point() or not t.numel():
        return True
    low, high = torch.aminmax(t.detach())
    return math.isfinite(float(low)) and math.isfinite(float(high))


# A parameter this close to its dtype's largest value (within 2**32) makes activations overflow on
# ordinary inputs, and a fold moves where: the original overflows and the rewrite does not, or the
# reverse. Such sites are refused; the margin is far above any trained weight.
_HEADROOM = 2.0**32


@functools.lru_cache(maxsize=None)
def _too_large(dtype: torch.dtype) -> float | None:
    if not dtype.is_floating_point:
        return None
    largest = torch.finfo(dtype).max
    return largest / _HEADROOM if largest >= 1e38 else None  # float32, bfloat16, float64; float16 has no room


def check_parameter(t: torch.Tensor, dtype: torch.dtype, what: str, allow_infinite: bool = False,
                    source: torch.Tensor | None = None) -> float | None:
    """Raise NonFiniteError (the driver refuses the site) if `t` is NaN, inf or within 2**32 of `dtype`'s
    range. With `allow_infinite`, values that are +-inf in `source` on purpose (open clamp bounds) pass.

    Returns a bound on the largest magnitude in `t` (at least it, and exact when `t` is not a dense
    float32/float64 CPU tensor) when every value is finite (None for an empty or integer `t`)."""
    if not t.is_floating_point() or not t.numel():
        return None
    limit = _too_large(dtype)
    bound = _fresh_bound(t)
    if bound is None:
        bound = _magnitude_bound(t)
    if bound is not None and (limit is None or bound <= limit):
        return bound  # finite, and below the margin: what the exact pass below would conclude
    low, high = torch.aminmax(t.detach())  # one pass; NaN propagates, so a NaN makes `peak` NaN
    peak = max(-float(low), float(high))
    if math.isfinite(peak) and (limit is None or peak <= limit):
        return peak  # the common case, decided without a copy of the tensor
    bad = ~torch.isfinite(t)
    if allow_infinite and source is not None:
        bad &= ~torch.isinf(source.detach().to(t.device))
    if bool(bad.any()):
        raise NonFiniteError(f"{what} would not be finite: {int(bad.sum())} of {t.numel()} values are NaN or "
                             f"overflow {str(dtype).replace('torch.', '')}; the site was left as it was")
    finite = t.detach()[torch.isfinite(t)]
    finite_max = float(finite.abs().max()) if finite.numel() else 0.0
    if limit is not None and finite_max > limit:
        raise NonFiniteError(f"{what} holds a value of magnitude {finite_max:.3g}, within 2^32 of "
                             f"{str(dtype).replace('torch.', '')}'s largest: activations would overflow in one "
                             "model and not the other; the site was left as it was")
    return None


# Bounds of tensors the rules made and checked here (scaled weights, cast results), by id: a rule that
# reads a folded weight back (fuse_branches after fold_bn) makes no second pass over it. Only fresh
# results are entered, never a model's own tensor; an edit in place bumps the version, and misses.
_FRESH_BOUNDS: dict[int, tuple[weakref.ref, int, float]] = {}


def _remember(t: torch.Tensor, bound: float | None) -> None:
    if bound is None or not math.isfinite(bound):
        return
    key = id(t)

    def forget(ref, key=key):
        entry = _FRESH_BOUNDS.get(key)
        if entry is not None and entry[0] is ref:
            del _FRESH_BOUNDS[key]

    _FRESH_BOUNDS[key] = (weakref.ref(t, forget), t._version, bound)


def _fresh_bound(t: torch.Tensor) -> float | None:
    entry = _FRESH_BOUNDS.get(id(t))
    if entry is not None and entry[0]() is t and entry[1] == t._version:
        return entry[2]
    return None


_UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float64: 2.0**-53}


def _magnitude_bound(t: torch.Tensor) -> float | None:
    """An upper bound on max |t| from the sum of squares, or None when it gives none (NaN, inf, or squares
    that overflow). One BLAS pass: two to three times faster than aminmax, the cost of checking the
    weights of a large model.

    Rounded sums of non-negative terms lose at most a factor (1 - u) per operation, so the computed sum is
    at least (1 - n u) times the exact one, in any summation order, with or without FMA; squares below the
    smallest normal number (flushed to zero) are covered by the absolute term."""
    u = _UNIT_ROUNDOFF.get(t.dtype)
    n = t.numel()
    if u is None or t.device.type != "cpu" or not t.is_contiguous() or n * u >= 0.5:
        return None
    flat = t.detach().view(-1)
    squares = float(torch.dot(flat, flat))
    if not math.isfinite(squares):
        return None
    return math.sqrt(squares / (1.0 - (n + 1) * u)) * (1.0 + 2.0**-40) + 2.0**-62


def cast_like(t: torch.Tensor, like: torch.Tensor, allow_infinite: bool = False) -> torch.Tensor:
    """A fresh tensor with `like`'s dtype and device (never a view of a shared tensor).

    Every rule's float64 result comes back through here, so this is where a fold whose result is
    not finite (a float32 overflow, a BN with zero variance and eps, NaN) or near overflow is
    refused: NonFiniteError, which the pass driver turns into a refusal of the site.
    `allow_infinite` is for values meant to be +-inf (open clamp bounds).
    """
    out = t.detach().to(device=like.device, dtype=like.dtype, copy=True)
    bound = check_parameter(out, out.dtype, "the rewritten parameter", allow_infinite, source=t)
    _remember(out, bound)
    return out


def scaled_weight(node: Node, scale: torch.Tensor) -> torch.Tensor:
    """A fresh copy of node's weight scaled per output channel, in the weight's own dtype and device.

    `scale` is float64. A float32/float64 weight is multiplied in its own precision by the rounded
    scale (at most 1.5 ulp per element, far inside the tolerances, and several times faster than a
    float64 round trip of every weight); fp16/bf16 weights are multiplied in float64 and rounded once.
    """
    weight = node.params["weight"].detach()
    peak = check_parameter(weight, weight.dtype, f"the weight of {node.label}")
    if weight.dtype in (torch.float32, torch.float64):
        work = weight.cpu()
        factors = scale.to(work.dtype)
        out = scale_output_channels(node, work, factors)
        bound = _product_bound(peak, factors, out.dtype)
        if bound is None:
            bound = check_parameter(out, out.dtype, "the rewritten weight")
        out = out.to(weight.device)
        _remember(out, bound)
        return out
    return cast_like(scale_output_channels(node, f64(weight), scale), weight)


def _product_bound(peak: float | None, factors: torch.Tensor, dtype: torch.dtype) -> float | None:
    """A bound on every product of a value of magnitude <= `peak` and one of `factors`, when it is surely
    finite and below the overflow margin of `dtype` (None otherwise). Then checking the product would find
    nothing, and its pass over the tensor is skipped. A rounded product is at most (1 + 2^-24) times the
    exact one (2^-20 covers it), or the exact one plus the smallest subnormal (the absolute term)."""
    limit = _too_large(dtype)
    if peak is None or limit is None or not factors.numel():
        return None
    bound = peak * float(factors.abs().max()) * (1 + 2.0**-20) + 2.0**-62
    return bound if math.isfinite(bound) and bound <= limit else None


def bn_affine(bn: Node) -> tuple[torch.Tensor, torch.Tensor]:
    """The (scale, shift) per channel of an inference-mode batch_norm, in float64 (fresh tensors)."""
    found = _graph_affines(bn)
    if found is not None:
        return found[0].clone(), found[1].clone()
    return _bn_affine(bn)


_STATS = ("running_var", "running_mean", "weight", "bias")
_CACHE_KEY = "bn_affines"  # in graph.meta, which dispose() clears


def _stats_key(bn: Node) -> tuple:
    """What a BN's affine is computed from: each statistic's identity and version (an edit in place bumps it)."""
    p = bn.params
    return (_identity(p.get("running_var")), _identity(p.get("running_mean")), _identity(p.get("weight")),
            _identity(p.get("bias")), float(bn.attrs["eps"]))


def _identity(t: torch.Tensor | None) -> tuple | None:
    return None if t is None else (id(t), t._version)


def _graph_affines(bn: Node) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The affine of `bn` from its graph's batch of every BN's affine, computed at the first ask.

    Ten small float64 ops a BN (four copies, sqrt, divide, multiply, subtract) cost about 40 us each time;
    the same elementwise ops over every BN's statistics at once (concatenated, grouped so that each group
    uses the same formula) give the same bits for a fraction of that. None when `bn` is not in the batch
    (built later, or its statistics changed since): the caller computes it alone."""
    graph = bn.graph
    if graph is None:
        return None
    batch = graph.meta.get(_CACHE_KEY)
    if batch is None:
        batch = graph.meta[_CACHE_KEY] = _all_affines(graph)
    entry = batch.get(bn)
    if entry is None or entry[0] != _stats_key(bn):
        return None
    return entry[1], entry[2]


def _all_affines(graph) -> dict:
    groups: dict[tuple, list[Node]] = {}
    for node in graph.nodes:
        if node.kind != "batch_norm":
            continue
        stats = [node.params.get(k) for k in _STATS]
        if stats[0] is None or stats[1] is None or any(t is not None and not _plain_vector(t) for t in stats):
            continue  # computed alone, as before
        signature = tuple(None if t is None else t.dtype for t in stats)
        groups.setdefault(signature, []).append(node)
    batch = {}
    for signature, nodes in groups.items():
        sizes = [n.params["running_var"].numel() for n in nodes]
        if len(nodes) < 2 or any(n.params[k] is not None and n.params[k].numel() != c
                                 for n, c in zip(nodes, sizes) for k in _STATS):
            continue
        with torch.no_grad():
            var, mean, gamma, beta = (None if signature[i] is None else
                                      torch.cat([n.params[k] for n in nodes]).to(device="cpu", dtype=torch.float64)
                                      for i, k in enumerate(_STATS))
            eps = torch.repeat_interleave(torch.tensor([float(n.attrs["eps"]) for n in nodes], dtype=torch.float64),
                                          torch.tensor(sizes))
            inv_std = 1.0 / torch.sqrt(var + eps)  # the formulas of _bn_affine, element for element
            scale = inv_std if gamma is None else gamma * inv_std
            shift = -mean * scale if beta is None else beta - mean * scale
        for n, s, t in zip(nodes, scale.split(sizes), shift.split(sizes)):
            batch[n] = (_stats_key(n), s, t)
    return batch


def _plain_vector(t: torch.Tensor) -> bool:
    """A dense 1-D CPU tensor of torch's own classes: what concatenation treats like the tensor alone."""
    return type(t) in (torch.Tensor, torch.nn.Parameter) and t.dim() == 1 and t.device.type == "cpu" \
        and t.layout == torch.strided and not t.is_quantized


def _bn_affine(bn: Node) -> tuple[torch.Tensor, torch.Tensor]:
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
        return f"{bn.label} uses batch statistics {batch_statistics_fix(bn)}"
    if bn.params.get("running_mean") is None or bn.params.get("running_var") is None:
        return f"{bn.label} has no running statistics"
    return None


def weight_bias(node: Node) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 weight and bias of a conv/conv_transpose/linear; a missing bias is zeros.

    Rules fold these, so a non-finite or near-overflow weight refuses the site (NonFiniteError).
    """
    weight = node.params["weight"]
    check_parameter(weight, weight.dtype, f"the weight of {node.label}")
    return f64(weight), bias_f64(node)


def copied_weight(node: Node) -> torch.Tensor:
    """A fresh copy of node's weight, as it is (a rule that only changes the bias), checked like weight_bias.

    The same values as a float64 round trip of the weight, without it."""
    weight = node.params["weight"]
    bound = check_parameter(weight, weight.dtype, f"the weight of {node.label}")
    out = weight.detach().clone()
    _remember(out, bound)
    return out


def bias_f64(node: Node) -> torch.Tensor:
    """Float64 bias of a conv/conv_transpose/linear; a missing bias is zeros (checked like weight_bias)."""
    bias = node.params.get("bias")
    if bias is None:
        return torch.zeros(out_channels(node), dtype=torch.float64)
    check_parameter(bias, bias.dtype, f"the bias of {node.label}")
    return f64(bias)


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


def zero_padded(node: Node) -> bool:
    """Does this conv / pool read zeros beyond the border (where a per-channel shift is not seen)?"""
    return has_padding(node) and node.attrs.get("padding_mode", "zeros") == "zeros"


def channel_values(tensor: torch.Tensor, channel_from_end: int, max_dims: int,
                   dtype: torch.dtype | None = None) -> tuple[torch.Tensor, int | None] | None:
    """A constant operand as float64 values per channel: (0-d value, None) for a scalar, (1-D values,
    channel axis of `tensor`) for a per-channel tensor, or None when it broadcasts any other way.

    Broadcasting aligns from the right: the channel axis is `channel_from_end` axes from the end
    (spatial axes + 1 for a conv's activation, 1 for a linear's). A tensor with more than `max_dims`
    axes would widen the result; a non-scalar of another `dtype` would change the result's dtype.
    """
    if tensor.dim() > max_dims or (tensor.dim() > 0 and dtype is not None and tensor.dtype != dtype):
        return None
    values = f64(tensor)
    if values.numel() == 1:
        return values.reshape(()), None
    axis = tensor.dim() - channel_from_end
    if axis < 0 or any(size != 1 for i, size in enumerate(tensor.shape) if i != axis):
        return None
    return values.reshape(-1), axis


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
