"""Network slimming, training side: an L1 penalty on BN gammas and a global choice of channels to kill.

These utilities are lossy by nature: zeroing a gamma changes the model (the network is trained to
tolerate it). The exact part comes after, in the `remove_channels` pass, which physically removes
the channels whose gamma is now 0 and keeps the outputs of the zeroed model equal.

    loss = criterion(model(x), y) + slimming.bn_l1_penalty(model, 1e-4)
    ...
    chosen = slimming.select_channels(model, ratio=0.5)     # {bn name: channel indices}
    slimming.zero_channels(model, chosen)                   # in place: gamma = 0 there
    slim = rewrite.apply(model, ["remove_channels"], example_inputs=x)
"""
from __future__ import annotations

import copy

import torch
import torch.fx as fx
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm


def batch_norms(model: nn.Module) -> dict[str, _BatchNorm]:
    """The affine BatchNorm layers of `model`, by module path."""
    return {name: m for name, m in model.named_modules() if isinstance(m, _BatchNorm) and m.affine}


def bn_l1_penalty(model: nn.Module, strength: float = 1e-4) -> torch.Tensor:
    """strength * sum |gamma| over every affine BN: add it to the training loss (differentiable)."""
    gammas = [m.weight.abs().sum() for m in batch_norms(model).values()]
    if not gammas:
        return torch.zeros(())
    return strength * torch.stack(gammas).sum()


def select_channels(model: nn.Module, ratio: float | None = None, threshold: float | None = None,
                    keep_per_layer: int = 1, exclude: tuple[str, ...] = ()) -> dict[str, list[int]]:
    """Channels to kill, chosen globally by |gamma| across all BN layers (network slimming).

    ratio: the fraction of all BN channels with the smallest |gamma|; threshold: every |gamma| <= it.
    keep_per_layer: the largest gammas of each layer that are never chosen. exclude: BN names to skip.
    """
    if (ratio is None) == (threshold is None):
        raise ValueError("give exactly one of ratio and threshold")
    layers = {n: m for n, m in batch_norms(model).items() if n not in exclude}
    if not layers:
        return {}
    magnitudes = {n: m.weight.detach().abs().float().cpu() for n, m in layers.items()}
    if threshold is None:
        if not 0 <= ratio <= 1:
            raise ValueError(f"ratio must be in [0, 1], got {ratio}")
        everything = torch.cat(list(magnitudes.values()))
        count = int(round(ratio * everything.numel()))
        if count == 0:
            return {}
        threshold = float(everything.sort().values[count - 1])
    chosen: dict[str, list[int]] = {}
    for name, g in magnitudes.items():
        picked = g <= threshold
        protected = g.argsort(descending=True)[:keep_per_layer]
        picked[protected] = False
        if picked.any():
            chosen[name] = picked.nonzero().flatten().tolist()
    return chosen


@torch.no_grad()
def zero_channels(model: nn.Module, chosen: dict[str, list[int]], zero_beta: bool = False) -> int:
    """Set gamma to 0 at the chosen channels, in place (lossy). Returns how many were zeroed.

    zero_beta also zeroes beta, as network-slimming's masks do; remove_channels does not need it
    (it folds a non-zero beta into the next layer where that is exact).
    """
    layers = batch_norms(model)
    count = 0
    for name, channels in chosen.items():
        bn = layers[name]
        index = torch.as_tensor(channels, dtype=torch.long, device=bn.weight.device)
        bn.weight.index_fill_(0, index, 0.0)
        if zero_beta:
            bn.bias.index_fill_(0, index, 0.0)
        count += len(channels)
    return count


def count_weights(model: nn.Module) -> int:
    """Parameters plus weight-like buffers (a model may keep raw BN gamma / beta as buffers for F.batch_norm).

    BN running statistics and counters are not weights and are left out, as torch's own
    parameter count leaves them out of an untouched BatchNorm.
    """
    seen: dict[int, torch.Tensor] = {id(p): p for p in model.parameters()}
    for name, b in model.named_buffers():
        if not name.endswith(("running_mean", "running_var", "num_batches_tracked")):
            seen.setdefault(id(b), b)
    return sum(t.numel() for t in seen.values())


def insert_batch_norms(model: fx.GraphModule) -> fx.GraphModule:
    """A copy of a traced network with a fresh BatchNorm after every Conv2d, to train and slim it.

    A plain network from `remove_residual` (or a deployed one) has its BNs folded away; slimming
    needs gammas to penalize, as RMNet trains its plain networks with BN. The new BNs start as a
    plain normalization (gamma 1, beta 0), so the copy is a different function until it is trained:
    lossy, like everything on the training side.
    """
    slim = copy.deepcopy(model)
    taken = {name for name, _ in slim.named_modules()}
    for node in list(slim.graph.nodes):
        if node.op != "call_module" or not isinstance(slim.get_submodule(node.target), nn.Conv2d):
            continue
        conv = slim.get_submodule(node.target)
        name = node.target.replace(".", "_") + "_bn"
        while name in taken:
            name += "_"
        taken.add(name)
        slim.add_submodule(name, nn.BatchNorm2d(conv.out_channels, device=conv.weight.device,
                                                dtype=conv.weight.dtype))
        with slim.graph.inserting_after(node):
            bn = slim.graph.call_module(name, (node,))
        node.replace_all_uses_with(bn, delete_user_cb=lambda user: user is not bn)
    slim.recompile()
    return slim
