"""Op definitions: what each kind of IR node is, declared once and shared by everyone.

    define_op("leaky_relu", attrs={"negative_slope": attr(float, 0.01)}, pointwise=True,
              fx=[nn.LeakyReLU, F.leaky_relu, "leaky_relu"], onnx="LeakyRelu",
              onnx_attrs={"negative_slope": "alpha"})

An `OpDef` names a kind's data inputs, its typed attributes (with defaults and validation), the
tensor parameters it may hold, whether it is pure, a few semantic facts the analyses use
(`pointwise`, `nonnegative`), and the forms the frontends know it by: torch.fx modules, functions
and method names, and an ONNX op type. Node creation, `ctx.op` and `P.op` all go through the
registry, so an unknown kind, attribute or parameter is an error where it is written.

A user's custom op is the same call in their own file. Ops whose import and export are not a plain
call (conv, batch_norm, pad, ...) have their own handlers inside the frontends; the frontends check
at import time that every registered kind can be written back.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from ..errors import RewriteError


class OpDefinitionError(RewriteError):
    """An op kind, attribute or parameter that the registry does not know, or a bad definition."""


_REQUIRED = object()


@dataclass(frozen=True)
class AttrSpec:
    """One attribute: a converter that validates and normalizes a value, and a default."""

    convert: Callable[[Any], Any]
    default: Any = _REQUIRED
    doc: str = ""

    @property
    def required(self) -> bool:
        return self.default is _REQUIRED


# -- attribute types: each converts a user's value to the IR's one form, or raises ------------
def _int(v):
    if isinstance(v, bool) or not hasattr(v, "__index__"):  # ints and numpy ints; not floats or bools
        raise TypeError(f"expected an int, got {v!r}")
    return int(v)


def _float(v):
    if isinstance(v, bool) or not isinstance(v, (int, float)) and not hasattr(v, "__float__"):
        raise TypeError(f"expected a number, got {v!r}")
    return float(v)


def _bool(v):
    if not isinstance(v, (bool, int)) or v not in (0, 1, True, False):
        raise TypeError(f"expected a bool, got {v!r}")
    return bool(v)


def _str(v):
    if not isinstance(v, str):
        raise TypeError(f"expected a string, got {v!r}")
    return v


def _ints(v):
    if not isinstance(v, (tuple, list)):
        raise TypeError(f"expected a tuple of ints, got {v!r}")
    return tuple(_int(x) for x in v)


def _pairs(v):
    if not isinstance(v, (tuple, list)) or not all(isinstance(p, (tuple, list)) and len(p) == 2 for p in v):
        raise TypeError(f"expected a tuple of (before, after) pairs, got {v!r}")
    return tuple((_int(a), _int(b)) for a, b in v)


def _optional(convert):
    def check(v):
        return None if v is None else convert(v)
    check.__name__ = f"optional {getattr(convert, '__name__', 'value')}"
    return check


def _one_of(*choices):
    def check(v):
        if v not in choices:
            raise ValueError(f"expected one of {', '.join(map(repr, choices))}, got {v!r}")
        return v
    return check


def _verbatim(v):
    return v


ATTR_TYPES: dict[Any, Callable] = {int: _int, float: _float, bool: _bool, str: _str, "ints": _ints,
                                   "pairs": _pairs, "any": _verbatim}


def attr(kind: Any = "any", default: Any = _REQUIRED, optional: bool = False, choices: Iterable | None = None,
         doc: str = "") -> AttrSpec:
    """An attribute spec: `kind` is int, float, bool, str, "ints", "pairs", "any" or a converter."""
    convert = ATTR_TYPES[kind] if isinstance(kind, (type, str)) and kind in ATTR_TYPES else kind
    if not callable(convert):
        raise OpDefinitionError(f"unknown attribute type {kind!r}")
    if choices is not None:
        convert = _one_of(*choices)
    if optional:
        convert = _optional(convert)
    return AttrSpec(convert, default, doc)


@dataclass
class OpDef:
    """One op kind. See the module docstring."""

    kind: str
    inputs: tuple[str, ...] = ("x",)  # data input names; a name starting with "*" takes any number
    attrs: dict[str, AttrSpec] = field(default_factory=dict)
    params: tuple[str, ...] = ()  # tensor parameters the node may hold (missing ones are None)
    required_params: tuple[str, ...] = ()
    pure: bool = True
    pointwise: bool = False  # elementwise on one input, so per-channel facts pass through
    nonnegative: bool = False  # output >= 0 whatever the input
    # evaluate(x, **attrs) for a pointwise op without params: lets analyses compute what a constant
    # channel becomes (a dead channel's constant through SiLU is still a constant)
    evaluate: Callable | None = None
    open_attrs: bool = False  # frontends' bookkeeping attributes allowed (opaque nodes)
    num_outputs: int | None = 1  # None: set per node (split)
    # torch.fx forms: nn.Module classes (attributes read from the module's fields of the same names),
    # callables and method names. A call binds by the callable's signature when Python has one, else
    # as (inputs..., attributes in declared order..., params...).
    fx: tuple = ()
    fx_ignore: tuple[str, ...] = ("inplace",)  # call arguments that do not change the result
    onnx: str | None = None
    onnx_attrs: dict[str, str] = field(default_factory=dict)  # IR attribute -> ONNX attribute name
    description: str = ""

    @property
    def variadic(self) -> bool:
        return any(name.startswith("*") for name in self.inputs)

    def check_attrs(self, attrs: dict, where: str) -> dict:
        """Validated attributes in the IR's form, defaults filled in."""
        if self.open_attrs:
            return dict(attrs)
        unknown = [k for k in attrs if k not in self.attrs]
        if unknown:
            raise OpDefinitionError(f"'{self.kind}' has no attribute {', '.join(map(repr, unknown))}; "
                                    f"its attributes: {', '.join(self.attrs) or 'none'}", where=where)
        out = {}
        for key, spec in self.attrs.items():
            if key in attrs:
                out[key] = self.convert(key, attrs[key], where)
            elif spec.required:
                raise OpDefinitionError(f"'{self.kind}' needs attribute {key!r}", where=where)
            else:
                out[key] = spec.default
        return out

    def convert(self, key: str, value: Any, where: str) -> Any:
        spec = self.attrs.get(key)
        if spec is None:
            if self.open_attrs:
                return value
            raise OpDefinitionError(f"'{self.kind}' has no attribute {key!r}; its attributes: "
                                    f"{', '.join(self.attrs) or 'none'}", where=where)
        try:
            return spec.convert(value)
        except (TypeError, ValueError) as exc:
            raise OpDefinitionError(f"attribute {key!r} of '{self.kind}': {exc}", where=where) from None

    def check_params(self, params: dict, where: str) -> dict:
        unknown = [k for k in params if k not in self.params]
        if unknown and not self.open_attrs:
            raise OpDefinitionError(f"'{self.kind}' has no parameter {', '.join(map(repr, unknown))}; "
                                    f"its parameters: {', '.join(self.params) or 'none'}", where=where)
        missing = [k for k in self.required_params if params.get(k) is None]
        if missing:
            raise OpDefinitionError(f"'{self.kind}' needs parameter {', '.join(map(repr, missing))}", where=where)
        out = {k: params.get(k) for k in self.params}
        if self.open_attrs:
            out.update(params)
        return out

    def check_arity(self, n_inputs: int, where: str) -> None:
        fixed = [name for name in self.inputs if not name.startswith("*")]
        if (n_inputs < len(fixed)) if self.variadic else (n_inputs != len(fixed)):
            raise OpDefinitionError(f"'{self.kind}' takes {'at least ' if self.variadic else ''}{len(fixed)} "
                                    f"input(s) ({', '.join(self.inputs)}), got {n_inputs}", where=where)


_OPS: dict[str, OpDef] = {}


def define_op(kind: str, inputs: Iterable[str] = ("x",), attrs: dict[str, AttrSpec] | None = None,
              params: Iterable[str] = (), replace: bool = False, **facts) -> OpDef:
    """Register an op kind (see OpDef for the fields). Redefining a kind needs `replace=True`."""
    if not isinstance(kind, str) or not kind.isidentifier():
        raise OpDefinitionError(f"an op kind is an identifier, not {kind!r}")
    if kind in _OPS and not replace:
        raise OpDefinitionError(f"op '{kind}' is already defined; pass replace=True to redefine it")
    for key, spec in (attrs or {}).items():
        if not isinstance(spec, AttrSpec):
            raise OpDefinitionError(f"attribute {key!r} of '{kind}' must be declared with rewrite.attr(...)")
    unknown = set(facts) - set(OpDef.__dataclass_fields__)
    if unknown:
        raise OpDefinitionError(f"define_op got unknown field(s) {', '.join(sorted(unknown))}", where=kind)
    fx = facts.pop("fx", ())
    op = OpDef(kind, tuple(inputs), dict(attrs or {}), tuple(params),
               fx=tuple(fx) if isinstance(fx, (list, tuple)) else (fx,), **facts)
    _OPS[kind] = op
    return op


def op_def(kind: str, where: str | None = None) -> OpDef:
    """The definition of `kind`; an unknown kind is an error naming the place and the near names."""
    op = _OPS.get(kind)
    if op is None:
        import difflib

        near = difflib.get_close_matches(str(kind), list(_OPS), n=3)
        hint = f"; did you mean {' or '.join(map(repr, near))}?" if near else ""
        raise OpDefinitionError(f"unknown op kind {kind!r}{hint} (define it with rewrite.define_op)", where=where)
    return op


def defined_ops() -> dict[str, OpDef]:
    return dict(_OPS)
