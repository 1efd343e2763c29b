"""fuse_branches' two rules for expanded blocks: a costlier cascade absorbed by a conv of its sum, and a
lone scaled conv in a sum getting its factor folded in."""
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from rewrite.testing import check_pass, randomize_bn
from fn_module import FnModule


def _average(channels, k, stride):
    avg = nn.Conv2d(channels, channels, k, stride, groups=channels, bias=False)
    nn.init.constant_(avg.weight, 1 / k ** 2)
    return avg


@settings(max_examples=15, deadline=None)
@given(st.sampled_from([3, 5]), st.integers(1, 2), st.integers(1, 3), st.integers(0, 2 ** 16))
def test_one_by_one_then_average_beside_a_kxk_fuses_into_it(k, stride, groups, seed):
    """DBB's 1x1 (padded, BN) -> average branch costs more composed than alone, but the sum's KxK absorbs it."""
    torch.manual_seed(seed)
    c, o, p = 2 * groups, 2 * groups, k // 2
    model = randomize_bn(FnModule(lambda m, x: m.bn(m.main(x)) + m.avgbn(m.avg(m.bn1(m.pre(x)))),
                             main=nn.Conv2d(c, o, k, stride, p, groups=groups, bias=False), bn=nn.BatchNorm2d(o),
                             pre=nn.Conv2d(c, o, 1, padding=p, groups=groups, bias=False), bn1=nn.BatchNorm2d(o),
                             avg=_average(o, k, stride), avgbn=nn.BatchNorm2d(o)), seed).eval()
    result = check_pass("fuse_branches", model, torch.randn(2, c, 9, 9))
    assert result.report.nodes_after == {"conv": 1}, result.report.nodes_after
    check_pass("fuse_branches", model, torch.randn(2, c, 9, 9), dtype=torch.float64)


def test_the_same_cascade_alone_stays_refused_as_costlier():
    model = FnModule(lambda m, x: m.avg(m.pre(x)) + x, pre=nn.Conv2d(4, 4, 1, padding=1, bias=False),
                avg=_average(4, 3, 1)).eval()
    result = check_pass("fuse_branches", model, torch.randn(2, 4, 8, 8), expect_rewrite=False)
    reasons = [r.reason for r in result.report["fuse_branches"].result.refused]
    assert any("multiply-adds" in r for r in reasons), reasons


def test_a_lone_conv_scaled_by_a_bn_after_a_sum_gets_the_factor():
    """add(BN(conv_a(x)), conv_b(y)): BN's factor is folded into conv_a, not written back as a mul."""
    model = randomize_bn(FnModule(lambda m, x: m.bn(m.a(x)) + m.b(torch.tanh(x)), a=nn.Conv2d(4, 4, 3, padding=1),
                             bn=nn.BatchNorm2d(4), b=nn.Conv2d(4, 4, 1))).eval()
    result = check_pass("fuse_branches", model, torch.randn(2, 4, 8, 8))
    assert "mul" not in result.report.nodes_after and result.report.nodes_after.get("conv") == 2
