"""`rewrite.apply`: load a model into the IR, run passes, check them, and give back the same kind of model."""
from __future__ import annotations

import gc
import time
from collections import Counter
from contextlib import contextmanager
from typing import Any, Sequence

from .errors import EquivalenceError, NotVerifiableError, RewriteError
from .frontends import frontend_for
from .ir import Graph
from .errors import PassError
from .pass_manager import Pass, _near, get_pass
from .rule import Rule
from .progress import progress_bar
from .report import PassReport, Report
from .report_html import snapshot
from .verify import record_passes


def op_counts(graph: Graph) -> dict[str, int]:
    return dict(Counter(node.kind for node in graph.nodes if node.kind != "constant"))


@contextmanager
def _gc_paused():
    """Run without the cyclic collector, then collect once what this call left behind.

    Rewriting allocates many small objects and frees most by reference counting. With the collector
    on, it rescanned the growing heap again and again (long graphs went superlinear). The IR is
    cyclic (graph <-> nodes <-> values), so what a call discards is only freed by the collector: one
    collection of the young generations afterwards (everything this call allocated is young, since
    nothing was promoted while paused) frees it in one linear scan, and no garbage outlives the call.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
            gc.collect(1)


_APPLY_KEYWORDS = ("passes", "example_inputs", "verify", "return_report", "inplace", "options", "tolerance",
                   "progress")


def _checked_options(options: dict | None, passes: list[Pass]) -> dict:
    """Options keyed by the name of a pass of this call, each checked by its pass."""
    if options is not None and not isinstance(options, dict):
        raise PassError(f"options must be a dict of pass name -> its options, not {type(options).__name__}")
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
          tolerance: float | None = None, progress: bool = False, **frontend_options):
    """Rewrite `model` with `passes` and return a model of the same kind.

    model: an nn.Module, a torch.export ExportedProgram, an onnx.ModelProto or a path to a .onnx file.
    passes: names ("fold_bn") or Pass / Rule objects, run in order.
    example_inputs: inputs for shape inference and verification (ONNX can draw random ones).
    verify: after each pass, compare against the original and raise EquivalenceError past the tolerance.
    return_report: return (model, report) instead of the model.
    inplace: allow the result to share modules and tensors with `model` (never changes its math).
    options: per-pass options, e.g. {"remove_channels": {"threshold": 1e-3}}.
    progress: show a progress bar (tqdm, on stderr) over the passes and their verification.
    frontend_options: for torch modules, concrete_args / leaf_modules for tracing and capture="auto" (trace,
        and export with torch.export if tracing fails), "fx" (trace only) or "export" (torch.export only).
    """
    with _gc_paused():
        return _apply(model, passes, example_inputs, verify, return_report, inplace, options, tolerance, progress,
                      frontend_options)


def _apply(model, passes, example_inputs, verify, return_report, inplace, options, tolerance, progress,
           frontend_options):
    frontend = frontend_for(model)
    if isinstance(passes, (str, Pass, Rule)):
        passes = [passes]
    if not isinstance(passes, (list, tuple)):
        raise PassError(f"passes must be a pass name, a Pass or a list of them, not {type(passes).__name__}")
    pass_objects = [get_pass(p) for p in passes]
    options = _checked_options(options, pass_objects)
    unknown = [k for k in frontend_options if k not in frontend.options]
    if unknown:
        raise RewriteError(f"apply() got unknown keyword argument(s) {', '.join(map(repr, unknown))}"
                           f"{_near(unknown[0], _APPLY_KEYWORDS + frontend.options)}; "
                           f"{frontend.name} models also take: {', '.join(frontend.options) or 'nothing else'}")
    graph = frontend.load(model, example_inputs, **frontend_options)
    report = Report(frontend.name, nodes_before=op_counts(graph), graph_before=snapshot(graph),
                    capture=graph.meta.get("capture_note", ""))
    if verify and example_inputs is None and frontend.name == "torch":
        raise RewriteError("verify=True needs example_inputs for a torch model")
    reference = frontend.reference(model, example_inputs, tolerance=tolerance) if verify else None
    with progress_bar(len(pass_objects) * (2 if verify else 1), enabled=progress) as bar:
        for p in pass_objects:
            bar.set_description(p.name)
            start = time.perf_counter()
            result = p.run(graph, dict(options.get(p.name, {}), example_inputs=example_inputs))
            graph.eliminate_dead_code()  # what a pass left unread (a custom Pass need not erase it)
            entry = PassReport(result, seconds=time.perf_counter() - start)
            report.passes.append(entry)
            bar.update()
            if verify:
                bar.set_description(f"verify {p.name}")
                entry.verification = _check_pass(frontend, graph, reference, p.name)
                bar.update()
    report.nodes_after = op_counts(graph)
    report.graph_after = snapshot(graph)
    graph.meta["final_export"] = True  # nothing reads the graph's tensors after this: a frontend may let them go
    out = frontend.export(graph, copy_originals=not inplace)
    report.notes = frontend.notes(graph)  # after the export, which counts what it wrote back
    record_passes(out, pass_objects, options)
    graph.dispose()  # freed now by reference counting: less left for the collection when apply ends
    return (out, report) if return_report else out


def _check_pass(frontend, graph: Graph, reference, pass_name: str):
    """Write the graph back and judge it; anything that goes wrong is an EquivalenceError naming the pass."""
    try:
        candidate = frontend.checkable(graph)
        verification = reference.check(candidate)
    except RewriteError as exc:
        raise EquivalenceError(f"the rewritten model cannot be checked: {exc}", where=f"pass {pass_name}") from exc
    except Exception as exc:
        raise EquivalenceError(f"the rewritten model cannot be checked: {type(exc).__name__}: {exc}",
                               where=f"pass {pass_name}") from exc
    if not verification.ok:
        if not verification.changed:  # equal, but nothing was compared: no verdict either way
            raise NotVerifiableError(f"the outputs cannot be compared: {verification}", where=f"pass {pass_name}")
        raise EquivalenceError(f"outputs changed: {verification}", where=f"pass {pass_name}")
    return verification
