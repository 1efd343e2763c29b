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
