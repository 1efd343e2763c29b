"""Patterns of multi-branch blocks: sums and concatenations of branches, and linear cascades.

They only fix the root op; how many branches there are and what each one is gets read off the
graph by the rule (passes/branch_terms.py), since a sum may have any number of operands.
"""
from rewrite.pattern import P

#: an add of any number of operands, or a sub (a sum with a negated operand); captures add
parallel_branches = P.op(("add", "sub"), name="add", any_inputs=True)

#: a concatenation of any number of operands; captures concat
concatenated_branches = P.op("concat", name="concat", any_inputs=True)

#: a conv or linear reading a value (possibly another conv's output); captures x, second
linear_cascade = P.op(("conv", "linear"), P.any("x"), name="second")

__all__ = ["parallel_branches", "concatenated_branches", "linear_cascade"]
