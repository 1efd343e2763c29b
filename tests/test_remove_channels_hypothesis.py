"""Property tests of remove_channels on random plain, residual and concat networks with random dead channels.

Each test builds a network, kills random BN channels (gamma 0, beta zero or not) and zeroes random
filters, then states independently which channels must go: a dead channel goes iff every conv /
linear reading it can fold its constant (no zero padding, or the constant is 0 after ReLU), and at
least one channel of each layer stays. The constants come from forward hooks, not from the pass.
check_pass asserts equivalence (relative 1e-5), idempotence and an untouched input.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from hypothesis import given, settings, strategies as st

from rewrite.testing import check_pass, randomize_bn

def layer_spec(draw, cin, cout):
    k = draw(st.sampled_from([1, 3]))
    pad = draw(st.sampled_from([0, 1])) if k == 3 else 0
    mode = draw(st.sampled_from(["zeros", "reflect"])) if pad else "zeros"
    dead = draw(st.lists(st.booleans(), min_size=cout, max_size=cout))
    zero_filters = draw(st.lists(st.sampled_from([False, False, False, True]), min_size=cout, max_size=cout))
    return dict(cin=cin, cout=cout, k=k, pad=pad, mode=mode, dead=dead, zero=zero_filters)


def same_size(spec):
    """A residual branch must keep the spatial size: a 3x3 is padded by 1 (zeros or reflect)."""
    return dict(spec, pad=1) if spec["k"] == 3 else spec


def conv_of(spec) -> nn.Conv2d:
    return nn.Conv2d(spec["cin"], spec["cout"], spec["k"], padding=spec["pad"], padding_mode=spec["mode"])


def zero_padded(spec) -> bool:
    return spec["pad"] > 0 and spec["mode"] == "zeros"


def make_dead(conv: nn.Conv2d, bn: nn.BatchNorm2d, spec, zero_beta: bool) -> None:
    for c, (dead, zero) in enumerate(zip(spec["dead"], spec["zero"])):
        if dead:
            bn.weight[c] = 0
            if zero_beta:
                bn.bias[c] = 0
        if zero:
            conv.weight[c] = 0


def numerically_constant(channel: torch.Tensor) -> bool:
    return bool(torch.all(channel == channel.flatten()[0]))


def all_inputs_constant(consts: dict[int, float], width: int, reader_spec) -> bool:
    """Every input channel of a layer is constant, and the layer sees the same constant everywhere."""
    return len(consts) == width and (not zero_padded(reader_spec) or all(v == 0 for v in consts.values()))


def constants(activation: torch.Tensor, spec, inputs_constant: bool = False) -> dict[int, float]:
    """The constant of each channel dead by construction, read from the activation. When every input
    channel of the layer is a constant it sees whole, every output channel that is numerically
    constant is constant for every input."""
    out = {}
    for c, (dead, zero) in enumerate(zip(spec["dead"], spec["zero"])):
        channel = activation[:, c]
        if dead or zero:
            assert numerically_constant(channel), "a dead channel is not constant"
        if dead or zero or (inputs_constant and numerically_constant(channel)):
            out[c] = float(channel.flatten()[0])
    return out


def removable(consts: dict[int, float], readers_zero_pad: list[bool], width: int) -> list[int]:
    """Channels that go: constant, and foldable by every reader; at least one channel stays."""
    gone = [c for c, v in consts.items() if v == 0 or not any(readers_zero_pad)]
    if len(gone) == width:
        gone.remove(0)
    return sorted(gone)


def kept(width: int, gone: list[int]) -> torch.Tensor:
    return torch.tensor([c for c in range(width) if c not in gone], dtype=torch.long)


class Recorder:
    """Each module's output on one run, through forward hooks that are removed after it: a hooked module runs
    code of its own around its call, so the rewrite would keep it as it is."""

    def __init__(self, modules):
        self.out = {}
        self.handles = [m.register_forward_hook(lambda mod, inp, o, name=name: self.out.__setitem__(name, o))
                        for name, m in modules.items()]

    def run(self, model, x):
        model(x)
        for handle in self.handles:
            handle.remove()


# -- plain ------------------------------------------------------------------------------------------
@st.composite
def plain_nets(draw):
    depth = draw(st.integers(1, 3))
    widths = [3] + [draw(st.integers(2, 6)) for _ in range(depth)]
    specs = [layer_spec(draw, widths[i], widths[i + 1]) for i in range(depth)]
    return specs, draw(st.sampled_from(["conv", "linear"])), draw(st.booleans()), draw(st.integers(0, 2**16))


@settings(max_examples=15, deadline=None)
@given(plain_nets())
@torch.no_grad()
def test_plain_networks(net):
    specs, head, zero_beta, seed = net
    torch.manual_seed(seed)
    layers = []
    for s in specs:
        layers += [conv_of(s), nn.BatchNorm2d(s["cout"]), nn.ReLU()]
    last = specs[-1]["cout"]
    layers += [nn.Conv2d(last, 2, 1)] if head == "conv" else [nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4 * last, 2)]
    m = nn.Sequential(*layers).eval()
    randomize_bn(m, seed)
    for j, s in enumerate(specs):
        make_dead(m[3 * j], m[3 * j + 1], s, zero_beta)
    x = torch.randn(2, 3, 9, 9)
    rec = Recorder({j: m[3 * j + 2] for j in range(len(specs))})
    rec.run(m, x)
    gone, consts = [], {}
    for j, s in enumerate(specs):
        reader_pads = [zero_padded(specs[j + 1])] if j + 1 < len(specs) else [False]
        consts = constants(rec.out[j], s, inputs_constant=j > 0 and all_inputs_constant(consts, specs[j - 1]["cout"], s))
        gone.append(removable(consts, reader_pads, s["cout"]))
    out = check_pass("remove_channels", m, x, expect_rewrite=any(gone)).model
    previous = torch.arange(3)
    for j, s in enumerate(specs):
        keep = kept(s["cout"], gone[j])
        expected = m[3 * j].weight.index_select(0, keep).index_select(1, previous)
        assert torch.equal(out.get_submodule(str(3 * j)).weight, expected), f"layer {j}: wrong channels kept"
        previous = keep
    head_in = out.get_submodule(str(3 * len(specs))) if head == "conv" else out.get_submodule(str(3 * len(specs) + 2))
    assert head_in.weight.shape[1] == len(previous) * (1 if head == "conv" else 4)


# -- residual -------------------------------------------------------------------------------------------
class ResNetish(nn.Module):
    def __init__(self, width, inner_specs):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 1), nn.BatchNorm2d(width), nn.ReLU())
        self.blocks = nn.ModuleList()
        for s1, s2 in inner_specs:
            self.blocks.append(nn.ModuleDict(dict(conv1=conv_of(s1), bn1=nn.BatchNorm2d(s1["cout"]), relu1=nn.ReLU(),
                                                  conv2=conv_of(s2), bn2=nn.BatchNorm2d(width), relu2=nn.ReLU())))
        self.fc = nn.Linear(width * 4, 2)

    def forward(self, x):
        x = self.stem(x)
        for b in self.blocks:
            x = b["relu2"](b["bn2"](b["conv2"](b["relu1"](b["bn1"](b["conv1"](x))))) + x)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 2), 1))


@st.composite
def residual_nets(draw):
    width = draw(st.integers(2, 5))
    blocks = draw(st.integers(1, 3))
    everywhere = draw(st.lists(st.booleans(), min_size=width, max_size=width))  # dead in every stream BN
    stream = []
    for _ in range(blocks + 1):  # stem and each bn2: dead where `everywhere`, sometimes elsewhere too
        extra = draw(st.lists(st.sampled_from([False, False, True]), min_size=width, max_size=width))
        stream.append([e or x for e, x in zip(everywhere, extra)])
    inner = []
    for _ in range(blocks):
        w = draw(st.integers(2, 5))
        s1, s2 = same_size(layer_spec(draw, width, w)), same_size(layer_spec(draw, w, width))
        inner.append((s1, dict(s2, dead=[False] * width, zero=[False] * width)))
    return width, stream, inner, draw(st.booleans()), draw(st.integers(0, 2**16))


@settings(max_examples=15, deadline=None)
@given(residual_nets())
@torch.no_grad()
def test_residual_networks(net):
    width, stream, inner, zero_beta, seed = net
    torch.manual_seed(seed)
    m = ResNetish(width, inner).eval()
    randomize_bn(m, seed)
    stem_spec = dict(dead=stream[0], zero=[False] * width)
    make_dead(m.stem[0], m.stem[1], stem_spec, zero_beta)
    for b, (s1, _), dead2 in zip(m.blocks, inner, stream[1:]):
        make_dead(b["conv1"], b["bn1"], s1, zero_beta)
        make_dead(b["conv2"], b["bn2"], dict(dead=dead2, zero=[False] * width), zero_beta)
    x = torch.randn(2, 3, 8, 8)
    rec = Recorder({"stem": m.stem[2], **{f"x{i}": b["relu2"] for i, b in enumerate(m.blocks)},
                    **{f"h{i}": b["relu1"] for i, b in enumerate(m.blocks)},
                    **{f"y{i}": b["bn2"] for i, b in enumerate(m.blocks)}})
    rec.run(m, x)
    # A stream channel is constant in a block's output if it is in its input and in the block's bn2.
    stream_inputs = [rec.out["stem"]] + [rec.out[f"x{i}"] for i in range(len(inner))]
    x_const = {c for c in range(width) if stream[0][c]}
    inner_consts = []
    for i, (s1, s2) in enumerate(inner):
        x_values = {c: float(stream_inputs[i][:, c].flatten()[0]) for c in x_const}
        h_const = constants(rec.out[f"h{i}"], s1, inputs_constant=all_inputs_constant(x_values, width, s1))
        inner_consts.append(h_const)
        y = rec.out[f"y{i}"]
        y_const = {c for c in range(width) if stream[i + 1][c]
                   or (all_inputs_constant(h_const, s1["cout"], s2) and numerically_constant(y[:, c]))}
        x_const &= y_const
    consts = {}
    for c in range(width):
        if c in x_const:
            values = [float(t[:, c].flatten()[0]) for t in stream_inputs]
            readers = [zero_padded(s1) for s1, _ in inner] + [False]
            if all(v == 0 or not pad for v, pad in zip(values, readers)):
                consts[c] = 0.0  # foldable everywhere
    stream_gone = removable(consts, [False], width)
    inner_gone = [removable(inner_consts[i], [zero_padded(s2)], s1["cout"]) for i, (s1, s2) in enumerate(inner)]
    out = check_pass("remove_channels", m, x, expect_rewrite=bool(stream_gone or any(inner_gone))).model
    sk = kept(width, stream_gone)
    assert torch.equal(out.get_submodule("stem.0").weight, m.stem[0].weight.index_select(0, sk))
    for i, (s1, _) in enumerate(inner):
        ik = kept(s1["cout"], inner_gone[i])
        expected = m.blocks[i]["conv1"].weight.index_select(0, ik).index_select(1, sk)
        assert torch.equal(out.get_submodule(f"blocks.{i}.conv1").weight, expected)
        expected2 = m.blocks[i]["conv2"].weight.index_select(0, sk).index_select(1, ik)
        assert torch.equal(out.get_submodule(f"blocks.{i}.conv2").weight, expected2)
    assert out.get_submodule("fc").weight.shape == (2, len(sk) * 4)


# -- concat ------------------------------------------------------------------------------------------------
class Concatish(nn.Module):
    def __init__(self, s0, sa, sb, sc, twice):
        super().__init__()
        self.stem = nn.Sequential(conv_of(s0), nn.BatchNorm2d(s0["cout"]), nn.ReLU())
        self.a = nn.Sequential(conv_of(sa), nn.BatchNorm2d(sa["cout"]), nn.ReLU())
        self.b = nn.Sequential(conv_of(sb), nn.BatchNorm2d(sb["cout"]), nn.ReLU())
        self.c = nn.Sequential(conv_of(sc), nn.BatchNorm2d(sc["cout"]), nn.ReLU())
        self.fc = nn.Linear(sc["cout"] * 4, 2)
        self.twice = twice

    def forward(self, x):
        x = self.stem(x)
        a = self.a(x)
        y = torch.cat([a, a] if self.twice else [a, self.b(x)], 1)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.c(y), 2), 1))


@st.composite
def concat_nets(draw):
    c0, ca, cb, cc = (draw(st.integers(2, 5)) for _ in range(4))
    twice = draw(st.booleans())
    s0 = layer_spec(draw, 3, c0)
    sa, sb = same_size(layer_spec(draw, c0, ca)), same_size(layer_spec(draw, c0, cb))
    sc = layer_spec(draw, 2 * ca if twice else ca + cb, cc)
    return (s0, sa, sb, sc), twice, draw(st.booleans()), draw(st.integers(0, 2**16))


@settings(max_examples=15, deadline=None)
@given(concat_nets())
@torch.no_grad()
def test_concat_networks(net):
    (s0, sa, sb, sc), twice, zero_beta, seed = net
    torch.manual_seed(seed)
    m = Concatish(s0, sa, sb, sc, twice).eval()
    randomize_bn(m, seed)
    for seq, s in ((m.stem, s0), (m.a, sa), (m.b, sb), (m.c, sc)):
        make_dead(seq[0], seq[1], s, zero_beta)
    x = torch.randn(2, 3, 8, 8)
    rec = Recorder({"stem": m.stem[2], "a": m.a[2], "b": m.b[2], "c": m.c[2]})
    rec.run(m, x)
    stem_readers = [zero_padded(sa)] + ([] if twice else [zero_padded(sb)])
    const0 = constants(rec.out["stem"], s0)
    const_a = constants(rec.out["a"], sa, inputs_constant=all_inputs_constant(const0, s0["cout"], sa))
    const_b = {} if twice else constants(rec.out["b"], sb, inputs_constant=all_inputs_constant(const0, s0["cout"], sb))
    cat_values = list(const_a.values()) + ([] if twice else list(const_b.values()))
    all_cat = len(const_a) == sa["cout"] and (twice or len(const_b) == sb["cout"]) and \
        (not zero_padded(sc) or all(v == 0 for v in cat_values))
    gone0 = removable(const0, stem_readers, s0["cout"])
    gone_a = removable(const_a, [zero_padded(sc)], sa["cout"])
    gone_b = [] if twice else removable(const_b, [zero_padded(sc)], sb["cout"])
    gone_c = removable(constants(rec.out["c"], sc, inputs_constant=all_cat), [False], sc["cout"])
    out = check_pass("remove_channels", m, x, expect_rewrite=bool(gone0 or gone_a or gone_b or gone_c)).model
    k0, ka, kc = kept(s0["cout"], gone0), kept(sa["cout"], gone_a), kept(sc["cout"], gone_c)
    assert torch.equal(out.get_submodule("a.0").weight, m.a[0].weight.index_select(0, ka).index_select(1, k0))
    second = ka if twice else kept(sb["cout"], gone_b)
    cat_keep = torch.cat([ka, second + sa["cout"]])
    assert torch.equal(out.get_submodule("c.0").weight, m.c[0].weight.index_select(0, kc).index_select(1, cat_keep))
    assert out.get_submodule("fc").weight.shape == (2, len(kc) * 4)
