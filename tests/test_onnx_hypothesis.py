"""Property tests of fold_bn on random ONNX graphs built with onnx.helper, checked in onnxruntime.

Each graph is Conv / ConvTranspose / Gemm followed by a BN in one of the forms exporters produce
(BatchNormalization with initializers or Constant nodes, or Mul + Add), with random attributes
and a symbolic batch. Properties: equivalence, idempotence, near misses left alone with a reason.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given, settings, strategies as st
from onnx import TensorProto, helper, numpy_helper

import rewrite

OPSET = 17


class Builder:
    """A tiny graph builder: initializers or Constant nodes, one symbolic batch input."""

    def __init__(self, rng: np.random.Generator, use_constant_nodes: bool = False):
        self.rng = rng
        self.nodes, self.inits = [], []
        self.use_constant_nodes = use_constant_nodes
        self.count = 0

    def name(self, base: str) -> str:
        self.count += 1
        return f"{base}{self.count}"

    def tensor(self, array: np.ndarray, base: str = "w") -> str:
        name = self.name(base)
        proto = numpy_helper.from_array(np.ascontiguousarray(array), name)
        if self.use_constant_nodes:
            self.nodes.append(helper.make_node("Constant", [], [name], value=proto, name=self.name("Constant")))
        else:
            self.inits.append(proto)
        return name

    def node(self, op: str, inputs: list[str], n_out: int = 1, **attrs) -> list[str] | str:
        outs = [self.name(f"{op.lower()}_out") for _ in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=self.name(op), **attrs))
        return outs[0] if n_out == 1 else outs

    def bn(self, x: str, channels: int, form: str, training: bool = False, eps: float = 1e-5) -> str:
        r = self.rng
        gamma = r.standard_normal(channels).astype(np.float32)
        beta = r.standard_normal(channels).astype(np.float32)
        mean = (r.standard_normal(channels) * 0.5).astype(np.float32)
        var = (r.random(channels) * 1.5 + 0.5).astype(np.float32)
        if form == "mul_add":  # BN as the exporter's folded Mul + Add, per channel of axis 1
            scale = (gamma / np.sqrt(var + eps)).astype(np.float32)
            shift = (beta - mean * scale).astype(np.float32)
            shape = (channels, 1, 1) if self.spatial == 2 else (channels,) + (1,) * self.spatial
            y = self.node("Mul", [x, self.tensor(scale.reshape(shape), "scale")])
            return self.node("Add", [self.tensor(shift.reshape(shape), "shift"), y])
        names = [self.tensor(t, k) for k, t in (("gamma", gamma), ("beta", beta), ("mean", mean), ("var", var))]
        outs = self.node("BatchNormalization", [x] + names, 3 if training else 1, epsilon=eps, momentum=0.9,
                         training_mode=int(training))
        return outs[0] if training else outs  # training mode also outputs the updated statistics

    def model(self, x_shape, y: str | list[str], dtype=TensorProto.FLOAT) -> onnx.ModelProto:
        outs = [y] if isinstance(y, str) else y
        graph = helper.make_graph(self.nodes, "g", [helper.make_tensor_value_info("x", dtype, x_shape)],
                                  [helper.make_tensor_value_info(o, dtype, [x_shape[0]] + [None] * (len(x_shape) - 1))
                                   for o in outs], self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
        model.ir_version = 8
        return model


@st.composite
def conv_cases(draw, transpose: bool = False):
    dims = draw(st.sampled_from([1, 2]))
    groups = draw(st.integers(1, 3))
    cin, cout = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 3))
    kernel = [draw(st.integers(1, 3)) for _ in range(dims)]
    stride = [draw(st.integers(1, 2)) for _ in range(dims)]
    dilation = [draw(st.integers(1, 2)) for _ in range(dims)]
    # Asymmetric pads: begin and end drawn separately.
    pads = [draw(st.integers(0, 2)) for _ in range(2 * dims)]
    size = max((k - 1) * d + 1 for k, d in zip(kernel, dilation)) + draw(st.integers(0, 4))
    return dict(dims=dims, groups=groups, cin=cin, cout=cout, kernel=kernel, stride=stride, dilation=dilation,
                pads=pads, size=size, bias=draw(st.booleans()), bias_as_add=draw(st.booleans()),
                form=draw(st.sampled_from(["bn", "bn_constant_nodes", "mul_add"])), seed=draw(st.integers(0, 2**16)),
                transpose=transpose)


def build_conv_bn(case, training: bool = False):
    rng = np.random.default_rng(case["seed"])
    b = Builder(rng, use_constant_nodes=case["form"] == "bn_constant_nodes")
    b.spatial = case["dims"]
    g, cin, cout = case["groups"], case["cin"], case["cout"]
    if case["transpose"]:
        w = rng.standard_normal((cin, cout // g, *case["kernel"])).astype(np.float32)
        pads = [0] * (2 * case["dims"])  # ConvTranspose pads crop the output; keep them symmetric and small
        op = "ConvTranspose"
    else:
        w = rng.standard_normal((cout, cin // g, *case["kernel"])).astype(np.float32)
        pads = case["pads"]
        op = "Conv"
    inputs = ["x", b.tensor(w)]
    if case["bias"] and not case["bias_as_add"]:
        inputs.append(b.tensor(rng.standard_normal(cout).astype(np.float32), "bias"))
    y = b.node(op, inputs, kernel_shape=case["kernel"], strides=case["stride"], dilations=case["dilation"],
               pads=pads, group=g)
    if case["bias"] and case["bias_as_add"]:  # the bias as a separate Add, as some exporters write it
        shape = (cout,) + (1,) * case["dims"]
        y = b.node("Add", [y, b.tensor(rng.standard_normal(shape).astype(np.float32), "bias")])
    y = b.bn(y, cout, "mul_add" if case["form"] == "mul_add" else "bn", training=training)
    return b.model(["batch", cin] + [case["size"]] * case["dims"], y)


def bn_count(model) -> int:
    return sum(n.op_type in ("BatchNormalization", "Mul") for n in model.graph.node)


def check_fold(model, expect_rewrite=True):
    before = model.SerializeToString()
    out, report = rewrite.apply(model, ["fold_bn"], return_report=True)
    assert model.SerializeToString() == before, "the input ModelProto changed"
    onnx.checker.check_model(out, full_check=True)
    result = report["fold_bn"].result
    check = rewrite.verify(model, out)
    assert check.ok, str(check)
    if expect_rewrite:
        assert result.modified, [r.reason for r in result.refused]
        assert bn_count(out) == 0
    # Idempotence: a second run finds nothing more.
    again, report2 = rewrite.apply(out, ["fold_bn"], return_report=True)
    assert not report2["fold_bn"].result.modified
    assert out.graph.input == model.graph.input  # the symbolic batch survives
    assert [o.name for o in out.graph.output] == [o.name for o in model.graph.output]
    return out, result


@settings(max_examples=30, deadline=None)
@given(conv_cases())
def test_conv_bn_forms_fold_exactly(case):
    check_fold(build_conv_bn(case))


@settings(max_examples=15, deadline=None)
@given(conv_cases(transpose=True))
def test_conv_transpose_bn_folds_exactly(case):
    if case["form"] == "mul_add":
        case["form"] = "bn"
    check_fold(build_conv_bn(case))


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 5), st.integers(1, 5), st.booleans(), st.booleans(),
       st.sampled_from([1.0, 0.5, 1.7]), st.sampled_from([1.0, 0.25, -2.0]), st.sampled_from(["vector", "row", "none"]),
       st.integers(0, 2**16))
def test_gemm_bn_folds_exactly(fin, fout, trans_b, use_matmul, alpha, beta, c_form, seed):
    rng = np.random.default_rng(seed)
    b = Builder(rng)
    b.spatial = 0
    w = rng.standard_normal((fout, fin) if trans_b else (fin, fout)).astype(np.float32)
    if use_matmul:  # MatMul + Add, the other form of a linear layer
        y = b.node("MatMul", ["x", b.tensor(rng.standard_normal((fin, fout)).astype(np.float32))])
        y = b.node("Add", [y, b.tensor(rng.standard_normal(fout).astype(np.float32), "bias")])
    else:
        inputs = ["x", b.tensor(w)]
        if c_form != "none":
            c = rng.standard_normal(fout if c_form == "vector" else (1, fout)).astype(np.float32)
            inputs.append(b.tensor(c, "c"))
        y = b.node("Gemm", inputs, alpha=alpha, beta=beta, transB=int(trans_b))
    y = b.bn(y, fout, "bn")
    check_fold(b.model(["batch", fin], y))


def test_gemm_with_batch_shaped_c_is_left_opaque():
    """C of shape (N, out) is not a bias: Gemm stays as it is, BN stays, outputs unchanged."""
    rng = np.random.default_rng(0)
    b = Builder(rng)
    y = b.node("Gemm", ["x", b.tensor(rng.standard_normal((3, 4)).astype(np.float32)),
                        b.tensor(rng.standard_normal((2, 4)).astype(np.float32), "c")])
    b.spatial = 0
    y = b.bn(y, 4, "bn")
    out, result = check_fold(b.model([2, 3], y), expect_rewrite=False)
    assert not result.modified
    assert [n.op_type for n in out.graph.node] == ["Gemm", "BatchNormalization"]


@settings(max_examples=15, deadline=None)
@given(conv_cases())
def test_training_mode_bn_is_refused(case):
    """A near miss: BN with training_mode=1 has no fixed affine."""
    case["form"], case["bias_as_add"] = "bn", False
    model = build_conv_bn(case, training=True)
    out, result = check_fold(model, expect_rewrite=False)
    assert not result.modified
    assert any("batch statistics" in r.reason for r in result.refused), result.refused
    assert sum(n.op_type == "BatchNormalization" for n in out.graph.node) == 1


@settings(max_examples=15, deadline=None)
@given(conv_cases())
def test_conv_output_read_twice_is_left_alone(case):
    """A near miss: the conv output is also a graph output, so folding BN into it would change that output."""
    case["form"] = "bn"
    case["bias_as_add"] = False
    model = build_conv_bn(case)
    conv_out = next(n for n in model.graph.node if n.op_type == "Conv").output[0]
    rank = case["dims"] + 2
    model.graph.output.append(helper.make_tensor_value_info(conv_out, TensorProto.FLOAT, ["batch"] + [None] * (rank - 1)))
    out, result = check_fold(model, expect_rewrite=False)
    assert not result.modified
    assert result.refused and "also read" in result.refused[0].reason


def test_shared_initializer_with_two_bns_is_not_overwritten():
    """One weight read by two convs, each with its own BN: each gets its own folded weight."""
    rng = np.random.default_rng(3)
    b = Builder(rng)
    b.spatial = 2
    w = b.tensor(rng.standard_normal((4, 3, 3, 3)).astype(np.float32))
    y1 = b.bn(b.node("Conv", ["x", w], pads=[1, 1, 1, 1]), 4, "bn")
    y2 = b.bn(b.node("Conv", ["x", w], pads=[1, 1, 1, 1]), 4, "bn")
    model = b.model(["batch", 3, 8, 8], [y1, y2])
    out, result = check_fold(model)
    assert result.counts["fold_bn_into_conv"] == 2
    weights = [i for i in out.graph.initializer if len(i.dims) == 4]
    assert len(weights) == 2 and not np.array_equal(numpy_helper.to_array(weights[0]),
                                                    numpy_helper.to_array(weights[1]))


def test_untouched_nodes_come_back_verbatim():
    """A graph with nothing to fold is written back node for node."""
    rng = np.random.default_rng(4)
    b = Builder(rng)
    y = b.node("Conv", ["x", b.tensor(rng.standard_normal((2, 3, 1, 1)).astype(np.float32))])
    y = b.node("LeakyRelu", [y], alpha=0.3)
    y = b.node("Sigmoid", [y])
    model = b.model(["batch", 3, 4, 4], y)
    out = rewrite.apply(model, ["fold_bn", "cleanup"])
    assert [n.SerializeToString() for n in out.graph.node] == [n.SerializeToString() for n in model.graph.node]
    assert {i.name for i in out.graph.initializer} == {i.name for i in model.graph.initializer}


@pytest.mark.parametrize("divisor,mapped", [(4.0, True), (3.0, False)])
def test_div_by_constant_maps_to_mul_only_when_exact(divisor, mapped):
    """x / 4 is x * 0.25 bit for bit and folds into the conv; x / 3 is not, and stays a Div."""
    rng = np.random.default_rng(5)
    b = Builder(rng)
    b.spatial = 2
    y = b.node("Conv", ["x", b.tensor(rng.standard_normal((2, 3, 1, 1)).astype(np.float32))])
    y = b.node("Div", [y, b.tensor(np.full((2, 1, 1), divisor, np.float32), "d")])
    y = b.node("Sub", [y, b.tensor(rng.standard_normal((2, 1, 1)).astype(np.float32), "s")])
    out, result = check_fold(b.model(["batch", 3, 4, 4], y), expect_rewrite=False)
    ops = [n.op_type for n in out.graph.node]
    assert ops == (["Conv"] if mapped else ["Conv", "Div", "Sub"])
