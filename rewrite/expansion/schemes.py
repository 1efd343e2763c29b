"""The expansion schemes: which layers each expands by default, and the block it builds.

Each scheme's `build` returns the block, or a string saying why this layer cannot be expanded
exactly. The blocks use only forms fuse_branches contracts exactly (see the comments); with
init="preserve" the block computes what the original layer computed (BN in eval mode): the
original weights in the main branch, every other branch switched off through a zero BN gamma
(ExpandNets: an exact orthogonal factorization of the original weights).

Branch names follow the papers' code, so per-branch-kind weight decay is a name match:
  repvgg     rbr_dense.{conv,bn}, rbr_1x1.{conv,bn}, rbr_identity (a BN)
  acb        square.{conv,bn}, ver.{conv,bn} (Kx1), hor.{conv,bn} (1xK); 3-D: depth, ver, hor lines
  dbb        dbb_origin.{conv,bn}, dbb_1x1.{conv,bn}, dbb_avg.{conv,bn,avg,avgbn} (avg frozen),
             dbb_1x1_kxk.{conv1,bn1,conv2,bn2}
  mobileone  rbr_conv.<i>.{conv,bn} (i < k), rbr_scale.{conv,bn}, rbr_skip (a BN)
  expand     expand_in, expand_kxk, expand_out (convs) / expand_in, expand_mid, expand_out (linears)
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn

from ..errors import RewriteError
from .blocks import BranchSum, average_conv, bn, conv, conv_bn, like, load_main, orthonormal_columns, silence
from .geometry import CONVS, ConvGeometry, centred_padding, geometry, identity_refusal, module_padding

INITS = ("preserve", "fresh")


class Scheme:
    name = "scheme"
    uses_bn = True  # BN normalizes axis 1: the conv's input must be batched
    expands_linear = False

    def default_refusal(self, module: nn.Module, g: ConvGeometry | None) -> str | None:
        """Why this layer is not expanded by default (None: it is). The papers expand KxK convs, K > 1."""
        if g is None:
            return f"{self.name} expands convs, not linear layers"
        if g.pointwise:
            return f"a 1x1 conv: {self.name} expands KxK convs with K > 1 (select it with where= to try)"
        return None

    def build(self, module: nn.Module, g: ConvGeometry | None, init: str) -> nn.Module | str:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _centred(g: ConvGeometry, ref: torch.Tensor, padding, kernel=None, in_channels=None, groups=None):
    return conv(g, ref, kernel=kernel or (1,) * g.dims, padding=padding, in_channels=in_channels, groups=groups)


def _finish(branches: dict, module: nn.Module, main: str, init: str) -> BranchSum:
    """Preserve: the original in `main`, every other branch's last BN silenced."""
    if init == "preserve":
        load_main(branches[main], module)
        for name, branch in branches.items():
            if name != main:
                silence(_last_bn(branch))
    return BranchSum(branches)


def _last_bn(branch: nn.Module) -> nn.Module:
    return [m for m in branch.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)][-1]


class RepVGG(Scheme):
    """KxK + BN, 1x1 + BN, and an identity BN where in == out, stride 1 and the output aligns with the input."""

    name = "repvgg"

    def build(self, module, g, init):
        padding, side = module_padding(g), centred_padding(g)
        if isinstance(padding, str) or isinstance(side, str):
            return padding if isinstance(padding, str) else side
        ref = module.weight
        branches = OrderedDict(rbr_dense=conv_bn(conv(g, ref, padding=padding), g, ref),
                               rbr_1x1=conv_bn(_centred(g, ref, side), g, ref))
        if identity_refusal(g) is None:
            branches["rbr_identity"] = bn(g, g.out_channels, ref)
        return _finish(branches, module, "rbr_dense", init)


class ACB(Scheme):
    """ACNet: KxK + BN and, for each spatial axis, a line kernel (Kx1, 1xK) + BN at the kernel's centre."""

    name = "acb"
    _LINES = {2: ("ver", "hor"), 3: ("depth", "ver", "hor")}

    def default_refusal(self, module, g):
        return super().default_refusal(module, g) or self._shape_refusal(g)

    def _shape_refusal(self, g):
        if g.dims < 2:
            return "ACB adds line kernels to a 2-D or 3-D kernel; a 1-D kernel is already a line"
        if any(k == 1 for k in g.kernel):
            return f"kernel {g.kernel} is already a line: ACB expands kernels larger than 1 on every axis"
        return None

    def build(self, module, g, init):
        why = self._shape_refusal(g)
        padding = module_padding(g)
        if why or isinstance(padding, str):
            return why or padding
        ref = module.weight
        branches = OrderedDict(square=conv_bn(conv(g, ref, padding=padding), g, ref))
        for axis, name in enumerate(self._LINES[g.dims]):
            others = [d for d in range(g.dims) if d != axis]
            side = centred_padding(g, others)
            if isinstance(side, str):
                return side
            kernel = tuple(k if d == axis else 1 for d, k in enumerate(g.kernel))
            branches[name] = conv_bn(conv(g, ref, kernel=kernel, padding=side), g, ref)
        return _finish(branches, module, "square", init)


class DBB(Scheme):
    """Diverse Branch Block: KxK, 1x1, 1x1 -> average, 1x1 -> KxK, each ending in a BN.

    The cascades put the padding on their first conv (a 1x1 without bias) and none on the second:
    the zero border then passes through the 1x1 as the BN shift, as DBB's BNAndPad intends, and
    fuse_branches composes it exactly (a padded second conv would see zeros where the first conv's
    BN shift should be). The average is a frozen depthwise conv, so it keeps dilation and padding mode.
    """

    name = "dbb"

    def build(self, module, g, init):
        padding, side = module_padding(g), centred_padding(g)
        if isinstance(padding, str) or isinstance(side, str):
            return padding if isinstance(padding, str) else side
        ref, dims = module.weight, g.dims
        one = (1,) * dims
        c, o, groups = g.in_channels, g.out_channels, g.groups
        branches = OrderedDict(dbb_origin=conv_bn(conv(g, ref, padding=padding), g, ref),
                               dbb_1x1=conv_bn(_centred(g, ref, side), g, ref))
        if c == o == groups:  # depthwise: average the input itself
            branches["dbb_avg"] = nn.Sequential(OrderedDict(
                avg=average_conv(g, o, ref, padding=padding), avgbn=bn(g, o, ref)))
        else:
            branches["dbb_avg"] = nn.Sequential(OrderedDict(
                conv=conv(g, ref, kernel=one, stride=one, dilation=one, padding=padding), bn=bn(g, o, ref),
                avg=average_conv(g, o, ref), avgbn=bn(g, o, ref)))
        middle = c if groups < o else 2 * c  # DBB's internal width
        branches["dbb_1x1_kxk"] = nn.Sequential(OrderedDict(
            conv1=conv(g, ref, out_channels=middle, kernel=one, stride=one, dilation=one, padding=padding),
            bn1=bn(g, middle, ref), conv2=conv(g, ref, in_channels=middle), bn2=bn(g, o, ref)))
        return _finish(branches, module, "dbb_origin", init)


class MobileOne(Scheme):
    """k KxK + BN branches, a 1x1 + BN "scale" branch (K > 1), and an identity BN "skip" where it aligns."""

    name = "mobileone"

    def __init__(self, k: int = 4):
        if not isinstance(k, int) or k < 1:
            raise RewriteError(f"mobileone's k is the number of KxK branches, a positive integer; got {k!r}")
        self.k = k

    def default_refusal(self, module, g):
        return f"{self.name} expands convs, not linear layers" if g is None else None  # 1x1 convs too

    def build(self, module, g, init):
        padding = module_padding(g)
        if isinstance(padding, str):
            return padding
        ref = module.weight
        kxk = OrderedDict((str(i), conv_bn(conv(g, ref, padding=padding), g, ref)) for i in range(self.k))
        if init == "preserve":
            load_main(kxk["0"], module)
            for i in range(1, self.k):
                silence(kxk[str(i)].bn)
        branches = OrderedDict(rbr_conv=BranchSum(kxk))
        if not g.pointwise:
            side = centred_padding(g)
            if isinstance(side, str):
                return side
            branches["rbr_scale"] = conv_bn(_centred(g, ref, side), g, ref)
        if identity_refusal(g) is None:
            branches["rbr_skip"] = bn(g, g.out_channels, ref)
        if init == "preserve":
            for name in ("rbr_scale", "rbr_skip"):
                if name in branches:
                    silence(_last_bn(branches[name]))
        return BranchSum(branches)

    def __repr__(self) -> str:
        return f"MobileOne(k={self.k})"


class ExpandNets(Scheme):
    """A linear cascade with wider middles and no nonlinearity, as ExpandNets trains:
    a KxK conv becomes 1x1 (C -> rC) -> KxK (rC -> rO) -> 1x1 (rO -> O); a linear, in -> r*in -> r*out -> out.

    The padding sits on the first 1x1 (no bias), so the KxK reads exactly what the original read, for
    any padding mode. preserve: orthonormal Q_in (rC x C), Q_out (rO x O) and the KxK = Q_out W Q_in^T,
    so that Q_out^T (Q_out W Q_in^T) Q_in = W; no weight starts at zero, so every weight trains.
    """

    name = "expand"
    uses_bn = False
    expands_linear = True

    def __init__(self, ratio: int = 4, seed: int = 0):
        if not isinstance(ratio, int) or ratio < 1:
            raise RewriteError(f"expand's ratio widens the middle layers, a positive integer; got {ratio!r}")
        self.ratio, self.seed = ratio, seed

    def default_refusal(self, module, g):
        if g is None:
            return None
        if g.groups != 1:
            return f"a grouped conv (groups={g.groups}): ExpandNets cascades expand dense convs"
        return super().default_refusal(module, g)

    def build(self, module, g, init):
        if g is None:
            return self._build_linear(module, init)
        if g.groups != 1:
            return f"a grouped conv (groups={g.groups}): ExpandNets cascades expand dense convs"
        padding = module_padding(g)
        if isinstance(padding, str):
            return padding
        ref, one, r = module.weight, (1,) * g.dims, self.ratio
        wide_in, wide_out = r * g.in_channels, r * g.out_channels
        block = nn.Sequential(OrderedDict(
            expand_in=conv(g, ref, out_channels=wide_in, kernel=one, stride=one, dilation=one, padding=padding),
            expand_kxk=conv(g, ref, in_channels=wide_in, out_channels=wide_out),
            expand_out=conv(g, ref, in_channels=wide_out, kernel=one, stride=one, dilation=one, bias=g.bias,
                            padding_mode="zeros")))
        if init == "preserve":
            self._factor(module, block.expand_in, block.expand_kxk, block.expand_out)
        return block

    def _build_linear(self, module, init):
        r, ref = self.ratio, module.weight
        wide_in, wide_out = r * module.in_features, r * module.out_features
        block = nn.Sequential(OrderedDict(
            expand_in=nn.Linear(module.in_features, wide_in, bias=False, **like(ref)),
            expand_mid=nn.Linear(wide_in, wide_out, bias=False, **like(ref)),
            expand_out=nn.Linear(wide_out, module.out_features, bias=module.bias is not None, **like(ref))))
        if init == "preserve":
            self._factor(module, block.expand_in, block.expand_mid, block.expand_out)
        return block

    @torch.no_grad()
    def _factor(self, original, first, middle, last) -> None:
        gen = torch.Generator(device=original.weight.device).manual_seed(self.seed)
        w = original.weight.detach().to(torch.float64)
        q_in = orthonormal_columns(first.weight.shape[0], w.shape[1], w, gen)  # (rC, C)
        q_out = orthonormal_columns(last.weight.shape[1], w.shape[0], w, gen)  # (rO, O)
        taps = w.shape[2:]
        first.weight.copy_(q_in.reshape(*q_in.shape, *[1] * len(taps)))
        middle.weight.copy_(torch.einsum("po,oc...,qc->pq...", q_out, w, q_in))
        last.weight.copy_(q_out.t().reshape(w.shape[0], -1, *[1] * len(taps)))
        if original.bias is not None:
            last.bias.copy_(original.bias)


_SCHEMES = {"repvgg": RepVGG, "acb": ACB, "dbb": DBB, "mobileone": MobileOne, "expand": ExpandNets}
SCHEME_NAMES = tuple(_SCHEMES)


def get_scheme(scheme: str | Scheme, **options) -> Scheme:
    if isinstance(scheme, Scheme):
        if options:
            raise RewriteError("scheme options go to the scheme's constructor when a Scheme object is given")
        return scheme
    if scheme not in _SCHEMES:
        raise RewriteError(f"unknown expansion scheme {scheme!r}; known: {', '.join(SCHEME_NAMES)}")
    try:
        return _SCHEMES[scheme](**options)
    except TypeError as exc:
        raise RewriteError(f"bad options for scheme {scheme!r}: {exc}") from None


def layer_geometry(module: nn.Module) -> ConvGeometry | None:
    """The geometry of a plain conv; None for a linear layer."""
    return geometry(module) if type(module) in CONVS else None


__all__ = ["Scheme", "RepVGG", "ACB", "DBB", "MobileOne", "ExpandNets", "get_scheme", "SCHEME_NAMES", "INITS",
           "layer_geometry"]
