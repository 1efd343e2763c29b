"""The `rewrite` command.

    rewrite apply torchvision.models:resnet18 --passes fold_bn,cleanup -o resnet18.pt --verify
    rewrite apply model.onnx --passes fold_bn -o model.fused.onnx --verify
    rewrite expand torchvision.models:resnet18 --scheme repvgg -o resnet18.repvgg.pt --verify
    rewrite passes

Exit codes: 0 done, 2 bad input (unreadable model, unknown pass, untraceable model, unwritable
output), 3 failed verification, 4 not verifiable (onnxruntime cannot run an op of the model). The
output file is written atomically, and only after every check passed.

torch is imported only when a model is loaded, so `--help` and `passes` answer at once.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from .errors import EquivalenceError, ModelLoadError, NotVerifiableError, RewriteError
from .files import atomic_write, check_output_path
from .model_files import ONNX_SUFFIXES, TORCH_SUFFIXES, has_suffix, load_model

EXIT_BAD_INPUT = 2
EXIT_NOT_EQUIVALENT = 3
EXIT_NOT_VERIFIABLE = 4

OUTPUT_SUFFIXES = {"torch": TORCH_SUFFIXES, "onnx": ONNX_SUFFIXES}
KIND_NAMES = {"torch": "a torch", "onnx": "an ONNX"}

TRAIN_VERIFY_REASON = ("--train with --verify: a model in training mode is random (dropout draws new masks) and "
                       "BatchNorm uses batch statistics, so its outputs cannot be compared; verify in eval mode "
                       "(drop --train)")


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(d) for d in text.split(","))
    except ValueError:
        raise ModelLoadError(f"an input shape is comma-separated integers, not {text!r}") from None


def parse_named_shape(text: str) -> tuple[str | None, tuple[int, ...]]:
    """'NAME:1,3,224,224' (an ONNX input by name) or '1,3,224,224' (the next input in order)."""
    name, _, dims = text.rpartition(":")
    return (name or None), parse_shape(dims)


def _onnx_example_inputs(path, args):
    """Random inputs of the --input-shape shapes for an ONNX model (None when none are given)."""
    if not args.input_shape:
        return None
    import onnx

    from .frontends.onnx_verify import check_input_shapes, graph_inputs, random_inputs

    model = onnx.load(path, load_external_data=False)  # the declarations only; apply loads the model
    names = [v.name for v in graph_inputs(model)]
    shapes = {}
    for position, text in enumerate(args.input_shape):
        name, shape = parse_named_shape(text)
        if name is None:
            if position >= len(names):
                raise ModelLoadError(f"--input-shape {text!r}: the model has {len(names)} input(s) ({', '.join(names)})",
                                     where=f"file {path}")
            name = names[position]
        shapes[name] = shape
    check_input_shapes(model, shapes, f"file {path}")
    return random_inputs(model, args.seed, shapes)


def model_kind(model: Any) -> str:
    """'onnx' for what load_model returns for ONNX (its path) and for a ModelProto result, else 'torch'."""
    return "onnx" if isinstance(model, (str, os.PathLike)) or type(model).__name__ == "ModelProto" else "torch"


def check_output_suffix(path: str, kind: str) -> None:
    """The output format follows the input: a torch model is written as .pt/.pth, an ONNX model as .onnx."""
    suffixes = OUTPUT_SUFFIXES[kind]
    if not has_suffix(path, suffixes):
        raise RewriteError(f"{KIND_NAMES[kind]} model is written as {' or '.join(suffixes)}; the output name says otherwise "
                           "(converting between formats is not what this command does)", where=f"file {path}")


def save_model(model: Any, path: str) -> None:
    if model_kind(model) == "torch":
        import torch

        atomic_write(path, lambda tmp: torch.save(model, tmp))
        return
    from .frontends.onnx import save_onnx  # ONNX models are saved with their external data, atomically

    save_onnx(model, path)


def _check_arguments(args) -> None:
    if not args.output and not args.dry_run:
        raise RewriteError("-o/--output is required (or --dry-run to rewrite and report without writing anything)")
    if args.train and args.verify:
        raise RewriteError(TRAIN_VERIFY_REASON)


def _example_inputs(model, args):
    import torch

    dtype = getattr(torch, args.dtype)
    shapes = [parse_shape(s) for s in (args.input_shape or ["1,3,224,224"])]
    generator = torch.Generator().manual_seed(args.seed)
    return model.to(dtype), tuple(torch.randn(s, generator=generator, dtype=dtype) for s in shapes)


def _cmd_apply(args) -> int:
    _check_arguments(args)
    passes = [p.strip() for p in args.passes.split(",") if p.strip()]
    model = load_model(args.model, args.train, trust_pickle=args.trust_pickle)
    kind = model_kind(model)
    for path in filter(None, (args.output, args.report_json, args.report_html)):
        check_output_path(path)
    if args.output:
        check_output_suffix(args.output, kind)
    example, capture = None, {}
    if kind == "torch":
        model, example = _example_inputs(model, args)
        capture = {"capture": args.capture or "auto"}
    elif args.capture:
        raise RewriteError(f"--capture is for torch models; {args.model} is an ONNX model, read as it is")
    else:
        example = _onnx_example_inputs(model, args)
    from .api import apply

    out, report = apply(model, passes, example_inputs=example, verify=args.verify, return_report=True,
                        progress=not args.quiet and sys.stderr.isatty(), **capture)
    if not args.quiet:
        print(report)
    if args.report_json:
        os.makedirs(os.path.dirname(os.path.abspath(args.report_json)), exist_ok=True)
        atomic_write(args.report_json, lambda tmp: Path(tmp).write_text(json.dumps(report.to_dict(), indent=2)))
    if args.report_html:
        os.makedirs(os.path.dirname(os.path.abspath(args.report_html)), exist_ok=True)
        page = report.to_html(title=f"rewrite {args.model} --passes {args.passes}")
        atomic_write(args.report_html, lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))
    if args.dry_run:
        print("\ndry run: nothing written" + (f" (not {args.output})" if args.output else ""))
        return 0
    parent = os.path.dirname(os.path.abspath(args.output))
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as exc:
        raise RewriteError(f"cannot create the output folder: {exc.strerror}", where=f"file {args.output}") from None
    save_model(out, args.output)
    if not args.quiet:
        print(f"\nwrote {args.output}")
    return 0


def _cmd_expand(args) -> int:
    from .expansion.command import run

    return run(args, load_model, parse_shape, save_model)


def _cmd_passes(args) -> int:
    from .pass_catalog import BUILTIN_PASSES

    for name, description in sorted(BUILTIN_PASSES.items()):
        print(f"{name:<18} {description}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rewrite", description="Exact graph-level rewriting of PyTorch and ONNX models.",
        epilog=f"exit codes: 0 done, {EXIT_BAD_INPUT} bad input, {EXIT_NOT_EQUIVALENT} failed verification, "
               f"{EXIT_NOT_VERIFIABLE} not verifiable (onnxruntime cannot run an op of the model)")
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("apply", help="rewrite a model and write the result")
    a.add_argument("model", help="package.module:callable, a torch.save'd model (.pt/.pth) or an ONNX file")
    a.add_argument("--passes", default="fold_bn", help="comma-separated pass names (see `rewrite passes`)")
    a.add_argument("-o", "--output", help="where to write the result: .pt/.pth for torch models, .onnx for ONNX "
                                          "(required unless --dry-run)")
    a.add_argument("--dry-run", action="store_true", help="rewrite and print the report, write no model")
    a.add_argument("--verify", action="store_true",
                   help=f"check every pass numerically; exit {EXIT_NOT_EQUIVALENT} on a mismatch, "
                        f"{EXIT_NOT_VERIFIABLE} if the model cannot be run to check it")
    a.add_argument("--input-shape", action="append",
                   help="shape of an input, e.g. 1,3,224,224 (repeat for several inputs); for ONNX also "
                        "NAME:1,3,224,224 by input name (default: the declared shapes, symbolic dims drawn)")
    a.add_argument("--capture", choices=["auto", "fx", "export"],
                   help="how a torch model is captured: auto (default) traces with torch.fx and falls back to "
                        "torch.export when tracing fails; fx never falls back; export always uses torch.export")
    a.add_argument("--dtype", default="float32", choices=["float32", "float64"], help="torch model dtype")
    a.add_argument("--seed", type=int, default=0, help="seed of the random example inputs")
    a.add_argument("--train", action="store_true", help="keep a built model in training mode (default: eval)")
    a.add_argument("--trust-pickle", "--unsafe-load", dest="trust_pickle", action="store_true",
                   help="allow a .pt/.pth file to be a pickled nn.Module. Unpickling runs code stored in the "
                        "file, which can do anything your user can: use it only for files you made or trust. "
                        "Without it, files are read with torch.load(weights_only=True)")
    a.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no printed report")
    a.add_argument("--report-json", help="also write the report as JSON (every site, with all notes)")
    a.add_argument("--report-html", help="also write the report as one self-contained HTML page with the graphs")
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
    except NotVerifiableError as exc:
        print(f"not verifiable: {exc}", file=sys.stderr)
        return EXIT_NOT_VERIFIABLE
    except RewriteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
