"""fold-qdq: turn QDQ patterns into integer ops (qconv2d, qdense, qadd, int max-pool/flatten/reshape).

`dequantize -> conv2d -> [activation] -> quantize` becomes one `qconv2d` whose int32 bias carries the
zero-point correction (-x_zp * sum(w)) and whose epilogue requantizes, so the backend runs u8 x s8 -> s32 kernels.
Per-channel activation grids (`channel_grid`: inputs of depthwise convs) fold the same way: into the producer's
per-channel requantize scale, and into the depthwise conv's per-channel dequantization scale.
Dequantizes of weights left over (float fallback layers) are folded into float constants.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from slimc import ops
from slimc.ir import Graph, Node
from slimc.pass_manager import PassContext, PassResult, register_pass
from slimc.passes.fuse import epilogue
from slimc.passes.quant.channel_grid import grid_activation, is_depthwise
from slimc.rewrite import Edit, eliminate_dead_code, merge_source, sole_user

PRESERVING_OPS = ("max_pool2d", "flatten", "reshape")
INTEGER_OPS = ("qconv2d", "qdense", "qadd")


@dataclass(frozen=True)
class QParams:
    """A per-tensor quantized activation: the integer value behind a dequantize, its scale and zero point."""

    value: str
    scale: float
    zero_point: int
    dtype: str


@dataclass(frozen=True, eq=False)
class ChannelQParams:
    """A per-channel (axis 1) quantized activation sharing one zero point: integer value, scales, zero point."""

    value: str
    scale: np.ndarray
    zero_point: int
    dtype: str


def _channel_params(g: Graph, n: Node) -> tuple[np.ndarray, int] | None:
    """(scales, the common zero point) of a quantize/dequantize along axis 1 whose zero points are all equal."""
    s, z = n.inputs[1], n.inputs[2]
    if not (g.is_param(s) and g.is_param(z)) or g.type_of(s).rank != 1 \
            or n.attrs["axis"] % g.type_of(n.inputs[0]).rank != 1:
        return None
    zp = g.weight(z)
    if zp.size == 0 or np.any(zp != zp.flat[0]):
        return None
    return np.asarray(g.weight(s), np.float32), int(zp.flat[0])


def _activation_dequantize(g: Graph, v: str) -> Node | None:
    """The dequantize producing `v` from a non-constant (activation) value, if that is what produces it."""
    n = g.producer(v)
    return n if n is not None and n.op == "dequantize" and not g.is_param(n.inputs[0]) else None


def _quantize_readers(g: Graph, v: str) -> list[Node] | None:
    """The readers of `v` if there are some and all are quantize nodes (and `v` is no graph output)."""
    users = g.users(v)
    return users if v not in g.outputs and users and all(u.op == "quantize" for u in users) else None


def dequantized_channels(g: Graph, v: str) -> ChannelQParams | None:
    """The ChannelQParams if `v` is a per-channel dequantize (one zero point) of a non-constant value."""
    n = _activation_dequantize(g, v)
    p = None if n is None else _channel_params(g, n)
    return None if p is None else ChannelQParams(n.inputs[0], p[0], p[1], g.type_of(n.inputs[0]).dtype)


def requantized_per_channel(g: Graph, v: str) -> tuple[list[Node], ChannelQParams] | None:
    """The quantize nodes that are the only readers of `v` if they all use one per-channel grid (one zero point)."""
    users = _quantize_readers(g, v)
    if users is None or len({(u.inputs[1], u.inputs[2], u.out_type.dtype) for u in users}) != 1:
        return None
    p = _channel_params(g, users[0])
    return None if p is None else (users, ChannelQParams(users[0].name, p[0], p[1], users[0].out_type.dtype))


def _scalar_params(g: Graph, n: Node) -> tuple[float, int] | None:
    s, z = n.inputs[1], n.inputs[2]
    if not (g.is_param(s) and g.is_param(z)) or g.type_of(s).rank != 0:
        return None
    return float(g.weight(s)), int(g.weight(z))


def dequantized_activation(g: Graph, v: str) -> QParams | None:
    """The QParams if `v` is a per-tensor dequantize of a non-constant value."""
    n = _activation_dequantize(g, v)
    p = None if n is None else _scalar_params(g, n)
    return None if p is None else QParams(n.inputs[0], p[0], p[1], g.type_of(n.inputs[0]).dtype)


def dequantized_weight(g: Graph, v: str) -> tuple[str, np.ndarray, np.ndarray] | None:
    """(int8 weight param, its int8 array, float32 scale per output channel) if `v` dequantizes a constant int8 weight."""
    n = g.producer(v)
    if n is None or n.op != "dequantize" or not all(g.is_param(i) for i in n.inputs):
        return None
    q, scale, zp = (g.weight(i) for i in n.inputs)
    if q.dtype != np.int8 or np.any(zp != 0) or (scale.ndim == 1 and n.attrs["axis"] % q.ndim != 0):
        return None
    return n.inputs[0], q, np.broadcast_to(np.asarray(scale, np.float32), (q.shape[0],)).copy()


def requantized_by(g: Graph, v: str) -> tuple[list[Node], QParams] | None:
    """The quantize nodes that are the only readers of `v` if they all use one per-tensor grid."""
    users = _quantize_readers(g, v)
    if users is None:
        return None
    params = {_scalar_params(g, u) for u in users}
    dtypes = {u.out_type.dtype for u in users}
    if len(params) != 1 or None in params or len(dtypes) != 1:
        return None
    (s, z), = params
    return users, QParams(users[0].name, s, z, dtypes.pop())


#: (lower, upper) bounds of the clamping epilogue activations (None: unbounded)
CLAMPS = {"none": (None, None), "relu": (0.0, None), "relu6": (0.0, 6.0)}


def _clamp(attrs: dict) -> tuple[float | None, float | None] | None:
    """The bounds of a clamping epilogue activation (none, relu, relu6, clip), else None."""
    act = attrs.get("act", "none")
    return (attrs.get("clip_min"), attrs.get("clip_max")) if act == "clip" else CLAMPS.get(act)


def abs_weight_sums(wq: np.ndarray) -> np.ndarray:
    """sum_i |w[c, i]| per output channel of an integer weight: the int32 headroom an input value's magnitude uses."""
    return np.abs(wq.reshape(wq.shape[0], -1).astype(np.int64)).sum(axis=1)


def _input_top(g: Graph, v: str) -> int:
    """Largest magnitude the quantized activation `v` can hold: its dtype's, or the top of the range a clip before
    its quantize keeps it in (wide grids, passes/quant/wide.py), through grid-preserving ops."""
    q = g.producer(v)
    top = max(abs(b) for b in ops.QUANT_DTYPES[g.type_of(v).dtype])
    while q is not None and q.op == "quantize" and g.is_param(q.inputs[1]) and g.is_param(q.inputs[2]):
        p = g.producer(q.inputs[0])
        if p is not None and p.op == "clip" and p.attrs.get("max") is not None:
            s, z = np.asarray(g.weight(q.inputs[1]), np.float64), np.asarray(g.weight(q.inputs[2]), np.float64)
            return int(min(top, np.max(np.round(p.attrs["max"] / s + z))))
        src = p.inputs[0] if p is not None and p.op in PRESERVING_OPS else None
        d = g.producer(src) if src is not None else None
        q = g.producer(d.inputs[0]) if d is not None and d.op == "dequantize" else None
    return top


def _with_activation(g: Graph, n: Node) -> tuple[list[Node], dict]:
    """Nodes covered by `n` plus a sole following activation with a fused form (and its epilogue attributes); a
    clip after a clamping epilogue merges with it (the clip a wide grid's range puts before its quantize)."""
    own = {k: n.attrs[k] for k in ("act", "clip_min", "clip_max") if k in n.attrs}
    act = sole_user(g, n.name)
    epi = epilogue(act) if act is not None else None
    if epi is None:
        return [n], own
    if n.attrs.get("act", "none") == "none":
        return [n, act], epi
    inner, outer = _clamp(own), _clamp(epi)
    if inner is None or outer is None:
        return [n], own
    lo = max((b for b in (inner[0], outer[0]) if b is not None), default=None)
    hi = min((b for b in (inner[1], outer[1]) if b is not None), default=None)
    return [n, act], {"act": "clip", "clip_min": lo, "clip_max": hi}


#: activations with act(v / s) = act'(v) / s for a rescaled act' (piecewise linear through 0)
HOMOGENEOUS_ACTS = ("none", "relu", "relu6", "clip")


def _scale_into_grid(attrs: dict, out_scale: float):
    """Attributes with out_scale 1 and the activation's bounds on the output grid; and the scale rescaler."""
    inv = 1.0 / np.float64(out_scale)
    a = {**attrs, "out_scale": 1.0}
    if a.get("act") == "relu6":
        a.update(act="clip", clip_min=0.0, clip_max=float(6.0 * inv))
    elif a.get("act") == "clip":
        lo, hi = a.get("clip_min"), a.get("clip_max")
        a.update(clip_min=None if lo is None else float(lo * inv), clip_max=None if hi is None else float(hi * inv))
    return a, (lambda s: np.asarray(s, np.float64) * inv)


class _Folder:
    def __init__(self, g: Graph) -> None:
        self.g, self.e = g, Edit(g)
        self.folded: Counter[str] = Counter()
        self.claimed: set[str] = set()

    def emit(self, covered: list[Node], op: str, inputs: tuple[str, ...], attrs: dict,
             scale: tuple[str, np.ndarray] | None = None) -> None:
        """Replace `covered` (+ the quantize nodes after it, if all its readers are) with one integer node.

        `scale` is the (base name, per-channel dequantization scale) of conv/dense; for piecewise-linear
        activations the output grid's 1/out_scale is folded into it, so the epilogue has no division.
        """
        last = covered[-1]
        req = requantized_by(self.g, last.name)
        chan = self._channel_grid_after(covered, attrs) if req is None and scale is not None else None
        if req is not None:
            qs, out = req
            attrs = {**attrs, "out_dtype": out.dtype, "out_scale": out.scale, "out_zero_point": out.zero_point}
            name = qs[0].name
            if scale is not None and attrs.get("act", "none") in HOMOGENEOUS_ACTS:
                attrs, folded = _scale_into_grid(attrs, out.scale)
                scale = (scale[0], folded(scale[1]))
        elif chan is not None and scale is not None:  # per-channel output grid: 1/out_scale[c] joins scale[c]
            qs, out, act = chan
            attrs = {**{k: v for k, v in attrs.items() if k not in ("clip_min", "clip_max")}, **act,
                     "out_dtype": out.dtype, "out_scale": 1.0, "out_zero_point": out.zero_point}
            name = qs[0].name
            scale = (scale[0], np.asarray(scale[1], np.float64) / out.scale.astype(np.float64))
        else:
            qs, name = [], last.name
        if scale is not None:
            inputs = (*inputs, self.e.add_param(f"{scale[0]}.scale", scale[1].astype(np.float32)))
        node = self.e.make_node(name, op, inputs, attrs, merge_source(*covered, *qs))
        for m in covered:
            if m.name != name:
                self.e.remove_node(m.name)
        self.e.replace_node(name, node)
        for q in qs[1:]:
            self.e.remove_node(q.name)
            self.e.replace_uses(q.name, name)
        self.claimed |= {m.name for m in covered + qs}
        self.folded[op] += 1

    def _channel_grid_after(self, covered: list[Node], attrs: dict) -> tuple[list[Node], ChannelQParams, dict] | None:
        """The per-channel quantize after a layer (on its channel axis) and the activation computing `attrs`' act on
        that grid, if the grid's bounds are scalar there (else the quantize stays a node of its own)."""
        req = requantized_per_channel(self.g, covered[-1].name)
        if req is None or (covered[0].op == "dense" and covered[-1].out_type.rank != 2):
            return None  # dense channels are on the last axis, the grid's on axis 1
        act = grid_activation(attrs, req[1].scale, req[1].zero_point, ops.QUANT_DTYPES[req[1].dtype])
        return None if act is None else (*req, act)

    def _input(self, n: Node) -> tuple[str, np.ndarray, int] | None:
        """(integer input, its scale: one, or per channel for a depthwise conv, zero point) of a layer."""
        x = dequantized_activation(self.g, n.inputs[0])
        if x is not None:
            return x.value, np.float64(np.float32(x.scale)), x.zero_point
        c = dequantized_channels(self.g, n.inputs[0]) if is_depthwise(self.g, n) else None
        return None if c is None else (c.value, c.scale.astype(np.float64), c.zero_point)

    def layer(self, n: Node) -> None:
        g = self.g
        x = self._input(n)
        w = dequantized_weight(g, n.inputs[1])
        if x is None or w is None or not all(g.is_param(b) for b in n.inputs[2:]):
            return
        wname, wq, wscale = w
        x_value, x_scale, x_zero_point = x
        deq = x_scale * wscale.astype(np.float64)
        bias = g.weight(n.inputs[2]).astype(np.float64) if len(n.inputs) > 2 else np.zeros(wq.shape[0])
        correction = x_zero_point * wq.reshape(wq.shape[0], -1).astype(np.int64).sum(axis=1)
        bias_i = np.round(bias / deq).astype(np.int64) - correction
        if np.abs(bias_i).max(initial=0) >= 2 ** 31:
            return  # a bias beyond int32 (tiny scales): leave this layer in float
        if np.max(_input_top(g, x_value) * abs_weight_sums(wq) + np.abs(bias_i), initial=0) >= 2 ** 31:
            return  # a 16-bit input whose int32 sum could overflow (not a grid quant-fallback{to=int16} made)
        covered, act = _with_activation(g, n)
        b_name = self.e.add_param(f"{n.name}.bias_int32", bias_i.astype(np.int32))
        attrs = {"x_zero_point": x_zero_point, **act}
        if n.op == "conv2d":
            attrs.update({k: n.attrs[k] for k in ("stride", "padding", "dilation", "groups")})
        self.emit(covered, "qconv2d" if n.op == "conv2d" else "qdense", (x_value, wname, b_name), attrs,
                  scale=(n.name, deq))

    def add(self, n: Node) -> None:
        a, b = (dequantized_activation(self.g, i) for i in n.inputs)
        if a is None or b is None:
            return
        covered, act = _with_activation(self.g, n)
        attrs = {"a_scale": a.scale, "a_zero_point": a.zero_point, "b_scale": b.scale, "b_zero_point": b.zero_point,
                 **{k: v for k, v in act.items()}}
        self.emit(covered, "qadd", (a.value, b.value), attrs)

    def preserving(self, n: Node) -> None:
        x = dequantized_activation(self.g, n.inputs[0])
        req = requantized_by(self.g, n.name)
        if x is None or req is None:
            return
        qs, out = req
        if (out.scale, out.zero_point, out.dtype) != (x.scale, x.zero_point, x.dtype):
            return
        node = self.e.make_node(qs[0].name, n.op, (x.value,), n.attrs, merge_source(n, *qs))
        self.e.remove_node(n.name)
        self.e.replace_node(qs[0].name, node)
        for q in qs[1:]:
            self.e.remove_node(q.name)
            self.e.replace_uses(q.name, qs[0].name)
        self.claimed |= {n.name, *(q.name for q in qs)}
        self.folded[n.op] += 1

    def run(self) -> Graph:
        for n in self.g.nodes:
            if n.name in self.claimed:
                continue
            if n.op in ("conv2d", "dense"):
                self.layer(n)
            elif n.op == "add":
                self.add(n)
            elif n.op in PRESERVING_OPS:
                self.preserving(n)
        return self.e.apply()


def fold_weight_dequantize(g: Graph) -> tuple[Graph, int]:
    """Dequantizes of constants left after folding become float constants (float fallback layers)."""
    import torch

    from slimc.interpreter import run_node

    e = Edit(g)
    count = 0
    for n in g.nodes:
        if n.op == "dequantize" and all(g.is_param(i) for i in n.inputs):
            args = [torch.from_numpy(np.ascontiguousarray(g.weight(i))) for i in n.inputs]
            (value,) = run_node(n, args)
            const = e.add_param(f"{n.inputs[0]}.float", value.numpy().astype(np.float32))
            e.remove_node(n.name)
            e.replace_uses(n.name, const)
            count += 1
    return e.apply(), count


def int8_mac_share(g: Graph, wide: bool = False) -> float:
    """Share of the graph's MACs computed by integer ops reading 8-bit activations (`wide`: 16-bit ones instead)."""
    total = q = 0
    for n in g.nodes:
        m = ops.macs(n.op, [g.type_of(i) for i in n.inputs], n.out_types, n.attrs)
        total += m
        if n.op in INTEGER_OPS and (g.type_of(n.inputs[0]).dtype == "uint16") == wide:
            q += m
    return q / total if total else 0.0


@register_pass("fold-qdq")
def fold_qdq(graph: Graph, ctx: PassContext) -> PassResult:
    """Fold QDQ around conv/dense/add/max-pool/flatten/reshape into integer ops; constant-fold weight dequantizes."""
    folder = _Folder(graph)
    g = folder.run()
    g, _ = eliminate_dead_code(g)
    g, constants = fold_weight_dequantize(g)
    left = Counter(n.op for n in g.nodes if n.op in ("quantize", "dequantize"))
    stats = {"folded": dict(sorted(folder.folded.items())), "float_constants": constants,
             "quantize_left": left.get("quantize", 0), "dequantize_left": left.get("dequantize", 0),
             "int8_mac_share": round(int8_mac_share(g), 4), "int16_mac_share": round(int8_mac_share(g, True), 4)}
    return PassResult(g, bool(folder.folded) or constants > 0, stats)
