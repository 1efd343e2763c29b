"""`rewrite expand MODEL --scheme repvgg -o OUT`: the CLI form of rewrite.expand (cli.py only parses)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..errors import EquivalenceError, ModelLoadError, RewriteError
from ..files import atomic_write
from ..verify import verify
from .api import expand
from .roundtrip import contract


def run(args, load_model, parse_shape, save_model) -> int:
    model = load_model(args.model)  # built in eval mode: the preserved function is the eval-mode one
    if not isinstance(model, torch.nn.Module):
        raise ModelLoadError("expand takes a torch model (package.module:callable or a .pt file), not ONNX",
                             where=args.model)
    shapes = [parse_shape(s) for s in (args.input_shape or ["1,3,224,224"])]
    generator = torch.Generator().manual_seed(args.seed)
    example = tuple(torch.randn(s, generator=generator) for s in shapes)
    options = {}
    for flag, value, owner in (("k", args.k, "mobileone"), ("ratio", args.ratio, "expand")):
        if value is not None:
            if args.scheme != owner:
                raise RewriteError(f"--{flag} is an option of the {owner} scheme, not of {args.scheme}")
            options[flag] = value
    expanded, report = expand(model, args.scheme, example_inputs=example, where=args.where or None, init=args.init,
                              return_report=True, options=options)
    print(report)
    if args.verify:
        expanded.eval()
        checks = [("the round trip (contracted vs expanded)", verify(expanded, contract(expanded, example), example))]
        if args.init == "preserve":
            checks.insert(0, ("the preserving init (expanded vs original)", verify(model, expanded, example)))
        for what, result in checks:
            print(f"{what}: {result}")
            if not result.ok:
                raise EquivalenceError(f"{what}: {result}", where=args.model)
    if args.report_json:
        os.makedirs(os.path.dirname(os.path.abspath(args.report_json)), exist_ok=True)
        atomic_write(args.report_json, lambda tmp: Path(tmp).write_text(json.dumps(report.to_dict(), indent=2)))
    if args.output:
        save_model(expanded.train(), args.output)  # training-ready
        print(f"\nwrote {args.output}")
    return 0
