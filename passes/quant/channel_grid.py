"""Per-channel u8 grids for activations that only depthwise convs read: where they are exact, and how to fold them.

A depthwise conv's output channel c reads only its input channel c, so an input grid with one scale per channel
keeps one dequantization scale per output channel (x_scale[c] * w_scale[c]), which `qconv2d` already takes. The
producing conv folds the grid into its per-channel requantize scale (scale[c] / out_scale[c]), which needs an
activation that commutes with the scaling (piecewise linear through 0) and bounds that stay scalar on the grid:
every channel shares the zero point, and a bound that differs per channel must be one the u8 saturation already
applies (relu6 on channels whose calibrated max is <= 6 becomes relu). Everything else keeps a per-tensor grid.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from slimc.ir import Graph, Node
from slimc.passes.fuse import epilogue
from slimc.rewrite import sole_user

#: layers whose per-channel epilogue scale can take an output grid's per-channel 1/out_scale
PRODUCER_OPS = ("conv2d", "dense")


def is_depthwise(g: Graph, n: Node) -> bool:
    """Whether `n` is a conv2d whose output channel c reads input channel c only (groups == C_in == C_out)."""
    if n.op != "conv2d":
        return False
    x, w = g.type_of(n.inputs[0]), g.type_of(n.inputs[1])
    c = x.shape[1] if x.rank == 4 else None
    return isinstance(c, int) and n.attrs["groups"] == c and w.rank == 4 and w.shape[0] == c and w.shape[1] == 1


def read_by_depthwise_only(g: Graph, v: str) -> bool:
    """Whether every reader of `v` is a depthwise conv taking it as its input (and `v` is no graph output)."""
    users = g.users(v)
    return bool(users) and v not in g.outputs and not g.is_param(v) \
        and all(is_depthwise(g, u) and v == u.inputs[0] and v not in u.inputs[1:] for u in users)


def channel_values(g: Graph) -> list[str]:
    """Float activations that may get a per-channel grid (only depthwise convs read them): calibrate's candidates."""
    return [o for n in g.nodes for o, t in zip(n.outputs, n.out_types)
            if t.dtype == "float32" and t.rank == 4 and read_by_depthwise_only(g, o)] + \
           [v for v, t in g.inputs if t.dtype == "float32" and t.rank == 4 and read_by_depthwise_only(g, v)]


def producing_layer(g: Graph, v: str) -> tuple[Node, dict[str, Any]] | None:
    """The conv2d/dense computing `v` and its activation attributes (fused, or a sole following activation node)."""
    p = g.producer(v)
    if p is None:
        return None
    if p.op in PRODUCER_OPS:
        return p, {k: p.attrs[k] for k in ("act", "clip_min", "clip_max") if k in p.attrs}
    layer = g.producer(p.inputs[0]) if p.inputs else None
    epi = epilogue(p)
    if layer is None or layer.op not in PRODUCER_OPS or layer.attrs.get("act", "none") != "none" or epi is None \
            or sole_user(g, layer.name) is not p:
        return None
    return layer, epi


def _bounds(act: Mapping[str, Any]) -> tuple[float | None, float | None] | None:
    """The (lower, upper) bounds of a piecewise-linear-through-0 activation (None: unbounded); None for others."""
    kind = act.get("act", "none")
    if kind == "none":
        return None, None
    if kind == "relu":
        return 0.0, None
    if kind == "relu6":
        return 0.0, 6.0
    if kind == "clip":
        return act.get("clip_min"), act.get("clip_max")
    return None


def grid_activation(act: Mapping[str, Any], scale: np.ndarray, zero_point: int,
                    qbounds: tuple[int, int]) -> dict[str, Any] | None:
    """The scalar activation attributes computing `act` on the per-channel grid (value / scale[c]), or None.

    On the grid a bound b is b / scale[c]: per channel, unless it is 0 or the saturation to `qbounds` (the
    integer type's range, after adding `zero_point`) already applies it, in which case it is kept as 0 or dropped.
    """
    bounds = _bounds(act)
    if bounds is None:
        return None
    lo, hi = bounds
    s = np.asarray(scale, np.float64)
    qlo, qhi = qbounds
    if lo is not None and lo != 0.0 and not np.all(np.rint(lo / s) + zero_point <= qlo):
        return None
    if hi is not None and not np.all(np.rint(hi / s) + zero_point >= qhi):
        return None
    return {"act": "relu" if lo == 0.0 else "none"}
