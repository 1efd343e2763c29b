"""remove_channels reach (issue 11): grouped convs that shrink every group alike, channel slices,
index_select with a constant index, channel masks, eval-mode stochastic depth, and a reason (counted
per reason) for every dead channel kept."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torchvision
from hypothesis import given, settings, strategies as st
from torchvision.ops import StochasticDepth

import rewrite
from rewrite.testing import check_pass, randomize_bn


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def run(model, x, dtype=None, **kw):
    checked = check_pass("remove_channels", model, x, dtype=dtype, expect_rewrite=False, **kw)
    return checked.model, checked.report["remove_channels"].result


def kill(bn, channels):
    bn.weight[channels] = 0
    bn.bias[channels] = 0


def reasons(result) -> str:
    return " | ".join(r.reason for r in result.refused)


class Grouped(nn.Module):
    """conv -> BN -> ReLU -> grouped 3x3 -> BN -> ReLU -> 1x1, as in a ResNeXt / RegNet block."""

    def __init__(self, groups, ipg, opg):
        super().__init__()
        self.a = nn.Conv2d(3, groups * ipg, 1)
        self.bn_a = nn.BatchNorm2d(groups * ipg)
        self.grouped = nn.Conv2d(groups * ipg, groups * opg, 3, padding=1, groups=groups)
        self.bn_g = nn.BatchNorm2d(groups * opg)
        self.out = nn.Conv2d(groups * opg, 4, 1)

    def forward(self, x):
        y = torch.relu(self.bn_a(self.a(x)))
        return self.out(torch.relu(self.bn_g(self.grouped(y))))


def per_group(draw, groups, per, k):
    """k distinct channels of each group."""
    return [g * per + c for g in range(groups) for c in draw(st.permutations(range(per)))[:k]]


@settings(max_examples=20, deadline=None)
@given(st.data(), st.integers(2, 4), st.integers(2, 4), st.integers(2, 4), st.booleans())
def test_grouped_conv_every_group_shrinks_alike(data, groups, ipg, opg, float64):
    k_in = data.draw(st.integers(1, ipg - 1))
    k_out = data.draw(st.integers(0, opg - 1))
    m = Grouped(groups, ipg, opg).eval()
    randomize_bn(m, data.draw(st.integers(0, 100)))
    kill(m.bn_a, per_group(data.draw, groups, ipg, k_in))
    kill(m.bn_g, per_group(data.draw, groups, opg, k_out))
    out, result = run(m, torch.randn(2, 3, 9, 9), dtype=torch.float64 if float64 else None)
    g = out.get_submodule("grouped")
    assert g.groups == groups and g.weight.shape == (groups * (opg - k_out), ipg - k_in, 3, 3)
    assert out.get_submodule("a").weight.shape[0] == groups * (ipg - k_in)
    assert not result.refused


def test_grouped_conv_uneven_dead_channels_keep_the_surplus_with_the_reason():
    m = Grouped(3, 4, 2).eval()
    randomize_bn(m, 3)
    kill(m.bn_a, [0, 1, 2, 4, 9, 10])  # group 0 has 3 dead inputs, groups 1 and 2 have 1 and 2
    out, result = run(m, torch.randn(2, 3, 9, 9))
    assert out.get_submodule("grouped").weight.shape == (6, 3, 3, 3)  # each group lost the fewest: 1
    assert out.get_submodule("a").weight.shape[0] == 9
    assert "3 dead channel(s) of relu kept: grouped conv grouped keeps its 3 groups equal: every kept group can lose " \
           "only 1 of its 4 inputs" in reasons(result)
    (reason, n), = result.notes["kept_per_reason"].items()  # counted per reason, site names taken out
    assert n == 3 and "keeps its 3 groups equal: every kept group can lose only 1 of its 4 inputs" in reason


def test_grouped_conv_whole_dead_groups_and_even_shrink_together():
    m = Grouped(3, 2, 2).eval()
    randomize_bn(m, 4)
    kill(m.bn_a, [0, 1, 2, 4])  # group 0 whole, groups 1 and 2 one each
    kill(m.bn_g, [0, 1])
    out, result = run(m, torch.randn(2, 3, 9, 9))
    g = out.get_submodule("grouped")
    assert g.groups == 2 and g.weight.shape == (4, 1, 3, 3)
    assert not result.refused


def test_resnext_loses_evenly_dead_group_channels():
    m = torchvision.models.resnext50_32x4d(num_classes=10).eval()
    randomize_bn(m, 0)
    width = 0
    for block in m.modules():
        if isinstance(block, torchvision.models.resnet.Bottleneck):
            groups = block.conv2.groups
            per = block.bn1.num_features // groups
            dead = [g * per + c for g in range(groups) for c in (0, per - 1)]  # 2 of every group, both BNs
            kill(block.bn1, dead)
            kill(block.bn2, dead)
            width += 2 * len(dead)
    x = torch.randn(1, 3, 32, 32)
    out, result = rewrite.apply(m, ["remove_channels"], example_inputs=x, return_report=True)
    assert rewrite.verify(m, out, x).ok
    result = result["remove_channels"].result
    assert result.counts["channels_removed"] == width
    conv2 = out.get_submodule("layer1.0.conv2")
    assert conv2.groups == 32 and conv2.weight.shape == (32 * 2, 2, 3, 3)


class Selecting(nn.Module):
    """Network slimming's channel selection as index_select, a contiguous channel slice, a 0/1 mask."""

    def __init__(self, channels, index, start, end, mask):
        super().__init__()
        self.c1 = nn.Conv2d(3, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)
        self.register_buffer("index", torch.tensor(index))
        self.register_buffer("mask", torch.tensor(mask, dtype=torch.float32).view(1, -1, 1, 1))
        self.start, self.end = start, end
        self.sel = nn.Conv2d(len(index), 2, 1)
        self.cut = nn.Conv2d(end - start, 2, 1)
        self.masked = nn.Conv2d(channels, 2, 3, padding=1)

    def forward(self, x):
        y = torch.relu(self.bn(self.c1(x)))
        return self.sel(y.index_select(1, self.index)), self.cut(y[:, self.start:self.end]), self.masked(y * self.mask)


@settings(max_examples=20, deadline=None)
@given(st.data(), st.integers(3, 8), st.booleans())
def test_slices_index_select_and_masks(data, channels, float64):
    index = data.draw(st.lists(st.integers(0, channels - 1), min_size=1, max_size=channels))
    start = data.draw(st.integers(0, channels - 1))
    end = data.draw(st.integers(start + 1, channels))
    mask = data.draw(st.lists(st.sampled_from([0.0, 1.0]), min_size=channels, max_size=channels))
    dead = data.draw(st.lists(st.booleans(), min_size=channels, max_size=channels))
    m = Selecting(channels, index, start, end, mask).eval()
    randomize_bn(m, 1)
    kill(m.bn, [c for c in range(channels) if dead[c]])
    out, _ = run(m, torch.randn(2, 3, 6, 6), dtype=torch.float64 if float64 else None)
    # A channel of c1 stays iff something reads it varying: the selection, the slice or the mask (not 0).
    read = set(index) | set(range(start, end)) | {c for c in range(channels) if mask[c]}
    kept = {c for c in read if not dead[c]}
    for space in (range(channels), index, range(start, end)):  # every tensor keeps its first channel if emptied
        if not kept & set(space):
            kept.add(space[0])
    assert out.get_submodule("c1").weight.shape[0] == len(kept)


def test_a_strided_channel_slice_is_kept_with_the_reason():
    class Strided(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.bn, self.c2 = nn.Conv2d(3, 6, 1), nn.BatchNorm2d(6), nn.Conv2d(3, 2, 1)

        def forward(self, x):
            return self.c2(torch.relu(self.bn(self.c1(x)))[:, ::2])

    m = Strided().eval()
    randomize_bn(m)
    kill(m.bn, [0])
    _, result = run(m, torch.randn(2, 3, 5, 5))
    assert "only contiguous channel slices are followed" in reasons(result)
    assert not result.modified


class DepthBlock(nn.Module):
    def __init__(self, training_mode: bool):
        super().__init__()
        self.c1, self.bn1 = nn.Conv2d(4, 6, 1), nn.BatchNorm2d(6)
        self.c2, self.bn2 = nn.Conv2d(6, 4, 1), nn.BatchNorm2d(4)
        self.drop = StochasticDepth(0.0 if training_mode else 0.3, "row")
        self.training_mode = training_mode

    def forward(self, x):
        y = self.bn2(self.c2(torch.nn.functional.silu(self.bn1(self.c1(x)))))
        return x + self.drop(y)

    def train(self, mode=True):
        super().train(mode)
        self.drop.train(self.training_mode)
        return self


def test_dead_channels_pass_eval_mode_stochastic_depth_and_silu():
    m = DepthBlock(training_mode=False).eval()
    randomize_bn(m, 2)
    kill(m.bn1, [1, 3])  # silu(0) = 0 into a 1x1
    out, result = run(m, torch.randn(2, 4, 5, 5))
    assert out.get_submodule("c1").weight.shape[0] == 4
    assert not any("stochastic" in r.reason for r in result.refused)


def test_training_mode_stochastic_depth_pins_with_the_reason():
    m = DepthBlock(training_mode=True).eval()  # p = 0 in training mode: deterministic, but not followed
    randomize_bn(m, 2)
    kill(m.bn2, [0])  # a dead channel of the residual branch, behind training-mode stochastic depth
    _, result = run(m, torch.randn(2, 4, 5, 5))
    assert "1 dead channel(s) of bn2 kept: stochastic depth stochastic_depth is in training mode" in reasons(result)


def test_a_dead_channel_added_to_a_live_shortcut_is_kept_with_where_it_meets_it():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

        def forward(self, x):
            return torch.relu(x + self.bn(self.c(x)))

    m = Residual().eval()
    randomize_bn(m, 5)
    kill(m.bn, [2])
    _, result = run(m, torch.randn(2, 4, 6, 6))
    assert "1 dead channel(s) of bn kept: it meets a channel that varies at add" in reasons(result)
    assert "residual add keeps a channel unless it is dead in every operand" in reasons(result)


def test_efficientnet_b0_loses_its_dead_hidden_channels():
    from torchvision.models.efficientnet import MBConv

    m = torchvision.models.efficientnet_b0(num_classes=10).eval()
    randomize_bn(m, 0)
    g = torch.Generator().manual_seed(0)
    killed = 0
    for block in m.modules():
        if isinstance(block, MBConv):
            bns = [b for b in block.block.modules() if isinstance(b, nn.BatchNorm2d)][:-1]  # expand, depthwise
            dead = torch.randperm(bns[-1].num_features, generator=g)[: bns[-1].num_features // 4]
            for bn in bns:
                kill(bn, dead)
            killed += len(dead)
    x = torch.randn(1, 3, 64, 64)
    out, report = rewrite.apply(m, ["remove_channels"], example_inputs=x, return_report=True)
    assert rewrite.verify(m, out, x).ok
    result = report["remove_channels"].result
    # Each dead hidden channel leaves its depthwise conv, its SE expand conv and the conv before (expand or stem).
    assert result.counts["channels_removed"] == 3 * killed
    assert not result.refused


@pytest.mark.parametrize("groups, ipg", [(2, 3), (3, 2)])
@pytest.mark.parametrize("dtype", [None, torch.float64])
def test_grouped_conv_folds_non_zero_constants_of_removed_inputs_into_its_groups_biases(groups, ipg, dtype):
    m = nn.Sequential(nn.Conv2d(3, groups * ipg, 1), nn.BatchNorm2d(groups * ipg), nn.ReLU(),
                      nn.Conv2d(groups * ipg, groups * 2, 1, groups=groups), nn.BatchNorm2d(groups * 2), nn.ReLU(),
                      nn.Conv2d(groups * 2, 2, 1)).eval()
    randomize_bn(m, 1)
    dead = [g * ipg for g in range(groups)]  # the first input of every group: a positive constant after ReLU
    m[1].weight[dead] = 0
    m[1].bias[dead] = torch.tensor([0.7, 1.3, 0.4][:groups])
    out, result = run(m, torch.randn(2, 3, 5, 5), dtype=dtype)
    assert out.get_submodule("3").weight.shape == (groups * 2, ipg - 1, 1, 1)
    assert result.counts["constants_folded"] == groups
