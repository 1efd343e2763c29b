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


def test_insert_batch_norms_adds_one_after_every_conv_and_leaves_the_input():
    import torch.fx as fx

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 1))
    traced = fx.symbolic_trace(net)
    slim = slimming.insert_batch_norms(traced)
    bns = [m for m in slim.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert [b.num_features for b in bns] == [4, 2]
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in traced.modules())
    x = torch.randn(3, 3, 6, 6)
    out = slim.train()(x)
    # Every output channel is batch-normalized now: mean 0 over (N, H, W).
    assert torch.allclose(out.mean(dim=(0, 2, 3)), torch.zeros(2), atol=1e-5)
