"""fx tracing's internal shortcuts (fx_internals.py: a kwargs dict converted directly, timm's BatchNormAct2d
batch_norm recorded directly) record exactly the graph fx's own path records."""
import hashlib

import pytest
import torch
import torch.fx as fx
import torchvision

from rewrite.frontends import fx_internals
from rewrite.frontends.fx_trace import trace

timm = pytest.importorskip("timm")

TORCHVISION = ["resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "regnet_x_400mf",
               "shufflenet_v2_x0_5", "squeezenet1_0", "densenet121", "convnext_tiny", "vgg11_bn", "mnasnet0_5"]
TIMM = ["repvgg_a0", "mobileone_s0", "repvit_m1", "repghostnet_100", "fastvit_t8", "efficientnet_b0", "resnet18d",
        "regnety_002", "mobilenetv3_small_050", "ese_vovnet19b_dw", "cspresnet50", "ghostnet_100"]


def _model(source: str, name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if source == "tv":
        return getattr(torchvision.models, name)().eval()
    return timm.create_model(name).eval()


def _record(graph: fx.Graph) -> tuple:
    """The generated code and every node's name, op, target, arguments (nodes by name), kwargs and meta."""
    def name_of(a):
        return ("node", a.name) if isinstance(a, fx.Node) else a
    nodes = [(n.name, n.op, n.target, fx.node.map_aggregate(n.args, name_of),
              fx.node.map_aggregate(n.kwargs, name_of), dict(n.meta)) for n in graph.nodes]
    return graph.python_code("self").src, nodes


def _trace_with(model, enabled: bool, **kwargs) -> fx.Graph:
    saved = fx_internals.enabled
    fx_internals.enabled = enabled
    try:
        return trace(model, **kwargs)
    finally:
        fx_internals.enabled = saved


@pytest.mark.parametrize("source,name", [("tv", n) for n in TORCHVISION] + [("timm", n) for n in TIMM])
def test_shortcut_graph_is_fx_graph(source, name):
    model = _model(source, name)
    general = _trace_with(model, False)
    fast = _trace_with(model, True)
    assert _record(fast) == _record(general)
    # and the timm trace shortcuts' own switch does not change what the internal shortcuts record
    assert _record(_trace_with(model, True, shortcuts=False)) == _record(_trace_with(model, False, shortcuts=False))


def test_the_sources_are_known_here():
    # torch 2.14.1 is pinned for the tests: the shortcuts must be on, or the test above compares fx with fx
    assert torch.__version__.startswith("2.14.1")
    assert fx_internals.shortcuts_valid()


def test_an_unknown_source_turns_the_shortcuts_off(monkeypatch):
    key = "torch.fx.proxy._create_arg_dict"
    monkeypatch.setitem(fx_internals._KNOWN, key, hashlib.sha256(b"another torch").hexdigest())
    fx_internals._sources_known.cache_clear()
    try:
        assert not fx_internals.shortcuts_valid()
        model = _model("timm", "repvgg_a0")
        assert _record(trace(model)) == _record(_trace_with(model, False))
    finally:
        monkeypatch.undo()
        fx_internals._sources_known.cache_clear()
    assert fx_internals.shortcuts_valid()


def test_batch_norm_under_a_torch_function_mode_goes_through_the_mode():
    seen = []

    class Mode(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    model = _model("timm", "efficientnet_b0")  # its norm layers apply SiLU: traced through F.batch_norm
    with Mode():
        graph = trace(model)
    assert torch.nn.functional.batch_norm in seen  # the direct record would skip the mode
    assert _record(graph) == _record(_trace_with(model, False))


def test_kwargs_with_a_non_string_key_take_fx_path():
    from rewrite.frontends.fx_trace import _Tracer

    class Keyed(torch.nn.Module):
        def forward(self, x):
            return torch.add(x, 1, **{"alpha": 2})

    assert [n.kwargs for n in trace(Keyed()).nodes if n.op == "call_function"] == [{"alpha": 2}]
    t = _Tracer()
    t.graph, t.root, t.tensor_attrs = fx.Graph(), torch.nn.Module(), {}
    p = t.create_proxy("placeholder", "x", (), {})
    with pytest.raises(RuntimeError):  # fx's own check refuses a proxy in a key
        t.create_arg({p: 1})
    assert t.create_arg({1: p}) == {1: p.node}


class _OddArguments(torch.nn.Module):
    def forward(self, x):
        y = x.reshape(torch.Size([2, -1]))  # a torch.Size argument: not a plain tuple
        return y[:, 1:3] + torch.add(y[:, ::2].sum(), 1, alpha=2)


def test_node_creation_direct_and_through_fx(monkeypatch):
    from torch.fx.proxy import TracerBase

    calls = []
    fx_path = TracerBase.create_node
    assert fx_internals.shortcuts_valid()  # decided (and cached) before fx's function is wrapped below

    def counted(self, *args, **kwargs):
        calls.append(args[0])
        return fx_path(self, *args, **kwargs)

    monkeypatch.setattr(TracerBase, "create_node", counted)
    model = _model("timm", "mobileone_s0")
    fast = _trace_with(model, True)
    assert calls == []  # every node of a timm model is created directly ...
    assert len(_trace_with(model, False).nodes) == len(fast.nodes) == len(calls)  # ... or through fx's path
    odd = _OddArguments()
    assert _record(_trace_with(odd, True)) == _record(_trace_with(odd, False))
    assert "call_method" in calls  # the reshape, with its torch.Size, took fx's path


def test_a_debug_log_of_node_creation_takes_fx_path():
    import logging

    from torch.fx.proxy import log

    model = _model("tv", "resnet18")
    reference = _record(_trace_with(model, False))
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    level, handler = log.level, Keep()
    log.setLevel(logging.DEBUG)
    log.addHandler(handler)
    try:
        graph = _trace_with(model, True)
    finally:
        log.setLevel(level)
        log.removeHandler(handler)
    assert _record(graph) == reference
    assert len([r for r in records if r.startswith("create_node")]) == len(graph.nodes)  # fx's log, node by node
