"""Issue 11, BN folding reach: through reshapes that keep the features axis (LeViT's LinearNorm), through
inference-mode dropout (LeViT's NormLinear), and into the convs of a concatenation (MixNet's mixed convs).

Each construct: exact in float32 and float64, reduced to no BN, idempotent, and a near miss refused with
its reason (check_pass asserts all of these).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings, strategies as st

import rewrite
from rewrite.testing import check_pass, randomize_bn

pytestmark = pytest.mark.usefixtures("one_thread")


def _exact_both(model, x, **kw):
    out = check_pass("fold_bn", model, x, **kw)
    assert check_pass("fold_bn", model, x, dtype=torch.float64, **kw).max_rel <= 1e-10
    return out


def _after(result) -> dict:
    return dict(result.report.nodes_after)


# -- linear -> flatten / reshape -> BN1d -> reshape_as ---------------------------------------------------
class LinearNorm(nn.Module):
    """LeViT's `bn(linear(x).flatten(0, 1)).reshape_as(x)`, or the same through view / reshape."""

    def __init__(self, cin: int, cout: int, bias: bool, form: str, seed: int):
        super().__init__()
        self.linear = nn.Linear(cin, cout, bias=bias)
        self.bn = nn.BatchNorm1d(cout)
        self.form = form
        randomize_bn(self, seed)

    def forward(self, x):
        y = self.linear(x)
        flat = {"flatten": lambda: y.flatten(0, 1), "reshape": lambda: y.reshape(-1, y.shape[-1]),
                "view": lambda: y.view(y.size(0) * y.size(1), -1)}[self.form]()
        return self.bn(flat).reshape_as(y)


@settings(max_examples=12, deadline=None)
@given(batch=st.integers(2, 3), tokens=st.integers(2, 5), cin=st.integers(1, 6), cout=st.integers(1, 6),
       bias=st.booleans(), form=st.sampled_from(["flatten", "reshape", "view"]), seed=st.integers(0, 999))
def test_linear_reshape_bn_folds(batch, tokens, cin, cout, bias, form, seed):
    model = LinearNorm(cin, cout, bias, form, seed).eval()
    x = torch.randn(batch, tokens, cin, generator=torch.Generator().manual_seed(seed))
    after = _after(_exact_both(model, x))
    assert "batch_norm" not in after and after["linear"] == 1, after
    # the folded model still runs at another batch size (no batch baked into a shape)
    fused = rewrite.apply(model, ["fold_bn"], example_inputs=x)
    other = torch.randn(batch + 2, tokens, cin)
    assert torch.allclose(fused(other), model(other), rtol=1e-5, atol=1e-6)


class ChannelMixingReshape(LinearNorm):
    """(B, N, C) -> (B, N * C): the BN would normalize over (token, feature) pairs, not features."""

    def forward(self, x):
        y = self.linear(x)
        return self.bn(y.reshape(y.shape[0], -1)).reshape_as(y)

    def __init__(self, tokens: int, cout: int):
        super().__init__(3, cout, True, "flatten", 0)
        self.bn = nn.BatchNorm1d(tokens * cout)
        randomize_bn(self, 1)


def test_a_reshape_that_mixes_the_features_axis_is_refused_with_its_reason():
    model = ChannelMixingReshape(4, 5).eval()
    check_pass("fold_bn", model, torch.randn(2, 4, 3), refuses="features axis kept whole")


class LinearNormReadTwice(LinearNorm):
    """The linear's output is also read for its values, not only for its shape."""

    def forward(self, x):
        y = self.linear(x)
        return self.bn(y.flatten(0, 1)).reshape_as(y) + y


def test_a_linear_output_read_for_its_values_elsewhere_is_refused():
    model = LinearNormReadTwice(3, 4, True, "flatten", 0).eval()
    check_pass("fold_bn", model, torch.randn(2, 3, 3), refuses="not only for its shape")


def test_without_shapes_the_fold_through_a_reshape_is_refused_with_a_hint():
    model = LinearNorm(3, 4, True, "flatten", 0).eval()
    _, report = rewrite.apply(model, ["fold_bn"], return_report=True)
    reasons = [r.reason for r in report["fold_bn"].result.refused]
    assert any("pass example_inputs" in r for r in reasons), reasons
    assert report.nodes_after["batch_norm"] == 1


# -- BN -> inference-mode dropout -> linear / conv -----------------------------------------------------
class NormLinear(nn.Module):
    """LeViT's classifier head: linear(dropout(bn(x))); or a 1x1 conv after BN2d and Dropout2d / Identity."""

    def __init__(self, cin: int, cout: int, p: float, conv: bool, identity: bool, seed: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(cin) if conv else nn.BatchNorm1d(cin)
        self.drop = nn.Identity() if identity else (nn.Dropout2d(p) if conv else nn.Dropout(p))
        self.linear = nn.Conv2d(cin, cout, 1) if conv else nn.Linear(cin, cout)
        randomize_bn(self, seed)

    def forward(self, x):
        return self.linear(self.drop(self.bn(x)))


@settings(max_examples=10, deadline=None)
@given(cin=st.integers(1, 6), cout=st.integers(1, 6), p=st.sampled_from([0.0, 0.2, 0.5]), conv=st.booleans(),
       identity=st.booleans(), seed=st.integers(0, 999))
def test_bn_dropout_linear_folds_with_fold_bn_alone(cin, cout, p, conv, identity, seed):
    model = NormLinear(cin, cout, p, conv, identity, seed).eval()
    x = torch.randn(3, cin, *((4, 4) if conv else ()), generator=torch.Generator().manual_seed(seed))
    after = _after(_exact_both(model, x))
    assert "batch_norm" not in after and set(after) <= {"linear", "conv"}, after


def test_dropout_in_training_mode_is_not_seen_through():
    model = NormLinear(4, 3, 0.5, False, False, 0).eval()
    model.drop.train()
    _, report = rewrite.apply(model, ["fold_bn"], example_inputs=torch.randn(3, 4), return_report=True)
    assert report.nodes_after["batch_norm"] == 1
    reasons = " ".join(r.reason for r in report["fold_bn"].result.refused)
    assert "dropout" in reasons, reasons


# -- BN after a concatenation of convs -----------------------------------------------------------------
class MixedConv(nn.Module):
    """MixNet's mixed depthwise conv: the input split by channels, each piece its own kernel, then BN."""

    def __init__(self, splits: list[int], kernels: list[int], depthwise: bool, seed: int, dims: int = 2):
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv1d
        self.splits = splits
        self.convs = nn.ModuleList(conv(c, c, k, padding=k // 2, groups=c if depthwise else 1, bias=(i % 2 == 0))
                                   for i, (c, k) in enumerate(zip(splits, kernels)))
        self.bn = (nn.BatchNorm2d if dims == 2 else nn.BatchNorm1d)(sum(splits))
        randomize_bn(self, seed)

    def forward(self, x):
        pieces = torch.split(x, self.splits, 1)
        return self.bn(torch.cat([c(pieces[i]) for i, c in enumerate(self.convs)], 1))


@settings(max_examples=12, deadline=None)
@given(splits=st.lists(st.integers(1, 4), min_size=1, max_size=4), depthwise=st.booleans(),
       dims=st.sampled_from([1, 2]), seed=st.integers(0, 999), data=st.data())
def test_bn_after_a_concat_of_convs_folds_into_each(splits, depthwise, dims, seed, data):
    kernels = data.draw(st.lists(st.sampled_from([1, 3, 5]), min_size=len(splits), max_size=len(splits)))
    model = MixedConv(splits, kernels, depthwise, seed, dims).eval()
    x = torch.randn(2, sum(splits), *((6,) * dims), generator=torch.Generator().manual_seed(seed))
    after = _after(_exact_both(model, x))
    assert "batch_norm" not in after and after["conv"] == len(splits), after


class ConcatWithInput(MixedConv):
    """One operand of the concat is the input itself (DenseNet-like): no conv for its slice."""

    def forward(self, x):
        return self.bn(torch.cat([self.convs[0](x), x], 1))

    def __init__(self):
        super().__init__([3], [3], False, 0)
        self.bn = nn.BatchNorm2d(6)
        randomize_bn(self, 2)


def test_a_concat_with_an_operand_that_is_no_conv_keeps_its_bn_with_the_reason():
    model = ConcatWithInput().eval()
    check_pass("fold_bn", model, torch.randn(1, 3, 5, 5), refuses="every operand is a conv")


class ConcatReadTwice(MixedConv):
    def forward(self, x):
        pieces = torch.split(x, self.splits, 1)
        outs = [c(pieces[i]) for i, c in enumerate(self.convs)]
        return self.bn(torch.cat(outs, 1)), outs[0]


def test_a_conv_read_outside_the_concat_keeps_the_bn_with_the_reason():
    model = ConcatReadTwice([2, 2], [3, 1], True, 0).eval()
    check_pass("fold_bn", model, torch.randn(1, 4, 5, 5), refuses="also read elsewhere")
