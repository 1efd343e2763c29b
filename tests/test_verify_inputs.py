"""rewrite.verify and verify=True: the float64-referenced bound, exact=True, dtype-aware inputs and outputs,
structure checks before numbers, and no raw exception out of verify=True."""
import io

import onnx
import pytest
import timm
import torch
import torch.nn as nn

import rewrite
from rewrite.pattern import P
from rewrite.rule import rule
from rewrite.testing import check_pass, randomize_bn
from rewrite.verify import judge


def conv_bn_net(channels=4):
    return randomize_bn(nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
                                      nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels))).eval()


# -- the bound ---------------------------------------------------------------------------------
def test_noise_of_the_original_is_not_a_failure_but_a_real_error_is():
    high = torch.linspace(-1, 1, 1000, dtype=torch.float64)
    original = (high + 4e-5 * torch.sin(high * 50)).float()  # the original's own float32 error: 4e-5
    close = (high + 4.4e-5 * torch.cos(high * 50)).float()
    check = judge(original, close, high)
    assert check.ok and check.max_rel > 1e-5  # the old fixed 1e-5 bound would have rejected it
    assert "original float32 error 4.0e-05, rewritten 4.4e-05" in check.summary()
    wrong = (high + 2e-3 * torch.cos(high * 50)).float()
    assert not judge(original, wrong, high).ok
    assert not judge(original, close, high, tolerance=1e-5).ok  # tolerance= is a fixed bound, as before


def test_all_zero_outputs_have_an_absolute_floor():
    high = torch.zeros(10, dtype=torch.float64)
    assert judge(high.float(), torch.full((10,), 1e-7), high).ok
    assert not judge(high.float(), torch.full((10,), 1e-3), high).ok


def test_verify_reports_both_errors_and_exact_tells_rounding_from_a_wrong_rewrite():
    model, x = conv_bn_net(), torch.randn(2, 3, 8, 8)
    out, report = rewrite.apply(model, ["fold_bn"], example_inputs=x, verify=True, return_report=True)
    v = report["fold_bn"].verification
    assert v.ok and v.reference == "float64 copy of the original" and 0 < v.original_error < 1e-5
    assert "fold_bn" in str(report) and "original float32 error" in str(report)
    check = rewrite.verify(model, out, x, exact=True)
    assert check.ok and check.exact.dtype == "float64" and check.exact.max_rel < 1e-10
    assert "float64 copy rewritten" in check.summary()

    @rule(P.op("batch_norm", P.op("conv", P.any("x"), name="conv"), name="bn"))
    def forget_shift(ctx, x, conv, bn):
        return ctx.op("conv", x, params=dict(conv.params), like=bn.output, named_after=conv, **conv.attrs)

    wrong = rewrite.apply(model, [forget_shift], example_inputs=x)
    check = rewrite.verify(model, wrong, x, exact=True)
    assert not check.ok and not check.exact.ok and check.exact.max_rel > 1e-3


def test_float64_cast_of_a_float32_rewrite_checks_the_rewrite_itself():
    model, x = conv_bn_net(), torch.randn(2, 3, 8, 8)
    out = rewrite.apply(model, ["fold_bn"], example_inputs=x)
    direct = rewrite.verify(model, out, x, dtype=torch.float64)
    assert direct.ok and direct.dtype == "float64" and direct.max_rel < 1e-12
    foreign = torch.fx.symbolic_trace(conv_bn_net())  # not made by apply: nothing to redo in float64
    with pytest.raises(rewrite.RewriteError, match="exact=True"):
        rewrite.verify(model, foreign, x, dtype=torch.float64)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_verify_against_float64(dtype):
    model, x = conv_bn_net(8).to(dtype), torch.randn(2, 3, 8, 8, dtype=dtype)
    out, report = rewrite.apply(model, ["fold_bn"], example_inputs=x, verify=True, return_report=True)
    v = report["fold_bn"].verification
    assert v.ok and v.dtype == str(dtype).replace("torch.", "") and v.original_error > 1e-4
    assert next(out.parameters()).dtype == dtype


# -- inputs and outputs of every kind ----------------------------------------------------------
class Mixed(nn.Module):
    """Integer token ids, a boolean mask and a float image in; a dict with a tuple and an int tensor out."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, ids, mask, image):
        tokens = self.embed(ids) * mask.unsqueeze(-1)
        features = self.bn(self.conv(image))
        pooled = features.mean((2, 3))
        return {"scores": (pooled + tokens.sum(1), features), "argmax": pooled.argmax(1), "mask": mask}


def mixed_inputs():
    g = torch.Generator().manual_seed(0)
    return (torch.randint(0, 10, (2, 5), generator=g), torch.rand(2, 5, generator=g) > 0.5,
            torch.randn(2, 3, 6, 6, generator=g))


def test_integer_boolean_and_several_inputs_with_dict_and_tuple_outputs():
    model = randomize_bn(Mixed()).eval()
    x = mixed_inputs()
    out, report = rewrite.apply(model, ["fold_bn"], example_inputs=x, verify=True, return_report=True)
    v = report["fold_bn"].verification
    assert report["fold_bn"].result.modified and v.ok
    assert [o.name for o in v.outputs] == ["scores[0]", "scores[1]", "argmax", "mask"]
    assert all(o.max_abs == 0 for o in v.outputs if o.name in ("argmax", "mask"))
    check_pass("fold_bn", model, x)


class Returns(nn.Module):
    def __init__(self, change):
        super().__init__()
        self.change = change

    def forward(self, x):
        return self.change(x)


@pytest.mark.parametrize("change, problem", [
    (lambda x: x.double(), "dtype float64, the original's float32"),
    (lambda x: x[:, :1], "shape (2, 1, 4), the original's (2, 3, 4)"),
    (lambda x: (x,), "returns"),
    (lambda x: x.argmax(1), "dtype int64"),
])
def test_structure_dtype_and_shape_are_compared_before_the_numbers(change, problem):
    x = torch.randn(2, 3, 4)
    check = rewrite.verify(Returns(lambda x: x * 2), Returns(lambda x: change(x * 2)), x)
    assert not check.ok and any(problem in p for p in check.problems), check.problems


def test_a_rewritten_model_that_does_not_run_is_an_equivalence_error_naming_the_pass():
    @rule(P.op("relu", P.any("x"), name="relu"))
    def bad_reshape(ctx, x, relu):
        return ctx.op("reshape", x, shape=(7, -1, 5))

    model, x = conv_bn_net(), torch.randn(2, 3, 8, 8)
    with pytest.raises(rewrite.EquivalenceError, match="pass bad_reshape.*does not run: RuntimeError"):
        rewrite.apply(model, [bad_reshape], example_inputs=x, verify=True)


# -- the writer bug behind edgenext / xcit ----------------------------------------------------
class ReadsChildWeight(nn.Module):
    """Reads a child's weight (its dtype) before calling the child, as edgenext and xcit do."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4)
        self.inner = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))

    def forward(self, x):
        x = self.norm(self.proj(x.to(self.proj.weight.dtype)))
        scale = self.inner[0].bias.sum()  # a grandchild's parameter, read before its module runs
        return self.inner(x) * scale


@pytest.mark.parametrize("passes", [["cleanup"], ["fold_bn"]])
def test_a_child_weight_read_before_the_child_is_called(passes):
    model, x = randomize_bn(nn.Sequential(ReadsChildWeight())).eval(), torch.randn(2, 3, 8, 8)
    out, report = rewrite.apply(model, passes, example_inputs=x, verify=True, return_report=True)
    assert report.passes[0].verification.ok
    if passes == ["cleanup"]:  # nothing rewritten: the real modules, not empty stand-ins
        assert type(out.get_submodule("0.proj")) is nn.Conv2d and type(out.get_submodule("0.inner.0")) is nn.Conv2d
    assert rewrite.verify(model, out, x).ok
    shared = rewrite.apply(model, passes, example_inputs=x, inplace=True)
    assert rewrite.verify(model, shared, x).ok
    assert not hasattr(model[0].inner, "fused") and type(model[0].proj) is nn.Conv2d  # the input untouched


@pytest.mark.parametrize("name", ["edgenext_xx_small", "xcit_nano_12_p16_224"])
def test_edgenext_and_xcit_pass_verify(name, one_thread):
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    x = torch.randn(1, 3, 224, 224)
    out, report = rewrite.apply(model, ["fold_bn", "cleanup"], example_inputs=x, verify=True, return_report=True)
    assert all(p.verification.ok for p in report.passes)


# -- ONNX --------------------------------------------------------------------------------------
def onnx_model(model, x) -> onnx.ModelProto:
    buffer = io.BytesIO()
    torch.onnx.export(model, (x,), buffer, dynamo=False, input_names=["x"], output_names=["y"])
    return onnx.load_from_string(buffer.getvalue())


class LinearBn(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 5)
        self.bn = nn.BatchNorm1d(5)

    def forward(self, x):
        return torch.relu(self.bn(self.fc(x)))


def test_onnx_verifies_against_a_float64_copy_and_exact_with_passes():
    model, x = randomize_bn(LinearBn()).eval(), torch.randn(3, 6)
    proto = onnx_model(model, x)
    out, report = rewrite.apply(proto, ["fold_bn"], example_inputs=x, verify=True, return_report=True)
    v = report["fold_bn"].verification
    assert report["fold_bn"].result.modified
    assert v.ok and v.reference == "float64 copy of the original" and v.outputs[0].name == "y"
    check = rewrite.verify(proto, out, x, exact=True, passes=["fold_bn"])
    assert check.ok and check.exact.max_rel < 1e-10 and check.exact.dtype == "float64"


def test_onnx_without_a_double_kernel_falls_back_to_the_original_and_says_so():
    model, x = conv_bn_net(), torch.randn(2, 3, 8, 8)  # onnxruntime's CPU Conv has no double kernel
    proto = onnx_model(model, x)
    out, report = rewrite.apply(proto, ["fold_bn"], example_inputs=x, verify=True, return_report=True)
    check = report["fold_bn"].verification
    assert check.ok and "cannot run its float64 copy" in check.reference and check.rewritten_error is None
    assert check.tolerance == 1e-5 and "against the original (onnxruntime cannot run" in check.summary()


# -- outputs that prove nothing ----------------------------------------------------------------
def test_an_output_with_no_finite_value_or_no_value_is_no_verdict():
    inf = torch.full((2, 3), float("inf"))
    check = judge(inf, inf.clone())
    assert not check.ok and not check.changed and "none of the 6 values of output is finite" in check.summary()
    empty = torch.ones(0, 4)
    assert not judge(empty, empty.clone()).ok and "is empty" in judge(empty, empty.clone()).summary()
    partly = torch.tensor([1.0, float("nan"), 2.0])
    assert judge(partly, partly.clone()).ok  # NaN at the same place, the rest compared
    assert judge(partly, partly + 1).changed


def test_verify_true_on_a_model_that_overflows_says_it_cannot_compare():
    model = conv_bn_net()
    with torch.no_grad():
        model[3].weight.fill_(3e38)  # every output is inf or NaN
    with pytest.raises(rewrite.NotVerifiableError, match="the outputs cannot be compared: .* is finite in the original"):
        rewrite.apply(model, ["fold_bn"], example_inputs=(torch.randn(1, 3, 6, 6),), verify=True)
