"""Numerical equivalence checks between an original model and its rewrite.

A rewrite of a float32 (or float16 / bfloat16) model is judged against a float64 reference of the
original: the original's weights cast to float64 and run in float64. The original itself, run in its
own dtype, is some distance from that reference (rounding grows with depth); the rewrite passes when
its own distance is within a small factor of the original's, plus a floor of a few units in the last
place. So a deep net whose float32 noise is 1e-4 is not rejected for noise, and a wrong axis or a lost
bias, which is off by orders of magnitude more, still fails. A float64 model is held to 1e-10, and a
`tolerance=` override replaces the judgement by a fixed bound on the relative error against the original.

Errors are relative to the reference's largest magnitude per output (max|a - b| / max|ref|). Before the
numbers, each output's structure, dtype, device and shape must match. Torch models run in torch; ONNX
models run in onnxruntime (see rewrite.frontends.onnx_verify).
"""
from __future__ import annotations

import math

import copy
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._pytree import MappingKey, keystr, tree_flatten, tree_flatten_with_path, tree_map

from .errors import RewriteError
from .frontends.fx import as_tuple, preserved_buffers

DEFAULT_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}
FLOAT64_REFERENCE = "float64 copy of the original"
EXACT_TOLERANCE = 1e-10  # a float64 copy rewritten must match to this
NOISE_FACTOR = 4.0  # the rewrite may be this many times further from the float64 reference than the original
ULP_FLOOR = 16  # ... plus this many units in the last place of the output's scale (and of 1, for zero outputs)


@dataclass
class OutputError:
    """One output. max_abs / max_rel: rewritten against the original, in the model's own dtype.
    original_error / rewritten_error: each against the float64 reference (relative); `allowed` bounds
    rewritten_error. The last three are None when there was no float64 reference."""

    name: str
    max_abs: float
    max_rel: float
    shape: tuple
    original_error: float | None = None
    rewritten_error: float | None = None
    allowed: float | None = None
    ok: bool = True

    def __str__(self) -> str:
        text = f"{self.name}: max abs {self.max_abs:.3e}, max rel {self.max_rel:.3e}"
        if self.rewritten_error is not None:
            text += (f" (vs float64: original {self.original_error:.1e}, rewritten {self.rewritten_error:.1e}, "
                     f"allowed {self.allowed:.1e})")
        return text


@dataclass
class VerifyResult:
    outputs: list[OutputError] = field(default_factory=list)
    tolerance: float | None = 1e-5  # a fixed bound on max_rel, or None: judged against the float64 reference
    dtype: str = "float32"
    problems: list[str] = field(default_factory=list)  # structure, dtype, device or shape mismatches; crashes
    # outputs that prove nothing when equal (empty, or not one finite value): the check is not a verdict
    uncomparable: list[str] = field(default_factory=list)
    reference: str = "float64 copy of the original"
    exact: "VerifyResult | None" = None  # verify(..., exact=True): a float64 copy rewritten, checked at 1e-10

    @property
    def max_abs(self) -> float:
        return max((o.max_abs for o in self.outputs), default=0.0)

    @property
    def max_rel(self) -> float:
        return max((o.max_rel for o in self.outputs), default=0.0)

    @property
    def original_error(self) -> float | None:
        return _max_known(o.original_error for o in self.outputs)

    @property
    def rewritten_error(self) -> float | None:
        return _max_known(o.rewritten_error for o in self.outputs)

    @property
    def ok(self) -> bool:
        return not self.problems and not self.uncomparable and all(o.ok for o in self.outputs) and (
            self.exact is None or self.exact.ok)

    @property
    def changed(self) -> bool:
        """Did some output differ (or differ in kind, shape, dtype), as opposed to not being comparable?"""
        return bool(self.problems) or not all(o.ok for o in self.outputs) or (
            self.exact is not None and self.exact.changed)

    def summary(self) -> str:
        """One line: the verdict and the two errors a user compares."""
        verdict = "ok" if self.ok else "FAILED"
        if self.problems or self.uncomparable:
            return f"{verdict}: " + "; ".join(self.problems + self.uncomparable)
        if self.rewritten_error is not None:
            text = (f"{verdict} ({self.dtype}): original {self.dtype} error {self.original_error:.1e}, "
                    f"rewritten {self.rewritten_error:.1e} against the {self.reference}")
        else:
            text = f"{verdict} ({self.dtype}, tolerance {self.tolerance:g}): max rel {self.max_rel:.1e}"
            if self.reference != "original":
                text += f" against the {self.reference}"
        if self.exact is not None:
            text += f"; float64 copy rewritten: max rel {self.exact.max_rel:.1e} (bound {EXACT_TOLERANCE:g})"
        return text

    def __str__(self) -> str:
        rows = "; ".join(str(o) for o in self.outputs if not o.ok) or "; ".join(str(o) for o in self.outputs[:4])
        return f"{self.summary()}" + (f" [{rows}]" if rows and not self.problems and not self.uncomparable else "")

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "dtype": self.dtype, "reference": self.reference, "tolerance": self.tolerance,
                "max_abs": self.max_abs, "max_rel": self.max_rel, "original_error": self.original_error,
                "rewritten_error": self.rewritten_error, "problems": list(self.problems),
                "uncomparable": list(self.uncomparable),
                "outputs": [dict(vars(o), shape=list(o.shape)) for o in self.outputs],
                "exact": None if self.exact is None else self.exact.to_dict()}


def _max_known(values) -> float | None:
    known = [v for v in values if v is not None]
    return max(known) if known else None


# -- comparing outputs -------------------------------------------------------------------------
def _leaves(outputs) -> tuple[list[tuple[str, Any]], Any]:
    pairs, spec = tree_flatten_with_path(outputs)
    return [(_leaf_name(path), leaf) for path, leaf in pairs], spec


def _leaf_name(path) -> str:
    """'output' for a lone tensor, a dict's key for its entries ('logits', 'scores[0]'), else 'output[0]'."""
    if path and isinstance(path[0], MappingKey):
        return str(path[0].key) + keystr(path[1:])
    return "output" + keystr(path)


def _rel(diff: float, scale: float) -> float:
    return diff / scale if scale > 0 else diff


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a - b| over the finite values; NaN and inf must sit at the same places in both (a model whose
    weights hold NaN gives NaN, and so must its rewrite), else the difference is inf."""
    if not a.numel():
        return 0.0
    finite = torch.isfinite(a) & torch.isfinite(b)
    if not bool(finite.all()):
        same = (a == b) | (torch.isnan(a) & torch.isnan(b))
        if not bool((finite | same).all()):
            return math.inf
        a, b = a[finite], b[finite]
    return float((a - b).abs().max()) if a.numel() else 0.0


def _scale(a: torch.Tensor) -> float:
    finite = a[torch.isfinite(a)]
    return float(finite.abs().max()) if finite.numel() else 0.0


def _structure_problem(name: str, a, b) -> str | None:
    """Why two leaves cannot be compared numerically: kind, dtype, device or shape differ."""
    if isinstance(a, torch.Tensor) != isinstance(b, torch.Tensor):
        return f"{name} is a {type(b).__name__}, the original's a {type(a).__name__}"
    if not isinstance(a, torch.Tensor):
        return None if a == b else f"{name} is {b!r}, the original's {a!r}"
    if a.dtype != b.dtype:
        return f"{name} has dtype {str(b.dtype).replace('torch.', '')}, the original's {str(a.dtype).replace('torch.', '')}"
    if a.device != b.device:
        return f"{name} is on {b.device}, the original's on {a.device}"
    if a.shape != b.shape:
        return f"{name} has shape {tuple(b.shape)}, the original's {tuple(a.shape)}"
    return None


def judge(original, rewritten, reference=None, tolerance: float | None = None,
          reference_name: str = "original") -> VerifyResult:
    """Compare the outputs of `rewritten` with those of `original` (and both with a float64 `reference`).

    original / rewritten / reference: output trees (tensors, tuples, lists, dicts). Without a reference,
    or with a fixed `tolerance`, max_rel against the original decides.
    """
    ref_leaves, ref_spec = _leaves(original)
    cand_leaves, cand_spec = _leaves(rewritten)
    dtype = next((str(t.dtype).replace("torch.", "") for _, t in ref_leaves
                  if isinstance(t, torch.Tensor) and t.is_floating_point()), "float32")
    result = VerifyResult(tolerance=tolerance, dtype=dtype, reference=reference_name)
    if ref_spec != cand_spec:
        result.problems.append(f"the rewritten model returns {_shape_of(cand_spec)}, the original {_shape_of(ref_spec)}")
        return result
    high = [leaf for _, leaf in _leaves(reference)[0]] if reference is not None else [None] * len(ref_leaves)
    for (name, a), (_, b), r in zip(ref_leaves, cand_leaves, high):
        problem = _structure_problem(name, a, b)
        if problem:
            result.problems.append(problem)
            continue
        if not isinstance(a, torch.Tensor):
            continue
        problem = _nothing_to_compare(name, a)
        if problem:
            result.uncomparable.append(problem)
            continue
        result.outputs.append(_judge_tensor(name, a, b, r, tolerance))
    if tolerance is None and reference is None:
        result.tolerance = DEFAULT_TOLERANCE.get(getattr(torch, dtype), 1e-5)
    return result


def _nothing_to_compare(name: str, a: torch.Tensor) -> str | None:
    """Why an output proves nothing when equal: it is empty, or no value of it is finite (equal infinities
    and NaNs at the same places count as equal, so every rewrite would pass)."""
    if not a.numel():
        return f"{name} is empty (shape {tuple(a.shape)}): nothing to compare; give inputs with at least one element"
    if a.is_floating_point() and not bool(torch.isfinite(a).any()):
        return (f"none of the {a.numel()} values of {name} is finite in the original (inf or NaN): the comparison "
                "would prove nothing; give inputs (or BN statistics) that keep the model's outputs finite")
    return None


def _shape_of(spec) -> str:
    text = str(spec)
    return text if len(text) < 120 else text[:117] + "..."


def _judge_tensor(name: str, a: torch.Tensor, b: torch.Tensor, high, tolerance: float | None) -> OutputError:
    a64, b64 = a.detach().cpu().double(), b.detach().cpu().double()
    max_abs = _max_diff(a64, b64)
    entry = OutputError(name, max_abs, _rel(max_abs, _scale(a64)), tuple(a.shape))
    if not a.is_floating_point():  # integer and boolean outputs must be equal
        entry.ok = max_abs == 0
        return entry
    if high is not None and a.dtype != torch.float64:
        h64 = high.detach().cpu().double()
        scale = _scale(h64)
        eps = torch.finfo(a.dtype).eps
        entry.original_error = _rel(_max_diff(a64, h64), scale)
        entry.rewritten_error = _rel(_max_diff(b64, h64), scale)
        # the floor is relative to the scale, or absolute for an all-zero reference (_rel)
        entry.allowed = NOISE_FACTOR * entry.original_error + ULP_FLOOR * eps
    if tolerance is not None:
        entry.ok = entry.max_rel <= tolerance
    elif entry.allowed is not None:
        entry.ok = entry.rewritten_error <= entry.allowed
    else:
        entry.ok = entry.max_rel <= DEFAULT_TOLERANCE.get(a.dtype, 1e-5)
    return entry


def compare_outputs(reference, candidate, tolerance: float, dtype: str = "") -> VerifyResult:
    """Candidate against reference at a fixed relative tolerance (no float64 reference)."""
    return judge(reference, candidate, tolerance=tolerance)


# -- torch -------------------------------------------------------------------------------------
def cast_floats(tree, dtype: torch.dtype):
    """`tree` with its floating tensors cast to `dtype` (integer and boolean tensors kept)."""
    return tree_map(lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t, tree)


def float64_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of `module` with its floating parameters and buffers in float64."""
    return copy.deepcopy(module).to(torch.float64)


def _run(module: torch.nn.Module, inputs: tuple):
    with torch.no_grad(), preserved_buffers(module):
        return module(*inputs)


def _failure(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


class TorchReference:
    """The original's outputs, in its own dtype and from a float64 copy, computed once and reused to
    judge any number of rewrites (apply(..., verify=True) checks after every pass)."""

    def __init__(self, original: torch.nn.Module, example_inputs, tolerance: float | None = None):
        self.inputs = as_tuple(example_inputs)
        if not self.inputs:
            raise RewriteError("verification of a torch model needs example_inputs")
        self.tolerance = tolerance
        try:
            self.outputs = _run(original, self.inputs)
        except Exception as exc:  # the user's model on the user's inputs: bad input, said as such
            raise RewriteError(f"the original model does not run on the example inputs "
                               f"({len(self.inputs)} given): {_failure(exc)}", where="example_inputs") from exc
        self.high = None
        self.reference_name = "original"
        if tolerance is None and _floating_below_64(self.outputs):
            try:
                self.high = _run(float64_copy(original), cast_floats(self.inputs, torch.float64))
                self.reference_name = FLOAT64_REFERENCE
            except Exception as exc:  # the model cannot run in float64: judge against itself, and say so
                self.reference_name = f"original (its float64 copy does not run: {_failure(exc)})"

    def check(self, rewritten: torch.nn.Module) -> VerifyResult:
        try:
            candidate = _run(rewritten, self.inputs)
        except Exception as exc:
            result = VerifyResult(tolerance=self.tolerance, reference=self.reference_name)
            result.problems.append(f"the rewritten model does not run: {_failure(exc)}")
            return result
        high = _matching_high(self.high, self.outputs)
        return judge(self.outputs, candidate, high, self.tolerance, self.reference_name)


def _floating_below_64(outputs) -> bool:
    leaves, _ = tree_flatten(outputs)
    return any(isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64 for t in leaves)


def _matching_high(high, outputs):
    """The float64 outputs, if they have the original's structure (a model may branch on dtype)."""
    if high is None:
        return None
    h, h_spec = tree_flatten(high)
    o, o_spec = tree_flatten(outputs)
    if h_spec != o_spec or any(isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor) or
                               (isinstance(x, torch.Tensor) and x.shape != y.shape) for x, y in zip(h, o)):
        return None
    return high


def verify_torch(original: torch.nn.Module, rewritten: torch.nn.Module, example_inputs,
                 dtype: torch.dtype | None = None, tolerance: float | None = None) -> VerifyResult:
    """Run both modules on the inputs and compare every output (see the module docstring).

    dtype: cast both modules and the floating inputs to it first. A float64 cast of a lower-precision
    rewrite keeps that rewrite's rounding; to check the rewrite itself use verify(..., exact=True).
    """
    inputs = as_tuple(example_inputs)
    if dtype is not None:
        original = copy.deepcopy(original).to(dtype)
        rewritten = copy.deepcopy(rewritten).to(dtype)
        inputs = cast_floats(inputs, dtype)
    return TorchReference(original, inputs, tolerance).check(rewritten)


# -- what apply did, for exact=True ------------------------------------------------------------
_APPLIED: "weakref.WeakKeyDictionary[Any, tuple[list, dict]]" = weakref.WeakKeyDictionary()


def record_passes(model: Any, passes: list, options: dict) -> None:
    """Remember which passes produced `model` (in memory, for verify(..., exact=True))."""
    try:
        _APPLIED[model] = (list(passes), copy.deepcopy(options))
    except TypeError:  # not weak-referenceable (an onnx.ModelProto): pass `passes=` to verify
        pass


def recorded_passes(model: Any) -> tuple[list, dict] | None:
    try:
        return _APPLIED.get(model)
    except TypeError:
        return None


def verify(original, rewritten, example_inputs=None, dtype=None, tolerance: float | None = None,
           exact: bool = False, passes=None, options: dict | None = None, **frontend_options) -> VerifyResult:
    """Errors of each output of `rewritten` against `original` (see the module docstring).

    Torch modules run in torch (optionally cast to `dtype`); ONNX models or paths run in onnxruntime,
    on random inputs drawn from the declared shapes when `example_inputs` is None.

    exact=True also rewrites a float64 copy of `original` with the same passes (those `apply` used to
    make `rewritten`, or `passes=` / `options=`) and checks it at 1e-10 (`result.exact`): a rewrite that
    is exact there and off in float32 is rounding; one that is off there is wrong.
    """
    from .frontends import frontend_for

    frontend = frontend_for(original)
    if dtype == torch.float64 and _lower_precision(rewritten):
        # Casting a float32 rewrite to float64 keeps its float32 rounding: check the rewrite itself.
        if passes is None and recorded_passes(rewritten) is None:
            raise RewriteError("dtype=torch.float64 on a lower-precision rewrite compares rounded weights and "
                               "cannot meet 1e-10; use exact=True with passes=[...] to rewrite a float64 copy")
        return exact_check(original, rewritten, example_inputs, passes, options, frontend_options)
    result = frontend.verify(original, rewritten, example_inputs, dtype=dtype, tolerance=tolerance,
                             **frontend_options)
    if exact:
        result.exact = exact_check(original, rewritten, example_inputs, passes, options, frontend_options)
    return result


def _lower_precision(model) -> bool:
    if not isinstance(model, torch.nn.Module):
        return False
    tensors = list(model.parameters()) + list(model.buffers())
    return any(t.is_floating_point() and t.dtype != torch.float64 for t in tensors)


def exact_check(original, rewritten, example_inputs, passes, options, frontend_options) -> VerifyResult:
    """Rewrite a float64 copy of `original` with the passes that made `rewritten` and check it at 1e-10."""
    from .api import apply
    from .frontends import frontend_for

    if passes is None:
        recorded = recorded_passes(rewritten)
        if recorded is None:
            raise RewriteError("exact=True needs the passes that made the rewritten model: pass passes=[...] "
                               "(only a model returned by rewrite.apply in this process remembers them)")
        passes, recorded_options = recorded
        options = options if options is not None else recorded_options
    frontend = frontend_for(original)
    high, high_inputs, note = frontend.float64_copy(original, example_inputs)
    high_rewritten = apply(high, passes, example_inputs=high_inputs, options=options, **frontend_options)
    try:
        result = frontend.verify(high, high_rewritten, high_inputs, tolerance=EXACT_TOLERANCE, **frontend_options)
    except RewriteError as exc:  # e.g. onnxruntime has no double kernel for an op: no exact check possible
        result = VerifyResult(tolerance=EXACT_TOLERANCE, dtype="float64")
        result.problems.append(f"the float64 copy cannot be run, so exactness is unchecked: {exc}")
    if note:
        result.problems.append(note)
    return result

