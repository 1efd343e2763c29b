"""rewrite.expand: every scheme on random plain CNNs; the round trip gives back the original architecture
and the expanded model's outputs; preserve-init equals the original; training keeps the contraction exact."""
import copy

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import rewrite
from rewrite.expansion import architecture, contract
from rewrite.testing import assert_same_state, randomize_bn, state_snapshot

NO_SHRINK = (Phase.explicit, Phase.reuse, Phase.generate)  # shrinking re-traces models for minutes
SCHEMES = {"repvgg": {}, "acb": {}, "dbb": {}, "mobileone": {"k": 2}, "expand": {"ratio": 2}}
CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
BNS = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


@st.composite
def plain_cnns(draw):
    """A stack of conv [-> BN] -> ReLU layers of random geometry, maybe ending in flatten -> linear."""
    dims = draw(st.sampled_from([1, 2, 2, 2, 3]))
    size = [draw(st.integers(6, 9 if dims < 3 else 6)) for _ in range(dims)]
    channels = draw(st.sampled_from([2, 3, 4]))
    x_shape = (2, channels, *size)
    layers = []
    for _ in range(draw(st.integers(1, 3))):
        groups = draw(st.sampled_from([g for g in (1, 2, channels) if channels % g == 0]))
        out = groups * draw(st.integers(1, 3))
        if draw(st.booleans()):  # square odd kernels, what the schemes expand by default
            kernel = (draw(st.sampled_from([3, 5] if dims < 3 else [3])),) * dims
        else:
            kernel = tuple(draw(st.sampled_from([1, 2, 3, 5] if dims < 3 else [1, 3])) for _ in range(dims))
        dilation = tuple(draw(st.integers(1, 2)) for _ in range(dims))
        stride = tuple(draw(st.integers(1, 2)) for _ in range(dims))
        reach = [d * (k - 1) for d, k in zip(dilation, kernel)]
        padding = tuple(draw(st.sampled_from([0, r // 2, r // 2, r // 2 + 1])) for r in reach)
        new_size = [(s + 2 * p - r - 1) // st_ + 1 for s, p, r, st_ in zip(size, padding, reach, stride)]
        if min(new_size) < 1:
            continue
        mode = "zeros"
        if any(padding) and max(padding) < min(size):
            mode = draw(st.sampled_from(["zeros", "zeros", "reflect", "circular", "replicate"]))
        layers.append(CONVS[dims](channels, out, kernel, stride, padding, dilation, groups,
                                  bias=draw(st.booleans()), padding_mode=mode))
        if draw(st.booleans()):
            layers.append(BNS[dims](out))
        layers.append(nn.ReLU())
        channels, size = out, new_size
    if draw(st.booleans()):
        layers += [nn.Flatten(), nn.Linear(channels * int(torch.tensor(size).prod()), 3)]
    if not layers:
        layers.append(CONVS[dims](channels, channels, 3, padding=1))
    model = randomize_bn(nn.Sequential(*layers), seed=draw(st.integers(0, 1000))).eval()
    torch.manual_seed(draw(st.integers(0, 1000)))
    return model, torch.randn(x_shape)


def _layers(model):
    return [p for p, m in model.named_modules() if type(m) in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)]


def assert_round_trip(original, expanded, x, dtype=torch.float32):
    """Contracting `expanded` gives `original`'s deploy architecture and `expanded`'s outputs."""
    deploy = contract(expanded, x)
    result = rewrite.verify(expanded.eval(), deploy, x, dtype=dtype)
    assert result.ok, result
    original = copy.deepcopy(original).to(dtype)
    assert architecture(deploy, x) == architecture(contract(original, x), x)
    return result


@pytest.mark.parametrize("scheme", SCHEMES)
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow], phases=NO_SHRINK)
@given(case=plain_cnns(), seed=st.integers(0, 1000))
def test_round_trip_on_random_cnns(scheme, case, seed):
    model, x = case
    before = state_snapshot(model)
    expanded, report = rewrite.expand(model, scheme, example_inputs=x, init="fresh", return_report=True,
                                      options=SCHEMES[scheme])
    assert_same_state(before, model)
    # every layer is accounted for: expanded, or left with a reason
    accounted = [e.path for e in report.expanded] + [p for p, _ in report.skipped]
    assert sorted(accounted) == sorted(_layers(model))
    assert all(why for _, why in report.skipped)
    randomize_bn(expanded, seed)
    assert_round_trip(model, expanded, x)
    assert_round_trip(model, copy.deepcopy(expanded).double(), x.double(), torch.float64)


@pytest.mark.parametrize("scheme", SCHEMES)
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow], phases=NO_SHRINK)
@given(case=plain_cnns())
def test_preserving_init_equals_the_original(scheme, case):
    model, x = case
    expanded = rewrite.expand(model, scheme, example_inputs=x, options=SCHEMES[scheme]).eval()
    assert rewrite.verify(model, expanded, x).ok
    model64 = copy.deepcopy(model).double()
    expanded64 = rewrite.expand(model64, scheme, example_inputs=x.double(), options=SCHEMES[scheme]).eval()
    assert rewrite.verify(model64, expanded64, x.double(), dtype=torch.float64).ok


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4)).eval()


@pytest.mark.parametrize("scheme", SCHEMES)
def test_training_steps_keep_the_contraction_exact(scheme):
    model = small_net()
    expanded = rewrite.expand(model, scheme, example_inputs=torch.randn(2, 3, 8, 8), options=SCHEMES[scheme])
    assert len(_layers(expanded)) > len(_layers(model))
    expanded.train()
    optimizer = torch.optim.SGD(expanded.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    torch.manual_seed(1)
    for _ in range(3):
        images, labels = torch.randn(8, 3, 8, 8), torch.randint(0, 4, (8,))
        loss = nn.functional.cross_entropy(expanded(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    expanded.eval()
    x = torch.randn(4, 3, 8, 8)
    assert not rewrite.verify(model, expanded, x).ok, "training changed nothing: the test would prove nothing"
    result = assert_round_trip(model, expanded, x)
    assert result.max_rel <= 1e-5


def test_parameter_names_say_layer_and_branch():
    model = small_net()
    keys = set(rewrite.expand(model, "repvgg").state_dict())
    assert {"0.rbr_dense.conv.weight", "0.rbr_1x1.conv.weight", "0.rbr_dense.bn.weight", "3.rbr_identity.weight",
            "3.rbr_1x1.bn.running_var"} <= keys
    assert "6.rbr_identity.weight" not in keys  # stride 2, 8 -> 16 channels: no identity
    keys = set(rewrite.expand(model, "dbb").state_dict())
    assert {"0.dbb_origin.conv.weight", "0.dbb_1x1.conv.weight", "0.dbb_avg.conv.weight", "0.dbb_avg.avg.weight",
            "0.dbb_avg.avgbn.weight", "0.dbb_1x1_kxk.conv1.weight", "0.dbb_1x1_kxk.conv2.weight"} <= keys
    keys = set(rewrite.expand(model, "mobileone", options={"k": 3}).state_dict())
    assert {"0.rbr_conv.2.conv.weight", "0.rbr_scale.conv.weight", "3.rbr_skip.weight"} <= keys
    assert set(rewrite.expand(model, "acb").state_dict()) >= {"0.square.conv.weight", "0.ver.conv.weight",
                                                             "0.hor.conv.weight"}
    keys = set(rewrite.expand(model, "expand").state_dict())
    assert {"0.expand_in.weight", "0.expand_kxk.weight", "0.expand_out.weight", "10.expand_mid.weight"} <= keys
    assert rewrite.expand(model, "acb").get_submodule("0.ver.conv").kernel_size == (3, 1)


def test_dbb_average_is_frozen_and_skipped_by_the_optimizer():
    expanded = rewrite.expand(small_net(), "dbb")
    avg = expanded.get_submodule("0.dbb_avg.avg")
    assert not avg.weight.requires_grad and torch.allclose(avg.weight, torch.full_like(avg.weight, 1 / 9))


@pytest.mark.parametrize("where, chosen", [
    (None, ["0", "3", "6"]),
    (["3"], ["3"]),
    ("[03]", ["0", "3"]),
    ({"kind": "conv2d", "kernel_size": 3}, ["0", "3", "6"]),
    ({"path": ["6", "10"]}, ["6"]),
    (lambda path, m: getattr(m, "groups", 1) > 1, ["3"]),
])
def test_where_selects_layers(where, chosen):
    _, report = rewrite.expand(small_net(), "repvgg", where=where, return_report=True)
    assert [e.path for e in report.expanded] == chosen
    assert all(why for _, why in report.skipped)


def test_bad_arguments_are_clear_errors():
    model = small_net()
    for kwargs, text in [({"scheme": "repvg"}, "unknown expansion scheme"), ({"init": "zero"}, "init is one of"),
                         ({"where": {"size": 3}}, "keys path, kind"), ({"scheme": "mobileone", "options": {"k": 0}},
                                                                         "positive integer"),
                         ({"scheme": "repvgg", "options": {"k": 2}}, "bad options")]:
        with pytest.raises(rewrite.RewriteError, match=text):
            rewrite.expand(model, **kwargs)
    with pytest.raises(rewrite.RewriteError, match="nn.Module"):
        rewrite.expand("model.onnx", "repvgg")
