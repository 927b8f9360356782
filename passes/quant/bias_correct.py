"""bias-correct: empirical bias correction (Nagel et al. 2019, sec. 4.2) of the int8 layers of a QDQ graph.

Quantization errors of weights and activations do not average out per channel (a depthwise 3x3 kernel's rounding
errors hardly cancel), so each output channel of an int8 layer is shifted by E[y_float - y_int8]. Adding that
shift to the layer's float bias removes it; fold-qdq then quantizes the corrected bias into the int32 bias.

The expectation is taken on calibration data, before the layer's activation: relu/relu6 are not linear, and the
post-activation error of a channel is biased by the clipping itself (values below 0 all map to 0 either way), so
only the pre-activation mean is what a bias shift moves one-for-one. The reference is the float graph quantize
was given; the int8 side is the QDQ graph with the errors of every layer before it, so a correction also absorbs
the mean error flowing in from upstream. All layers are measured in one run and corrected together; as a layer's
correction also changes what later layers receive, the measurement is repeated (`rounds`) on the corrected graph
and the residual added, which converges in two or three rounds (stats `mean_abs_error_by_round`).
"""

from __future__ import annotations

import numpy as np

from slimc.errors import PipelineError
from slimc.ir import Graph
from slimc.pass_manager import PassContext, PassResult, opt, register_pass
from slimc.passes.quant.qdq import (Samples, batches, channel_means, check_twins, expose_preactivations, float_model,
                                    int8_nodes, load_samples)
from slimc.rewrite import Edit

WHO = "bias-correct"


def channel_axis(g: Graph, name: str) -> int:
    """The channel axis of a layer's output: 1 for conv2d (NCHW), the last one for dense."""
    return 1 if g.node(name).op == "conv2d" else -1


def preactivation_means(g: Graph, names: list[str], samples: Samples, batch_size: int) -> dict[str, np.ndarray]:
    """Per-channel mean of each named layer's output before its activation."""
    split, pre = expose_preactivations(g, names)
    return channel_means(split, pre, samples, batch_size, lambda name: channel_axis(g, name))


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


def _last_uses(g: Graph) -> list[list[str]]:
    """For each node index, the activation values read for the last time there (freed as the sweep goes)."""
    last: dict[str, int] = {}
    for i, n in enumerate(g.nodes):
        for v in n.inputs:
            if not g.is_param(v):
                last[v] = i
    out: list[list[str]] = [[] for _ in g.nodes]
    for v, i in last.items():
        if v not in g.outputs:
            out[i].append(v)
    return out


def sequential_shifts(q: Graph, layers: list[str], target: dict[str, np.ndarray], samples: Samples,
                      batch_size: int) -> dict[str, np.ndarray]:
    """Per-layer bias shifts found in one sweep of `q` over all samples, node by node in graph order: each layer's
    pre-activation mean is measured with every earlier layer already corrected, then shifted onto `target`.
    Every sample's live activations are held at once (memory ~ samples x the widest point of the network)."""
    import torch

    from slimc import interpreter

    todo = set(layers)
    module = interpreter.GraphModule(q)
    dtypes = [getattr(torch, t.dtype) for _, t in q.inputs]
    envs = [{name: torch.as_tensor(np.ascontiguousarray(a)).to(dt) for (name, _), a, dt in zip(q.inputs, b, dtypes)}
            for b in batches(q, samples, batch_size)]
    frees = _last_uses(q)
    shifts: dict[str, np.ndarray] = {}
    with torch.no_grad():
        for i, n in enumerate(q.nodes):
            def args(env: dict) -> list:
                return [env[v] if v in env else module.tensor(v) for v in n.inputs]

            if n.name in todo:
                linear = n.replace(attrs={**n.attrs, "act": "none", "clip_min": None, "clip_max": None})
                pres = [interpreter.run_node(linear, args(env))[0] for env in envs]
                ax = channel_axis(q, n.name) % pres[0].dim()
                dims = tuple(d for d in range(pres[0].dim()) if d != ax)
                total = sum(p.double().sum(dim=dims) for p in pres)
                count = sum(p.numel() // p.shape[ax] for p in pres)
                shifts[n.name] = target[n.name] - (total / count).numpy()
                shape = [1] * pres[0].dim()
                shape[ax] = -1
                shift = torch.from_numpy(shifts[n.name].astype(np.float32)).reshape(shape)
                for env, pre in zip(envs, pres):
                    env[n.name] = interpreter.apply_activation(pre + shift, n.attrs)
            else:
                for env in envs:
                    env.update(zip(n.outputs, interpreter.run_node(n, args(env))))
            for env in envs:
                for v in frees[i]:
                    env.pop(v, None)
    return shifts


def correct(q: Graph, f: Graph, samples: Samples, batch_size: int, log=lambda msg: None
            ) -> tuple[Graph, list[str], float]:
    """The QDQ graph `q` with bias corrections against float graph `f`: (graph, layers, mean |shift|)."""
    layers = [n.name for n in int8_nodes(q, ("conv2d", "dense"))]
    check_twins(q, f, [q.node(n) for n in layers], WHO)
    if not layers:
        return q, [], 0.0
    target = preactivation_means(f, layers, samples, batch_size)
    shifts = sequential_shifts(q, layers, target, samples, batch_size)
    mean_abs = float(np.mean([np.abs(s).mean() for s in shifts.values()]))
    log(f"{WHO}: {len(layers)} layers, mean |E[float] - E[int8]| per channel {mean_abs:.4g}")
    return with_bias_shift(q, shifts), layers, mean_abs


@register_pass(
    WHO,
    samples=opt(int, 64, "calibration samples to average over (0: all); all of them are held in memory at once"),
    batch_size=opt(int, 16, "samples per interpreter call"),
)
def bias_correct(graph: Graph, ctx: PassContext) -> PassResult:
    """Add each int8 conv/dense channel's mean output error (float minus int8, before the activation) to its bias."""
    o = ctx.options
    limit, batch_size = o.get("samples", 64), o.get("batch_size", 16)
    if limit < 0 or batch_size < 1:
        raise PipelineError(f"{WHO}: samples={limit} must be >= 0 (0: all) and batch_size={batch_size} >= 1")
    f = float_model(ctx, WHO)
    samples = load_samples(ctx.calibration_data, limit, WHO)
    out, layers, mean_abs = correct(graph, f, samples, batch_size, ctx.log)
    stats = {"layers": len(layers), "samples": len(samples), "mean_abs_shift": round(mean_abs, 6)}
    return PassResult(out, bool(layers), stats)
