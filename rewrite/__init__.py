"""rewrite: exact graph-level rewriting of PyTorch and ONNX models.

    import rewrite
    fused, report = rewrite.apply(model, ["fold_bn"], example_inputs=x, verify=True, return_report=True)
"""
from .api import apply
from .expansion import expand
from .errors import EquivalenceError, ModelLoadError, PassError, RewriteError, TraceError
from .ir import Graph, Node, OpDef, Value, attr, define_op, defined_ops, op_def
from .pass_manager import Pass, PassResult, RulePass, available_passes, get_pass, register_pass
from .pattern import P
from .rule import RewriteContext, Rule, rule
from .verify import VerifyResult, verify

__version__ = "0.1.0"

__all__ = [
    "apply", "verify", "VerifyResult", "expand",
    "RewriteError", "TraceError", "EquivalenceError", "ModelLoadError", "PassError",
    "Graph", "Node", "Value", "OpDef", "attr", "define_op", "defined_ops", "op_def", "P", "rule", "Rule", "RewriteContext",
    "Pass", "PassResult", "RulePass", "register_pass", "get_pass", "available_passes",
]
