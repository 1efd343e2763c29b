"""The import's one-lookup module recognition and its lazy buffer copy give what the long forms gave."""
import types

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch
import torch.nn as nn

import rewrite
from rewrite.frontends import fx as fx_frontend
from rewrite.testing import randomize_bn
from rewrite.frontends.fx_import import pad_module_args, recognize_module


class _OwnForward(nn.Conv2d):
    def forward(self, x):
        return super().forward(x) * 2


class _Inherited(nn.Conv2d):
    pass


@pytest.mark.parametrize("module,kind", [
    (nn.Conv2d(3, 4, 3), "conv"), (_Inherited(3, 4, 3), "conv"), (_OwnForward(3, 4, 3), None),
    (nn.ConvTranspose2d(3, 4, 3), "conv_transpose"), (nn.ConvTranspose2d(3, 4, 3, padding_mode="zeros"), "conv_transpose"),
    (nn.Linear(3, 4), "linear"), (nn.BatchNorm1d(4), "batch_norm"), (nn.BatchNorm3d(4), "batch_norm"),
    (nn.ReLU(), "relu"), (nn.ReLU6(), "clamp"), (nn.Hardtanh(-2.0, 3.0), "clamp"), (nn.Identity(), "identity"),
    (nn.Dropout2d(0.1), "dropout"), (nn.Flatten(), "flatten"), (nn.MaxPool2d(2), "max_pool"),
    (nn.MaxPool2d(2, return_indices=True), None), (nn.AvgPool1d(3), "avg_pool"), (nn.AdaptiveAvgPool3d(1),
                                                                                  "adaptive_avg_pool"),
    (nn.GELU(), None), (nn.Sequential(), None),
])
def test_each_stock_module_is_read_as_its_kind(module, kind):
    found = recognize_module(module, 1)
    assert (found and found[0]) == kind
    assert recognize_module(module, 2) is None


def test_relu6_and_hardtanh_bounds():
    assert [float(recognize_module(nn.ReLU6(), 1)[2][k]) for k in ("min", "max")] == [0.0, 6.0]
    assert [float(recognize_module(nn.Hardtanh(-2.0, 3.0), 1)[2][k]) for k in ("min", "max")] == [-2.0, 3.0]


def test_a_forward_on_the_instance_or_a_later_patch_is_not_read_as_stock(monkeypatch):
    conv = nn.Conv2d(3, 4, 3)
    assert recognize_module(conv, 1)[0] == "conv"
    conv.forward = types.MethodType(lambda self, x: x, conv)
    assert recognize_module(conv, 1) is None
    relu = nn.ReLU()
    assert recognize_module(relu, 1)[0] == "relu"
    monkeypatch.setattr(nn.ReLU, "forward", lambda self, x: x + 1)
    assert recognize_module(relu, 1) is None


def test_padding_modules():
    assert pad_module_args(nn.ZeroPad2d((1, 2, 3, 4))) == ([1, 2, 3, 4], "constant", 0.0)
    assert pad_module_args(nn.ConstantPad1d(2, 1.5)) == ([2, 2], "constant", 1.5)
    assert pad_module_args(nn.ReflectionPad2d(1)) == ([1, 1, 1, 1], "reflect", 0.0)
    assert pad_module_args(nn.ReplicationPad3d(1))[1] == "replicate"
    assert pad_module_args(nn.Conv2d(1, 1, 1)) is None


class _ScaledByBuffer(nn.Module):
    """Forward computes a parameter expression (folded at import), beside a BN whose statistics it keeps."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.gain = nn.Parameter(torch.rand(4) + 0.5)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)) * (self.gain * 2).reshape(1, -1, 1, 1)


def _copies(monkeypatch) -> list:
    armed = []
    arm = fx_frontend._BufferGuard.arm

    def counting(self):
        armed.append(self.saved is None)
        arm(self)
    monkeypatch.setattr(fx_frontend._BufferGuard, "arm", counting)
    return armed


def test_the_buffers_are_copied_only_when_the_import_runs_model_code(monkeypatch):
    armed = _copies(monkeypatch)
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    rewrite.apply(plain, ["fold_bn"])
    assert armed == []  # nothing to evaluate: no copy of the statistics
    model = _ScaledByBuffer().eval()
    randomize_bn(model, seed=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = rewrite.apply(model, ["fold_bn"])
    assert armed and armed[0] is True and not any(armed[1:])  # copied once, before the first evaluation
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    x = torch.randn(2, 3, 8, 8)
    assert torch.allclose(out(x), model(x), rtol=1e-5, atol=1e-6)


def _same_copy(a: nn.Module, b: nn.Module, source: nn.Module) -> None:
    sa, sb = a.state_dict(keep_vars=True), b.state_dict(keep_vars=True)
    assert sa.keys() == sb.keys() == source.state_dict().keys()
    for k, v in sa.items():
        assert type(v) is type(sb[k]) and torch.equal(v, sb[k]) and v.requires_grad == sb[k].requires_grad
        assert v.data_ptr() != source.state_dict(keep_vars=True)[k].data_ptr()  # copied, not shared
    assert vars(a).keys() == vars(b).keys()


@pytest.mark.parametrize("module", [nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(3, 2), nn.PReLU(), nn.ReLU()])
def test_a_kept_module_is_copied_as_a_deep_copy_copies_it(module):
    import copy

    from rewrite.frontends.fx_emit import _clone

    randomize_bn(nn.Sequential(module), seed=1)
    memo = {}
    clone = _clone(module, memo)
    _same_copy(clone, copy.deepcopy(module), module)
    assert _clone(module, memo) is clone  # installed at a second path: the same copy


def test_copies_keep_tied_parameters_tied_and_a_hooked_module_takes_deepcopy():
    from rewrite.frontends.fx_emit import _clone

    first, second = nn.Linear(3, 3), nn.Linear(3, 3)
    second.weight = first.weight
    memo = {}
    assert _clone(first, memo).weight is _clone(second, memo).weight

    class Counting(nn.Conv2d):
        def count(self, *args):
            self.calls = getattr(self, "calls", 0) + 1

    class CountingReLU(nn.ReLU):
        count = Counting.count

    for hooked in (Counting(3, 4, 1), CountingReLU()):  # with and without parameters
        hooked.register_forward_hook(hooked.count)
        clone = _clone(hooked, {})
        clone(torch.randn(1, 3, 2, 2))
        assert clone.calls == 1 and not hasattr(hooked, "calls")  # the hook is the copy's own method


def _bits(t: torch.Tensor) -> list:
    return t.view(torch.int64).tolist()  # float64: the sign of a zero counts too


_bn_spec = st.tuples(st.integers(1, 9), st.sampled_from([1e-5, 1e-3, 0.1, 0.0]), st.booleans(), st.booleans(),
                     st.sampled_from([torch.float32, torch.float64, torch.float16]), st.booleans())


@settings(max_examples=40, deadline=None)
@given(st.lists(_bn_spec, min_size=1, max_size=7), st.integers(0, 2**16))
def test_batched_bn_affines_are_the_single_ones_bit_for_bit(specs, seed):
    from rewrite.ir import Graph, Node
    from rewrite.params import _bn_affine, bn_affine

    g = torch.Generator().manual_seed(seed)
    graph = Graph()
    x = graph.add_input("x")
    bns = []
    for i, (channels, eps, has_gamma, has_beta, dtype, zero_mean) in enumerate(specs):
        def vec(low, high):
            return (torch.rand(channels, generator=g, dtype=torch.float64) * (high - low) + low).to(dtype)
        params = {"running_mean": torch.zeros(channels, dtype=dtype) if zero_mean else vec(-2, 2),
                  "running_var": vec(0.0, 3.0), "weight": vec(-2, 2) if has_gamma else None,
                  "bias": vec(-1, 1) if has_beta else None}
        node = Node("batch_norm", f"bn{i}", [x], attrs={"eps": eps}, params=params)
        graph.append(node)
        bns.append(node)
    for node in bns:
        scale, shift = bn_affine(node)
        alone = _bn_affine(node)
        assert _bits(scale) == _bits(alone[0]) and _bits(shift) == _bits(alone[1])
        scale.mul_(3.0)  # the caller's own copy
        assert _bits(bn_affine(node)[0]) == _bits(alone[0])
    with torch.no_grad():
        bns[0].params["running_var"].add_(1.0)  # edited in place: its affine is computed anew
    assert _bits(bn_affine(bns[0])[0]) == _bits(_bn_affine(bns[0])[0])


def test_the_batch_serves_bns_of_one_form_and_drops_an_edited_one():
    from rewrite.ir import Graph, Node
    from rewrite.params import _graph_affines

    graph = Graph()
    x = graph.add_input("x")
    bns = [graph.append(Node("batch_norm", f"bn{i}", [x], attrs={"eps": 1e-5},
                             params={"running_mean": torch.randn(4), "running_var": torch.rand(4) + 0.5,
                                     "weight": torch.randn(4), "bias": torch.randn(4)})) for i in range(3)]
    assert all(_graph_affines(n) is not None for n in bns)
    with torch.no_grad():
        bns[1].params["weight"].mul_(2.0)
    assert _graph_affines(bns[1]) is None and _graph_affines(bns[0]) is not None
    bns[2].params["bias"] = torch.randn(4)  # replaced
    assert _graph_affines(bns[2]) is None


def test_a_hooked_stock_module_is_kept_as_its_call():
    """A hook runs code of its own around the call: the module is not read as its kind, and the BN after a
    hooked conv stays, with its reason (before, the conv was folded and the hook's effect lost)."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.SiLU(), nn.Conv2d(4, 4, 1),
                          nn.BatchNorm2d(4)).eval()
    randomize_bn(model, seed=2)
    model[0].register_forward_hook(lambda module, args, out: out * 2)
    model[2].register_forward_pre_hook(lambda module, args: (args[0] + 1,))
    assert recognize_module(model[0], 1) is None
    out, report = rewrite.apply(model, ["fold_bn", "fuse_branches", "cleanup"], return_report=True)
    x = torch.randn(2, 3, 6, 6)
    assert torch.allclose(out(x), model(x), rtol=1e-5, atol=1e-6)
    assert report.nodes_after == {"opaque": 2, "batch_norm": 1, "conv": 1}
    assert any(r.node == "1" and "opaque 0" in r.reason for r in report.passes[0].result.refused)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 5000), st.sampled_from([torch.float32, torch.float64]), st.floats(-40, 18),
       st.sampled_from([None, float("nan"), float("inf"), -float("inf"), 3e38, 1e-41]), st.integers(0, 2**31))
def test_the_magnitude_bound_is_at_least_the_peak_or_gives_way(n, dtype, exponent, odd, seed):
    from rewrite.params import _magnitude_bound

    t = (torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * 10.0**exponent).to(dtype)
    if odd is not None:
        t[seed % n] = odd
    bound = _magnitude_bound(t)
    peak = float(t.abs().max())
    if not torch.isfinite(t).all():
        assert bound is None  # NaN and inf are left to the exact check, which names them
    if bound is not None:
        assert peak <= bound <= peak * n**0.5 * 1.01 + 2.0**-62  # the absolute term covers flushed squares


def test_check_parameter_decides_as_the_exact_pass_does():
    from rewrite.errors import NonFiniteError
    from rewrite.params import check_parameter

    ok = torch.randn(64, 8, 3, 3)
    assert check_parameter(ok, ok.dtype, "w") >= float(ok.abs().max())
    for bad in (float("nan"), float("inf"), 1e30):  # 1e30: finite, but within 2^32 of float32's largest
        t = ok.clone()
        t[3, 2, 1, 0] = bad
        with pytest.raises(NonFiniteError):
            check_parameter(t, t.dtype, "w")
    strided = ok.transpose(0, 1)  # not dense: the exact pass, as before
    assert check_parameter(strided, strided.dtype, "w") == float(ok.abs().max())


def test_a_remembered_bound_serves_only_the_unedited_fresh_result():
    from rewrite.errors import NonFiniteError
    from rewrite.params import _FRESH_BOUNDS, cast_like, check_parameter

    out = cast_like(torch.randn(10, dtype=torch.float64), torch.zeros(1))
    assert id(out) in _FRESH_BOUNDS and check_parameter(out, out.dtype, "w") >= float(out.abs().max())
    out[3] = float("nan")  # an edit in place bumps the version: the tensor is checked again
    with pytest.raises(NonFiniteError):
        check_parameter(out, out.dtype, "w")
    key = id(out)
    del out
    assert key not in _FRESH_BOUNDS  # the entry goes with its tensor
    own = torch.randn(10)
    check_parameter(own, own.dtype, "w")
    assert id(own) not in _FRESH_BOUNDS  # a model's own tensor is never entered


def test_the_written_back_tree_keeps_the_model_mode_and_a_field_named_child(monkeypatch):
    import torch.fx as fx
    from rewrite.frontends import fx_emit

    torchvision = pytest.importorskip("torchvision")
    model = randomize_bn(torchvision.models.resnet18().eval(), seed=0)
    x = torch.randn(1, 3, 64, 64)
    out = rewrite.apply(model, ["fold_bn"])
    assert not any(m.training for m in out.modules())  # fx's own copy left its new containers in training mode
    with monkeypatch.context() as patch:  # fx's copy of the attributes the graph names, as before
        patch.setattr(fx_emit, "_adopt", lambda tree, graph, name: fx.GraphModule(tree, graph, class_name=name))
        copied = rewrite.apply(model, ["fold_bn"])
    assert list(out.state_dict()) == list(copied.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(out.state_dict().values(), copied.state_dict().values()))
    assert out.code == copied.code and torch.equal(out(x), copied(x))

    class Named(nn.Module):  # a child whose name is a field every GraphModule instance has
        def __init__(self):
            super().__init__()
            self.meta = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))

        def forward(self, x):
            return self.meta(x).relu()

    named = randomize_bn(Named().eval(), seed=1)
    before = {k: v.clone() for k, v in named.state_dict().items()}
    for given in ({}, {"example_inputs": torch.randn(1, 3, 8, 8)}):  # the shape pass built one too (a TypeError)
        with pytest.raises(rewrite.RewriteError, match="module 'meta'.*name of a field or method every GraphModule"):
            rewrite.apply(named, ["fold_bn"], **given)
    assert all(torch.equal(v, named.state_dict()[k]) for k, v in before.items())


def test_the_terms_of_a_sum_are_freed_without_the_collector():
    import gc
    import sys
    import weakref

    from rewrite.frontends.fx import import_module

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            return self.a(x) + self.b(x) + self.bn(x)

    rewrite.apply(nn.Sequential(nn.Conv2d(1, 1, 1)), ["fuse_branches"])  # loads the built-in passes
    terms = sys.modules["rewrite.passes.fuse_branches.branch_terms"]
    graph = import_module(randomize_bn(Block().eval(), seed=0))
    add = [n for n in graph.nodes if n.kind == "add"][-1]
    layout, dtype = terms.find_layout(add.output)
    enabled = gc.isenabled()
    gc.disable()
    try:
        expansion = terms.expand(graph, add.output, layout, dtype)
        assert len(expansion.terms) == 3
        ref = weakref.ref(expansion)
        del expansion
        assert ref() is None  # freed by reference counting: no cycle holds it (and the BN's affine tensors)
    finally:
        if enabled:
            gc.enable()


def test_the_adopted_tree_keeps_plain_attributes_a_node_names():
    import torch.fx as fx
    from torch.utils import _pytree as pytree

    from rewrite.frontends.fx_emit import _adopt
    from rewrite.frontends.fx_graph import WeaklyOwnedGraph

    tree = nn.Module()
    tree.conv = nn.Conv2d(2, 2, 1)
    tree.spec = pytree.tree_flatten((1, 2))[1]  # not a module, parameter or buffer: kept in __dict__
    tree.training = False
    graph = WeaklyOwnedGraph()
    x = graph.placeholder("x")
    graph.get_attr("spec")
    graph.output(graph.call_module("conv", (x,)))
    gm = _adopt(tree, graph, "Net")
    assert gm.spec is tree.spec and gm.conv is tree.conv and not gm.training and type(gm).__name__ == "Net"
    inp = torch.randn(1, 2, 3, 3)
    assert torch.equal(gm(inp), tree.conv(inp))


def test_a_child_named_like_a_graphmodule_method_is_refused_and_mixed_modes_are_kept():
    class Coded(nn.Module):  # `self.code` of the output would be GraphModule's generated source, not the child
        def __init__(self):
            super().__init__()
            self.code = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))

        def forward(self, x):
            return self.code(x)

    with pytest.raises(rewrite.RewriteError, match="module 'code'.*field or method every GraphModule has"):
        rewrite.apply(randomize_bn(Coded().eval(), seed=0), ["fold_bn"])

    model = nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), nn.ReLU())
    model = randomize_bn(model, seed=0).eval()
    model[0].train()
    model[0][1].eval()  # a container in training mode whose BN folds: its stand-in keeps that mode
    out = rewrite.apply(model, ["fold_bn"])
    assert out.get_submodule("0").training and not out.training and not out.get_submodule("1").training


def test_global_registration_hooks_see_the_written_back_attributes():
    from torch.nn.modules import module as module_impl

    import torch.fx as fx

    seen = []

    def on_module(parent, name, value):
        if isinstance(parent, fx.GraphModule):
            seen.append(name)

    handle = module_impl.register_module_module_registration_hook(on_module)
    try:
        model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval(), seed=0)
        out = rewrite.apply(model, ["fold_bn"])
    finally:
        handle.remove()
    assert seen == ["0"]  # the output's conv was registered on it through setattr, as fx's own copy does
    x = torch.randn(1, 3, 8, 8)
    assert torch.allclose(out(x), model(x), atol=1e-5)
