"""`rewrite.expand`: replace the eligible convs (and linears) of any traceable model by training-time blocks."""
from __future__ import annotations

import copy
import fnmatch
from dataclasses import dataclass, field
from typing import Any, Callable

import torch.nn as nn

from ..errors import RewriteError
from .schemes import INITS, Scheme, get_scheme, layer_geometry
from .sites import Site, find_sites

Where = Callable[[str, nn.Module], bool] | str | list | tuple | dict | None


@dataclass
class Expanded:
    path: str
    branches: list[str]  # the block's top-level branch names
    params_before: int
    params_after: int


@dataclass
class ExpandReport:
    scheme: str
    init: str
    expanded: list[Expanded] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (module path, reason)

    @property
    def params_before(self) -> int:
        return sum(e.params_before for e in self.expanded)

    @property
    def params_after(self) -> int:
        return sum(e.params_after for e in self.expanded)

    def reason(self, path: str) -> str | None:
        return next((why for p, why in self.skipped if p == path), None)

    def to_dict(self) -> dict[str, Any]:
        return {"scheme": self.scheme, "init": self.init,
                "expanded": [vars(e) for e in self.expanded],
                "skipped": [{"module": p, "reason": why} for p, why in self.skipped]}

    def __str__(self) -> str:
        lines = [f"expand ({self.scheme}, init={self.init}): {len(self.expanded)} layers expanded, "
                 f"{len(self.skipped)} left; their parameters {self.params_before} -> {self.params_after}"]
        lines += [f"  expanded {e.path or '<root>'}: {' + '.join(e.branches)}" for e in self.expanded]
        lines += [f"  left     {p or '<root>'}: {why}" for p, why in self.skipped]
        return "\n".join(lines)


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def _kind(module: nn.Module) -> str:
    return type(module).__name__.lower()  # conv1d, conv2d, conv3d, linear


def _matches_kernel(module: nn.Module, wanted) -> bool:
    kernel = getattr(module, "kernel_size", None)
    if kernel is None:
        return False
    options = wanted if isinstance(wanted, list) else [wanted]
    return any(tuple(kernel) == (tuple(w) if isinstance(w, (tuple, list)) else (w,) * len(kernel)) for w in options)


def _selected(where: Where, path: str, module: nn.Module) -> bool:
    """Whether `where` picks this layer: a predicate, module-path patterns, or a dict of path / kind / kernel_size."""
    if callable(where):
        return bool(where(path, module))
    if isinstance(where, str):
        where = [where]
    if isinstance(where, (list, tuple)):
        return any(fnmatch.fnmatchcase(path, pattern) for pattern in where)
    if isinstance(where, dict):
        unknown = set(where) - {"path", "kind", "kernel_size"}
        if unknown:
            raise RewriteError(f"where= takes the keys path, kind and kernel_size; not {sorted(unknown)}")
        if "path" in where and not _selected(where["path"], path, module):
            return False
        if "kind" in where:
            kinds = where["kind"] if isinstance(where["kind"], (list, tuple)) else [where["kind"]]
            if not any(_kind(module) == k or (k == "conv" and _kind(module).startswith("conv")) for k in kinds):
                return False
        return "kernel_size" not in where or _matches_kernel(module, where["kernel_size"])
    raise RewriteError(f"where= is a predicate (path, module) -> bool, path patterns or a dict; got {type(where).__name__}")


def _refusal(site: Site, scheme: Scheme, where: Where) -> str | None:
    g = layer_geometry(site.module)
    if where is None:
        why = scheme.default_refusal(site.module, g)
        if why:
            return f"not selected: {why}"
    elif not _selected(where, site.path, site.module):
        return "not selected by where="
    if g is None and not scheme.expands_linear:
        return f"{scheme.name} expands convs, not linear layers"
    if site.refusal:
        return site.refusal
    if g is not None and scheme.uses_bn:
        batched = g.dims + 2
        if site.input_rank is None and g.dims == 1:
            return ("the input's rank is unknown (pass example_inputs): BatchNorm1d would normalize the wrong axis "
                    "of an unbatched Conv1d input")
        if site.input_rank is not None and site.input_rank != batched:
            return f"its input has rank {site.input_rank}, not {batched}: the blocks' BatchNorm needs batched input"
    return None


def expand(model: nn.Module, scheme: str | Scheme = "repvgg", example_inputs=None, where: Where = None,
           init: str = "preserve", return_report: bool = False, options: dict | None = None,
           concrete_args: dict | None = None, leaf_modules=()):
    """A copy of `model` in which every eligible conv (ExpandNets: and linear) is a training-time block.

    scheme: "repvgg", "acb", "dbb", "mobileone" (options={"k": 4}), "expand" (options={"ratio": 4}), or a Scheme.
    where: which layers; default what the scheme's paper expands (KxK convs, K > 1; MobileOne also 1x1;
        ExpandNets also linears). A predicate (path, module) -> bool, fnmatch patterns of module paths
        ("layer1.*"), or a dict with any of path / kind ("conv", "conv2d", "linear") / kernel_size.
    init: "preserve" (default): the expanded model computes the original's outputs (in eval mode), so a
        trained model can be expanded and fine-tuned; "fresh": every branch freshly initialized, as for
        training from scratch.
    return_report: return (model, ExpandReport); the report lists every layer left and why.
    The input model is never changed. rewrite.apply(expanded.eval(), ["fold_bn", "fuse_branches"])
    contracts the blocks back to the original layers.
    """
    if not isinstance(model, nn.Module):
        raise RewriteError(f"expand takes an nn.Module, got {type(model).__name__}")
    if init not in INITS:
        raise RewriteError(f"init is one of {', '.join(INITS)}; got {init!r}")
    scheme = get_scheme(scheme, **(options or {}))
    sites, others = find_sites(model, example_inputs, concrete_args, leaf_modules)
    out = copy.deepcopy(model)
    report = ExpandReport(scheme.name if not hasattr(scheme, "k") else f"{scheme.name}(k={scheme.k})", init)
    report.skipped += others
    for site in sites:
        why = _refusal(site, scheme, where)
        block = why or scheme.build(site.module, layer_geometry(site.module), init)
        if isinstance(block, str):
            report.skipped.append((site.path, block))
            continue
        block.train(site.module.training)
        if site.path:
            out.set_submodule(site.path, block)
        else:
            out = block
        report.expanded.append(Expanded(site.path, [name for name, _ in block.named_children()],
                                        _count(site.module), _count(block)))
    return (out, report) if return_report else out
