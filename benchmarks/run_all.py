"""Every speed ratio of issue 13 in one table: ours / the tool a user would otherwise pick.

    python benchmarks/run_all.py              # every row, best of 5 alternating runs
    python benchmarks/run_all.py --quick      # best of 2
    python benchmarks/run_all.py --zoo        # also the other timm re-parameterizable families
    python benchmarks/run_all.py --only fold_bn,fuse_branches
    python benchmarks/run_all.py --cpu-time   # CPU time, steadier when the machine is oversubscribed

One process, one torch thread, each pair measured in alternation (common.paired_best) so that
load from other work on the machine hits both tools alike. Needs the bench extra
(`pip install -e ".[bench]"`: onnxsim, torch-pruning) and timm.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import rewrite  # noqa: E402
import common  # noqa: E402
from common import best_time, paired_best  # noqa: E402
from rewrite.testing import randomize_bn  # noqa: E402

FUSE_MODELS = ["repvgg_a0", "mobileone_s0", "repvgg_b1"]
ZOO_MODELS = ["repvgg_b0", "mobileone_s1", "repghostnet_100", "repvit_m1", "fastvit_t8", "fastvit_mci0"]


class Row:
    def __init__(self, job: str, peer: str, ours: float, theirs: float, goal: float, noise: float | None = None):
        self.job, self.peer, self.ours, self.theirs, self.goal = job, peer, ours, theirs, goal
        self.noise = noise  # the peer timed against a copy of itself (A/A): how far apart two equal models come

    @property
    def ratio(self) -> float:
        return self.ours / self.theirs

    def line(self) -> str:
        met = "met" if self.ratio <= self.goal else "MISSED"
        if met == "MISSED" and self.noise is not None and self.ratio <= self.goal * self.noise:
            met = f"within noise (A/A {self.noise:.2f})"
        return (f"| {self.job} | {self.peer} | {self.ours * 1e3:.1f} ms | {self.theirs * 1e3:.1f} ms | "
                f"{self.ratio:.2f} | <= {self.goal:g} | {met} |")


def fold_bn_rows(repeat: int) -> list[Row]:
    import torchvision
    from torch.fx.experimental.optimization import fuse

    rows = []
    for name in ("resnet50", "resnet152"):
        torch.manual_seed(0)
        model = randomize_bn(getattr(torchvision.models, name)(), seed=0).eval()
        ours, fx = paired_best(lambda: rewrite.apply(model, ["fold_bn"]), lambda: fuse(model), repeat)
        rows.append(Row(f"fold_bn, torchvision {name}", "torch.fx...fuse", ours, fx, 0.5))
    return rows


def chain_scaling(repeat: int) -> tuple[float, float, float]:
    from bench_fold_bn import chain

    times = []
    for n in (250, 2000):
        model = chain(n)
        # best of the full count: one 2000-block run takes a second, and a best of two swung the ratio by 25%
        times.append(best_time(lambda: rewrite.apply(model, ["fold_bn"]), repeat))
    return times[0], times[1], times[1] / times[0]


def _timm_model(name: str):
    import timm

    torch.manual_seed(0)
    return randomize_bn(timm.create_model(name, pretrained=False).eval(), seed=0)


def fuse_branches_rows(models: list[str], repeat: int) -> list[Row]:
    from timm.utils.model import reparameterize_model

    rows = []
    for name in models:
        model = _timm_model(name)
        ours, timm_time = paired_best(lambda: rewrite.apply(model, ["fold_bn", "fuse_branches"]),
                                      lambda: reparameterize_model(model), repeat)
        rows.append(Row(f"fuse_branches end to end, timm {name}", "timm reparameterize_model", ours, timm_time, 1.0))
    return rows


def latency_rows(models: list[str], repeat: int, batch: int = 8, size: int = 224) -> list[Row]:
    from bench_fuse_branches import interleaved_latency
    from timm.utils.model import reparameterize_model

    rows = []
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    for name in models:
        model = _timm_model(name)
        ours, deploy = rewrite.apply(model, ["fold_bn", "fuse_branches"]), reparameterize_model(model)
        # identical conv stacks, so noise decides: a second copy of timm's model measures how much
        lat_ours, lat_timm, lat_copy = interleaved_latency([ours, deploy, copy.deepcopy(deploy)], x, max(repeat, 6))
        noise = max(lat_timm, lat_copy) / min(lat_timm, lat_copy)
        rows.append(Row(f"deploy latency b{batch} {size}px, timm {name}", "timm's deploy model", lat_ours, lat_timm, 1.0,
                        noise))
    return rows


def remove_channels_rows(repeat: int) -> list[Row]:
    from bench_remove_channels import run_ours, run_torch_pruning, slimmed_resnet50

    x = torch.randn(1, 3, 224, 224)
    base, dead = slimmed_resnet50(zero_beta=True)
    ours, tp = paired_best(lambda: run_ours(base, x), lambda: run_torch_pruning(base, dead, x, copy_first=True),
                           repeat)
    return [Row("remove_channels, resnet50 half inner channels dead", "Torch-Pruning (+deepcopy)", ours, tp, 1.0)]


def onnx_rows(repeat: int) -> list[Row]:
    from bench_onnx_fold_bn import export_resnet50, run_onnxsim, run_rewrite

    model = export_resnet50(64)
    ours, sim = paired_best(lambda: run_rewrite(model), lambda: run_onnxsim(model), repeat)
    return [Row("fold_bn, ONNX resnet50", "onnx-simplifier", ours, sim, 0.5)]


SECTIONS = ("fold_bn", "fuse_branches", "remove_channels", "onnx", "latency")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="best of 2 instead of 5")
    parser.add_argument("--zoo", action="store_true", help=f"also fuse_branches on {', '.join(ZOO_MODELS)}")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time with this process's CPU time instead of wall time (a shared, oversubscribed machine)")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {', '.join(SECTIONS)}")
    args = parser.parse_args()
    only = args.only.split(",")
    unknown = [s for s in only if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    torch.set_num_threads(1)
    common.use_cpu_clock(args.cpu_time)
    repeat = 2 if args.quick else 5
    load = os.getloadavg()
    print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, load {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}; torch {torch.__version__}, "
          f"1 thread, best of {repeat}, alternating, {'CPU' if args.cpu_time else 'wall'} time\n")
    print("| job | peer | ours | peer | ours / peer | goal | |")
    print("|---|---|---|---|---|---|---|")
    scaling = None
    for section in only:
        if section == "fold_bn":
            rows = fold_bn_rows(repeat)
            scaling = chain_scaling(repeat)
        elif section == "fuse_branches":
            rows = fuse_branches_rows(FUSE_MODELS + (ZOO_MODELS if args.zoo else []), repeat)
        elif section == "remove_channels":
            rows = remove_channels_rows(repeat)
        elif section == "onnx":
            rows = onnx_rows(repeat)
        else:
            rows = latency_rows(FUSE_MODELS[:2], repeat)
        for row in rows:
            print(row.line(), flush=True)
    if scaling is not None:
        t250, t2000, ratio = scaling
        print(f"\nfold_bn chain of conv-BN-ReLU blocks: {t250 * 1e3:.0f} ms at 250, {t2000 * 1e3:.0f} ms at 2000, "
              f"time(2000)/time(250) = {ratio:.2f} (linear: 8, goal <= 9)")
    load = os.getloadavg()
    print(f"load at the end: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")


if __name__ == "__main__":
    main()
