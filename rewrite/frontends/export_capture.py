"""Capture with torch.export: an nn.Module or an ExportedProgram -> (root module, fx graph of torch calls).

torch.export runs the real forward on fake tensors, so shape-dependent Python (`if H == ...`,
`math.ceil(x / stride)`), slice assignment and modules built inside forward all capture; the price
is time (seconds where symbolic_trace takes milliseconds). The program is functionalized (inference
IR: slice assignment becomes slice_scatter), unlifted (parameters become get_attr nodes named by
their original paths) and its aten ops are renamed to torch calls (aten_forms.py), so the fx
importer takes it from there.
"""
from __future__ import annotations

import copy
import os
import traceback

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from ..errors import TraceError
from .aten_forms import normalize

_TORCH_DIR = os.path.dirname(torch.__file__)
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def export_program(module: torch.nn.Module, example_inputs: tuple) -> torch.export.ExportedProgram:
    """torch.export.export, or a TraceError naming the user's line and what to try.

    A copy is exported: export runs the real forward on fake tensors, and a forward that caches
    something on its module (timm's attention-bias caches) would otherwise keep fake tensors there."""
    try:
        return torch.export.export(copy.deepcopy(module), example_inputs, strict=False)
    except Exception as exc:
        raise export_error(module, exc) from None


def user_frame(exc: BaseException):
    """The innermost frame of the traceback outside torch and this package: where the user's code failed."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if not f.filename.startswith(_TORCH_DIR) and not f.filename.startswith(_PACKAGE_DIR)]
    return frames[-1] if frames else None


def module_at(module: torch.nn.Module, frame) -> str:
    """The path of the innermost submodule whose forward holds the frame's line ('<root>' for the model)."""
    found = "<root>"
    for path, sub in module.named_modules():
        code = getattr(type(sub).forward, "__code__", None)
        if code is None or code.co_filename != frame.filename:
            continue
        last = max((line for _, _, line in code.co_lines() if line is not None), default=code.co_firstlineno)
        if code.co_firstlineno <= frame.lineno <= last:
            found = path or "<root>"
    return found


def export_error(module: torch.nn.Module, exc: Exception) -> TraceError:
    cause = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    frame = user_frame(exc)
    path = module_at(module, frame) if frame is not None else "<root>"
    line = f"{frame.filename}:{frame.lineno}: {frame.line}" if frame is not None else "unknown line"
    cls = type(module.get_submodule(path) if path != "<root>" else module).__name__
    message = (f"torch.export cannot capture module '{path}' ({cls}) at {line}\n"
               f"  cause: {type(exc).__name__}: {cause}\n"
               "  try: make the failing line independent of tensor values (torch.export allows shape-dependent "
               "Python, not value-dependent), or rewrite a smaller submodule")
    return TraceError(message, where=f"module '{path}'")


def program_graph(program: torch.export.ExportedProgram) -> tuple[torch.nn.Module, fx.Graph]:
    """(root holding the parameters under their original names, fx graph of torch calls) of `program`."""
    unlifted = program.module()
    if not _out_of_place(unlifted.graph):
        # functional aten (slice assignment as slice_scatter) takes a second trace: slow, so only when needed
        unlifted = program.run_decompositions({}).module()
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in unlifted.graph.nodes:
        if node.op == "call_module" and node.target == "_guards_fn":
            continue  # export's check of its own shape guards; the rewritten graph is specialized the same way
        if node.op == "call_function" and node.target is torch.ops.aten._assert_tensor_metadata.default:
            continue
        if node.op == "output":
            flat = fx.node.map_arg(node.args[0], lambda n: env[n])
            graph.output(_unflattened(flat, program.call_spec.out_spec))
            continue
        env[node] = graph.node_copy(node, lambda n: env[n])
    normalize(graph)
    graph.eliminate_dead_code()
    return unlifted, graph


def _writes(node: fx.Node) -> bool:
    return node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload) and \
        node.target._schema.is_mutable


def _aliases(node: fx.Node) -> bool:
    """Whether the node's result may share memory with an input (a view, or an in-place result)."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return node.op not in ("get_attr", "placeholder")  # getitem of a tuple, a Python call: assume so
    return any(r.alias_info is not None for r in node.target._schema.returns)


def _out_of_place(graph: fx.Graph) -> bool:
    """Rewrite in-place calls on fresh tensors (`relu_`, `add_` of inplace=True layers and `x += y`) as
    their out-of-place forms, in place; False (the graph left as it was) when some write needs
    functionalization: a write into a view, a parameter or an input, or a tensor something reads later."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    plans, planned = [], set()
    for node in graph.nodes:
        if not _writes(node):
            continue
        schema = node.target._schema
        written = [i for i, a in enumerate(schema.arguments) if a.alias_info is not None and a.alias_info.is_write]
        name = schema.name.split("::")[-1]
        pure = getattr(getattr(torch.ops.aten, name[:-1], None), node.target._overloadname, None) \
            if name.endswith("_") else None
        if written != [0] or pure is None or pure._schema.is_mutable or not node.args:
            return False
        target = node.args[0]
        fresh = target in planned  # an earlier in-place call that becomes out-of-place: a new tensor
        if not isinstance(target, fx.Node) or target.op in ("placeholder", "get_attr") or \
                (_aliases(target) and not fresh):
            return False
        others = [u for u in target.users if u is not node]
        if any(order[u] > order[node] or (_aliases(u) and u not in planned) for u in others):
            return False  # read after the write, or viewed: only functionalization keeps that right
        plans.append((node, pure))
        planned.add(node)
    for node, pure in plans:
        node.target = pure
    return True


def _unflattened(flat, spec):
    """The model's own output structure (a tensor, a tuple, a dict) instead of export's flat tuple."""
    if spec is None:
        return flat
    structure = pytree.tree_unflatten(list(flat), spec)
    plain = (tuple, list, dict, fx.Node)

    def check(obj):
        if not isinstance(obj, plain):
            raise TraceError(f"the model returns a {type(obj).__name__}; only tensors, tuples, lists and dicts "
                             "of them can be written back from an exported graph")
        if isinstance(obj, (tuple, list)):
            for o in obj:
                check(o)
        elif isinstance(obj, dict):
            for o in obj.values():
                check(o)

    check(structure)
    return structure


def example_inputs_of(program: torch.export.ExportedProgram) -> tuple:
    """Random inputs of the shapes and dtypes the program was exported with."""
    specs = [s for s in program.graph_signature.input_specs if s.kind == torch.export.graph_signature.InputKind.USER_INPUT]
    by_name = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    inputs = []
    generator = torch.Generator().manual_seed(0)
    for spec in specs:
        val = by_name[spec.arg.name].meta.get("val")
        if not isinstance(val, torch.Tensor):
            raise TraceError(f"input {spec.arg.name} of the exported program is not a tensor; pass example_inputs")
        shape = [int(d) for d in val.shape]
        if val.dtype.is_floating_point:
            inputs.append(torch.randn(shape, generator=generator, dtype=val.dtype))
        elif val.dtype == torch.bool:
            inputs.append(torch.randint(0, 2, shape, generator=generator).bool())
        else:
            inputs.append(torch.randint(0, 10, shape, generator=generator, dtype=val.dtype))
    return tuple(inputs)


def as_module(model):
    """An ExportedProgram's runnable module; anything else as it is."""
    return model.module() if isinstance(model, torch.export.ExportedProgram) else model


def reexport(module: torch.nn.Module, example_inputs: tuple) -> torch.export.ExportedProgram:
    """The rewritten graph as an ExportedProgram: torch.export of the GraphModule, on the same inputs."""
    try:
        return torch.export.export(module, tuple(example_inputs), strict=False)
    except Exception as exc:
        raise TraceError(f"the rewritten graph cannot be exported again: {type(exc).__name__}: "
                         f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}",
                         where="ExportedProgram") from None
