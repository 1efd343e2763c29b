"""fuse_branches on random multi-branch blocks: equivalence (float32 and float64), idempotence, near misses."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from rewrite.testing import check_pass, randomize_bn

pytestmark = pytest.mark.usefixtures("one_thread")


CONV = {1: nn.Conv1d, 2: nn.Conv2d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}
POOL = {1: nn.AvgPool1d, 2: nn.AvgPool2d}


class Scaled(nn.Module):
    """A branch times a factor: a Python number, a scalar parameter or a per-channel buffer."""

    def __init__(self, branch: nn.Module, kind: str, channels: int, dims: int, seed: int):
        super().__init__()
        self.branch, self.kind = branch, kind
        g = torch.Generator().manual_seed(seed)
        if kind == "parameter":
            self.factor = nn.Parameter(torch.randn((), generator=g))
        elif kind == "channel":
            self.register_buffer("factor", torch.randn(1, channels, *([1] * dims), generator=g))

    def forward(self, x):
        if self.kind == "number":
            return 0.75 * self.branch(x)
        return self.branch(x) * self.factor


class Sum(nn.Module):
    """Branches of one input added together, optionally plus a constant (MobileOne's `0 + ...`)."""

    def __init__(self, branches, constant: float | None = None):
        super().__init__()
        self.branches = nn.ModuleList(branches)
        self.constant = constant

    def forward(self, x):
        out = self.branches[0](x)
        for b in self.branches[1:]:
            out = out + b(x)
        if self.constant is not None:
            out = out + self.constant
        return out


def _seq(*modules):
    return nn.Sequential(*modules) if len(modules) > 1 else modules[0]


@st.composite
def branch_blocks(draw):
    """A random multi-branch block whose branches line up, and an input for it."""
    dims = draw(st.sampled_from([2, 1]))
    residual = draw(st.booleans())  # shaped so that identity, BN and avg-pool branches fit
    groups = draw(st.integers(1, 3))
    in_per_group = draw(st.integers(1, 3))
    # in_per_group == 1 and out_per_group > 1: a depthwise conv with a channel multiplier
    out_per_group = in_per_group if residual else draw(st.integers(1, 3))
    cin, cout = groups * in_per_group, groups * out_per_group
    kernel = draw(st.sampled_from([3, 5, 1] if residual else [3, 2, 4, 1]))
    dilation = draw(st.integers(1, 2)) if kernel > 1 else 1
    stride = 1 if residual else draw(st.integers(1, 2))
    reach = dilation * (kernel - 1)
    padding = reach // 2 if residual else draw(st.integers(max(0, (reach - 1) // 2), reach // 2 + 1))
    spare = 2 * padding - reach  # pad_before + pad_after - reach, shared by every branch
    centred = kernel % 2 == 1 and spare >= 0 and spare % 2 == 0  # a 1-wide kernel fits on the grid
    identity_ok = cin == cout and stride == 1 and spare == 0 and kernel % 2 == 1
    kinds = ["kxk"] + (["1x1"] if centred else []) + (["asym"] if centred and dims == 2 and kernel > 1 else []) \
        + (["identity", "bn"] if identity_ok else []) + (["avg"] if identity_ok and dilation == 1 else [])
    chosen = draw(st.lists(st.sampled_from(kinds), min_size=1, max_size=4))
    seed = draw(st.integers(0, 2 ** 16))
    torch.manual_seed(seed)

    def conv(k, pad):
        return CONV[dims](cin, cout, k, stride, pad, dilation if max(k if isinstance(k, tuple) else (k,)) > 1 else 1,
                          groups, bias=draw(st.booleans()))

    branches = [_seq(conv(kernel, padding), BN[dims](cout))]
    for i, kind in enumerate(chosen):
        if kind == "kxk":
            b = _seq(conv(kernel, padding), *([BN[dims](cout)] if draw(st.booleans()) else []))
        elif kind == "1x1":
            b = _seq(conv(1, spare // 2), *([BN[dims](cout)] if draw(st.booleans()) else []))
        elif kind == "asym":
            b = _seq(conv((kernel, 1), (padding, spare // 2)), BN[dims](cout))
        elif kind == "identity":
            b = nn.Identity()
        elif kind == "bn":
            b = BN[dims](cout)
        else:
            b = POOL[dims](kernel, 1, padding, count_include_pad=True)
        scale = draw(st.sampled_from([None, None, "number", "parameter", "channel"]))
        branches.append(Scaled(b, scale, cout, dims, seed + i) if scale else b)
    order = draw(st.permutations(range(len(branches))))
    block = Sum([branches[i] for i in order], draw(st.sampled_from([None, 0.0, 0.5])))
    randomize_bn(block.eval(), seed)
    size = reach + 1 + draw(st.integers(0, 5))
    x = torch.randn(2, cin, *([size] * dims), generator=torch.Generator().manual_seed(seed))
    return block, x


def _only_one_conv(result):
    after = result.report.nodes_after
    assert after.get("conv") == 1 and "add" not in after and "batch_norm" not in after, after


@settings(max_examples=30, deadline=None)
@given(branch_blocks())
def test_parallel_branches_fuse_exactly_float32(block_and_input):
    block, x = block_and_input
    result = check_pass("fuse_branches", block, x)
    _only_one_conv(result)
    assert result.max_rel <= 1e-5


@settings(max_examples=15, deadline=None)
@given(branch_blocks())
def test_parallel_branches_fuse_exactly_float64(block_and_input):
    block, x = block_and_input
    result = check_pass("fuse_branches", block, x, dtype=torch.float64)
    _only_one_conv(result)
    assert result.max_rel <= 1e-10


# -- cascades ---------------------------------------------------------------------------------------
class Cascade(nn.Module):
    def __init__(self, first, second, middle=None):
        super().__init__()
        self.first, self.second, self.middle = first, second, middle or nn.Identity()

    def forward(self, x):
        return self.second(self.middle(self.first(x)))


@st.composite
def conv_cascades(draw):
    """conv -> (BN) -> conv with random kernels, strides, dilations and groups; the second unpadded,
    or padded after a bias-free, unpadded 1x1 (the only first conv that is zero past the border)."""
    dims = draw(st.integers(1, 2))
    groups = draw(st.sampled_from([1, 2]))
    cin, mid, cout = (groups * draw(st.integers(1, 3)) for _ in range(3))
    padded_second = draw(st.booleans())
    k1 = 1 if padded_second else draw(st.integers(1, 3))
    s1 = draw(st.integers(1, 2))
    d1 = draw(st.integers(1, 2)) if k1 > 1 else 1
    p1 = 0 if padded_second else draw(st.integers(0, d1 * (k1 - 1) // 2))
    k2 = draw(st.integers(1, 3))
    d2 = draw(st.integers(1, 2)) if k2 > 1 else 1
    p2 = draw(st.integers(1, d2 * (k2 - 1) // 2 + 1)) if padded_second else 0
    g2 = draw(st.sampled_from([1, groups]))
    seed = draw(st.integers(0, 2 ** 16))
    torch.manual_seed(seed)
    first = CONV[dims](cin, mid, k1, s1, p1, d1, groups, bias=not padded_second)
    middle = None if padded_second or not draw(st.booleans()) else BN[dims](mid)
    second = CONV[dims](mid, cout, k2, draw(st.integers(1, 2)), p2, d2, g2, bias=draw(st.booleans()))
    model = randomize_bn(Cascade(first, second, middle).eval(), seed)
    size = (d1 * (k1 - 1) + 1) + s1 * (d2 * (k2 - 1)) + draw(st.integers(0, 4))
    return model, torch.randn(2, cin, *([size] * dims), generator=torch.Generator().manual_seed(seed))


@settings(max_examples=20, deadline=None)
@given(conv_cascades())
def test_conv_cascades_fuse_exactly(model_and_input):
    model, x = model_and_input
    result = check_pass("fuse_branches", model, x, options={"allow_costlier": True})
    assert result.report.nodes_after.get("conv") == 1, result.report.nodes_after
    check_pass("fuse_branches", model, x, dtype=torch.float64, options={"allow_costlier": True})


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 6), st.integers(1, 8), st.integers(1, 6), st.booleans(), st.integers(0, 2 ** 16))
def test_linear_cascade_fuses_exactly(cin, mid, cout, with_bn, seed):
    torch.manual_seed(seed)
    model = randomize_bn(Cascade(nn.Linear(cin, mid), nn.Linear(mid, cout),
                                 nn.BatchNorm1d(mid) if with_bn else None).eval(), seed)
    x = torch.randn(3, cin)
    result = check_pass("fuse_branches", model, x, options={"allow_costlier": True})
    assert result.report.nodes_after.get("linear") == 1
    check_pass("fuse_branches", model, x, dtype=torch.float64, options={"allow_costlier": True})


def test_costlier_cascade_is_refused_unless_allowed():
    """A bottleneck (1x1 96->24 then 1x1 24->144) merged would cost far more multiply-adds."""
    model = Cascade(nn.Conv2d(96, 24, 1), nn.Conv2d(24, 144, 1)).eval()
    x = torch.randn(1, 96, 8, 8)
    check_pass("fuse_branches", model, x, refuses="multiply-adds")
    check_pass("fuse_branches", model, x, options={"allow_costlier": True})


# -- concatenation ----------------------------------------------------------------------------------
class Concat(nn.Module):
    def __init__(self, branches, tail=False):
        super().__init__()
        self.branches = nn.ModuleList(branches)
        self.tail = tail

    def forward(self, x):
        parts = [b(x) for b in self.branches]
        if self.tail:
            parts.append(torch.relu(x[:, :1]))  # an operand of another input stays as it is
        return torch.cat(parts, 1)


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 2), st.integers(1, 4), st.lists(st.tuples(st.integers(1, 4), st.sampled_from([1, 3]),
                                                                 st.booleans()), min_size=2, max_size=4),
       st.integers(1, 2), st.booleans(), st.integers(0, 2 ** 16))
def test_concatenated_branches_fuse_exactly(dims, cin, specs, stride, tail, seed):
    torch.manual_seed(seed)
    branches = [_seq(CONV[dims](cin, cout, k, stride, k // 2), *([BN[dims](cout)] if bn else []))
                for cout, k, bn in specs]
    model = randomize_bn(Concat(branches, tail and stride == 1).eval(), seed)
    x = torch.randn(2, cin, *([7] * dims))
    result = check_pass("fuse_branches", model, x, options={"allow_costlier": True})
    assert result.report.nodes_after.get("conv") == 1
    check_pass("fuse_branches", model, x, dtype=torch.float64, options={"allow_costlier": True})


# -- near misses: left alone, with the reason ---------------------------------------------------------
class Lambda(nn.Module):
    def __init__(self, fn, **modules):
        super().__init__()
        self.fn = fn
        for k, v in modules.items():
            setattr(self, k, v)

    def forward(self, x):
        return self.fn(self, x)


def _x(c=4, size=9):
    return torch.randn(2, c, size, size, generator=torch.Generator().manual_seed(1))


@settings(max_examples=10, deadline=None)
@given(st.integers(1, 4), st.sampled_from([1, 3]))
def test_nonlinear_branch_is_refused(channels, kernel):
    model = Lambda(lambda m, x: torch.relu(m.a(x)) + m.b(x),
                   a=nn.Conv2d(channels, channels, kernel, padding=kernel // 2), b=nn.Conv2d(channels, channels, 3,
                                                                                          padding=1)).eval()
    check_pass("fuse_branches", model, _x(channels), refuses="not linear")


def test_input_dependent_branch_weights_are_refused():
    """Selective-kernel style: each branch scaled by attention computed from the input."""
    def forward(m, x):
        attention = torch.sigmoid(x.mean((2, 3), keepdim=True))
        return m.a(x) * attention + m.b(x) * (1 - attention)
    model = Lambda(forward, a=nn.Conv2d(4, 4, 3, padding=1), b=nn.Conv2d(4, 4, 1)).eval()
    check_pass("fuse_branches", model, _x(), refuses="input-dependent")


def test_branch_used_elsewhere_is_refused():
    def forward(m, x):
        a = m.a(x)
        return a + m.b(x), a * 2
    model = Lambda(forward, a=nn.Conv2d(4, 4, 3, padding=1), b=nn.Conv2d(4, 4, 1)).eval()
    check_pass("fuse_branches", model, _x(), refuses="also read by")


def test_padding_modes_that_differ_are_refused():
    model = Lambda(lambda m, x: m.a(x) + m.b(x), a=nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"),
                   b=nn.Conv2d(4, 4, 3, padding=1)).eval()
    check_pass("fuse_branches", model, _x(), refuses="pad differently")


def test_same_non_zero_padding_mode_fuses():
    """Reflect padding in every padded branch: a zero-padded 1x1 reads no border, so this is exact."""
    model = Lambda(lambda m, x: m.a(x) + m.b(x) + x, a=nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"),
                   b=nn.Conv2d(4, 4, 1)).eval()
    assert check_pass("fuse_branches", model, _x()).report.nodes_after.get("conv") == 1


def test_different_dilations_are_refused():
    model = Lambda(lambda m, x: m.a(x) + m.b(x), a=nn.Conv2d(4, 4, 3, padding=2, dilation=2),
                   b=nn.Conv2d(4, 4, 3, padding=1)).eval()
    check_pass("fuse_branches", model, _x(), refuses="dilations")


def test_side_branch_off_the_dilated_grid_is_refused():
    """A 2-tap kernel with dilation 2 has no centre tap for a 1x1 branch."""
    model = Lambda(lambda m, x: m.a(x) + m.b(x), a=nn.Conv2d(4, 4, 2, padding=1, dilation=2),
                   b=nn.Conv2d(4, 4, 1)).eval()
    check_pass("fuse_branches", model, _x(), refuses="between the taps")


def test_avg_pool_without_counting_padding_is_refused():
    model = Lambda(lambda m, x: m.a(x) + m.p(x), a=nn.Conv2d(4, 4, 3, padding=1),
                   p=nn.AvgPool2d(3, 1, 1, count_include_pad=False)).eval()
    check_pass("fuse_branches", model, _x(), refuses="count_include_pad")


def test_training_mode_bn_branch_is_refused():
    model = Lambda(lambda m, x: m.a(x) + m.bn(x), a=nn.Conv2d(4, 4, 3, padding=1), bn=nn.BatchNorm2d(4))
    model.eval()
    model.bn.train()
    check_pass("fuse_branches", model, _x(), refuses="batch statistics")


def test_denser_merge_is_refused_unless_allowed():
    """A depthwise 3x3 plus a dense 1x1 would need a dense 3x3."""
    model = Lambda(lambda m, x: m.a(x) + m.b(x), a=nn.Conv2d(8, 8, 3, padding=1, groups=8),
                   b=nn.Conv2d(8, 8, 1)).eval()
    check_pass("fuse_branches", model, _x(8), refuses="multiply-adds")
    check_pass("fuse_branches", model, _x(8), options={"allow_costlier": True})


def test_padded_cascade_seeing_a_bias_is_refused():
    model = Cascade(nn.Conv2d(4, 6, 1), nn.Conv2d(6, 4, 3, padding=1)).eval()
    check_pass("fuse_branches", model, _x(), refuses="bias", options={"allow_costlier": True})


def test_padded_cascade_after_a_padded_kxk_is_refused():
    model = Cascade(nn.Conv2d(4, 6, 3, padding=1, bias=False), nn.Conv2d(6, 4, 3, padding=1)).eval()
    check_pass("fuse_branches", model, _x(), refuses="not zero", options={"allow_costlier": True})


def test_cascade_whose_middle_is_read_elsewhere_is_refused():
    def forward(m, x):
        y = m.a(x)
        return m.b(y), y
    model = Lambda(forward, a=nn.Conv2d(4, 8, 1), b=nn.Conv2d(8, 4, 1)).eval()
    check_pass("fuse_branches", model, _x(), refuses="also read by")


def test_branches_of_other_inputs_stay_and_the_input_is_untouched():
    """Only the branches of one input merge; a term of another input stays a term of the sum."""
    def forward(m, x):
        y = torch.tanh(x)
        return m.a(x) + m.b(y) * 0.5 + m.c(x) * 2.0
    model = Lambda(forward, a=nn.Conv2d(4, 4, 3, padding=1), b=nn.Conv2d(4, 4, 1), c=nn.Conv2d(4, 4, 1)).eval()
    result = check_pass("fuse_branches", model, _x())
    after = result.report.nodes_after
    # the scaled lone conv b(y) * 0.5 gets its factor folded in: no mul is left
    assert after.get("conv") == 2 and after.get("add") == 1 and after.get("mul") is None, after


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 2), st.integers(0, 2), st.integers(1, 2),
       st.integers(0, 2 ** 16))
def test_padded_cascade_fuses_only_where_the_border_stays_zero(k1, s1, d1, p1, p2, seed):
    """Whatever the first conv, a fused padded cascade is exact; otherwise it is refused with the reason."""
    torch.manual_seed(seed)
    model = Cascade(nn.Conv1d(3, 4, k1, s1, p1, d1, bias=False), nn.Conv1d(4, 3, 3, padding=p2)).eval()
    x = torch.randn(2, 3, d1 * (k1 - 1) + 3 + s1)
    result = check_pass("fuse_branches", model, x, expect_rewrite=False, options={"allow_costlier": True})
    refused = [r.reason for r in result.report["fuse_branches"].result.refused]
    assert result.report.nodes_after.get("conv") == 1 or any("not zero" in r for r in refused), refused


@settings(max_examples=20, deadline=None)
@given(st.sampled_from([3, 5]), st.integers(0, 4), st.integers(1, 2), st.integers(1, 2), st.integers(1, 3),
       st.integers(0, 2 ** 16))
def test_asymmetric_and_cropping_branches_fuse_exactly(kernel, padding, stride, dilation, channels, seed):
    """ACNet's KxK + 1xK + Kx1, and a smaller square branch when the padding is below K//2 (cropping)."""
    torch.manual_seed(seed)
    padding = min(padding, dilation * (kernel - 1))
    half = dilation * (kernel - 1) // 2
    branches = [_seq(nn.Conv2d(channels, channels, kernel, stride, padding, dilation), nn.BatchNorm2d(channels))]
    if padding >= half:  # the 1-wide axis of 1xK / Kx1 is padded by what is left over
        branches += [_seq(nn.Conv2d(channels, channels, (1, kernel), stride, (padding - half, padding), dilation),
                          nn.BatchNorm2d(channels)),
                     _seq(nn.Conv2d(channels, channels, (kernel, 1), stride, (padding, padding - half), dilation),
                          nn.BatchNorm2d(channels))]
    if padding >= dilation:  # a (K-2)x(K-2) branch one dilated tap in from each side
        branches.append(nn.Conv2d(channels, channels, kernel - 2, stride, padding - dilation, dilation))
    if len(branches) == 1:
        branches.append(nn.Conv2d(channels, channels, kernel, stride, padding, dilation, bias=False))
    block = randomize_bn(Sum(branches).eval(), seed)
    x = torch.randn(2, channels, 11, 10, generator=torch.Generator().manual_seed(seed))
    result = check_pass("fuse_branches", block, x)
    _only_one_conv(result)
