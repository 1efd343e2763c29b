"""ResNet-18 to a plain (VGG-like) network with RM, exported to ONNX and checked in onnxruntime.

    python examples/resnet18_to_plain.py [--out resnet18_plain.onnx]

remove_residual widens each block so the add disappears; fold_bn and fuse_branches then leave only
convs, ReLUs, the pooling and the classifier. Random weights (nothing is downloaded), randomized BN
statistics so the check means something.
"""
from __future__ import annotations

import argparse
import collections
import io
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torchvision

import rewrite
from rewrite.testing import randomize_bn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="where to write the plain ONNX model (default: a temp file)")
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = randomize_bn(torchvision.models.resnet18().eval())
    x = torch.randn(2, 3, args.size, args.size)

    plain, report = rewrite.apply(model, ["remove_residual", "fold_bn", "fuse_branches"], example_inputs=x,
                                  verify=True, return_report=True)
    print(report)

    path = args.out or tempfile.NamedTemporaryFile(suffix=".onnx", delete=False).name
    buffer = io.BytesIO()
    torch.onnx.export(plain, (x,), buffer, dynamo=False, input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    onnx_model = onnx.load_from_string(buffer.getvalue())
    onnx.checker.check_model(onnx_model)
    onnx.save(onnx_model, path)
    ops = collections.Counter(node.op_type for node in onnx_model.graph.node)
    print(f"\nplain ONNX model at {path}: {dict(ops)}")
    assert "Add" not in ops, "a residual add survived"

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = model(x).numpy()
    got = session.run(None, {"input": x.numpy()})[0]
    rel = float(np.abs(got - expected).max() / np.abs(expected).max())
    print(f"onnxruntime vs the original PyTorch ResNet-18: max relative error {rel:.2e}")
    assert rel <= 1e-5, rel
    params = sum(p.numel() for p in model.parameters())
    plain_params = sum(p.numel() for p in plain.parameters())
    print(f"parameters: {params / 1e6:.2f} M -> {plain_params / 1e6:.2f} M (RM adds channels: x{plain_params / params:.2f})")


if __name__ == "__main__":
    main()
