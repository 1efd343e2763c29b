"""Fuzzing: mutated ONNX files and mutated random nn.Module graphs through the API and the CLI.

Every outcome must be a RewriteError (the CLI: exit 2, or 4 for a model onnxruntime cannot run,
with nothing written) or a rewritten model equivalent to the input. Anything else (a raw
exception, a verification failure, an output file left after an error) is a finding: the
`check_*` functions raise FuzzFailure or let the exception through, so hypothesis shrinks it.

tests/test_fuzz.py runs a fast slice; scripts/fuzz.py the long run (python scripts/fuzz.py --examples 10000).
"""
from __future__ import annotations

import contextlib
import io
import math
import os
import random
import tempfile
from collections import Counter
from functools import lru_cache

import numpy as np
import onnx
import torch
import torch.utils._pytree
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from .api import apply
from .errors import EquivalenceError, NotVerifiableError, RewriteError
from .testing import random_networks
from .verify import verify

PASSES = ["fold_bn", "fuse_branches", "remove_residual", "remove_channels", "cleanup"]
CLI_PASSES = "fold_bn,fuse_branches,cleanup"
OUTCOMES: Counter = Counter()  # what the examples of this process came to, for the summary


class FuzzFailure(AssertionError):
    """An outcome the contract does not allow."""


# -- seed ONNX models ---------------------------------------------------------------------------
def _init(rng, name, shape, low=None, high=None):
    values = rng.uniform(low, high, shape) if low is not None else rng.standard_normal(shape)
    return numpy_helper.from_array(values.astype(np.float32), name)


def _bn(rng, prefix, x, y, c):
    inits = [_init(rng, f"{prefix}_g", (c,)), _init(rng, f"{prefix}_b", (c,)), _init(rng, f"{prefix}_m", (c,)),
             _init(rng, f"{prefix}_v", (c,), 0.5, 2.0)]
    node = helper.make_node("BatchNormalization", [x] + [t.name for t in inits], [y], name=prefix, epsilon=1e-5)
    return node, inits


def _conv(rng, prefix, x, y, cin, cout, k=3, groups=1, bias=True):
    inits = [_init(rng, f"{prefix}_w", (cout, cin // groups, k, k))] + ([_init(rng, f"{prefix}_bias", (cout,))]
                                                                        if bias else [])
    node = helper.make_node("Conv", [x] + [t.name for t in inits], [y], name=prefix, group=groups,
                            pads=[k // 2] * 4, kernel_shape=[k, k])
    return node, inits


def _model(nodes, inits, c_in, c_out, size, name):
    graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", c_in, size, size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="rewrite.fuzz")
    return onnx.shape_inference.infer_shapes(model)


@lru_cache(maxsize=1)
def seed_models() -> tuple[bytes, ...]:
    """Small serialized models covering the ops the passes rewrite: conv-BN, residual blocks, RepVGG branches, Gemm."""
    rng = np.random.default_rng(0)
    c = 4
    # conv -> BN -> relu
    n1, i1 = _conv(rng, "c1", "x", "a", c, c)
    n2, i2 = _bn(rng, "bn1", "a", "b", c)
    plain = _model([n1, n2, helper.make_node("Relu", ["b"], ["y"], name="r1")], i1 + i2, c, c, 6, "plain")
    # residual block: relu(x + bn(conv(relu(bn(conv(x))))))
    nodes, inits = [], []
    for node, init in (_conv(rng, "c1", "x", "a", c, c, bias=False), _bn(rng, "bn1", "a", "b", c),
                       _conv(rng, "c2", "r", "d", c, c, groups=2, bias=False), _bn(rng, "bn2", "d", "e", c)):
        nodes.append(node)
        inits += init
    nodes.insert(2, helper.make_node("Relu", ["b"], ["r"], name="r1"))
    nodes += [helper.make_node("Add", ["e", "x"], ["s"], name="add"), helper.make_node("Relu", ["s"], ["y"], name="r2")]
    residual = _model(nodes, inits, c, c, 6, "residual")
    # RepVGG-style branches: bn(conv3x3(x)) + bn(conv1x1(x)) + bn(x), then a Gemm head
    nodes, inits = [], []
    for node, init in (_conv(rng, "k3", "x", "a", c, c, 3, bias=False), _bn(rng, "bn3", "a", "a2", c),
                       _conv(rng, "k1", "x", "b", c, c, 1, bias=False), _bn(rng, "bn1", "b", "b2", c),
                       _bn(rng, "bnid", "x", "i2", c)):
        nodes.append(node)
        inits += init
    inits += [_init(rng, "fc_w", (3, c)), _init(rng, "fc_b", (3,))]
    nodes += [helper.make_node("Add", ["a2", "b2"], ["s1"], name="add1"), helper.make_node("Add", ["s1", "i2"], ["s2"], name="add2"),
              helper.make_node("Relu", ["s2"], ["r"], name="relu"),
              helper.make_node("GlobalAveragePool", ["r"], ["p"], name="gap"),
              helper.make_node("Flatten", ["p"], ["f"], name="flat", axis=1),
              helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["y"], name="fc", transB=1)]
    branches = _model(nodes, inits, c, 3, 6, "branches")
    return tuple(m.SerializeToString() for m in (plain, residual, branches))


# -- ONNX mutations -----------------------------------------------------------------------------
INT_ATTRS = ("group", "pads", "strides", "kernel_shape", "dilations", "axis", "transB", "training_mode")
OP_TYPES = ("Conv", "BatchNormalization", "Relu", "Add", "Gemm", "Identity", "Mul", "ConvTranspose", "MaxPool")


def _mutate_bytes(data: bytes, rnd: random.Random) -> bytes:
    buf = bytearray(data)
    for _ in range(rnd.randint(1, 4)):
        if not buf:
            break
        at = rnd.randrange(len(buf))
        op = rnd.choice(["flip", "byte", "delete", "insert", "truncate", "duplicate"])
        if op == "flip":
            buf[at] ^= 1 << rnd.randrange(8)
        elif op == "byte":
            buf[at] = rnd.randrange(256)
        elif op == "delete":
            del buf[at:at + rnd.randint(1, 8)]
        elif op == "insert":
            buf[at:at] = bytes(rnd.randrange(256) for _ in range(rnd.randint(1, 8)))
        elif op == "truncate":
            del buf[at:]
        else:
            buf[at:at] = buf[at:at + rnd.randint(1, 16)]
    return bytes(buf)


def _mutate_fields(data: bytes, rnd: random.Random) -> bytes:
    model = onnx.ModelProto.FromString(data)
    graph = model.graph
    for _ in range(rnd.randint(1, 3)):
        choice = rnd.choice(["attr", "op", "input", "dims", "dtype", "values", "raw", "shape", "opset", "name"])
        node = rnd.choice(graph.node)
        tensor = rnd.choice(graph.initializer)
        if choice == "attr":
            attrs = [a for a in node.attribute if a.name in INT_ATTRS]
            if attrs:
                a = rnd.choice(attrs)
                if a.type == onnx.AttributeProto.INT:
                    a.i = rnd.randint(-2, 6)
                elif a.ints:
                    a.ints[rnd.randrange(len(a.ints))] = rnd.randint(-2, 6)
            else:
                node.attribute.append(helper.make_attribute(rnd.choice(INT_ATTRS[:2]), rnd.randint(0, 4)))
        elif choice == "op":
            node.op_type = rnd.choice(OP_TYPES)
        elif choice == "input":
            if node.input and rnd.random() < 0.5:
                node.input[rnd.randrange(len(node.input))] = rnd.choice(["", "nowhere"] + [t.name for t in graph.initializer])
            elif node.input:
                del node.input[-1]
        elif choice == "dims" and tensor.dims:
            tensor.dims[rnd.randrange(len(tensor.dims))] = rnd.randint(-1, 6)
        elif choice == "dtype":
            tensor.data_type = rnd.choice([0, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.INT64,
                                           TensorProto.BFLOAT16, TensorProto.STRING, 99])
        elif choice == "values":
            try:
                values = numpy_helper.to_array(tensor).astype(np.float32).copy()
            except Exception:  # an earlier mutation already broke this tensor
                continue
            if values.size:
                special = rnd.choice([np.inf, -np.inf, np.nan, 3e38, -3e38, 1e-45, 0.0, 1e20])
                values.reshape(-1)[rnd.randrange(values.size)] = special
                tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))
        elif choice == "raw" and tensor.raw_data:
            cut = rnd.randint(-8, 8)
            tensor.raw_data = tensor.raw_data[:cut] if cut < 0 else tensor.raw_data + b"\x01" * cut
        elif choice == "shape":
            dims = graph.input[0].type.tensor_type.shape.dim
            if dims:
                dims[rnd.randrange(len(dims))].dim_value = rnd.randint(0, 7)
        elif choice == "opset":
            model.opset_import[0].version = rnd.choice([1, 6, 9, 13, 17, 21, 99])
        else:
            pass  # renamed below, at the byte level (protobuf refuses non-UTF-8 str assignments)
    out = model.SerializeToString()
    if rnd.random() < 0.3:
        names = [n.name.encode() for n in graph.node if n.name] + [o.name.encode() for o in graph.output]
        name = rnd.choice(names) if names else b""
        if name and out.count(name) >= 1:
            garbage = bytes(rnd.randrange(128, 256) for _ in range(len(name)))  # the same length: lengths stay valid
            out = out.replace(name, garbage, 1)
    return out


@st.composite
def mutated_onnx(draw) -> bytes:
    """A seed model with byte-level or field-level mutations (both seeded by hypothesis, so failures replay)."""
    base = draw(st.sampled_from(seed_models()))
    rnd = random.Random(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(["bytes", "fields", "fields", "none"]))
    if kind == "bytes":
        return _mutate_bytes(base, rnd)
    if kind == "fields":
        return _mutate_fields(base, rnd)
    return base


# -- checks -------------------------------------------------------------------------------------
def _quietly(fn, *args, **kwargs):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return fn(*args, **kwargs)


def check_onnx_api(data: bytes) -> str:
    """apply() on the file: a RewriteError, or a model that onnxruntime says is equivalent."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "fuzz.onnx")
        with open(path, "wb") as f:
            f.write(data)
        try:
            out = _quietly(apply, path, PASSES)
        except RewriteError as exc:
            return _record("onnx api: " + _kind(exc))
        try:
            result = _quietly(verify, path, out)
        except NotVerifiableError:
            return _record("onnx api: rewritten, not verifiable")
        except RewriteError as exc:
            # The original is accepted but onnxruntime cannot run it (a node it rejects at run time):
            # fine only if it cannot run the original either.
            if "fuzz.onnx" in str(exc):
                return _record("onnx api: rewritten, original not runnable")
            raise FuzzFailure(f"the rewritten model does not run: {exc}") from None
        if not result.ok:
            if _onnx_original_overflows(path, out):
                return _record("onnx api: rewritten, differs only where the original (nearly) overflows")
            raise FuzzFailure(f"rewritten model not equivalent: {result}")
        return _record("onnx api: rewritten, equivalent")


def check_cli(args: list[str], output: str, label: str) -> str:
    """`rewrite apply ... --verify -o output`: exit 0 with the file, or 2/4 with nothing written."""
    from .cli import main

    code = _quietly(main, ["apply", *args, "--verify", "--quiet", "-o", output])
    if code == 0:
        if not os.path.isfile(output):
            raise FuzzFailure("exit 0 but no output file")
    elif code in (2, 4):
        folder = os.path.dirname(output)
        if os.path.exists(output) or (os.path.isdir(folder) and os.listdir(folder)):
            raise FuzzFailure(f"exit {code} but a file was written")
    else:
        raise FuzzFailure(f"exit code {code}")
    return _record(f"{label} cli: exit {code}")


def check_onnx_cli(data: bytes) -> str:
    with tempfile.TemporaryDirectory() as folder:
        src = os.path.join(folder, "in", "fuzz.onnx")
        os.makedirs(os.path.dirname(src))
        with open(src, "wb") as f:
            f.write(data)
        return check_cli([src, "--passes", CLI_PASSES], os.path.join(folder, "out", "fuzz.out.onnx"), "onnx")


def differs_only_where_not_finite(reference, candidate) -> bool:
    """Whether every difference sits where the reference overflowed or nearly did: inf, NaN, or within
    2^32 of the dtype's largest value. A fold changes where intermediate values overflow, so there one
    model may be finite and the other not (a known limit: no activation range analysis yet).
    Elsewhere the outputs must agree within float32's tolerance."""
    for a, b in zip(torch.utils._pytree.tree_flatten(reference)[0], torch.utils._pytree.tree_flatten(candidate)[0]):
        a, b = torch.as_tensor(a), torch.as_tensor(b)
        if not a.is_floating_point():
            continue
        edge = torch.finfo(a.dtype).max / 2.0**32
        a, b = a.double(), b.double()
        normal = torch.isfinite(a) & (a.abs() <= edge)
        if bool(normal.all()):
            if not bool(torch.equal(a, b)) and float((a - b).abs().max()) > 1e-5 * (float(a.abs().max()) or 1.0):
                return False
            continue
        if bool(normal.any()):
            scale = float(a[normal].abs().max()) or 1.0
            if float((a[normal] - b[normal]).nan_to_num(nan=math.inf).abs().max()) > 1e-5 * scale:
                return False
    return True


def _onnx_original_overflows(path: str, rewritten) -> bool:
    from .frontends.onnx_verify import random_inputs, run_session, session

    original = onnx.load(path)
    feeds = random_inputs(original)
    a = run_session(session(original, path), feeds, original, path)
    b = run_session(session(rewritten), feeds, rewritten)
    return differs_only_where_not_finite([torch.from_numpy(np.asarray(o)) for o in a],
                                         [torch.from_numpy(np.asarray(o)) for o in b])


def _kind(exc: RewriteError) -> str:
    if isinstance(exc, EquivalenceError):
        raise FuzzFailure(f"a pass broke equivalence: {exc}")
    return type(exc).__name__


def _record(outcome: str) -> str:
    OUTCOMES[outcome] += 1
    return outcome


# -- mutated random torch networks ----------------------------------------------------------------
MODULE_MUTATIONS = ("none", "huge", "inf", "nan", "tiny", "zero_var", "negative_var", "eps0", "train", "float64",
                    "wrong_channels", "wrong_rank")


@st.composite
def mutated_networks(draw):
    """(model, example input) from rewrite.testing.random_networks, with one field mutation."""
    model, x = draw(random_networks(max_steps=6))
    mutation = draw(st.sampled_from(MODULE_MUTATIONS))
    rnd = random.Random(draw(st.integers(0, 2**32 - 1)))
    params = [(n, p) for n, p in model.named_parameters()]
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        if mutation in ("huge", "inf", "nan", "tiny") and params:
            _, p = rnd.choice(params)
            value = {"huge": torch.finfo(p.dtype).max / rnd.choice([1, 2, 16]), "inf": math.inf, "nan": math.nan,
                     "tiny": 1e-45}[mutation]
            p.view(-1)[rnd.randrange(p.numel())] = value
        elif mutation in ("zero_var", "negative_var", "eps0") and bns:
            bn = rnd.choice(bns)
            if mutation == "eps0":
                bn.eps = 0.0
                bn.running_var.view(-1)[0] = 0.0
            else:
                bn.running_var.view(-1)[rnd.randrange(bn.num_features)] = 0.0 if mutation == "zero_var" else -1.0
        elif mutation == "train":
            rnd.choice(list(model.modules())).train()
        elif mutation == "float64":
            model = model.double()
            x = x.double()
        elif mutation == "wrong_channels":
            x = torch.randn(x.shape[0], x.shape[1] + 1, *x.shape[2:])
        elif mutation == "wrong_rank":
            x = x[0]
    return model, x, mutation


_CLI_MODEL: list = []


def cli_model():
    """The model the CLI fuzz case builds (`rewrite.fuzz:cli_model`)."""
    return _CLI_MODEL[0]


def check_torch_api(model: torch.nn.Module, x: torch.Tensor) -> str:
    try:
        out = _quietly(apply, model, PASSES, example_inputs=x)
    except RewriteError as exc:
        return _record("torch api: " + _kind(exc))
    result = verify(model, out, x)
    if not result.ok:
        with torch.no_grad():
            if differs_only_where_not_finite(model(x), out(x)):
                return _record("torch api: rewritten, differs only where the original (nearly) overflows")
        raise FuzzFailure(f"rewritten model not equivalent: {result}")
    return _record("torch api: rewritten, equivalent")


def check_torch_cli(model: torch.nn.Module, x: torch.Tensor) -> str:
    _CLI_MODEL[:] = [model]
    dtype = "float64" if x.dtype == torch.float64 else "float32"
    shape = ",".join(str(d) for d in x.shape)
    with tempfile.TemporaryDirectory() as folder:
        return check_cli(["rewrite.fuzz:cli_model", "--input-shape", shape, "--dtype", dtype, "--passes", CLI_PASSES,
                          "--train" if model.training else "--seed=0"], os.path.join(folder, "out", "m.pt"), "torch")
