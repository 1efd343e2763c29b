"""A fast slice of the fuzz suite (rewrite.fuzz; the long run is scripts/fuzz.py).

Every outcome is a RewriteError (CLI exit 2 or 4, nothing written) or an equivalent model.
"""
from hypothesis import HealthCheck, given, settings

from rewrite import fuzz

def fuzz_settings(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck))


@fuzz_settings(200)
@given(data=fuzz.mutated_onnx())
def test_mutated_onnx_through_the_api(data):
    fuzz.check_onnx_api(data)


@fuzz_settings(80)
@given(data=fuzz.mutated_onnx())
def test_mutated_onnx_through_the_cli(data):
    fuzz.check_onnx_cli(data)


@fuzz_settings(40)
@given(case=fuzz.mutated_networks())
def test_mutated_networks_through_the_api(case):
    model, x, _ = case
    fuzz.check_torch_api(model, x)


@fuzz_settings(20)
@given(case=fuzz.mutated_networks())
def test_mutated_networks_through_the_cli(case):
    model, x, _ = case
    fuzz.check_torch_cli(model, x)


def test_the_seed_models_are_rewritten_and_equivalent():
    outcomes = [fuzz.check_onnx_api(seed) for seed in fuzz.seed_models()]
    assert outcomes == ["onnx api: rewritten, equivalent"] * len(outcomes)
