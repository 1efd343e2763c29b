"""cleanup: drop identities, inference-mode dropout, and dead nodes."""
from __future__ import annotations

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


class CleanupPass(RulePass):
    def run(self, graph, options=None):
        result = super().run(graph, options)
        erased = graph.eliminate_dead_code()
        if erased:
            result.counts["dead_code"] += erased
        return result


cleanup = register_pass(CleanupPass("cleanup", [drop_identity, drop_eval_dropout, drop_eval_stochastic_depth],
                                    "remove identities, inference-mode dropout and stochastic depth, and dead nodes"))
