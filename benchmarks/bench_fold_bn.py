"""fold_bn on torch models, side by side with torch.fx.experimental.optimization.fuse (one process).

    python benchmarks/bench_fold_bn.py            # resnet50, resnet152 and the scaling chain
    python benchmarks/bench_fold_bn.py --quick    # fewer repeats

Prints the time ratio ours / fx (goal <= 0.5), both relative errors against the original, and
per-node cost of a synthetic conv-BN-ReLU chain at N = 250 ... 2000 (goal: linear growth).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn as nn
import torchvision
from torch.fx.experimental.optimization import fuse

sys.path.insert(0, os.path.dirname(__file__))
import rewrite  # noqa: E402
from common import best_time, paired_best, relative_error  # noqa: E402
from rewrite.testing import randomize_bn  # noqa: E402


def compare_with_fx(name: str, repeat: int) -> None:
    torch.manual_seed(0)
    model = randomize_bn(getattr(torchvision.models, name)(), seed=0).eval()
    x = torch.randn(1, 3, 224, 224)
    t_ours, t_fx = paired_best(lambda: rewrite.apply(model, ["fold_bn"]), lambda: fuse(model), repeat)
    ours, theirs = rewrite.apply(model, ["fold_bn"]), fuse(model)
    with torch.no_grad():
        ref = model(x)
        err_ours, err_fx = relative_error(ref, ours(x)), relative_error(ref, theirs(x))
    bn_left = sum(isinstance(m, nn.BatchNorm2d) for m in ours.modules())
    print(f"{name:<10} ours {t_ours * 1e3:8.1f} ms   fx.fuse {t_fx * 1e3:8.1f} ms   ratio {t_ours / t_fx:5.2f}   "
          f"rel err ours {err_ours:.2e}  fx {err_fx:.2e}   BN left {bn_left}")


def chain(n: int) -> nn.Module:
    layers = []
    for _ in range(n):
        layers += [nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()]
    return randomize_bn(nn.Sequential(*layers)).eval()


def scaling(repeat: int) -> None:
    times = {}
    for n in (250, 500, 1000, 2000):
        model = chain(n)
        times[n] = best_time(lambda: rewrite.apply(model, ["fold_bn"]), max(1, repeat // 2))
        nodes = 3 * n
        print(f"chain N={n:<5} {times[n] * 1e3:9.1f} ms   {times[n] / nodes * 1e6:7.1f} us per node")
    print(f"time(2000) / time(250) = {times[2000] / times[250]:.2f}   (linear: 8, goal <= 9)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    repeat = 3 if args.quick else 9
    torch.set_num_threads(1)
    for name in ("resnet50", "resnet152"):
        compare_with_fx(name, repeat)
    scaling(repeat)


if __name__ == "__main__":
    main()
