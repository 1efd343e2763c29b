"""The op registry: declared kinds on both frontends, user ops, the one 'untouched' decision, strict edges."""
import io

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import rewrite
from rewrite import P, Pass, PassResult, RulePass, rule
from rewrite.errors import RewriteError
from rewrite.ir import attr, define_op, defined_ops, op_def
from rewrite.testing import check_pass, randomize_bn


def onnx_of(model, x, opset=17):
    buffer = io.BytesIO()
    torch.onnx.export(model, (x,), buffer, dynamo=False, opset_version=opset, do_constant_folding=True,
                      training=torch.onnx.TrainingMode.PRESERVE)
    return onnx.load_from_string(buffer.getvalue())


class RenameAll(Pass):
    """Renames every node of the given kinds: a renamed node must be written anew by either backend."""

    name = "rename_all"

    def __init__(self, kinds):
        self.kinds = set(kinds)

    def run(self, graph, options=None):
        result = PassResult(self.name)
        for node in graph.nodes:
            if node.kind in self.kinds:
                node.name = f"{node.name}_renamed"
                result.record("rename", [node.name])
        return result


# -- each new kind: imported from its forms, written back, and rebuilt ------------------------------
class Activations(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.mods = nn.ModuleList([nn.Sigmoid(), nn.SiLU(), nn.Hardswish(), nn.Hardsigmoid(), nn.GELU(),
                                   nn.GELU(approximate="tanh"), nn.LeakyReLU(0.3), nn.PReLU(4), nn.Softmax(dim=1)])

    def forward(self, x):
        y = self.conv(x)
        outs = [m(y) for m in self.mods]
        outs += [torch.sigmoid(y), F.silu(y), F.hardswish(y), F.hardsigmoid(y), F.gelu(y), F.leaky_relu(y, 0.2),
                 F.softmax(y, dim=-1), y.sigmoid(), y.softmax(1), torch.mean(y, (2, 3), keepdim=True), y.mean([1]),
                 F.pad(y, (1, 2, 0, 1), value=0.5), F.pad(y, (1, 1, 1, 1), mode="reflect"),
                 nn.functional.pad(y, (2, 0, 1, 1), mode="replicate"), y[:, 1:3], y[:, :, 2:], y[:, :, :, ::2]]
        return tuple(outs)


EXPECTED_KINDS = {"sigmoid": 3, "silu": 2, "hardswish": 2, "hardsigmoid": 2, "gelu": 3, "leaky_relu": 2, "prelu": 1,
                  "softmax": 3, "mean": 2, "pad": 3, "slice": 3}


def test_every_new_kind_is_recognized_in_each_fx_form_and_written_back():
    m = Activations().eval()
    x = torch.randn(2, 3, 6, 7)
    out, report = rewrite.apply(m, ["cleanup"], example_inputs=x, return_report=True)
    counts = report.nodes_before
    for kind, n in EXPECTED_KINDS.items():
        assert counts.get(kind) == n, (kind, counts)
    assert "opaque" not in counts
    for a, b in zip(m(x), out(x)):
        assert torch.equal(a, b)
    # Renamed nodes are written anew from the IR, through each kind's own emitter.
    rebuilt = rewrite.apply(m, [RenameAll(EXPECTED_KINDS)], example_inputs=x)
    assert "getattr(self.mods" not in rebuilt.code  # no module written back from its origin
    for a, b in zip(m(x), rebuilt(x)):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)


def test_new_kinds_through_onnx_and_rebuilt_there():
    m = Activations().eval()
    x = torch.randn(2, 3, 6, 7)
    model = onnx_of(m, x, opset=18)
    out, report = rewrite.apply(model, [RenameAll(EXPECTED_KINDS)], return_report=True)
    counts = report.nodes_before
    # (the exporter writes F.pad's pads as a shape subgraph, so Pad stays opaque until import folds constants)
    for kind in ("sigmoid", "hardswish", "hardsigmoid", "leaky_relu", "softmax", "mean", "slice", "prelu"):
        assert counts.get(kind, 0) >= 1, (kind, counts)
    check = rewrite.verify(model, out, {"input": x.numpy()} if model.graph.input[0].name == "input" else
                           {model.graph.input[0].name: x.numpy()})
    assert check.ok, check


@settings(max_examples=25)
@given(pads=st.lists(st.integers(0, 3), min_size=4, max_size=4), mode=st.sampled_from(["constant", "reflect", "replicate"]),
       value=st.sampled_from([0.0, 0.5, -1.25]), start=st.integers(-4, 3), stop=st.integers(-3, 6),
       step=st.integers(1, 3), dim=st.integers(1, 3))
def test_pad_and_slice_roundtrip_on_random_settings(pads, mode, value, start, stop, step, dim):
    class M(nn.Module):
        def forward(self, x):
            y = F.pad(x, pads, mode=mode, value=value) if mode == "constant" else F.pad(x, pads, mode=mode)
            index = [slice(None)] * 4
            index[dim] = slice(start, stop, step)
            return y[tuple(index)] * 1.0

    x = torch.randn(2, 3, 5, 6)
    m = M()
    try:
        expected = m(x)
    except Exception:
        return
    if expected.numel() == 0:
        return
    out, report = rewrite.apply(m, [RenameAll({"pad", "slice"})], example_inputs=x, return_report=True)
    assert report.nodes_before.get("pad") == 1 and report.nodes_before.get("slice") == 1
    assert torch.equal(out(x), expected)


def test_pad_with_per_channel_values_is_written_exactly_on_both_frontends():
    """A per-channel pad (DBB's BN-and-pad) has no F.pad / ONNX Pad form: zero pad plus a border constant."""
    fill = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)

    @rule(P.op("pad", P.any("x"), name="pad"))
    def per_channel(ctx, x, pad):
        if pad.params["value"] is not None and pad.params["value"].dim() > 0:
            return None
        return ctx.op("pad", x, params={"value": fill}, padding=pad.attrs["padding"], mode="constant")

    class M(nn.Module):
        def forward(self, x):
            return F.pad(x, (1, 2, 2, 0))

    x = torch.randn(2, 3, 4, 5)
    out = rewrite.apply(M(), [RulePass("per_channel", [per_channel])], example_inputs=x)
    expected = F.pad(x, (1, 2, 2, 0))
    border = torch.ones_like(expected, dtype=torch.bool)
    border[:, :, 2:6, 1:6] = False
    expected = torch.where(border, fill.float().reshape(1, 3, 1, 1).expand_as(expected), expected)
    assert torch.equal(out(x), expected)
    from onnx import TensorProto, helper

    pads = helper.make_tensor("pads", TensorProto.INT64, [8], [0, 0, 2, 1, 0, 0, 0, 2])
    graph = helper.make_graph([helper.make_node("Pad", ["x", "pads"], ["y"], mode="constant")], "pad",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 6, 8])], [pads])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx_out = rewrite.apply(model, [RulePass("per_channel", [per_channel])])
    import onnxruntime as ort

    session = ort.InferenceSession(onnx_out.SerializeToString())
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    np.testing.assert_array_equal(got, expected.numpy())


# -- passes see through the new kinds ---------------------------------------------------------------
def test_dead_channels_through_silu_are_removed_and_their_constant_folded():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.bn, self.act = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.SiLU()
            self.conv2 = nn.Conv2d(6, 4, 1)

        def forward(self, x):
            return self.conv2(self.act(self.bn(self.conv1(x))))

    m = randomize_bn(M()).eval()
    with torch.no_grad():
        m.bn.weight[[1, 4]] = 0.0  # dead: each outputs silu(beta), a constant
    x = torch.randn(2, 3, 8, 8)
    checked = check_pass("remove_channels", m, x)
    assert checked.model.conv2.weight.shape[1] == 4
    check_pass("remove_channels", m.double(), x.double(), dtype=torch.float64)


def test_sigmoid_is_known_non_negative():
    from rewrite.analysis.ranges import nonnegative_values
    from rewrite.frontends.fx import import_module

    class M(nn.Module):
        def forward(self, x):
            return torch.sigmoid(x) + F.softmax(x, 1), F.silu(x)

    graph = import_module(M(), torch.randn(2, 3))
    proved = nonnegative_values(graph)
    kinds = {n.output.name: n.kind for n in graph.nodes}
    assert {kinds[v] for v in proved if v in kinds} == {"sigmoid", "softmax", "add"}


# -- a user's own op -------------------------------------------------------------------------------
@pytest.fixture
def user_hardswish():
    op = define_op("user_hardswish", fx=[F.hardswish], onnx="HardSwish", pointwise=True, evaluate=F.hardswish)
    yield op
    from rewrite.ir import ops

    ops._OPS.pop("user_hardswish")


def hardswish_pass():
    @rule(P.mul(P.any("x"), P.op("hardsigmoid", P.any("x"))))
    def fuse_hardswish(ctx, x):
        """x * hardsigmoid(x) is hardswish(x)."""
        return ctx.op("user_hardswish", x)

    return RulePass("fuse_hardswish", [fuse_hardswish])


class HardSwishIdiom(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        return y * F.hardsigmoid(y)


def test_a_user_op_is_created_by_a_rule_and_written_to_fx(user_hardswish):
    m = HardSwishIdiom().eval()
    x = torch.randn(2, 3, 8, 8)
    out, report = rewrite.apply(m, [hardswish_pass()], example_inputs=x, verify=True, return_report=True)
    assert report["fuse_hardswish"].result.counts == {"fuse_hardswish": 1}
    assert "hardswish" in out.code and "hardsigmoid" not in out.code
    torch.testing.assert_close(out(x), F.hardswish(m.conv(x)), rtol=0, atol=1e-6)


def test_a_user_op_is_created_by_a_rule_and_written_to_onnx(user_hardswish):
    m = HardSwishIdiom().eval()
    x = torch.randn(2, 3, 8, 8)
    model = onnx_of(m, x, opset=14)
    out, report = rewrite.apply(model, [hardswish_pass()], verify=True, return_report=True)
    assert report["fuse_hardswish"].result.counts == {"fuse_hardswish": 1}
    assert [n.op_type for n in out.graph.node] == ["Conv", "HardSwish"]
    # read back, HardSwish is the built-in kind: the first definition of an op type wins
    _, again = rewrite.apply(out, ["cleanup"], return_report=True)
    assert again.nodes_before.get("hardswish") == 1 and "user_hardswish" not in again.nodes_before


def test_an_op_without_an_fx_form_fails_where_it_is_written():
    define_op("no_forms_op")
    try:
        @rule(P.op("relu", P.any("x")))
        def make_it(ctx, x):
            return ctx.op("no_forms_op", x)

        with pytest.raises(RewriteError, match="no fx function form"):
            rewrite.apply(nn.ReLU(), [make_it], example_inputs=torch.randn(2))
    finally:
        from rewrite.ir import ops

        ops._OPS.pop("no_forms_op")


# -- one "untouched" decision ----------------------------------------------------------------------
class EditInPlace(Pass):
    """Doubles every conv weight by editing node.params (a new tensor) and rewires the relu's input."""

    name = "edit_in_place"

    def run(self, graph, options=None):
        result = PassResult(self.name)
        for node in graph.nodes:
            if node.kind == "conv":
                node.params["weight"] = node.params["weight"] * 2
                result.record("double", [node.name])
        return result


class Halve(Pass):
    name = "halve"  # a correct edit: halve the conv weight and bias, double the scale after it

    def run(self, graph, options=None):
        result = PassResult(self.name)
        for node in graph.nodes:
            if node.kind == "conv":
                node.params["weight"] = node.params["weight"] / 2
                node.params["bias"] = node.params["bias"] / 2
                (user,) = node.output.users
                const = user.inputs[1].producer
                const.params["value"] = const.params["value"] * 2
                result.record("halve", [node.name])
        return result


class ConvScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.register_buffer("scale", torch.rand(1, 4, 1, 1) + 0.5)

    def forward(self, x):
        return torch.relu(self.conv(x) * self.scale)


def test_param_edits_are_written_by_both_backends_and_a_wrong_one_is_caught():
    m = ConvScale().eval()
    x = torch.randn(2, 3, 8, 8)
    fx_out = rewrite.apply(m, [Halve()], example_inputs=x, verify=True)
    torch.testing.assert_close(fx_out(x), m(x), rtol=1e-6, atol=1e-6)
    assert fx_out.conv.weight.data_ptr() != m.conv.weight.data_ptr()
    torch.testing.assert_close(fx_out.conv.weight, m.conv.weight / 2)
    with pytest.raises(rewrite.EquivalenceError, match="edit_in_place"):
        rewrite.apply(m, [EditInPlace()], example_inputs=x, verify=True)
    model = onnx_of(m, x)
    onnx_out = rewrite.apply(model, [Halve()], verify=True)
    assert rewrite.verify(model, onnx_out).ok
    with pytest.raises(rewrite.EquivalenceError, match="edit_in_place"):
        rewrite.apply(model, [EditInPlace()], verify=True)


def test_a_tensor_edited_in_place_counts_as_touched():
    m = ConvScale().eval()
    x = torch.randn(2, 3, 8, 8)

    class Scribble(Pass):
        name = "scribble"

        def run(self, graph, options=None):
            for node in graph.nodes:
                if node.kind == "conv":
                    node.params["weight"] = node.params["weight"].clone()
                    node.params["weight"].mul_(3)
            return PassResult(self.name)

    with pytest.raises(rewrite.EquivalenceError):
        rewrite.apply(m, [Scribble()], example_inputs=x, verify=True)


def test_renamed_modules_take_the_new_name():
    m = ConvScale().eval()
    x = torch.randn(2, 3, 8, 8)
    out = rewrite.apply(m, [RenameAll({"conv"})], example_inputs=x)
    assert "conv_renamed" in dict(out.named_modules())
    assert torch.equal(out(x), m(x))


# -- strict edges -----------------------------------------------------------------------------------
@pytest.mark.parametrize("make, message", [
    (lambda: P.op("rleu"), "did you mean 'relu'"),
    (lambda: P.op("clamp", P.any(), maximum=6.0), "no attribute 'maximum'"),
    (lambda: P.op("conv", P.any(), stride="2"), "attribute 'stride'"),
    (lambda: rewrite.apply(nn.ReLU(), ["cleanup"], example_input=torch.randn(2)), "did you mean 'example_inputs'"),
    (lambda: rewrite.apply(nn.ReLU(), ["fold_bm"]), "did you mean 'fold_bn'"),
    (lambda: rewrite.apply(nn.ReLU(), ["fuse_branches"], options={"fuse_branches": {"allow_costly": True}}),
     "did you mean 'allow_costlier'"),
    (lambda: rewrite.apply(nn.ReLU(), ["fold_bn"], options={"remove_channels": {"threshold": 0.1}}),
     "not a pass of this call"),
    (lambda: rewrite.register_pass(RulePass("fold_bn", [])), "already registered"),
    (lambda: define_op("relu"), "already defined"),
    (lambda: define_op("mine", attrs={"k": 3}), "rewrite.attr"),
])
def test_typos_are_errors_naming_the_place(make, message):
    with pytest.raises(RewriteError, match=message):
        make()


def test_a_rule_parameter_that_names_no_capture_is_an_error_when_defined():
    with pytest.raises(rewrite.errors.RuleError, match="'y' name no capture"):
        @rule(P.op("relu", P.any("x")))
        def bad(ctx, y):
            return y


def test_a_rule_returning_a_tensor_is_an_error_naming_the_rule():
    @rule(P.op("relu", P.any("x")))
    def returns_tensor(ctx, x):
        return torch.zeros(1)

    with pytest.raises(rewrite.errors.RuleError, match="rule returns_tensor: returned a Tensor"):
        rewrite.apply(nn.ReLU(), [returns_tensor], example_inputs=torch.randn(2))


def test_a_node_with_an_unknown_attribute_or_param_is_an_error():
    from rewrite import Graph, Node

    g = Graph()
    x = g.add_input("x")
    with pytest.raises(RewriteError, match="'relu' has no attribute 'inplace'"):
        Node("relu", "r", [x], attrs={"inplace": True})
    with pytest.raises(RewriteError, match="'linear' has no parameter 'wieght'"):
        Node("linear", "l", [x], params={"wieght": torch.zeros(2, 2)})
    with pytest.raises(RewriteError, match="needs parameter 'weight'"):
        Node("linear", "l", [x], params={})


def test_every_defined_kind_can_be_written_by_both_backends():
    """The registry and the writers agree: every built-in kind has an fx and an ONNX way out."""
    from rewrite.frontends import fx_emit, onnx_export, onnx_forms
    from rewrite.frontends.fx_forms import function_form

    for kind, op in defined_ops().items():
        if kind in ("opaque", "constant"):
            continue
        assert kind in fx_emit._EMITTERS or function_form(op) is not None, kind
        assert kind in onnx_export.EMITTERS or kind in onnx_forms.EMITTERS or op.onnx, kind


def test_op_definitions_normalize_attribute_values():
    assert op_def("conv").convert("stride", [1, 2], "test") == (1, 2)
    with pytest.raises(RewriteError):
        op_def("conv").convert("groups", 1.5, "test")
    spec = attr(float, 0.01)
    assert spec.convert(1) == 1.0 and spec.default == 0.01


class NotQuiteSiLU(nn.SiLU):
    def forward(self, x):  # a subclass with its own forward is not the stock op
        return x * torch.sigmoid(2 * x)


def test_near_misses_of_the_new_forms_stay_opaque_and_exact():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.act = NotQuiteSiLU()

        def forward(self, x):
            return (F.softmax(x, dim=1, dtype=torch.float64), x[:, :, 1:, ::2], self.act(x),
                    F.pad(x, (1, 1, 1, 1, 1, 0)), torch.mean(x), F.pad(x, (-1, 0)))

    x = torch.randn(2, 3, 5, 6)
    m = M()
    out, report = rewrite.apply(m, [RenameAll(EXPECTED_KINDS)], example_inputs=x, return_report=True)
    kinds = report.nodes_before
    assert not set(kinds) & {"softmax", "slice", "silu", "pad", "mean"}, kinds
    for a, b in zip(m(x), out(x)):
        assert a.dtype == b.dtype and torch.equal(a, b)


@settings(max_examples=20)
@given(kind=st.sampled_from(["leaky_relu", "gelu", "hardswish", "silu", "sigmoid", "hardsigmoid"]),
       slope=st.floats(0.0, 0.5), approximate=st.sampled_from(["none", "tanh"]), channels=st.integers(1, 5),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_fold_bn_sees_conv_bn_pairs_around_every_activation(kind, slope, approximate, channels, dtype):
    act = {"leaky_relu": nn.LeakyReLU(slope), "gelu": nn.GELU(approximate=approximate), "hardswish": nn.Hardswish(),
           "silu": nn.SiLU(), "sigmoid": nn.Sigmoid(), "hardsigmoid": nn.Hardsigmoid()}[kind]
    m = randomize_bn(nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), nn.BatchNorm2d(channels), act,
                                   nn.Conv2d(channels, 2, 1), nn.BatchNorm2d(2))).eval()
    x = torch.randn(2, 3, 6, 6)
    checked = check_pass("fold_bn", m, x, dtype=dtype if dtype == torch.float64 else None)
    assert checked.report["fold_bn"].result.counts["fold_bn_into_conv"] == 2
    assert checked.report.nodes_after.get(kind) == 1


class SkipFirstRelu(Pass):
    """Rewires the readers of the first relu to its input (a wrong edit on purpose: verify must see it)."""

    name = "skip_first_relu"

    def run(self, graph, options=None):
        result = PassResult(self.name)
        relu = next(n for n in graph.nodes if n.kind == "relu")
        graph.replace_all_uses(relu.output, relu.inputs[0])
        result.record("rewire", [relu.name])
        return result


def test_rewiring_gives_the_same_model_on_both_writers_and_verify_sees_it():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    x = torch.randn(2, 3, 8, 8)
    expected = m[2](m[0](x))
    fx_out = rewrite.apply(m, [SkipFirstRelu()], example_inputs=x)
    torch.testing.assert_close(fx_out(x), expected, rtol=0, atol=0)
    assert dict(fx_out.named_modules()).keys() >= {"0", "2"}
    model = onnx_of(m, x)
    onnx_out = rewrite.apply(model, [SkipFirstRelu()])
    import onnxruntime as ort

    session = ort.InferenceSession(onnx_out.SerializeToString())
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    np.testing.assert_allclose(got, expected.detach().numpy(), rtol=1e-6, atol=1e-6)
    assert "Relu" not in [n.op_type for n in onnx_out.graph.node]
    for model_in, kwargs in ((m, {"example_inputs": x}), (model, {})):
        with pytest.raises(rewrite.EquivalenceError, match="skip_first_relu"):
            rewrite.apply(model_in, [SkipFirstRelu()], verify=True, **kwargs)
