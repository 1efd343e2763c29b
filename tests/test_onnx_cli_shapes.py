"""The CLI and verification on dynamic ONNX models: --input-shape NAME:dims, symbolic dims drawn so that
shape arithmetic holds, the shapes used in the report, onnxruntime failures named by model and node."""
from __future__ import annotations

import io

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import rewrite
from rewrite.cli import main
from rewrite.errors import ModelLoadError
from rewrite.frontends.onnx_verify import choose_sizes, random_inputs
from rewrite.testing import randomize_bn


@pytest.fixture(scope="module")
def dynamic_hw_head(tmp_path_factory):
    """conv -> BN -> relu -> flatten -> Linear, dynamic N / H / W: only H = W = 16 runs."""
    torch.manual_seed(0)
    net = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                                     nn.Linear(4 * 16 * 16, 5)).eval(), 0)
    buffer = io.BytesIO()
    torch.onnx.export(net, (torch.randn(1, 3, 16, 16),), buffer, dynamo=False, do_constant_folding=False,
                      input_names=["input"], training=torch.onnx.TrainingMode.PRESERVE,
                      dynamic_axes={"input": {0: "n", 2: "h", 3: "w"}})
    path = tmp_path_factory.mktemp("dyn") / "head.onnx"
    path.write_bytes(buffer.getvalue())
    return path


def test_symbolic_dims_are_drawn_where_the_head_accepts_them(dynamic_hw_head):
    model = onnx.load(dynamic_hw_head)
    assert choose_sizes(model) == {"n": 2, "h": 16, "w": 16}
    assert random_inputs(model)["input"].shape == (2, 3, 16, 16)
    out = rewrite.apply(str(dynamic_hw_head), ["fold_bn"], verify=True)
    assert sum(n.op_type == "BatchNormalization" for n in out.graph.node) == 0


def test_cli_verifies_a_dynamic_model_and_prints_the_shapes(dynamic_hw_head, tmp_path, capsys):
    out = tmp_path / "out.onnx"
    assert main(["apply", str(dynamic_hw_head), "--passes", "fold_bn", "-o", str(out), "--verify"]) == 0
    printed = capsys.readouterr().out
    assert "verified on inputs: input 2x3x16x16" in printed
    assert main(["apply", str(dynamic_hw_head), "--passes", "fold_bn", "-o", str(out), "--verify",
                 "--input-shape", "input:3,3,16,16"]) == 0
    printed = capsys.readouterr().out
    assert "verified on inputs: input 3x3x16x16" in printed and "input shapes for the passes: input 3x3x16x16" in printed


@pytest.mark.parametrize("shape, message", [
    ("input:1,3,8,8", r"node /4/Gemm: onnxruntime cannot run the model: .*on inputs input 1x3x8x8"),
    ("inptu:1,3,16,16", r"'inptu' \(did you mean 'input'\?\)"),
    ("input:1,4,16,16", r"declared \['n', 3, 'h', 'w'\].*\[1, 4, 16, 16\]"),
    ("1,3,16,16,2", r"declared"),
])
def test_cli_bad_input_shapes_exit_2_naming_model_and_node(dynamic_hw_head, tmp_path, capsys, shape, message):
    out = tmp_path / "out.onnx"
    assert main(["apply", str(dynamic_hw_head), "--passes", "fold_bn", "-o", str(out), "--verify",
                 "--input-shape", shape]) == 2
    err = capsys.readouterr().err
    assert f"file {dynamic_hw_head}" in err
    import re
    assert re.search(message, err), err
    assert not out.exists()


def test_an_original_that_onnxruntime_cannot_run_is_a_model_load_error(dynamic_hw_head):
    feeds = {"input": np.zeros((1, 3, 8, 8), np.float32)}
    with pytest.raises(ModelLoadError, match="node /4/Gemm"):
        rewrite.apply(str(dynamic_hw_head), ["fold_bn"], example_inputs=feeds, verify=True)
