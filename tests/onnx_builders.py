"""Small ONNX models built by hand, for bad-input and fuzz tests."""
import numpy as np
from onnx import TensorProto, helper, numpy_helper


def conv_bn_model(cin=4, cout=4, groups=1, seed=0, weight=None, bn_scale=None, training_mode=0, name="conv"):
    """x -> Conv(3x3, pad 1) -> BatchNormalization -> Relu -> y, float32, input [1, cin, 6, 6]."""
    rng = np.random.default_rng(seed)
    if weight is None:
        weight = rng.standard_normal((cout, max(cin // groups, 1), 3, 3)).astype(np.float32)
    scale = rng.uniform(0.5, 1.5, cout).astype(np.float32) if bn_scale is None else np.asarray(bn_scale, np.float32)
    inits = [numpy_helper.from_array(weight, "W"), numpy_helper.from_array(rng.standard_normal(cout).astype(np.float32), "B"),
             numpy_helper.from_array(scale, "gamma"),
             numpy_helper.from_array(rng.standard_normal(cout).astype(np.float32), "beta"),
             numpy_helper.from_array(rng.standard_normal(cout).astype(np.float32), "mean"),
             numpy_helper.from_array(rng.uniform(0.5, 2.0, cout).astype(np.float32), "var")]
    bn_attrs = {"training_mode": 1} if training_mode else {}
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], name=name, group=groups, pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"],
                              ["b", "running_mean", "running_var"] if training_mode else ["b"], name="bn", **bn_attrs),
             helper.make_node("Relu", ["b"], ["y"], name="relu")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cin, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, cout, 6, 6])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def if_reading_outer(value: str, captured: str, output: str, shape) -> tuple:
    """An If whose branches multiply / add `value` by the outer initializer `captured` (read only inside them):
    (the node, its bool input "flag", its output's value info)."""
    then_g = helper.make_graph([helper.make_node("Mul", [value, captured], ["t"])], "then", [],
                               [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    else_g = helper.make_graph([helper.make_node("Add", [value, captured], ["e"])], "else", [],
                               [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)])
    node = helper.make_node("If", ["flag"], [output], name="branch", then_branch=then_g, else_branch=else_g)
    return (node, helper.make_tensor_value_info("flag", TensorProto.BOOL, []),
            helper.make_tensor_value_info(output, TensorProto.FLOAT, shape))
