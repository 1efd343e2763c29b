"""Issue 11, branch fusion reach: subtraction, zero addends, cropped branches, cost-first cascade refusal.

Each construct is a small module of our own: equivalent in float32 and float64 (check_pass), reduced as far
as the method's own conversion goes, idempotent, and a near miss left alone with its reason.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings, strategies as st

import rewrite
from rewrite.testing import check_pass, randomize_bn

pytestmark = pytest.mark.usefixtures("one_thread")


def _ops(model, x, passes=("fuse_branches",)):
    _, report = rewrite.apply(model, list(passes), example_inputs=x, return_report=True)
    return dict(report.nodes_after), report


def _exact_both(model, x, **kw):
    """check_pass in float32 and float64; the float64 rewrite at 1e-10."""
    out = check_pass("fuse_branches", model, x, **kw)
    assert check_pass("fuse_branches", model, x, dtype=torch.float64, **kw).max_rel <= 1e-10
    return out


# -- subtraction: FastViT's RepMixer, EfficientViM's x + s * (dw(x) - x) ----------------------------------
class RepMixerLike(nn.Module):
    """x + ls * (mixer(x) - norm(x)): mixer a KxK conv + BN, norm a BN (FastViT's RepMixer)."""

    def __init__(self, channels: int, kernel: int, depthwise: bool, per_channel: bool, method: str, seed: int):
        super().__init__()
        groups = channels if depthwise else 1
        self.mixer = nn.Sequential(nn.Conv2d(channels, channels, kernel, padding=kernel // 2, groups=groups,
                                             bias=False), nn.BatchNorm2d(channels))
        self.norm = nn.BatchNorm2d(channels)
        g = torch.Generator().manual_seed(seed)
        shape = (channels, 1, 1) if per_channel else ()
        self.ls = nn.Parameter(torch.randn(shape, generator=g))
        self.method = method
        randomize_bn(self, seed)

    def forward(self, x):
        a, b = self.mixer(x), self.norm(x)
        diff = {"operator": lambda: a - b, "torch": lambda: torch.sub(a, b), "method": lambda: a.sub(b)}[self.method]()
        return x + self.ls * diff


class ScaledDifference(nn.Module):
    """x + s * (dw(x) - x) (EfficientViM), s a per-channel parameter."""

    def __init__(self, channels: int, kernel: int, seed: int):
        super().__init__()
        self.dw = nn.Conv2d(channels, channels, kernel, padding=kernel // 2, groups=channels)
        self.s = nn.Parameter(torch.randn(1, channels, 1, 1, generator=torch.Generator().manual_seed(seed)))

    def forward(self, x):
        return x + self.s * (self.dw(x) - x)


@settings(max_examples=12, deadline=None)
@given(channels=st.integers(1, 6), kernel=st.sampled_from([1, 3, 5]), depthwise=st.booleans(),
       per_channel=st.booleans(), method=st.sampled_from(["operator", "torch", "method"]), seed=st.integers(0, 999),
       size=st.integers(4, 9))
def test_repmixer_fuses_to_one_conv(channels, kernel, depthwise, per_channel, method, seed, size):
    model = RepMixerLike(channels, kernel, depthwise, per_channel, method, seed).eval()
    x = torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(seed))
    _exact_both(model, x)
    ops, _ = _ops(model, x)
    assert ops == {"conv": 1}, ops  # as timm's RepMixer.reparameterize: one conv


@settings(max_examples=8, deadline=None)
@given(channels=st.integers(1, 6), kernel=st.sampled_from([3, 5]), seed=st.integers(0, 999))
def test_scaled_difference_with_the_input_fuses(channels, kernel, seed):
    model = ScaledDifference(channels, kernel, seed).eval()
    x = torch.randn(2, channels, 7, 7, generator=torch.Generator().manual_seed(seed))
    _exact_both(model, x)
    assert _ops(model, x)[0] == {"conv": 1}


class ConstantDifference(nn.Module):
    def forward(self, x):
        return 1.5 - self.conv(x) - 0.25

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)


def test_subtracted_constants_become_the_bias():
    model = ConstantDifference().eval()
    x = torch.randn(2, 3, 6, 6)
    _exact_both(model, x)
    assert _ops(model, x)[0] == {"conv": 1}


class NonlinearDifference(RepMixerLike):
    def forward(self, x):
        return x + self.ls * (self.mixer(x) - torch.relu(self.norm(x)))


def test_a_difference_with_a_nonlinear_side_is_refused_with_its_reason():
    """x + ls * mixer(x) still fuse; the subtracted relu(norm(x)) stays an operand, with the reason."""
    model = NonlinearDifference(4, 3, True, True, "operator", 0).eval()
    x = torch.randn(2, 4, 6, 6)
    _exact_both(model, x)
    ops, report = _ops(model, x)
    assert ops["conv"] == 1 and ops["relu"] == 1 and ops["add"] == 1 and "sub" not in ops, ops
    reasons = " ".join(r.reason for r in report["fuse_branches"].result.refused)
    assert "relu" in reasons and "not linear" in reasons, reasons


def test_sub_is_written_back_to_onnx_and_imported_as_sub(tmp_path):
    """Sub of two tensors is a kind of its own through ONNX too; x - c stays an add of -c."""
    model = ScaledDifference(3, 3, 0).eval()
    x = torch.randn(1, 3, 6, 6)
    path = tmp_path / "m.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=False, do_constant_folding=False)
    out, report = rewrite.apply(str(path), ["fuse_branches"], return_report=True, verify=True)
    assert report.nodes_before["sub"] == 1 and dict(report.nodes_after) == {"conv": 1}
    assert [n.op_type for n in out.graph.node] == ["Conv"]


# -- a zero-branch MobileOne block: 0 + bn(x) ----------------------------------------------------------
class ZeroBranch(nn.Module):
    """MobileOne's block without conv or scale branches: `0 + bn(x)` (then an activation or nothing)."""

    def __init__(self, channels: int, zero, seed: int, act: bool):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.zero, self.act = zero, act
        randomize_bn(self, seed)

    def forward(self, x):
        out = self.zero + self.bn(x)
        return torch.relu(out) if self.act else out


@settings(max_examples=8, deadline=None)
@given(channels=st.integers(1, 6), zero=st.sampled_from([0, 0.0, -0.0]), seed=st.integers(0, 999), act=st.booleans())
def test_the_zero_operand_goes(channels, zero, seed, act):
    model = ZeroBranch(channels, zero, seed, act).eval()
    x = torch.randn(2, channels, 5, 5, generator=torch.Generator().manual_seed(seed))
    for name in ("fuse_branches", "cleanup"):
        out = check_pass(name, model, x)
        assert check_pass(name, model, x, dtype=torch.float64).max_rel <= 1e-10
        ops = dict(out.report.nodes_after)
        assert "add" not in ops and ops["batch_norm"] == 1, ops


class WideningZero(nn.Module):
    """x + zeros(1, C, 1, 1) in float64: the zero promotes a float32 x, so it must stay."""

    def __init__(self):
        super().__init__()
        self.register_buffer("zero", torch.zeros(1, 3, 1, 1, dtype=torch.float64))

    def forward(self, x):
        return x + self.zero


def test_a_zero_that_promotes_the_dtype_is_kept_with_its_reason():
    model = WideningZero()
    x = torch.randn(2, 3, 4, 4)
    check_pass("cleanup", model, x, refuses="promote")


# -- cost first: a refused cascade is refused before its kernel is composed --------------------------------
class DepthwiseThenPointwise(nn.Module):
    def __init__(self, channels: int, kernel: int):
        super().__init__()
        self.dw = nn.Conv2d(channels, channels, kernel, padding=kernel // 2, groups=channels, bias=False)
        self.pw = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        return self.pw(self.dw(x))


@pytest.mark.parametrize("channels,kernel", [(4, 3), (16, 7)])
def test_a_costlier_cascade_is_refused_without_composing_it(monkeypatch, channels, kernel):
    import importlib

    rewrite.get_pass("fuse_branches")  # the built-in passes load on first use
    forms = importlib.import_module("rewrite.passes.fuse_branches.branch_forms")

    def no_compose(*args, **kwargs):
        raise AssertionError("the kernel was composed before its cost was known")

    monkeypatch.setattr(forms, "compose", no_compose)
    model = DepthwiseThenPointwise(channels, kernel).eval()
    x = torch.randn(1, channels, 9, 9)
    result = check_pass("fuse_branches", model, x, refuses="multiply-adds")
    assert dict(result.report.nodes_after) == {"conv": 2}
    monkeypatch.undo()
    # forced, the same cascade composes, exactly
    forced = check_pass("fuse_branches", model, x, dtype=torch.float64, options={"allow_costlier": True})
    assert forced.max_rel <= 1e-10 and dict(forced.report.nodes_after) == {"conv": 1}


# -- cropped branches: ACNet with padding < k // 2 ---------------------------------------------------------
class CroppedACB(nn.Module):
    """ACNet's ACBlock with padding p < k // 2: the 1xK / Kx1 branches read the input cropped by k // 2 - p
    on the axis they do not convolve (ACNet's CropLayer, `input[:, :, :, c:-c]`)."""

    def __init__(self, cin: int, cout: int, k: int, p: int, stride: int, groups: int, seed: int):
        super().__init__()
        self.crop = k // 2 - p

        def branch(kernel, padding):
            return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, padding, groups=groups, bias=False),
                                 nn.BatchNorm2d(cout))

        self.square, self.ver, self.hor = branch(k, p), branch((k, 1), (p, 0)), branch((1, k), (0, p))
        randomize_bn(self, seed)

    def forward(self, x):
        c = self.crop
        return self.square(x) + self.ver(x[:, :, :, c:-c]) + self.hor(x[:, :, c:-c, :])


@settings(max_examples=12, deadline=None)
@given(k=st.sampled_from([3, 5, 7]), data=st.data(), stride=st.integers(1, 2), groups=st.sampled_from([1, 2]),
       per_group=st.integers(1, 3), seed=st.integers(0, 999), h=st.integers(8, 11), w=st.integers(8, 11))
def test_cropped_acnet_branches_fuse_to_one_conv(k, data, stride, groups, per_group, seed, h, w):
    p = data.draw(st.integers(0, k // 2 - 1))
    c = groups * per_group
    model = CroppedACB(c, c, k, p, stride, groups, seed).eval()
    x = torch.randn(2, c, h, w, generator=torch.Generator().manual_seed(seed))
    _exact_both(model, x)
    ops, _ = _ops(model, x)
    assert ops == {"conv": 1}, ops  # ACNet's own conversion: one KxK conv with padding p


class OneSidedCrop(nn.Module):
    """A crop on one side only, beside an unpadded 3x3: the Kx1 branch is the 3x3's right column."""

    def __init__(self):
        super().__init__()
        self.square, self.side = nn.Conv2d(3, 3, 3), nn.Conv2d(3, 3, (3, 1))

    def forward(self, x):
        return self.square(x) + self.side(x[:, :, :, 2:])


def test_a_one_sided_crop_fuses_at_the_edge_of_the_kernel():
    model = OneSidedCrop().eval()
    x = torch.randn(1, 3, 7, 8)
    _exact_both(model, x)
    assert _ops(model, x)[0] == {"conv": 1}


class CropBetweenTaps(nn.Module):
    """A dilation-2 3x3 beside a Kx1 reading a crop by an odd amount: it would sit between the taps."""

    def __init__(self, crop: tuple[int, int]):
        super().__init__()
        self.crop = crop
        self.square = nn.Conv2d(3, 3, 3, dilation=2)
        self.side = nn.Conv2d(3, 3, (3, 1), dilation=(2, 1))

    def forward(self, x):
        a, b = self.crop
        return self.square(x) + self.side(x[:, :, :, a:-b])


def test_a_crop_between_the_taps_of_a_dilated_kernel_is_refused_with_its_reason():
    x = torch.randn(1, 3, 9, 9)
    check_pass("fuse_branches", CropBetweenTaps((1, 3)).eval(), x, refuses="between the taps")
    _exact_both(CropBetweenTaps((2, 2)).eval(), x)  # an even crop sits on the centre tap


class PaddedCrop(nn.Module):
    """A Kx1 conv that pads the sides its crop cut: its zeros stand where the whole input has pixels."""

    def __init__(self):
        super().__init__()
        self.square, self.side = nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 3, (3, 1), padding=(1, 1))

    def forward(self, x):
        return self.square(x) + self.side(x[:, :, :, 1:-1])


def test_a_crop_whose_conv_pads_the_cut_side_is_not_read_as_a_smaller_padding():
    model = PaddedCrop().eval()
    x = torch.randn(1, 3, 6, 6)
    check_pass("fuse_branches", model, x, expect_rewrite=False, refuses="pads a side the crop cut")
    check_pass("fuse_branches", model, x.double(), dtype=torch.float64, expect_rewrite=False)
    assert _ops(model, x)[0] == {"conv": 2, "slice": 1, "add": 1}


class PaddedCropBesideTwo(PaddedCrop):
    """The square and a 1x1 merge; the padded crop stays apart, with its reason."""

    def __init__(self):
        super().__init__()
        self.point = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        return super().forward(x) + self.point(x)


def test_a_padded_crop_left_beside_a_merge_is_reported():
    model = PaddedCropBesideTwo().eval()
    x = torch.randn(1, 3, 6, 6)
    _exact_both(model, x)
    ops, report = _ops(model, x)
    assert ops == {"conv": 2, "slice": 1, "add": 1}
    assert any("pads a side the crop cut" in r.reason for r in report.passes[0].result.refused)


class SameCrop(nn.Module):
    """Branches that all read the same crop merge as branches of that crop (the crop stays, the sum goes)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 3, 1)

    def forward(self, x):
        y = x[:, :, 1:-1, :]
        return self.a(y) + self.b(y)


def test_branches_of_one_crop_merge_without_uncropping():
    model = SameCrop().eval()
    x = torch.randn(1, 3, 7, 7)
    _exact_both(model, x)
    assert _ops(model, x)[0] == {"slice": 1, "conv": 1}


def test_an_average_pool_after_a_conv_outside_any_sum_stays_a_pool():
    # read as a depthwise conv only where a sum can absorb the cascade (DBB's 1x1 -> average branch)
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                                       nn.AvgPool2d(3, 1, 1), nn.ReLU())).eval()
    x = torch.randn(1, 3, 8, 8)
    out, report = rewrite.apply(model, ["fuse_branches"], example_inputs=x, return_report=True)
    assert report.nodes_after.get("avg_pool") == 1 and report.nodes_after.get("conv") == 2
    assert (out(x) - model(x)).abs().max().item() <= 1e-5 * model(x).abs().max().item()
