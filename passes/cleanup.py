"""cleanup: drop identities, inference-mode dropout, zero addends, and dead nodes."""
from __future__ import annotations

import torch

from rewrite.pass_manager import RulePass, register_pass
from rewrite.pattern import P
from rewrite.rule import rule


@rule(P.op("identity", P.any("x")))
def drop_identity(ctx, x):
    """identity(x) is x."""
    return x


@rule(P.op("dropout", P.any("x"), name="dropout"))
def drop_eval_dropout(ctx, x, dropout):
    """dropout in inference mode is the identity."""
    if dropout.attrs.get("training"):
        return ctx.fail(f"{dropout.name} is in training mode; it is random, not the identity")
    return x


@rule(P.op("stochastic_depth", P.any("x"), name="drop"))
def drop_eval_stochastic_depth(ctx, x, drop):
    """stochastic depth in inference mode is the identity."""
    if drop.attrs.get("training"):
        return ctx.fail(f"{drop.name} is in training mode; it is random, not the identity")
    return x


# kinds whose output is a floating tensor of the shape of their first input, whatever the graph knows
_FLOATING_SAME_SHAPE = ("batch_norm", "conv", "relu", "clamp", "identity", "dropout")


def _keeps_meta(add, other, zero: torch.Tensor) -> bool:
    """Whether `add` has the shape and dtype of `other` alone: adding the zero neither broadcasts nor promotes."""
    if add.output.shape is not None and other.shape is not None and add.output.dtype is not None:
        return add.output.shape == other.shape and add.output.dtype == other.dtype
    # unknown shapes: a 0-d floating zero changes neither a floating tensor's shape nor its dtype
    return zero.dim() == 0 and zero.is_floating_point() and other.producer is not None and \
        other.producer.kind in _FLOATING_SAME_SHAPE


@rule(P.op(("add", "sub"), name="add", any_inputs=True))
def drop_zero_addend(ctx, add):
    """x + 0 (and x - 0) is x: a constant zero operand goes (MobileOne's `0 + bn(x)` without conv branches)."""
    zeros = [i for k, i in enumerate(add.inputs) if i.producer is not None and i.producer.kind == "constant"
             and not bool(i.producer.params["value"].any()) and (add.kind == "add" or k == 1)]
    rest = [i for i in add.inputs if all(i is not z for z in zeros)]
    if not zeros or len(rest) != 1:
        return None  # nothing to drop, or a sum of several tensors (its zeros go with the other rules' rewrite)
    if not _keeps_meta(add, rest[0], zeros[0].producer.params["value"]):
        if rest[0].shape is None and rest[0].dtype is None and add.output.shape is None:
            return None  # nothing says it is a tensor at all (shape arithmetic, `h - 0`): no site of this rule
        return ctx.fail(f"the zero added by {add.label} may broadcast or promote {rest[0].name} (its shape or dtype "
                        "differs or is unknown: pass example_inputs), so it is kept")
    return rest[0]


class CleanupPass(RulePass):
    def run(self, graph, options=None):
        result = super().run(graph, options)
        erased = graph.eliminate_dead_code()
        if erased:
            result.counts["dead_code"] += erased
        return result


cleanup = register_pass(CleanupPass("cleanup", [drop_identity, drop_eval_dropout, drop_eval_stochastic_depth,
                                                drop_zero_addend],
                                    "remove identities, inference-mode dropout and stochastic depth, zero addends and dead nodes"))
