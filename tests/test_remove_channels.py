"""remove_channels on small hand-built graphs: each coupling and each refusal, with real numbers."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import rewrite
from rewrite.slimming import count_weights
from rewrite.testing import check_pass, randomize_bn

@pytest.fixture(autouse=True)
def _no_grad():
    """Tests edit parameters in place to kill channels: no autograd (scoped, not global)."""
    with torch.no_grad():
        yield


def run(model, x, **options):
    """remove_channels with equivalence, idempotence and an untouched input checked; returns (model, result)."""
    checked = check_pass("remove_channels", model, x, options=options, expect_rewrite=False)
    return checked.model, checked.report["remove_channels"].result


def kill(bn: nn.BatchNorm2d, channels, beta=None):
    bn.weight[channels] = 0
    if beta is not None:
        bn.bias[channels] = torch.as_tensor(beta, dtype=bn.bias.dtype)


def reasons(result) -> str:
    return " | ".join(r.reason for r in result.refused)


def cbr(cin, cout, k=3, pad=1, **kw):
    return [nn.Conv2d(cin, cout, k, padding=pad, **kw), nn.BatchNorm2d(cout), nn.ReLU()]


def x_img(c=3, size=12, batch=2, seed=0):
    return torch.randn(batch, c, size, size, generator=torch.Generator().manual_seed(seed))


# -- plain chains -----------------------------------------------------------------------------------
def test_zero_beta_channels_are_removed_from_producer_bn_and_consumer():
    m = nn.Sequential(*cbr(3, 8), *cbr(8, 6), nn.Conv2d(6, 4, 3, padding=1)).eval()
    randomize_bn(m)
    kill(m[1], [1, 4, 6], beta=0.0)
    out, result = run(m, x_img())
    assert out.get_submodule("0").weight.shape == (5, 3, 3, 3)
    assert out.get_submodule("3").weight.shape == (6, 5, 3, 3)
    assert result.counts["channels_removed"] == 3
    assert count_weights(out) == count_weights(m) - 3 * (3 * 9 + 1) - 3 * 2 - 3 * 6 * 9


def test_nonzero_constant_into_padded_conv_is_kept_with_reason_and_folded_into_1x1():
    m = nn.Sequential(*cbr(3, 8), *cbr(8, 6, k=1, pad=0), *cbr(6, 5), nn.Conv2d(5, 4, 1)).eval()
    randomize_bn(m)
    kill(m[1], [0, 2], beta=[0.5, -0.5])  # feeds a 1x1: both folded (relu(0.5) = 0.5, relu(-0.5) = 0)
    kill(m[4], [1, 3], beta=[0.7, -0.2])  # feeds a zero-padded 3x3: only the one that is 0 after ReLU goes
    out, result = run(m, x_img())
    assert out.get_submodule("0").weight.shape[0] == 6
    assert out.get_submodule("3").weight.shape[0] == 5
    assert result.counts["constants_folded"] == 1
    assert "zero-pads its input" in reasons(result) and "1 dead channel(s)" in reasons(result)


def test_reflect_padding_folds_a_constant_exactly():
    m = nn.Sequential(*cbr(3, 6), nn.Conv2d(6, 4, 3, padding=1, padding_mode="reflect")).eval()
    randomize_bn(m)
    kill(m[1], [2, 3], beta=[1.5, 0.3])
    out, result = run(m, x_img())
    assert out.get_submodule("0").weight.shape[0] == 4
    assert result.counts["constants_folded"] == 2


def test_zero_filters_output_their_bias_and_go():
    m = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 1)).eval()
    m[0].weight[[1, 5]] = 0
    m[0].bias[1], m[0].bias[5] = 0.25, -1.0
    out, result = run(m, x_img())
    assert out.get_submodule("0").weight.shape[0] == 4
    assert result.counts["constants_folded"] == 1  # relu(-1) is 0: nothing to fold for that one


def test_every_channel_dead_keeps_one():
    m = nn.Sequential(*cbr(3, 4), nn.Conv2d(4, 2, 1)).eval()
    randomize_bn(m)
    kill(m[1], [0, 1, 2, 3], beta=0.0)
    out, result = run(m, x_img())
    assert out.get_submodule("0").weight.shape[0] == 1
    assert "keeps at least one channel" in reasons(result)


def test_float64_is_exact_to_1e_10():
    m = nn.Sequential(*cbr(3, 8, k=1, pad=0), *cbr(8, 5, k=1, pad=0), nn.Conv2d(5, 3, 1)).eval()
    randomize_bn(m)
    kill(m[1], [0, 3, 7], beta=[0.4, 2.0, -1.0])
    checked = check_pass("remove_channels", m, x_img(), dtype=torch.float64)
    assert checked.max_rel <= 1e-10
    assert checked.model.get_submodule("0").weight.shape[0] == 5


# -- residual, concat, split --------------------------------------------------------------------------
class Residual(nn.Module):
    def __init__(self, c=6):
        super().__init__()
        self.stem = nn.Sequential(*cbr(3, c, k=1, pad=0))
        self.conv = nn.Conv2d(c, c, 1)
        self.bn = nn.BatchNorm2d(c)
        self.head = nn.Conv2d(c, 2, 1)

    def forward(self, x):
        x = self.stem(x)
        return self.head(torch.relu(self.bn(self.conv(x)) + x))


def test_residual_channel_goes_only_when_dead_in_every_operand():
    m = Residual().eval()
    randomize_bn(m)
    kill(m.stem[1], [0, 2, 4], beta=[0.3, 0.0, -1.0])
    kill(m.bn, [0, 1, 2], beta=[0.2, 0.5, -0.1])  # 0 and 2 dead in both operands, 1 only in one
    out, result = run(m, x_img())
    assert out.get_submodule("head").weight.shape[1] == 4
    assert out.get_submodule("stem.0").weight.shape[0] == 4
    assert result.notes["groups"] and any("add" in " ".join(g["tensors"]) for g in result.notes["groups"])


class Concat(nn.Module):
    def __init__(self, twice=False):
        super().__init__()
        self.a = nn.Sequential(*cbr(3, 5, k=1, pad=0))
        self.b = nn.Sequential(*cbr(3, 4, k=1, pad=0))
        self.twice = twice
        self.out = nn.Conv2d(10 if twice else 9, 3, 1)

    def forward(self, x):
        a = self.a(x)
        return self.out(torch.cat([a, a] if self.twice else [a, self.b(x)], 1))


@pytest.mark.parametrize("twice", [False, True])
def test_concat_maps_offsets(twice):
    m = Concat(twice).eval()
    randomize_bn(m)
    kill(m.a[1], [1, 3], beta=[0.5, -2.0])
    kill(m.b[1], [0], beta=[1.0])
    out, result = run(m, x_img())
    assert out.get_submodule("a.0").weight.shape[0] == 3
    assert out.get_submodule("out").weight.shape[1] == (6 if twice else 6)
    if not twice:
        assert out.get_submodule("b.0").weight.shape[0] == 3


class Chunked(nn.Module):
    def __init__(self, use_split):
        super().__init__()
        self.stem = nn.Sequential(*cbr(3, 8, k=1, pad=0))
        self.left, self.right = nn.Conv2d(4, 3, 3, padding=1), nn.Conv2d(4, 3, 1)
        self.use_split = use_split

    def forward(self, x):
        x = self.stem(x)
        a, b = torch.split(x, 4, dim=1) if self.use_split else x.chunk(2, 1)
        return self.left(a) + self.right(b)


@pytest.mark.parametrize("use_split", [True, False])
def test_split_and_chunk_offsets(use_split):
    m = Chunked(use_split).eval()
    randomize_bn(m)
    kill(m.stem[1], [1, 2, 5, 7], beta=[0.0, 0.9, 0.4, -0.3])  # 2 feeds the padded `left`: kept
    out, result = run(m, x_img())
    assert out.get_submodule("left").weight.shape[1] == 3
    assert out.get_submodule("right").weight.shape[1] == 2
    assert out.get_submodule("stem.0").weight.shape[0] == 5


# -- grouped and depthwise convs ----------------------------------------------------------------------
@pytest.mark.parametrize("multiplier", [1, 2])
def test_depthwise_removes_its_group(multiplier):
    m = nn.Sequential(*cbr(3, 6, k=1, pad=0), nn.Conv2d(6, 6 * multiplier, 3, padding=1, groups=6),
                      nn.BatchNorm2d(6 * multiplier), nn.ReLU(), nn.Conv2d(6 * multiplier, 4, 1)).eval()
    randomize_bn(m)
    kill(m[1], [1, 4], beta=[-1.0, 2.0])  # 1 is 0 after ReLU: the depthwise group then outputs a constant
    out, result = run(m, x_img())
    dw = out.get_submodule("3")
    assert dw.groups == 5 and dw.weight.shape[0] == 5 * multiplier
    assert out.get_submodule("0").weight.shape[0] == 5
    assert "non-constant at the border" in reasons(result)  # channel 4: relu(2) through a zero-padded depthwise


def test_grouped_conv_loses_only_whole_groups():
    m = nn.Sequential(*cbr(3, 8, k=1, pad=0), nn.Conv2d(8, 8, 1, groups=4), nn.BatchNorm2d(8), nn.ReLU(),
                      nn.Conv2d(8, 3, 1)).eval()
    randomize_bn(m)
    kill(m[1], [2, 3, 4], beta=0.0)  # group 1 (channels 2, 3) entirely, group 2 only half
    kill(m[4], [2, 3], beta=0.0)
    out, result = run(m, x_img())
    g = out.get_submodule("3")
    assert g.groups == 3 and g.weight.shape == (6, 2, 1, 1)
    assert out.get_submodule("0").weight.shape[0] == 6


# -- flatten, view, linear ---------------------------------------------------------------------------
class Classifier(nn.Module):
    def __init__(self, view):
        super().__init__()
        self.features = nn.Sequential(*cbr(3, 6), nn.MaxPool2d(2))
        self.fc = nn.Linear(6 * 4 * 4, 5)
        self.bn = nn.BatchNorm1d(5)
        self.fc2 = nn.Linear(5, 2)
        self.view = view

    def forward(self, x):
        x = self.features(x)
        x = x.view(x.size(0), -1) if self.view else torch.flatten(x, 1)
        return self.fc2(torch.relu(self.bn(self.fc(x))))


@pytest.mark.parametrize("view", [False, True])
def test_flatten_then_linear_removes_the_spatial_multiple(view):
    m = Classifier(view).eval()
    randomize_bn(m)
    kill(m.features[1], [0, 3], beta=[1.25, 0.5])
    kill(m.bn, [1, 4], beta=[0.3, -0.3])
    out, result = run(m, x_img(size=8))
    assert out.get_submodule("fc").weight.shape == (3, 4 * 16)
    assert out.get_submodule("fc2").weight.shape == (2, 3)
    assert result.counts["constants_folded"] == 3


def test_linear_on_a_rank3_tensor_pins_with_reason():
    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    m = Tokens().eval()
    m.a.weight[2] = 0
    checked = check_pass("remove_channels", m, torch.randn(2, 5, 4), expect_rewrite=False)
    assert not checked.report["remove_channels"].result.modified


# -- pools ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("count_include_pad", [True, False])
def test_avg_pool_with_zero_padding_breaks_a_constant(count_include_pad):
    m = nn.Sequential(*cbr(3, 5, k=1, pad=0), nn.AvgPool2d(3, 1, 1, count_include_pad=count_include_pad),
                      nn.Conv2d(5, 2, 1)).eval()
    randomize_bn(m)
    kill(m[1], [1, 2], beta=[0.8, -0.8])
    out, result = run(m, x_img())
    assert out.get_submodule("0").weight.shape[0] == (4 if count_include_pad else 3)
    if count_include_pad:
        assert "counts its zero padding" in reasons(result)


def test_max_pool_with_padding_keeps_a_constant():
    m = nn.Sequential(*cbr(3, 5, k=1, pad=0), nn.MaxPool2d(3, 2, 1), nn.Conv2d(5, 2, 1)).eval()
    randomize_bn(m)
    kill(m[1], [1, 2], beta=[0.8, 1.8])
    out, _ = run(m, x_img())
    assert out.get_submodule("0").weight.shape[0] == 3


# -- sharing, raw parameters, things it must not touch -----------------------------------------------------
class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(*cbr(3, 6, k=1, pad=0))
        self.conv = nn.Conv2d(6, 6, 1)  # called twice
        self.bn = nn.BatchNorm2d(6)
        self.scale = nn.Parameter(torch.rand(1, 6, 1, 1) + 0.5)  # a raw parameter used in forward
        self.w = nn.Parameter(torch.randn(3, 6, 1, 1))

    def forward(self, x):
        x = self.stem(x)
        y = torch.relu(self.bn(self.conv(x)))
        y = self.conv(y * self.scale)
        return F.conv2d(y, self.w)


def test_shared_module_and_raw_parameters_stay_correct():
    m = Shared().eval()
    randomize_bn(m)
    kill(m.stem[1], [0], beta=0.4)
    kill(m.bn, [2, 5], beta=[0.0, 0.6])
    out, result = run(m, x_img())
    assert result.counts["channels_removed"] >= 2
    assert m.scale.shape == (1, 6, 1, 1) and m.conv.weight.shape == (6, 6, 1, 1)  # the input is untouched


def test_channels_into_an_opaque_op_or_the_output_are_kept():
    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.s = nn.Sequential(*cbr(3, 4, k=1, pad=0))

        def forward(self, x):
            return torch.exp(self.s(x))  # an op no definition describes

    m = Gate().eval()
    randomize_bn(m)
    kill(m.s[1], [1], beta=0.0)
    checked = check_pass("remove_channels", m, x_img(), expect_rewrite=False)
    result = checked.report["remove_channels"].result
    assert not result.modified and "opaque" in reasons(result)


def test_training_mode_bn_is_refused():
    m = nn.Sequential(*cbr(3, 4, k=1, pad=0), nn.Conv2d(4, 2, 1))
    m.eval()
    m[1].train()
    kill(m[1], [1], beta=0.0)
    _, report = rewrite.apply(m, ["remove_channels"], example_inputs=x_img(), return_report=True)
    result = report["remove_channels"].result
    assert not result.modified and "training mode" in reasons(result)


def test_without_example_inputs_the_pass_refuses():
    m = nn.Sequential(*cbr(3, 4), nn.Conv2d(4, 2, 1)).eval()
    _, report = rewrite.apply(m, ["remove_channels"], return_report=True)
    result = report["remove_channels"].result
    assert not result.modified and "needs example_inputs" in reasons(result)


def test_conv_transpose_reads_only_zero_constants():
    m = nn.Sequential(*cbr(3, 5, k=1, pad=0), nn.ConvTranspose2d(5, 2, 3, stride=2)).eval()
    randomize_bn(m)
    kill(m[1], [0, 1], beta=[0.5, -0.5])
    out, result = run(m, x_img())
    assert out.get_submodule("0").weight.shape[0] == 4
    assert "conv_transpose" in reasons(result)


# -- lossy mode ---------------------------------------------------------------------------------------------
def test_threshold_mode_is_lossy_and_says_how_far_outputs_moved():
    m = nn.Sequential(*cbr(3, 8, k=1, pad=0), nn.Conv2d(8, 3, 1)).eval()
    randomize_bn(m)
    m[1].weight[[1, 2, 6]] = torch.tensor([1e-3, -5e-4, 2e-3])
    x = x_img()
    out, report = rewrite.apply(m, ["remove_channels"], example_inputs=x, return_report=True,
                                options={"remove_channels": {"threshold": 1e-3}})
    result = report["remove_channels"].result
    assert result.counts["zeroed_gammas"] == 2 and result.notes["lossy"]
    assert out.get_submodule("0").weight.shape[0] == 6
    moved = rewrite.verify(m, out, x)
    assert moved.max_abs > 0 and result.notes["output_max_abs"] == pytest.approx(moved.max_abs, rel=1e-3)
    assert any("LOSSY" in line for line in result.notes["summary"])
    assert m[1].weight[1] == 1e-3  # the input model keeps its gammas
