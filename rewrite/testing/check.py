"""check_pass() and the model helpers our tests and users' tests share (no hypothesis needed here)."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from ..api import apply
from ..pass_manager import Pass, get_pass
from ..verify import verify_torch


def randomize_bn(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every BatchNorm non-trivial running statistics and affine parameters (in place)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
                    m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
                if m.affine:
                    m.weight.copy_(torch.randn(m.num_features, generator=g))
                    m.bias.copy_(torch.randn(m.num_features, generator=g))
    return model


def state_snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(before: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    after = model.state_dict()
    assert set(before) == set(after), "the input model's state_dict keys changed"
    for k, v in before.items():
        assert torch.equal(v, after[k]), f"the input model's {k} changed"


@dataclass
class CheckResult:
    model: torch.nn.Module
    report: object
    max_rel: float


def check_pass(pass_: str | Pass, model: torch.nn.Module, example_inputs, *, dtype: torch.dtype | None = None,
               tolerance: float | None = None, refuses: str | None = None, expect_rewrite: bool = True,
               options: dict | None = None) -> CheckResult:
    """Assert that a pass keeps `model` equivalent, is idempotent, and never touches its input.

    With `refuses="..."`, assert instead that the pass changed nothing and gave a reason containing it
    (a near miss left alone). `dtype=torch.float64` checks at the float64 tolerance.
    """
    p = get_pass(pass_)
    if dtype is not None:
        model = copy.deepcopy(model).to(dtype)
        example_inputs = _cast_inputs(example_inputs, dtype)
    before = state_snapshot(model)
    rewritten, report = apply(model, [p], example_inputs=example_inputs, return_report=True,
                              options={p.name: options or {}})
    assert_same_state(before, model)
    result = report[p.name].result
    check = verify_torch(model, rewritten, example_inputs, tolerance=tolerance)
    assert check.ok, f"{p.name} changed the outputs: {check}"
    if refuses is not None:
        assert not result.modified, f"{p.name} rewrote a site it should have refused: {result.rewritten}"
        reasons = [r.reason for r in result.refused]
        assert any(refuses in r for r in reasons), f"no refusal mentioning {refuses!r}; refusals: {reasons}"
    elif expect_rewrite:
        assert result.modified, f"{p.name} rewrote nothing; refusals: {[r.reason for r in result.refused]}"
    _, again = apply(rewritten, [p], example_inputs=example_inputs, return_report=True, options={p.name: options or {}})
    assert not again[p.name].result.modified, \
        f"{p.name} is not idempotent: a second run rewrote {again[p.name].result.rewritten}"
    return CheckResult(rewritten, report, check.max_rel)


def _cast_inputs(inputs, dtype):
    if isinstance(inputs, torch.Tensor):
        return inputs.to(dtype)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in inputs)
