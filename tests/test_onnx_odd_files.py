"""Old and odd ONNX files: IR 3 initializer inputs, opsets newer than onnx knows, unloaded external data,
external data resolved against the model's folder (never the working directory)."""
from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import rewrite
from rewrite.errors import ModelLoadError


def conv_bn(ir_version: int, opset: int, initializers_as_inputs: bool, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "W")]
    inits += [numpy_helper.from_array(a.astype(np.float32), n) for n, a in
              (("g", rng.random(4) + .5), ("b", rng.standard_normal(4)), ("m", rng.standard_normal(4)),
               ("v", rng.random(4) + .5))]
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["y"], name="bn")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6])]
    if initializers_as_inputs:
        inputs += [helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in inits]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    return model


@pytest.mark.parametrize("opset", [7, 9])
def test_ir3_initializer_inputs_come_out_passing_the_checker(opset):
    model = conv_bn(3, opset, initializers_as_inputs=True)
    onnx.checker.check_model(model)
    out, report = rewrite.apply(model, ["fold_bn"], return_report=True)
    assert report["fold_bn"].result.counts["fold_bn_into_conv"] == 1
    onnx.checker.check_model(out, full_check=True)
    assert out.ir_version == 3
    assert {t.name for t in out.graph.initializer} <= {i.name for i in out.graph.input}
    check = rewrite.verify(model, out)
    assert check.ok and check.max_rel <= 1e-5, str(check)


def test_an_opset_newer_than_onnx_knows_is_refused():
    model = conv_bn(8, onnx.defs.onnx_opset_version() + 1, initializers_as_inputs=False)
    with pytest.raises(ModelLoadError, match="not one this onnx"):
        rewrite.apply(model, ["fold_bn"])


@pytest.mark.parametrize("where", ["input", "value_info", "output"])
def test_a_value_declared_with_an_unknown_element_type_is_refused_naming_it(where, tmp_path):
    model = conv_bn(8, 17, initializers_as_inputs=False)
    model.graph.value_info.append(helper.make_tensor_value_info("c", TensorProto.FLOAT, [1, 4, 6, 6]))
    info = {"input": model.graph.input, "value_info": model.graph.value_info, "output": model.graph.output}[where][0]
    info.type.tensor_type.elem_type = 94  # no onnx data type (onnx-graphsurgeon failed with a KeyError)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    for source in (model, str(path)):
        with pytest.raises(ModelLoadError, match=f"value '{info.name}' is declared with element type 94"):
            rewrite.apply(source, ["fold_bn"])


@pytest.fixture
def external_model(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    path = folder / "m.onnx"
    onnx.save(conv_bn(8, 17, False), path, save_as_external_data=True, all_tensors_to_one_file=True,
              location="m.data", size_threshold=0)
    return path


def test_external_data_is_read_from_the_models_folder_whatever_the_working_directory(external_model, tmp_path,
                                                                                     monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "m.data").write_bytes(b"\0" * 1024)  # a decoy where a cwd-relative read would look
    monkeypatch.chdir(elsewhere)
    out = rewrite.apply(str(external_model), ["fold_bn"], verify=True)
    assert [n.op_type for n in out.graph.node] == ["Conv"]
    check = rewrite.verify(str(external_model), out)
    assert check.ok and check.max_rel <= 1e-5


def test_a_model_proto_with_unloaded_external_data_is_refused(external_model, monkeypatch):
    model = onnx.load(external_model, load_external_data=False)
    monkeypatch.chdir(os.path.dirname(external_model))  # even where the data file happens to be
    with pytest.raises(ModelLoadError, match="initializer 'W' keeps its data in 'm.data', which was not loaded"):
        rewrite.apply(model, ["fold_bn"])


def _run(model: onnx.ModelProto, feeds: dict) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


@pytest.mark.parametrize("overridden", ["W", "g"])
def test_ir4_initializers_listed_as_inputs_stay_inputs_the_caller_may_feed(overridden):
    # From IR 4 such an initializer is only the default of an input (keep_initializers_as_inputs=True):
    # folding it away would drop an input and ignore a value the caller feeds.
    model = conv_bn(8, 13, initializers_as_inputs=True)
    out, report = rewrite.apply(model, ["fold_bn"], return_report=True)
    assert [i.name for i in out.graph.input] == [i.name for i in model.graph.input]
    assert {t.name for t in out.graph.initializer} == {t.name for t in model.graph.initializer}
    assert "fold_bn_into_conv" not in report["fold_bn"].result.counts
    refused = [r.reason for r in report["fold_bn"].result.refused]
    assert len(refused) == 1 and "listed as a graph input too" in refused[0], refused
    rng = np.random.default_rng(1)
    fed = {"W": rng.standard_normal((4, 3, 3, 3)), "g": rng.random(4) + 2}[overridden].astype(np.float32)
    feeds = {"x": rng.standard_normal((1, 3, 6, 6)).astype(np.float32), overridden: fed}
    assert np.array_equal(_run(out, feeds), _run(model, feeds))
    assert not np.array_equal(_run(model, feeds), _run(model, {"x": feeds["x"]}))  # the fed value mattered


def test_ir4_initializer_inputs_not_read_by_a_fold_do_not_stop_the_others():
    model = conv_bn(8, 13, initializers_as_inputs=False)
    model.graph.input.append(helper.make_tensor_value_info("v", TensorProto.FLOAT, [4]))  # only v overridable
    out, report = rewrite.apply(model, ["fold_bn"], return_report=True)
    assert [i.name for i in out.graph.input] == ["x", "v"]
    refused = [r.reason for r in report["fold_bn"].result.refused]
    assert len(refused) == 1 and "its variance 'v'" in refused[0], refused


def test_an_ir4_initializer_input_no_node_reads_stays_an_input_with_its_default():
    model = conv_bn(8, 13, initializers_as_inputs=False)
    model.graph.input.append(helper.make_tensor_value_info("unread", TensorProto.FLOAT, [3]))
    model.graph.initializer.append(numpy_helper.from_array(np.arange(3, dtype=np.float32), "unread"))
    onnx.checker.check_model(model)
    out, report = rewrite.apply(model, ["fold_bn"], return_report=True)
    assert report["fold_bn"].result.counts == {"fold_bn_into_conv": 1}
    assert [i.name for i in out.graph.input] == ["x", "unread"]
    default = [t for t in out.graph.initializer if t.name == "unread"]
    assert len(default) == 1 and np.array_equal(numpy_helper.to_array(default[0]), np.arange(3, dtype=np.float32))
    x = np.random.default_rng(2).standard_normal((1, 3, 6, 6)).astype(np.float32)
    assert np.allclose(_run(out, {"x": x}), _run(model, {"x": x}), rtol=1e-5, atol=1e-6)


def test_an_unread_initializer_inputs_external_default_is_read_from_the_models_folder(tmp_path, monkeypatch):
    model = conv_bn(8, 13, initializers_as_inputs=False)
    model.graph.input.append(helper.make_tensor_value_info("unread", TensorProto.FLOAT, [300]))
    model.graph.initializer.append(numpy_helper.from_array(np.arange(300, dtype=np.float32), "unread"))
    (tmp_path / "model").mkdir()
    path = tmp_path / "model" / "m.onnx"
    onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location="m.data",
              size_threshold=0)
    (tmp_path / "m.data").write_bytes(b"\x11" * 8192)  # a decoy where a cwd-relative read would look
    monkeypatch.chdir(tmp_path)
    out = rewrite.apply(str(path), ["fold_bn"])
    default = [t for t in out.graph.initializer if t.name == "unread"]
    assert len(default) == 1 and np.array_equal(numpy_helper.to_array(default[0]), np.arange(300, dtype=np.float32))


@pytest.mark.parametrize("case", ["spatial0", "input_scale"])
def test_a_batch_normalization_kept_as_the_op_it_is_is_in_the_report(case):
    if case == "spatial0":  # opset 7: statistics per element
        model = conv_bn(3, 7, initializers_as_inputs=True)
        bn = model.graph.node[1]
        bn.attribute.append(helper.make_attribute("spatial", 0))
        for t in model.graph.initializer[1:]:
            t.CopyFrom(numpy_helper.from_array(np.full((4, 6, 6), 0.5, np.float32), t.name))
        for i in model.graph.input[2:]:
            i.CopyFrom(helper.make_tensor_value_info(i.name, TensorProto.FLOAT, [4, 6, 6]))
        expected = "spatial=0"
    else:  # the scale is a graph input without a default
        model = conv_bn(8, 17, initializers_as_inputs=False)
        del model.graph.initializer[1]
        model.graph.input.append(helper.make_tensor_value_info("g", TensorProto.FLOAT, [4]))
        expected = "its scale 'g' is a graph input"
    onnx.checker.check_model(model, full_check=True)
    out, report = rewrite.apply(model, ["fold_bn"], return_report=True)
    assert [n.op_type for n in out.graph.node].count("BatchNormalization") == 1
    refused = report["fold_bn"].result.refused
    assert len(refused) == 1 and "bn" in refused[0].node_names and expected in refused[0].reason, refused


def _gemm_bn(elem_type: int) -> onnx.ModelProto:
    rng = np.random.default_rng(0)

    def tensor(name, shape, positive=False):
        values = rng.standard_normal(shape).astype(np.float32)
        values = np.abs(values) + .5 if positive else values
        return helper.make_tensor(name, elem_type, list(shape), values.flatten().tolist())  # rounded by onnx

    inits = [tensor("B", (4, 5)), tensor("s", (4,)), tensor("b", (4,)), tensor("m", (4,)), tensor("v", (4,), True)]
    nodes = [helper.make_node("Gemm", ["x", "B"], ["h"], name="gemm", transB=1),
             helper.make_node("BatchNormalization", ["h", "s", "b", "m", "v"], ["y"], name="bn")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", elem_type, [3, 5])],
                              [helper.make_tensor_value_info("y", elem_type, [3, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_bfloat16_weights_fold_and_are_written_back_as_bfloat16():
    import ml_dtypes
    import onnx.reference

    model = _gemm_bn(TensorProto.BFLOAT16)
    onnx.checker.check_model(model, full_check=True)
    out, report = rewrite.apply(model, ["fold_bn"], return_report=True)
    assert report["fold_bn"].result.counts["fold_bn_into_linear"] == 1
    onnx.checker.check_model(out, full_check=True)
    assert {t.data_type for t in out.graph.initializer} == {TensorProto.BFLOAT16}
    x = np.random.default_rng(1).standard_normal((3, 5)).astype(ml_dtypes.bfloat16)
    ref = onnx.reference.ReferenceEvaluator(model).run(None, {"x": x})[0].astype(np.float64)
    got = onnx.reference.ReferenceEvaluator(out).run(None, {"x": x})[0].astype(np.float64)
    # the original rounds to bfloat16 (8 bits) after every op, the fold once per weight: a few ulps apart
    assert np.abs(got - ref).max() <= 4 * 2.0**-8 * np.abs(ref).max()


@pytest.mark.parametrize("type_name", ["bfloat16", "float8_e4m3fn", "float8_e5m2"])
@pytest.mark.parametrize("shape", [(), (1,), (2, 3)])
def test_bit_read_tensors_keep_their_shape_and_values(type_name, shape):
    import ml_dtypes

    from rewrite.frontends.onnx_arrays import to_numpy, to_torch

    array = (np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape) - 2.5).astype(getattr(ml_dtypes, type_name))
    tensor = to_torch(array)
    assert tuple(tensor.shape) == shape and str(tensor.dtype) == f"torch.{type_name}"
    back = to_numpy(tensor)
    assert back.dtype == array.dtype and back.shape == shape
    assert back.tobytes() == array.tobytes()


@pytest.mark.parametrize("form", ["initializer", "constant_node"])
def test_string_tensors_are_kept_as_they_are(form):
    model = conv_bn(8, 17, initializers_as_inputs=False)
    strings = helper.make_tensor("words", TensorProto.STRING, [2], [b"a", b"bc"])
    if form == "initializer":
        model.graph.initializer.append(strings)
    else:
        model.graph.node.insert(0, helper.make_node("Constant", [], ["words"], name="const", value=strings))
    model.graph.node.append(helper.make_node("Identity", ["words"], ["w_out"], name="pass_words"))
    model.graph.output.append(helper.make_tensor_value_info("w_out", TensorProto.STRING, [2]))
    onnx.checker.check_model(model, full_check=True)
    out, report = rewrite.apply(model, ["fold_bn"], return_report=True)
    assert report["fold_bn"].result.counts["fold_bn_into_conv"] == 1
    onnx.checker.check_model(out, full_check=True)
    x = np.random.default_rng(1).standard_normal((1, 3, 6, 6)).astype(np.float32)
    import onnxruntime as ort

    session = ort.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"])
    y, words = session.run(None, {"x": x})
    assert list(words) == ["a", "bc"]
    assert np.allclose(y, _run(model, {"x": x}), rtol=1e-5, atol=1e-5)


def test_remove_channels_leaves_a_conv_of_zero_output_channels_alone():
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "W"], ["y"], name="conv")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 0, 4, 4])],
                              [numpy_helper.from_array(rng.standard_normal((0, 3, 3, 3)).astype(np.float32), "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    out, report = rewrite.apply(model, ["remove_channels"], return_report=True)
    assert [n.op_type for n in out.graph.node] == ["Conv"]
    assert _run(out, {"x": np.ones((1, 3, 6, 6), np.float32)}).shape == (1, 0, 4, 4)
