"""Helpers for property-testing passes, ours and users': check_pass() and hypothesis strategies.

    from rewrite.testing import check_pass, randomize_bn
    check_pass("fold_bn", model, x)                         # equivalence + idempotence
    check_pass("fold_bn", model, x, refuses="padding")      # a near miss left alone, with its reason

The strategies (conv_configs, random_networks, ConvConfig, RandomNet) import hypothesis when first
used, so the rest runs where only the package's own dependencies are installed (the demo).
"""
from .check import CheckResult, assert_same_state, check_pass, randomize_bn, state_snapshot

_STRATEGIES = ("ConvConfig", "RandomNet", "conv_configs", "random_networks")

__all__ = ["CheckResult", "assert_same_state", "check_pass", "randomize_bn", "state_snapshot", *_STRATEGIES]


def __getattr__(name: str):
    if name in _STRATEGIES:
        from . import strategies

        return getattr(strategies, name)
    raise AttributeError(f"module 'rewrite.testing' has no attribute {name!r}")
