"""remove_residual reach (issue 11): pre-activation blocks, a ReLU on the shortcut, and channel slices
(RMNet's RMBlock), each exact in float32 and float64, reduced as far as RMNet's own conversion, idempotent,
with a near miss refused with its reason."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings, strategies as st

import rewrite
from rewrite.testing import check_pass, randomize_bn


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def convs(model) -> list[nn.Conv2d]:
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


def kinds(model) -> set:
    graph = model.graph
    return {str(getattr(n.target, "__name__", n.target)) for n in graph.nodes if n.op == "call_function"}


# -- pre-activation blocks (BN -> ReLU -> conv) ----------------------------------------------------
class PreActBlock(nn.Module):
    def __init__(self, c, k):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(c), nn.Conv2d(c, c, k, padding=k // 2, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(c), nn.Conv2d(c, c, k, padding=k // 2, bias=False)

    def forward(self, x):
        return x + self.conv2(torch.relu(self.bn2(self.conv1(torch.relu(self.bn1(x))))))


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 5), st.sampled_from([1, 3]), st.sampled_from(["split", "clamp"]), st.booleans(),
       st.integers(0, 100))
def test_pre_activation_block_is_converted_exactly(c, k, signed, float64, seed):
    m = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), PreActBlock(c, k), PreActBlock(c, k)).eval()
    randomize_bn(m, seed)
    x = torch.randn(2, 3, 7, 7, generator=torch.Generator().manual_seed(seed))
    checked = check_pass("remove_residual", m, x, dtype=torch.float64 if float64 else None,
                         options={"signed": signed})
    out = checked.model
    assert checked.report["remove_residual"].result.counts["reserve_and_merge"] == 2
    assert "add" not in kinds(out)
    assert not any(isinstance(mod, nn.BatchNorm2d) for mod in out.modules())  # bn1 went into the reserve conv
    reserve = out.get_submodule("1.bn1_reserve")
    # RMNet's own deploy: a 1x1 conv C -> 2C (x and bn1(x)); a signed x split as relu(x), relu(-x) takes 3C.
    assert reserve.weight.shape == ((2 if signed == "clamp" else 3) * c, c, 1, 1)
    assert out.get_submodule("1.conv2").weight.shape[0] == c


def test_pre_activation_block_with_nonnegative_input_needs_c_reserved_channels():
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), PreActBlock(4, 3)).eval()
    randomize_bn(m, 1)
    out = check_pass("remove_residual", m, torch.randn(2, 3, 6, 6)).model
    assert out.get_submodule("2.bn1_reserve").weight.shape == (8, 4, 1, 1)


def test_pre_activation_block_in_training_mode_is_refused():
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), PreActBlock(4, 3)).eval()
    randomize_bn(m, 1)
    m[1].bn1.train()
    m[1].bn1.momentum = 0.0  # batch statistics in forward, but running statistics kept for the check
    x = torch.randn(8, 3, 6, 6)
    out, report = rewrite.apply(m, ["remove_residual"], example_inputs=x, return_report=True)
    reasons = " | ".join(r.reason for r in report["remove_residual"].result.refused)
    assert "training" in reasons and not report["remove_residual"].result.modified


# -- a ReLU on the shortcut (RMNet's pruning blocks) --------------------------------------------------
class PruningBlock(nn.Module):
    """relu(bn2(conv2(relu(mask1(bn1(conv1(x)))))) + downsample(relu(depthwise 1x1(x))))"""

    def __init__(self, c, mid, scales, downsample):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, mid, 3, padding=1, bias=False), nn.BatchNorm2d(mid)
        self.mask1 = nn.Conv2d(mid, mid, 1, groups=mid, bias=False)
        self.conv2, self.bn2 = nn.Conv2d(mid, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.mask_res = nn.Sequential(nn.Conv2d(c, c, 1, groups=c, bias=False), nn.ReLU())
        self.mask_res[0].weight.copy_(torch.tensor(scales).view(c, 1, 1, 1))
        self.downsample = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c)) if downsample \
            else nn.Identity()

    def forward(self, x):
        out = torch.relu(self.mask1(self.bn1(self.conv1(x))))
        return torch.relu(self.bn2(self.conv2(out)) + self.downsample(self.mask_res(x)))


@settings(max_examples=15, deadline=None)
@given(st.data(), st.integers(1, 5), st.booleans(), st.booleans())
def test_relu_on_the_shortcut_of_a_nonnegative_input_is_converted(data, c, downsample, float64):
    scales = data.draw(st.lists(st.sampled_from([-1.5, -0.25, 0.0, 0.5, 2.0]), min_size=c, max_size=c))
    mid = data.draw(st.integers(c, 2 * c))
    m = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.ReLU(), PruningBlock(c, mid, scales, downsample)).eval()
    randomize_bn(m, data.draw(st.integers(0, 100)))
    checked = check_pass("remove_residual", m, torch.randn(2, 3, 6, 6), dtype=torch.float64 if float64 else None)
    out = checked.model
    assert "add" not in kinds(out)
    # As RMNet's deploy: conv1 carries x in c extra channels, the last conv merges it; no shortcut conv is left.
    assert out.get_submodule("2.conv1").weight.shape[0] == mid + c
    assert len(convs(out)) == 4


def test_relu_on_the_shortcut_of_a_signed_input_is_refused_with_the_reason():
    m = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), PruningBlock(3, 4, [1.0, -1.0, 0.5], False)).eval()
    randomize_bn(m, 2)
    check_pass("remove_residual", m, torch.randn(2, 3, 6, 6), refuses="and this one is not proved >= 0")


# -- channel slices (RMNet's RMBlock) --------------------------------------------------------------
class RMBlock(nn.Module):
    """relu(cat([x[:, :r], bn33(conv33(x)) + bn11(conv11(x)) + bn00(x[:, r:])]))"""

    def __init__(self, c, r, groups=1):
        super().__init__()
        self.r = r
        self.conv33 = nn.Conv2d(c, c - r, 3, padding=1, bias=False, groups=groups)
        self.bn33 = nn.BatchNorm2d(c - r)
        self.conv11, self.bn11 = nn.Conv2d(c, c - r, 1, bias=False), nn.BatchNorm2d(c - r)
        self.bn00 = nn.BatchNorm2d(c - r)

    def forward(self, x):
        out = self.bn33(self.conv33(x)) + self.bn11(self.conv11(x))
        out = out + self.bn00(x[:, self.r:])
        return torch.relu(torch.cat([x[:, :self.r], out], dim=1))


@settings(max_examples=15, deadline=None)
@given(st.data(), st.integers(2, 8), st.booleans())
def test_rmblock_becomes_one_conv_per_block(data, c, float64):
    r = data.draw(st.integers(1, c - 1))
    m = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.ReLU(), RMBlock(c, r), RMBlock(c, r)).eval()
    randomize_bn(m, data.draw(st.integers(0, 100)))
    x = torch.randn(2, 3, 6, 6)
    if float64:
        m, x = m.double(), x.double()
    passes = ["fuse_branches", "remove_residual"]
    out, report = rewrite.apply(m, passes, example_inputs=x, return_report=True)
    check = rewrite.verify(m, out, x)
    assert check.ok and check.max_rel <= (1e-10 if float64 else 1e-5), check
    # RMNet's rep2vgg: each block is one 3x3 conv (c -> c) and its ReLU
    assert [tuple(conv.weight.shape) for conv in convs(out)] == [(c, 3, 3, 3), (c, c, 3, 3), (c, c, 3, 3)]
    assert not {"add", "cat", "getitem"} & kinds(out)
    assert report["remove_residual"].result.counts["merge_sliced_concat"] == 2
    _, again = rewrite.apply(out, passes, example_inputs=x, return_report=True)
    assert not again["fuse_branches"].result.modified and not again["remove_residual"].result.modified


class SliceConcat(nn.Module):
    def __init__(self, c, r, groups):
        super().__init__()
        self.r, self.conv = r, nn.Conv2d(c, c - r, 3, padding=1, groups=groups)

    def forward(self, x):
        return torch.cat([x[:, :self.r], self.conv(x)], dim=1)


def test_a_slice_concat_with_a_grouped_conv_is_refused_with_the_reason():
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), SliceConcat(4, 2, groups=2)).eval()
    check_pass("remove_residual", m, torch.randn(2, 3, 6, 6),
               refuses="is grouped; a channel slice of its input crosses its groups")
