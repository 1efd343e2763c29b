"""The ONNX export matrix of issue 15: models x exporters x opsets x dynamic axes x post-processing tools.

    .venv/bin/python scripts/onnx_matrix.py [--models resnet18,repvgg_a0] [--quick]

For each ONNX file, runs fold_bn, fuse_branches and remove_residual (then cleanup) and prints the Conv /
BatchNormalization / Add counts next to the torch path's on the same model, whether onnxruntime agrees
(max relative error), and the first refusal reason when the counts differ. Not a test: the full matrix
takes minutes; tests/test_onnx_matrix.py (an SE / HardSwish block in the same configurations),
tests/test_onnx_fold.py and tests/test_onnx_shapes.py hold a fast subset. Counts are of the data path: a
constant chain written back as it was (onnxoptimizer's fused weights) is no layer, and the note counts it.
"""
from __future__ import annotations

import argparse
import collections
import copy
import io
import logging
import warnings

import onnx
import torch

import rewrite
from rewrite.testing import randomize_bn

PASSES = ["fold_bn", "fuse_branches", "remove_residual", "cleanup"]
SIZE = 32


def build(name: str) -> torch.nn.Module:
    import timm
    import torchvision

    makers = {"resnet18": lambda: torchvision.models.resnet18(num_classes=10),
              "mobilenet_v3_small": lambda: torchvision.models.mobilenet_v3_small(num_classes=10),
              "efficientnet_b0": lambda: torchvision.models.efficientnet_b0(num_classes=10),
              "repvgg_a0": lambda: timm.create_model("repvgg_a0", num_classes=10),
              "mobileone_s0": lambda: timm.create_model("mobileone_s0", num_classes=10)}
    torch.manual_seed(0)
    return randomize_bn(makers[name]().eval(), seed=1)


def calibrated(model: torch.nn.Module, x: torch.Tensor) -> torch.nn.Module:
    """BN running statistics set to those of a batch like x, so activations stay near the BN affines' scale.
    Random statistics let deep stacks (mobileone_s0) reach 1e10, past float16's range: both models then
    give inf, and their comparison proves nothing."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.momentum = None  # a cumulative average: after one batch, that batch's statistics
        m.reset_running_stats()
    model.train()
    with torch.no_grad():
        model(torch.randn(8, *x.shape[1:], generator=torch.Generator().manual_seed(2)))
        for m in norms:  # a channel constant on that batch (dead after a ReLU) would divide by sqrt(eps)
            m.running_var.clamp_(min=0.1)
    return model.eval()


def export(model, exporter: str, opset: int, dynamic: str, dtype: str = "fp32") -> onnx.ModelProto:
    x = torch.randn(1, 3, SIZE, SIZE)
    if dtype == "fp16":  # a half copy: the torch path's counts are the float model's
        model, x = calibrated(copy.deepcopy(model), x).half(), x.half()
    axes = {"batch": {0: "n"}, "hw": {0: "n", 2: "h", 3: "w"}, "static": None}[dynamic]
    if exporter.startswith("dynamo"):
        shapes = None if axes is None else ({k: torch.export.Dim.AUTO for k in axes},)
        program = torch.onnx.export(model, (x,), dynamo=True, optimize=exporter == "dynamo_opt", opset_version=opset,
                                    dynamic_shapes=shapes, verbose=False)
        return program.model_proto
    buffer = io.BytesIO()
    torch.onnx.export(model, (x,), buffer, dynamo=False, opset_version=opset, do_constant_folding=False,
                      training=torch.onnx.TrainingMode.PRESERVE, input_names=["x"],
                      dynamic_axes=None if axes is None else {"x": axes})
    return onnx.load_from_string(buffer.getvalue())


def post(model: onnx.ModelProto, tool: str) -> onnx.ModelProto:
    if tool == "onnxsim":
        import onnxsim
        return onnxsim.simplify(model)[0]
    if tool == "onnxoptimizer":
        import onnxoptimizer
        return onnxoptimizer.optimize(model, ["fuse_bn_into_conv"])
    if tool == "onnxscript":
        import onnxscript.optimizer
        return onnxscript.optimizer.optimize(model)
    return model


def onnx_counts(model) -> tuple:
    """Conv / BN / Add counts on the data path: nodes that read a graph input, directly or not. A constant
    chain written back as it was (onnxoptimizer's Add / Sqrt / Div for a fused conv weight) computes a
    weight, not a layer, and the import note names it."""
    live = {i.name for i in model.graph.input} - {t.name for t in model.graph.initializer}
    c = collections.Counter()
    for n in model.graph.node:  # nodes are in topological order
        if any(name in live for name in n.input):
            live.update(n.output)
            c[n.op_type] += 1
    return c["Conv"], c["BatchNormalization"], c["Add"]


def torch_counts(model) -> tuple:
    x = torch.randn(1, 3, SIZE, SIZE)
    out, report = rewrite.apply(model, PASSES, example_inputs=x, return_report=True)
    kinds = report.nodes_after
    return kinds.get("conv", 0), kinds.get("batch_norm", 0), kinds.get("add", 0)


def main() -> None:
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,mobilenet_v3_small,efficientnet_b0,repvgg_a0,mobileone_s0")
    parser.add_argument("--quick", action="store_true", help="a few configurations per model only")
    parser.add_argument("--configs", help="comma-separated indices into the configuration list (0-based)")
    args = parser.parse_args()
    configs = [("legacy", 13, "static", "", "fp32"), ("legacy", 13, "hw", "", "fp32"),
               ("legacy", 17, "batch", "", "fp32"), ("legacy", 17, "hw", "", "fp32"),
               ("legacy", 18, "static", "", "fp32"), ("legacy", 21, "batch", "", "fp32"),
               ("dynamo_noopt", 18, "static", "", "fp32"), ("dynamo_noopt", 18, "batch", "", "fp32"),
               ("dynamo_noopt", 18, "hw", "", "fp32"), ("dynamo_noopt", 21, "static", "", "fp32"),
               ("dynamo_opt", 17, "static", "", "fp32"), ("dynamo_opt", 18, "batch", "", "fp32"),
               ("dynamo_opt", 18, "hw", "", "fp32"), ("dynamo_opt", 21, "static", "", "fp32"),
               ("legacy", 17, "batch", "onnxsim", "fp32"), ("legacy", 17, "batch", "onnxoptimizer", "fp32"),
               ("dynamo_opt", 18, "static", "onnxscript", "fp32"),
               ("legacy", 17, "static", "", "fp16"), ("legacy", 17, "hw", "", "fp16"),
               ("dynamo_noopt", 18, "batch", "", "fp16"), ("dynamo_opt", 18, "static", "", "fp16")]
    if args.quick:
        configs = [configs[2], configs[7], configs[15], configs[17]]
    if args.configs:
        configs = [configs[int(i)] for i in args.configs.split(",")]
    print(f"{'model':<19} {'exporter':<13} {'opset':>5} {'dynamic':<7} {'tool':<13} {'dtype':<5} "
          f"{'torch C/B/A':>11} {'onnx C/B/A':>11} {'max rel':>8}  note")
    for name in args.models.split(","):
        model = build(name)
        reference = torch_counts(model)
        for exporter, opset, dynamic, tool, dtype in configs:
            row = (f"{name:<19} {exporter:<13} {opset:>5} {dynamic:<7} {tool or '-':<13} {dtype:<5} "
                   f"{'%d/%d/%d' % reference:>11}")
            try:
                source = post(export(model, exporter, opset, dynamic, dtype), tool)
                example = torch.randn(1, 3, SIZE, SIZE).to(torch.half if dtype == "fp16" else torch.float).numpy() \
                    if dynamic == "hw" else None
                out, report = rewrite.apply(source, PASSES, example_inputs=example, return_report=True)
                check = rewrite.verify(source, out, example)
                counts = onnx_counts(out)
                refused = [r.reason for p in report.passes for r in p.result.refused]
                # Ops of folded constant chains written back as they were are no site of any pass.
                kept = [n.split("; ", 1)[1] for n in report.notes if "written back as they were" in n]
                note = "" if counts == reference else (refused[0][:90] if refused else
                                                       kept[0][:160] if kept else "(no refusal)")
                if example is not None and any("example_inputs" in r for r in refused):  # a reason untrue here
                    note = f"ASKS FOR EXAMPLE INPUTS IT HAS: {next(r for r in refused if 'example_inputs' in r)[:80]} {note}"
                chains = sum(n.op_type == "Add" for n in out.graph.node) - counts[2]
                if chains:
                    note = f"(+{chains} Add of constant chains written back as they were) {note}"
                print(f"{row} {'%d/%d/%d' % counts:>11} {check.max_rel:>8.1e}  {'' if check.ok else 'FAILED '}{note}")
            except Exception as exc:  # a row of the table, not the end of it
                print(f"{row} {'error':>11} {'':>8}  {type(exc).__name__}: {str(exc).splitlines()[0][:90]}")


if __name__ == "__main__":
    main()
