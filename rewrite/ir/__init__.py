"""The IR: graphs of nodes whose kinds are declared op definitions (see ops.py)."""
from . import builtin_ops  # noqa: F401  (registers the built-in kinds)
from .builtin_ops import clamp_bound
from .graph import Graph, Node, Value, fresh_name, is_pure
from .ops import AttrSpec, OpDef, OpDefinitionError, attr, define_op, defined_ops, op_def

__all__ = ["clamp_bound", "Graph", "Node", "Value", "fresh_name", "is_pure", "AttrSpec", "OpDef", "OpDefinitionError",
           "attr", "define_op", "defined_ops", "op_def"]
