"""fold_bn on real architectures with random weights and randomized BN statistics."""
import pytest
import timm
import torch
import torch.nn as nn
import torchvision

import rewrite
from rewrite.testing import assert_same_state, randomize_bn, state_snapshot


def batch_norms(model):
    return sum(1 for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)) + \
        model.code.count("batch_norm(")


@pytest.mark.parametrize("name", ["resnet50", "mobilenet_v3_small", "efficientnet_b0"])
def test_torchvision_models_have_no_bn_left(name):
    torch.manual_seed(0)
    model = randomize_bn(getattr(torchvision.models, name)(), seed=1).eval()
    x = torch.randn(1, 3, 64, 64)
    before = state_snapshot(model)
    out, report = rewrite.apply(model, ["fold_bn", "cleanup"], example_inputs=x, verify=True, return_report=True)
    assert_same_state(before, model)
    assert batch_norms(out) == 0
    assert report["fold_bn"].verification.max_rel <= 1e-5
    assert not report["fold_bn"].result.refused


def test_timm_norm_act_layers_are_recognised():
    # timm's BatchNormAct2d calls F.batch_norm inside its forward.
    torch.manual_seed(0)
    model = randomize_bn(timm.create_model("resnet18d", pretrained=False), seed=2).eval()
    x = torch.randn(1, 3, 64, 64)
    out, report = rewrite.apply(model, ["fold_bn"], example_inputs=x, verify=True, return_report=True)
    assert batch_norms(out) == 0
    assert report["fold_bn"].verification.max_rel <= 1e-5


def test_timm_batchnormact_functional_form():
    from timm.layers import BatchNormAct2d
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), BatchNormAct2d(8, eps=1e-3))
    randomize_bn(model).eval().double()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    out, report = rewrite.apply(model, ["fold_bn"], example_inputs=x, verify=True, return_report=True)
    assert "batch_norm" not in out.code
    assert report["fold_bn"].verification.tolerance == 1e-10
    assert rewrite.verify(model, out, x).max_rel <= 1e-10
