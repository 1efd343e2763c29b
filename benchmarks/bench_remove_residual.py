"""RM residual removal: parameters, FLOPs and CPU latency of the original network against the plain one.

    python benchmarks/bench_remove_residual.py [--models resnet18 resnet50 mobilenet_v2] [--batch 8] [--size 224]

Also prints what RMNet's own converters would give (their dense Dirac carry through the bottleneck's
3x3 conv) so the overhead can be compared. Random weights, randomized BN statistics; latency is the
median of several timed runs after warm-up, in one process, so the ratios are what to read.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision

import rewrite
from rewrite.analysis.cost import model_cost
from rewrite.testing import randomize_bn


def latency_ms(model, x, repeats: int) -> float:
    with torch.no_grad():
        for _ in range(2):
            model(x)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def rmnet_dense_params(model) -> int:
    """Parameters after RMNet's converters: dense Dirac carry, conv+BN fused, downsample merged."""
    total = 0
    blocks = [m for m in model.modules() if isinstance(m, (torchvision.models.resnet.BasicBlock,
                                                            torchvision.models.resnet.Bottleneck))]
    counted = set()
    for block in blocks:
        convs = [block.conv1, block.conv2] + ([block.conv3] if hasattr(block, "conv3") else [])
        c = block.conv1.in_channels
        for i, conv in enumerate(convs):
            k = conv.kernel_size[0] * conv.kernel_size[1]
            cin = conv.in_channels + (c if i > 0 else 0)
            cout = conv.out_channels + (c if i < len(convs) - 1 else 0)
            total += cout * cin // conv.groups * k + cout
        counted.update(id(p) for m in block.modules() for p in m.parameters())
    for m in model.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and id(m.weight) not in counted:
            total += m.weight.numel() + (m.weight.shape[0])  # BN folded: every conv gets a bias
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "resnet50", "mobilenet_v2"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"batch {args.batch}, {args.size}x{args.size}, {args.threads} threads, torch {torch.__version__}")
    header = f"{'model':<14}{'variant':<22}{'params (M)':>12}{'GFLOPs':>10}{'latency (ms)':>14}{'max rel err':>13}"
    print(header)
    print("-" * len(header))
    for name in args.models:
        torch.manual_seed(0)
        model = randomize_bn(getattr(torchvision.models, name)().eval())
        x = torch.randn(args.batch, 3, args.size, args.size)
        start = time.perf_counter()
        folded = rewrite.apply(model, ["fold_bn"], example_inputs=x[:1])
        plain, report = rewrite.apply(model, ["remove_residual", "fold_bn", "fuse_branches"], example_inputs=x[:1],
                                      return_report=True)
        seconds = time.perf_counter() - start
        assert report.nodes_after.get("add", 0) == 0, report.nodes_after
        check = rewrite.verify(model, plain, x[:2])
        rows = [("original", model), ("BN folded (residual)", folded), ("RM plain", plain)]
        measured = {}
        for label, m in rows:
            cost = model_cost(m, x)
            ms = latency_ms(m, x, args.repeats)
            measured[label] = (cost, ms)
            err = f"{check.max_rel:.1e}" if label == "RM plain" else ""
            print(f"{name:<14}{label:<22}{cost.params / 1e6:>12.2f}{cost.flops / 1e9 / args.batch:>10.2f}"
                  f"{ms:>14.1f}{err:>13}")
        (base, base_ms), (rm, rm_ms) = measured["original"], measured["RM plain"]
        print(f"{'':<14}{'RM / original':<22}{rm.params / base.params:>11.2f}x"
              f"{rm.flops / base.flops:>9.2f}x{rm_ms / base_ms:>13.2f}x")
        if name.startswith("resnet"):
            dense = rmnet_dense_params(model)
            print(f"{'':<14}{'RMNet dense carry':<22}{dense / 1e6:>12.2f}  (RMNet's converter layout, computed)")
        print(f"{'':<14}rewrite time {seconds:.1f} s; notes: {report['remove_residual'].result.notes['summary'][-1]}")


if __name__ == "__main__":
    main()
