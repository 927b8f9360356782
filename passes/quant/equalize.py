"""equalize: cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization", sec. 4.1) before calibration.

For two layers in a row, y = W2 f(W1 x + b1) + b2, with f positively homogeneous (f(x / s) = f(x) / s for s > 0:
no activation or relu), dividing output channel i of layer 1 (row i of W1 and b1[i]) by s_i and multiplying input
channel i of layer 2 by s_i leaves y unchanged. With r1_i = max|W1[i]| and r2_i = max|W2[:, i]| the paper's choice
s_i = sqrt(r1_i / r2_i) gives both the same range sqrt(r1_i * r2_i), so no channel is left with a tiny share of a
per-tensor (or per-row) int8 grid. A layer in two pairs (the depthwise conv between MobileNet's expand and project
convs) is balanced against both neighbours by sweeping the pairs a few times.

relu6 (and clip(0, c)) is not positively homogeneous: relu6(x / s) != relu6(x) / s once x > 6, and slimc's fused clip
bound is one scalar, not one per channel. So the exact default (`relu6=skip`) leaves such pairs alone. `relu6=relu`
does what the paper does for MobileNetV2: the pair's relu6 becomes relu, then it is equalized. That changes the
fp32 function wherever a pre-activation exceeded the bound (stats `relu6_replaced`); int8 calibration then sees
the unclipped ranges.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from slimc.errors import PipelineError
from slimc.ir import Graph, Node
from slimc.pass_manager import PassContext, PassResult, opt, register_pass
from slimc.rewrite import Edit, merge_source, sole_user

#: fused or separate activations f with f(x / s) == f(x) / s for every s > 0
HOMOGENEOUS = ("none", "relu")
#: activations that are relu with an upper bound: equalized only with relu6=relu, as relu
BOUNDED = ("relu6", "clip")
RELU6_MODES = ("skip", "relu")
#: scales are kept within [1/MAX_SCALE, MAX_SCALE] so float32 weights of near-dead channels stay normal numbers
MAX_SCALE = 1e6


@dataclass(frozen=True)
class Pair:
    """Two layers to equalize: `first`'s output channels feed `second`'s input channels, maybe through `act_node`."""

    first: str
    second: str
    act_node: str | None  # a separate activation node between them (None: fused into `first`, or none)
    bounded: bool  # its activation is relu6 / clip(0, c), which equalizing turns into relu


def _activation(n: Node) -> str | None:
    """'none', 'relu' or 'bounded' for an activation equalization can handle (a fused one or a separate node)."""
    if n.op in ("conv2d", "dense"):
        act, lo, hi = n.attrs.get("act", "none"), n.attrs.get("clip_min"), n.attrs.get("clip_max")
    elif n.op in ("relu", "relu6", "clip"):
        act, lo, hi = n.op, n.attrs.get("min"), n.attrs.get("max")
    else:
        return None
    if act in HOMOGENEOUS:
        return act
    if act == "relu6" or (act == "clip" and lo == 0.0 and hi is not None and hi > 0.0):
        return "bounded"
    return None


def _own_params(g: Graph, n: Node) -> bool:
    """Whether `n`'s weight and bias are constants no other node reads (rescaling them changes only `n`)."""
    return all(g.is_param(p) and g.weights.get(p) is not None and len(g.users(p)) == 1 for p in n.inputs[1:])


def _channels_match(g: Graph, first: Node, second: Node) -> bool:
    """Whether `second`'s input channels are `first`'s output channels (conv -> conv on axis 1, dense -> dense)."""
    w1, w2 = g.weight(first.inputs[1]), g.weight(second.inputs[1])
    if first.op == "dense" and second.op == "dense":
        return w2.shape[1] == w1.shape[0]
    if first.op == "conv2d" and second.op == "conv2d":
        return w2.shape[1] * second.attrs["groups"] == w1.shape[0]
    return False


def find_pairs(g: Graph) -> list[Pair]:
    """Every layer -> [activation] -> layer chain whose middle value nothing else reads, in graph order."""
    pairs = []
    for first in g.nodes:
        if first.op not in ("conv2d", "dense") or not _own_params(g, first):
            continue
        kind = _activation(first)
        if kind is None:
            continue
        value, act_node = first.name, None
        nxt = sole_user(g, value)
        if kind == "none" and nxt is not None and nxt.op in ("relu", "relu6", "clip") and nxt.inputs[0] == value:
            kind, act_node, value = _activation(nxt), nxt.name, nxt.name
            if kind is None:
                continue
            nxt = sole_user(g, value)
        if nxt is None or nxt.op not in ("conv2d", "dense") or nxt.inputs[0] != value or value in nxt.inputs[1:]:
            continue
        if not _own_params(g, nxt) or not _channels_match(g, first, nxt):
            continue
        pairs.append(Pair(first.name, nxt.name, act_node, kind == "bounded"))
    return pairs


def output_ranges(w: np.ndarray) -> np.ndarray:
    """max |w| per output channel (axis 0)."""
    return np.abs(w.reshape(w.shape[0], -1)).max(axis=1)


def input_ranges(w: np.ndarray, groups: int = 1) -> np.ndarray:
    """max |w| per input channel of the layer: conv OIHW weights with `groups` groups, or dense [out, in] weights."""
    if w.ndim == 2:
        return np.abs(w).max(axis=0)
    o, cpg = w.shape[0], w.shape[1]
    r = np.abs(w.reshape(groups, o // groups, cpg, -1)).max(axis=(1, 3))  # [groups, in channels per group]
    return r.reshape(-1)


def scale_inputs(w: np.ndarray, s: np.ndarray, groups: int = 1) -> np.ndarray:
    """A copy of `w` with input channel i multiplied by s[i]."""
    if w.ndim == 2:
        return (w * s[None, :]).astype(w.dtype)
    o, cpg = w.shape[0], w.shape[1]
    shaped = w.reshape(groups, o // groups, cpg, -1) * s.reshape(groups, 1, cpg, 1)
    return shaped.reshape(w.shape).astype(w.dtype)


def equalizing_scales(r1: np.ndarray, r2: np.ndarray) -> np.ndarray:
    """s_i = sqrt(r1_i / r2_i) (both ranges become sqrt(r1_i * r2_i)); 1 where a channel is all zero."""
    r1, r2 = r1.astype(np.float64), r2.astype(np.float64)
    ok = (r1 > 0) & (r2 > 0)
    s = np.sqrt(np.where(ok, r1, 1.0) / np.where(ok, r2, 1.0))
    return np.clip(s, 1.0 / MAX_SCALE, MAX_SCALE)


def range_balance(g: Graph, pairs: list[Pair]) -> float:
    """Median over the pairs' shared channels of min(r1, r2) / max(r1, r2): 1.0 when fully equalized."""
    ratios = []
    for p in pairs:
        a, b = g.node(p.first), g.node(p.second)
        r1 = output_ranges(g.weight(a.inputs[1]))
        r2 = input_ranges(g.weight(b.inputs[1]), b.attrs.get("groups", 1))
        hi = np.maximum(r1, r2)
        ratios.append(np.where(hi > 0, np.minimum(r1, r2) / np.where(hi > 0, hi, 1.0), 1.0))
    return float(np.median(np.concatenate(ratios))) if ratios else 1.0


def equalize_weights(g: Graph, pairs: list[Pair], iterations: int, tol: float
                     ) -> tuple[dict[str, np.ndarray], int, float]:
    """New weight/bias arrays of the pairs' layers after sweeping the pairs until no scale moves more than `tol`
    (relative) or `iterations` sweeps; returns (arrays by parameter name, sweeps run, largest last |log s|)."""
    arrays: dict[str, np.ndarray] = {}

    def get(name: str) -> np.ndarray:
        return arrays[name] if name in arrays else g.weight(name)

    sweeps, moved = 0, 0.0
    for sweeps in range(1, iterations + 1):
        moved = 0.0
        for p in pairs:
            a, b = g.node(p.first), g.node(p.second)
            groups = b.attrs.get("groups", 1)
            w1, w2 = get(a.inputs[1]), get(b.inputs[1])
            s = equalizing_scales(output_ranges(w1), input_ranges(w2, groups))
            moved = max(moved, float(np.abs(np.log(s)).max(initial=0.0)))
            inv = (1.0 / s).astype(np.float64)
            arrays[a.inputs[1]] = (w1 * inv.reshape((-1,) + (1,) * (w1.ndim - 1))).astype(w1.dtype)
            if len(a.inputs) > 2:
                b1 = get(a.inputs[2])
                arrays[a.inputs[2]] = (b1 * inv).astype(b1.dtype)
            arrays[b.inputs[1]] = scale_inputs(w2, s, groups)
        if moved <= tol:
            break
    return arrays, sweeps, moved


@register_pass(
    "equalize",
    iterations=opt(int, 20, "sweeps over all pairs at most (a layer between two pairs needs several)"),
    tol=opt(float, 1e-4, "stop when no channel scale changes by more than this (relative)"),
    relu6=opt(str, "skip", "pairs joined by relu6/clip(0,c): skip (exact) | relu (replace by relu, as the paper)"),
)
def equalize(graph: Graph, ctx: PassContext) -> PassResult:
    """Balance the per-channel weight ranges of consecutive layers (exact rescaling) so int8 grids fit every channel."""
    o = ctx.options
    iterations, tol, relu6 = o.get("iterations", 20), o.get("tol", 1e-4), o.get("relu6", "skip")
    if relu6 not in RELU6_MODES:
        raise PipelineError(f"equalize: relu6={relu6!r} is not one of {', '.join(RELU6_MODES)}: 'skip' leaves pairs "
                            "joined by relu6 alone (exact), 'relu' replaces their relu6 by relu and equalizes them")
    if iterations < 1 or not tol >= 0:
        raise PipelineError(f"equalize: iterations={iterations} must be >= 1 and tol={tol} >= 0")
    found = find_pairs(graph)
    pairs = [p for p in found if relu6 == "relu" or not p.bounded]
    stats = {"pairs": len(pairs), "skipped_relu6": len(found) - len(pairs), "relu6_replaced": 0, "sweeps": 0,
             "balance_before": round(range_balance(graph, pairs), 4)}
    if not pairs:
        return PassResult(graph, False, {**stats, "balance_after": stats["balance_before"]})
    arrays, sweeps, moved = equalize_weights(graph, pairs, iterations, tol)
    e = Edit(graph)
    for name, a in arrays.items():
        e.set_param(name, a)
    replaced = 0
    for p in pairs:
        if not p.bounded:
            continue
        if p.act_node is None:
            n = graph.node(p.first)
            attrs = {k: v for k, v in n.attrs.items() if k not in ("clip_min", "clip_max")}
            e.replace_node(n.name, e.make_node(n.name, n.op, n.inputs, {**attrs, "act": "relu"}, n.source))
        else:
            n = graph.node(p.act_node)
            e.replace_node(n.name, e.make_node(n.name, "relu", n.inputs, {}, merge_source(n)))
        replaced += 1
    out = e.apply()
    stats.update(relu6_replaced=replaced, sweeps=sweeps, last_max_log_scale=round(moved, 6),
                 balance_after=round(range_balance(out, pairs), 4))
    return PassResult(out, True, stats)
