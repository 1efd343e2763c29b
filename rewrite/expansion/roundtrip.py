"""The round trip expand -> contract, and a model's architecture to compare before and after it."""
from __future__ import annotations

import copy
from collections import Counter

import torch.nn as nn

from ..api import apply
from ..frontends.fx import import_module

CONTRACTION = ("fold_bn", "fuse_branches")


def contract(model: nn.Module, example_inputs=None, verify: bool = False, return_report: bool = False, **options):
    """The deploy form of an expanded model: an eval-mode copy, BN folded, branches fused. `model` is untouched."""
    deploy = copy.deepcopy(model).eval()
    return apply(deploy, list(CONTRACTION), example_inputs=example_inputs, verify=verify,
                 return_report=return_report, inplace=True, **options)


def architecture(model: nn.Module, example_inputs=None) -> tuple[list[tuple], dict[str, int]]:
    """The layers (kind, weight shape, stride, padding, dilation, groups, padding mode), sorted (independent
    branches may come back in another topological order), and the count of every other op:
    what the round trip must give back."""
    graph = import_module(model, example_inputs)
    layers, ops = [], Counter()
    for node in graph.nodes:
        if node.kind in ("conv", "conv_transpose"):
            a, w = node.attrs, node.params["weight"]
            dilation = tuple(d if k > 1 else 1 for d, k in zip(a["dilation"], w.shape[2:]))  # moot on 1-tap axes
            layers.append((node.kind, tuple(w.shape), tuple(a["stride"]), tuple(a["padding"]), dilation,
                           a["groups"], a.get("padding_mode", "zeros") if any(p or q for p, q in a["padding"]) else
                           "zeros"))
        elif node.kind == "linear":
            layers.append(("linear", tuple(node.params["weight"].shape)))
        elif node.kind not in ("constant", "identity") and not (node.kind == "dropout" and not node.attrs["training"]):
            ops[node.kind] += 1  # identities and inference-mode dropouts are no-ops the contraction may drop
    return sorted(layers, key=repr), dict(ops)
