"""rewrite.expand on real architectures (random weights): torchvision resnet18 / mobilenet_v2 and timm's
repvgg_a0 in deploy form, every scheme, contracted back to the original architecture; and the refusals."""
import copy

import pytest
import timm
import torch
import torch.nn as nn
import torchvision
from timm.utils.model import reparameterize_model

import rewrite
from rewrite.expansion import architecture, contract
from rewrite.testing import randomize_bn
from fn_module import FnModule

SCHEMES = {"repvgg": {}, "acb": {}, "dbb": {}, "mobileone": {"k": 2}, "expand": {"ratio": 2}}


def repvgg_a0_deploy():
    return reparameterize_model(timm.create_model("repvgg_a0", num_classes=10).eval())


MODELS = {"resnet18": lambda: torchvision.models.resnet18(num_classes=10),
          "mobilenet_v2": lambda: torchvision.models.mobilenet_v2(num_classes=10),
          "repvgg_a0_deploy": repvgg_a0_deploy}


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("name", MODELS)
def test_real_models_round_trip(name, scheme):
    torch.manual_seed(0)
    model = randomize_bn(MODELS[name]()).eval()
    x = torch.randn(2, 3, 32, 32)
    # ExpandNets' wider cascades of the widest layers take long to compose: the smaller layers show it
    where = (lambda path, m: m.weight.numel() <= 64 * 64 * 9) if scheme == "expand" else None
    expanded, report = rewrite.expand(model, scheme, example_inputs=x, where=where, return_report=True,
                                      options=SCHEMES[scheme])
    assert report.expanded, report
    assert rewrite.verify(model, expanded.eval(), x).ok  # preserving init
    randomize_bn(expanded, seed=1)  # as if trained
    deploy = contract(expanded, x)
    result = rewrite.verify(expanded, deploy, x)
    assert result.ok, result
    assert architecture(deploy, x) == architecture(contract(model, x), x)


def test_repvgg_deploy_form_gets_identity_branches_where_timm_has_them():
    model = repvgg_a0_deploy()
    _, report = rewrite.expand(model, "repvgg", return_report=True)
    train_form = timm.create_model("repvgg_a0", num_classes=10)
    with_identity = {p.removesuffix(".conv") for p, m in train_form.named_modules()
                     if getattr(m, "conv_1x1", None) is not None and getattr(m, "identity", None) is not None}
    ours = {e.path.removesuffix(".reparam_conv") for e in report.expanded if "rbr_identity" in e.branches}
    assert ours == with_identity and len(ours) == 17


def _conv():
    return nn.Conv2d(4, 4, 3, padding=1)


REFUSALS = [
    ("residual of its own input", lambda m, x: m.a(x) + x, {"a": _conv()}, "a", "another branch of its input"),
    ("beside another conv of its input", lambda m, x: m.a(x) + m.b(x), {"a": _conv(), "b": nn.Conv2d(4, 4, 1)},
     "a", "another branch of its input"),
    ("through a BN into a sum", lambda m, x: m.bn(m.a(x)) + x * 2.0, {"a": _conv(), "bn": nn.BatchNorm2d(4)}, "a",
     "another branch of its input"),
    ("concatenated", lambda m, x: torch.cat([m.a(x), m.b(x)], 1), {"a": _conv(), "b": _conv()}, "a",
     "concatenated with another branch"),
    ("in a linear cascade", lambda m, x: m.b(m.bn(m.a(x))), {"a": _conv(), "bn": nn.BatchNorm2d(4), "b": _conv()},
     "a", "reads its output with nothing nonlinear between"),
    ("after a linear cascade", lambda m, x: m.b(m.bn(m.a(x))), {"a": _conv(), "bn": nn.BatchNorm2d(4), "b": _conv()},
     "b", "its input comes from a with nothing nonlinear"),
    ("called twice", lambda m, x: m.a(torch.relu(m.a(x))), {"a": _conv()}, "a", "called 2 times"),
    ("weight read directly", lambda m, x: m.a(x) * m.a.weight.mean(), {"a": _conv()}, "a", "read directly"),
    ("no room for a 1x1", lambda m, x: m.a(x), {"a": nn.Conv2d(4, 4, 3)}, "a", "negative padding"),
    ("even kernel", lambda m, x: m.a(x), {"a": nn.Conv2d(4, 4, 4, padding=2)}, "a", "no centre tap"),
    ("padding='same', even reach", lambda m, x: m.a(x), {"a": nn.Conv2d(4, 4, 4, padding="same")}, "a", "asymmetric"),
]


@pytest.mark.parametrize("case", REFUSALS, ids=[c[0] for c in REFUSALS])
def test_refusals_are_reported_and_the_layer_kept(case):
    _, fn, modules, path, reason = case
    model = randomize_bn(FnModule(fn, **modules)).eval()
    x = torch.randn(2, 4, 8, 8)
    for scheme in ("repvgg", "dbb", "mobileone"):
        expanded, report = rewrite.expand(model, scheme, example_inputs=x, return_report=True)
        assert reason in (report.reason(path) or ""), report
        assert type(expanded.get_submodule(path)) is type(modules[path])
        assert rewrite.verify(model, expanded, x).ok


def test_no_identity_where_it_would_not_align():
    for conv, identity in [(nn.Conv2d(4, 4, 3, padding=1), True), (nn.Conv2d(4, 4, 3, padding=1, stride=2), False),
                           (nn.Conv2d(4, 6, 3, padding=1), False), (nn.Conv2d(4, 4, 3, padding=2), False),
                           (nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=4), True)]:
        _, report = rewrite.expand(nn.Sequential(conv), "repvgg", return_report=True)
        assert ("rbr_identity" in report.expanded[0].branches) == identity, conv


def test_subclasses_unbatched_and_unknown_ranks_are_refused():
    class MyConv(nn.Conv2d):
        pass

    model = nn.Sequential(MyConv(3, 3, 3, padding=1), nn.Conv1d(3, 3, 3, padding=1))
    _, report = rewrite.expand(nn.Sequential(MyConv(3, 3, 3, padding=1)), "repvgg", return_report=True)
    assert "subclass (MyConv)" in report.reason("0")
    conv1d = nn.Sequential(nn.Conv1d(3, 3, 3, padding=1))
    assert "rank is unknown" in rewrite.expand(conv1d, "repvgg", return_report=True)[1].reason("0")
    unbatched = rewrite.expand(conv1d, "repvgg", example_inputs=torch.randn(3, 8), return_report=True)[1]
    assert "rank 2" in unbatched.reason("0")
    batched = rewrite.expand(conv1d, "repvgg", example_inputs=torch.randn(2, 3, 8), return_report=True)[1]
    assert [e.path for e in batched.expanded] == ["0"]
    assert model is not None


def test_untraceable_models_raise_trace_error():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = _conv()

        def forward(self, x):
            return self.conv(x) if x.sum() > 0 else x

    with pytest.raises(rewrite.TraceError, match="cannot trace"):
        rewrite.expand(Branchy(), "repvgg")


def test_input_model_is_untouched_and_shares_nothing():
    model = torchvision.models.resnet18(num_classes=10).train()
    before = copy.deepcopy(model.state_dict())
    expanded = rewrite.expand(model, "dbb")
    assert expanded.training and all(m.training for m in expanded.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    ours = {id(p) for p in model.parameters()}
    assert not ours & {id(p) for p in expanded.parameters()}
