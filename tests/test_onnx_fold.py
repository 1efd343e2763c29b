"""Constant folding at ONNX import: weights and biases written as computations on constants.

Forms from the field: the dynamo exporter's Expand(CastLike(0, x), Shape(W)) bias (optimize=False),
onnxoptimizer's fuse_bn_into_conv Cast / Sqrt / Div / Mul chains, Shape of a static tensor.
Properties: fold_bn reaches the BN through the folded constants (equivalence in onnxruntime),
idempotence, folds nobody consumed written back as they were (or as initializers with
fold_constants=True), and near misses (a chain that reads a graph input, a random op) left alone.
"""
from __future__ import annotations

import collections
import io

import numpy as np
import onnx
import pytest
import torch
from hypothesis import given, settings, strategies as st
from onnx import TensorProto, helper, numpy_helper

import rewrite
from rewrite.testing import randomize_bn

from test_onnx_hypothesis import Builder


def op_types(model) -> collections.Counter:
    return collections.Counter(n.op_type for n in model.graph.node)


@st.composite
def chain_cases(draw):
    groups = draw(st.integers(1, 2))
    return dict(groups=groups, cin=groups * draw(st.integers(1, 3)), cout=groups * draw(st.integers(1, 3)),
                kernel=draw(st.integers(1, 3)), size=draw(st.integers(3, 6)), seed=draw(st.integers(0, 2**16)),
                weight_form=draw(st.sampled_from(["onnxoptimizer", "cast"])),
                bias_form=draw(st.sampled_from(["dynamo", "onnxoptimizer", "none"])))


def build_chain_model(case, scale_from_input: bool = False):
    """Conv whose weight and bias are computations on initializers, then a BN, then Relu."""
    rng = np.random.default_rng(case["seed"])
    b = Builder(rng)
    b.spatial = 2
    g, cin, cout, k = case["groups"], case["cin"], case["cout"], case["kernel"]
    w = rng.standard_normal((cout, cin // g, k, k)).astype(np.float32)
    var = (rng.random(cout) + 0.5).astype(np.float32)
    if case["weight_form"] == "onnxoptimizer":  # W * (gamma / sqrt(var + eps)) unsqueezed to [C, 1, 1, 1]
        eps = b.tensor(np.array(1e-5, np.float32), "eps")
        std = b.node("Sqrt", [b.node("Add", [b.tensor(var, "var"), eps])])
        gamma = b.tensor(rng.standard_normal(cout).astype(np.float32), "gamma")
        scale = b.node("Div", [gamma, std])
        if scale_from_input:  # a near miss: the factor depends on a graph input
            scale = b.node("Mul", [scale, b.node("ReduceMean", ["x"], keepdims=0)])
        scale4 = b.node("Unsqueeze", [scale, b.tensor(np.array([1, 2, 3], np.int64), "axes")])
        weight = b.node("Mul", [b.tensor(w, "w"), scale4])
    else:  # fp16 weights cast up, as mixed-precision tools write them
        weight = b.node("Cast", [b.tensor(w.astype(np.float16), "w16")], to=TensorProto.FLOAT)
    inputs = ["x", weight]
    if case["bias_form"] == "dynamo":  # torch.onnx dynamo, optimize=False: zeros expanded to the weight's C
        zero = b.node("CastLike", [b.tensor(np.array(0.0, np.float64), "zero"), "x"])
        count = b.node("Shape", [b.tensor(w, "w_shape_of")], start=0, end=1)
        inputs.append(b.node("Expand", [zero, count]))
    elif case["bias_form"] == "onnxoptimizer":  # (b - mean) * scale + beta
        bias = b.node("Sub", [b.tensor(rng.standard_normal(cout).astype(np.float32), "b"),
                              b.tensor(rng.standard_normal(cout).astype(np.float32), "mean")])
        inputs.append(b.node("Add", [b.node("Mul", [bias, b.tensor(rng.random(cout).astype(np.float32), "s")]),
                                     b.tensor(rng.standard_normal(cout).astype(np.float32), "beta")]))
    y = b.node("Conv", inputs, kernel_shape=[k, k], pads=[k // 2] * 4, group=g)
    y = b.node("Relu", [b.bn(y, cout, "bn")])
    return b.model(["batch", cin, case["size"], case["size"]], y)


@settings(max_examples=25, deadline=None)
@given(chain_cases())
def test_fold_bn_reaches_a_conv_whose_weight_and_bias_are_constant_computations(case):
    model = build_chain_model(case)
    before = model.SerializeToString()
    out, report = rewrite.apply(model, ["fold_bn"], return_report=True)
    assert model.SerializeToString() == before
    assert report["fold_bn"].result.counts["fold_bn_into_conv"] == 1, report
    assert op_types(out)["BatchNormalization"] == 0
    onnx.checker.check_model(out, full_check=True)
    check = rewrite.verify(model, out)
    assert check.ok and check.max_rel <= 1e-5, str(check)
    assert any("constant folding at import" in note for note in report.notes)
    again, report2 = rewrite.apply(out, ["fold_bn"], return_report=True)
    assert not report2["fold_bn"].result.modified


@settings(max_examples=10, deadline=None)
@given(chain_cases())
def test_a_weight_that_reads_a_graph_input_is_not_folded(case):
    case = dict(case, weight_form="onnxoptimizer")
    model = build_chain_model(case, scale_from_input=True)
    out, report = rewrite.apply(model, ["fold_bn"], return_report=True)
    result = report["fold_bn"].result
    assert not result.modified
    assert op_types(out)["BatchNormalization"] == 1
    assert [r.reason for r in result.refused if "opaque" in r.reason], result.refused
    assert rewrite.verify(model, out).max_abs == 0


def test_folds_nobody_consumed_are_written_back_as_they_were_or_as_initializers():
    case = dict(groups=1, cin=2, cout=3, kernel=3, size=5, seed=1, weight_form="onnxoptimizer", bias_form="dynamo")
    model = build_chain_model(case)
    out, report = rewrite.apply(model, ["cleanup"], return_report=True)
    kept = op_types(out)
    # CastLike reads x (for its type only), so it has nothing to be written from but its value.
    assert kept == op_types(model) - collections.Counter({"CastLike": 1}), kept
    assert "written back as they were" in report.notes[0]
    folded, report = rewrite.apply(model, ["cleanup"], fold_constants=True, return_report=True)
    assert set(op_types(folded)) == {"Conv", "BatchNormalization", "Relu"}
    assert "as initializers" in report.notes[0]
    for candidate in (out, folded):
        onnx.checker.check_model(candidate, full_check=True)
        assert rewrite.verify(model, candidate).max_abs == 0


def _single_node_model(node, inits, out_shape):
    graph = helper.make_graph([node, helper.make_node("Add", ["x", node.output[0]], ["y"], name="add")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, out_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_random_ops_and_huge_results_are_not_folded():
    from rewrite.frontends.onnx import import_onnx

    random = helper.make_node("RandomNormalLike", ["x"], ["r"], name="random")
    g = import_onnx(_single_node_model(random, [], [2, 3]))
    assert g.meta["onnx_folded"] == 0
    shape = numpy_helper.from_array(np.array([64, 1024, 1024], np.int64), "shape")  # 256 MB of zeros from 24 bytes
    big = helper.make_node("ConstantOfShape", ["shape"], ["r"], name="zeros")
    g = import_onnx(_single_node_model(big, [shape], [64, 1024, 1024]))
    assert g.meta["onnx_folded"] == 0


def _conv_bn_net():
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8),
                               torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, stride=2, groups=2), torch.nn.BatchNorm2d(8))


@pytest.mark.parametrize("optimize", [False])  # optimize=True (BN folded by the exporter): scripts/onnx_matrix.py
def test_dynamo_export_bn_folds_with_and_without_its_optimizer(optimize):
    torch.manual_seed(0)
    net = randomize_bn(_conv_bn_net().eval(), seed=2)
    program = torch.onnx.export(net, (torch.randn(1, 3, 12, 12),), dynamo=True, optimize=optimize, opset_version=18,
                                verbose=False)
    model = program.model_proto
    out, report = rewrite.apply(model, ["fold_bn"], return_report=True)
    # optimize=True already folds the BN itself; without it, every BN reaches its conv through the folds.
    assert report["fold_bn"].result.counts["fold_bn_into_conv"] == op_types(model)["BatchNormalization"]
    assert op_types(model)["BatchNormalization"] == (0 if optimize else 2)
    assert op_types(out)["BatchNormalization"] == 0 and op_types(out)["Conv"] == 2
    check = rewrite.verify(model, out)
    assert check.ok and check.max_rel <= 1e-5, str(check)


def test_onnxoptimizer_fuse_bn_into_conv_chains_fold():
    onnxoptimizer = pytest.importorskip("onnxoptimizer")
    torch.manual_seed(0)
    net = randomize_bn(_conv_bn_net().eval(), seed=3)
    buffer = io.BytesIO()
    torch.onnx.export(net, (torch.randn(1, 3, 12, 12),), buffer, dynamo=False, do_constant_folding=False,
                      training=torch.onnx.TrainingMode.PRESERVE)
    optimized = onnxoptimizer.optimize(onnx.load_from_string(buffer.getvalue()), ["fuse_bn_into_conv"])
    assert op_types(optimized)["Sqrt"] == 2, "onnxoptimizer should leave its BN arithmetic for the runtime"
    out, report = rewrite.apply(optimized, ["fold_bn"], return_report=True, fold_constants=True)
    assert {"Sqrt", "Div", "Mul", "Unsqueeze"}.isdisjoint(op_types(out)), op_types(out)
    assert op_types(out)["Conv"] == 2
    check = rewrite.verify(optimized, out)
    assert check.ok and check.max_rel <= 1e-5, str(check)
