"""Tracing with shortcuts (rewrite/frontends/trace_shortcuts.py) records the full trace less its assertions, and a
norm layer that computes only a batch norm as one call of it."""
import operator

import pytest
import torch
import torch.fx as fx

from rewrite.frontends.fx_import import _assertion_only
from rewrite.frontends.fx_trace import trace
from rewrite.frontends.trace_shortcuts import Shortcuts
from rewrite.testing import randomize_bn

timm = pytest.importorskip("timm")


def _signature(graph: fx.Graph, dropped: set) -> list[tuple]:
    """Each node as (name, op, target, args, kwargs), arguments by name: what the import reads."""
    def name_of(a):
        return a.name if isinstance(a, fx.Node) else a
    return [(n.name, n.op, n.target, fx.node.map_aggregate(n.args, name_of), fx.node.map_aggregate(n.kwargs, name_of))
            for n in graph.nodes if n not in dropped]


def _dead_assertion_feeders(graph: fx.Graph) -> set:
    """The assertions, the pure calls only they read (what the import skips), and the `x.ndim` read
    for their messages, which nothing reads (what the import erases as dead code)."""
    dropped = _assertion_only(graph)
    return dropped | {n for n in graph.nodes if not n.users and n.op == "call_function" and n.target is getattr}


def _ir(graph) -> list[tuple]:
    """The imported IR, names and identities aside: each node's kind, attributes, parameters (their bytes) and
    producers."""
    index = {}
    rows = []
    for node in graph.nodes:
        if node.kind == "identity":  # an nn.Identity call (the full trace records a norm layer's drop and act)
            index[id(node.output)] = index.get(id(node.inputs[0]), node.inputs[0].name)
            continue
        index[id(node.output)] = len(rows)
        rows.append((node.kind, repr(sorted(node.attrs.items())), sorted((k, _value(v)) for k, v in node.params.items()),
                     [index.get(id(v), v.name) for v in node.inputs]))
    return rows


def _value(t) -> tuple:
    if not isinstance(t, torch.Tensor):
        return (repr(t),)
    return t.dtype, tuple(t.shape), t.detach().reshape(-1).contiguous().view(torch.uint8).tolist() if t.numel() else ()


def _without_leaves(monkeypatch):
    monkeypatch.setattr(Shortcuts, "is_leaf", lambda self, m: False)


@pytest.mark.parametrize("name", ["mobileone_s0", "repvgg_a0", "efficientnet_b0", "repghostnet_050"])
def test_shortcut_trace_is_the_full_trace_without_assertions(name, monkeypatch):
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    full = trace(model, shortcuts=False)
    _without_leaves(monkeypatch)
    short = trace(model)
    asserts = sum(1 for n in full.nodes if n.target is torch._assert)
    assert asserts > 0  # the model has the assertions the shortcut leaves out
    assert not any(n.target is torch._assert for n in short.nodes)
    assert len(short.nodes) < len(full.nodes)
    assert _signature(short, set()) == _signature(full, _dead_assertion_feeders(full))


@pytest.mark.parametrize("name", ["mobileone_s0", "repvgg_a0", "efficientnet_b0", "mobilenetv3_small_050", "fastvit_t8"])
def test_a_norm_layer_without_activation_is_one_batch_norm_call(name, monkeypatch):
    from rewrite.frontends.fx import import_captured

    torch.manual_seed(0)
    model = randomize_bn(timm.create_model(name).eval(), seed=0)
    leafed = trace(model)
    leaves = [n for n in leafed.nodes if n.op == "call_module" and type(model.get_submodule(n.target)).__name__
              == "BatchNormAct2d"]
    assert leaves and all(type(model.get_submodule(n.target).act) is torch.nn.Identity for n in leaves)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():  # the graph alone computes the model: calling such a layer is its batch norm
        assert torch.equal(fx.GraphModule(model, leafed)(x), model(x))
    with_leaves = import_captured(model, leafed, (), "m")
    _without_leaves(monkeypatch)
    traced = trace(model)
    assert len(leafed.nodes) < len(traced.nodes) - 4 * len(leaves)
    # the import reads each as the batch norm the full trace records: the same IR, node for node
    assert _ir(with_leaves) == _ir(import_captured(model, traced, (), "m"))
    labels = {n.label for n in with_leaves.nodes if n.kind == "batch_norm"}
    assert {n.target for n in leaves} <= labels  # and reports name it by its module path


def test_a_norm_layer_is_a_leaf_only_when_its_call_is_exactly_a_batch_norm():
    from timm.layers import BatchNormAct2d

    def leaf(m):
        return Shortcuts().is_leaf(m)

    plain = BatchNormAct2d(4, apply_act=False).eval()
    assert leaf(plain)
    assert not leaf(BatchNormAct2d(4).eval())  # applies ReLU
    assert not leaf(BatchNormAct2d(4, apply_act=False).train())  # updates its statistics
    assert not leaf(BatchNormAct2d(4, apply_act=False, drop_layer=torch.nn.Dropout).eval())
    assert not leaf(BatchNormAct2d(4, apply_act=False, track_running_stats=False).eval())  # batch statistics
    for hooked in (plain, plain.act, plain.drop):
        handle = hooked.register_forward_hook(lambda *a: None)
        assert not leaf(plain)
        handle.remove()
    assert leaf(plain)
    plain.act = torch.nn.Sequential()
    assert not leaf(plain)


def test_no_shortcut_in_training_mode_or_with_hooks():
    model = timm.create_model("repvgg_a0").eval()
    bn = next(m for m in model.modules() if type(m).__name__ == "BatchNormAct2d")
    assert Shortcuts().forward_for(bn) is not None
    assert Shortcuts().forward_for(bn.train()) is None  # its training branch updates a buffer in place
    bn.eval()
    handle = bn.register_forward_hook(lambda *a: None)
    try:
        graph = trace(model)
    finally:
        handle.remove()
    assert sum(1 for n in graph.nodes if n.target is torch._assert) == 1


def test_a_subclass_with_its_own_forward_is_traced_as_written():
    from timm.layers import BatchNormAct2d

    class Doubled(BatchNormAct2d):
        def forward(self, x):
            return super().forward(x) * 2

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), Doubled(4)).eval()
    graph = trace(model)
    assert any(n.target is operator.mul for n in graph.nodes)
    # super().forward is the stock one, but it is reached from the subclass: traced as written
    assert sum(1 for n in graph.nodes if n.target is torch._assert) == 1


def test_a_forward_whose_source_changed_gets_no_shortcut(monkeypatch):
    from timm.layers import BatchNormAct2d

    stock = BatchNormAct2d.forward
    assert Shortcuts().forms  # the installed timm's forward is the known one

    def changed(self, x):  # what another timm release might write: same name, other computation
        return stock(self, x) + 1

    monkeypatch.setattr(BatchNormAct2d, "forward", changed)
    assert not Shortcuts().forms
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), BatchNormAct2d(4)).eval()
    graph = trace(model)
    assert any(n.target is operator.add for n in graph.nodes)  # the changed forward, traced as written


def test_a_forward_set_on_the_instance_is_traced_not_the_stock_one():
    import types

    from timm.layers import BatchNormAct2d

    import rewrite

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), BatchNormAct2d(4)).eval()
    stock = model[1].forward
    model[1].forward = types.MethodType(lambda self, x: stock(x) * 2 + 1, model[1])  # an adapter's injection
    x = torch.randn(1, 3, 5, 5)
    out = rewrite.apply(model, ["fold_bn"])
    assert torch.allclose(out(x), model(x), atol=1e-5)


def test_a_stock_leaf_with_a_patched_forward_is_not_read_as_stock():
    import types

    import rewrite

    conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    stock = conv.forward
    conv.forward = types.MethodType(lambda self, x: stock(x) * 3.0, conv)  # on the instance
    model = torch.nn.Sequential(conv, torch.nn.BatchNorm2d(4)).eval()
    x = torch.randn(1, 3, 6, 6)
    assert torch.allclose(rewrite.apply(model, ["fold_bn"], example_inputs=(x,))(x), model(x), atol=1e-5)

    class Leaf(torch.nn.Conv2d):
        pass

    model = torch.nn.Sequential(Leaf(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4)).eval()
    rewrite.apply(model, ["fold_bn"], leaf_modules=[Leaf])  # decided once for Leaf's stock forward ...
    Leaf.forward = lambda self, x: torch.nn.Conv2d.forward(self, x) * 3.0  # ... then the class is patched
    assert torch.allclose(rewrite.apply(model, ["fold_bn"], leaf_modules=[Leaf])(x), model(x), atol=1e-5)
