"""fuse_branches on real train-form models (timm RepVGG, MobileOne), in torch and through ONNX.

The reference for the structure is timm's own reparameterize_model (its switch_to_deploy); it is
called here only to count its convs and compare outputs, never by the pass.
"""
from __future__ import annotations

import collections
import copy
import io

import onnx
import pytest
import torch

import rewrite
from rewrite.testing import assert_same_state, randomize_bn, state_snapshot
from rewrite.verify import verify_torch

timm = pytest.importorskip("timm")
from timm.utils.model import reparameterize_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


EXPECTED_CONVS = {"repvgg_a0": 22, "mobileone_s0": 43, "repvgg_b1": 28}


def _train_form(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return randomize_bn(timm.create_model(name, pretrained=False, num_classes=10).eval(), seed=1)


def _convs(model: torch.nn.Module) -> int:
    return sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())


# repvgg_a0 runs fuse_branches alone (it folds the BN inside branches itself) in float64; the others
# run ["fold_bn", "fuse_branches"] in float32, as the issue states them.
CASES = [("repvgg_a0", ["fuse_branches"], torch.float64), ("repvgg_b1", ["fold_bn", "fuse_branches"], None),
         ("mobileone_s0", ["fold_bn", "fuse_branches"], None)]


@pytest.mark.parametrize("name,passes,dtype", CASES, ids=[c[0] for c in CASES])
def test_train_form_becomes_the_deploy_form(name, passes, dtype):
    model = _train_form(name).to(dtype or torch.float32)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2)).to(dtype or torch.float32)
    before = state_snapshot(model)
    fused, report = rewrite.apply(model, passes, example_inputs=x, return_report=True)
    assert_same_state(before, model)
    after = report.nodes_after
    assert "batch_norm" not in after and "add" not in after, after
    deploy = reparameterize_model(copy.deepcopy(model))
    assert after["conv"] == _convs(deploy) == EXPECTED_CONVS[name]
    assert _convs(fused) == after["conv"]
    assert not report["fuse_branches"].result.refused
    check = verify_torch(model, fused, x)
    assert check.ok and check.max_rel <= (1e-10 if dtype == torch.float64 else 1e-5), check
    # Our deploy form and timm's agree as well (two exact rewrites of one model).
    assert verify_torch(deploy, fused, x).max_rel <= 1e-5


def _export_with_bn(model: torch.nn.Module) -> onnx.ModelProto:
    buffer = io.BytesIO()
    torch.onnx.export(model, (torch.randn(1, 3, 32, 32),), buffer, dynamo=False,
                      training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return onnx.load_from_string(buffer.getvalue())


@pytest.mark.parametrize("name", ["repvgg_a0", "mobileone_s0"])
def test_onnx_export_fuses_and_matches_in_onnxruntime(name):
    model = _export_with_bn(_train_form(name))
    ops = collections.Counter(n.op_type for n in model.graph.node)
    assert ops["BatchNormalization"] > 0 and ops["Add"] > 0
    before = model.SerializeToString()
    out, report = rewrite.apply(model, ["fold_bn", "fuse_branches"], return_report=True)
    assert model.SerializeToString() == before
    ops = collections.Counter(n.op_type for n in out.graph.node)
    assert ops["Conv"] == EXPECTED_CONVS[name] and not ops["BatchNormalization"] and not ops["Add"], ops
    onnx.checker.check_model(out, full_check=True)
    check = rewrite.verify(model, out)
    assert check.ok and check.max_rel <= 1e-5, check
    assert out.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
