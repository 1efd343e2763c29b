"""fold_bn + save + verify on a generated ONNX model with external data (default about 2.2 GB of weights).

    python benchmarks/bench_onnx_big.py [--gb 2.2] [--dir /tmp] [--keep]

The model (a stack of 1024-channel 3x3 Conv + BatchNormalization + Relu, float32, 4x4 input) is
written with onnx.save(..., save_as_external_data=True) to a temporary folder. Each step runs in a
fresh process so its peak RSS is its own: `rewrite.apply(path, ["fold_bn"])` + `save_onnx` (with external
data, as the input keeps its weights), then
`rewrite.verify(original, rewritten)` in onnxruntime, then onnxsim on the same file (which cannot
load models over 2 GB: protobuf's limit). Prints wall time, peak RSS and peak RSS / weight bytes.
The folder is removed afterwards unless --keep.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

CHANNELS = 1024
LAYER_BYTES = CHANNELS * CHANNELS * 9 * 4


def generate(path: str, gb: float) -> int:
    """Write the model; returns its weight bytes. Each tensor goes straight to the data file, so the
    generator never holds more than one layer."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    layers = max(1, round(gb * 1e9 / LAYER_BYTES))
    rng = np.random.default_rng(0)
    nodes, inits, x, total = [], [], "x", 0
    data_name = os.path.basename(path) + ".data"
    with open(path + ".data", "wb") as data:
        def external(name: str, array: np.ndarray) -> None:
            nonlocal total
            tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=array.shape)
            offset = data.tell()
            total += data.write(np.ascontiguousarray(array, dtype=np.float32).tobytes())
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(array.nbytes))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            tensor.data_location = TensorProto.EXTERNAL
            inits.append(tensor)

        for i in range(layers):
            w = rng.standard_normal((CHANNELS, CHANNELS, 3, 3), dtype=np.float32)
            w *= 1 / 96  # keeps activations O(1) through the stack
            external(f"w{i}", w)
            del w
            for name, values in (("g", rng.uniform(0.5, 1.5, CHANNELS)), ("b", rng.standard_normal(CHANNELS)),
                                 ("m", rng.standard_normal(CHANNELS) * 0.1), ("v", rng.uniform(0.5, 2.0, CHANNELS))):
                external(f"{name}{i}", values.astype(np.float32))
            nodes += [helper.make_node("Conv", [x, f"w{i}"], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]),
                      helper.make_node("BatchNormalization", [f"c{i}", f"g{i}", f"b{i}", f"m{i}", f"v{i}"], [f"n{i}"],
                                       name=f"bn{i}"),
                      helper.make_node("Relu", [f"n{i}"], [f"r{i}"], name=f"relu{i}")]
            x = f"r{i}"
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, CHANNELS, 4, 4])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, CHANNELS, 4, 4])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return total


def current_rss() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


def peak_rss() -> int:
    """This process's peak RSS (VmHWM: unlike ru_maxrss, not inherited from the parent across fork + exec)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def step(name: str, src: str, dst: str) -> dict:
    """One measured step, in this (fresh) process."""
    import onnx_graphsurgeon  # noqa: F401  (the libraries' own memory is the baseline, not the model's)
    import onnxruntime  # noqa: F401
    import torch

    import rewrite  # noqa: F401

    torch.set_num_threads(1)
    base = current_rss()
    start = time.perf_counter()
    result: dict = {}
    if name == "generate":
        result["weights"] = generate(src, float(dst))
    elif name == "fold_bn+save":
        import rewrite
        from rewrite.frontends.onnx import save_onnx

        out, report = rewrite.apply(src, ["fold_bn"], return_report=True)
        result["folded"] = report["fold_bn"].result.counts.get("fold_bn_into_conv", 0)
        save_onnx(out, dst, external_data=True)  # as the input keeps its weights
    elif name == "verify":
        import rewrite

        check = rewrite.verify(src, dst)
        result.update(ok=check.ok, max_rel=check.max_rel)
    elif name == "onnxsim":
        import onnx
        import onnxsim

        try:
            onnxsim.simplify(onnx.load(src))
            result["ok"] = True
        except Exception as exc:  # the protobuf limit, on models past 2 GB
            result.update(ok=False, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
    result.update(seconds=time.perf_counter() - start, peak_rss=peak_rss(), base_rss=base)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=2.2)
    parser.add_argument("--dir", default=tempfile.gettempdir())
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--steps", default="fold_bn+save,verify,onnxsim")
    parser.add_argument("--step", help=argparse.SUPPRESS)
    parser.add_argument("--src", help=argparse.SUPPRESS)
    parser.add_argument("--dst", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:
        print(json.dumps(step(args.step, args.src, args.dst)))
        return
    free = shutil.disk_usage(args.dir).free
    if free < 3 * args.gb * 1e9:
        sys.exit(f"{args.dir} has {free / 1e9:.1f} GB free; the model and its rewrite need {3 * args.gb:.1f}")
    folder = tempfile.mkdtemp(prefix="rewrite-big-", dir=args.dir)
    try:
        src, dst = os.path.join(folder, "big.onnx"), os.path.join(folder, "big.folded.onnx")
        print(f"{'step':<14} {'seconds':>8} {'peak RSS GB':>12} {'x weights':>10} {'(peak - libraries) x weights':>29}"
              "  result")
        weights = None
        for name in ["generate"] + args.steps.split(","):
            run = subprocess.run([sys.executable, __file__, "--step", name, "--src", src,
                                  "--dst", str(args.gb) if name == "generate" else dst], capture_output=True, text=True)
            if run.returncode:
                print(f"{name:<14} failed: {run.stderr.strip().splitlines()[-1] if run.stderr.strip() else run.returncode}")
                continue
            r = json.loads(run.stdout.strip().splitlines()[-1])
            weights = weights or r.get("weights")
            extra = {k: v for k, v in r.items() if k not in ("seconds", "peak_rss", "base_rss")}
            print(f"{name:<14} {r['seconds']:>8.1f} {r['peak_rss'] / 1e9:>12.2f} {r['peak_rss'] / weights:>10.2f} "
                  f"{(r['peak_rss'] - r['base_rss']) / weights:>29.2f}  {extra}")
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
