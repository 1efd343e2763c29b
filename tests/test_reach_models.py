"""Issue 11 on real timm models (random weights, small inputs): fold_bn + fuse_branches reach what timm's own
reparameterize_model reaches (convs, BN, adds), exactly.

- fastvit_t8: RepMixer's `x + ls * (mixer(x) - norm(x))` needs subtraction; timm keeps 10 adds.
- levit_128s / levit_conv_128s: LinearNorm's `bn(linear(x).flatten(0, 1)).reshape_as(x)` and NormLinear's
  bn -> dropout -> linear head; timm keeps no BN.
- mixnet_s: BN after each mixed conv's concat; timm's conversion leaves its 49 BN, we fold them all.
"""
from __future__ import annotations

import collections
import copy
import operator

import pytest
import torch
import torch.fx as fx

import rewrite
from rewrite.testing import randomize_bn
from rewrite.verify import verify_torch

timm = pytest.importorskip("timm")
from timm.utils.model import reparameterize_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

_BN = torch.nn.modules.batchnorm._BatchNorm
_CONV = torch.nn.modules.conv._ConvNd


def _adds(model: torch.nn.Module) -> int:
    graph = fx.symbolic_trace(model).graph
    return sum(n.op == "call_function" and n.target in (operator.add, torch.add) for n in graph.nodes)


def _counts(model: torch.nn.Module) -> dict:
    mods = list(model.modules())
    return {"conv": sum(isinstance(m, _CONV) for m in mods), "bn": sum(isinstance(m, _BN) for m in mods)}


CASES = {"fastvit_t8": {}, "levit_128s": {"img_size": 64}, "levit_conv_128s": {"img_size": 64}, "mixnet_s": {}}


@pytest.mark.parametrize("name", list(CASES))
def test_reaches_timms_own_conversion(name):
    torch.manual_seed(0)
    model = randomize_bn(timm.create_model(name, pretrained=False, num_classes=10, **CASES[name]).eval(), seed=1)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    fused, report = rewrite.apply(model, ["fold_bn", "fuse_branches"], example_inputs=x, return_report=True)
    after = collections.Counter(report.nodes_after)
    deployed = reparameterize_model(copy.deepcopy(model))
    deploy = _counts(deployed)
    assert after["conv"] == deploy["conv"], (after, deploy)
    assert after["batch_norm"] == 0 <= deploy["bn"], after  # every BN folded (timm: 10 / 0 / 0 / 49 left)
    if name == "fastvit_t8":
        assert after["add"] == _adds(deployed) == 10
        assert "sub" not in after
    check = verify_torch(model, fused, x)
    assert check.ok and check.max_rel <= 1e-5, check
