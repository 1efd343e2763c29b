"""Which models rewrite fully, and by which capture path: the models symbolic_trace refuses and timm's
re-parameterizable families, through fold_bn + fuse_branches with capture="auto" (one process).

    python benchmarks/export_reach.py            # every model below
    python benchmarks/export_reach.py repvgg_a0  # some of them

"Fully" means no BatchNorm left and, for the rep families, no branch sum left that fuse_branches
refused; the error is the rewritten float32 model's against the original's float64 copy.
"""
from __future__ import annotations

import sys
import time

import timm
import torch

import rewrite
from rewrite.testing import randomize_bn
from rewrite.verify import verify_torch

REFUSED_BY_FX = [("efficientvit_m0", {"img_size": 64}), ("efficientvit_m1", {"img_size": 64}), ("tiny_vit_5m_224", {}),
                 ("tf_efficientnet_b0", {}), ("tf_efficientnetv2_b0", {}), ("dm_nfnet_f0", {}), ("mobilevit_xxs", {}),
                 ("vgg11_bn", {})]
REP_FAMILIES = [("repvgg_a0", {}), ("mobileone_s0", {}), ("fastvit_t8", {}), ("repghostnet_050", {}),
                ("repvit_m1", {})]


def main() -> None:
    torch.set_num_threads(1)
    chosen = set(sys.argv[1:])
    print(f"{'model':<22} {'capture':<8} {'seconds':>8} {'BN before':>9} {'BN after':>8} {'add after':>9} "
          f"{'max rel':>9}  fully")
    for name, kwargs in REFUSED_BY_FX + REP_FAMILIES:
        if chosen and name not in chosen:
            continue
        torch.manual_seed(0)
        model = randomize_bn(timm.create_model(name, **kwargs), seed=0).eval()
        x = torch.randn(1, 3, 64, 64)
        start = time.perf_counter()
        try:
            out, report = rewrite.apply(model, ["fold_bn", "fuse_branches"], example_inputs=x, return_report=True)
        except rewrite.RewriteError as exc:
            print(f"{name:<22} failed: {str(exc).splitlines()[0][:100]}")
            continue
        seconds = time.perf_counter() - start
        check = verify_torch(model, out, x)
        how = "export" if report.capture else "fx"
        bn_left = report.nodes_after.get("batch_norm", 0)
        refused_sums = [r for r in report["fuse_branches"].result.refused if r.rule == "fuse_parallel_branches"]
        fully = check.ok and bn_left == 0 and not refused_sums
        print(f"{name:<22} {how:<8} {seconds:>8.1f} {report.nodes_before.get('batch_norm', 0):>9} {bn_left:>8} "
              f"{report.nodes_after.get('add', 0):>9} {check.max_rel:>9.1e}  {'yes' if fully else 'no'}", flush=True)


if __name__ == "__main__":
    main()
