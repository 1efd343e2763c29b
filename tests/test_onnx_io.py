"""ONNX loading, saving and pass-through: bad files, atomic saves, external data, subgraphs, custom ops."""
from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import rewrite
from rewrite.errors import ModelLoadError, RewriteError
from rewrite.frontends.onnx import load_onnx, save_onnx
from tests.onnx_builders import if_reading_outer


def conv_bn_model(with_if: bool = False, custom: bool = False) -> onnx.ModelProto:
    """x -> Conv -> BN -> y, optionally an If whose branch reads an outer initializer, or a custom op."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "gamma"),
             numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "beta"),
             numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "mean"),
             numpy_helper.from_array((rng.random(4) + 0.5).astype(np.float32), "var")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["y"], name="bn")]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, 6, 6])]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 6, 6])]
    opsets = [helper.make_opsetid("", 17)]
    if with_if:
        # The captured initializer "k" is read only inside the branches.
        inits.append(numpy_helper.from_array(np.array([2.0, -1.0, 0.5, 3.0], np.float32).reshape(1, 4, 1, 1), "k"))
        node, flag, out = if_reading_outer("y", "k", "z", ["batch", 4, 6, 6])
        nodes.append(node)
        inputs.append(flag)
        outputs.append(out)
    if custom:
        nodes.append(helper.make_node("Mystery", ["y"], ["m"], name="custom", domain="com.example", level=3))
        outputs.append(helper.make_tensor_value_info("m", TensorProto.FLOAT, ["batch", 4, 6, 6]))
        opsets.append(helper.make_opsetid("com.example", 1))
    graph = helper.make_graph(nodes, "net", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=opsets, producer_name="tests")
    model.ir_version = 8
    helper.set_model_props(model, {"author": "tests", "purpose": "pass-through"})
    return model


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save(conv_bn_model(), path)
    return path


def bn_ops(model) -> int:
    return sum(n.op_type == "BatchNormalization" for n in model.graph.node)


# -- good paths ----------------------------------------------------------------------------------
def test_apply_on_a_path_returns_a_model_and_leaves_the_file(model_file):
    before = model_file.read_bytes()
    out, report = rewrite.apply(str(model_file), ["fold_bn"], verify=True, return_report=True)
    assert isinstance(out, onnx.ModelProto) and bn_ops(out) == 0
    assert model_file.read_bytes() == before
    verification = report["fold_bn"].verification
    assert verification.ok and verification.outputs[0].name == "y"
    assert 0 <= verification.max_rel <= 1e-5


def test_save_is_atomic_and_round_trips(tmp_path, model_file):
    out = rewrite.apply(model_file, ["fold_bn"])
    target = tmp_path / "out.onnx"
    save_onnx(out, target)
    assert load_onnx(target).SerializeToString() == out.SerializeToString()
    assert sorted(os.listdir(tmp_path)) == ["model.onnx", "out.onnx"]  # no temporary left behind


def test_save_with_external_data_writes_next_to_the_model(tmp_path, model_file):
    out = rewrite.apply(model_file, ["fold_bn"])
    target = tmp_path / "sub" / "ext.onnx"
    target.parent.mkdir()
    save_onnx(out, target, external_data=True)
    assert sorted(os.listdir(target.parent)) == ["ext.onnx", "ext.onnx.data"]
    assert os.path.getsize(target.parent / "ext.onnx") < os.path.getsize(target.parent / "ext.onnx.data")
    again = load_onnx(target)
    assert [numpy_helper.to_array(t).tolist() for t in again.graph.initializer] == \
        [numpy_helper.to_array(t).tolist() for t in out.graph.initializer]
    # The externally stored model rewrites and verifies like any other.
    assert rewrite.verify(model_file, target).ok
    assert bn_ops(rewrite.apply(target, ["fold_bn"])) == 0


def test_save_to_a_missing_directory_fails_cleanly(tmp_path, model_file):
    with pytest.raises(RewriteError, match="directory"):
        save_onnx(load_onnx(model_file), tmp_path / "nope" / "out.onnx")


def test_if_subgraph_and_its_captured_initializer_pass_through():
    model = conv_bn_model(with_if=True)
    out = rewrite.apply(model, ["fold_bn"])
    onnx.checker.check_model(out, full_check=True)
    assert bn_ops(out) == 0
    original_if = next(n for n in model.graph.node if n.op_type == "If")
    new_if = next(n for n in out.graph.node if n.op_type == "If")
    assert new_if.SerializeToString() == original_if.SerializeToString()
    assert "k" in {t.name for t in out.graph.initializer}  # read only by the branches, still there
    for flag in (True, False):
        feeds = {"x": np.random.default_rng(1).standard_normal((2, 3, 6, 6)).astype(np.float32),
                 "flag": np.array(flag)}
        check = rewrite.verify(model, out, feeds)
        assert check.ok and [o.name for o in check.outputs] == ["y", "z"], str(check)


def test_custom_domain_metadata_and_opsets_pass_through():
    model = conv_bn_model(custom=True)
    out = rewrite.apply(model, ["fold_bn", "cleanup"])
    custom = [n for n in out.graph.node if n.domain == "com.example"]
    assert [n.SerializeToString() for n in custom] == \
        [n.SerializeToString() for n in model.graph.node if n.domain == "com.example"]
    assert out.opset_import == model.opset_import
    assert out.metadata_props == model.metadata_props
    assert out.producer_name == "tests" and out.ir_version == model.ir_version
    assert [o.name for o in out.graph.output] == ["y", "m"] and out.graph.input == model.graph.input
    assert bn_ops(out) == 0


# -- bad input ------------------------------------------------------------------------------------
def _assert_refused(path, match: str):
    before = path.read_bytes()
    files = sorted(os.listdir(path.parent))
    with pytest.raises(ModelLoadError, match=match) as info:
        rewrite.apply(str(path), ["fold_bn"])
    assert str(path) in str(info.value)
    assert path.read_bytes() == before and sorted(os.listdir(path.parent)) == files
    return info.value


def test_not_an_onnx_file(tmp_path):
    path = tmp_path / "notes.onnx"
    path.write_text("this is not a model\n" * 20)
    _assert_refused(path, "not")


def test_truncated_file(tmp_path, model_file):
    path = tmp_path / "cut.onnx"
    path.write_bytes(model_file.read_bytes()[:200])
    _assert_refused(path, "not")


def test_missing_file(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file"):
        rewrite.apply(str(tmp_path / "absent.onnx"), ["fold_bn"])


def test_missing_initializer_names_the_node(tmp_path):
    model = conv_bn_model()
    del model.graph.initializer[0]  # "w", read by node "conv"
    path = tmp_path / "broken.onnx"
    onnx.save(model, path)
    error = _assert_refused(path, "checker")
    assert "conv" in str(error)


def test_checker_failure(tmp_path):
    model = conv_bn_model()
    model.graph.node[0].op_type = "NoSuchOp"
    path = tmp_path / "bad_op.onnx"
    onnx.save(model, path)
    error = _assert_refused(path, "checker")
    assert "NoSuchOp" in str(error) or "conv" in str(error)


def test_unsupported_ir_version(tmp_path):
    model = conv_bn_model()
    model.ir_version = 99
    path = tmp_path / "future.onnx"
    onnx.save(model, path)
    _assert_refused(path, "IR version 99")


def test_bad_model_proto_is_refused_without_a_path():
    model = conv_bn_model()
    model.ir_version = 1
    with pytest.raises(ModelLoadError, match="ModelProto 'net'"):
        rewrite.apply(model, ["fold_bn"])
