"""`rewrite.apply`: load a model into the IR, run passes, check them, and give back the same kind of model."""
from __future__ import annotations

import gc
import time
from collections import Counter
from contextlib import contextmanager
from typing import Any, Sequence

from .errors import EquivalenceError, RewriteError
from .frontends import frontend_for
from .ir import Graph
from .errors import PassError
from .pass_manager import Pass, _near, get_pass
from .rule import Rule
from .report import PassReport, Report


def op_counts(graph: Graph) -> dict[str, int]:
    return dict(Counter(node.kind for node in graph.nodes if node.kind != "constant"))


@contextmanager
def _gc_paused():
    """Run without the cyclic collector, then hand what was built to the oldest generation.

    Rewriting allocates many small objects and frees them by reference counting. With the collector
    on, it rescanned the growing heap again and again (long graphs went superlinear); re-enabled
    plainly, it would at once scan everything this call built as "young". freeze + unfreeze moves
    those objects to the oldest generation without a scan; they are collected with the rest of the
    program's long-lived objects. Skipped when the caller froze objects of its own.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            if gc.get_freeze_count() == 0:
                gc.freeze()
                gc.unfreeze()
            gc.enable()


_APPLY_KEYWORDS = ("passes", "example_inputs", "verify", "return_report", "inplace", "options", "tolerance")


def _checked_options(options: dict | None, passes: list[Pass]) -> dict:
    """Options keyed by the name of a pass of this call, each checked by its pass."""
    options = dict(options or {})
    by_name = {p.name: p for p in passes}
    for name, given in options.items():
        if name not in by_name:
            raise PassError(f"options given for {name!r}{_near(name, by_name)}, which is not a pass of this call "
                            f"({', '.join(by_name)})")
        by_name[name].check_options(given)
    return options


def apply(model: Any, passes: Sequence[str | Pass] = ("fold_bn",), example_inputs=None, verify: bool = False,
          return_report: bool = False, inplace: bool = False, options: dict | None = None,
          tolerance: float | None = None, **frontend_options):
    """Rewrite `model` with `passes` and return a model of the same kind.

    model: an nn.Module, an onnx.ModelProto or a path to a .onnx file.
    passes: names ("fold_bn") or Pass / Rule objects, run in order.
    example_inputs: inputs for shape inference and verification (ONNX can draw random ones).
    verify: after each pass, compare against the original and raise EquivalenceError past the tolerance.
    return_report: return (model, report) instead of the model.
    inplace: allow the result to share modules and tensors with `model` (never changes its math).
    options: per-pass options, e.g. {"remove_channels": {"threshold": 1e-3}}.
    frontend_options: concrete_args / leaf_modules for torch tracing.
    """
    with _gc_paused():
        return _apply(model, passes, example_inputs, verify, return_report, inplace, options, tolerance,
                      frontend_options)


def _apply(model, passes, example_inputs, verify, return_report, inplace, options, tolerance, frontend_options):
    frontend = frontend_for(model)
    if isinstance(passes, (str, Pass, Rule)):
        passes = [passes]
    pass_objects = [get_pass(p) for p in passes]
    options = _checked_options(options, pass_objects)
    unknown = [k for k in frontend_options if k not in frontend.options]
    if unknown:
        raise RewriteError(f"apply() got unknown keyword argument(s) {', '.join(map(repr, unknown))}"
                           f"{_near(unknown[0], _APPLY_KEYWORDS + frontend.options)}; "
                           f"{frontend.name} models also take: {', '.join(frontend.options) or 'nothing else'}")
    graph = frontend.load(model, example_inputs, **frontend_options)
    report = Report(frontend.name, nodes_before=op_counts(graph))
    if verify and example_inputs is None and frontend.name == "torch":
        raise RewriteError("verify=True needs example_inputs for a torch model")
    for p in pass_objects:
        start = time.perf_counter()
        result = p.run(graph, dict(options.get(p.name, {}), example_inputs=example_inputs))
        entry = PassReport(result, seconds=time.perf_counter() - start)
        report.passes.append(entry)
        if verify:
            candidate = frontend.export(graph, copy_originals=False)
            entry.verification = frontend.verify(model, candidate, example_inputs, tolerance=tolerance)
            if not entry.verification.ok:
                raise EquivalenceError(f"outputs changed: {entry.verification}", where=f"pass {p.name}")
    report.nodes_after = op_counts(graph)
    out = frontend.export(graph, copy_originals=not inplace)
    return (out, report) if return_report else out
