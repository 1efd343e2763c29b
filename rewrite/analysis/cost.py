"""Model cost: parameter count and FLOPs, measured by torch's own FLOP counter on example inputs."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..frontends.fx import as_tuple, preserved_buffers


@dataclass(frozen=True)
class Cost:
    params: int
    flops: int  # multiply and add counted separately (2 x MACs), as torch's counter does

    @property
    def macs(self) -> int:
        return self.flops // 2

    def __str__(self) -> str:
        return f"{self.params / 1e6:.3f} M params, {self.flops / 1e9:.3f} GFLOPs"


def conv_flops(out_shape: tuple | None, weight_shape: tuple, channel_axis: int) -> int | None:
    """FLOPs of a conv from its output shape and weight shape, counted as torch's counter does
    (2 x MACs, bias not counted); None when the output shape is unknown."""
    if out_shape is None:
        return None
    positions = math.prod(s for i, s in enumerate(out_shape) if i != channel_axis)
    return 2 * positions * weight_shape[0] * math.prod(weight_shape[1:])


def count_params(model: torch.nn.Module) -> int:
    """Distinct parameter and buffer-free weights (a tied parameter counts once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def model_cost(model: torch.nn.Module, example_inputs) -> Cost:
    """Parameters and FLOPs of one forward pass on `example_inputs` (the model is left unchanged)."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), preserved_buffers(model), counter:
        model(*as_tuple(example_inputs))
    return Cost(count_params(model), counter.get_total_flops())
