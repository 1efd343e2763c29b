"""One rule set, two frontends: each pass on a torch model and on its ONNX export; canonical round trips."""
from __future__ import annotations

import io

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
from onnx import TensorProto, helper, numpy_helper

import rewrite
from rewrite.pass_manager import RulePass
from rewrite.pattern import P
from rewrite.rule import rule
from rewrite.testing import randomize_bn


class Block(nn.Module):
    """conv-bn-relu6 twice with a residual add, a concat, an avg-pool branch and a linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.a = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                               nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.b = nn.Sequential(nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4), nn.ReLU6())
        self.pool = nn.AvgPool2d(3, 1, 1, count_include_pad=False)
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(self.a(x) + x)
        y = torch.cat([x, self.pool(self.b(x))], 1)
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))


def to_onnx(model: nn.Module, x: torch.Tensor) -> onnx.ModelProto:
    buffer = io.BytesIO()
    torch.onnx.export(model, (x,), buffer, dynamo=False, training=torch.onnx.TrainingMode.PRESERVE,
                      do_constant_folding=False, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    return onnx.load_from_string(buffer.getvalue())


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    model = randomize_bn(Block().eval(), seed=2)
    x = torch.randn(2, 3, 16, 16)
    return model, x, to_onnx(model, x)


@pytest.mark.parametrize("name", list(rewrite.available_passes()))
def test_same_pass_on_torch_and_onnx(pair, name):
    model, x, exported = pair
    torch_out, torch_report = rewrite.apply(model, [name], example_inputs=x, return_report=True)
    onnx_out, onnx_report = rewrite.apply(exported, [name], return_report=True)
    assert rewrite.verify(model, torch_out, x).ok
    check = rewrite.verify(exported, onnx_out)
    assert check.ok, str(check)
    onnx.checker.check_model(onnx_out, full_check=True)
    if name == "fold_bn":  # the same sites fold on both sides
        assert torch_report[name].result.counts == onnx_report[name].result.counts
        assert sum(torch_report[name].result.counts.values()) == 4
        assert not any(n.op_type == "BatchNormalization" for n in onnx_out.graph.node)


def test_rewritten_graph_module_exports_to_onnx(pair):
    """A GraphModule from rewrite.apply goes through torch.onnx.export and runs the same in onnxruntime."""
    model, x, exported = pair
    fused = rewrite.apply(model, ["fold_bn", "cleanup"], example_inputs=x)
    again = to_onnx(fused, x)
    onnx.checker.check_model(again)
    assert not any(n.op_type == "BatchNormalization" for n in again.graph.node)
    check = rewrite.verify(exported, again)
    assert check.ok, str(check)


# -- every canonical kind written back from scratch -----------------------------------------------------
_KINDS = ("conv", "conv_transpose", "linear", "batch_norm", "add", "mul", "relu", "clamp", "avg_pool", "max_pool",
          "adaptive_avg_pool", "concat", "split", "flatten", "reshape", "identity")


@rule(P.op(_KINDS, any_inputs=True, name="node"))
def rebuild(ctx, node):
    """Replace an imported node by a fresh copy, so the backend must build it from the canonical form."""
    if node.origin is None:
        return None
    new = ctx.op(node.kind, *node.inputs, params=dict(node.params), num_outputs=len(node.outputs), **node.attrs)
    return {old: out for old, out in zip(node.outputs, new.producer.outputs)}


def _canonical_zoo() -> onnx.ModelProto:
    """Asymmetric conv pads, n-ary add, concat, split, per-channel clamp bounds, avg-pool counting pads, ..."""
    rng = np.random.default_rng(0)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    inits = [numpy_helper.from_array(a, n) for n, a in [
        ("w", f(6, 3, 3, 2)), ("b", f(6)), ("wt", f(6, 2, 2, 2)), ("g", f(4)), ("be", f(4)), ("m", f(4)),
        ("v", np.abs(f(4)) + 0.5), ("lw", f(6, 5)), ("lb", f(5)), ("lo", np.float32(-0.5)), ("hi", np.float32(0.7)),
        ("sizes", np.array([2, 4], np.int64)), ("shape", np.array([-1, 21], np.int64)), ("c", f(1, 6, 1, 1))]]
    n = helper.make_node
    nodes = [
        n("Conv", ["x", "w", "b"], ["c1"], pads=[0, 1, 2, 0], strides=[1, 2], dilations=[2, 1]),
        n("ConvTranspose", ["c1", "wt"], ["c2"], strides=[2, 2], group=3, pads=[1, 1, 1, 1], output_padding=[1, 0]),
        n("Split", ["c2", "sizes"], ["s1", "s2"], axis=1),
        n("BatchNormalization", ["s2", "g", "be", "m", "v"], ["bn"], epsilon=1e-3),
        n("Clip", ["bn", "lo", "hi"], ["cl"]),
        n("Concat", ["s1", "cl"], ["cat"], axis=1),
        n("Add", ["cat", "c"], ["a1"]), n("Mul", ["a1", "cat"], ["m1"]), n("Relu", ["m1"], ["r"]),
        n("AveragePool", ["r"], ["ap"], kernel_shape=[3, 3], pads=[1, 0, 1, 2], count_include_pad=0),
        n("MaxPool", ["ap"], ["mp"], kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1),
        n("GlobalAveragePool", ["mp"], ["gp"]), n("Identity", ["gp"], ["id"]),
        n("Flatten", ["id"], ["fl"], axis=1), n("Gemm", ["fl", "lw", "lb"], ["fc"], transB=0),
        n("Reshape", ["mp", "shape"], ["rs"]),
    ]
    graph = helper.make_graph(nodes, "zoo", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 9, 8])],
                              [helper.make_tensor_value_info("fc", TensorProto.FLOAT, ["batch", 5]),
                               helper.make_tensor_value_info("rs", TensorProto.FLOAT, None)], inits)
    graph.output[1].type.tensor_type.shape.dim.add()
    graph.output[1].type.tensor_type.shape.dim.add().dim_value = 21
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_every_canonical_kind_round_trips_when_rebuilt():
    model = _canonical_zoo()
    graph = rewrite.frontends.onnx.import_onnx(model)
    kinds = {node.kind for node in graph.nodes}
    assert set(_KINDS) - {"identity"} <= kinds | {"identity"}, kinds
    out, report = rewrite.apply(model, [RulePass("rebuild", [rebuild])], return_report=True)
    rebuilt = report["rebuild"].result.counts["rebuild"]
    assert rebuilt == sum(1 for node in graph.nodes if node.kind in _KINDS)
    onnx.checker.check_model(out, full_check=True)
    check = rewrite.verify(model, out)
    assert check.ok and check.max_rel <= 1e-6, str(check)


def test_per_channel_clamp_bounds_become_max_and_min():
    """clamp with tensor bounds (as RM's reserved channels use) is written as Max then Min."""
    model = _canonical_zoo()

    @rule(P.op("clamp", P.any("x"), name="clamp"))
    def per_channel(ctx, x, clamp):
        if clamp.params["min"] is not None and clamp.params["min"].dim() > 0:
            return None  # already per-channel
        lo = torch.tensor([-0.5, -0.1, -1.0, 0.0]).reshape(1, 4, 1, 1)
        hi = torch.tensor([0.7, 0.2, 1.0, 9.0]).reshape(1, 4, 1, 1)
        return ctx.op("clamp", x, params={"min": lo, "max": hi})

    out = rewrite.apply(model, [RulePass("per_channel", [per_channel])])
    assert [n.op_type for n in out.graph.node].count("Clip") == 0
    assert {"Max", "Min"} <= {n.op_type for n in out.graph.node}
    feeds = {"x": np.random.default_rng(3).standard_normal((2, 3, 9, 8)).astype(np.float32)}
    check = rewrite.verify(model, out, feeds)
    # Bounds differ from the original Clip's on purpose, so the outputs must differ, and be finite.
    assert not check.ok and np.isfinite(check.max_abs)
