"""Capture time of the two paths, symbolic_trace (fx) and torch.export, side by side (one process).

    python benchmarks/bench_capture.py            # resnet50 and timm's mobileone_s0
    python benchmarks/bench_capture.py --quick    # one repeat

For each model: the raw capture (torch.fx.symbolic_trace vs torch.export.export), the whole import
into the IR by each path (capture, shapes, parameter folding, import), the ratio export / fx, and
capture="auto" against capture="fx" on a model fx traces (goal: ratio 1, auto costs nothing there).
"""
from __future__ import annotations

import argparse
import os
import sys

import timm
import torch
import torchvision

sys.path.insert(0, os.path.dirname(__file__))
from common import best_time, paired_best  # noqa: E402
from rewrite.frontends.fx import import_module  # noqa: E402
from rewrite.testing import randomize_bn  # noqa: E402


def models():
    yield "resnet50", torchvision.models.resnet50()
    yield "mobileone_s0", timm.create_model("mobileone_s0")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    repeat = 1 if parser.parse_args().quick else 3
    torch.set_num_threads(1)
    x = torch.randn(1, 3, 224, 224)
    print(f"{'model':<14} {'trace s':>8} {'export s':>9} {'ratio':>7} {'import fx s':>12} {'import export s':>16} "
          f"{'ratio':>7} {'auto/fx':>8}")
    for name, model in models():
        torch.manual_seed(0)
        model = randomize_bn(model, seed=0).eval()
        trace_s = best_time(lambda: torch.fx.symbolic_trace(model), repeat=repeat)
        export_s = best_time(lambda: torch.export.export(model, (x,), strict=False), repeat=repeat, warmup=0)
        fx_s = best_time(lambda: import_module(model, x, capture="fx"), repeat=repeat)
        ex_s = best_time(lambda: import_module(model, x, capture="export"), repeat=repeat, warmup=0)
        auto_s, fx_again = paired_best(lambda: import_module(model, x, capture="auto"),
                                       lambda: import_module(model, x, capture="fx"), repeat)
        print(f"{name:<14} {trace_s:>8.3f} {export_s:>9.2f} {export_s / trace_s:>7.0f} {fx_s:>12.3f} {ex_s:>16.2f} "
              f"{ex_s / fx_s:>7.1f} {auto_s / fx_again:>8.2f}", flush=True)


if __name__ == "__main__":
    main()
