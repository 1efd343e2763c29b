"""Zoo sweep: fold_bn, fuse_branches, remove_residual and remove_channels over every torchvision
classification model and the timm families with re-parameterization (random weights, randomized BN).

Not a test: it takes long. Each model runs in its own subprocess (a crash or a hang is recorded, not
fatal) and each pass runs alone on the original model. For remove_channels a random quarter of every
BN's channels is made dead (gamma 0, beta 0), so the pass has something to find. Outcome per pass:

    exact    the outputs match and the pass left no site with a refusal
    partial  the outputs match; the pass rewrote something and kept other sites with a reason
    refused  the outputs match; nothing rewritten, every site it looked at kept with a reason
             (a model that cannot be captured counts here: its TraceError is the reason)
    wrong    the rewritten model's outputs differ (float32 against the float64 original)
    crash    any other exception, or the subprocess died or timed out

    nice -n 19 .venv/bin/python scripts/zoo_sweep.py --out sweep.jsonl      # run (appends, resumes)
    .venv/bin/python scripts/zoo_sweep.py --out sweep.jsonl --table          # the per-family table
    .venv/bin/python scripts/zoo_sweep.py --worker resnet18                  # one model, JSON to stdout
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import Counter, defaultdict

PASSES = ("fold_bn", "fuse_branches", "remove_residual", "remove_channels")
OUTCOMES = ("exact", "partial", "refused", "wrong", "crash")
# timm's families with re-parameterization (a reparameterize / switch_to_deploy / fuse of their own).
TIMM_MODELS = ("repvgg_a0", "repvgg_b1g4", "mobileone_s0", "mobileone_s1", "fastvit_t8", "fastvit_mci0",
               "repvit_m0_9", "repvit_m1_1", "repghostnet_050", "repghostnet_100", "levit_128s",
               "levit_conv_128s", "ghostnetv3_050", "ghostnetv3_100", "mobilenetv4_conv_small", "efficientvit_m0")
# Longest prefix first decides a model's family.
FAMILIES = sorted(("alexnet", "convnext", "densenet", "efficientnet_v2", "efficientnet_b", "googlenet", "inception",
                   "maxvit", "mnasnet", "mobilenet_v2", "mobilenet_v3", "regnet_x", "regnet_y", "resnext", "resnet",
                   "shufflenet", "squeezenet", "swin_v2", "swin", "vgg", "vit", "wide_resnet", "repvgg", "mobileone",
                   "fastvit", "repvit", "repghostnet", "levit_conv", "levit", "ghostnetv3", "mobilenetv4",
                   "efficientvit"), key=len, reverse=True)
MAX_PARAMS = 150e6  # bigger models are listed as skipped: their float64 references take too long here


def family(name: str) -> str:
    return next((f for f in FAMILIES if name.startswith(f)), name)


def model_names() -> list[str]:
    import torchvision.models as tm

    return [f"timm:{n}" for n in TIMM_MODELS] + [f"torchvision:{n}" for n in tm.list_models(module=tm)]


def build(spec: str):
    source, name = spec.split(":", 1)
    if source == "timm":
        import timm

        return timm.create_model(name, pretrained=False).eval()
    import torchvision.models as tm

    return tm.get_model(name, weights=None).eval()


def example_input(model, size: int):
    """A small input the model accepts: `size` square, else its configured size, else 224."""
    import torch

    sizes = [size]
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if "input_size" in cfg:
        sizes.append(cfg["input_size"][-1])
    sizes.append(224)
    for s in dict.fromkeys(sizes):
        x = torch.randn(1, 3, s, s, generator=torch.Generator().manual_seed(0))
        try:
            with torch.no_grad():
                model(x)
            return x
        except Exception:  # noqa: BLE001 - a size the model rejects: try the next
            continue
    raise RuntimeError("the model runs on none of the input sizes tried")


def kill_quarter(model, seed: int = 1) -> int:
    """Make a random quarter of every BN's channels dead (gamma 0, beta 0). Returns how many."""
    import torch

    g = torch.Generator().manual_seed(seed)
    n = 0
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.affine:
                dead = torch.randperm(m.num_features, generator=g)[: m.num_features // 4]
                m.weight[dead] = 0
                m.bias[dead] = 0
                n += len(dead)
    return n


def reasons(result, top: int = 3) -> list[str]:
    from rewrite.report import group_refusals

    return [f"{len(sites)}x {reason}"[:220] for _, reason, sites in group_refusals(result.refused)[:top]]


def run_pass(model, x, name: str, reference) -> dict:
    """One pass on `model`, judged by `reference` (a rewrite.verify.TorchReference of it, computed once)."""
    import torch

    import rewrite
    from rewrite.errors import RewriteError, TraceError

    start = time.perf_counter()
    try:
        with torch.no_grad():
            out, report = rewrite.apply(model, [name], example_inputs=x, return_report=True)
            check = reference.check(out)
    except TraceError as exc:
        return {"outcome": "refused", "reasons": [f"capture: {exc}"[:300]], "seconds": time.perf_counter() - start}
    except RewriteError as exc:
        return {"outcome": "crash", "reasons": [f"{type(exc).__name__}: {exc}"[:300]],
                "seconds": time.perf_counter() - start}
    except Exception as exc:  # noqa: BLE001 - the sweep records every failure
        return {"outcome": "crash", "reasons": [f"{type(exc).__name__}: {exc}"[:300]],
                "seconds": time.perf_counter() - start}
    result = report[name].result
    row = {"seconds": round(time.perf_counter() - start, 2), "counts": dict(result.counts),
           "refusals": len(result.refused), "reasons": reasons(result), "max_rel": check.max_rel}
    if not check.ok:
        row["outcome"] = "wrong"
        row["reasons"] = [str(check)[:300]]
    elif not result.refused:
        row["outcome"] = "exact"
    else:
        row["outcome"] = "partial" if result.modified else "refused"
    return row


def worker(spec: str, size: int) -> dict:
    import torch

    from rewrite.testing import randomize_bn
    from rewrite.verify import TorchReference

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build(spec)
    params = sum(p.numel() for p in model.parameters())
    row = {"model": spec, "family": family(spec.split(":", 1)[1]), "params": params}
    if params > MAX_PARAMS:
        row["skipped"] = f"{params / 1e6:.0f}M parameters (over {MAX_PARAMS / 1e6:.0f}M)"
        return row
    randomize_bn(model, 0)
    x = example_input(model, size)
    row["input"] = list(x.shape)
    reference = TorchReference(model, x)  # float64 outputs computed once for the passes that share the model
    for name in PASSES:
        if name == "remove_channels":
            row["dead_channels"] = kill_quarter(model)
            reference = TorchReference(model, x)
        row[name] = run_pass(model, x, name, reference)
        if name == "remove_channels" and "counts" in row[name]:
            removed = row[name]["counts"].get("channels_removed", 0)
            row[name]["removed_of_dead"] = f"{removed}/{row['dead_channels']}"
    return row


def sweep(out: str, size: int, timeout: float, only: str | None) -> None:
    done = set()
    if os.path.exists(out):
        with open(out) as f:
            done = {json.loads(line)["model"] for line in f if line.strip()}
    for spec in model_names():
        if spec in done or (only and only not in spec):
            continue
        start = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, __file__, "--worker", spec, "--size", str(size)],
                                  capture_output=True, text=True, timeout=timeout)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            row = json.loads(lines[-1]) if proc.returncode == 0 and lines else \
                {"model": spec, "died": f"exit {proc.returncode}: {proc.stderr.strip()[-300:]}"}
        except subprocess.TimeoutExpired:
            row = {"model": spec, "died": f"timed out after {timeout:.0f} s"}
        row.setdefault("family", family(spec.split(":", 1)[1]))
        row["wall"] = round(time.perf_counter() - start, 1)
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(spec, row.get("skipped") or row.get("died") or
              " ".join(f"{p}={row[p]['outcome']}" for p in PASSES if p in row), flush=True)


def table(out: str) -> str:
    rows = [json.loads(line) for line in open(out) if line.strip()]
    per = defaultdict(lambda: {p: Counter() for p in PASSES})
    models = Counter()
    skipped = []
    for row in rows:
        if "skipped" in row:
            skipped.append(f"{row['model']} ({row['skipped']})")
            continue
        models[row["family"]] += 1
        for p in PASSES:
            outcome = "crash" if "died" in row else row.get(p, {}).get("outcome", "crash")
            per[row["family"]][p][outcome] += 1
    head = "family".ljust(16) + "n".rjust(3) + "".join(f"  {p:<22}" for p in PASSES)
    lines = ["counts per pass: exact/partial/refused/wrong/crash", head, "-" * len(head)]
    total = {p: Counter() for p in PASSES}
    for fam in sorted(per):
        cells = []
        for p in PASSES:
            total[p].update(per[fam][p])
            cells.append("/".join(str(per[fam][p][o]) for o in OUTCOMES))
        lines.append(fam.ljust(16) + str(models[fam]).rjust(3) + "".join(f"  {c:<22}" for c in cells))
    lines.append("-" * len(head))
    lines.append("total".ljust(16) + str(sum(models.values())).rjust(3) +
                 "".join(f"  {'/'.join(str(total[p][o]) for o in OUTCOMES):<22}" for p in PASSES))
    if skipped:
        lines.append("skipped: " + ", ".join(skipped))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="zoo_sweep.jsonl")
    ap.add_argument("--size", type=int, default=64, help="input side tried first (default 64)")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per model")
    ap.add_argument("--only", help="only models whose name contains this")
    ap.add_argument("--worker", metavar="MODEL", help=argparse.SUPPRESS)
    ap.add_argument("--table", action="store_true", help="print the per-family table of --out and exit")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.size)))
    elif args.table:
        print(table(args.out))
    else:
        sweep(args.out, args.size, args.timeout, args.only)
        print(table(args.out))


if __name__ == "__main__":
    main()
