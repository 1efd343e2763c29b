"""fold_bn: property tests on random conv/BN configurations, plus the known traps one by one."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import rewrite
from rewrite.testing import check_pass, conv_configs, randomize_bn


def count(model, cls):
    return sum(1 for m in model.modules() if isinstance(m, cls))


def fold_report(model, x):
    out, report = rewrite.apply(model, ["fold_bn"], example_inputs=x, return_report=True)
    return out, report["fold_bn"].result


# -- conv / conv_transpose / linear followed by BN ------------------------------------------------
@settings(max_examples=30)
@given(cfg=conv_configs(), affine=st.booleans(), seed=st.integers(0, 2**16), double=st.booleans())
def test_conv_bn_folds_exactly(cfg, affine, seed, double):
    torch.manual_seed(seed)
    model = nn.Sequential(cfg.conv(), cfg.bn()).eval()
    model[1].affine = affine
    if not affine:
        model[1].weight = model[1].bias = None
    randomize_bn(model, seed)
    result = check_pass("fold_bn", model, cfg.example(seed=seed), dtype=torch.float64 if double else None)
    assert count(result.model, nn.modules.batchnorm._BatchNorm) == 0
    conv = [m for m in result.model.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    assert len(conv) == 1 and conv[0].bias is not None
    assert conv[0].groups == cfg.groups and conv[0].dilation == cfg.dilation and conv[0].stride == cfg.stride


@settings(max_examples=25)
@given(cfg=conv_configs(max_groups=3), seed=st.integers(0, 2**16))
def test_conv_transpose_bn_folds_exactly(cfg, seed):
    torch.manual_seed(seed)
    model = randomize_bn(nn.Sequential(cfg.conv(transpose=True), cfg.bn()), seed).eval()
    result = check_pass("fold_bn", model, cfg.example(seed=seed), dtype=torch.float64)
    assert count(result.model, nn.modules.batchnorm._BatchNorm) == 0
    assert count(result.model, nn.modules.conv._ConvTransposeNd) == 1


@settings(max_examples=20)
@given(fin=st.integers(1, 12), fout=st.integers(1, 12), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_linear_bn1d_folds_exactly(fin, fout, bias, seed):
    torch.manual_seed(seed)
    model = randomize_bn(nn.Sequential(nn.Linear(fin, fout, bias=bias), nn.BatchNorm1d(fout)), seed).eval()
    result = check_pass("fold_bn", model, torch.randn(4, fin), dtype=torch.float64)
    assert count(result.model, nn.BatchNorm1d) == 0


def test_linear_bn_without_shapes_is_refused():
    model = randomize_bn(nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6))).eval()
    _, result = rewrite.apply(model, ["fold_bn"], return_report=True)
    assert not result["fold_bn"].result.modified
    assert "example_inputs" in result["fold_bn"].result.refused[0].reason


def test_linear_bn_on_3d_activations_is_refused():
    # BatchNorm1d on (N, C, L) normalizes axis 1, but the linear's outputs are on the last axis.
    model = randomize_bn(nn.Sequential(nn.Linear(5, 5), nn.BatchNorm1d(5))).eval()
    check_pass("fold_bn", model, torch.randn(2, 5, 5), refuses="2-D")


# -- BN before a conv / linear -------------------------------------------------------------------
@settings(max_examples=25)
@given(cfg=conv_configs(allow_padding=False), seed=st.integers(0, 2**16))
def test_bn_before_unpadded_conv_folds_exactly(cfg, seed):
    torch.manual_seed(seed)
    model = randomize_bn(nn.Sequential(cfg.bn(cfg.in_channels), cfg.conv()), seed).eval()
    result = check_pass("fold_bn", model, cfg.example(seed=seed), dtype=torch.float64)
    assert count(result.model, nn.modules.batchnorm._BatchNorm) == 0


def test_bn_before_padded_conv_is_refused():
    model = randomize_bn(nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1))).eval()
    check_pass("fold_bn", model, torch.randn(2, 3, 8, 8), refuses="zero-pads")


def test_bn_with_zero_beta_and_mean_before_padded_conv_folds():
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.running_var.copy_(torch.tensor([0.5, 2.0, 3.0]))
        bn.weight.copy_(torch.tensor([1.5, -0.5, 2.0]))
    model = nn.Sequential(bn, nn.Conv2d(3, 4, 3, padding=1)).eval()
    result = check_pass("fold_bn", model, torch.randn(2, 3, 8, 8), dtype=torch.float64)
    assert count(result.model, nn.BatchNorm2d) == 0


def test_bn_before_reflect_padded_conv_folds():
    # Reflection copies values, so a per-channel affine commutes with it.
    model = randomize_bn(nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")))
    check_pass("fold_bn", model.eval(), torch.randn(2, 3, 8, 8), dtype=torch.float64)


def test_bn1d_before_linear_folds():
    model = randomize_bn(nn.Sequential(nn.BatchNorm1d(6), nn.Linear(6, 3))).eval()
    check_pass("fold_bn", model, torch.randn(5, 6), dtype=torch.float64)


# -- refusals for BN without a fixed affine ------------------------------------------------------
def test_training_mode_bn_is_refused():
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))  # left in training mode
    out, result = fold_report(model, torch.randn(2, 3, 8, 8))
    assert not result.modified
    assert "training mode" in result.refused[0].reason and "eval()" in result.refused[0].reason
    assert count(out, nn.BatchNorm2d) == 1


def test_bn_without_running_stats_is_refused():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)).eval()
    check_pass("fold_bn", model, torch.randn(2, 3, 8, 8), refuses="batch statistics")


# -- functional forms and per-channel constants ---------------------------------------------------
class FunctionalBN(nn.Module):
    def __init__(self, eps):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, padding=1, bias=False)
        self.register_buffer("mean", torch.randn(5))
        self.register_buffer("var", torch.rand(5) + 0.1)
        self.gamma = nn.Parameter(torch.randn(5))
        self.beta = nn.Parameter(torch.randn(5))
        self.eps = eps

    def forward(self, x):
        return F.batch_norm(self.conv(x), self.mean, self.var, self.gamma, self.beta, False, 0.1, self.eps)


@pytest.mark.parametrize("eps", [1e-5, 1e-3, 0.5])
def test_functional_batch_norm_with_own_eps(eps):
    result = check_pass("fold_bn", FunctionalBN(eps).eval(), torch.randn(2, 3, 8, 8), dtype=torch.float64)
    assert "batch_norm" not in result.model.code


class ScaledConv(nn.Module):
    def __init__(self, factor_shape, shift_shape):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.factor = nn.Parameter(torch.randn(factor_shape))
        self.register_buffer("shift", torch.randn(shift_shape))

    def forward(self, x):
        return self.conv(x) * self.factor + self.shift


@pytest.mark.parametrize("factor_shape,shift_shape", [((1, 4, 1, 1), (4, 1, 1)), ((), (1, 4, 1, 1)), ((4, 1, 1), ())])
def test_per_channel_constants_fold(factor_shape, shift_shape):
    result = check_pass("fold_bn", ScaledConv(factor_shape, shift_shape).eval(), torch.randn(2, 3, 6, 6),
                        dtype=torch.float64)
    assert result.report["fold_bn"].result.counts["fold_scale_into_conv"] == 1
    assert result.report["fold_bn"].result.counts["fold_shift_into_conv"] == 1


def test_spatial_constant_is_not_a_channel_affine():
    check_pass("fold_bn", ScaledConv((1, 4, 6, 6), ()).eval(), torch.randn(2, 3, 6, 6), refuses="per output channel")


class ScalarMul(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return 0.5 * self.conv(x) + 2.0


def test_python_scalars_fold():
    check_pass("fold_bn", ScalarMul().eval(), torch.randn(2, 3, 5, 5), dtype=torch.float64)


# -- sharing: never overwrite what another path reads ---------------------------------------------
class ConvCalledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv(x * 2)


def test_conv_called_twice_with_bn_after_one_call():
    model = randomize_bn(ConvCalledTwice()).eval()
    result = check_pass("fold_bn", model, torch.randn(2, 4, 6, 6), dtype=torch.float64)
    convs = [m for m in result.model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 2  # the fused copy and the original, still used by the second call
    original = dict(result.model.named_modules())["conv"]
    assert torch.equal(original.weight, model.conv.weight)  # the unfused call still sees the raw weights


class SharedWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 3, 3, padding=1)
        self.b = nn.Conv2d(3, 3, 3, padding=1)
        self.b.weight = self.a.weight
        self.bn_a = nn.BatchNorm2d(3)
        self.bn_b = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn_a(self.a(x)) - self.bn_b(self.b(x))


def test_two_convs_sharing_a_weight_each_with_own_bn():
    model = randomize_bn(SharedWeight()).eval()
    weight_before = model.a.weight.detach().clone()
    result = check_pass("fold_bn", model, torch.randn(2, 3, 6, 6), dtype=torch.float64)
    assert result.report["fold_bn"].result.counts["fold_bn_into_conv"] == 2
    assert torch.equal(model.a.weight, weight_before)


class SecondConsumer(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y), y.relu()


def test_conv_output_with_second_consumer_is_refused():
    check_pass("fold_bn", randomize_bn(SecondConsumer()).eval(), torch.randn(2, 3, 6, 6), refuses="also read by")


# -- dtypes ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_models_keep_their_dtype(dtype):
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())).eval()
    low = model.to(dtype)
    x = torch.randn(2, 3, 8, 8, dtype=dtype)
    out = rewrite.apply(low, ["fold_bn"])
    assert all(p.dtype == dtype for p in out.parameters())
    exact = model.double()(x.double())
    got = out(x).double()
    # The fused model must be at least as close to the exact result as the low-precision original.
    assert (got - exact).abs().max() <= 2 * (low.to(dtype)(x).double() - exact).abs().max() + 1e-3


def test_deep_stack_float64_is_exact():
    layers = []
    for _ in range(40):
        layers += [nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()]
    model = randomize_bn(nn.Sequential(*layers)).eval()
    result = check_pass("fold_bn", model, torch.randn(1, 4, 8, 8), dtype=torch.float64)
    assert result.max_rel <= 1e-10
    assert count(result.model, nn.BatchNorm2d) == 0


# -- random small networks ----------------------------------------------------------------------
from rewrite.testing import random_networks  # noqa: E402


@settings(max_examples=30)
@given(case=random_networks())
def test_fold_bn_keeps_random_networks_equivalent(case):
    model, x = case
    result = check_pass("fold_bn", model, x, expect_rewrite=False)
    # Each conv step's output is read only by its own BN, so each of those must fold (a "bn" step
    # straight after may fold as well).
    folded = result.report["fold_bn"].result.counts["fold_bn_into_conv"]
    assert folded >= model.kinds.count("conv")
    if "bn" not in model.kinds:
        assert folded == model.kinds.count("conv")


@settings(max_examples=20)
@given(case=random_networks())
def test_cleanup_keeps_random_networks_equivalent(case):
    model, x = case
    result = check_pass("cleanup", model, x, expect_rewrite=False)
    assert "identity" not in {n.kind for n in rewrite.frontends.fx.import_module(result.model).nodes}


# -- unbatched activations: BN's axis 1 is not the conv's channel axis ---------------------------
def test_conv1d_bn1d_on_unbatched_input_is_refused():
    model = randomize_bn(nn.Sequential(nn.Conv1d(3, 4, 1), nn.BatchNorm1d(4))).eval()
    check_pass("fold_bn", model, torch.randn(3, 4), refuses="unbatched")


def test_bn1d_before_conv1d_on_unbatched_input_is_refused():
    model = randomize_bn(nn.Sequential(nn.BatchNorm1d(4), nn.Conv1d(4, 2, 1))).eval()
    check_pass("fold_bn", model, torch.randn(4, 4), refuses="unbatched")


def test_bn1d_with_other_channels_than_the_conv_reads_is_refused():
    model = randomize_bn(nn.Sequential(nn.BatchNorm1d(6), nn.Conv1d(4, 2, 1))).eval()
    check_pass("fold_bn", model, torch.randn(4, 6), refuses="unbatched")


def test_conv1d_bn1d_without_shapes_is_refused_but_conv2d_bn2d_folds():
    conv1d = randomize_bn(nn.Sequential(nn.Conv1d(3, 4, 1), nn.BatchNorm1d(4))).eval()
    _, report = rewrite.apply(conv1d, ["fold_bn"], return_report=True)
    assert not report["fold_bn"].result.modified and "example_inputs" in report["fold_bn"].result.refused[0].reason
    conv2d = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))).eval()
    assert rewrite.apply(conv2d, ["fold_bn"], return_report=True)[1]["fold_bn"].result.modified


class UnbatchedScale(nn.Module):
    def __init__(self, factor_shape):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.register_buffer("factor", torch.randn(factor_shape))

    def forward(self, x):
        return self.conv(x) * self.factor


def test_constants_on_unbatched_conv_outputs():
    x = torch.randn(3, 4, 5)  # (C, H, W): channels on axis 0
    check_pass("fold_bn", UnbatchedScale((4, 1)).eval(), x, refuses="per output channel")
    check_pass("fold_bn", UnbatchedScale((1, 4, 1, 1)).eval(), x, refuses="per output channel")
    check_pass("fold_bn", UnbatchedScale((4, 1, 1)).eval(), x, dtype=torch.float64)


class FloatScalars(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return self.conv(x) * 0.1 + 0.3


def test_python_float_scalars_stay_exact_in_float64():
    result = check_pass("fold_bn", FloatScalars().eval(), torch.randn(2, 3, 4, 4), dtype=torch.float64)
    assert result.max_rel <= 1e-10


class ConvTimesConstant(nn.Module):
    def __init__(self, conv, factor, shift):
        super().__init__()
        self.conv = conv
        self.register_buffer("factor", factor)
        self.register_buffer("shift", shift)

    def forward(self, x):
        return self.conv(x) * self.factor + self.shift


@settings(max_examples=25)
@given(cfg=conv_configs(), batched=st.booleans(), leading_one=st.booleans(), seed=st.integers(0, 2**16))
def test_per_channel_constants_on_batched_and_unbatched_outputs(cfg, batched, leading_one, seed):
    torch.manual_seed(seed)
    # (C, 1, ..) is per channel in both layouts; (1, C, 1, ..) only when batched (else it adds an axis).
    shape = (cfg.out_channels,) + (1,) * cfg.dims
    shape = (1,) + shape if leading_one else shape
    model = ConvTimesConstant(cfg.conv(), torch.randn(shape), torch.randn(shape)).eval()
    x = cfg.example(batch=2 if batched else None, seed=seed)
    if leading_one and not batched:
        check_pass("fold_bn", model, x, refuses="per output channel")
    else:
        result = check_pass("fold_bn", model, x, dtype=torch.float64)
        assert result.report["fold_bn"].result.counts["fold_scale_into_conv"] == 1


@settings(max_examples=15)
@given(case=random_networks())
def test_fold_bn_on_random_networks_in_float64(case):
    model, x = case
    result = check_pass("fold_bn", model, x, dtype=torch.float64, expect_rewrite=False)
    assert result.max_rel <= 1e-10
