"""remove_channels against Torch-Pruning on resnet50 with half of every bottleneck's inner channels dead.

One process, same model, same channel indices. Torch-Pruning is told which channels to prune
(DependencyGraph + get_pruning_group on each bottleneck's conv1 / conv2 outputs); remove_channels
finds them itself. Torch-Pruning edits the model in place, so its time is reported with and
without the deepcopy that leaving the input untouched (as rewrite.apply does) would need.

    python benchmarks/bench_remove_channels.py [--size 224] [--repeat 3]
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch
import torchvision

import rewrite
from rewrite.analysis.cost import model_cost
from rewrite.slimming import count_weights
from rewrite.testing import randomize_bn

sys.path.insert(0, os.path.dirname(__file__))
from common import paired_best  # noqa: E402


def slimmed_resnet50(zero_beta: bool):
    """resnet50 (random weights) whose bottleneck bn1 / bn2 have gamma 0 on a random half of their channels."""
    m = torchvision.models.resnet50().eval()
    randomize_bn(m, 0)
    g = torch.Generator().manual_seed(0)
    dead = {}
    with torch.no_grad():
        for block in m.modules():
            if isinstance(block, torchvision.models.resnet.Bottleneck):
                for conv, bn in ((block.conv1, block.bn1), (block.conv2, block.bn2)):
                    idx = torch.randperm(bn.num_features, generator=g)[: bn.num_features // 2].sort().values
                    bn.weight[idx] = 0
                    if zero_beta:
                        bn.bias[idx] = 0
                    dead[conv] = idx.tolist()
    return m, dead


def run_ours(model, x):
    return rewrite.apply(model, ["remove_channels"], example_inputs=x)


def run_torch_pruning(model, dead, x, copy_first: bool):
    import torch_pruning as tp

    if copy_first:
        memo = {}
        model = copy.deepcopy(model, memo)
        dead = {memo[id(conv)]: idx for conv, idx in dead.items()}
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    for conv, idx in dead.items():
        graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=idx).prune()
    return model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)  # one thread each: two threads on a loaded 2-core machine measure the load
    x = torch.randn(1, 3, args.size, args.size)
    for zero_beta in (True, False):
        print(f"\n== resnet50, half of every bottleneck's inner channels dead, beta {'= 0' if zero_beta else '!= 0'} ==")
        base, dead = slimmed_resnet50(zero_beta)
        before = model_cost(base, x)
        print(f"before            : {count_weights(base) / 1e6:8.3f} M params  {before.macs / 1e9:7.3f} GMACs")
        t_ours, t_tp_copy = paired_best(lambda: run_ours(base, x),
                                        lambda: run_torch_pruning(base, dead, x, copy_first=True), args.repeat)
        ours, tp_model = run_ours(base, x), run_torch_pruning(base, dead, x, copy_first=True)
        # in place: a fresh model each time (not timed), as a user who does not need the original would run it
        t_tp_inplace = []
        for _ in range(args.repeat):
            fresh, fresh_dead = slimmed_resnet50(zero_beta)
            start = time.perf_counter()
            run_torch_pruning(fresh, fresh_dead, x, copy_first=False)
            t_tp_inplace.append(time.perf_counter() - start)
        t_tp = min(t_tp_inplace)
        for name, model in (("remove_channels", ours), ("torch-pruning", tp_model)):
            cost = model_cost(model, x)
            err = rewrite.verify(base, model, x)
            print(f"{name:<18}: {count_weights(model) / 1e6:8.3f} M params  {cost.macs / 1e9:7.3f} GMACs  "
                  f"output max abs err {err.max_abs:.3e}  max rel err {err.max_rel:.3e}")
        print(f"time: remove_channels {t_ours:.3f} s | torch-pruning {t_tp_copy:.3f} s with deepcopy, "
              f"{t_tp:.3f} s in place")
        print(f"time ratio ours / torch-pruning: {t_ours / t_tp_copy:.2f} (with its deepcopy), "
              f"{t_ours / t_tp:.2f} (in place)")


if __name__ == "__main__":
    main()
