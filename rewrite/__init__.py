"""rewrite: exact graph-level rewriting of PyTorch and ONNX models.

    import rewrite
    fused, report = rewrite.apply(model, ["fold_bn"], example_inputs=x, verify=True, return_report=True)

The public names are imported on first use, so `import rewrite.cli` (and `rewrite --help`) does
not import torch.
"""
import sys
import types
from importlib import import_module

from .errors import EquivalenceError, ModelLoadError, NotVerifiableError, PassError, RewriteError, TraceError

__version__ = "0.1.0"

_LAZY = {
    "apply": ".api",
    "expand": ".expansion",
    "Graph": ".ir", "Node": ".ir", "Value": ".ir", "OpDef": ".ir", "attr": ".ir", "define_op": ".ir",
    "defined_ops": ".ir", "op_def": ".ir",
    "Pass": ".pass_manager", "PassResult": ".pass_manager", "RulePass": ".pass_manager",
    "available_passes": ".pass_manager", "get_pass": ".pass_manager", "register_pass": ".pass_manager",
    "P": ".pattern",
    "RewriteContext": ".rule", "Rule": ".rule", "rule": ".rule",
    "VerifyResult": ".verify", "verify": ".verify",
}

__all__ = [
    "apply", "verify", "VerifyResult", "expand",
    "RewriteError", "TraceError", "EquivalenceError", "ModelLoadError", "PassError", "NotVerifiableError",
    "Graph", "Node", "Value", "OpDef", "attr", "define_op", "defined_ops", "op_def", "P", "rule", "Rule", "RewriteContext",
    "Pass", "PassResult", "RulePass", "register_pass", "get_pass", "available_passes",
]


_SAME_AS_SUBMODULE = {"rule", "verify"}  # functions named like the submodule that defines them


class _Package(types.ModuleType):
    """Keeps `rewrite.rule` and `rewrite.verify` the functions once their submodules are imported.

    The import system binds a submodule as an attribute of its package after running it; an eager
    `from .rule import rule` used to overwrite that binding, and this does the same lazily.
    """

    def __setattr__(self, name, value):
        if name in _SAME_AS_SUBMODULE and isinstance(value, types.ModuleType) and value.__name__ == f"{__name__}.{name}":
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name], __name__), name)
        globals()[name] = value  # later lookups are plain attribute reads
        return value
    raise AttributeError(f"module 'rewrite' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
