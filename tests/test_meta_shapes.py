"""The shape pass on meta tensors gives exactly the real forward's shapes and dtypes, or steps aside."""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from hypothesis import given, settings, strategies as st

import rewrite
from rewrite.frontends.fx import _ShapeRecorder
from rewrite.frontends.fx_trace import trace
from rewrite.frontends.meta_shapes import record_meta_shapes


def _real(gm: fx.GraphModule, inputs: tuple) -> dict:
    with torch.no_grad():
        _ShapeRecorder(gm).run(*inputs)
    out = {}
    for n in gm.graph.nodes:
        meta = n.meta.pop("tensor_meta", None)
        if meta is not None:
            out[n] = (tuple(meta.shape), meta.dtype) if hasattr(meta, "shape") else \
                tuple((tuple(m.shape), m.dtype) for m in meta)
    return out


def _meta(gm: fx.GraphModule, inputs: tuple) -> dict | None:
    found = record_meta_shapes(gm, inputs)
    if found is None:
        return None
    return {n: (tuple(m[0]), m[1]) if isinstance(m[0], torch.Size) else tuple((tuple(s), d) for s, d in m)
            for n, m in found.items()}


def _both(model: nn.Module, *inputs):
    gm = fx.GraphModule(model, trace(model))
    return _meta(gm, inputs), _real(gm, inputs)


class _Mixed(nn.Module):
    """split / chunk pieces, flatten, layer norm, gelu, broadcasting with numbers and vectors, a view."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=2)
        self.bn = nn.BatchNorm2d(8)
        self.norm = nn.LayerNorm(6)
        self.scale = nn.Parameter(torch.randn(1, 8, 1, 1))
        self.fc = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x):
        y = F.hardswish(self.bn(self.conv(x)))
        a, b = torch.split(y, [3, 5], dim=1)
        c = torch.cat([b, a], 1) * self.scale + 0.5
        d, e = c.chunk(2, dim=1)
        z = F.gelu(self.norm(d + 2 * e), approximate="tanh")
        return self.fc(z.flatten(1)).relu(), z.view(z.shape[0], -1).sigmoid()


def test_real_models_match_the_real_forward():
    torch.manual_seed(0)
    for model, x in ((torchvision.models.resnet18().eval(), torch.randn(1, 3, 64, 64)),
                     (torchvision.models.mobilenet_v3_small().eval(), torch.randn(2, 3, 96, 80)),
                     (_Mixed().eval(), torch.randn(3, 4, 12, 12)),
                     (_Mixed().eval().double(), torch.randn(3, 4, 12, 12, dtype=torch.float64))):
        meta, real = _both(model, x)
        assert meta is not None, type(model).__name__
        assert meta == real
        assert len(real) > 10


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 3), st.integers(0, 2), st.integers(1, 2),
       st.sampled_from([1, 2]), st.sampled_from(["zeros", "reflect", "circular"]), st.integers(5, 11),
       st.integers(5, 9), st.integers(1, 3))
def test_conv_shapes_match_on_random_geometry(dims, kernel, stride, padding, dilation, groups, mode, h, w, batch):
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
    model = nn.Sequential(conv(4, 6, kernel, stride, padding, dilation, groups, padding_mode=mode), bn(6),
                          nn.ReLU6(), nn.AdaptiveAvgPool1d(2) if dims == 1 else nn.MaxPool2d(1)
                          if dims == 2 else nn.Identity()).eval()
    x = torch.randn(batch, 4, *([h, w, 5][:dims]))
    gm = fx.GraphModule(model, trace(model))
    try:
        real = _real(gm, (x,))
    except Exception:  # the geometry does not fit the input (or reflect padding too wide): meta must not answer
        assert _meta(gm, (x,)) is None
        return
    assert _meta(gm, (x,)) == real


class _Leaf(nn.Module):
    def forward(self, x):
        return x[:, : int(x.sum() > 0) + 1]  # reads values: only the real forward can say


class _Nonzero(nn.Module):
    def forward(self, x):
        return torch.nonzero(x)  # its shape depends on the values


def test_what_meta_tensors_cannot_answer_is_left_to_the_real_forward():
    x = torch.randn(2, 4, 8, 8)
    conv = nn.Conv2d(4, 4, 1)
    leaf_model = nn.Sequential(conv, _Leaf())
    gm = fx.GraphModule(leaf_model, trace(leaf_model, leaf_modules=[_Leaf]))
    assert record_meta_shapes(gm, (x,)) is None  # a user leaf module: its forward may read values
    gm = fx.GraphModule(_Nonzero(), trace(_Nonzero()))
    assert record_meta_shapes(gm, (x,)) is None
    # a float64 input into a float32 conv: the real kernel refuses what conv's shape function would accept
    gm = fx.GraphModule(conv, trace(conv))
    assert record_meta_shapes(gm, (x.double(),)) is None
    # a forward hook may record activations: the module runs for real
    hooked = nn.Sequential(nn.Conv2d(4, 4, 1), nn.ReLU())
    seen = []
    hooked[0].register_forward_hook(lambda m, i, o: seen.append(o.device.type))
    gm = fx.GraphModule(hooked, trace(hooked))
    assert record_meta_shapes(gm, (x,)) is None
    assert seen == []
    # a forward set on the instance is what runs, not the class's conv (a real forward of 2 channels)
    patched = nn.Sequential(nn.Conv2d(4, 8, 1), nn.ReLU())
    stock = patched[0].forward
    patched[0].forward = lambda y: stock(y)[:, :2]
    gm = fx.GraphModule(patched, trace(patched))
    assert record_meta_shapes(gm, (x,)) is None


def test_bad_inputs_still_name_the_failing_module():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval()
    for bad in (torch.randn(1, 4, 16, 16), torch.randn(1, 3, 16, 16, dtype=torch.float64), torch.randn(3, 16)):
        try:
            rewrite.apply(model, ["fold_bn"], example_inputs=bad)
        except rewrite.RewriteError as exc:
            assert "does not run on the example inputs" in str(exc)
            assert "module '0'" in str(exc)
        else:
            raise AssertionError(f"accepted an input of shape {tuple(bad.shape)} and dtype {bad.dtype}")


class _Misfit(nn.Module):
    def forward(self, x):
        return x + x[:, :2]  # shapes that do not broadcast


class _Gelu(nn.Module):
    def forward(self, x):
        return torch.nn.functional.gelu(x)


def test_inputs_the_model_cannot_take_are_refused_as_the_real_forward_refuses():
    cases = [(nn.Sequential(nn.BatchNorm2d(8)).eval(), torch.randn(1, 4, 5, 5), "module '0'"),
             (nn.Sequential(nn.BatchNorm1d(4)).eval(), torch.randn(1, 4, 5, 5), "module '0'"),
             (nn.Sequential(nn.Flatten(), nn.Linear(10, 3)), torch.randn(2, 4, 3, 3), "module '1'"),
             (nn.Sequential(nn.LayerNorm(7)), torch.randn(2, 4, 3, 3), "module '0'"),
             (nn.Sequential(nn.Conv2d(3, 4, 3)), torch.randint(0, 5, (1, 3, 8, 8)), "module '0'"),
             (nn.Sequential(nn.MaxPool2d(9)), torch.randn(1, 3, 4, 4), "module '0'"),
             (nn.Sequential(nn.GELU()), torch.randint(0, 5, (1, 3, 4, 4)), "module '0'"),  # meta takes it, GELU not
             (_Gelu(), torch.randint(0, 5, (1, 3, 4, 4)), "node gelu"),
             (_Misfit(), torch.randn(1, 4, 3, 3), "node add")]
    for model, x, where in cases:
        try:
            rewrite.apply(model, ["remove_channels"], example_inputs=x)
        except rewrite.RewriteError as exc:
            assert "does not run on the example inputs" in str(exc) and where in str(exc), str(exc)
        else:
            raise AssertionError(f"{model} accepted an input of shape {tuple(x.shape)}")


def test_training_mode_statistics_untouched_and_no_meta_tensor_left_behind():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.5)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 10, 10)
    gm = fx.GraphModule(model, trace(model))
    meta = _meta(gm, (x,))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(t.device.type == "cpu" for t in [*model.parameters(), *model.buffers()])
    assert meta is not None and meta == _real(gm, (x,))
