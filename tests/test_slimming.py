"""rewrite.slimming: the L1 penalty, global channel selection, and zeroing (the lossy, training side)."""
import pytest
import torch
import torch.nn as nn

from rewrite import slimming


def net():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 6, 1), nn.BatchNorm2d(6))
    with torch.no_grad():
        m[1].weight.copy_(torch.tensor([0.5, -0.01, 2.0, 0.02]))
        m[4].weight.copy_(torch.tensor([0.03, 1.0, -0.2, 0.001, 0.7, -3.0]))
    return m


def test_l1_penalty_is_the_scaled_sum_of_gamma_magnitudes_and_differentiable():
    m = net()
    penalty = slimming.bn_l1_penalty(m, 0.1)
    assert penalty.item() == pytest.approx(0.1 * (2.53 + 4.931))
    penalty.backward()
    assert torch.equal(m[1].weight.grad, 0.1 * torch.sign(m[1].weight.detach()))


def test_global_selection_by_ratio_and_threshold():
    m = net()
    assert slimming.select_channels(m, ratio=0.3) == {"1": [1, 3], "4": [3]}
    assert slimming.select_channels(m, threshold=0.025) == {"1": [1, 3], "4": [3]}
    assert slimming.select_channels(m, threshold=10.0) == {"1": [0, 1, 3], "4": [0, 1, 2, 3, 4]}  # one kept per layer
    with pytest.raises(ValueError):
        slimming.select_channels(m)


def test_zero_channels_sets_gamma_only_unless_asked():
    m = net()
    beta = m[1].bias.detach().clone()
    assert slimming.zero_channels(m, {"1": [1, 3]}) == 2
    assert m[1].weight[1] == 0 and m[1].weight[3] == 0 and m[1].weight[0] == 0.5
    assert torch.equal(m[1].bias.detach(), beta)
    slimming.zero_channels(m, {"4": [0]}, zero_beta=True)
    assert m[4].bias[0] == 0


def test_count_weights_counts_parameters_and_weight_buffers_not_statistics():
    m = net()
    assert slimming.count_weights(m) == sum(p.numel() for p in m.parameters())
