"""The `rewrite` command.

    rewrite apply torchvision.models:resnet18 --passes fold_bn,cleanup -o resnet18.pt --verify
    rewrite apply model.onnx --passes fold_bn -o model.fused.onnx --verify
    rewrite expand torchvision.models:resnet18 --scheme repvgg -o resnet18.repvgg.pt --verify
    rewrite passes

Exit codes: 0 done, 2 bad input (unreadable model, unknown pass, untraceable model), 3 failed
verification. The output file is written atomically, and only after every check passed.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from .errors import EquivalenceError, ModelLoadError, RewriteError
from .files import atomic_write

EXIT_BAD_INPUT = 2
EXIT_NOT_EQUIVALENT = 3


def load_model(spec: str, train: bool = False) -> Any:
    """A model from `package.module:callable`, a torch.save'd module (.pt/.pth) or a .onnx path."""
    if spec.endswith(".onnx"):
        if not os.path.exists(spec):
            raise ModelLoadError("no such file", where=spec)
        return spec  # the ONNX frontend reads (and validates) the file itself
    if os.path.exists(spec):
        try:
            model = torch.load(spec, weights_only=False, map_location="cpu")
        except Exception as exc:
            raise ModelLoadError(f"not a torch.save'd model: {type(exc).__name__}: {exc}", where=spec) from None
    elif ":" in spec:
        module_name, _, attr = spec.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
            model = factory()
        except Exception as exc:
            raise ModelLoadError(f"cannot build the model: {type(exc).__name__}: {exc}", where=spec) from None
    else:
        raise ModelLoadError("expected package.module:callable, a .pt/.pth file or a .onnx file", where=spec)
    if not isinstance(model, torch.nn.Module):
        raise ModelLoadError(f"expected an nn.Module, got {type(model).__name__}", where=spec)
    return model if train else model.eval()


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(d) for d in text.split(","))
    except ValueError:
        raise ModelLoadError(f"an input shape is comma-separated integers, not {text!r}") from None


def save_model(model: Any, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if isinstance(model, torch.nn.Module):
        atomic_write(path, lambda tmp: torch.save(model, tmp))
        return
    from .frontends.onnx import save_onnx  # ONNX models are saved with their external data, atomically

    save_onnx(model, path)


def _cmd_apply(args) -> int:
    from .api import apply

    model = load_model(args.model, args.train)
    passes = [p.strip() for p in args.passes.split(",") if p.strip()]
    example = None
    if isinstance(model, torch.nn.Module):
        dtype = getattr(torch, args.dtype)
        model = model.to(dtype)
        shapes = [parse_shape(s) for s in (args.input_shape or ["1,3,224,224"])]
        generator = torch.Generator().manual_seed(args.seed)
        example = tuple(torch.randn(s, generator=generator, dtype=dtype) for s in shapes)
    out, report = apply(model, passes, example_inputs=example, verify=args.verify, return_report=True)
    print(report)
    if args.report_json:
        os.makedirs(os.path.dirname(os.path.abspath(args.report_json)), exist_ok=True)
        atomic_write(args.report_json, lambda tmp: Path(tmp).write_text(json.dumps(report.to_dict(), indent=2)))
    if args.output:
        save_model(out, args.output)
        print(f"\nwrote {args.output}")
    return 0


def _cmd_expand(args) -> int:
    from .expansion.command import run

    return run(args, load_model, parse_shape, save_model)


def _cmd_passes(args) -> int:
    from .pass_manager import available_passes

    for name, p in available_passes().items():
        print(f"{name:<18} {p.description}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rewrite", description="Exact graph-level rewriting of PyTorch and ONNX "
                                                                 "models.")
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("apply", help="rewrite a model and write the result")
    a.add_argument("model", help="package.module:callable, a torch.save'd model (.pt/.pth) or a .onnx file")
    a.add_argument("--passes", default="fold_bn", help="comma-separated pass names (see `rewrite passes`)")
    a.add_argument("-o", "--output", help="where to write the result (.pt for torch models, .onnx for ONNX)")
    a.add_argument("--verify", action="store_true", help="check every pass numerically; exit 3 on a mismatch")
    a.add_argument("--input-shape", action="append",
                   help="shape of a torch model's input, e.g. 1,3,224,224 (repeat for several inputs)")
    a.add_argument("--dtype", default="float32", choices=["float32", "float64"], help="torch model dtype")
    a.add_argument("--seed", type=int, default=0, help="seed of the random example inputs")
    a.add_argument("--train", action="store_true", help="keep a built model in training mode (default: eval)")
    a.add_argument("--report-json", help="also write the report as JSON")
    a.set_defaults(run=_cmd_apply)
    e = sub.add_parser("expand", help="replace convs by training-time blocks (RepVGG, ACB, DBB, MobileOne, ExpandNets)")
    e.add_argument("model", help="package.module:callable or a torch.save'd model (.pt/.pth)")
    e.add_argument("--scheme", default="repvgg", choices=["repvgg", "acb", "dbb", "mobileone", "expand"])
    e.add_argument("-o", "--output", help="where to write the expanded model (.pt), in training mode")
    e.add_argument("--where", action="append", help="module path pattern to expand, e.g. 'layer1.*' (repeatable; "
                                                    "default: what the scheme's paper expands)")
    e.add_argument("--init", default="preserve", choices=["preserve", "fresh"],
                   help="preserve: the expanded model computes the original's outputs (default); fresh: new weights")
    e.add_argument("--k", type=int, help="mobileone: number of KxK branches (default 4)")
    e.add_argument("--ratio", type=int, help="expand: width ratio of the cascades' middles (default 4)")
    e.add_argument("--input-shape", action="append", help="example input shape (default 1,3,224,224)")
    e.add_argument("--seed", type=int, default=0, help="seed of the random example inputs")
    e.add_argument("--verify", action="store_true",
                   help="check the preserving init and the round trip expand -> contract; exit 3 on a mismatch")
    e.add_argument("--report-json", help="also write the report as JSON")
    e.set_defaults(run=_cmd_expand)
    p = sub.add_parser("passes", help="list the available passes")
    p.set_defaults(run=_cmd_passes)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except EquivalenceError as exc:
        print(f"verification failed: {exc}", file=sys.stderr)
        return EXIT_NOT_EQUIVALENT
    except RewriteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
