"""remove_residual on random residual blocks: equivalence (float32 and float64), idempotence, the
number of reserved channels the range analysis allows, and the near misses it must refuse."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import rewrite
from rewrite.testing import check_pass, randomize_bn

ACTIVATIONS = {
    "relu": lambda: nn.ReLU(),
    "relu6": lambda: nn.ReLU6(),
    "hardtanh": lambda: nn.Hardtanh(-0.5, 1.5),
}


@dataclass
class BlockSpec:
    kind: str            # basic | bottleneck | inverted | single
    channels: int        # block input channels
    out_channels: int
    width: int           # interior width
    stride: int
    stride_first: bool   # bottleneck: stride on the first 1x1 (v1) or on the KxK (v1.5)
    kernel: int
    dilation: int
    groups: int          # groups of the KxK conv (inverted: depthwise regardless)
    shortcut: str        # identity | conv
    activation: str
    post_activation: bool
    nonnegative_input: bool
    dims: int = 2


def _conv(dims, *args, **kwargs):
    return {1: nn.Conv1d, 2: nn.Conv2d}[dims](*args, **kwargs)


def _bn(dims, channels):
    return {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}[dims](channels)


class ResidualBlock(nn.Module):
    """One residual block of the drawn kind, preceded by a ReLU when its input should be non-negative."""

    def __init__(self, s: BlockSpec):
        super().__init__()
        d = s.dims
        act = ACTIVATIONS[s.activation]
        pad = s.dilation * (s.kernel - 1) // 2
        self.pre = nn.ReLU() if s.nonnegative_input else nn.Identity()
        if s.kind == "basic":
            layers = [_conv(d, s.channels, s.width, s.kernel, s.stride, pad, s.dilation, bias=False), _bn(d, s.width),
                      act(), _conv(d, s.width, s.out_channels, s.kernel, 1, pad, s.dilation, bias=False),
                      _bn(d, s.out_channels)]
        elif s.kind == "bottleneck":
            first, middle = (s.stride, 1) if s.stride_first else (1, s.stride)
            layers = [_conv(d, s.channels, s.width, 1, first, bias=False), _bn(d, s.width), act(),
                      _conv(d, s.width, s.width, s.kernel, middle, pad, s.dilation, s.groups, bias=False),
                      _bn(d, s.width), act(), _conv(d, s.width, s.out_channels, 1, bias=False), _bn(d, s.out_channels)]
        elif s.kind == "inverted":
            layers = [_conv(d, s.channels, s.width, 1, bias=False), _bn(d, s.width), act(),
                      _conv(d, s.width, s.width, s.kernel, s.stride, pad, s.dilation, s.width, bias=False),
                      _bn(d, s.width), act(), _conv(d, s.width, s.out_channels, 1, bias=False), _bn(d, s.out_channels)]
        else:  # one conv: reserve and merge in the same kernel
            layers = [_conv(d, s.channels, s.out_channels, s.kernel, s.stride, pad, s.dilation, s.groups, bias=True),
                      _bn(d, s.out_channels)]
        self.body = nn.Sequential(*layers)
        self.shortcut = nn.Identity() if s.shortcut == "identity" else nn.Sequential(
            _conv(d, s.channels, s.out_channels, 1, s.stride, bias=False), _bn(d, s.out_channels))
        self.post = act() if s.post_activation else nn.Identity()

    def forward(self, x):
        x = self.pre(x)
        return self.post(self.body(x) + self.shortcut(x))


@st.composite
def block_specs(draw, kinds=("basic", "bottleneck", "inverted", "single")):
    kind = draw(st.sampled_from(kinds))
    # the reserve (first) and merge (last) convs must be ungrouped; groups live in the middle or alone
    groups = draw(st.sampled_from([1, 2])) if kind in ("bottleneck", "single") else 1
    channels = groups * draw(st.integers(1, 3))
    width = groups * draw(st.integers(1, 3))
    stride = draw(st.sampled_from([1, 2]))
    shortcut = draw(st.sampled_from(["identity", "conv"])) if stride == 1 else "conv"
    out_channels = channels if shortcut == "identity" else groups * draw(st.integers(1, 3))
    if kind == "single" and groups > 1:
        # a dense 1x1 shortcut would mix channels across the groups: refused, tested on its own below
        shortcut, stride, out_channels = "identity", 1, channels
    if kind == "single":
        width = out_channels
    return BlockSpec(kind, channels, out_channels, width, stride, draw(st.booleans()),
                     draw(st.sampled_from([1, 3, 5])), draw(st.sampled_from([1, 2])), groups, shortcut,
                     draw(st.sampled_from(list(ACTIVATIONS))), draw(st.booleans()), draw(st.booleans()),
                     draw(st.sampled_from([2, 2, 1])))


def make_block(spec: BlockSpec, seed: int = 0):
    torch.manual_seed(seed)
    model = randomize_bn(ResidualBlock(spec).eval(), seed=seed)
    size = 6 if spec.dims == 2 else 9
    x = torch.randn(2, spec.channels, *([size] * spec.dims)) * 3  # large enough to reach ReLU6's clip
    return model, x


def _adds(model) -> int:
    _, report = rewrite.apply(model, [], return_report=True)
    return report.nodes_before.get("add", 0)


@settings(max_examples=30, deadline=None)
@given(block_specs())
def test_random_blocks_lose_their_add_and_keep_their_outputs(spec):
    model, x = make_block(spec)
    result = check_pass("remove_residual", model, x)  # float32 equivalence, idempotence, input untouched
    assert result.max_rel <= 1e-5
    assert _adds(result.model) == 0
    site = result.report["remove_residual"].result.notes["sites"][0]
    has_relu = spec.kind != "single" and spec.activation == "relu"
    expected = 0 if spec.kind == "single" else spec.channels * (1 if spec.nonnegative_input or not has_relu else 2)
    assert site["reserved_channels"] == expected
    assert site["x_nonnegative"] == spec.nonnegative_input


@settings(max_examples=15, deadline=None)
@given(block_specs())
def test_random_blocks_are_exact_in_float64(spec):
    model, x = make_block(spec, seed=1)
    result = check_pass("remove_residual", model, x, dtype=torch.float64)
    assert result.max_rel <= 1e-10


@settings(max_examples=10, deadline=None)
@given(block_specs(kinds=("basic", "bottleneck", "inverted")))
def test_signed_option_clamp_keeps_c_channels(spec):
    model, x = make_block(spec, seed=2)
    result = check_pass("remove_residual", model, x, options={"signed": "clamp"})
    assert result.report["remove_residual"].result.notes["sites"][0]["reserved_channels"] == spec.channels


def test_relu6_reserved_channels_are_not_clipped_at_6():
    """RMNet turns ReLU6 into ReLU; here values far above 6 must pass the reserved channels."""
    spec = BlockSpec("inverted", 4, 4, 8, 1, False, 3, 1, 1, "identity", "relu6", False, False)
    model, _ = make_block(spec)
    x = torch.randn(1, 4, 6, 6) * 100
    result = check_pass("remove_residual", model, x)
    assert result.max_rel <= 1e-5
    assert result.model(x).abs().max() > 6


def test_stride_two_with_equal_channels_uses_the_strided_shortcut():
    spec = BlockSpec("basic", 4, 4, 4, 2, False, 3, 1, 1, "conv", "relu", True, True)
    model, x = make_block(spec)
    x = torch.randn(1, 4, 7, 7)  # odd size: the last strided pixel sits at the border
    check_pass("remove_residual", model, x)


# -- near misses: refused, with the reason --------------------------------------------------
class GatedBlock(nn.Module):
    """A residual block whose main path has a SiLU, or a squeeze-excitation gate."""

    def __init__(self, gate: str):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.fc = nn.Conv2d(4, 4, 1)
        self.gate = gate

    def forward(self, x):
        x = torch.relu(x)
        h = self.bn1(self.conv1(x))
        if self.gate == "silu":
            h = F.silu(h)
        else:
            h = torch.relu(h)
            h = h * torch.sigmoid(self.fc(F.adaptive_avg_pool2d(h, 1)))
        return torch.relu(x + self.bn2(self.conv2(h)))


class ActivationBeforeBN(nn.Module):
    """relu -> BN -> conv at the start of the main path: the BN can go into no conv."""

    def __init__(self):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)

    def forward(self, x):
        return x + self.conv2(torch.relu(self.conv1(self.bn1(torch.relu(x)))))


class NonlinearShortcut(nn.Module):
    def __init__(self):
        super().__init__()
        self.main = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
        self.short = nn.Sequential(nn.Conv2d(4, 4, 1), nn.ReLU())

    def forward(self, x):
        return self.main(x) + self.short(x)


class BranchedMain(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.conv3 = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        h = torch.relu(self.conv1(x))
        return x + self.conv2(h), self.conv3(h)


class GroupedMerge(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1, groups=2)

    def forward(self, x):
        return x + self.conv2(torch.relu(self.conv1(x)))


class SingleGroupedAcross(nn.Module):
    """One grouped conv plus a dense 1x1 shortcut: the shortcut mixes channels across its groups."""

    def __init__(self):
        super().__init__()
        self.conv, self.short = nn.Conv2d(4, 4, 3, padding=1, groups=2), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.conv(x) + self.short(x)


class MisalignedTap(nn.Module):
    """A dilated conv whose padding puts no tap on the input pixels; the shortcut samples 2i."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 2, stride=2, padding=1, dilation=2)  # reads 2i-1 and 2i+1
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.short = nn.Conv2d(4, 4, 1, stride=2)

    def forward(self, x):
        return self.conv2(torch.relu(self.conv1(x))) + self.short(x)


NEAR_MISSES = {
    "silu": (lambda: GatedBlock("silu"), "silu"),
    "se_gate": (lambda: GatedBlock("se"), "branch of its own"),
    "activation_before_bn": (ActivationBeforeBN, "neither a conv before it nor the block's reserve conv can absorb"),
    "nonlinear_shortcut": (NonlinearShortcut, "not linear in x"),
    "branched_main": (BranchedMain, "branch of its own"),
    "grouped_merge": (GroupedMerge, "last conv"),
    "shortcut_across_groups": (SingleGroupedAcross, "across the groups"),
    "misaligned_tap": (MisalignedTap, "no kernel tap is aligned"),
}


@pytest.mark.parametrize("case", list(NEAR_MISSES))
def test_near_misses_are_refused_with_their_reason(case):
    build, reason = NEAR_MISSES[case]
    torch.manual_seed(0)
    model = randomize_bn(build().eval())
    x = torch.randn(1, 4, 8, 8)
    check_pass("remove_residual", model, x, refuses=reason)


class UnbatchedBlock(nn.Module):
    """Conv1d blocks on (C, L) input: BatchNorm1d would normalize L, not the channels."""

    def __init__(self):
        super().__init__()
        self.c1, self.bn, self.c2 = nn.Conv1d(4, 4, 1), nn.BatchNorm1d(4), nn.Conv1d(4, 4, 1)

    def forward(self, x):
        return x + self.c2(torch.relu(self.bn(self.c1(x))))


def test_unbatched_block_is_refused():
    model = randomize_bn(UnbatchedBlock()).eval()
    check_pass("remove_residual", model, torch.randn(4, 4), refuses="unbatched")


def test_training_mode_bn_is_refused():
    spec = BlockSpec("basic", 4, 4, 4, 1, False, 3, 1, 1, "identity", "relu", True, True)
    model, x = make_block(spec)
    model.body[1].train()
    before = copy.deepcopy(model.state_dict())
    _, report = rewrite.apply(model, ["remove_residual"], example_inputs=x, return_report=True)
    assert not report["remove_residual"].result.modified
    assert any("batch statistics" in r.reason for r in report["remove_residual"].result.refused)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_cost_notes_add_up():
    spec = BlockSpec("basic", 4, 4, 4, 1, False, 3, 1, 1, "identity", "relu", True, True)
    model, x = make_block(spec)
    _, report = rewrite.apply(model, ["remove_residual"], example_inputs=x, return_report=True)
    notes = report["remove_residual"].result.notes
    site = notes["sites"][0]
    # conv1 4->8 channels (4 reserved), conv2 reads 8; weights 3x3, batch 2 at 6x6
    assert [c["channels"] for c in site["convs"]] == [[4, 8], [4, 4]]
    assert site["params_after"] == (8 * 4 * 9 + 8) + (4 * 8 * 9 + 4)
    assert site["params_before"] == 4 * 4 * 9 * 2 + 4 * 2 * 2  # two convs, two BN affines
    assert site["flops_after"] == 2 * 2 * 36 * (8 * 4 * 9 + 4 * 8 * 9)
    assert notes["total"]["params_after"] == site["params_after"]
    assert any(line.startswith("total") for line in notes["summary"])
