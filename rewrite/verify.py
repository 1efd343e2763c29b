"""Numerical equivalence checks between an original model and its rewrite.

Relative error is max|a - b| / max|a| per output (the reference's largest magnitude), so deep
networks with large activations are judged fairly. Torch models run in torch; ONNX models run
in onnxruntime (see rewrite.frontends.onnx_verify).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch.utils._pytree import tree_flatten

from .errors import RewriteError
from .frontends.fx import as_tuple, preserved_buffers

DEFAULT_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}


@dataclass
class OutputError:
    name: str
    max_abs: float
    max_rel: float
    shape: tuple


@dataclass
class VerifyResult:
    outputs: list[OutputError] = field(default_factory=list)
    tolerance: float = 1e-5
    dtype: str = "float32"

    @property
    def max_abs(self) -> float:
        return max((o.max_abs for o in self.outputs), default=0.0)

    @property
    def max_rel(self) -> float:
        return max((o.max_rel for o in self.outputs), default=0.0)

    @property
    def ok(self) -> bool:
        return self.max_rel <= self.tolerance

    def __str__(self) -> str:
        rows = [f"{o.name}: max abs {o.max_abs:.3e}, max rel {o.max_rel:.3e}" for o in self.outputs]
        verdict = "ok" if self.ok else "FAILED"
        return f"{verdict} ({self.dtype}, tolerance {self.tolerance:g}): " + "; ".join(rows)


def _max_abs_and_scale(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """max|a - b| and max|a| over the finite values; NaN and inf must sit at the same places in both
    (a model whose weights hold NaN gives NaN, and so must its rewrite), else the error is inf."""
    if not a.numel():
        return 0.0, 0.0
    finite = torch.isfinite(a) & torch.isfinite(b)
    if not bool(finite.all()):
        same = (a == b) | (torch.isnan(a) & torch.isnan(b))
        if not bool((finite | same).all()):
            return float("inf"), float(a[torch.isfinite(a)].abs().max()) if torch.isfinite(a).any() else 0.0
        a, b = a[finite], b[finite]
        if not a.numel():
            return 0.0, 0.0
    return float((a - b).abs().max()), float(a.abs().max())


def compare_outputs(reference, candidate, tolerance: float, dtype: str) -> VerifyResult:
    ref_flat, _ = tree_flatten(reference)
    cand_flat, _ = tree_flatten(candidate)
    if len(ref_flat) != len(cand_flat):
        raise RewriteError(f"the rewritten model returns {len(cand_flat)} outputs, the original {len(ref_flat)}")
    result = VerifyResult(tolerance=tolerance, dtype=dtype)
    for i, (a, b) in enumerate(zip(ref_flat, cand_flat)):
        a = torch.as_tensor(a)
        b = torch.as_tensor(b)
        if a.shape != b.shape:
            raise RewriteError(f"output {i} has shape {tuple(b.shape)}, the original {tuple(a.shape)}")
        a64, b64 = a.detach().double().cpu(), b.detach().double().cpu()
        max_abs, scale = _max_abs_and_scale(a64, b64)
        max_rel = max_abs / scale if scale > 0 else max_abs
        result.outputs.append(OutputError(f"output{i}", max_abs, max_rel, tuple(a.shape)))
    return result


def verify_torch(original: torch.nn.Module, rewritten: torch.nn.Module, example_inputs,
                 dtype: torch.dtype | None = None, tolerance: float | None = None) -> VerifyResult:
    """Run both modules on the inputs (cast to `dtype` if given) and compare every output."""
    inputs = as_tuple(example_inputs)
    if not inputs:
        raise RewriteError("verification of a torch model needs example_inputs")
    if dtype is not None:
        original = copy.deepcopy(original).to(dtype)
        rewritten = copy.deepcopy(rewritten).to(dtype)
        inputs = tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in inputs)
    run_dtype = dtype or _first_float_dtype(inputs)
    with torch.no_grad(), preserved_buffers(original), preserved_buffers(rewritten):
        reference = original(*inputs)
        candidate = rewritten(*inputs)
    tol = tolerance if tolerance is not None else DEFAULT_TOLERANCE.get(run_dtype, 1e-5)
    return compare_outputs(reference, candidate, tol, str(run_dtype).replace("torch.", ""))


def _first_float_dtype(inputs) -> torch.dtype:
    for t in inputs:
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            return t.dtype
    return torch.float32


def verify(original, rewritten, example_inputs=None, dtype=None, tolerance: float | None = None,
           **options) -> VerifyResult:
    """Max absolute and relative error of each output of `rewritten` against `original`.

    Torch modules run in torch (optionally cast to `dtype`, e.g. torch.float64). ONNX models or
    paths run in onnxruntime, on random inputs drawn from the declared shapes when
    `example_inputs` is None.
    """
    from .frontends import frontend_for

    return frontend_for(original).verify(original, rewritten, example_inputs, dtype=dtype, tolerance=tolerance,
                                         **options)
