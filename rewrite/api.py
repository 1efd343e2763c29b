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
from .pass_manager import Pass, get_pass
from .report import PassReport, Report
from .report_html import snapshot
from .verify import record_passes


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
    if isinstance(passes, (str, Pass)):
        passes = [passes]
    pass_objects = [get_pass(p) for p in passes]
    graph = frontend.load(model, example_inputs, **frontend_options)
    report = Report(frontend.name, nodes_before=op_counts(graph), graph_before=snapshot(graph))
    options = options or {}
    if verify and example_inputs is None and frontend.name == "torch":
        raise RewriteError("verify=True needs example_inputs for a torch model")
    reference = frontend.reference(model, example_inputs, tolerance=tolerance) if verify else None
    for p in pass_objects:
        start = time.perf_counter()
        result = p.run(graph, dict(options.get(p.name, {}), example_inputs=example_inputs))
        entry = PassReport(result, seconds=time.perf_counter() - start)
        report.passes.append(entry)
        if verify:
            entry.verification = _check_pass(frontend, graph, reference, p.name)
    report.nodes_after = op_counts(graph)
    report.graph_after = snapshot(graph)
    out = frontend.export(graph, copy_originals=not inplace)
    record_passes(out, pass_objects, options)
    return (out, report) if return_report else out


def _check_pass(frontend, graph: Graph, reference, pass_name: str):
    """Write the graph back and judge it; anything that goes wrong is an EquivalenceError naming the pass."""
    try:
        candidate = frontend.export(graph, copy_originals=False)
        verification = reference.check(candidate)
    except RewriteError as exc:
        raise EquivalenceError(f"the rewritten model cannot be checked: {exc}", where=f"pass {pass_name}") from exc
    except Exception as exc:
        raise EquivalenceError(f"the rewritten model cannot be checked: {type(exc).__name__}: {exc}",
                               where=f"pass {pass_name}") from exc
    if not verification.ok:
        raise EquivalenceError(f"outputs changed: {verification}", where=f"pass {pass_name}")
    return verification
