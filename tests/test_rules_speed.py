"""The kind-only prefilter before a full pattern match (pattern.could_match_node) changes nothing:
rewritten models, their state_dicts and reports are the same with it on and off."""
from __future__ import annotations

import hashlib

import pytest
import torch
import torch.nn as nn

import rewrite
from rewrite import pattern
from rewrite.pattern import P, match
from rewrite.testing import randomize_bn

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")


def _digest(module: nn.Module, x: torch.Tensor) -> tuple[str, str]:
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().contiguous().cpu().numpy().tobytes())
    with torch.no_grad():
        out = module(x)
    return h.hexdigest(), hashlib.sha256(out.detach().contiguous().numpy().tobytes()).hexdigest()


def _run(model, passes, x, prefilter: bool, monkeypatch):
    monkeypatch.setattr(pattern, "PREFILTER", prefilter)
    new, report = rewrite.apply(model, passes, return_report=True)
    return _digest(new, x), str(report)


@pytest.mark.parametrize("name,passes", [
    ("mobileone_s0", ["fold_bn", "fuse_branches"]),
    ("repvgg_a0", ["fuse_branches"]),
    ("repghostnet_100", ["fold_bn", "fuse_branches"]),
    ("resnet18", ["fold_bn"]),
    ("resnet50", ["fold_bn", "remove_residual"]),
])
def test_prefilter_leaves_results_bit_identical(name, passes, monkeypatch):
    torch.manual_seed(0)
    make = getattr(torchvision.models, name, None) or (lambda: timm.create_model(name))
    model = randomize_bn(make().eval(), seed=0)
    x = torch.randn(2, 3, 64, 64)
    fast = _run(model, passes, x, True, monkeypatch)
    reference = _run(model, passes, x, False, monkeypatch)
    assert fast == reference
    assert "fold_bn" not in passes or fast[0][0] != _digest(model, x)[0]  # something was rewritten


def _toy_graph():
    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            return torch.relu(self.bn(self.conv(x))) + x.mean()

    return Toy().eval()


@pytest.mark.parametrize("pat,expected", [
    (P.op("batch_norm", P.op("conv", P.any("x"), name="c"), name="bn"), True),
    (P.op("batch_norm", P.op("linear", P.any("x")), name="bn"), False),
    (P.op("relu", P.op("batch_norm", P.any())), False),  # rooted at a batch_norm, not a relu
])
def test_could_match_node_agrees_with_match(pat, expected):
    """The prefilter turns a node away only where the full match finds nothing."""
    from rewrite.frontends.fx import import_module

    graph = import_module(_toy_graph(), (torch.randn(1, 3, 8, 8),))
    assert any(node.kind == "batch_norm" for node in graph.nodes)
    turned_away = 0
    for node in list(graph.nodes):
        full = any(True for _ in pattern.OpPattern.match_node(pat, node, {}, []))
        assert pat.could_match_node(node) or not full
        turned_away += not pat.could_match_node(node)
        if node.kind == "batch_norm":
            assert full is expected
            assert bool(list(match(pat, node))) is expected
    assert turned_away  # the prefilter did turn nodes away (the conv, the mean, ...)


def test_a_pattern_subclass_keeps_its_own_matching():
    """A user's OpPattern / ConstPattern subclass may match other kinds than its fields say: the
    prefilter, which reads only those fields, must not turn its nodes away."""
    from rewrite.frontends.fx import import_module

    class AnyNormalization(pattern.OpPattern):
        def check_node(self, node):
            return node.kind in ("batch_norm", "layer_norm")

    class ParamAsConst(pattern.ConstPattern):
        def match_value(self, value, bindings, nodes):
            yield bindings, nodes  # any operand, constant or not

    graph = import_module(_toy_graph(), (torch.randn(1, 3, 8, 8),))
    bn = next(node for node in graph.nodes if node.kind == "batch_norm")
    assert list(match(AnyNormalization("layer_norm", (pattern.AnyPattern(),)), bn))
    relu = next(node for node in graph.nodes if node.kind == "relu")
    assert list(match(P.op("relu", ParamAsConst()), relu))


def _weight_conversions(monkeypatch) -> list:
    import importlib

    rewrite.available_passes()  # the built-in passes, loaded as the package loads them
    branch_forms = importlib.import_module("rewrite.passes.fuse_branches.branch_forms")

    converted = []
    real = branch_forms.weight_bias

    def counting(node):
        converted.append(node.label)
        return real(node)
    monkeypatch.setattr(branch_forms, "weight_bias", counting)
    return converted


def test_a_refused_cascade_converts_no_weight(monkeypatch):
    """A zero-padded conv after a biased one is refused from the sketch (biases and shapes) alone."""
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, padding=1)).eval()
    converted = _weight_conversions(monkeypatch)
    _, report = rewrite.apply(model, ["fuse_branches"], return_report=True)
    assert any("zero-pads its input" in r.reason for r in report.passes[0].result.refused)
    assert converted == []


def test_an_accepted_cascade_converts_each_weight_once_and_composes_as_before(monkeypatch):
    model = nn.Sequential(nn.Conv2d(3, 8, 1, bias=False), nn.Conv2d(8, 8, 3, padding=1)).eval()
    converted = _weight_conversions(monkeypatch)
    out, report = rewrite.apply(model, ["fuse_branches"], return_report=True)
    assert dict(report.passes[0].result.counts) == {"fuse_linear_cascade": 1}
    assert sorted(converted) == ["0", "1"]
    x = torch.randn(2, 3, 7, 7)
    with torch.no_grad():
        assert torch.allclose(out(x), model(x), rtol=1e-5, atol=1e-6)
        wide = model.double()  # a float64 copy rewritten with the same rules matches to 1e-10
        reference = wide(x.double())
        error = (rewrite.apply(wide, ["fuse_branches"])(x.double()) - reference).abs().max()
    assert float(error) <= 1e-10 * float(reference.abs().max())
