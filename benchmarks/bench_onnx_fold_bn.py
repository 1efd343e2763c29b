"""fold_bn on an ONNX ResNet-50 (BN nodes kept) against onnx-simplifier and onnxoptimizer, in one process.

    python benchmarks/bench_onnx_fold_bn.py [--size 64] [--repeat 3]

Prints per tool: best wall time, the ratio to onnx-simplifier, node counts after, BatchNormalization
left, and the max abs / rel error against the original in onnxruntime (same random input).
"""
from __future__ import annotations

import argparse
import collections
import io
import time

import numpy as np
import onnx
import torch
import torchvision

import rewrite
from rewrite.frontends.onnx_verify import random_inputs, session
from rewrite.testing import randomize_bn


def export_resnet50(size: int) -> onnx.ModelProto:
    model = randomize_bn(torchvision.models.resnet50().eval(), seed=0)
    buffer = io.BytesIO()
    torch.onnx.export(model, (torch.randn(1, 3, size, size),), buffer, dynamo=False,
                      training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return onnx.load_from_string(buffer.getvalue())


def run_rewrite(model):
    return rewrite.apply(model, ["fold_bn"])


def run_onnxsim(model):
    import onnxsim
    simplified, ok = onnxsim.simplify(model)
    assert ok
    return simplified


def run_onnxoptimizer(model):
    import onnxoptimizer
    return onnxoptimizer.optimize(model, ["fuse_bn_into_conv"])


def best_time(fn, model, repeat: int):
    times, out = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn(model)
        times.append(time.perf_counter() - start)
    return min(times), out


def errors(reference, feeds, model):
    out = session(model).run(None, feeds)[0]
    abs_err = float(np.abs(out.astype(np.float64) - reference).max())
    return abs_err, abs_err / float(np.abs(reference).max())


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    model = export_resnet50(args.size)
    feeds = random_inputs(model, seed=0)
    reference = session(model).run(None, feeds)[0].astype(np.float64)
    before = collections.Counter(n.op_type for n in model.graph.node)
    print(f"ResNet-50, input {args.size}x{args.size}, symbolic batch (runs with 2): {len(model.graph.node)} nodes, "
          f"{before['BatchNormalization']} BatchNormalization")
    rows = []
    for name, fn in [("rewrite fold_bn", run_rewrite), ("onnxsim.simplify", run_onnxsim),
                     ("onnxoptimizer fuse_bn_into_conv", run_onnxoptimizer)]:
        seconds, out = best_time(fn, model, args.repeat)
        ops = collections.Counter(n.op_type for n in out.graph.node)
        abs_err, rel_err = errors(reference, feeds, out)
        rows.append((name, seconds, len(out.graph.node), ops["BatchNormalization"], abs_err, rel_err))
    sim_time = rows[1][1]
    print(f"{'tool':34s} {'seconds':>8s} {'/onnxsim':>8s} {'nodes':>6s} {'BN left':>7s} {'max abs':>10s} {'max rel':>10s}")
    for name, seconds, nodes, bn, abs_err, rel_err in rows:
        print(f"{name:34s} {seconds:8.3f} {seconds / sim_time:8.2f} {nodes:6d} {bn:7d} {abs_err:10.3e} {rel_err:10.3e}")


if __name__ == "__main__":
    main()
