"""timm models symbolic_trace refuses (shape-dependent Python), rewritten through the torch.export path.

Random weights, randomized BN statistics, small inputs: a few seconds each.
"""
from __future__ import annotations

import pytest
import timm
import torch

import rewrite
from rewrite.testing import randomize_bn
from rewrite.verify import verify_torch

pytestmark = pytest.mark.usefixtures("one_thread")

MODELS = [("efficientvit_m0", {"img_size": 64}, 64), ("tiny_vit_5m_224", {}, 64), ("tf_efficientnet_b0", {}, 32),
          ("mobilevit_xxs", {}, 64)]


@pytest.mark.parametrize("name,kwargs,size", MODELS, ids=[m[0] for m in MODELS])
def test_fx_refuses_and_auto_folds_every_bn_through_export(name, kwargs, size):
    torch.manual_seed(0)
    model = randomize_bn(timm.create_model(name, **kwargs), seed=0).eval()
    x = torch.randn(1, 3, size, size)
    with pytest.raises(rewrite.TraceError):
        rewrite.apply(model, ["fold_bn"], example_inputs=x, capture="fx")
    out, report = rewrite.apply(model, ["fold_bn", "fuse_branches"], example_inputs=x, return_report=True)
    assert "captured with torch.export" in report.capture
    assert report.nodes_before.get("batch_norm", 0) > 0 and "batch_norm" not in report.nodes_after
    check = verify_torch(model, out, x)
    assert check.ok and check.max_rel <= 1e-5, check


def test_timm_exported_program_rewrites_and_round_trips(tmp_path):
    model = randomize_bn(timm.create_model("tf_efficientnet_b0"), seed=1).eval()
    x = torch.randn(1, 3, 32, 32)
    program = torch.export.export(model, (x,))
    out, report = rewrite.apply(program, ["fold_bn"], example_inputs=x, return_report=True)
    assert isinstance(out, torch.export.ExportedProgram) and "batch_norm" not in report.nodes_after
    untouched = {k for k in program.state_dict if k.startswith("classifier.")}
    assert untouched and untouched <= set(out.state_dict)  # the head's parameters keep their names
    path = tmp_path / "b0.pt2"
    torch.export.save(out, path)
    loaded = torch.export.load(path).module()
    check = verify_torch(model, loaded, x)
    assert check.ok and check.max_rel <= 1e-5, check
