"""rewrite.expand per scheme: parameters and training-step time of each expanded model against the
original, and the round trip's error (expand -> train-like BN statistics -> contract) in float32 and float64.

    python benchmarks/bench_expand.py                  # resnet18, mobilenet_v2, repvgg_a0 (deploy form)
    python benchmarks/bench_expand.py --quick          # fewer repeats, resnet18 only
    python benchmarks/bench_expand.py --size 64 --batch 8

For timm's repvgg_a0 / mobileone_s0 it also puts our expansion of the deploy form beside timm's own
train-form model (the hand-written blocks): parameters and step time, ratio ours / timm's.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(__file__))
import rewrite  # noqa: E402
from common import best_time, relative_error  # noqa: E402
from rewrite.expansion import architecture, contract  # noqa: E402
from rewrite.testing import randomize_bn  # noqa: E402

SCHEMES = {"repvgg": {}, "acb": {}, "dbb": {}, "mobileone": {"k": 4}, "expand": {"ratio": 4}}


def models(quick: bool):
    import timm
    import torchvision
    from timm.utils.model import reparameterize_model

    yield "resnet18", torchvision.models.resnet18()
    if not quick:
        yield "mobilenet_v2", torchvision.models.mobilenet_v2()
        yield "repvgg_a0 (deploy)", reparameterize_model(timm.create_model("repvgg_a0").eval())


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def step_time(model: nn.Module, batch: int, size: int, repeat: int) -> float:
    """Best time of one SGD step (forward, cross-entropy, backward, update) in training mode."""
    model = copy.deepcopy(model).train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    images, labels = torch.randn(batch, 3, size, size), torch.randint(0, 1000, (batch,))

    def step():
        loss = nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return best_time(step, repeat=repeat, warmup=1)


def round_trip(model: nn.Module, scheme: str, x: torch.Tensor) -> dict:
    start = time.perf_counter()
    wide = rewrite.expand(model, scheme, example_inputs=x, options=SCHEMES[scheme], init="fresh")
    seconds_expand = time.perf_counter() - start
    randomize_bn(wide, seed=1)  # as if trained
    start = time.perf_counter()
    deploy = contract(wide, x)
    seconds_contract = time.perf_counter() - start
    wide.eval()
    with torch.no_grad():
        err32 = relative_error(wide(x), deploy(x))
        wide64, x64 = copy.deepcopy(wide).double(), x.double()
        err64 = relative_error(wide64(x64), contract(wide64, x64)(x64))
    same = architecture(deploy, x) == architecture(contract(model, x), x)
    return dict(wide=wide, err32=err32, err64=err64, same=same, expand_s=seconds_expand, contract_s=seconds_contract)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    repeat = 2 if args.quick else 4
    x = torch.randn(2, 3, args.size, args.size)
    print(f"training step: batch {args.batch}, {args.size}x{args.size}, SGD, {args.threads} thread(s), best of {repeat}")
    header = (f"{'model':<20} {'scheme':<14} {'params':>11} {'x orig':>7} {'step s':>8} {'x orig':>7} "
              f"{'err f32':>9} {'err f64':>9} {'arch':>5} {'expand s':>9} {'contract s':>10}")
    print(header)
    for name, model in models(args.quick):
        model = randomize_bn(model).eval()
        base_params, base_step = params(model), step_time(model, args.batch, args.size, repeat)
        print(f"{name:<20} {'(original)':<14} {base_params:>11,} {1.0:>7.2f} {base_step:>8.3f} {1.0:>7.2f}")
        for scheme in SCHEMES:
            r = round_trip(model, scheme, x)
            n, t = params(r["wide"]), step_time(r["wide"], args.batch, args.size, repeat)
            label = scheme + "".join(f" {k}={v}" for k, v in SCHEMES[scheme].items())
            print(f"{'':<20} {label:<14} {n:>11,} {n / base_params:>7.2f} {t:>8.3f} {t / base_step:>7.2f} "
                  f"{r['err32']:>9.1e} {r['err64']:>9.1e} {'same' if r['same'] else 'DIFF':>5} "
                  f"{r['expand_s']:>9.2f} {r['contract_s']:>10.2f}")
    if not args.quick:
        peers(args, repeat)


def peers(args, repeat: int) -> None:
    """Our expansion of a deploy model beside timm's own train-form blocks (same branches)."""
    import timm
    from timm.utils.model import reparameterize_model

    print("\nours (expand of the deploy form) / timm's train form")
    for timm_name, scheme, options in (("repvgg_a0", "repvgg", {}), ("mobileone_s0", "mobileone", {"k": 4})):
        train_form = timm.create_model(timm_name).eval()
        deploy = reparameterize_model(copy.deepcopy(train_form))
        ours = rewrite.expand(deploy, scheme, options=options, init="fresh")
        p_ours, p_timm = params(ours), params(train_form)
        t_ours, t_timm = (step_time(m, args.batch, args.size, repeat) for m in (ours, train_form))
        print(f"{timm_name:<14} params {p_ours:,} / {p_timm:,} = {p_ours / p_timm:.3f}; "
              f"step {t_ours:.3f}s / {t_timm:.3f}s = {t_ours / t_timm:.2f}")


if __name__ == "__main__":
    main()
