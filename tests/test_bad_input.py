"""Every bad input of issue 16 is a RewriteError naming the file, node or path; the CLI exits 2 and writes nothing."""
import math
import tempfile

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn

import rewrite
from rewrite import ModelLoadError, RewriteError
from rewrite.cli import EXIT_BAD_INPUT, main
from rewrite.testing import randomize_bn
from tests.onnx_builders import conv_bn_model

CLI_MODEL = ["rewrite.demo:default_model", "--input-shape", "1,3,16,16"]


def files_in(folder):
    return sorted(p.name for p in folder.rglob("*"))


# -- output paths ---------------------------------------------------------------------------
def test_unwritable_output_folder(tmp_path, capsys, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)  # a folder we may not write in (root ignores chmod)
    out = tmp_path / "out.pt"
    assert main(["apply", *CLI_MODEL, "-o", str(out)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "out.pt" in err and "Permission denied" in err
    assert files_in(tmp_path) == []


def test_output_parent_is_a_file(tmp_path, capsys):
    (tmp_path / "plain").write_text("a file")
    out = tmp_path / "plain" / "sub" / "out.pt"
    assert main(["apply", *CLI_MODEL, "-o", str(out)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "out.pt" in err and "plain is a file" in err
    assert files_in(tmp_path) == ["plain"] and (tmp_path / "plain").read_text() == "a file"


def test_report_json_parent_is_a_file(tmp_path, capsys):
    (tmp_path / "plain").write_text("a file")
    assert main(["apply", *CLI_MODEL, "--dry-run", "--report-json", str(tmp_path / "plain" / "r.json")]) == 2
    assert "r.json" in capsys.readouterr().err
    assert files_in(tmp_path) == ["plain"]


def test_output_is_a_folder(tmp_path, capsys):
    (tmp_path / "out.pt").mkdir()
    assert main(["apply", *CLI_MODEL, "-o", str(tmp_path / "out.pt")]) == EXIT_BAD_INPUT
    assert "is a folder" in capsys.readouterr().err


def test_a_folder_named_like_a_model(tmp_path, capsys):
    (tmp_path / "x.onnx").mkdir()
    assert main(["apply", str(tmp_path / "x.onnx"), "--dry-run"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "x.onnx" in err and "is a folder" in err and "no such file" not in err


# -- malformed ONNX ----------------------------------------------------------------------------
def with_name_bytes(model: onnx.ModelProto, old: bytes, new: bytes) -> bytes:
    data = model.SerializeToString()
    assert data.count(old) == 1 and len(old) == len(new)
    return data.replace(old, new)


@pytest.mark.parametrize("old,new,field", [
    (b"relu", b"r\xffl\xfe", "graph.node[2].name"),  # a node name
    (b"conv", b"c\xc3(v", "graph.node[0].name"),      # a truncated two-byte sequence
])
def test_names_that_are_not_utf8(tmp_path, capsys, old, new, field):
    path = tmp_path / "bad.onnx"
    path.write_bytes(with_name_bytes(conv_bn_model(), old, new))
    with pytest.raises(ModelLoadError, match=field.replace("[", r"\[").replace("]", r"\]")) as info:
        rewrite.apply(str(path), ["fold_bn"])
    assert "bad.onnx" in str(info.value) and "UTF-8" in str(info.value)
    assert main(["apply", str(path), "-o", str(tmp_path / "out.onnx")]) == EXIT_BAD_INPUT
    assert "UTF-8" in capsys.readouterr().err and not (tmp_path / "out.onnx").exists()


def test_graph_output_name_not_utf8(tmp_path):
    model = conv_bn_model()
    model.graph.node[2].output[0] = "yy"
    model.graph.output[0].name = "yy"
    path = tmp_path / "bad.onnx"
    data = model.SerializeToString()
    assert data.count(b"\x02yy") == 2  # the node output and the graph output, both length-prefixed
    path.write_bytes(data.replace(b"\x02yy", b"\x02y\xff"))
    with pytest.raises(ModelLoadError, match="not valid UTF-8"):
        rewrite.apply(str(path), ["fold_bn"])


def _raw(model, name):
    return next(t for t in model.graph.initializer if t.name == name)


@pytest.mark.parametrize("corrupt,message", [
    (lambda t: setattr(t, "raw_data", t.raw_data + b"\0" * 4), "holds 580 bytes"),
    (lambda t: setattr(t, "raw_data", t.raw_data[:-4]), "holds 572 bytes"),
    (lambda t: setattr(t, "data_type", onnx.TensorProto.DOUBLE), "DOUBLE"),
    (lambda t: setattr(t, "data_type", onnx.TensorProto.BFLOAT16), "BFLOAT16"),
    (lambda t: setattr(t, "data_type", 99), "data type 99"),
    (lambda t: t.dims.__setitem__(0, -4), "negative dimension"),
])
def test_initializer_data_that_does_not_fit_its_type(corrupt, message):
    model = conv_bn_model()
    corrupt(_raw(model, "W"))
    with pytest.raises(ModelLoadError, match=message) as info:
        rewrite.apply(model, ["fold_bn"])
    assert "'W'" in str(info.value)


def test_an_opset_onnx_does_not_know():
    model = conv_bn_model()
    model.opset_import[0].version = 99
    with pytest.raises(ModelLoadError, match="opset 99"):
        rewrite.apply(model, ["fold_bn"])


@pytest.mark.parametrize("cin,cout,groups,message", [
    (4, 6, 4, "group=4 does not divide its 6 output channels"),
    (4, 6, 3, "input has 4 channels"),
    (6, 6, 0, "group=0"),
])
def test_conv_groups_that_do_not_fit_the_channels(cin, cout, groups, message):
    weight = np.ones((cout, max(cin // max(groups, 1), 1), 3, 3), np.float32)
    model = conv_bn_model(cin=cin, cout=cout, groups=groups, weight=weight)
    with pytest.raises(ModelLoadError, match=message) as info:
        rewrite.apply(model, ["fold_bn"])
    assert "node conv" in str(info.value)


def test_conv_transpose_groups_that_do_not_fit(tmp_path):
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((6, 2, 3, 3), np.float32), "W")
    node = helper.make_node("ConvTranspose", ["x", "W"], ["y"], name="up", group=4)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 6, 6])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(ModelLoadError, match="ConvTranspose group=4 does not divide its 6 input channels"):
        rewrite.apply(model, ["fold_bn"])


# -- non-finite folds ---------------------------------------------------------------------------
def overflowing_torch_model(weight: float, gamma: float):
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)), seed=0).eval()
    with torch.no_grad():
        model[0].weight[0, 0, 0, 0] = weight
        model[1].weight.fill_(gamma)
        model[1].running_var.fill_(1.0)
    return model


@pytest.mark.parametrize("weight,gamma,reason", [
    (1e28, 1e12, "would not be finite"),          # the folded weight, 1e40, overflows float32
    (torch.finfo(torch.float32).max / 2, 4.0, "within 2^32 of float32's largest"),  # the weight itself is at the edge
])
def test_a_fold_that_overflows_is_refused_with_the_reason(weight, gamma, reason):
    model = overflowing_torch_model(weight, gamma)
    x = torch.randn(1, 3, 8, 8)
    out, report = rewrite.apply(model, ["fold_bn"], example_inputs=x, return_report=True)
    assert report["fold_bn"].result.counts["fold_bn_into_conv"] == 0
    reasons = [r.reason for r in report["fold_bn"].result.refused]
    assert any(reason in r and "the site was left as it was" in r for r in reasons), reasons
    assert all(torch.isfinite(p).all() for p in out.parameters())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in out.modules()) == 1
    assert reason in str(report)
    with torch.no_grad():
        assert torch.equal(out(x), model(x))  # left alone, so exactly the original


def test_a_fold_that_overflows_in_onnx_is_refused(tmp_path, capsys):
    weight = np.random.default_rng(0).standard_normal((4, 4, 3, 3)).astype(np.float32)
    weight[0, 0, 0, 0] = np.finfo(np.float32).max / 2
    model = conv_bn_model(weight=weight, bn_scale=[8.0] * 4)
    out, report = rewrite.apply(model, ["fold_bn"], return_report=True)
    assert [n.op_type for n in out.graph.node].count("BatchNormalization") == 1
    assert any("within 2^32" in r.reason for r in report["fold_bn"].result.refused)
    for t in out.graph.initializer:
        assert np.isfinite(onnx.numpy_helper.to_array(t)).all()


def test_cast_like_refuses_overflow_but_keeps_infinite_bounds():
    from rewrite.errors import NonFiniteError
    from rewrite.params import cast_like

    like = torch.zeros(2)
    with pytest.raises(NonFiniteError):
        cast_like(torch.tensor([1e39, 1.0], dtype=torch.float64), like)
    with pytest.raises(NonFiniteError):
        cast_like(torch.tensor([math.nan, 1.0], dtype=torch.float64), like)
    with pytest.raises(NonFiniteError):  # an infinite fold result (BN with zero variance and eps)
        cast_like(torch.tensor([math.inf, 1.0], dtype=torch.float64), like)
    bounds = cast_like(torch.tensor([-math.inf, math.inf], dtype=torch.float64), like, allow_infinite=True)
    assert bounds.tolist() == [-math.inf, math.inf]  # open clamp bounds are meant to be infinite
    with pytest.raises(NonFiniteError):  # but not an overflow, even then
        cast_like(torch.tensor([1e39], dtype=torch.float64), like, allow_infinite=True)


# -- refusal wording --------------------------------------------------------------------------
def test_onnx_refusals_use_onnx_wording():
    _, report = rewrite.apply(conv_bn_model(training_mode=1), ["fold_bn"], return_report=True)
    reasons = " ".join(r.reason for r in report["fold_bn"].result.refused)
    assert "training_mode" in reasons and "model.eval()" not in reasons


def test_torch_refusals_use_torch_wording():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    _, report = rewrite.apply(model, ["fold_bn"], example_inputs=torch.randn(2, 3, 8, 8), return_report=True)
    reasons = " ".join(r.reason for r in report["fold_bn"].result.refused)
    assert "model.eval()" in reasons


def test_every_bad_input_error_is_a_rewrite_error():
    assert issubclass(ModelLoadError, RewriteError)


def test_declared_shapes_that_contradict_the_ops():
    """value_info saying 6x6 where the input is 6x2: onnxruntime trusts it in the original, so a rewrite
    that drops a stale entry would no longer load (found by the fuzzer)."""
    model = onnx.shape_inference.infer_shapes(conv_bn_model())
    model.graph.input[0].type.tensor_type.shape.dim[3].dim_value = 2
    with pytest.raises(ModelLoadError, match="declared shapes contradict") as info:
        rewrite.apply(model, ["fold_bn"])
    assert "node conv" in str(info.value) or "conv" in str(info.value)
