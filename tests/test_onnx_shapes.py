"""Shapes on ONNX models: auto_pad in every form, shapes inferred from example inputs through the whole
graph, and Reshape heads computed from the input's own size (view(x.size(0), -1)) read as flatten."""
from __future__ import annotations

import collections
import io

import numpy as np
import onnx
import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

import rewrite
from rewrite.errors import ModelLoadError
from rewrite.testing import randomize_bn

from test_onnx_hypothesis import Builder


def op_types(model) -> collections.Counter:
    return collections.Counter(n.op_type for n in model.graph.node)


@st.composite
def auto_pad_cases(draw):
    auto_pad = draw(st.sampled_from(["NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"]))
    # onnxruntime runs no dilated SAME conv, so the original could not be checked
    dilation = 1 if auto_pad.startswith("SAME") else draw(st.integers(1, 2))
    kernel = draw(st.integers(1, 4))
    return dict(auto_pad=auto_pad, kernel=kernel, stride=draw(st.integers(1, 3)), dilation=dilation,
                size=(kernel - 1) * dilation + 4 + draw(st.integers(0, 4)), symbolic=draw(st.booleans()), seed=draw(st.integers(0, 2**16)),
                pool=draw(st.booleans()))


def build_auto_pad(case):
    rng = np.random.default_rng(case["seed"])
    b = Builder(rng)
    b.spatial = 2
    k, s, d = case["kernel"], case["stride"], case["dilation"]
    attrs = dict(kernel_shape=[k, k], strides=[s, s], dilations=[d, d], auto_pad=case["auto_pad"])
    if case["auto_pad"] == "NOTSET":
        attrs["pads"] = [k // 2, 0, 0, k // 2]
    y = b.node("Conv", ["x", b.tensor(rng.standard_normal((3, 2, k, k)).astype(np.float32))], **attrs)
    y = b.bn(y, 3, "bn")
    if case["pool"]:
        y = b.node("MaxPool", [y], kernel_shape=[2, 2], strides=[2, 2], auto_pad=case["auto_pad"],
                   **({"pads": [0, 0, 1, 1]} if case["auto_pad"] == "NOTSET" else {}))
    size = case["size"]
    return b.model(["batch", 2, "h" if case["symbolic"] else size, "w" if case["symbolic"] else size], y)


@settings(max_examples=30, deadline=None)
@given(auto_pad_cases())
def test_auto_pad_every_form(case):
    model = build_auto_pad(case)
    out, report = rewrite.apply(model, ["fold_bn"], return_report=True)
    result = report["fold_bn"].result
    # A strided SAME window of more than one tap pads by H mod stride: the conv stays opaque, so does the BN,
    # with that reason. A one-tap window never pads, whatever H is.
    strided_same = case["auto_pad"].startswith("SAME") and case["stride"] > 1 and case["symbolic"] and case["kernel"] > 1
    if strided_same:
        assert not result.modified and op_types(out)["BatchNormalization"] == 1
        reasons = [r.reason for r in result.refused]
        assert len(reasons) == 1 and f"auto_pad={case['auto_pad']} with stride {case['stride']}" in reasons[0] \
            and "symbolic size 'h'" in reasons[0], reasons
    else:
        assert result.counts["fold_bn_into_conv"] == 1, [r.reason for r in result.refused]
    onnx.checker.check_model(out, full_check=True)
    sizes = [case["size"], case["size"] + 1] if case["symbolic"] else [case["size"]]
    for size in sizes:  # a symbolic H / W: equal at every size, not only the one drawn
        x = np.random.default_rng(size).standard_normal((2, 2, size, size)).astype(np.float32)
        check = rewrite.verify(model, out, {"x": x})
        assert check.ok and check.max_rel <= 1e-5, str(check)


def test_pads_of_the_wrong_length_name_the_node():
    case = dict(auto_pad="NOTSET", kernel=3, stride=1, dilation=1, size=6, symbolic=False, seed=0, pool=False)
    model = build_auto_pad(case)
    conv = model.graph.node[0]
    del conv.attribute[[a.name for a in conv.attribute].index("pads")]
    conv.attribute.append(onnx.helper.make_attribute("pads", [1, 1]))
    with pytest.raises(ModelLoadError, match=rf"node {conv.name}.*pads has 2 values"):
        rewrite.apply(model, ["fold_bn"])


# -- example inputs fix every intermediate shape ---------------------------------------------------------
class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))

    def forward(self, x):
        x = self.stem(x)
        return torch.relu(x + self.body(x))


def _legacy(model, x, dynamic_axes=None, opset=17):
    buffer = io.BytesIO()
    torch.onnx.export(model, (x,), buffer, dynamo=False, do_constant_folding=False, opset_version=opset,
                      training=torch.onnx.TrainingMode.PRESERVE, input_names=["input"], output_names=["out"],
                      dynamic_axes=dynamic_axes)
    return onnx.load_from_string(buffer.getvalue())


def test_dynamic_hw_with_example_inputs_reaches_remove_residual():
    torch.manual_seed(0)
    net = randomize_bn(Block().eval(), seed=4)
    x = torch.randn(1, 3, 10, 12)
    model = _legacy(net, x, {"input": {0: "n", 2: "h", 3: "w"}, "out": {0: "n", 2: "h", 3: "w"}})
    without, report = rewrite.apply(model, ["fold_bn", "remove_residual"], return_report=True)
    assert not report["remove_residual"].result.modified
    assert any("example_inputs" in r.reason for r in report["remove_residual"].result.refused)
    out, report = rewrite.apply(model, ["fold_bn", "remove_residual"], example_inputs=x, return_report=True)
    assert report["remove_residual"].result.counts["reserve_and_merge"] == 1, report
    assert op_types(out)["Add"] == 0
    for shape in [(1, 3, 10, 12), (2, 3, 7, 5)]:  # the rewrite holds at other sizes too
        check = rewrite.verify(model, out, {"input": np.random.default_rng(1).standard_normal(shape).astype(np.float32)})
        assert check.ok and check.max_rel <= 1e-5, str(check)


# -- view(x.size(0), -1) heads ---------------------------------------------------------------------------
class SlimVGG(nn.Module):
    def __init__(self):
        super().__init__()

        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*block(3, 16), *block(16, 32))
        self.fc = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x):
        x = self.features(x)
        return self.fc(x.view(x.size(0), -1))


def slimmed_vgg() -> nn.Module:
    """Half the channels of each BN dead (gamma 0, relu(beta) = 0), as network slimming leaves them."""
    m = randomize_bn(SlimVGG().eval(), 1)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for bn in (m.features[1], m.features[5]):
            dead = torch.randperm(bn.num_features, generator=g)[:bn.num_features // 2]
            bn.weight[dead] = 0
            bn.bias[dead] = -bn.bias[dead].abs()
    return m


def weight_count(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer)


@pytest.mark.parametrize("export", ["legacy_static", "legacy_dynamic_batch", "dynamo_dynamic_batch"])
def test_remove_channels_reaches_the_classifier_through_the_shape_subgraph(export):
    torch.manual_seed(0)
    m = slimmed_vgg()
    x = torch.randn(2, 3, 16, 16)
    if export == "dynamo_dynamic_batch":
        model = torch.onnx.export(m, (x,), dynamo=True, optimize=False, verbose=False,
                                  dynamic_shapes=({0: torch.export.Dim("batch")},)).model_proto
    else:
        model = _legacy(m, x, {"input": {0: "batch"}} if export == "legacy_dynamic_batch" else None)
    assert op_types(model)["Reshape"] >= 1 and "Flatten" not in op_types(model)
    out, report = rewrite.apply(model, ["fold_bn", "remove_channels", "cleanup"], return_report=True)
    refused = [r.reason for r in report["remove_channels"].result.refused]
    assert not refused, refused
    # torch path: conv1 8 x 3 x 3 x 3 + 8, conv2 16 x 8 x 3 x 3 + 16, fc 10 x (16 * 16) + 10
    assert weight_count(out) == 8 * 27 + 8 + 16 * 72 + 16 + 10 * 256 + 10, op_types(out)
    onnx.checker.check_model(out, full_check=True)
    for batch in (2, 3) if export != "legacy_static" else (2,):
        inputs = np.random.default_rng(batch).standard_normal((batch, 3, 16, 16)).astype(np.float32)
        check = rewrite.verify(model, out, {model.graph.input[0].name: inputs})
        assert check.ok and check.max_rel <= 1e-5, str(check)


def _pooled_residual(declare_y: bool):
    """x + conv(x), the conv a 4x4 valid one: N x C x 1 x 1, broadcast over H, W. The output is declared with
    the input's symbol names (as dynamic_axes writes it); `declare_y` also declares y so, which is false."""
    from onnx import TensorProto, helper, numpy_helper

    weight = np.random.default_rng(0).standard_normal((4, 4, 4, 4)).astype(np.float32)
    dims = ["N", 4, "H", "W"]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"]), helper.make_node("Add", ["x", "y"], ["out"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, dims)], [numpy_helper.from_array(weight, "w")],
        value_info=[helper.make_tensor_value_info("y", TensorProto.FLOAT, dims)] if declare_y else [])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_symbol_names_reused_for_other_sizes_are_not_read_as_the_inputs_sizes():
    x = np.random.default_rng(1).standard_normal((1, 4, 4, 4)).astype(np.float32)
    out, report = rewrite.apply(_pooled_residual(False), ["remove_residual"], example_inputs=x, return_report=True)
    assert "the add broadcasts" in str(report) and [n.op_type for n in out.graph.node] == ["Conv", "Add"]
    with pytest.raises(rewrite.ModelLoadError, match="declared shapes contradict .* H=4"):
        rewrite.apply(_pooled_residual(True), ["remove_residual"], example_inputs=x)
