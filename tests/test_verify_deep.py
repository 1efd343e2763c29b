"""verify=True on deep networks: correct rewrites pass against the float64 reference, broken ones fail.

Four deep nets at 224x224, batch 1, random weights and BN statistics. Per net: one apply() with every
pass and verify=True, then four deliberately broken rules (wrong BN axis, dropped bias, lost branch,
transposed kernel), each judged against one shared reference of the original (built once per net).
"""
import pytest
import timm
import torch
import torchvision

import rewrite
from rewrite.params import bias_f64, bn_affine, cast_like, f64
from rewrite.pattern import P
from rewrite.patterns import conv_bn
from rewrite.rule import rule
from rewrite.verify import TorchReference

ALL_PASSES = ["fold_bn", "fuse_branches", "remove_residual", "remove_channels", "cleanup"]
NETS = {
    "repvgg_b0": lambda: timm.create_model("repvgg_b0"),
    "mobileone_s0": lambda: timm.create_model("mobileone_s0"),
    "resnet152": lambda: torchvision.models.resnet152(),
    "efficientnet_b0": lambda: torchvision.models.efficientnet_b0(),
}


def calibrated(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights whose activations neither vanish nor saturate, so the output depends on the input.

    BN statistics come from one training-mode batch (each BN then normalizes what it sees); gamma and
    beta are random around 1 and 0. With arbitrary random statistics (randomize_bn) a deep net such as
    EfficientNet outputs a constant, and no broken rule could be seen at its output.
    """
    g = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.momentum = 1.0
    model.train()
    with torch.no_grad():
        model(torch.randn(2, 3, 224, 224, generator=g))
        for bn in bns:
            bn.weight.copy_(1 + 0.3 * torch.randn(bn.num_features, generator=g))
            bn.bias.copy_(0.3 * torch.randn(bn.num_features, generator=g))
    return model.eval()


def _fold(ctx, x, conv, bn, weight, bias):
    return ctx.op(conv.kind, x, params={"weight": cast_like(weight, conv.params["weight"]),
                                        "bias": cast_like(bias, conv.params["weight"])},
                  like=bn.output, named_after=conv, **conv.attrs)


def wrong_axis(ctx, x, conv, bn):
    """BN's scale applied along the weight's input-channel axis instead of its output axis."""
    scale, shift = bn_affine(bn)
    w = f64(conv.params["weight"])
    if conv.kind != "conv" or w.shape[1] != scale.numel() or w.shape[0] != scale.numel():
        return None
    return _fold(ctx, x, conv, bn, w * scale.view(1, -1, *[1] * (w.dim() - 2)), bias_f64(conv) * scale + shift)


def dropped_bias(ctx, x, conv, bn):
    """BN folded with its shift forgotten."""
    scale, _ = bn_affine(bn)
    w = f64(conv.params["weight"])
    if conv.kind != "conv":
        return None
    return _fold(ctx, x, conv, bn, w * scale.view(-1, *[1] * (w.dim() - 1)), bias_f64(conv) * scale)


def transposed_kernel(ctx, x, conv, bn):
    """BN folded correctly, but the kernel's spatial axes swapped."""
    scale, shift = bn_affine(bn)
    w = f64(conv.params["weight"])
    if conv.kind != "conv" or w.dim() != 4 or w.shape[-1] != w.shape[-2] or w.shape[-1] == 1:
        return None
    return _fold(ctx, x, conv, bn, (w * scale.view(-1, 1, 1, 1)).transpose(-1, -2), bias_f64(conv) * scale + shift)


def lost_branch(ctx, add, a, b):
    """An add of two computed branches replaced by its first operand."""
    producers = [v.producer for v in (a, b)]
    if any(p is None or p.kind == "constant" for p in producers):
        return None
    return a


def broken_rules():
    """Each bug as a rule, as a buggy rule would be: wrong at every site it accepts."""
    return {
        "wrong BN axis": rule(conv_bn, name="wrong_bn_axis")(wrong_axis),
        "dropped bias": rule(conv_bn, name="dropped_bias")(dropped_bias),
        "transposed kernel": rule(conv_bn, name="transposed_kernel")(transposed_kernel),
        "lost branch": rule(P.add(P.any("a"), P.any("b"), name="add"), name="lost_branch")(lost_branch),
    }


@pytest.mark.parametrize("name", list(NETS))
def test_deep_net_verifies_every_pass_and_rejects_broken_rules(name, one_thread):
    torch.manual_seed(0)
    model = calibrated(NETS[name]())
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():  # the output depends on the input, so a wrong layer shows at the output
        a, b = model(x), model(torch.randn(1, 3, 224, 224))
    assert float((a - b).abs().max() / a.abs().max()) > 1e-2
    out, report = rewrite.apply(model, ALL_PASSES, example_inputs=x, verify=True, return_report=True)
    assert report.modified
    for p in report.passes:
        v = p.verification
        assert v.ok and v.reference == "float64 copy of the original"
        assert 0 < v.original_error < 1e-3 and v.rewritten_error <= 4 * v.original_error + 16 * 2 ** -23
        assert f"original float32 error {v.original_error:.1e}, rewritten {v.rewritten_error:.1e}" in v.summary()
    noise = report.passes[-1].verification.original_error

    reference = TorchReference(model, x)
    fired = []
    for what, broken in broken_rules().items():
        wrong, wrong_report = rewrite.apply(model, [broken], example_inputs=x, return_report=True, inplace=True)
        if not wrong_report.modified:
            continue  # this net has no site of that kind (no square kernel before a BN, say)
        fired.append(what)
        check = reference.check(wrong)
        assert not check.ok, f"{what} on {name} passed verification: {check}"
        # off by orders of magnitude, not by a hair
        assert check.rewritten_error > 100 * noise, f"{what} on {name}: {check}"
    assert len(fired) >= 3, fired  # most broken rules find a site on every net
    assert reference.check(model).max_abs == 0  # inplace=True shared tensors but changed nothing of the input
    if name == "repvgg_b0":  # and through apply itself: an EquivalenceError naming the pass and both errors
        with pytest.raises(rewrite.EquivalenceError, match="pass dropped_bias.*original float32 error .* rewritten"):
            rewrite.apply(model, [broken_rules()["dropped bias"]], example_inputs=x, verify=True)
