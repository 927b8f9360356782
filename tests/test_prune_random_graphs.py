"""Hypothesis-generated CNNs mixing every hazard: zero-channel pruning must be exact for any set of units and for
whatever the selector picks, and the pruned graph must cost what the plan predicted."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prune_checks import assert_zero_exact
from slimc import ops
from slimc.ir import Graph, Node, TensorType
from slimc.passes.prune.dependency import analyze
from slimc.passes.prune.importance import PruneConfig, select


class Builder:
    """Appends typed nodes and random weights; `cur` is the NCHW value the next block reads."""

    def __init__(self, rng: np.random.Generator, channels: int, hw: int) -> None:
        self.rng = rng
        self.nodes: list[Node] = []
        self.weights: dict[str, np.ndarray] = {}
        self.types: dict[str, TensorType] = {"x": TensorType(("N", channels, hw, hw))}
        self.cur = "x"

    @property
    def c(self) -> int:
        return int(self.types[self.cur].shape[1])

    @property
    def hw(self) -> int:
        return int(self.types[self.cur].shape[2])

    def param(self, shape: tuple[int, ...], kind: str = "w") -> str:
        name = f"p{len(self.weights)}"
        if kind == "var":
            w = self.rng.uniform(0.5, 1.5, shape)
        else:
            fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
            w = self.rng.standard_normal(shape) / np.sqrt(fan_in)
        self.weights[name] = w.astype(np.float32)
        self.types[name] = TensorType(shape)
        return name

    def op(self, op: str, inputs: list[str], **attrs) -> str:
        name = f"n{len(self.nodes)}"
        n = ops.make_node(name, op, inputs, [self.types[i] for i in inputs], attrs)
        self.nodes.append(n)
        self.types.update(zip(n.outputs, n.out_types))
        return name if len(n.outputs) == 1 else n.outputs  # type: ignore[return-value]

    def conv(self, x: str, cout: int, k: int = 1, groups: int = 1, act: str = "none", bias: bool = False) -> str:
        cin = int(self.types[x].shape[1])
        ins = [x, self.param((cout, cin // groups, k, k))] + ([self.param((cout,))] if bias else [])
        return self.op("conv2d", ins, padding=(k // 2,) * 4, groups=groups, act=act)

    def graph(self, out: str) -> Graph:
        return Graph.from_weights("random", [("x", self.types["x"])], [out], self.nodes, self.weights)


BLOCKS = ("conv", "bn_act", "depthwise", "grouped", "residual", "concat", "split", "slice", "se", "shuffle", "pool",
          "mlp_nhwc", "layer_scale", "reshape_keep", "raw_shuffle")


def add_block(b: Builder, kind: str, draw) -> None:
    c = b.c
    small = st.integers(1, 6)
    if kind == "conv":
        b.cur = b.conv(b.cur, draw(st.integers(2, 8)), draw(st.sampled_from([1, 3])),
                       act=draw(st.sampled_from(["none", "relu", "relu6", "silu"])), bias=draw(st.booleans()))
    elif kind == "bn_act":
        y = b.op("batch_norm", [b.cur, b.param((c,)), b.param((c,)), b.param((c,)), b.param((c,), "var")])
        b.cur = b.op(draw(st.sampled_from(["relu", "hardswish", "sigmoid", "gelu"])), [y])
    elif kind == "depthwise":
        b.cur = b.conv(b.cur, c * draw(st.sampled_from([1, 2])), 3, groups=c, bias=draw(st.booleans()))
    elif kind == "grouped":
        divisors = [g for g in range(2, c + 1) if c % g == 0 and g < c]
        if divisors:
            g = draw(st.sampled_from(divisors))
            b.cur = b.conv(b.cur, g * draw(st.integers(1, 3)), 3, groups=g, act="relu")
    elif kind == "residual":
        h = b.conv(b.cur, draw(small), 3, act="relu")
        b.cur = b.op("add", [b.conv(h, c, 1, bias=True), b.cur])
    elif kind == "concat":
        b.cur = b.op("concat", [b.cur, b.conv(b.cur, draw(small), 1, act="relu")], axis=1)
    elif kind == "split" and c >= 2:
        s = draw(st.integers(1, c - 1))
        left, right = b.op("split", [b.cur], axis=1, sizes=(s, c - s))
        b.cur = b.op("concat", [b.conv(right, draw(small), 1, act="relu"), left], axis=1)
    elif kind == "slice" and c >= 2:
        start = draw(st.integers(0, c - 2))
        b.cur = b.op("slice", [b.cur], axis=1, start=start, end=draw(st.integers(start + 1, c)))
    elif kind == "se":
        sq = b.conv(b.op("global_avg_pool", [b.cur]), draw(small), 1, act="relu", bias=True)
        gate = b.conv(sq, c, 1, act=draw(st.sampled_from(["sigmoid", "hardsigmoid"])), bias=True)
        b.cur = b.op("mul", [b.cur, gate] if draw(st.booleans()) else [gate, b.cur])
    elif kind == "shuffle" and c % 2 == 0:
        b.cur = b.op("channel_shuffle", [b.cur], groups=2)
    elif kind == "pool" and b.hw >= 4:
        b.cur = b.op(draw(st.sampled_from(["max_pool2d", "avg_pool2d"])), [b.cur], kernel=(2, 2), stride=(2, 2))
    elif kind == "mlp_nhwc":
        t = b.op("transpose", [b.cur], perm=(0, 2, 3, 1))
        hidden = draw(small)
        h = b.op("dense", [t, b.param((hidden, c)), b.param((hidden,))], act="gelu")
        o = b.op("dense", [h, b.param((c, int(b.types[h].shape[3])))])
        b.cur = b.op("add", [b.op("transpose", [o], perm=(0, 3, 1, 2)), b.cur])
    elif kind == "layer_scale":
        b.cur = b.op("mul", [b.param((c, 1, 1)), b.cur])
    elif kind == "reshape_keep":  # [N,C,H,W] -> [N,C,H*W] -> [N,C,H,W]: channels stay whole
        hw = b.hw
        flat = b.op("reshape", [b.cur], shape=(-1, c, hw * hw))
        b.cur = b.op("reshape", [b.op("relu", [flat])], shape=(0, c, hw, hw))
    elif kind == "raw_shuffle" and c % 2 == 0:  # shuffle spelled as reshape/transpose/reshape: blocks
        hw = b.hw
        v = b.op("reshape", [b.cur], shape=(-1, 2, c // 2, hw, hw))
        b.cur = b.op("reshape", [b.op("transpose", [v], perm=(0, 2, 1, 3, 4))], shape=(-1, c, hw, hw))


@st.composite
def cnns(draw) -> Graph:
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    b = Builder(rng, draw(st.integers(2, 4)), draw(st.sampled_from([4, 6])))
    b.cur = b.conv(b.cur, draw(st.integers(2, 8)), 3, act="relu")
    for kind in draw(st.lists(st.sampled_from(BLOCKS), min_size=1, max_size=7)):
        add_block(b, kind, draw)
    if draw(st.booleans()):
        feats = b.op("flatten", [b.op("global_avg_pool", [b.cur])])
    else:
        feats = b.op("flatten", [b.cur])
    n = int(b.types[feats].shape[1])
    hidden = b.op("dense", [feats, b.param((draw(st.integers(2, 6)), n))], act="relu")
    out = b.op("dense", [hidden, b.param((3, int(b.types[hidden].shape[1]))), b.param((3,))])
    g = b.graph(out)
    g.verify()
    return g


def _some_units(a, rng: np.random.Generator) -> np.ndarray:
    """A random set of prunable units that leaves every group at least one unit."""
    pruned = np.zeros(a.num_units, bool)
    for gr in a.groups:
        free = gr.prunable_units
        if len(free) and not gr.is_blocked:
            take = free[rng.random(len(free)) < 0.5]
            if len(take) == len(gr.units):
                take = take[1:]
            pruned[take] = True
    return pruned


SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(cnns(), st.integers(0, 2**16))
def test_zero_channel_pruning_of_any_units_is_exact(g, seed):
    a = analyze(g)
    pruned = _some_units(a, np.random.default_rng(seed))
    if pruned.any():
        assert_zero_exact(g, a, pruned, control=False)


@SETTINGS
@given(cnns(), st.sampled_from(["l1", "l2", "random"]), st.sampled_from(["global", "local"]),
       st.sampled_from([1, 2, 4]), st.floats(0.1, 0.7))
def test_selected_plans_are_exact_on_masked_models(g, criterion, scope, round_to, ratio):
    a = analyze(g)
    sel = select(g, a, PruneConfig(ratio=ratio, criterion=criterion, scope=scope, round_to=round_to))
    for gr in a.groups:
        k = int(sel.pruned[gr.units].sum())
        assert not sel.pruned[gr.units[gr.blocked]].any()
        if k:
            remaining = gr.channels - int(gr.widths[sel.pruned[gr.units]].sum())
            assert remaining >= 1 and (round_to == 1 or remaining % round_to == 0)
    if sel.pruned.any():
        assert_zero_exact(g, a, sel.pruned, control=False)
