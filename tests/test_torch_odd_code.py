"""Module code as people write it, found by an adversarial review: each case was silently wrong, silent in
the report, or a raw exception before its fix."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import rewrite
from rewrite.errors import PassError, RewriteError, TraceError
from rewrite.testing import randomize_bn


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max())


class ConvReadTwice(nn.Module):
    """The conv's weight is also read by a functional call: the fold must not change what that call reads."""

    def __init__(self):
        super().__init__()
        self.c, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.b(self.c(x)) + F.conv2d(x, self.c.weight, padding=1)


class LinearReadTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.l, self.b = nn.Linear(4, 4), nn.BatchNorm1d(4)

    def forward(self, x):
        return self.b(self.l(x)) + F.linear(x, self.l.weight)


@pytest.mark.parametrize("cls, shape", [(ConvReadTwice, (2, 4, 9, 9)), (LinearReadTwice, (3, 4))])
def test_a_weight_read_elsewhere_keeps_its_value_for_that_reader(cls, shape):
    model = randomize_bn(cls(), seed=1).eval()
    x = torch.randn(*shape)
    # A linear's input rank is known only from an example input.
    out, report = rewrite.apply(model, ["fold_bn"], example_inputs=x, return_report=True)
    assert sum(report["fold_bn"].result.counts.values()) == 1
    with torch.no_grad():
        assert _rel(model(x), out(x)) <= 1e-5


@pytest.mark.parametrize("how", ["forward_hook", "forward_pre_hook", "instance_forward"])
def test_code_around_the_models_own_forward_is_refused_not_dropped(how):
    model = nn.Sequential(nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)).eval()
    if how == "forward_hook":
        model.register_forward_hook(lambda m, i, o: o * 2)
    elif how == "forward_pre_hook":
        model.register_forward_pre_hook(lambda m, i: (i[0] * 2,))
    else:
        model.forward = lambda x: nn.Sequential.forward(model, x) * 2
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TraceError, match="<root>"):
        rewrite.apply(model, ["fold_bn"], example_inputs=torch.randn(1, 4, 8, 8))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("register", [nn.Module.register_full_backward_hook, nn.Module.register_backward_hook,
                                      nn.Module.register_full_backward_pre_hook])
def test_backward_hooks_on_the_model_are_not_a_refusal_and_the_report_says_they_are_left(register):
    model = randomize_bn(nn.Sequential(nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)), seed=2).eval()
    register(model, lambda module, *grads: None)
    x = torch.randn(2, 4, 9, 9)
    out, report = rewrite.apply(model, ["fold_bn"], example_inputs=x, return_report=True)
    assert report["fold_bn"].result.counts == {"fold_bn_into_conv": 1}
    assert "backward hooks are not on the result" in report.capture
    with torch.no_grad():
        assert _rel(model(x), out(x)) <= 1e-5


def test_a_torch_compiled_model_is_rewritten_through_the_module_it_wraps():
    model = randomize_bn(nn.Sequential(nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)), seed=3).eval()
    compiled = torch.compile(model)  # compiles lazily, on its first call: the test never calls it
    x = torch.randn(2, 4, 9, 9)
    out, report = rewrite.apply(compiled, ["fold_bn"], example_inputs=x, verify=True, return_report=True)
    assert report["fold_bn"].result.counts == {"fold_bn_into_conv": 1}
    assert "torch.compile" in report.capture and not isinstance(out, type(compiled))
    with torch.no_grad():
        assert _rel(model(x), out(x)) <= 1e-5


@pytest.mark.parametrize("register", [lambda c: c.register_forward_hook(lambda m, i, o: o * 2 + 1),
                                      lambda c: c.register_forward_pre_hook(lambda m, args: (args[0] * 3,))])
def test_forward_hooks_on_a_torch_compile_wrapper_are_refused_not_dropped(register):
    model = nn.Sequential(nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)).eval()
    compiled = torch.compile(model)
    register(compiled)  # on the wrapper: they run around the module it wraps
    with pytest.raises(TraceError, match="torch.compile wrapper of Sequential.*forward (pre )?hooks"):
        rewrite.apply(compiled, ["fold_bn"], example_inputs=torch.randn(1, 4, 9, 9), verify=True)


@pytest.mark.parametrize("how, words", [("forward_hook", "forward hooks"), ("instance_forward", "set on the instance")])
def test_a_batch_norm_with_code_of_its_own_is_left_with_the_reason(how, words):
    model = nn.Sequential(nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)).eval()
    if how == "forward_hook":
        model[1].register_forward_hook(lambda m, i, o: o + 1)
    else:
        forward = model[1].forward
        model[1].forward = lambda t: forward(t) + 1
    x = torch.randn(2, 4, 9, 9)
    out, report = rewrite.apply(model, ["fold_bn"], return_report=True)
    refused = report["fold_bn"].result.refused
    assert len(refused) == 1 and words in refused[0].reason, refused
    with torch.no_grad():
        assert _rel(model(x), out(x)) <= 1e-5


def _residual_block():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.b1 = nn.Conv2d(4, 4, 3, 1, 1, bias=False), nn.BatchNorm2d(4)
            self.c2, self.b2 = nn.Conv2d(4, 4, 3, 1, 1, bias=False), nn.BatchNorm2d(4)

        def forward(self, x):
            return F.relu(self.b2(self.c2(F.relu(self.b1(self.c1(x))))) + x)
    return Block().eval()


@pytest.mark.parametrize("passes, option, value", [
    (["remove_residual"], "nonnegative_inputs", "no"), (["remove_residual"], "nonnegative_inputs", 0),
    (["remove_residual"], "signed", "splt"), (["remove_residual"], "signed", None),
    (["fuse_branches"], "allow_costlier", "yes"), (["fuse_branches"], "allow_costlier", torch.tensor(True))])
def test_an_option_value_it_does_not_take_is_an_error(passes, option, value):
    with pytest.raises(PassError, match=repr(option)):
        rewrite.apply(_residual_block(), passes, example_inputs=torch.randn(1, 4, 8, 8),
                      options={passes[0]: {option: value}})


@pytest.mark.parametrize("option, value", [("nonnegative_inputs", np.bool_(False)), ("signed", np.str_("clamp"))])
def test_numpys_bool_and_str_are_option_values_like_pythons(option, value):
    model, x = _residual_block(), torch.randn(2, 4, 10, 10)
    out, report = rewrite.apply(model, ["remove_residual"], example_inputs=x, return_report=True,
                                options={"remove_residual": {option: value}})
    assert sum(report["remove_residual"].result.counts.values()) >= 1
    with torch.no_grad():
        assert _rel(model(x), out(x)) <= 1e-5


def test_the_switch_itself_still_works():
    model, x = _residual_block(), torch.randn(2, 4, 10, 10)
    out = rewrite.apply(model, ["remove_residual"], example_inputs=x,
                        options={"remove_residual": {"nonnegative_inputs": False}})
    with torch.no_grad():
        assert _rel(model(x), out(x)) <= 1e-5


class FakeQuantConv(nn.Module):
    """Weights put on an integer grid with float32's own rounding, the round-to-nearest trick."""

    MAGIC = 1.5 * 2**23

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 4, 3, 3))
        self.register_buffer("scale", torch.tensor(0.25))
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        q = (self.weight / self.scale + self.MAGIC) - self.MAGIC
        return self.bn(F.conv2d(x, q * self.scale, padding=1))


@pytest.mark.parametrize("passes", [["cleanup"], ["fold_bn"]])
def test_a_parameter_expression_whose_float32_rounding_is_the_point_keeps_it(passes):
    model = randomize_bn(FakeQuantConv(), seed=2).eval()
    x = torch.randn(2, 4, 9, 9)
    out = rewrite.apply(model, passes)
    with torch.no_grad():
        assert _rel(model(x), out(x)) <= 1e-5


class HalfFakeQuantConv(nn.Module):
    """The same trick in float16 / bfloat16 (magic 1.5 * 2**mantissa bits): a coarse grid, whose step is far
    above a bound taken relative to the largest weight."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.magic = 1.5 / torch.finfo(dtype).eps  # 1.5 * 2**mantissa bits
        self.weight = nn.Parameter((torch.randn(8, 4, 3, 3) * 0.05).to(dtype))
        self.register_buffer("scale", torch.tensor(1 / 512, dtype=dtype))  # a power of two: q * scale is exact

    def grid_weight(self) -> torch.Tensor:
        return ((self.weight / self.scale + self.magic) - self.magic) * self.scale

    def forward(self, x):
        return F.conv2d(x, self.grid_weight())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_fake_quantizer_keeps_the_models_grid(dtype):
    torch.manual_seed(4)
    model = HalfFakeQuantConv(dtype).eval()
    out = rewrite.apply(model, ["cleanup"])
    with torch.no_grad():
        folded = [t for t in out.state_dict().values() if t.shape == model.weight.shape]
        assert len(folded) == 1 and torch.equal(folded[0], model.grid_weight())


@pytest.mark.parametrize("dtype, step", [(torch.bfloat16, 2.0**-4), (torch.float16, 2.0**-7)])
def test_a_half_precision_grid_a_few_units_fine_is_kept_too(dtype, step):
    """Weights in [1, 2) on a grid of 8 units of their precision: every float64 value is within 4 units
    of the model's own, so no closeness test tells the grid from rounding; the model's value is taken."""
    torch.manual_seed(5)
    model = HalfFakeQuantConv(dtype).eval()
    with torch.no_grad():
        model.weight.copy_(1 + torch.rand(model.weight.shape))
        model.scale.fill_(step)
    out = rewrite.apply(model, ["cleanup"])
    with torch.no_grad():
        folded = [t for t in out.state_dict().values() if t.shape == model.weight.shape]
        assert not torch.equal(model.weight, model.grid_weight())  # the grid moves weights
        assert len(folded) == 1 and torch.equal(folded[0], model.grid_weight())


def test_a_parameter_that_overflows_in_the_model_but_not_in_float64_keeps_the_models_infinities():
    class Overflowing(nn.Module):
        def __init__(self):
            super().__init__()
            self.p = nn.Parameter(torch.tensor([float("inf"), 1.0, 2.0, 3.0]))

        def forward(self, x):  # float32: inf in every element; float64: inf in the first only
            return x * ((self.p * 1e30) * 1e10 / 1e10).view(1, 4, 1, 1)

    model = Overflowing().eval()
    x = torch.randn(2, 4, 3, 3)
    out = rewrite.apply(model, ["cleanup"])
    with torch.no_grad():
        assert torch.equal(out(x), model(x))


def test_a_float32_fake_quantizer_with_small_channels_keeps_their_grid():
    model = FakeQuantConv()
    with torch.no_grad():  # one coarse channel, whose largest weight a bound relative to the maximum would take
        model.scale = torch.tensor([1.0, 1e-5, 1e-5, 1e-5]).view(4, 1, 1, 1)
        model.weight.mul_(model.scale * 40)
        model.weight[0].round_()  # already on its grid: the coarse channel alone would pass any bound
    out = rewrite.apply(model.eval(), ["cleanup"])
    with torch.no_grad():
        grid = ((model.weight / model.scale + model.MAGIC) - model.MAGIC) * model.scale
        assert not torch.equal(model.weight, grid)  # the grid is not a no-op
        folded = [t for t in out.state_dict().values() if t.shape == model.weight.shape]
        assert len(folded) == 1 and torch.equal(folded[0], grid)


def test_a_well_conditioned_parameter_expression_still_gets_the_correctly_rounded_value():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(8, 4, 3, 3))
            self.gain = nn.Parameter(torch.rand(8, 1, 1, 1) + 0.5)

        def forward(self, x):
            return F.conv2d(x, (self.weight * self.gain) / 3.0)

    model = Scaled().eval()
    out = rewrite.apply(model, ["cleanup"])
    folded = [t for name, t in out.state_dict().items() if tuple(t.shape) == (8, 4, 3, 3)]
    exact = ((model.weight.double() * model.gain.double()) / 3.0).float()
    assert any(torch.equal(t, exact) for t in folded)


@pytest.mark.parametrize("call", [
    lambda m, x: rewrite.apply(m, None),
    lambda m, x: rewrite.apply(m, ["fold_bn"], options=[1]),
    lambda m, x: rewrite.apply(m, ["fold_bn"], leaf_modules=3),
    lambda m, x: rewrite.apply(m, ["fold_bn"], example_inputs=(x, x), verify=True),
], ids=["passes_none", "options_list", "leaf_modules_int", "too_many_inputs"])
def test_bad_arguments_are_rewrite_errors(call):
    model = nn.Sequential(nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)).eval()
    with pytest.raises(RewriteError):
        call(model, torch.randn(2, 4, 9, 9))


def test_a_dead_channel_kept_with_its_live_group_mate_is_in_the_report():
    class DepthwiseTimesTwo(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.b1 = nn.Conv2d(4, 8, 1), nn.BatchNorm2d(8)
            self.dw, self.b2 = nn.Conv2d(8, 16, 3, padding=1, groups=8), nn.BatchNorm2d(16)
            self.c3 = nn.Conv2d(16, 3, 1)

        def forward(self, x):
            return self.c3(F.relu(self.b2(self.dw(F.relu(self.b1(self.c1(x)))))))

    model = DepthwiseTimesTwo().eval()
    with torch.no_grad():
        model.b2.weight[2], model.b2.bias[2] = 0.0, -0.5  # always 0 after the ReLU; channel 3 of its group lives
    x = torch.randn(2, 4, 10, 10)
    out, report = rewrite.apply(model, ["remove_channels"], example_inputs=x, return_report=True)
    reasons = [r.reason for r in report["remove_channels"].result.refused]
    assert any("1 dead channel(s) of b2 kept" in r and "group" in r for r in reasons), reasons


class GroupedTranspose(nn.Module):
    """A BN straight into a transposed conv of 2 groups of 2 inputs: a dead channel goes with its group."""

    def __init__(self):
        super().__init__()
        self.c, self.b = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
        self.t, self.d = nn.ConvTranspose2d(4, 4, 1, groups=2), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.d(self.t(self.b(self.c(x))))


class ConcatIntoDepthwise(nn.Module):
    """A BN of a concat another conv reads, straight into a depthwise conv that carries its channels on."""

    def __init__(self):
        super().__init__()
        self.p, self.q, self.b = nn.Conv2d(3, 2, 1), nn.Conv2d(3, 2, 1), nn.BatchNorm2d(4)
        self.dw = nn.Conv2d(4, 4, 1, groups=4)
        self.c1, self.c2 = nn.Conv2d(4, 2, 1), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        f = torch.cat([self.p(x), self.q(x)], 1)
        return self.c1(self.dw(self.b(f))) + self.c2(f)


@pytest.mark.parametrize("cls, words", [
    (GroupedTranspose, "it shares a group of conv_transpose t (2 groups)"),
    (ConcatIntoDepthwise, "it is constant only after batch_norm b, whose input channel (of concat"),
])
def test_a_dead_channel_a_grouped_conv_reads_is_counted_once_where_it_becomes_constant(cls, words):
    """A grouped conv's couplings tie channels of a group; they carry no value from one to the other, so a
    dead channel is neither taken for a copy of its group's first (and left unsaid) nor counted again at
    the depthwise conv it is carried through."""
    model = randomize_bn(cls(), seed=6).eval()
    with torch.no_grad():
        model.b.weight[0], model.b.bias[0] = 0.0, -1.0
    x = torch.randn(2, 3, 6, 6)
    out, report = rewrite.apply(model, ["remove_channels"], example_inputs=x, return_report=True)
    reasons = [r.reason for r in report["remove_channels"].result.refused]
    assert len(reasons) == 1 and reasons[0].startswith(f"1 dead channel(s) of b kept: {words}"), reasons
    with torch.no_grad():
        assert _rel(model(x), out(x)) <= 1e-5


def test_dead_channels_of_concat_readers_are_each_counted_where_they_become_constant():
    class TwoReaders(nn.Module):
        """A DenseNet layer's shape: two BNs read one concat, each with a channel dead the other keeps."""

        def __init__(self):
            super().__init__()
            self.p, self.q = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1)
            self.b1, self.b2 = nn.BatchNorm2d(6), nn.BatchNorm2d(6)
            self.c1, self.c2 = nn.Conv2d(6, 2, 1), nn.Conv2d(6, 2, 1)

        def forward(self, x):
            f = torch.cat([self.p(x), self.q(x)], 1)
            return self.c1(F.relu(self.b1(f))) + self.c2(F.relu(self.b2(f)))

    model = randomize_bn(TwoReaders(), seed=5).eval()
    with torch.no_grad():
        model.b1.weight[[0, 4]], model.b1.bias[[0, 4]] = 0.0, -1.0  # 0 after the ReLU
        model.b2.weight[1], model.b2.bias[1] = 0.0, -1.0
    x = torch.randn(2, 3, 6, 6)
    out, report = rewrite.apply(model, ["remove_channels"], example_inputs=x, return_report=True)
    reasons = sorted(r.reason for r in report["remove_channels"].result.refused)
    assert len(reasons) == 2, reasons
    assert reasons[0].startswith("1 dead channel(s) of b2 kept") and reasons[1].startswith("2 dead channel(s) of b1")
    assert all("constant only after batch_norm" in r and "concat" in r for r in reasons), reasons
    with torch.no_grad():
        assert _rel(model(x), out(x)) <= 1e-5


@pytest.mark.parametrize("form, words", [
    (lambda m, x: torch.cat([x, m.c(x)], 1), "the input itself"),
    (lambda m, x: torch.cat([x[:, 0:4:2], m.c(x)], 1), "only contiguous channel slices"),
    (lambda m, x: torch.cat([x[:, 0:4], m.bn(m.c(x))], 1), "run fold_bn first"),
])
def test_a_channel_concat_beside_a_conv_that_is_not_merged_says_why(form, words):
    class Concat(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.bn = nn.Conv2d(8, 6, 3, 1, 1), nn.BatchNorm2d(6)

        def forward(self, x):
            return form(self, x)

    x = torch.randn(2, 8, 10, 10)
    _, report = rewrite.apply(Concat().eval(), ["remove_residual"], example_inputs=x, return_report=True)
    reasons = [r.reason for r in report["remove_residual"].result.refused]
    assert len(reasons) == 1 and words in reasons[0], reasons
