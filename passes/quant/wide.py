"""Wide activation grids: uint16 storage for the activations that int8 layers too sensitive for u8 read.

A widened layer keeps its int8 weights and integer arithmetic; only the grid of the activation it reads gets up to
2^16 levels instead of 256, over the same range joined with the value's observed min-max (a u8 grid's mse or
percentile range clips outliers that a wide grid can afford to hold). The level count is the largest 2^b - 1
whose integer sum cannot overflow int32 in any reader: qmax * sum_i |w[c, i]| < 2^29 for every output channel c of
every conv/dense reading the value. A finer grid scales the int32 bias (float bias / (x_scale * w_scale)) up:
channels where it would reach 2^30 (near-dead ones) get a larger weight scale. A value whose readers allow fewer
than WIDE_MIN_BITS bits stays u8. Grid-preserving producers (max-pool, flatten, reshape) share the grid, so their
input is widened with it and they stay integer.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

import numpy as np

from slimc import ops
from slimc.ir import Graph, Node
from slimc.passes.quant.fold import PRESERVING_OPS, abs_weight_sums, dequantized_weight
from slimc.passes.quant.qdq import Samples, fixed_batch
from slimc.passes.quant.scheme import activation_qparams, bias_safe_scale, widened_qparams
from slimc.rewrite import Edit

#: fewest bits worth a wide grid (u8 has 8)
WIDE_MIN_BITS = 10
WIDE_MAX_BITS = 16
#: bound on |integer sum| and headroom left for the int32 bias: together they stay below 2^31
SUM_LIMIT = 2 ** 29


@dataclass(frozen=True)
class Pair:
    """One activation QDQ pair: the quantize node and the dequantize nodes reading its integer output."""

    quantize: Node
    dequantizes: tuple[Node, ...]


def _pair(g: Graph, v: str) -> Pair | None:
    """The QDQ pair whose dequantize produces `v`, if `v` is a dequantized activation."""
    d = g.producer(v)
    if d is None or d.op != "dequantize" or g.is_param(d.inputs[0]):
        return None
    q = g.producer(d.inputs[0])
    if q is None or q.op != "quantize" or q.out_type.dtype != "uint8":
        return None
    return Pair(q, tuple(u for u in g.users(q.name) if u.op == "dequantize"))


def _group(g: Graph, pair: Pair) -> list[Pair]:
    """`pair` and the pairs upstream of it through grid-preserving ops that share its grid."""
    out = [pair]
    while True:
        p = g.producer(out[-1].quantize.inputs[0])
        up = _pair(g, p.inputs[0]) if p is not None and p.op in PRESERVING_OPS else None
        if up is None or [g.weight(i).tolist() for i in up.quantize.inputs[1:]] != \
                [g.weight(i).tolist() for i in out[-1].quantize.inputs[1:]]:
            return out
        out.append(up)


def _readers(g: Graph, group: list[Pair]) -> list[Node]:
    """Every node reading one of the group's dequantized values."""
    return [u for pair in group for d in pair.dequantizes for u in g.users(d.name)]


def _abs_sums(g: Graph, n: Node) -> np.ndarray | None:
    """sum_i |w[c, i]| per output channel of an int8 conv/dense reading its input, else None."""
    if n.op not in ("conv2d", "dense"):
        return None
    w = dequantized_weight(g, n.inputs[1])
    return None if w is None else abs_weight_sums(w[1])


def group_qmax(g: Graph, group: list[Pair]) -> int:
    """Most levels - 1 (2^b - 1, b <= WIDE_MAX_BITS) the readers' int32 sums allow; 0 below WIDE_MIN_BITS (and for a
    per-channel grid unless all 16 bits are safe)."""
    top = limit = 2 ** WIDE_MAX_BITS - 1
    for n in _readers(g, group):
        sums = _abs_sums(g, n)
        if sums is not None and sums.max(initial=0) > 0:
            limit = min(limit, (SUM_LIMIT - 1) // int(sums.max()))
    if np.ndim(g.weight(group[0].quantize.inputs[1])) and limit < top:
        return 0  # per channel the range clip cannot stop a channel at its qmax (_range_clip)
    bits = int(np.floor(np.log2(limit + 1)))
    return 2 ** bits - 1 if bits >= WIDE_MIN_BITS else 0


def _bias_safe_weights(g: Graph, e: Edit, n: Node, x_scale: np.ndarray, done: set[str]) -> None:
    """Raise the weight scale of the channels of conv/dense `n` whose int32 bias would reach 2^30 on the finer input
    grid (near-dead channels: tiny weights, large bias; bias_safe_scale's floor for u8 grids), re-rounding their
    int8 weights; the zero-point correction adds under SUM_LIMIT, so the whole bias stays below 2^31 - SUM_LIMIT."""
    w = dequantized_weight(g, n.inputs[1]) if n.op in ("conv2d", "dense") and len(n.inputs) > 2 else None
    if w is None or w[0] in done:
        return
    done.add(w[0])
    floor = bias_safe_scale(g.weight(n.inputs[2]), x_scale)
    wname, wq, wscale = w
    low = wscale < floor
    if not low.any():
        return
    scale = np.where(low, floor, wscale).astype(np.float32)
    shape = (-1,) + (1,) * (wq.ndim - 1)
    q = np.where(low.reshape(shape), np.clip(np.round(wq * (wscale / scale).reshape(shape)), -127, 127), wq)
    d = g.producer(n.inputs[1])
    ins = (e.add_param(f"{wname}.wide", q.astype(np.int8)), e.add_param(f"{d.inputs[1]}.wide", scale), d.inputs[2])
    e.replace_node(d.name, e.make_node(d.name, "dequantize", ins, d.attrs, d.source))


def _range_clip(e: Edit, q: Node, scale: np.ndarray, zp: np.ndarray, qmax: int) -> Node:
    """clip(x) to the grid's range before quantize `q`: uint16 saturates at 65535, not at qmax, and a value beyond
    qmax would break the readers' int32 bound. A per-channel grid gets its channels' loosest bounds, so a channel
    may still reach 65535: group_qmax admits such grids only where even 65535 keeps the bound."""
    s, z = np.asarray(scale, np.float64), np.asarray(zp, np.float64)
    lo, hi = float((-z * s).min()), float(((qmax - z) * s).max())
    return e.make_node(e.fresh_name(f"{q.inputs[0]}.clip"), "clip", (q.inputs[0],), {"min": lo, "max": hi}, q.source)


def observed_ranges(f: Graph, samples: Samples, batch_size: int) -> dict[str, tuple[float, float]]:
    """Min-max range (calibrate's MinMaxObserver) of every float value of `f` over the samples: the whole range,
    which a wide grid can afford where a u8 grid's calibration (mse, percentile, entropy) clips outliers."""
    from slimc.data import from_arrays
    from slimc.passes.quant.calibrate import observed_values, run_observers
    from slimc.passes.quant.observers import MinMaxObserver

    observers = {v: MinMaxObserver() for v in observed_values(f)}
    run_observers(f, from_arrays(samples.arrays), observers, fixed_batch(f) or batch_size, len(samples))
    return {v: o.range() for v, o in observers.items()}


def _grid(g: Graph, group: list[Pair], qmax: int, ranges: Mapping[str, tuple[float, float]] | None):
    """uint16 (scale, zero point) of a group: over the u8 grid's range joined with the observed one, if known (a
    per-channel grid keeps its channels' ranges)."""
    q0 = group[0].quantize
    scale, zp = g.weight(q0.inputs[1]), g.weight(q0.inputs[2])
    seen = [ranges[p.quantize.inputs[0]] for p in group if ranges and p.quantize.inputs[0] in ranges]
    if np.ndim(scale) or not seen:
        return widened_qparams(scale, zp, qmax)
    lo = min([-float(zp) * float(scale)] + [r[0] for r in seen])
    hi = max([(255 - float(zp)) * float(scale)] + [r[1] for r in seen])
    s, z = activation_qparams(lo, hi, qmax)
    return np.asarray(s, np.float32), np.asarray(z, np.uint16)


def widen(g: Graph, names: Collection[str],
          ranges: Mapping[str, tuple[float, float]] | None = None) -> tuple[Graph, dict[str, int]]:
    """`g` (a QDQ graph) with the u8 activation grids the named int8 nodes read widened to uint16, and
    {widened value: qmax}; a value whose readers cannot take a wide grid (int32 headroom) stays u8. With `ranges`
    (observed_ranges of the float model) a per-tensor grid also covers the value's whole observed range."""
    pairs: dict[str, list[Pair]] = {}
    for name in names:
        n = g.node(name)
        for v in n.inputs[:1] if n.op in ("conv2d", "dense") else n.inputs:
            pair = _pair(g, v)
            if pair is not None and pair.quantize.name not in pairs:
                pairs[pair.quantize.name] = _group(g, pair)
    e = Edit(g)
    weights_done: set[str] = set()
    done: set[str] = set()
    widened: dict[str, int] = {}
    for group in pairs.values():
        if group[0].quantize.name in done:
            continue
        q0 = group[0].quantize
        qmax = group_qmax(g, group)
        if not qmax:
            continue
        scale, zp = _grid(g, group, qmax, ranges)
        for n in _readers(g, group):
            _bias_safe_weights(g, e, n, scale, weights_done)
        s_name, z_name = e.add_param(f"{q0.inputs[1]}.wide", scale), e.add_param(f"{q0.inputs[2]}.wide", zp)
        for pair in group:
            if pair.quantize.name in done:
                continue
            done.add(pair.quantize.name)
            q = pair.quantize
            t = [g.type_of(q.inputs[0]), e.type_of(s_name), e.type_of(z_name)]
            nq = ops.make_node(q.name, "quantize", (q.inputs[0], s_name, z_name), t, q.attrs, q.source)
            if pair is group[-1]:  # the float value entering the grid: clamped to it, so q <= qmax (see _range_clip)
                clip = _range_clip(e, q, scale, zp, qmax)
                nq = nq.replace(inputs=(clip.name, *nq.inputs[1:]))
                e.replace_node(q.name, clip, nq)
            else:
                e.replace_node(q.name, nq)
            for d in pair.dequantizes:
                e.replace_node(d.name, ops.make_node(d.name, "dequantize", (q.name, s_name, z_name),
                                                     [nq.out_type, t[1], t[2]], d.attrs, d.source))
                widened[d.name] = qmax
    return e.apply(), widened
