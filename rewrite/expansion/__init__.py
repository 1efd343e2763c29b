"""Expansion: the training-time side of structural re-parameterization, on any traceable model.

    wide, report = rewrite.expand(model, "repvgg", example_inputs=x, return_report=True)
    ... train wide ...
    deploy = rewrite.apply(wide.eval(), ["fold_bn", "fuse_branches"], example_inputs=x, verify=True)

Modules: geometry.py (where a branch sits in a kernel), blocks.py (block modules and inits),
schemes.py (what each scheme builds), sites.py (which layers the graph allows), api.py (expand), roundtrip.py (contract, architecture).
"""
from .api import ExpandReport, Expanded, expand
from .roundtrip import architecture, contract
from .schemes import ACB, DBB, SCHEME_NAMES, ExpandNets, MobileOne, RepVGG, Scheme, get_scheme

__all__ = ["expand", "contract", "architecture", "ExpandReport", "Expanded", "Scheme", "RepVGG", "ACB", "DBB", "MobileOne", "ExpandNets",
           "get_scheme", "SCHEME_NAMES"]
