"""Nothing a call of `apply` built stays alive after it returns (the issue: a sweep grew to 12 GB)."""
import gc
import warnings
import weakref

import torch

import rewrite
from rewrite.demo import default_model
from rewrite.ir import Graph, Node


def live(kinds) -> int:
    """Objects of these types the cyclic GC tracks (alive or garbage not yet collected), without collecting."""
    with warnings.catch_warnings():  # isinstance on some torch module objects warns of deprecations
        warnings.simplefilter("ignore")
        return sum(isinstance(o, kinds) for o in gc.get_objects())


def test_repeated_apply_keeps_no_graphs_or_tensors():
    model = default_model()
    x = torch.randn(1, 3, 16, 16)
    rewrite.apply(model, ["fold_bn", "cleanup"], example_inputs=x, verify=True)  # warm caches up
    gc.collect()
    graphs, tensors = live((Graph, Node)), live(torch.Tensor)
    results = []
    for _ in range(6):
        out = rewrite.apply(model, ["fold_bn", "cleanup"], example_inputs=x, verify=True)
        results.append((weakref.ref(out), weakref.ref(next(out.parameters()))))
        del out
    # No gc.collect() here: the IR of every call was freed by apply itself, and a dropped result
    # (a GraphModule, normally a reference cycle with its fx graph) and its weights by reference counting.
    assert live((Graph, Node)) == graphs == 0
    assert live(torch.Tensor) <= tensors
    assert all(module() is None and weight() is None for module, weight in results)


def test_a_result_still_knows_its_graph_module():
    out = rewrite.apply(default_model(), ["fold_bn"], example_inputs=torch.randn(1, 3, 16, 16))
    assert out.graph.owning_module is out
    out.graph.lint()  # checks get_attr targets against the owning module
