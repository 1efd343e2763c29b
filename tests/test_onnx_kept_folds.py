"""A reason for every Add left in an ONNX file: folded constant chains written back as they were.

onnxoptimizer's fuse_bn_into_conv leaves a conv's weight and bias as Add / Sqrt / Div / Mul chains of
initializers. The import folds them into constants, so no pass sees those Adds; when no rewrite consumes
the conv (resnet18's stem after fold_bn / remove_residual), the chain is written back as it was and the
file keeps Adds that are no residual. The report must say what they are and which node they feed.
"""
from __future__ import annotations

import collections
import io

import numpy as np
import onnx
import pytest
import torch

import rewrite
from rewrite.testing import randomize_bn

from test_onnx_hypothesis import Builder

PASSES = ["fold_bn", "fuse_branches", "remove_residual", "cleanup"]


def op_types(model) -> collections.Counter:
    return collections.Counter(n.op_type for n in model.graph.node)


def folding_note(report) -> str:
    (note,) = [n for n in report.notes if n.startswith("constant folding at import")]
    return note


def _stem_chain_then_conv_bn(seed: int) -> onnx.ModelProto:
    """A stem conv whose weight and bias are onnxoptimizer's BN arithmetic (nothing for a pass to do),
    then a conv + BN that fold_bn folds."""
    rng = np.random.default_rng(seed)
    b = Builder(rng)
    b.spatial = 2
    cout = 4
    var = b.tensor((rng.random(cout) + 0.5).astype(np.float32), "var")
    std = b.node("Sqrt", [b.node("Add", [var, b.tensor(np.array(1e-5, np.float32), "eps")])])
    scale = b.node("Div", [b.tensor(rng.standard_normal(cout).astype(np.float32), "gamma"), std])
    weight = b.node("Mul", [b.tensor(rng.standard_normal((cout, 3, 3, 3)).astype(np.float32), "w"),
                            b.node("Unsqueeze", [scale, b.tensor(np.array([1, 2, 3], np.int64), "axes")])])
    shifted = b.node("Mul", [b.node("Sub", [b.tensor(rng.standard_normal(cout).astype(np.float32), "b"),
                                            b.tensor(rng.standard_normal(cout).astype(np.float32), "mean")]), scale])
    bias = b.node("Add", [shifted, b.tensor(rng.standard_normal(cout).astype(np.float32), "beta")])
    y = b.node("Relu", [b.node("Conv", ["x", weight, bias], kernel_shape=[3, 3], pads=[1] * 4)])
    y = b.node("Conv", [y, b.tensor(rng.standard_normal((cout, cout, 1, 1)).astype(np.float32), "w")],
               kernel_shape=[1, 1])
    return b.model(["batch", 3, 6, 6], b.node("Relu", [b.bn(y, cout, "bn")]))


@pytest.mark.parametrize("seed", [0, 1])
def test_the_report_names_each_op_of_a_folded_chain_written_back(seed):
    model = _stem_chain_then_conv_bn(seed)
    out, report = rewrite.apply(model, PASSES, return_report=True)
    assert report["fold_bn"].result.counts["fold_bn_into_conv"] == 1, report
    left = op_types(out)
    assert left["Add"] == 2 and report.nodes_after.get("add", 0) == 0  # the passes saw no add: both are constants
    note = folding_note(report)
    chain = left - collections.Counter({"Conv": 2, "Relu": 2})
    assert sum(chain.values()) == 8, left
    for op, count in chain.items():  # every op left that no pass looked at is counted in the note
        assert f"{count} {op}" in note, (op, note)
    stem = next(n.name for n in out.graph.node if n.op_type == "Conv" and n.input[0] == "x")
    assert stem in note and "fold_constants=True" in note, note
    check = rewrite.verify(model, out)
    assert check.ok and check.max_rel <= 1e-5, str(check)
    folded, report = rewrite.apply(model, PASSES, fold_constants=True, return_report=True)
    assert set(op_types(folded)) == {"Conv", "Relu"}, op_types(folded)  # the Adds were constants, nothing else
    assert "written back as they were" not in folding_note(report)
    check = rewrite.verify(model, folded)
    assert check.ok and check.max_rel <= 1e-5, str(check)


def test_onnxoptimizer_resnet_stem_adds_have_their_reason():
    """The symptom itself, small: a resnet stem + BasicBlock, legacy export, onnxoptimizer, the matrix passes."""
    onnxoptimizer = pytest.importorskip("onnxoptimizer")
    from torchvision.models.resnet import BasicBlock

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8),
                              torch.nn.ReLU(), BasicBlock(8, 8))
    net = randomize_bn(net.eval(), seed=2)
    buffer = io.BytesIO()
    torch.onnx.export(net, (torch.randn(1, 3, 8, 8),), buffer, dynamo=False, do_constant_folding=False,
                      training=torch.onnx.TrainingMode.PRESERVE, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "n"}})  # a numeric output name collides with onnxoptimizer's
    optimized = onnxoptimizer.optimize(onnx.load_from_string(buffer.getvalue()), ["fuse_bn_into_conv"])
    out, report = rewrite.apply(optimized, PASSES, return_report=True)
    assert report["remove_residual"].result.modified, report
    adds = op_types(out)["Add"]
    assert adds > 0 and report.nodes_after.get("add", 0) == 0
    note = folding_note(report)
    assert f"{adds} Add" in note, note
    assert "/0/Conv" in note, note  # the stem conv, which no rewrite consumed
    check = rewrite.verify(optimized, out)
    assert check.ok and check.max_rel <= 1e-5, str(check)
