"""rewrite.apply / rewrite.verify contracts: copies, errors that name the place, verification, reports."""
import pytest
import torch
import torch.nn as nn

import rewrite
from rewrite.testing import assert_same_state, randomize_bn, state_snapshot


def small_net():
    return randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4))).eval()


def test_input_model_is_never_mutated_and_result_shares_nothing():
    model = small_net()
    before = state_snapshot(model)
    out = rewrite.apply(model, ["fold_bn", "cleanup"])
    assert_same_state(before, model)
    ours = {p.data_ptr() for p in model.parameters()} | {b.data_ptr() for b in model.buffers()}
    assert not ours & {p.data_ptr() for p in out.parameters()}
    with torch.no_grad():
        for p in out.parameters():
            p.add_(1.0)
    assert_same_state(before, model)


class _CachesInForward(nn.Module):
    """Caches a value computed from a parameter in a plain dict in eval mode, as timm's LeViT does."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.shift = nn.Parameter(torch.randn(4, 1, 1))
        self.cache, self.seen = {}, []

    def forward(self, x):
        if "shift" not in self.cache:
            self.cache["shift"] = self.shift * 2
            self.seen.append("shift")
        return self.bn(self.conv(x)) + self.cache["shift"]


def test_tracing_leaves_a_module_s_own_caches_as_they_were():
    model = randomize_bn(_CachesInForward()).eval()
    x = torch.randn(2, 3, 8, 8)
    first = rewrite.apply(model, ["fold_bn"], example_inputs=x)
    assert model.cache == {} and model.seen == []  # no fx proxy left behind in the user's model
    second = rewrite.apply(model, ["fold_bn"], example_inputs=x)  # so a second call captures it again
    with torch.no_grad():
        want = model(x)
        for out in (first, second):
            assert (out(x) - want).abs().max().item() <= 1e-5 * want.abs().max().item()


def test_inplace_may_share_untouched_modules():
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU(), nn.Linear(5, 2)).eval()
    out = rewrite.apply(model, ["fold_bn"], inplace=True)
    assert out.get_submodule("2") is model[2]
    assert rewrite.apply(model, ["fold_bn"]).get_submodule("2") is not model[2]


def test_untouched_modules_keep_names_and_state_dict_keys():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 3))
    randomize_bn(model).eval()
    out = rewrite.apply(model, ["fold_bn"])
    keys = set(out.state_dict())
    assert {"4.weight", "4.bias", "0.weight", "0.bias"} <= keys
    assert not any(k.startswith("1.") for k in keys)
    assert isinstance(out.get_submodule("0"), nn.Conv2d) and out.get_submodule("0").bias is not None
    assert not out.training


def test_verify_reports_per_output_errors():
    model = small_net()
    x = torch.randn(2, 3, 8, 8)
    out, report = rewrite.apply(model, ["fold_bn"], example_inputs=x, verify=True, return_report=True)
    check = report["fold_bn"].verification
    assert check.ok and 0 < check.max_rel <= 1e-5 and check.outputs[0].shape == (2, 4, 8, 8)
    direct = rewrite.verify(model, out, x, dtype=torch.float64)
    assert direct.max_rel < 1e-6 and direct.dtype == "float64"


def test_verify_detects_a_wrong_model():
    model = small_net()
    wrong = rewrite.apply(model, ["fold_bn"])
    with torch.no_grad():
        wrong.get_submodule("0").bias.add_(1e-2)
    check = rewrite.verify(model, wrong, torch.randn(2, 3, 8, 8))
    assert not check.ok and check.max_rel > 1e-5


def test_verify_failure_raises_equivalence_error_naming_the_pass():
    from rewrite.pass_manager import RulePass
    from rewrite import P, rule

    @rule(P.op("relu", P.any("x")))
    def relu_to_identity(ctx, x):  # deliberately wrong
        return x

    with pytest.raises(rewrite.EquivalenceError) as err:
        rewrite.apply(nn.ReLU(), [RulePass("wrong", [relu_to_identity])], example_inputs=torch.randn(4, 4),
                      verify=True)
    assert "pass wrong" in str(err.value) and "max rel" in str(err.value)


def test_verify_without_inputs_is_a_clear_error():
    with pytest.raises(rewrite.RewriteError, match="example_inputs"):
        rewrite.apply(small_net(), ["fold_bn"], verify=True)


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Branchy()

    def forward(self, x):
        return self.inner(x) + 1


class Branchy(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x
        return -x


class UsesLen(nn.Module):
    def forward(self, x):
        return x * len(x)


def test_data_dependent_control_flow_gives_trace_error_naming_module_and_line():
    with pytest.raises(rewrite.TraceError) as err:
        rewrite.apply(DataDependent(), ["fold_bn"])
    text = str(err.value)
    assert "module 'inner' (Branchy)" in text
    assert "test_api.py" in text and "if x.sum() > 0" in text
    assert "concrete_args" in text and "leaf" in text
    assert err.value.__cause__ is None and "Traceback" not in text


def test_len_of_a_proxy_gives_trace_error():
    with pytest.raises(rewrite.TraceError, match="len"):
        rewrite.apply(UsesLen(), ["fold_bn"])


def test_leaf_modules_let_an_untraceable_submodule_through():
    model = DataDependent()
    out = rewrite.apply(model, ["fold_bn"], leaf_modules=[Branchy])
    x = torch.randn(2, 3)
    assert torch.equal(out(x), model(x))


def test_not_a_model_is_a_clear_error():
    with pytest.raises(rewrite.RewriteError, match="expected an nn.Module"):
        rewrite.apply({"weights": 1}, ["fold_bn"])


def test_bad_example_inputs_are_a_clear_error():
    with pytest.raises(rewrite.RewriteError, match="does not run on the example inputs"):
        rewrite.apply(small_net(), ["fold_bn"], example_inputs=torch.randn(2, 5, 8, 8))


def test_report_to_dict_is_plain_data():
    import json
    _, report = rewrite.apply(small_net(), ["fold_bn", "cleanup"], return_report=True)
    data = report.to_dict()
    json.dumps(data)
    assert data["passes"][0]["counts"] == {"fold_bn_into_conv": 2}
    assert data["nodes_before"]["batch_norm"] == 2 and "batch_norm" not in data["nodes_after"]


def test_training_mode_model_keeps_training_semantics():
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    out = rewrite.apply(model, ["fold_bn"])
    x = torch.randn(4, 3, 6, 6)
    before = state_snapshot(model)
    with torch.no_grad():
        expected = model(x)
    assert torch.allclose(out(x), expected, atol=1e-6)
    assert out.training
    model.load_state_dict(before)


class OptionalMask(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x, mask=None):
        y = self.bn(self.conv(x))
        if mask is not None:
            y = y * mask
        return y


def test_optional_arguments_with_concrete_args():
    model = randomize_bn(OptionalMask()).eval()
    out = rewrite.apply(model, ["fold_bn"], concrete_args={"mask": None})
    x = torch.randn(2, 3, 4, 4)
    assert torch.allclose(out(x), model(x), rtol=1e-5, atol=1e-6)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in out.modules())


def test_float64_results_share_no_storage_with_the_input():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    model = randomize_bn(model).eval().double()

    class Shifted(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = model
            self.register_buffer("shift", torch.randn(1, 2, 1, 1, dtype=torch.float64))

        def forward(self, x):
            return self.body(x) + self.shift

    wrapped = Shifted().eval()
    out = rewrite.apply(wrapped, ["fold_bn"])
    inputs = {t.untyped_storage().data_ptr() for t in list(wrapped.parameters()) + list(wrapped.buffers())}
    assert not inputs & {t.untyped_storage().data_ptr() for t in out.parameters()}


def test_a_single_pass_name_is_one_pass():
    out, report = rewrite.apply(small_net(), "fold_bn", return_report=True)
    assert [p.name for p in report.passes] == ["fold_bn"]


def test_a_rule_that_crashes_leaves_the_site_and_says_so():
    from rewrite import P, rule
    from rewrite.pass_manager import RulePass

    @rule(P.op("relu", P.any("x")))
    def broken(ctx, x):
        raise ZeroDivisionError("oops")

    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    out, report = rewrite.apply(model, [RulePass("broken", [broken])], return_report=True)
    refused = report["broken"].result.refused
    assert refused and "internal error in rule broken: ZeroDivisionError: oops" in refused[0].reason
    x = torch.randn(2, 3)
    assert torch.equal(out(x), model(x))
