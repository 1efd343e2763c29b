"""remove_channels on slimmed real models (random weights, randomized BN): reductions and equal outputs."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torchvision

import rewrite
from rewrite.analysis.cost import model_cost
from rewrite.slimming import count_weights
from rewrite.testing import randomize_bn

@pytest.fixture(autouse=True)
def _no_grad():
    """Tests edit parameters in place to kill channels: no autograd (scoped, not global)."""
    with torch.no_grad():
        yield


def slim(model, x):
    out, report = rewrite.apply(model, ["remove_channels"], example_inputs=x, return_report=True)
    check = rewrite.verify(model, out, x)
    assert check.ok, f"outputs changed: {check}"
    return out, report["remove_channels"].result


def half(n: int, g: torch.Generator) -> torch.Tensor:
    return torch.randperm(n, generator=g)[: n // 2]


def test_vgg_like_with_classifier_after_flatten():
    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)]

    m = nn.Sequential(*block(3, 16), *block(16, 32), *block(32, 32), nn.Flatten(),
                      nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Dropout(), nn.Linear(64, 10)).eval()
    randomize_bn(m, 1)
    g = torch.Generator().manual_seed(0)
    for bn in (m[1], m[5], m[9]):
        dead = half(bn.num_features, g)
        bn.weight[dead] = 0
        bn.bias[dead] = -bn.bias[dead].abs()  # relu(beta) = 0: exact even before the padded convs
    last = m[9]
    last.bias[last.weight == 0] = 0.5  # before the classifier: a non-zero constant, folded into the linear
    x = torch.randn(2, 3, 32, 32)
    out, result = slim(m, x)
    assert out.get_submodule("13").weight.shape == (64, 16 * 16)
    assert out.get_submodule("0").weight.shape[0] == 8 and out.get_submodule("4").weight.shape == (16, 8, 3, 3)
    assert result.counts["constants_folded"] == 16
    before, after = model_cost(m, x), model_cost(out, x)
    assert after.flops < 0.4 * before.flops


def resnet50_half_dead(zero_beta: bool):
    m = torchvision.models.resnet50(num_classes=10).eval()
    randomize_bn(m, 0)
    g = torch.Generator().manual_seed(0)
    for block in m.modules():
        if isinstance(block, torchvision.models.resnet.Bottleneck):
            for bn in (block.bn1, block.bn2):
                dead = half(bn.num_features, g)
                bn.weight[dead] = 0
                if zero_beta:
                    bn.bias[dead] = 0
    return m


def test_resnet50_half_inner_channels_dead_matches_the_half_width_network():
    m = resnet50_half_dead(zero_beta=True)
    x = torch.randn(1, 3, 64, 64)
    out, result = slim(m, x)
    reference = torchvision.models.resnet50(num_classes=10, width_per_group=32)  # same net, half inner width
    assert count_weights(out) == count_weights(reference)
    assert model_cost(out, x).flops == model_cost(reference, x).flops
    assert result.counts["channels_removed"] == sum(
        bn.num_features // 2 for b in m.modules() if isinstance(b, torchvision.models.resnet.Bottleneck)
        for bn in (b.bn1, b.bn2))


def test_resnet50_with_nonzero_beta_stays_exact_and_says_why_it_keeps_some():
    m = resnet50_half_dead(zero_beta=False)
    x = torch.randn(1, 3, 64, 64)
    out, result = slim(m, x)
    # bn2's dead channels feed the 1x1 conv3: all go, their relu(beta) folded. bn1's feed the padded 3x3 conv2:
    # only those with beta <= 0 go.
    expected = 0
    for b in m.modules():
        if isinstance(b, torchvision.models.resnet.Bottleneck):
            dead1 = b.bn1.weight == 0
            expected += int((dead1 & (b.bn1.bias <= 0)).sum()) + int((b.bn2.weight == 0).sum())
    assert result.counts["channels_removed"] == expected
    assert any("zero-pads its input" in r.reason for r in result.refused)
    assert count_weights(out) < count_weights(m)


def test_densenet121_zero_filters_leave_every_concat():
    m = torchvision.models.densenet121(num_classes=10).eval()
    randomize_bn(m, 0)
    zeroed_last_block = 0
    for name, layer in m.features.named_children():
        if not name.startswith("denseblock"):
            continue
        for dense in layer.children():
            dense.conv2.weight[[0, 5]] = 0  # these two new features are 0 in every later concat
            dense.norm2.weight[:64] = 0  # the bottleneck: gamma 0, beta <= 0, so relu gives 0 before the 3x3
            dense.norm2.bias[:64] = -dense.norm2.bias[:64].abs()
            zeroed_last_block += 2 if name == "denseblock4" else 0
    x = torch.randn(1, 3, 64, 64)
    out, result = slim(m, x)
    assert out.get_submodule("classifier").weight.shape[1] == 1024 - zeroed_last_block
    assert count_weights(out) < 0.8 * count_weights(m)


def test_mobilenet_v2_depthwise_groups_shrink():
    m = torchvision.models.mobilenet_v2(num_classes=10).eval()
    randomize_bn(m, 0)
    g = torch.Generator().manual_seed(0)
    expansions = []
    for block in m.features:
        if isinstance(block, torchvision.models.mobilenetv2.InvertedResidual) and len(block.conv) == 4:
            bn = block.conv[0][1]  # the expansion BN, read by the depthwise conv after ReLU6
            dead = half(bn.num_features, g)
            bn.weight[dead] = 0
            bn.bias[dead] = -bn.bias[dead].abs()
            expansions.append(bn.num_features)
    x = torch.randn(1, 3, 64, 64)
    out, result = slim(m, x)
    depthwise = [mod for mod in out.modules() if isinstance(mod, nn.Conv2d) and mod.groups > 1]
    assert sorted(d.groups for d in depthwise) == sorted([c - c // 2 for c in expansions] + [32])
    assert model_cost(out, x).flops < model_cost(m, x).flops
