"""The RMNet slimming pipeline end to end, on synthetic data (random weights, nothing downloaded).

1. a small ResNet (torchvision resnet18, 10 classes) becomes a plain network by `remove_residual`,
   and gets a BatchNorm after every conv for slimming (RMNet trains its plain networks with BN);
2. a few training steps with the L1 penalty on BN gammas (rewrite.slimming);
3. the gammas chosen globally by ratio are zeroed (lossy: this is the slimming decision);
4. `remove_channels` removes the dead channels exactly (outputs equal to step 3's model);
5. `fold_bn` folds the remaining BatchNorms;
6. export to ONNX.
Parameters and FLOPs are printed at each step.

    python examples/slimming_pipeline.py [--ratio 0.5] [--steps 5]
"""
from __future__ import annotations

import argparse
import os
import tempfile

import torch
import torchvision

import rewrite
from rewrite import slimming
from rewrite.analysis.cost import model_cost


def show(step: str, model, x) -> None:
    cost = model_cost(model, x)
    print(f"{step:<44} {slimming.count_weights(model) / 1e6:7.3f} M params  {cost.flops / 1e9:7.3f} GFLOPs")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(2, 3, args.size, args.size)

    resnet = torchvision.models.resnet18(num_classes=10).eval()
    show("0. resnet18", resnet, x)
    plain, report = rewrite.apply(resnet, ["remove_residual"], example_inputs=x, verify=True, return_report=True)
    show("1. remove_residual (plain network)", plain, x)
    plain = slimming.insert_batch_norms(plain)
    show("   + a BatchNorm after every conv", plain, x)

    # 2. a few steps of training with the L1 penalty on the gammas (synthetic data, so only a demonstration)
    plain.train()
    optimizer = torch.optim.SGD(plain.parameters(), lr=0.01, momentum=0.9)
    for step in range(args.steps):
        images, labels = torch.randn(8, 3, args.size, args.size), torch.randint(0, 10, (8,))
        loss = torch.nn.functional.cross_entropy(plain(images), labels) + slimming.bn_l1_penalty(plain, 1e-4)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    plain.eval()
    print(f"2. trained {args.steps} steps with the L1 penalty; last loss {loss.item():.3f}")

    # 3. the slimming decision (lossy by nature): zero the smallest gammas, globally
    chosen = slimming.select_channels(plain, ratio=args.ratio)
    zeroed = slimming.zero_channels(plain, chosen)
    print(f"3. zeroed {zeroed} BN gammas across {len(chosen)} layers (ratio {args.ratio})")

    # 4. exact removal: the outputs stay those of the zeroed model
    slim, report = rewrite.apply(plain, ["remove_channels"], example_inputs=x, verify=True, return_report=True)
    result = report["remove_channels"].result
    show("4. remove_channels", slim, x)
    print(f"   {result.notes['summary'][0]}; {len(result.refused)} refusal(s), e.g.:")
    for r in result.refused[:3]:
        print(f"     {r.node}: {r.reason}")
    print(f"   verified: {report['remove_channels'].verification}")

    deployed = rewrite.apply(slim, ["fold_bn"], example_inputs=x, verify=True)
    show("5. fold_bn", deployed, x)

    path = os.path.join(tempfile.mkdtemp(), "slim.onnx")
    torch.onnx.export(deployed, (x,), path, dynamo=False, input_names=["x"], output_names=["y"])
    print(f"6. exported to {path} ({os.path.getsize(path) / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
