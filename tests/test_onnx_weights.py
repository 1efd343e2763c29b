"""Weights held once (rewrite.frontends.onnx_weights): a model file's external data read straight into the IR's
arrays, big constants written after graphsurgeon's export one at a time, each released once written.

The lazy path (a path with external data) must give byte for byte what the plain path gives (the same
model loaded whole, as a ModelProto), leave its inputs as they were, and refuse bad external data
naming the file and the tensor.
"""
from __future__ import annotations

import gc
import hashlib
import os
import weakref

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import rewrite
from rewrite.errors import ModelLoadError
from rewrite.frontends import onnx_export, onnx_weights
from rewrite.frontends.onnx import save_onnx
from rewrite.ir import Graph, Node
from tests.onnx_builders import if_reading_outer


def mixed_model(channels: int = 32, seed: int = 0, with_if: bool = False, cin: int = 3) -> onnx.ModelProto:
    """Conv -> BN -> Relu (folded), a conv with no BN and a Gemm head (written back as they were), a Reshape
    with an int64 shape and a Constant node: big and small tensors of several types."""
    rng = np.random.default_rng(seed)
    c = channels

    def init(name, array):
        return numpy_helper.from_array(np.ascontiguousarray(array), name)

    inits = [init("w0", (rng.standard_normal((c, cin, 3, 3)) / cin).astype(np.float32)),
             init("g0", rng.uniform(0.5, 1.5, c).astype(np.float32)), init("b0", rng.standard_normal(c).astype(np.float32)),
             init("m0", (0.1 * rng.standard_normal(c)).astype(np.float32)),
             init("v0", rng.uniform(0.5, 2.0, c).astype(np.float32)),
             init("w1", (rng.standard_normal((c, c, 3, 3)) / c).astype(np.float32)),
             init("bias1", rng.standard_normal(c).astype(np.float32)),
             init("shape", np.array([0, -1], np.int64)),
             init("fc_w", rng.standard_normal((10, c * 16)).astype(np.float32)),
             init("fc_b", rng.standard_normal(10).astype(np.float32))]
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c0"], name="conv0", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c0", "g0", "b0", "m0", "v0"], ["n0"], name="bn0"),
             helper.make_node("Relu", ["n0"], ["r0"], name="relu0"),
             helper.make_node("Conv", ["r0", "w1", "bias1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Constant", [], ["half"], name="half",
                              value=numpy_helper.from_array(np.full((1, c, 1, 1), 0.5, np.float32))),
             helper.make_node("Mul", ["c1", "half"], ["h"], name="mul"),
             helper.make_node("Reshape", ["h", "shape"], ["flat"], name="flatten"),
             helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["y"], name="fc", transB=1)]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, cin, 4, 4])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 10])]
    if with_if:  # an outer initializer read only inside a subgraph
        inits.append(init("k", rng.standard_normal((1, 10)).astype(np.float32)))
        node, flag, out = if_reading_outer("y", "k", "z", [2, 10])
        nodes.append(node)
        inputs.append(flag)
        outputs.append(out)
    model = helper.make_model(helper.make_graph(nodes, "mixed", inputs, outputs, inits),
                              opset_imports=[helper.make_opsetid("", 17)], producer_name="tests")
    model.ir_version = 8
    return model


def save_external(model: onnx.ModelProto, path, threshold: int = 0, attributes: bool = False) -> None:
    onnx.save_model(model, os.fspath(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=os.path.basename(path) + ".data", size_threshold=threshold,
                    convert_attribute=attributes)


def digest(*paths) -> list[str]:
    return [hashlib.sha256(open(p, "rb").read()).hexdigest() for p in paths]


@pytest.mark.parametrize("channels,threshold,attributes,with_if", [
    (32, 0, False, False),      # every tensor external, the big ones stubbed on the way out
    (32, 1024, True, True),     # small tensors inline, the Constant's value external, a subgraph capture
    (8, 0, True, False),        # nothing big enough to stub: graphsurgeon writes every array itself
    (48, 4096, False, True),
])
def test_a_path_with_external_data_gives_the_plain_paths_bytes_and_stays_untouched(tmp_path, channels, threshold,
                                                                                   attributes, with_if):
    path = tmp_path / "model.onnx"
    save_external(mixed_model(channels, with_if=with_if), path, threshold, attributes)
    before = digest(path, str(path) + ".data")
    plain_input = onnx.load(path)  # the whole model in memory: the plain path
    plain_bytes = plain_input.SerializeToString()

    lazy, report = rewrite.apply(path, ["fold_bn"], return_report=True)
    plain = rewrite.apply(plain_input, ["fold_bn"])

    assert report["fold_bn"].result.counts.get("fold_bn_into_conv") == 1
    assert sum(n.op_type == "BatchNormalization" for n in lazy.graph.node) == 0
    assert lazy.SerializeToString() == plain.SerializeToString()
    assert all(t.data_location != TensorProto.EXTERNAL for t in lazy.graph.initializer)  # self-contained
    assert digest(path, str(path) + ".data") == before
    assert plain_input.SerializeToString() == plain_bytes
    # Saved with external data, both give the same files, and the rewrite computes what the original does.
    for folder, model in (("lazy", lazy), ("plain", plain)):
        os.mkdir(tmp_path / folder)
        save_onnx(model, tmp_path / folder / "out.onnx", external_data=True)
    assert digest(tmp_path / "lazy" / "out.onnx", tmp_path / "lazy" / "out.onnx.data") == \
        digest(tmp_path / "plain" / "out.onnx", tmp_path / "plain" / "out.onnx.data")
    # (onnxruntime cannot read a Reshape's shape from external data, so both are given in memory)
    check = rewrite.verify(plain_input, lazy)
    assert check.ok and check.max_rel < 1e-5


def test_remove_channels_and_cleanup_on_the_lazy_path_match_the_plain_path(tmp_path):
    path = tmp_path / "model.onnx"
    save_external(mixed_model(32, seed=3), path)
    passes = ["fold_bn", "remove_channels", "cleanup"]
    lazy = rewrite.apply(path, passes)
    plain = rewrite.apply(onnx.load(path), passes)
    assert lazy.SerializeToString() == plain.SerializeToString()


def test_each_array_is_let_go_as_soon_as_the_final_export_has_written_it(tmp_path, monkeypatch):
    """During apply (collector paused) the IR's weights die by reference counting once written: the arrays
    read from the file and the folded weights alike, before the next tensor is written."""
    path = tmp_path / "model.onnx"
    save_external(mixed_model(64, cin=32), path)  # both conv weights big enough to be stubbed
    read, params, checked = [], [], []
    real_array, real_releaser, real_fill = onnx_weights.ExternalData.array, onnx_export._releaser, \
        onnx_weights.fill_initializers

    def array(self, tensor):
        result = real_array(self, tensor)
        read.append(weakref.ref(result))
        return result

    def releaser(graph):
        params.extend(weakref.ref(t) for node in graph.nodes for t in node.params.values()
                      if isinstance(t, torch.Tensor) and t.nbytes >= onnx_weights.STUB_BYTES)
        return real_releaser(graph)

    def fill(*args, **kwargs):
        assert not gc.isenabled()
        assert any(r() is not None for r in read) and any(p() is not None for p in params)
        real_fill(*args, **kwargs)
        checked.append([r for r in read + params if r() is not None])

    monkeypatch.setattr(onnx_weights.ExternalData, "array", array)
    monkeypatch.setattr(onnx_export, "_releaser", releaser)
    monkeypatch.setattr(onnx_weights, "fill_initializers", fill)
    out = rewrite.apply(path, ["fold_bn"])
    assert checked == [[]]  # every big array was freed inside the fill
    assert len(read) == 10 and len(params) == 2  # every initializer read; the folded weight and w1 written
    assert rewrite.verify(onnx.load(path), out).ok


def test_verification_inside_apply_exports_without_letting_the_weights_go(tmp_path):
    path = tmp_path / "model.onnx"
    save_external(mixed_model(64), path, threshold=1024)  # onnxruntime reads a Reshape's shape only inline
    out = rewrite.apply(path, ["fold_bn", "cleanup"], verify=True)  # exports after each pass, then once more
    assert out.SerializeToString() == rewrite.apply(onnx.load(path), ["fold_bn", "cleanup"]).SerializeToString()


def test_erase_drops_the_nodes_tensors_at_once():
    graph = Graph()
    x = graph.add_input("x", shape=(1, 4))
    weight = torch.randn(4, 4)
    node = Node("linear", "fc", [x], params={"weight": weight, "bias": None})
    graph.append(node)
    graph.outputs = [x]
    ref = weakref.ref(weight)
    del weight
    was = gc.isenabled()
    gc.disable()
    try:
        graph.erase(node)
        assert ref() is None and node.params == {}
    finally:
        if was:
            gc.enable()


# -- bad external data: a ModelLoadError naming the file and the tensor, and nothing read past the folder ------
def _refused(path, *words):
    with pytest.raises(ModelLoadError) as info:
        rewrite.apply(path, ["fold_bn"])
    message = str(info.value)
    assert str(path) in message and all(word in message for word in words), message


def test_external_data_too_short_for_its_tensor(tmp_path):
    path = tmp_path / "model.onnx"
    save_external(mixed_model(32), path)
    data = str(path) + ".data"
    with open(data, "r+b") as f:
        f.truncate(os.path.getsize(data) - 8)
    _refused(path, "fc_b")


def test_external_data_length_that_does_not_match_the_dims(tmp_path):
    path = tmp_path / "model.onnx"
    save_external(mixed_model(32), path)
    model = onnx.load(path, load_external_data=False)
    tensor = next(t for t in model.graph.initializer if t.name == "w1")
    entry = next(e for e in tensor.external_data if e.key == "length")
    entry.value = str(int(entry.value) - 4)
    onnx.save(model, path)
    _refused(path, "'w1'", "need")


@pytest.mark.parametrize("location", ["../outside.data", "/etc/hostname", "missing.data"])
def test_external_data_outside_the_models_folder_or_missing(tmp_path, location):
    folder = tmp_path / "models"
    folder.mkdir()
    path = folder / "model.onnx"
    save_external(mixed_model(8), path)
    (tmp_path / "outside.data").write_bytes(open(str(path) + ".data", "rb").read())
    model = onnx.load(path, load_external_data=False)
    for tensor in model.graph.initializer:
        if tensor.name == "w0":
            next(e for e in tensor.external_data if e.key == "location").value = location
    onnx.save(model, path)
    _refused(path, "w0")
