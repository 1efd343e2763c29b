"""Where an `apply` call spends its time: capture, analysis, rule work, parameter arithmetic, writing back, copying.

    python benchmarks/profile_phases.py                       # every benchmark model of run_all.py
    python benchmarks/profile_phases.py --models resnet50 repvgg_a0

Wall-clock timers around the phases (cProfile's per-call overhead inflates Python-heavy phases
such as tracing several times over, so its shares mislead). Phases, outermost first:
- capture: torch.fx tracing of the model's forward;
- shapes: the one pass over the traced graph that records shapes, on meta tensors or by running the
  model (only with example inputs);
- import: fx graph -> IR;
- analysis: the channel analysis of remove_channels (rewrite.analysis);
- arithmetic: rewrite.params and rewrite.numerics.kernels (float64 folds, kernel composition, checks);
- rules: the passes, less the analysis and arithmetic inside them;
- copying: deep copies of the original modules an output keeps (fx_emit._clone);
- write back: IR -> GraphModule (code generation, recompilation), less the copying;
- gc: the one collection at the end of apply; other: the rest.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(__file__))
import rewrite  # noqa: E402
from rewrite.testing import randomize_bn  # noqa: E402

_TOTALS: dict[str, float] = defaultdict(float)
_CLOCK = [time.perf_counter]  # time.process_time with --cpu-time


def _clock() -> float:
    return _CLOCK[0]()

_STACK: list[list] = []  # [phase, start, time spent in nested phases]


def _timed(phase: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if _STACK and _STACK[-1][0] == phase:  # a recursive call of the same phase counts once
            return fn(*args, **kwargs)
        frame = [phase, _clock(), 0.0]
        _STACK.append(frame)
        try:
            return fn(*args, **kwargs)
        finally:
            _STACK.pop()
            spent = _clock() - frame[1]
            _TOTALS[phase] += spent - frame[2]
            if _STACK:
                _STACK[-1][2] += spent
    wrapper.__wrapped_phase__ = True
    return wrapper


def _patch_everywhere(module_name: str, attribute: str, phase: str) -> None:
    """Wrap `module.attribute` wherever it is bound (modules import functions by name)."""
    original = getattr(sys.modules[module_name], attribute)
    wrapped = _timed(phase, original)
    for module in list(sys.modules.values()):
        name = getattr(module, "__name__", "") or ""
        if not (name.startswith("rewrite") or name.startswith("passes")):
            continue
        for key, value in list(vars(module).items()):
            if value is original:
                setattr(module, key, wrapped)


def install() -> None:
    import importlib

    for name in ("rewrite.passes", "rewrite.frontends.fx", "rewrite.frontends.capture", "rewrite.frontends.fx_emit", "rewrite.params",
                 "rewrite.numerics.kernels", "rewrite.analysis.channels", "rewrite.api"):
        importlib.import_module(name)
    import rewrite.api as api
    import rewrite.frontends.fx as fx_frontend
    import rewrite.frontends.fx_emit as fx_emit
    import rewrite.frontends.fx_import as fx_import

    import rewrite.frontends.capture as capture

    capture.trace = _timed("capture", capture.trace)
    fx_frontend._ShapeRecorder.run = _timed("shapes", fx_frontend._ShapeRecorder.run)
    fx_frontend.record_meta_shapes = _timed("shapes", fx_frontend.record_meta_shapes)
    fx_import.FxImporter.run = _timed("import", fx_import.FxImporter.run)
    fx_emit.FxEmitter.run = _timed("write back", fx_emit.FxEmitter.run)
    fx_emit._clone = _timed("copying", fx_emit._clone)
    api._gc_paused = _gc_timed(api._gc_paused)
    from rewrite.pass_manager import Pass, available_passes

    for p in available_passes().values():
        cls = type(p)
        if "run" in vars(cls) and not getattr(cls.run, "__wrapped_phase__", False):
            cls.run = _timed("rules", cls.run)
    for module_name in ("rewrite.params", "rewrite.numerics.kernels"):
        module = sys.modules[module_name]
        for key, value in list(vars(module).items()):
            if callable(value) and getattr(value, "__module__", None) == module_name and not isinstance(value, type):
                _patch_everywhere(module_name, key, "arithmetic")
    channels = sys.modules["rewrite.analysis.channels"]
    for key, value in list(vars(channels).items()):
        if callable(value) and getattr(value, "__module__", None) == channels.__name__ and not key.startswith("_"):
            if isinstance(value, type):
                continue
            _patch_everywhere(channels.__name__, key, "analysis")
    del Pass


def _gc_timed(original):
    import contextlib
    import gc

    @contextlib.contextmanager
    def paused():
        gc.disable()
        try:
            yield
        finally:
            gc.enable()
            start = _clock()
            gc.collect(1)
            _TOTALS["gc"] += _clock() - start
    return paused


def _model(name: str):
    import timm
    import torchvision

    torch.manual_seed(0)
    if name == "resnet50_dead":
        from bench_remove_channels import slimmed_resnet50

        return slimmed_resnet50(zero_beta=True)[0], ["remove_channels"], torch.randn(1, 3, 224, 224)
    if hasattr(torchvision.models, name):
        return randomize_bn(getattr(torchvision.models, name)(), seed=0).eval(), ["fold_bn"], None
    return randomize_bn(timm.create_model(name).eval(), seed=0), ["fold_bn", "fuse_branches"], None


PHASES = ("capture", "shapes", "import", "analysis", "arithmetic", "rules", "copying", "write back", "gc", "other")


def profile(name: str, repeat: int) -> tuple[float, dict[str, float]]:
    model, passes, x = _model(name)
    rewrite.apply(model, passes, example_inputs=x)  # warm-up
    best_total, best = float("inf"), {}
    for _ in range(repeat):
        _TOTALS.clear()
        start = _clock()
        rewrite.apply(model, passes, example_inputs=x)
        total = _clock() - start
        if total < best_total:
            best_total, best = total, dict(_TOTALS)
    best["other"] = best_total - sum(best.values())
    return best_total, best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*",
                        default=["resnet50", "resnet152", "repvgg_a0", "mobileone_s0", "repvgg_b1", "resnet50_dead"])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--cpu-time", action="store_true",
                        help="this process's CPU time instead of wall time (a shared, oversubscribed machine)")
    args = parser.parse_args()
    if args.cpu_time:
        _CLOCK[0] = time.process_time
    torch.set_num_threads(1)
    install()
    print("| model | total | " + " | ".join(PHASES) + " |")
    print("|---|---|" + "---|" * len(PHASES))
    for name in args.models:
        total, shares = profile(name, args.repeat)
        cells = " | ".join(f"{100 * shares.get(p, 0.0) / total:.0f}%" for p in PHASES)
        print(f"| {name} | {total * 1e3:.0f} ms | {cells} |", flush=True)


if __name__ == "__main__":
    main()
