"""Shared benchmark helpers: best-of-N timing, relative error, and random models with real BN statistics."""
from __future__ import annotations

import gc
import time
from typing import Callable

import torch


# What best_time reads: wall time by default; CPU time of this process (time.process_time) when the
# machine is shared and oversubscribed, where waiting for a core would otherwise be counted.
CLOCK: Callable[[], float] = time.perf_counter


def use_cpu_clock(cpu: bool) -> None:
    global CLOCK
    CLOCK = time.process_time if cpu else time.perf_counter


def best_time(fn: Callable[[], object], repeat: int = 5, warmup: int = 1) -> float:
    """The best time of `repeat` calls (the least disturbed by other work on the machine)."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeat):
        gc.collect()
        start = CLOCK()
        fn()
        best = min(best, CLOCK() - start)
    return best


def paired_best(first: Callable[[], object], second: Callable[[], object], repeat: int = 5) -> tuple[float, float]:
    """Best times of two functions measured in alternation, so a change of machine load hits both alike."""
    first(), second()
    best_first = best_second = float("inf")
    for _ in range(repeat):
        best_first = min(best_first, best_time(first, repeat=1, warmup=0))
        best_second = min(best_second, best_time(second, repeat=1, warmup=0))
    return best_first, best_second


def relative_error(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    ref, cand = reference.detach().double(), candidate.detach().double()
    return float((ref - cand).abs().max() / ref.abs().max())


def latency(model: torch.nn.Module, x: torch.Tensor, repeat: int = 10) -> float:
    with torch.no_grad():
        return best_time(lambda: model(x), repeat=repeat, warmup=2)
