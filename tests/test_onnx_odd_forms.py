"""ONNX forms the exporters write less often: ConvTranspose with auto_pad SAME, onnx.checker's full check
before import, and onnxruntime failures on a dynamic-H/W model named as errors."""
from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
from hypothesis import given, settings, strategies as st
from onnx import TensorProto, helper, numpy_helper

import rewrite
from rewrite.errors import ModelLoadError

from test_onnx_hypothesis import Builder


def op_types(model) -> collections.Counter:
    return collections.Counter(n.op_type for n in model.graph.node)


# -- ConvTranspose with auto_pad SAME_UPPER / SAME_LOWER -------------------------------------------------
@st.composite
def transpose_same_cases(draw):
    stride = draw(st.integers(1, 3))
    dilation = draw(st.integers(1, 2))
    return dict(auto_pad=draw(st.sampled_from(["SAME_UPPER", "SAME_LOWER"])), kernel=draw(st.integers(1, 4)),
                stride=stride, dilation=dilation, output_padding=draw(st.integers(0, stride - 1)),  # onnxruntime: below the stride
                size=draw(st.integers(2, 6)), symbolic=draw(st.booleans()), groups=draw(st.sampled_from([1, 2])),
                seed=draw(st.integers(0, 2**16)))


def build_transpose_same(case):
    rng = np.random.default_rng(case["seed"])
    b = Builder(rng)
    b.spatial = 2
    k, s, d, g = case["kernel"], case["stride"], case["dilation"], case["groups"]
    w = rng.standard_normal((4, 6 // g, k, k)).astype(np.float32)
    y = b.node("ConvTranspose", ["x", b.tensor(w), b.tensor(rng.standard_normal(6).astype(np.float32), "bias")],
               kernel_shape=[k, k], strides=[s, s], dilations=[d, d], group=g, auto_pad=case["auto_pad"],
               output_padding=[case["output_padding"]] * 2)
    y = b.bn(y, 6, "bn")
    size = case["size"]
    return b.model(["batch", 4, "h" if case["symbolic"] else size, "w" if case["symbolic"] else size + 1], y)


def _crop(case) -> int:
    """The crop SAME asks of the full transposed conv: negative when it asks for more output than there is."""
    return case["output_padding"] + (case["kernel"] - 1) * case["dilation"] + 1 - case["stride"]


@settings(max_examples=30, deadline=None)
@given(transpose_same_cases())
def test_conv_transpose_same_folds_its_bn_at_every_size(case):
    """SAME makes the output input * stride long whatever the input size, so the crop is known even on a
    symbolic H / W: the ConvTranspose is read as one and its BN folds. onnxruntime is the judge."""
    model = build_transpose_same(case)
    out, report = rewrite.apply(model, ["fold_bn"], return_report=True)
    result = report["fold_bn"].result
    if _crop(case) < 0:  # onnxruntime and the ONNX reference evaluator disagree on such an output
        assert not result.modified and op_types(out)["BatchNormalization"] == 1
        reasons = [r.reason for r in result.refused]
        assert len(reasons) == 1 and f"auto_pad={case['auto_pad']}" in reasons[0] \
            and "more output than the transposed conv computes" in reasons[0], reasons
        return
    assert result.counts["fold_bn_into_conv"] == 1, [r.reason for r in result.refused]
    assert op_types(out)["BatchNormalization"] == 0 and op_types(out)["ConvTranspose"] == 1
    onnx.checker.check_model(out, full_check=True)
    sizes = [case["size"], case["size"] + 1] if case["symbolic"] else [case["size"]]
    for size in sizes:  # a symbolic H / W: equal at every size, not only one
        w = size + 1 if not case["symbolic"] else size + 2
        x = np.random.default_rng(size).standard_normal((2, 4, size, w)).astype(np.float32)
        check = rewrite.verify(model, out, {"x": x})
        assert check.ok and check.max_rel <= 1e-5, str(check)


def test_conv_transpose_same_is_idempotent():
    case = dict(auto_pad="SAME_LOWER", kernel=3, stride=2, dilation=1, output_padding=0, size=5, symbolic=True,
                groups=1, seed=3)
    once = rewrite.apply(build_transpose_same(case), ["fold_bn"])
    twice, report = rewrite.apply(once, ["fold_bn"], return_report=True)
    assert not report["fold_bn"].result.modified
    assert [n.op_type for n in twice.graph.node] == [n.op_type for n in once.graph.node] == ["ConvTranspose"]


def test_conv_transpose_output_shape_gets_a_reason():
    """A near miss: output_shape derives the crop from the input's size, so the node is kept, and its BN
    says why."""
    case = dict(auto_pad="SAME_UPPER", kernel=3, stride=2, dilation=1, output_padding=0, size=5, symbolic=False,
                groups=1, seed=4)
    model = build_transpose_same(case)
    conv = model.graph.node[0]
    del conv.attribute[[a.name for a in conv.attribute].index("auto_pad")]
    conv.attribute.append(helper.make_attribute("output_shape", [10, 12]))
    out, report = rewrite.apply(model, ["fold_bn"], return_report=True)
    reasons = [r.reason for r in report["fold_bn"].result.refused]
    assert op_types(out)["BatchNormalization"] == 1
    assert len(reasons) == 1 and "output_shape derives its padding" in reasons[0], reasons


# -- onnx.checker's full check ---------------------------------------------------------------------------
def _typed_wrong_model() -> onnx.ModelProto:
    """Add of a float tensor and an int64 one: onnx.checker without full_check passes it, onnxruntime does not."""
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Add", ["r", "k"], ["y"], name="mixed_add")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
                              [numpy_helper.from_array(np.arange(3, dtype=np.int64), "k")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_full_check_failure_names_the_file_and_node(tmp_path):
    model = _typed_wrong_model()
    onnx.checker.check_model(model)  # the plain checker lets it through
    with pytest.raises(onnx.shape_inference.InferenceError, match="inconsistent type"):
        onnx.checker.check_model(model, full_check=True)
    path = tmp_path / "mixed.onnx"
    onnx.save(model, path)
    with pytest.raises(ModelLoadError, match=r"mixed\.onnx, node mixed_add: the model fails onnx.checker's full check \(ShapeInferenceError\): "
                       r"Add B has inconsistent type tensor\(int64\)"):
        rewrite.apply(str(path), ["fold_bn"])
    before = path.read_bytes()
    with pytest.raises(ModelLoadError, match=r"node mixed_add"):
        rewrite.apply(model, ["fold_bn"])
    assert path.read_bytes() == before  # nothing written over the input


def test_full_check_runs_without_the_weights(tmp_path):
    """A model with external data passes the full check (run on a copy holding no weights, so the weights
    are not loaded twice for it) and is rewritten and verified from its own folder."""
    from onnx_builders import conv_bn_model

    model = conv_bn_model(cin=32, cout=32)
    path = tmp_path / "ext.onnx"
    onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location="ext.data",
              size_threshold=1024)
    out = rewrite.apply(str(path), ["fold_bn"])
    assert op_types(out)["BatchNormalization"] == 0
    check = rewrite.verify(str(path), out)
    assert check.ok and check.max_rel <= 1e-5, str(check)


# -- onnxruntime failures on a matrix model: errors naming the model and the node ------------------------
def test_onnxruntime_failure_on_dynamic_hw_efficientnet_names_the_node():
    """efficientnet_b0 with dynamic H / W, verified on an input of height 0 (the declared shape allows it):
    the original fails in onnxruntime at its stem conv, which is bad input (a ModelLoadError naming the
    model and the node), not a raw onnxruntime error."""
    import io

    import torch
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.efficientnet_b0(num_classes=10).eval()
    buffer = io.BytesIO()
    torch.onnx.export(net, (torch.randn(1, 3, 32, 32),), buffer, dynamo=False, opset_version=17, input_names=["x"],
                      dynamic_axes={"x": {0: "n", 2: "h", 3: "w"}})
    model = onnx.load_from_string(buffer.getvalue())
    out = rewrite.apply(model, ["fold_bn"], example_inputs=np.zeros((1, 3, 32, 32), np.float32))
    with pytest.raises(ModelLoadError, match=r"ModelProto 'main_graph', node /features/features.0/features.0.0/Conv: "
                                             r"onnxruntime cannot run the model"):
        rewrite.verify(model, out, {"x": np.zeros((1, 3, 0, 32), np.float32)})


def test_conv_transpose_output_padding_of_the_wrong_length_names_the_node():
    case = dict(auto_pad="SAME_UPPER", kernel=3, stride=2, dilation=1, output_padding=1, size=5, symbolic=False,
                groups=1, seed=5)
    model = build_transpose_same(case)
    conv = model.graph.node[0]
    del conv.attribute[[a.name for a in conv.attribute].index("output_padding")]
    conv.attribute.append(helper.make_attribute("output_padding", [1]))
    with pytest.raises(ModelLoadError, match=rf"node {conv.name}.*output_padding has 1 values for a 2-D window"):
        rewrite.apply(model, ["fold_bn"])


def test_a_rewritten_onnx_model_that_onnxruntime_cannot_load_is_an_equivalence_error_naming_the_node():
    from onnx_builders import conv_bn_model
    from rewrite.pattern import P
    from rewrite.rule import rule

    @rule(P.op("relu", P.any("x"), name="relu"))
    def bad_reshape(ctx, x, relu):
        return ctx.op("reshape", x, shape=(7, -1, 5))

    with pytest.raises(rewrite.EquivalenceError, match=r"pass bad_reshape: .*does not run: .*ModelProto 'g', "
                                                       r"node relu_\d+: onnxruntime cannot load the model"):
        rewrite.apply(conv_bn_model(), [bad_reshape], verify=True)
