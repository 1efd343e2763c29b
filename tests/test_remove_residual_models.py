"""RM on real torchvision models (random weights, randomized BN statistics): after
remove_residual, fold_bn and fuse_branches no add is left and the outputs are unchanged,
through torch.fx and through ONNX."""
from __future__ import annotations

import io

import onnx
import pytest
import torch
import torchvision

import rewrite
from rewrite.testing import randomize_bn
from rewrite.verify import verify_torch

PIPELINE = ["remove_residual", "fold_bn", "fuse_branches"]

# (model, expected reserved channels of the first block: x >= 0 after the stem's ReLU, so C;
#  MobileNetV2's block input is a linear projection but its path has only ReLU6, so C as well)
MODELS = ["resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2", "mobilenet_v2"]


@pytest.mark.parametrize("name", MODELS)
def test_torchvision_model_becomes_plain(name):
    torch.manual_seed(0)
    model = randomize_bn(getattr(torchvision.models, name)(num_classes=10).eval(), seed=3)
    x = torch.randn(1, 3, 32, 32)
    plain, report = rewrite.apply(model, PIPELINE, example_inputs=x, return_report=True)
    assert report.nodes_before["add"] > 0
    assert report.nodes_after.get("add", 0) == 0, report.nodes_after
    assert report.nodes_after.get("batch_norm", 0) == 0, report.nodes_after
    assert set(report.nodes_after) <= {"conv", "relu", "clamp", "max_pool", "adaptive_avg_pool", "flatten",
                                       "dropout", "linear"}, report.nodes_after
    result = report["remove_residual"].result
    assert result.counts["reserve_and_merge"] == report.nodes_before["add"]
    assert not result.refused
    check = verify_torch(model, plain, x)
    assert check.ok and check.max_rel <= 1e-5, check
    sites = result.notes["sites"]
    assert all(s["reserved_channels"] > 0 for s in sites)
    assert result.notes["total"]["params_after"] > result.notes["total"]["params_before"]  # RM adds channels


def test_resnet18_through_onnx():
    torch.manual_seed(0)
    model = randomize_bn(torchvision.models.resnet18(num_classes=10).eval(), seed=4)
    buffer = io.BytesIO()
    torch.onnx.export(model, (torch.randn(1, 3, 32, 32),), buffer, dynamo=False, do_constant_folding=False,
                      training=torch.onnx.TrainingMode.PRESERVE, input_names=["input"], output_names=["logits"])
    exported = onnx.load_from_string(buffer.getvalue())
    before = exported.SerializeToString()
    plain, report = rewrite.apply(exported, PIPELINE, return_report=True)
    assert exported.SerializeToString() == before
    kinds = {n.op_type for n in plain.graph.node}
    assert "Add" not in kinds and "BatchNormalization" not in kinds, kinds
    assert report["remove_residual"].result.counts["reserve_and_merge"] == 8
    onnx.checker.check_model(plain)
    check = rewrite.verify(exported, plain)
    assert check.ok and check.max_rel <= 1e-5, check
