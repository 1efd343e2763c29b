"""ONNX forms of the activation-like kinds, pad, slice and mean: import handlers and emitters.

Ops whose definition names an ONNX op type (`define_op(..., onnx="LeakyRelu", onnx_attrs={...})`)
need no code: `generic_handler` and `emit_generic` map their attributes by name. The others here
are ops whose ONNX spelling differs from the IR's by inputs, opset or decomposition.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import RewriteError
from ..ir import Node, OpDef, OpDefinitionError, defined_ops
from ..params import pad_border
from .onnx_arrays import numpy_type_of


def onnx_index() -> dict[str, OpDef]:
    """ONNX op type -> the op defined with it, for every op defined right now (user ops included).

    The first definition of an op type wins, as for fx forms: a user op that names a standard type
    (a `hard_swish` written as HardSwish) does not change how models that already hold it import."""
    index: dict[str, OpDef] = {}
    for op in defined_ops().values():
        if op.onnx:
            index.setdefault(op.onnx, op)
    return index


# -- import ------------------------------------------------------------------------------------
def generic_handler(op: OpDef):
    """Import a node of `op`'s ONNX type whose inputs are exactly the op's data inputs."""
    renamed = {onnx_name: name for name, onnx_name in op.onnx_attrs.items()}

    def handler(imp, gs_node, proto) -> Node | None:
        from .onnx_import import In, _data

        if op.variadic or len(gs_node.inputs) != len(op.inputs) or len(proto.output) != 1 \
                or any(not t.name for t in gs_node.inputs):
            return None
        attrs = {}
        for key, value in gs_node.attrs.items():
            name = renamed.get(key, key)
            if name not in op.attrs:
                return None  # an attribute the IR kind does not model
            attrs[name] = value
        inputs = [_data(imp, t) for t in gs_node.inputs]
        try:
            return imp.make(op.kind, gs_node, proto, inputs, [In(i) for i in range(len(inputs))], attrs)
        except OpDefinitionError:  # ONNX attribute values the IR kind does not accept
            return None
    return handler


def _hardsigmoid(imp, gs_node, proto) -> Node | None:
    """HardSigmoid is torch's hardsigmoid only with alpha = 1/6, beta = 1/2 (as exporters write it)."""
    from .onnx_import import In, _data

    a = gs_node.attrs
    if not math.isclose(a.get("alpha", 0.2), 1 / 6, rel_tol=1e-6) or a.get("beta", 0.5) != 0.5:
        return None
    return imp.make("hardsigmoid", gs_node, proto, [_data(imp, gs_node.inputs[0])], [In(0)])


def _prelu(imp, gs_node, proto) -> Node | None:
    from .onnx_import import In, _data

    slope = imp.constant_of(gs_node.inputs[1]) if len(gs_node.inputs) == 2 else None
    if slope is None:
        return None
    return imp.make("prelu", gs_node, proto, [_data(imp, gs_node.inputs[0])],
                    [In(0), imp.orig(gs_node.inputs[1])], params={"weight": slope})


def _softmax(imp, gs_node, proto) -> Node | None:
    from .onnx_import import In, _data

    if imp.opset < 13 or len(proto.output) != 1:
        return None  # before opset 13 Softmax flattens from `axis` on: not torch's softmax
    return imp.make("softmax", gs_node, proto, [_data(imp, gs_node.inputs[0])], [In(0)],
                    {"dim": int(gs_node.attrs.get("axis", -1))})


def _reduce_mean(imp, gs_node, proto) -> Node | None:
    from .onnx_import import In, _data, _input

    a = gs_node.attrs
    if imp.opset >= 18:
        axes_input = _input(gs_node, 1)
        axes = imp.constant_of(axes_input) if axes_input is not None else None
        slots = [In(0)] + ([imp.orig(axes_input)] if axes_input is not None else [])
        axes = None if axes is None else [int(v) for v in axes.reshape(-1)]
    else:
        axes, slots = a.get("axes"), [In(0)]
    if not axes or a.get("noop_with_empty_axes", 0):
        return None
    return imp.make("mean", gs_node, proto, [_data(imp, gs_node.inputs[0])], slots,
                    {"dim": tuple(axes), "keepdim": bool(a.get("keepdims", 1))})


def _pad(imp, gs_node, proto) -> Node | None:
    """Pad of the spatial axes only, constant pads, scalar constant value: a `pad`."""
    from .onnx_import import In, _data, _input

    x = gs_node.inputs[0]
    rank = len(x.shape) if getattr(x, "shape", None) is not None else None
    a = gs_node.attrs
    mode = {"constant": "constant", "reflect": "reflect", "edge": "replicate"}.get(a.get("mode", "constant"))
    if rank is None or mode is None:
        return None
    if imp.opset < 11:
        pads, value, slots = a.get("pads"), a.get("value", 0.0), [In(0)]
    else:
        pads_t, value_t = imp.constant_of(_input(gs_node, 1)) if _input(gs_node, 1) else None, None
        if _input(gs_node, 2) is not None:
            value_t = imp.constant_of(_input(gs_node, 2))
            if value_t is None or value_t.numel() != 1:
                return None
        if pads_t is None or _input(gs_node, 3) is not None:
            return None  # pads computed at run time, or an axes input
        pads, value = [int(v) for v in pads_t.reshape(-1)], 0.0 if value_t is None else float(value_t.reshape(()))
        slots = [In(0)] + [imp.orig(_input(gs_node, i)) for i in range(1, len(gs_node.inputs))]
    if pads is None or len(pads) != 2 * rank or any(p < 0 for p in pads):
        return None
    begins, ends = pads[:rank], pads[rank:]
    if any(begins[:2]) or any(ends[:2]):
        return None  # the batch or channel axis is padded
    fill = torch.tensor(value, dtype=torch.float64) if mode == "constant" and value else None
    return imp.make("pad", gs_node, proto, [_data(imp, x)], slots,
                    {"padding": tuple(zip(begins[2:], ends[2:])), "mode": mode}, params={"value": fill})


def _slice(imp, gs_node, proto) -> Node | None:
    """Slice along one axis with constant bounds, on a tensor whose size on that axis is known."""
    from .onnx_import import In, _data, _input

    x = gs_node.inputs[0]
    shape = getattr(x, "shape", None)
    if imp.opset < 10 or shape is None:
        return None
    parts = [imp.constant_of(_input(gs_node, i)) if _input(gs_node, i) is not None else None for i in range(1, 5)]
    starts, ends, axes, steps = parts
    if starts is None or ends is None or starts.numel() != 1 or (_input(gs_node, 3) and axes is None) \
            or (_input(gs_node, 4) and steps is None):
        return None
    dim = int(axes.reshape(())) if axes is not None else 0
    dim %= len(shape)
    size = shape[dim]
    step = int(steps.reshape(())) if steps is not None else 1
    if not isinstance(size, int) or step <= 0:
        return None
    start, end, step = slice(int(starts.reshape(())), int(ends.reshape(())), step).indices(size)
    slots = [In(0)] + [imp.orig(_input(gs_node, i)) for i in range(1, len(gs_node.inputs))]
    return imp.make("slice", gs_node, proto, [_data(imp, x)], slots,
                    {"dim": dim, "start": start, "end": max(end, start), "step": step})


HANDLERS = {"HardSigmoid": _hardsigmoid, "PRelu": _prelu, "Softmax": _softmax, "ReduceMean": _reduce_mean,
            "Pad": _pad, "Slice": _slice}


# -- export ------------------------------------------------------------------------------------
def emit_generic(e, node: Node, ins, outs):
    op = node.op
    if op.onnx is None:
        raise RewriteError(f"cannot write a new '{node.kind}' node to ONNX: its definition names no ONNX op type "
                           "(define_op(..., onnx='OpType'))", where=f"node {node.name}")
    e.op(node, op.onnx, ins, outs, **{op.onnx_attrs.get(k, k): v for k, v in node.attrs.items()})


def _ints(e, node, suffix, values):
    return e.constant(node, suffix, np.asarray(values, dtype=np.int64))


def _emit_silu(e, node, ins, outs):
    (gate,) = e.op(node, "Sigmoid", ins)
    e.op(node, "Mul", [ins[0], gate], outs)


def _emit_hardsigmoid(e, node, ins, outs):
    e.op(node, "HardSigmoid", ins, outs, alpha=1 / 6, beta=0.5)


def _emit_hardswish(e, node, ins, outs):
    if e.opset >= 14:
        e.op(node, "HardSwish", ins, outs)
        return
    (gate,) = e.op(node, "HardSigmoid", ins, alpha=1 / 6, beta=0.5)
    e.op(node, "Mul", [ins[0], gate], outs)


def _emit_gelu(e, node, ins, outs):
    if e.opset >= 20:
        e.op(node, "Gelu", ins, outs, approximate=node.attrs["approximate"])
        return
    if node.attrs["approximate"] != "none":
        raise RewriteError("tanh-approximated GELU needs opset 20", where=f"node {node.name}")
    dtype = np.dtype(_dtype_of(node))
    (scaled,) = e.op(node, "Div", [ins[0], e.constant(node, "sqrt2", np.array(math.sqrt(2.0), dtype=dtype))])
    (erf,) = e.op(node, "Erf", [scaled])
    (one_plus,) = e.op(node, "Add", [erf, e.constant(node, "one", np.array(1.0, dtype=dtype))])
    (prod,) = e.op(node, "Mul", [ins[0], one_plus])
    e.op(node, "Mul", [prod, e.constant(node, "half", np.array(0.5, dtype=dtype))], outs)


def _emit_prelu(e, node, ins, outs):
    e.op(node, "PRelu", [ins[0], e.constant(node, "slope", node.params["weight"])], outs)


def _emit_softmax(e, node, ins, outs):
    if e.opset < 13:
        raise RewriteError("softmax needs opset 13 or newer in ONNX (older Softmax flattens)", where=f"node {node.name}")
    e.op(node, "Softmax", ins, outs, axis=node.attrs["dim"])


def _emit_mean(e, node, ins, outs):
    axes, keep = list(node.attrs["dim"]), int(node.attrs["keepdim"])
    if e.opset >= 18:
        e.op(node, "ReduceMean", [ins[0], _ints(e, node, "axes", axes)], outs, keepdims=keep)
    else:
        e.op(node, "ReduceMean", ins, outs, axes=axes, keepdims=keep)


def _emit_pad(e, node, ins, outs):
    pairs, mode = node.attrs["padding"], node.attrs["mode"]
    fill = node.params.get("value")
    pads = [0, 0] + [b for b, _ in pairs] + [0, 0] + [a for _, a in pairs]
    onnx_mode = {"constant": "constant", "reflect": "reflect", "replicate": "edge"}[mode]
    per_channel = mode == "constant" and fill is not None and fill.dim() > 0
    inputs = [ins[0], _ints(e, node, "pads", pads)]
    if mode == "constant" and fill is not None and not per_channel:
        inputs.append(e.constant(node, "value", np.array(fill.item(), dtype=_dtype_of(node))))
    if not per_channel:
        e.op(node, "Pad", inputs, outs, mode=onnx_mode)
        return
    try:
        border = pad_border(node).numpy().astype(_dtype_of(node))
    except ValueError as exc:
        raise RewriteError(str(exc), where=f"node {node.name}") from None
    (padded,) = e.op(node, "Pad", inputs, mode="constant")
    e.op(node, "Add", [padded, e.constant(node, "border", border)], outs)


def _emit_slice(e, node, ins, outs):
    a = node.attrs
    e.op(node, "Slice", [ins[0], _ints(e, node, "starts", [a["start"]]), _ints(e, node, "ends", [a["end"]]),
                         _ints(e, node, "axes", [a["dim"]]), _ints(e, node, "steps", [a["step"]])], outs)


def _dtype_of(node: Node):
    return numpy_type_of(node.inputs[0].dtype) or np.float32


EMITTERS = {"silu": _emit_silu, "hardsigmoid": _emit_hardsigmoid, "hardswish": _emit_hardswish, "gelu": _emit_gelu,
            "prelu": _emit_prelu, "softmax": _emit_softmax, "mean": _emit_mean, "pad": _emit_pad,
            "slice": _emit_slice}


# -- issue 11 (channel removal reach): constant channel selection, inference-mode stochastic depth ----
def _emit_index_select(e, node, ins, outs):
    index = node.params["index"].detach().cpu().numpy().astype(np.int64)
    e.op(node, "Gather", [ins[0], e.constant(node, "index", index)], outs, axis=node.attrs["dim"])


def _emit_stochastic_depth(e, node, ins, outs):
    if node.attrs["training"]:
        raise RewriteError("stochastic depth in training mode has no ONNX form (it is random)", where=f"node {node.name}")
    e.op(node, "Identity", [ins[0]], outs)


EMITTERS.update(index_select=_emit_index_select, stochastic_depth=_emit_stochastic_depth)
