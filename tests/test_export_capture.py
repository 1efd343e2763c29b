"""The torch.export capture path: constructs symbolic_trace refuses, rewritten exactly through capture="auto".

torch.export takes a second or more per model, so the hypothesis tests draw few examples.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings, strategies as st

import rewrite
from rewrite.testing import assert_same_state, check_pass, randomize_bn, state_snapshot
from rewrite.verify import verify_torch
from written_blocks import (BNAndPad, ChannelAdd, DiverseBranchBlock, FakeQuantizedWeight, MaskedWeight, PoolBuiltInForward, SameConv,
                            ShapeChecked, StandardizedConvBN, ValueDependent)

pytestmark = pytest.mark.usefixtures("one_thread")
FEW = settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def kinds(model: nn.Module, x) -> dict[str, int]:
    _, report = rewrite.apply(model, [], example_inputs=x, return_report=True)
    return report.nodes_after


def rel_error(a, b) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max() / b.detach().double().abs().max())


# -- each construct fx refuses, through auto -------------------------------------------------------------
@FEW
@given(cin=st.sampled_from([2, 4]), cout=st.sampled_from([3, 6]), k=st.sampled_from([3, 5]),
       size=st.integers(7, 10), seed=st.integers(0, 100))
def test_dbb_block_as_written_fuses_to_one_kxk_conv(cin, cout, k, size, seed):
    torch.manual_seed(seed)
    block = randomize_bn(DiverseBranchBlock(cin, cout, k), seed=seed).eval()
    x = torch.randn(2, cin, size, size)
    with pytest.raises(rewrite.TraceError):
        rewrite.apply(block, ["fuse_branches"], example_inputs=x, capture="fx")
    result = check_pass("fuse_branches", block, x)
    convs = [m for m in result.model.modules() if isinstance(m, nn.Conv2d)]
    # one KxK conv, as DBB's own switch_to_deploy gives: nothing else computes
    assert len(convs) == 1 and convs[0].weight.shape == (cout, cin, k, k) and convs[0].padding == (k // 2, k // 2)
    assert result.report.nodes_after == {"conv": 1}, result.report.nodes_after
    assert "torch.export" in result.report.capture


def test_dbb_grouped_block_fuses_to_one_conv_in_float64_too():
    block = randomize_bn(DiverseBranchBlock(4, 4, 3, groups=2), seed=3).eval()
    x = torch.randn(1, 4, 8, 8)
    result = check_pass("fuse_branches", block, x)
    assert result.report.nodes_after == {"conv": 1}
    check_pass("fuse_branches", block, x.double(), dtype=torch.float64)  # at 1e-10


class BorderThen(nn.Module):
    """1x1 conv -> BN-and-pad -> an unpadded KxK conv (DBB's 1x1 -> KxK branch on its own)."""

    def __init__(self, c=4, pad=1, k=3, shifted=0.0):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 1, bias=False)
        self.bn = BNAndPad(c, pad)
        self.conv2 = nn.Conv2d(c, c, k)
        self.shifted = shifted

    def forward(self, x):
        y = self.conv1(x)
        if self.shifted:
            y = y - 0.0  # a plain step keeps the order of ops the same
        return self.conv2(self.bn(y))


@FEW
@given(pad=st.integers(1, 2), c=st.sampled_from([2, 5]), size=st.integers(5, 8), seed=st.integers(0, 50))
def test_bn_and_pad_is_a_per_channel_pad_and_moves_into_the_1x1(pad, c, size, seed):
    torch.manual_seed(seed)
    model = randomize_bn(BorderThen(c, pad), seed=seed).eval()
    x = torch.randn(2, c, size, size)
    assert kinds(model, x).get("pad") == 1  # four border writes read as one pad with per-channel values
    result = check_pass("fuse_branches", model, x)
    assert result.report.nodes_after == {"conv": 1}


def test_a_border_that_is_not_the_bn_shift_is_left_with_the_reason():
    class WrongBorder(BNAndPad):
        def forward(self, x):
            out = F.pad(self.bn(x), [1] * 4)
            value = (self.bn.bias.detach() + 1.0).view(1, -1, 1, 1)  # not the BN's shift
            out[:, :, 0:1, :] = value
            out[:, :, -1:, :] = value
            out[:, :, :, 0:1] = value
            out[:, :, :, -1:] = value
            return out

    model = nn.Sequential(nn.Conv2d(3, 3, 1, bias=False), WrongBorder(3, 1), nn.Conv2d(3, 3, 3))
    model = randomize_bn(model, seed=1).eval()
    x = torch.randn(2, 3, 6, 6)
    out, report = rewrite.apply(model, ["fuse_branches"], example_inputs=x, verify=True, return_report=True)
    reasons = [r.reason for r in report["fuse_branches"].result.refused]
    assert any("is not what" in r and "zero padding" in r for r in reasons), reasons
    assert report.nodes_after.get("pad") == 1 and report.nodes_after.get("conv") == 2  # the BN folds; the pad stays
    assert rel_error(out(x), model(x)) <= 1e-6


def test_a_partly_written_border_stays_slices_and_concats():
    class TopOnly(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)
            self.value = nn.Parameter(torch.randn(3))

        def forward(self, x):
            out = F.pad(self.conv(x), [1] * 4)
            out[:, :, 0:1, :] = self.value.view(1, -1, 1, 1)  # the other three sides keep zeros
            return out

    model = TopOnly().eval()
    x = torch.randn(2, 3, 5, 5)
    found = kinds(model, x)
    assert "pad" in found and "concat" in found  # the write is a concat along H of the border row and the rest
    out = rewrite.apply(model, ["fuse_branches", "fold_bn"], example_inputs=x, verify=True)
    assert rel_error(out(x), model(x)) <= 1e-6


@FEW
@given(channels=st.sampled_from([4, 8]), part=st.integers(1, 3), seed=st.integers(0, 50))
def test_in_place_channel_add_becomes_slices_and_a_concat(channels, part, seed):
    model = randomize_bn(ChannelAdd(channels, part), seed=seed).eval()
    x = torch.randn(2, channels, 6, 6)
    found = kinds(model, x)
    assert found.get("slice", 0) >= 2 and found.get("concat") == 1, found
    result = check_pass("fold_bn", model, x)
    assert "batch_norm" not in result.report.nodes_after


@FEW
@given(size=st.integers(7, 12), k=st.sampled_from([3, 5]), stride=st.sampled_from([1, 2]), seed=st.integers(0, 50))
def test_shape_dependent_padding_conv_folds(size, k, stride, seed):
    model = randomize_bn(ShapeChecked(3, 6, k, stride), seed=seed).eval()
    x = torch.randn(2, 3, size, size)
    result = check_pass("fold_bn", model, x)
    assert "batch_norm" not in result.report.nodes_after


@FEW
@given(cin=st.sampled_from([2, 4]), cout=st.sampled_from([3, 6]), seed=st.integers(0, 50))
def test_weight_times_mask_and_sigmoid_scales_fold_into_one_conv(cin, cout, seed):
    torch.manual_seed(seed)
    model = randomize_bn(MaskedWeight(cin, cout), seed=seed).eval()
    x = torch.randn(2, cin, 7, 7)
    result = check_pass("fuse_branches", model, x)
    assert result.report.nodes_after == {"conv": 1}
    check_pass("fuse_branches", model, x.double(), dtype=torch.float64)


@pytest.mark.parametrize("cin,cout,k", [(3, 6, 3), (4, 2, 1)])
def test_weight_standardized_in_forward_is_a_constant_the_bn_folds_into(cin, cout, k):
    # F.batch_norm of the weight without running statistics (NFNet's ScaledStdConv) writes nothing
    model = randomize_bn(StandardizedConvBN(cin, cout, k), seed=k).eval()
    x = torch.randn(2, cin, 7, 7)
    assert check_pass("fold_bn", model, x).report.nodes_after == {"conv": 1}  # traced by fx
    check_pass("fold_bn", model, x.double(), dtype=torch.float64)
    out, report = rewrite.apply(model, ["fold_bn"], example_inputs=x, capture="export", return_report=True)
    assert report.nodes_after == {"conv": 1}
    assert rel_error(out(x), model(x)) <= 1e-5


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("seed", [0, 1])
def test_step_functions_of_parameters_fold_as_the_model_computes_them(capture, seed):
    # round / comparisons evaluated in float64 would flip weights sitting on a tie or at the threshold
    model = randomize_bn(FakeQuantizedWeight(seed=seed), seed=seed).eval()
    x = torch.randn(2, 4, 8, 8)
    out = rewrite.apply(model, ["fold_bn"], example_inputs=x, capture=capture)
    with torch.no_grad():
        assert rel_error(out(x), model(x)) <= 1e-5


def test_module_built_inside_forward_is_captured_and_named_when_fx_alone_is_asked():
    model = randomize_bn(PoolBuiltInForward(), seed=0).eval()
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(rewrite.TraceError) as err:
        rewrite.apply(model, ["fold_bn"], example_inputs=x, capture="fx")
    text = str(err.value)
    assert "<AvgPool2d built inside forward>" in text and "written_blocks.py" in text and "nn.AvgPool2d(2)" in text
    assert "module '?'" not in text and "fx_trace.py" not in text
    result = check_pass("fold_bn", model, x)
    assert "batch_norm" not in result.report.nodes_after


def test_parameter_expressions_fold_on_the_fx_path_too():
    class Reparam(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 3, 3, 3))
            self.register_buffer("mask", (torch.rand(4, 3, 3, 3) > 0.5).float())
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(F.conv2d(x, self.weight * self.mask, padding=1))

    model = randomize_bn(Reparam(), seed=2).eval()
    x = torch.randn(2, 3, 6, 6)
    out, report = rewrite.apply(model, ["fold_bn"], example_inputs=x, capture="fx", return_report=True)
    assert report.capture == "" and report.nodes_after == {"conv": 1}
    assert rel_error(out(x), model(x)) <= 1e-6


# -- capture options and errors -----------------------------------------------------------------------
def test_neither_path_captures_one_trace_error_names_each():
    model = ValueDependent().eval()
    with pytest.raises(rewrite.TraceError) as err:
        rewrite.apply(model, ["fold_bn"], example_inputs=torch.randn(1, 3, 8, 8))
    text = str(err.value)
    assert "symbolic_trace:" in text and "torch.export:" in text
    assert text.count("written_blocks.py") >= 2 and text.count("y.sum() > 0") >= 2
    assert "module '<root>' (ValueDependent)" in text


def test_export_error_names_the_submodule_that_failed():
    model = nn.Sequential(nn.Conv2d(3, 3, 1), ValueDependent()).eval()
    with pytest.raises(rewrite.TraceError) as err:
        rewrite.apply(model, ["fold_bn"], example_inputs=torch.randn(1, 3, 8, 8), capture="export")
    assert "module '1' (ValueDependent)" in str(err.value)


def test_auto_does_not_export_what_fx_traces():
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), seed=0).eval()
    x = torch.randn(1, 3, 8, 8)
    out, report = rewrite.apply(model, ["fold_bn"], example_inputs=x, return_report=True)
    assert report.capture == "" and "capture" not in str(report).splitlines()[0]
    assert not any("aten" in str(n.target) for n in out.graph.nodes)


def test_auto_without_example_inputs_says_how_to_fall_back():
    with pytest.raises(rewrite.TraceError, match="pass example_inputs"):
        rewrite.apply(ShapeChecked().eval(), ["fold_bn"])


def test_capture_is_checked():
    model = nn.Conv2d(3, 3, 1)
    with pytest.raises(rewrite.RewriteError, match="did you mean 'export'"):
        rewrite.apply(model, ["fold_bn"], example_inputs=torch.randn(1, 3, 4, 4), capture="exprot")
    with pytest.raises(rewrite.RewriteError, match="needs example_inputs"):
        rewrite.apply(model, ["fold_bn"], capture="export")


def test_export_path_on_a_traceable_model_matches_the_fx_path_and_keeps_names():
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1)), seed=0)
    model = model.eval()
    x = torch.randn(2, 3, 8, 8)
    by_fx = rewrite.apply(model, ["fold_bn"], example_inputs=x, capture="fx")
    by_export, report = rewrite.apply(model, ["fold_bn"], example_inputs=x, capture="export", return_report=True)
    assert "capture='export'" in report.capture
    assert torch.allclose(by_fx(x), by_export(x), rtol=0, atol=1e-6)
    assert "3.weight" in dict(by_export.named_parameters())  # the untouched conv keeps its name


def test_export_leaves_the_model_untouched_even_when_forward_caches():
    class Caching(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 3), nn.BatchNorm2d(3)
            self.cache = {}

        def forward(self, x):
            if x.shape[-1] not in self.cache:  # export runs this on the real module
                self.cache[x.shape[-1]] = torch.ones(1)
            return self.bn(self.conv(x)) * self.cache[x.shape[-1]]

    model = randomize_bn(Caching(), seed=0).eval()
    before = state_snapshot(model)
    rewrite.apply(model, ["fold_bn"], example_inputs=torch.randn(1, 3, 6, 6), capture="export")
    assert_same_state(before, model)
    assert model.cache == {}


# -- ExportedProgram in and out ----------------------------------------------------------------------
def test_exported_program_round_trip(tmp_path):
    block = randomize_bn(DiverseBranchBlock(3, 4, 3), seed=5).eval()
    x = torch.randn(2, 3, 8, 8)
    program = torch.export.export(block, (x,))
    before = {k: v.clone() for k, v in program.state_dict.items()}
    out, report = rewrite.apply(program, ["fold_bn", "fuse_branches"], verify=True, return_report=True)
    assert isinstance(out, torch.export.ExportedProgram) and report.nodes_after == {"conv": 1}
    assert all(torch.equal(before[k], v) for k, v in program.state_dict.items())  # input untouched
    params = [s for s in out.graph_signature.input_specs if s.kind.name == "PARAMETER"]
    assert {s.target for s in params} == set(out.state_dict) and len(params) == 2  # one conv: weight, bias
    assert rel_error(out.module()(x), block(x)) <= 1e-5
    path = tmp_path / "fused.pt2"
    torch.export.save(out, path)
    loaded = torch.export.load(path)
    assert torch.equal(loaded.module()(x), out.module()(x))


def test_exported_program_exports_to_onnx(tmp_path):
    import onnxruntime as ort

    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()), seed=1).eval()
    x = torch.randn(1, 3, 8, 8)
    out = rewrite.apply(torch.export.export(model, (x,)), ["fold_bn"], example_inputs=x)
    path = tmp_path / "fused.onnx"
    torch.onnx.export(out, (x,), str(path), dynamo=True, verbose=False)
    session = ort.InferenceSession(str(path))
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert rel_error(torch.from_numpy(got), model(x)) <= 1e-5


def test_exported_program_keeps_untouched_parameter_names():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    x = torch.randn(1, 3, 6, 6)
    out = rewrite.apply(torch.export.export(model, (x,)), ["fold_bn"])
    assert set(out.state_dict) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert verify_torch(model, out.module(), x).ok


def test_exported_program_verify_without_inputs_draws_them():
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), seed=2).eval()
    program = torch.export.export(model, (torch.randn(2, 3, 7, 7),))
    out = rewrite.apply(program, ["fold_bn"], verify=True)
    assert rewrite.verify(program, out).ok
    assert out.module()(torch.randn(2, 3, 7, 7)).shape == (2, 4, 5, 5)
    assert copy.deepcopy(out) is not None


def test_a_buffer_forward_updates_is_not_folded():
    class ReadsStatistics(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.conv(x)) + (self.bn.running_mean * 2.0).view(1, -1, 1, 1)

    model = ReadsStatistics().train()
    x = torch.randn(2, 3, 6, 6)
    out = rewrite.apply(model, ["cleanup"], example_inputs=x, capture="export")
    reference = copy.deepcopy(model)
    for _ in range(2):  # the statistics move between calls: the rewrite must read them as they are
        assert torch.allclose(out(x), reference(x), rtol=0, atol=1e-6)


def test_in_place_layers_and_adds_through_export():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.act = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True)

        def forward(self, x):
            out = self.act(self.bn(self.conv(x)))
            out += x
            return self.act(out)

    model = randomize_bn(Block(), seed=4).eval()
    x = torch.randn(2, 4, 6, 6)
    out, report = rewrite.apply(model, ["fold_bn"], example_inputs=x, capture="export", return_report=True)
    assert report.nodes_after == {"conv": 1, "relu": 2, "add": 1}
    assert verify_torch(model, out, x).ok


class _UpdatesABuffer(nn.Module):
    """A running average updated in forward through a view (or `.data`), read after: a stateful forward."""

    def __init__(self, through_data: bool):
        super().__init__()
        self.conv, self.through_data = nn.Conv2d(3, 4, 3), through_data
        self.register_buffer("ema", torch.ones(4))

    def forward(self, x):
        y = self.conv(x)
        if self.through_data:
            self.ema.data.mul_(0.5).add_(y.mean((0, 2, 3)).detach() * 0.5)
        else:
            self.ema.view(-1).mul_(0.5)
        return y * self.ema.reshape(1, -1, 1, 1)


@pytest.mark.parametrize("through_data", [False, True])
def test_a_forward_that_writes_its_buffers_is_not_frozen_by_fx_nor_changed_by_capture(through_data):
    x = torch.randn(2, 3, 8, 8)
    model = _UpdatesABuffer(through_data).eval()
    with pytest.raises(rewrite.TraceError, match="writes buffer"):
        rewrite.apply(model, ["cleanup"], example_inputs=x, capture="fx")
    assert torch.equal(model.ema, torch.ones(4))  # the capture left the user's buffer as it was
    try:
        out = rewrite.apply(model, ["cleanup"], example_inputs=x)  # auto: torch.export keeps the update
    except rewrite.TraceError as err:  # or both paths refuse, each with its reason
        assert "writes buffer" in str(err) and "torch.export" in str(err)
        return
    finally:
        assert torch.equal(model.ema, torch.ones(4))
    reference = _UpdatesABuffer(through_data).eval()
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        for _ in range(3):  # the state moves the same way call after call
            assert rel_error(out(x), reference(x)) <= 1e-6
