"""Real exported models: every built-in pass on torchvision / timm ONNX exports, checked in onnxruntime."""
from __future__ import annotations

import collections
import io

import onnx
import pytest
import torch

import rewrite
from rewrite.testing import randomize_bn


def export_with_bn(model: torch.nn.Module, size: int = 32, dynamic_batch: bool = True) -> onnx.ModelProto:
    """The TorchScript exporter with BN nodes kept (no constant folding), as deploy pipelines see it."""
    buffer = io.BytesIO()
    x = torch.randn(1, 3, size, size)
    torch.onnx.export(model, (x,), buffer, dynamo=False, training=torch.onnx.TrainingMode.PRESERVE,
                      do_constant_folding=False, input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None)
    return onnx.load_from_string(buffer.getvalue())


def op_types(model: onnx.ModelProto) -> collections.Counter:
    return collections.Counter(n.op_type for n in model.graph.node)


def _resnet18():
    import torchvision
    return torchvision.models.resnet18(num_classes=10)


def _mobilenet_v2():
    import torchvision
    return torchvision.models.mobilenet_v2(num_classes=10)


def _repvgg_a0():
    import timm
    return timm.create_model("repvgg_a0", pretrained=False, num_classes=10)


MODELS = {"resnet18": _resnet18, "mobilenet_v2": _mobilenet_v2, "repvgg_a0": _repvgg_a0}


@pytest.fixture(scope="module", params=list(MODELS))
def exported(request):
    torch.manual_seed(0)
    model = randomize_bn(MODELS[request.param]().eval(), seed=1)
    return request.param, export_with_bn(model)


def test_fold_bn_removes_every_batch_norm_and_keeps_outputs(exported):
    name, model = exported
    before = model.SerializeToString()
    assert op_types(model)["BatchNormalization"] > 0, "the export should keep BN nodes"
    out, report = rewrite.apply(model, ["fold_bn"], return_report=True)
    assert model.SerializeToString() == before, "the input model was changed"
    producers = {o: n.op_type for n in out.graph.node for o in n.output}
    left = [n for n in out.graph.node if n.op_type == "BatchNormalization"]
    # A BN left over reads no conv: RepVGG's identity branches (fuse_branches merges those).
    assert all(producers.get(n.input[0]) != "Conv" for n in left), [n.name for n in left]
    if name != "repvgg_a0":
        assert not left
    assert report["fold_bn"].result.counts["fold_bn_into_conv"] == op_types(model)["BatchNormalization"] - len(left)
    assert op_types(out)["Conv"] == op_types(model)["Conv"]
    onnx.checker.check_model(out, full_check=True)
    check = rewrite.verify(model, out)
    assert check.ok and check.max_rel <= 1e-5, f"{name}: {check}"
    assert check.max_rel > 0 or check.max_abs == 0
    # The symbolic batch survives.
    assert out.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert out.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert [o.name for o in out.graph.output] == ["logits"]


def test_every_builtin_pass_keeps_outputs(exported):
    """Each registered pass (and all of them in a row) on the export, equal in onnxruntime."""
    name, model = exported
    names = [p for p in rewrite.available_passes()]
    for passes in [[p] for p in names]:
        out, report = rewrite.apply(model, passes, return_report=True)
        onnx.checker.check_model(out)
        check = rewrite.verify(model, out)
        assert check.ok, f"{name} {passes}: {check}"
    if "fuse_branches" in names:
        out = rewrite.apply(model, ["fuse_branches", "fold_bn"])
        assert op_types(out)["BatchNormalization"] == 0
