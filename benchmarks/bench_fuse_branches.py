"""fuse_branches on timm RepVGG / MobileOne, side by side with timm's own reparameterize_model (one process).

    python benchmarks/bench_fuse_branches.py                 # repvgg_a0, repvgg_b1, mobileone_s0
    python benchmarks/bench_fuse_branches.py --quick         # fewer repeats
    python benchmarks/bench_fuse_branches.py --threads 2

Prints, per model:
- rewrite time: rewrite.apply(model, ["fold_bn", "fuse_branches"]) over timm's
  reparameterize_model(model) (which deep-copies, as apply leaves its input untouched); goal <= 1.0.
  Also the passes alone (apply minus tracing the model and writing it back) over timm;
- inference latency at batch 8, 224x224: our fused model over timm's deploy model (goal <= 1.05),
  and the speed-up of our fused model over the train form;
- relative errors of both rewrites against the train form, and conv counts.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(__file__))
import rewrite  # noqa: E402
from common import best_time, relative_error  # noqa: E402
from rewrite.testing import randomize_bn  # noqa: E402

PASSES = ["fold_bn", "fuse_branches"]


def convs(model: nn.Module) -> int:
    return sum(isinstance(m, nn.Conv2d) for m in model.modules())


def interleaved_latency(models: list[nn.Module], x: torch.Tensor, repeat: int) -> list[float]:
    """Best time per model, the models timed in turn each round, so load from other work hits all alike.
    The order turns each round: whichever runs first after another model meets colder caches."""
    best = [float("inf")] * len(models)
    with torch.no_grad():
        for m in models:
            m(x)  # warm-up
        for round_ in range(repeat):
            order = list(enumerate(models))
            for i, m in order[round_ % len(order):] + order[:round_ % len(order)]:
                best[i] = min(best[i], best_time(lambda: m(x), repeat=1, warmup=0))
    return best


def compare(name: str, repeat: int, batch: int, size: int) -> dict:
    import timm
    from timm.utils.model import reparameterize_model

    torch.manual_seed(0)
    model = randomize_bn(timm.create_model(name, pretrained=False).eval(), seed=0)
    pass_seconds: list[float] = []

    def run_ours():
        _, report = rewrite.apply(model, PASSES, return_report=True)
        pass_seconds.append(sum(p.seconds for p in report.passes))

    t_ours = best_time(run_ours, repeat)
    t_pass = min(pass_seconds)  # the passes alone, without tracing the model and writing it back
    t_timm = best_time(lambda: reparameterize_model(model), repeat)
    ours, deploy = rewrite.apply(model, PASSES), reparameterize_model(model)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x)
        err_ours, err_timm = relative_error(ref, ours(x)), relative_error(ref, deploy(x))
    lat_train, lat_ours, lat_timm = interleaved_latency([model, ours, deploy], x, repeat)
    row = dict(model=name, t_ours=t_ours, t_pass=t_pass, t_timm=t_timm, lat_train=lat_train, lat_ours=lat_ours, lat_timm=lat_timm,
               err_ours=err_ours, err_timm=err_timm, convs_ours=convs(ours), convs_timm=convs(deploy),
               convs_train=convs(model))
    print(f"{name:<13} rewrite ours {t_ours * 1e3:7.0f} ms (passes {t_pass * 1e3:5.0f} ms)  timm {t_timm * 1e3:7.0f} ms"
          f"  ratio {t_ours / t_timm:5.2f} (passes only {t_pass / t_timm:4.2f})"
          f" | latency b{batch} {size}px: train {lat_train * 1e3:7.1f} ms  ours {lat_ours * 1e3:7.1f} ms  "
          f"timm deploy {lat_timm * 1e3:7.1f} ms  ours/timm {lat_ours / lat_timm:5.3f}  "
          f"speed-up vs train {lat_train / lat_ours:4.2f}x"
          f" | rel err ours {err_ours:.1e} timm {err_timm:.1e} | convs {convs(model)} -> ours {convs(ours)}, "
          f"timm {convs(deploy)}", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["repvgg_a0", "repvgg_b1", "mobileone_s0"])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    repeat = 2 if args.quick else 5
    print(f"torch {torch.__version__}, {args.threads} thread(s); best of {repeat}")
    for name in args.models:
        compare(name, repeat, args.batch, args.size)


if __name__ == "__main__":
    main()
