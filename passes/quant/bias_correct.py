"""bias-correct: empirical bias correction (Nagel et al. 2019, sec. 4.2) of the int8 layers of a QDQ graph.

Quantization errors of weights and activations do not average out per channel (a depthwise 3x3 kernel's rounding
errors hardly cancel), so each output channel of an int8 layer is shifted by about E[y_float - y_int8]. Adding that
shift to the layer's float bias removes it; fold-qdq then quantizes the corrected bias into the int32 bias.

The reference is the float graph quantize was given (`PassContext.inputs_of["quantize"]`). Both graphs run side by
side, node by node, over all calibration samples at once, so each layer is measured with every earlier layer
already corrected: a correction also absorbs the mean error flowing in from upstream without being counted twice
(correcting all layers from one measurement over-corrects deep chains and diverges on MobileNetV2). The error is
taken before the fused activation, where a bias shift acts one-for-one, and averaged only where the float
pre-activation is in the activation's active range (0 < y < 6 for relu6): errors of values the activation clips
anyway do not matter, and counting them shifts the channel's useful values the wrong way.

Pair it with a non-clipping calibration (mse, minmax): after percentile or entropy ranges the error is dominated
by clipped outliers, whose mean is no constant offset, and the correction can hurt (see bench/fidelity.py).
"""

from __future__ import annotations

import numpy as np

from slimc.errors import PipelineError
from slimc.ir import Graph
from slimc.pass_manager import PassContext, PassResult, opt, register_pass
from slimc.passes.quant.qdq import Samples, Sweep, check_twins, float_model, input_chunks, int8_nodes, load_samples
from slimc.rewrite import Edit

WHO = "bias-correct"


def channel_axis(g: Graph, name: str) -> int:
    """The channel axis of a layer's output: 1 for conv2d (NCHW), the last one for dense."""
    return 1 if g.node(name).op == "conv2d" else -1


def with_bias_shift(g: Graph, shifts: dict[str, np.ndarray]) -> Graph:
    """`g` with `shifts[layer]` added to each layer's float bias (a bias is added where a layer has none)."""
    e = Edit(g)
    for name, shift in shifts.items():
        n = g.node(name)
        if len(n.inputs) > 2:
            b = n.inputs[2]
            new = (g.weight(b).astype(np.float64) + shift).astype(np.float32)
            if len(g.users(b)) == 1:
                e.set_param(b, new)
                continue
            bias = e.add_param(f"{name}.bias", new)
        else:
            bias = e.add_param(f"{name}.bias", shift.astype(np.float32))
        e.replace_node(name, e.make_node(name, n.op, (n.inputs[0], n.inputs[1], bias), n.attrs, n.source))
    return e.apply()


def active_mask(pre: "torch.Tensor", attrs) -> "torch.Tensor | None":
    """Where the fused activation passes changes of its input on (None: everywhere): 0 < y for relu, 0 < y < 6 for
    relu6, inside the bounds for clip."""
    act = attrs.get("act", "none")
    if act == "relu":
        return pre > 0
    if act == "relu6":
        return (pre > 0) & (pre < 6)
    if act == "clip":
        lo, hi = attrs.get("clip_min"), attrs.get("clip_max")
        mask = pre == pre
        if lo is not None:
            mask &= pre > lo
        if hi is not None:
            mask &= pre < hi
        return mask
    return None


def sequential_shifts(q: Graph, f: Graph, layers: list[str], samples: Samples, batch_size: int,
                      active_only: bool) -> dict[str, np.ndarray]:
    """Per-layer bias shifts found in one sweep of the float and QDQ graphs side by side over all samples, node by
    node in graph order: each layer's pre-activation error is measured with every earlier layer already corrected
    and its mean (over the float activation's active region if `active_only`) is added. Every sample's live
    activations are held at once (memory ~ 2 x samples x the widest point of the network)."""
    import torch

    from slimc import interpreter

    todo = set(layers)
    chunks = input_chunks(q, samples, batch_size)
    sweep_q, sweep_f = Sweep(q, chunks), Sweep(f, chunks)
    f_index = {n.name: i for i, n in enumerate(f.nodes)}
    shifts: dict[str, np.ndarray] = {}
    pre_f: list = []
    with torch.no_grad():
        for i, n in enumerate(q.nodes):
            if n.name not in todo:
                sweep_q.run(i)
                continue
            while sweep_f.done <= f_index[n.name]:  # the float graph catches up, keeping this layer's pre-activation
                if f.nodes[sweep_f.done].name == n.name:
                    pre_f = sweep_f.run(sweep_f.done, keep_linear=True) or []
                else:
                    sweep_f.run(sweep_f.done)
            pre_q = sweep_q.linear(i)
            ax = channel_axis(q, n.name) % pre_q[0].dim()
            dims = tuple(d for d in range(pre_q[0].dim()) if d != ax)
            total = torch.zeros(pre_q[0].shape[ax], dtype=torch.float64)
            count = torch.zeros_like(total)
            for pf, pq in zip(pre_f, pre_q):
                err = (pf - pq).double()
                mask = active_mask(pf, n.attrs) if active_only else None
                w = torch.ones_like(err) if mask is None else mask.double()
                total += (err * w).sum(dim=dims)
                count += w.sum(dim=dims)
            shift = torch.where(count > 0, total / count.clamp(min=1.0), torch.zeros_like(total))
            shifts[n.name] = shift.numpy()
            shape = [1] * pre_q[0].dim()
            shape[ax] = -1
            sweep_q.finish(i, [interpreter.apply_activation(p + shift.float().reshape(shape), n.attrs) for p in pre_q])
    return shifts


def correct(q: Graph, f: Graph, samples: Samples, batch_size: int, active_only: bool = True, log=lambda msg: None
            ) -> tuple[Graph, list[str], float]:
    """The QDQ graph `q` with bias corrections against float graph `f`: (graph, layers, mean |shift|)."""
    layers = [n.name for n in int8_nodes(q, ("conv2d", "dense"))]
    check_twins(q, f, [q.node(n) for n in layers], WHO)
    if not layers:
        return q, [], 0.0
    shifts = sequential_shifts(q, f, layers, samples, batch_size, active_only)
    mean_abs = float(np.mean([np.abs(s).mean() for s in shifts.values()]))
    log(f"{WHO}: {len(layers)} layers, mean |E[float] - E[int8]| per channel {mean_abs:.4g}")
    return with_bias_shift(q, shifts), layers, mean_abs


@register_pass(
    WHO,
    samples=opt(int, 64, "calibration samples to average over (0: all); all of them are held in memory at once"),
    batch_size=opt(int, 16, "samples per interpreter call"),
    active_only=opt(bool, True, "average the error only where the float activation passes it on (relu: y > 0)"),
)
def bias_correct(graph: Graph, ctx: PassContext) -> PassResult:
    """Add each int8 conv/dense channel's mean output error (float minus int8, before the activation) to its bias."""
    o = ctx.options
    limit, batch_size = o.get("samples", 64), o.get("batch_size", 16)
    if limit < 0 or batch_size < 1:
        raise PipelineError(f"{WHO}: samples={limit} must be >= 0 (0: all) and batch_size={batch_size} >= 1")
    f = float_model(ctx, WHO)
    samples = load_samples(ctx.calibration_data, limit, WHO)
    out, layers, mean_abs = correct(graph, f, samples, batch_size, o.get("active_only", True), ctx.log)
    stats = {"layers": len(layers), "samples": len(samples), "mean_abs_shift": round(mean_abs, 6)}
    return PassResult(out, bool(layers), stats)
