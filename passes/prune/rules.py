"""Channel-map rules: for every IR op, which input channels are the same as which output channels (pruning's registry).

A value's channels are the entries along one tracked axis (axis 1 of NCHW tensors, the last axis of channels-last
tensors such as ConvNeXt's after its transposes). A rule looks at one node and says

* which axis of each output carries channels (`out_axes`),
* which channels are one and the same (`links`: removing one means removing the other),
* which channels may not be removed, and why (`blocks`),
* which parameter slices follow which channels (`members`: sliced by `apply`, scored by `importance`),
* whether the node creates new channels (`produces`: conv/dense outputs) or reduces them (`consumes`).

An op with no rule here blocks every channel it touches (see dependency.py), so a new op is safe before it is
understood. A rule may also give a `shrink` function: the attributes the node needs once channels are gone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from slimc.ir import Node, TensorType

#: ("in", operand slot) or ("out", output index)
Port = tuple[str, int]


def IN(slot: int) -> Port:
    return ("in", slot)


def OUT(index: int = 0) -> Port:
    return ("out", index)


@dataclass(frozen=True, eq=False)
class Link:
    """Channels `ia[k]` of port `a` and `ib[k]` of port `b` are the same channel (pruned together)."""

    a: Port
    ia: np.ndarray
    b: Port
    ib: np.ndarray


@dataclass(frozen=True, eq=False)
class Block:
    """Channels `idx` (None: all) of `port` must stay, because of `reason`."""

    port: Port
    reason: str
    idx: np.ndarray | None = None


@dataclass(frozen=True)
class Member:
    """Parameter operand `slot` whose `axis` is indexed by the channels of `port` (channel i <-> slice i)."""

    port: Port
    slot: int
    axis: int
    role: str  # "producer" (output rows), "consumer" (input slices), "bn" (batch-norm scale), "norm", "scale"


@dataclass(frozen=True, eq=False)
class ChannelMap:
    """What one node says about channels; see the module docstring."""

    out_axes: tuple[int | None, ...]
    links: tuple[Link, ...] = ()
    blocks: tuple[Block, ...] = ()
    members: tuple[Member, ...] = ()
    produces: tuple[int, ...] = ()
    consumes: tuple[int, ...] = ()


@dataclass(frozen=True)
class NodeView:
    """A node as its rule sees it: operand types, which operands are parameters, each operand's channel axis."""

    node: Node
    in_types: tuple[TensorType, ...]
    in_axes: tuple[int | None, ...]  # None: a parameter, or a value without tracked channels
    is_param: tuple[bool, ...]

    @property
    def attrs(self) -> Mapping[str, Any]:
        return self.node.attrs

    @property
    def out_types(self) -> tuple[TensorType, ...]:
        return self.node.out_types

    def channels(self, slot: int) -> int:
        """Channel count of operand `slot` (its tracked axis must be set)."""
        return int(self.in_types[slot].shape[self.in_axes[slot]])  # type: ignore[index]


@dataclass(frozen=True)
class Kept:
    """For `shrink`: the kept channel indices of each operand and output (None where channels are not tracked)."""

    inputs: tuple[np.ndarray | None, ...]
    outputs: tuple[np.ndarray | None, ...]
    in_sizes: tuple[int | None, ...]  # channel counts before pruning
    out_sizes: tuple[int | None, ...]


MapFn = Callable[[NodeView], ChannelMap]
ShrinkFn = Callable[[NodeView, Kept], dict[str, Any]]


@dataclass(frozen=True)
class ChannelRule:
    """The registry entry of one op: its channel map, and how its attributes follow pruned channels."""

    map: MapFn
    shrink: ShrinkFn | None = None
    doc: str = ""


CHANNEL_RULES: dict[str, ChannelRule] = {}


def channel_rule(*ops_: str, shrink: ShrinkFn | None = None, doc: str = "") -> Callable[[MapFn], MapFn]:
    """Register the channel map (and optional attribute shrink) of one or more IR ops."""

    def deco(fn: MapFn) -> MapFn:
        for op in ops_:
            if op in CHANNEL_RULES:
                raise ValueError(f"channel rule for {op} registered twice")
            CHANNEL_RULES[op] = ChannelRule(fn, shrink, doc or (fn.__doc__ or "").strip().splitlines()[0])
        return fn

    return deco


# ---- helpers ---------------------------------------------------------------------------------------

def _ar(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.int64)


def default_axis(t: TensorType) -> int | None:
    """The channel axis assumed where nothing says otherwise: 1 (NCHW, [N, features]); none for rank 0/1."""
    return 1 if t.rank >= 2 and isinstance(t.shape[1], int) else None


def same(a: Port, b: Port, n: int) -> Link:
    """Channel i of `a` is channel i of `b`."""
    return Link(a, _ar(n), b, _ar(n))


def blocked_everywhere(v: NodeView, reason: str, out_axes: Sequence[int | None] | None = None) -> ChannelMap:
    """Every channel read or written by the node stays."""
    axes = tuple(out_axes) if out_axes is not None else tuple(default_axis(t) for t in v.out_types)
    blocks = [Block(IN(i), reason) for i, a in enumerate(v.in_axes) if a is not None]
    blocks += [Block(OUT(j), reason) for j, a in enumerate(axes) if a is not None]
    return ChannelMap(axes, blocks=tuple(blocks))


def _constant(v: NodeView) -> ChannelMap:
    return blocked_everywhere(v, "computed from parameters only")


def _passthrough(v: NodeView, slot: int = 0, need_axis: int | None = None, why: str = "") -> ChannelMap:
    """Output channel i is input channel i (per-channel op); optionally only when channels are on `need_axis`."""
    ax = v.in_axes[slot]
    if v.is_param[slot]:
        return _constant(v)
    if ax is None:
        return ChannelMap((None,) * len(v.out_types))
    if need_axis is not None and ax != need_axis:
        return blocked_everywhere(v, why or f"{v.node.op} works on axis {need_axis} but channels are on axis {ax}",
                                  (ax,))
    return ChannelMap((ax,), links=(same(IN(slot), OUT(0), v.channels(slot)),))


# ---- per-channel ops ------------------------------------------------------------------------------

@channel_rule("identity", "dropout", "relu", "relu6", "clip", "hardswish", "hardsigmoid", "sigmoid", "silu", "gelu",
              "tanh", "exp", "sqrt", "neg", "erf")
def _elementwise(v: NodeView) -> ChannelMap:
    """Element-wise: channels pass through."""
    return _passthrough(v)


@channel_rule("max_pool2d", "avg_pool2d", "global_avg_pool", "adaptive_avg_pool2d", "resize")
def _spatial(v: NodeView) -> ChannelMap:
    """Pooling/resizing over H, W of NCHW: channels (axis 1) pass through."""
    return _passthrough(v, need_axis=1, why=f"{v.node.op} works over H, W of NCHW but channels are on axis "
                                            f"{v.in_axes[0]}")


@channel_rule("pad")
def _pad(v: NodeView) -> ChannelMap:
    """Padding: channels pass through unless the channel axis itself is padded."""
    ax, pads, r = v.in_axes[0], v.attrs["pads"], v.in_types[0].rank
    if ax is not None and not v.is_param[0] and (pads[ax] or pads[ax + r]):
        return blocked_everywhere(v, "pad adds channels", (ax,))
    return _passthrough(v)


@channel_rule("batch_norm")
def _batch_norm(v: NodeView) -> ChannelMap:
    """Per-channel affine on axis 1: channels pass through, its four vectors follow them."""
    m = _passthrough(v, need_axis=1, why=f"batch_norm normalizes axis 1 but channels are on axis {v.in_axes[0]}")
    if not m.links:  # blocked, untracked or constant
        return m
    if not all(v.is_param[1:]):
        return blocked_everywhere(v, "batch_norm statistics are computed, not parameters", (1,))
    members = (Member(OUT(0), 1, 0, "bn"), Member(OUT(0), 2, 0, "norm"), Member(OUT(0), 3, 0, "norm"),
               Member(OUT(0), 4, 0, "norm"))
    return ChannelMap(m.out_axes, m.links, members=members)


@channel_rule("layer_norm")
def _layer_norm(v: NodeView) -> ChannelMap:
    """Normalizes over axes [axis, rank): channels outside pass through; over channels, they are all coupled."""
    ax, r = v.in_axes[0], v.in_types[0].rank
    if ax is not None and ax >= v.attrs["axis"] % r:
        return blocked_everywhere(v, "layer_norm normalizes over the channel axis: its mean and variance mix every "
                                     "channel, so removing any changes all the others", (ax,))
    return _passthrough(v)


@channel_rule("softmax")
def _softmax(v: NodeView) -> ChannelMap:
    """Softmax: per channel unless it normalizes over the channel axis."""
    ax = v.in_axes[0]
    if ax is not None and ax == v.attrs["axis"] % v.in_types[0].rank:
        return blocked_everywhere(v, "softmax normalizes over the channel axis", (ax,))
    return _passthrough(v)


@channel_rule("mean")
def _mean(v: NodeView) -> ChannelMap:
    """Mean over some axes: channels pass through (axis renumbered) unless the channel axis is reduced."""
    ax, r = v.in_axes[0], v.in_types[0].rank
    axes = {a % r for a in v.attrs["axes"]}
    if v.is_param[0]:
        return _constant(v)
    if ax is None:
        return ChannelMap((None,))
    if ax in axes:
        out_ax = ax if v.attrs["keepdims"] else None
        return blocked_everywhere(v, "mean reduces the channel axis", (out_ax,))
    out_ax = ax if v.attrs["keepdims"] else ax - sum(1 for a in axes if a < ax)
    return ChannelMap((out_ax,), links=(same(IN(0), OUT(0), v.channels(0)),))


@channel_rule("transpose")
def _transpose(v: NodeView) -> ChannelMap:
    """Transpose: channels move to the axis the permutation sends them to."""
    ax = v.in_axes[0]
    if v.is_param[0]:
        return _constant(v)
    if ax is None:
        return ChannelMap((None,))
    return ChannelMap((list(v.attrs["perm"]).index(ax),), links=(same(IN(0), OUT(0), v.channels(0)),))


@channel_rule("channel_shuffle")
def _channel_shuffle(v: NodeView) -> ChannelMap:
    """ShuffleNet's permutation: in[i*C/g + j] -> out[j*g + i]; column j of every group goes (or stays) together."""
    if v.is_param[0]:
        return _constant(v)
    if v.in_axes[0] != 1:
        return blocked_everywhere(v, f"channel_shuffle permutes axis 1 but channels are on axis {v.in_axes[0]}",
                                  (v.in_axes[0],))
    c, g = v.channels(0), v.attrs["groups"]
    per = c // g
    src = _ar(c)
    i, j = src // per, src % per
    return ChannelMap((1,), links=(Link(IN(0), src, OUT(0), j * g + i),  # the permutation
                                   Link(IN(0), src, IN(0), j)))  # same column j in every group: one unit


# ---- layers that make and read channels --------------------------------------------------------------

@channel_rule("conv2d", shrink=lambda v, k: _conv_shrink(v, k))
def _conv2d(v: NodeView) -> ChannelMap:
    """Output channels are new (rows of the weight); input channels are read through weight axis 1.

    With groups > 1, input group k feeds only output group k: whole conv groups go together (depthwise is the
    case of one input channel per group), so every remaining group keeps its size and `groups` shrinks.
    """
    if not all(v.is_param[1:]):
        return blocked_everywhere(v, "conv2d weights are computed, not parameters", (1,))
    out_c = int(v.out_types[0].shape[1])
    producer = [Member(OUT(0), 1, 0, "producer")] + ([Member(OUT(0), 2, 0, "producer")] if len(v.in_types) > 2 else [])
    blocks: list[Block] = []
    ax = v.in_axes[0]
    if ax is not None and ax != 1:
        blocks.append(Block(IN(0), f"conv2d reads channels on axis 1 but they are on axis {ax}"))
    g = v.attrs["groups"]
    if g == 1 or ax != 1:
        if g != 1:
            blocks.append(Block(OUT(0), "grouped conv2d whose input channels are not tracked"))
        consumer = [Member(IN(0), 1, 1, "consumer")] if ax == 1 else []
        return ChannelMap((1,), blocks=tuple(blocks), members=tuple(producer + consumer), produces=(0,),
                          consumes=(0,) if ax == 1 else ())
    in_c = v.channels(0)
    gi, go = in_c // g, out_c // g
    cin, cout = _ar(in_c), _ar(out_c)
    head = (cout // go) * go  # the first output channel of each channel's group
    links = (Link(IN(0), cin, OUT(0), (cin // gi) * go), Link(OUT(0), cout, OUT(0), head))
    return ChannelMap((1,), links=links, members=tuple(producer), produces=())


def _conv_shrink(v: NodeView, k: Kept) -> dict[str, Any]:
    g = v.attrs["groups"]
    if g == 1 or k.outputs[0] is None:
        return {}
    go = int(k.out_sizes[0]) // g  # type: ignore[operator]
    return {"groups": len(k.outputs[0]) // go}


@channel_rule("dense")
def _dense(v: NodeView) -> ChannelMap:
    """Output features (last axis) are new; input features are read through weight axis 1.

    When the tracked channels are on another axis, the dense works on each channel alike: they pass through.
    """
    r = v.in_types[0].rank
    if not all(v.is_param[1:]):
        return blocked_everywhere(v, "dense weights are computed, not parameters", (r - 1,))
    producer = [Member(OUT(0), 1, 0, "producer")] + ([Member(OUT(0), 2, 0, "producer")] if len(v.in_types) > 2 else [])
    ax = v.in_axes[0]
    if ax is None:
        return ChannelMap((r - 1,), members=tuple(producer), produces=(0,))
    if ax != r - 1:  # a dense over another axis works per channel: channels pass through, features untracked
        return ChannelMap((ax,), links=(same(IN(0), OUT(0), v.channels(0)),))
    return ChannelMap((r - 1,), members=tuple(producer + [Member(IN(0), 1, 1, "consumer")]), produces=(0,),
                      consumes=(0,))


@channel_rule("matmul")
def _matmul(v: NodeView) -> ChannelMap:
    """Product of two computed tensors: no channel is known to be separable."""
    return blocked_everywhere(v, "matmul mixes channels of two computed tensors", (v.out_types[0].rank - 1,))


# ---- element-wise with broadcasting ------------------------------------------------------------------

@channel_rule("add", "sub", "mul", "div", "pow")
def _binary(v: NodeView) -> ChannelMap:
    """Residual adds, SE scales, layer scales: operands whose channels line up with the output's are one channel."""
    out = v.out_types[0]
    r = out.rank
    aligned = {i: v.in_axes[i] + (r - v.in_types[i].rank) for i in range(2)
               if not v.is_param[i] and v.in_axes[i] is not None}
    full = {i: a for i, a in aligned.items() if v.in_types[i].shape[v.in_axes[i]] == out.shape[a]}
    axes = set(full.values())
    if not aligned:
        return _constant(v) if all(v.is_param) else blocked_everywhere(v, "operands have no tracked channels")
    if len(axes) != 1:
        if not axes:
            return blocked_everywhere(v, f"{v.node.op} broadcasts a single channel over every channel")
        return blocked_everywhere(v, f"{v.node.op} operands carry channels on different axes")
    ax = axes.pop()
    n = int(out.shape[ax])
    links, blocks, members = [], [], []
    for i in range(2):
        t = v.in_types[i]
        d = ax - (r - t.rank)  # the operand's dim lined up with the output's channel axis
        if i in full:
            links.append(same(IN(i), OUT(0), n))
        elif i in aligned:
            blocks.append(Block(IN(i), f"{v.node.op} broadcasts these channels over the output's"))
        elif d >= 0 and t.shape[d] == n and n != 1:
            if v.is_param[i]:
                members.append(Member(OUT(0), i, d, "scale"))
            else:
                blocks.append(Block(OUT(0), f"{v.node.op} operand %{v.node.inputs[i]} has these channels untracked"))
    return ChannelMap((ax,), links=tuple(links), blocks=tuple(blocks), members=tuple(members))


# ---- moving channels between tensors ------------------------------------------------------------------

@channel_rule("concat")
def _concat(v: NodeView) -> ChannelMap:
    """Along the channel axis: input k's channel i is output channel offset_k + i; else all pass through."""
    a = v.attrs["axis"] % v.out_types[0].rank
    if any(v.is_param):
        axes = {x for x, p in zip(v.in_axes, v.is_param) if not p}
        if len(axes) == 1 and a in axes:
            return _concat_offsets(v, a)
        return blocked_everywhere(v, "concat of parameters and computed channels on another axis")
    axes = set(v.in_axes)
    if len(axes) != 1 or None in axes:
        return blocked_everywhere(v, "concat operands carry channels on different axes")
    ax = axes.pop()
    if ax == a:
        return _concat_offsets(v, a)
    n = int(v.out_types[0].shape[ax])
    return ChannelMap((ax,), links=tuple(same(IN(i), OUT(0), n) for i in range(len(v.in_types))))


def _concat_offsets(v: NodeView, a: int) -> ChannelMap:
    links, blocks, off = [], [], 0
    for i, t in enumerate(v.in_types):
        n = int(t.shape[a])
        if v.is_param[i]:
            blocks.append(Block(OUT(0), "these channels are a constant operand of concat", off + _ar(n)))
        else:
            links.append(Link(IN(i), _ar(n), OUT(0), off + _ar(n)))
        off += n
    return ChannelMap((a,), links=tuple(links), blocks=tuple(blocks))


@channel_rule("split", shrink=lambda v, k: _split_shrink(v, k))
def _split(v: NodeView) -> ChannelMap:
    """Along the channel axis: output k's channel i is input channel offset_k + i; else all pass through."""
    ax = v.in_axes[0]
    if v.is_param[0]:
        return _constant(v)
    if ax is None:
        return ChannelMap((None,) * len(v.out_types))
    a = v.attrs["axis"] % v.in_types[0].rank
    links, off = [], 0
    for j, s in enumerate(v.attrs["sizes"]):
        if a == ax:
            links.append(Link(IN(0), off + _ar(s), OUT(j), _ar(s)))
        else:
            links.append(same(IN(0), OUT(j), v.channels(0)))
        off += s
    return ChannelMap((ax,) * len(v.out_types), links=tuple(links))


def _split_shrink(v: NodeView, k: Kept) -> dict[str, Any]:
    if v.in_axes[0] != v.attrs["axis"] % v.in_types[0].rank or k.outputs[0] is None:
        return {}
    return {"sizes": tuple(len(o) for o in k.outputs)}  # type: ignore[arg-type]


def _slice_range(v: NodeView) -> range:
    n = int(v.in_types[0].shape[v.attrs["axis"] % v.in_types[0].rank])
    return range(n)[v.attrs["start"]:v.attrs["end"]:v.attrs["step"]]


@channel_rule("slice", shrink=lambda v, k: _slice_shrink(v, k))
def _slice(v: NodeView) -> ChannelMap:
    """Along the channel axis (step 1): output channel i is input channel start + i; else all pass through."""
    ax = v.in_axes[0]
    if v.is_param[0]:
        return _constant(v)
    if ax is None:
        return ChannelMap((None,))
    if v.attrs["axis"] % v.in_types[0].rank != ax:
        return _passthrough(v)
    idx = np.asarray(_slice_range(v), dtype=np.int64)
    if v.attrs["step"] != 1:
        return blocked_everywhere(v, "strided slice of channels: the kept ones would not stay evenly spaced", (ax,))
    return ChannelMap((ax,), links=(Link(IN(0), idx, OUT(0), _ar(len(idx))),))


def _slice_shrink(v: NodeView, k: Kept) -> dict[str, Any]:
    if v.in_axes[0] != v.attrs["axis"] % v.in_types[0].rank or k.inputs[0] is None:
        return {}
    rng = _slice_range(v)
    start = int(np.sum(k.inputs[0] < rng.start)) if len(rng) else 0
    return {"start": start, "end": start + len(k.outputs[0])}  # type: ignore[arg-type]


# ---- flatten / reshape: stride expansion ------------------------------------------------------------

def _merge_links(v: NodeView, s: int, e: int) -> ChannelMap:
    """Dims s..e merge into one; channel c (axis ax within them) becomes every merged index with that c."""
    x = v.in_types[0]
    ax = v.in_axes[0]
    assert ax is not None
    if ax < s:
        return ChannelMap((ax,), links=(same(IN(0), OUT(0), v.channels(0)),))
    if ax > e:
        return ChannelMap((ax - (e - s),), links=(same(IN(0), OUT(0), v.channels(0)),))
    dims = x.shape[s:e + 1]
    if not all(isinstance(d, int) for d in dims):
        return blocked_everywhere(v, "channels merged with symbolic dims", (s,))
    c = int(x.shape[ax])
    outer = math.prod(x.shape[s:ax])  # type: ignore[arg-type]
    inner = math.prod(x.shape[ax + 1:e + 1])  # type: ignore[arg-type]
    oo, cc, ii = np.meshgrid(_ar(outer), _ar(c), _ar(inner), indexing="ij")
    flat = (oo * c + cc) * inner + ii
    return ChannelMap((s,), links=(Link(IN(0), cc.ravel(), OUT(0), flat.ravel()),))


@channel_rule("flatten")
def _flatten(v: NodeView) -> ChannelMap:
    """Merging dims: channel c becomes the merged indices with that c (flatten -> dense: stride expansion)."""
    if v.is_param[0]:
        return _constant(v)
    if v.in_axes[0] is None:
        return blocked_everywhere(v, "input has no tracked channels")
    r = v.in_types[0].rank
    return _merge_links(v, v.attrs["start"] % r, v.attrs["end"] % r)


def _dims_key(dims: Sequence[Any]) -> tuple[int, tuple[str, ...]]:
    return math.prod(d for d in dims if isinstance(d, int)), tuple(sorted(d for d in dims if isinstance(d, str)))


def _reshape_as_merge(x: TensorType, out: TensorType, ax: int) -> tuple[str, int, int, int] | None:
    """('keep', out_axis, ..) if the channel axis survives whole, ('merge', s, e, out_axis) if it is merged."""
    for k in range(out.rank):  # channels kept whole: same extent before, same size
        if out.shape[k] == x.shape[ax] and _dims_key(out.shape[:k]) == _dims_key(x.shape[:ax]):
            return ("keep", k, k, k)
    for s in range(ax + 1):  # dims s..e merged into out dim k, with matching prefix
        for e in range(ax, x.rank):
            k = s if x.shape[:s] == out.shape[:s] else -1
            if k < 0 or k >= out.rank:
                continue
            if x.shape[e + 1:] == out.shape[k + 1:] and _dims_key(x.shape[s:e + 1]) == _dims_key((out.shape[k],)):
                return ("merge", s, e, k)
    return None


@channel_rule("reshape", shrink=lambda v, k: _reshape_shrink(v, k))
def _reshape(v: NodeView) -> ChannelMap:
    """Reshapes that keep the channel axis whole or merge it flatten-style; any other reshape blocks."""
    ax = v.in_axes[0]
    if v.is_param[0]:
        return _constant(v)
    if ax is None:
        return blocked_everywhere(v, "input has no tracked channels")
    how = _reshape_as_merge(v.in_types[0], v.out_types[0], ax)
    if how is None:
        return blocked_everywhere(v, "reshape splits or reorders the channel axis")
    if how[0] == "keep":
        return ChannelMap((how[1],), links=(same(IN(0), OUT(0), v.channels(0)),))
    _, s, e, _ = how
    return _merge_links(v, s, e)


def _reshape_shrink(v: NodeView, k: Kept) -> dict[str, Any]:
    if k.outputs[0] is None:
        return {}
    out = v.out_types[0]
    how = _reshape_as_merge(v.in_types[0], out, v.in_axes[0]) if v.in_axes[0] is not None else None
    if how is None:  # blocked: its channels stay
        return {}
    pos = how[1] if how[0] == "keep" else how[3]
    shape = list(v.attrs["shape"])
    if shape[pos] in (-1, 0):
        return {}
    shape[pos] = int(len(k.outputs[0]))
    return {"shape": tuple(shape)}


# ---- quantization ------------------------------------------------------------------------------------

@channel_rule("quantize", "dequantize")
def _qdq(v: NodeView) -> ChannelMap:
    """Per-tensor QDQ: channels pass through; per-channel parameters of activations block (prune before quantize)."""
    if v.is_param[0] or v.in_types[1].rank == 0:
        return _passthrough(v)
    return blocked_everywhere(v, f"{v.node.op} has per-channel scales: prune before quantizing")


@channel_rule("qconv2d", "qdense", "qadd")
def _integer(v: NodeView) -> ChannelMap:
    """Integer layers carry packed int8 weights and folded biases: prune the float graph, then quantize."""
    return blocked_everywhere(v, f"{v.node.op} is an integer op: prune before quantize/fold-qdq")
