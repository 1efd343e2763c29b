"""Memory over repeated `rewrite.apply` calls in one process: nothing a call built may stay alive after it.

    python benchmarks/bench_memory.py              # 50 calls of fold_bn on torchvision resnet18
    python benchmarks/bench_memory.py --calls 10

Prints the resident set size (RSS) and the number of objects the cyclic GC tracks after the first
call and every 10 calls, and the growth per call after the first (goal: flat, well under 1 MB per call).
"""
from __future__ import annotations

import argparse
import gc
import os
import sys

import torch
import torchvision

sys.path.insert(0, os.path.dirname(__file__))
import rewrite  # noqa: E402
from rewrite.testing import randomize_bn  # noqa: E402


def rss_mb() -> float:
    """The current resident set size (Linux /proc), in MB."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--passes", default="fold_bn")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = randomize_bn(torchvision.models.resnet18(), seed=0).eval()
    x = torch.randn(1, 3, 224, 224)
    passes = args.passes.split(",")
    rss, objects = [], []
    for call in range(1, args.calls + 1):
        rewrite.apply(model, passes, example_inputs=x)  # the result is dropped at once
        rss.append(rss_mb())
        objects.append(len(gc.get_objects()))
        if call == 1 or call % 10 == 0:
            print(f"after {call:>3} calls: RSS {rss[-1]:8.1f} MB   gc-tracked objects {objects[-1]:>9}")
    if args.calls > 1:
        per_call = (rss[-1] - rss[0]) / (args.calls - 1)
        print(f"resnet18 {args.passes}: RSS growth per call after the first {per_call:+.2f} MB "
              f"({rss[0]:.0f} -> {rss[-1]:.0f} MB over {args.calls} calls); tracked objects "
              f"{objects[0]} -> {objects[-1]}   (goal: flat)")


if __name__ == "__main__":
    main()
