"""quant-fallback: per-layer int8 sensitivity, and fallback of the worst layers until an accuracy budget holds.

Sensitivity of an int8 node (conv2d, dense or add) is the SQNR (dB) of the model's outputs against the float model
when only that node runs in int8, everything else in float; for `to=int16` it is the SQNR gain of widening only
that node's activation grids in the int8 model. Falling back to float (`to=float`) means the node
reads float operands and the float model's weights and bias again; QDQ pairs that no int8 node reads any more go
away. Falling back to int16 (`to=int16`) keeps the node's int8 weights and integer arithmetic but widens the grids
of the activations it reads to uint16 (`wide`: up to 2^16 levels, as many as its int32 sums allow).
`to=int16+float` is a ladder: nodes are widened first; if widening every node still misses the budget (the error
is in the int8 weights), nodes of the all-widened model go back to float, ranked by the SQNR gain of putting each
alone in float there.
The budget is an output-SQNR floor and/or a largest drop of a metric measured against the model before the
pipeline: top-1 agreement with it by default, or a user's `module:callable(logits, labels) -> float` (higher is
better) on labelled data. The worst nodes fall back first; the smallest such prefix that meets the budget is found
by doubling then bisecting over the prefix length (the metric need not be monotonic, so it is a good, not the
least, set). If bias-correct ran before, sensitivities are measured without it and every candidate is corrected
again from scratch (corrections measured with a layer in int8 over-correct once it is float). Without a budget the
pass only reports the sensitivities.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import numpy as np

from slimc import ops
from slimc.errors import PipelineError
from slimc.ir import Graph, Node
from slimc.pass_manager import PassContext, PassResult, compare, opt, register_pass
from slimc.passes.quant.bias_correct import correct
from slimc.passes.quant.fold import dequantized_weight
from slimc.passes.quant.qdq import (Samples, activation_source, check_twins, float_model, float_source, int8_nodes,
                                    load_samples, run_outputs)
from slimc.passes.quant.wide import observed_ranges, widen
from slimc.rewrite import Edit, eliminate_dead_code

WHO = "quant-fallback"
#: what `to=` does to a node, as the log says it
FALLBACKS = {"float": "in float", "int16": "with int16 activations",
             "int16+float": "with int16 activations, then in float"}
#: ops whose output reuses their input's grid (quantize's PRESERVING_OPS): their input stays quantized if they do
PRESERVING_OPS = ("max_pool2d", "flatten", "reshape")

Metric = Callable[[np.ndarray, np.ndarray | None], float]


def agreement(logits: np.ndarray, reference: np.ndarray) -> float:
    """Share of samples whose argmax over the last axis matches the reference's."""
    return float((np.argmax(logits, -1) == np.argmax(reference, -1)).mean())


def load_metric(spec: str) -> Metric:
    """The user metric `package.module:callable` as fn(logits, labels) -> float (higher is better)."""
    mod, sep, attr = spec.partition(":")
    if not sep or not mod or not attr:
        raise PipelineError(f"{WHO}: metric={spec!r} is neither 'agreement' nor 'package.module:callable' "
                            "naming fn(logits, labels) -> float (higher is better)")
    try:
        fn = getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError) as e:
        raise PipelineError(f"{WHO}: cannot load metric {spec!r}: {e}") from None
    if not callable(fn):
        raise PipelineError(f"{WHO}: metric {spec!r} is not callable")
    return fn


def _needed_activations(g: Graph) -> set[str]:
    """Dequantized activation values some int8 node reads (through grid-preserving ops too)."""
    need: set[str] = set()
    for n in g.nodes:
        if n.op in ("conv2d", "dense") and dequantized_weight(g, n.inputs[1]) is not None:
            need.add(n.inputs[0])
        elif n.op == "add" and all(activation_source(g, i) is not None for i in n.inputs):
            need.update(n.inputs)
    for n in reversed(g.nodes):  # a preserving op whose requantized output is needed keeps its input's QDQ
        if n.op in PRESERVING_OPS:
            if any(u.op == "quantize" and any(d.name in need for d in g.users(u.name)) for u in g.users(n.name)):
                need.add(n.inputs[0])
    return {v for v in need if activation_source(g, v) is not None}


def float_fallback(q: Graph, f: Graph, names: Collection[str]) -> Graph:
    """`q` with the named int8 nodes computing in float again (float operands; `f`'s weights and bias), and the
    activation QDQ pairs that no int8 node reads any more removed."""
    e = Edit(q)
    for name in names:
        n, m = q.node(name), f.node(name)
        if m.op in ("conv2d", "dense"):
            params = [e.add_param(p, f.weight(p)) for p in m.inputs[1:]]
            ins: tuple[str, ...] = (float_source(q, n.inputs[0]), *params)
        else:
            ins = tuple(float_source(q, i) for i in n.inputs)
        e.replace_node(name, e.make_node(name, m.op, ins, m.attrs, n.source))
    g = e.apply()
    need = _needed_activations(g)
    e = Edit(g)
    for n in g.nodes:
        if n.op == "dequantize" and not g.is_param(n.inputs[0]) and n.name not in need:
            src = activation_source(g, n.name)
            if src is not None:
                e.replace_uses(n.name, src)
    return eliminate_dead_code(e.apply())[0]


def sqnr_db(outputs: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> float:
    """Output SQNR (dB) over all samples and outputs, as the pass manager's numeric check reports it."""
    return float(compare(outputs, reference).sqnr_db)


@dataclass(frozen=True)
class Budget:
    """What the int8 model must keep: an output-SQNR floor (dB) and/or a largest metric drop (None: no bound)."""

    sqnr_floor: float | None
    max_drop: float | None
    metric: str

    def check(self, outputs: Sequence[np.ndarray], ref: Sequence[np.ndarray], samples: Samples,
              ref_metric: float | None, metric: Metric | None) -> tuple[bool, dict]:
        """Whether `outputs` meet the budget, and the figures it was judged on."""
        figures = {"output_sqnr_db": round(sqnr_db(outputs, ref), 2)}
        ok = self.sqnr_floor is None or figures["output_sqnr_db"] >= self.sqnr_floor
        if self.max_drop is not None:
            value = agreement(outputs[0], ref[0]) if metric is None else float(metric(outputs[0], samples.labels))
            figures[self.metric] = round(value, 6)
            ok = ok and (ref_metric or 0.0) - value <= self.max_drop + 1e-12
        return ok, figures


def grid_nodes(g: Graph, dtype: str) -> set[str]:
    """Names of the int8 nodes of QDQ graph `g` whose activation operands all come from `dtype` grids."""
    return {n.name for n in int8_nodes(g)
            if all(g.type_of(g.producer(v).inputs[0]).dtype == dtype
                   for v in (n.inputs[:1] if n.op in ("conv2d", "dense") else n.inputs))}


def mac_share(g: Graph, nodes: Collection[str]) -> float:
    """Share of the graph's MACs in the named nodes."""
    total = part = 0
    for n in g.nodes:
        m = ops.macs(n.op, [g.type_of(i) for i in n.inputs], n.out_types, n.attrs)
        total += m
        part += m if n.name in nodes else 0
    return part / total if total else 0.0


def _per_node_sqnr(ref: list[np.ndarray], names: Sequence[str], variant: Callable[[str], Graph], samples: Samples,
                   batch_size: int, what: str, log) -> dict[str, float]:
    """Output SQNR (dB) vs the outputs `ref` of `variant(name)` for each node name, with progress as `what`."""
    out: dict[str, float] = {}
    for i, name in enumerate(names):
        out[name] = sqnr_db(run_outputs(variant(name), samples, batch_size), ref)
        if (i + 1) % 10 == 0 or i + 1 == len(names):
            log(f"{WHO}: {what} {i + 1}/{len(names)}")
    return out


def sensitivities(q: Graph, f: Graph, nodes: Sequence[Node], samples: Samples, batch_size: int,
                  log=lambda msg: None) -> dict[str, float]:
    """Output SQNR (dB) vs `f` with only one int8 node of `q` kept in int8, for each node."""
    names = [n.name for n in nodes]
    sqnr = _per_node_sqnr(run_outputs(f, samples, batch_size), names,
                          lambda name: float_fallback(q, f, [m for m in names if m != name]), samples, batch_size,
                          "sensitivity", log)
    return {name: round(db, 2) for name, db in sqnr.items()}


def _gains(q: Graph, f: Graph, nodes: Sequence[Node], variant: Callable[[str], Graph], samples: Samples,
           batch_size: int, what: str, log) -> dict[str, float]:
    """Output SQNR gain (dB, vs `f`) of `variant(name)` over `q` itself, for each node."""
    ref = run_outputs(f, samples, batch_size)
    before = sqnr_db(run_outputs(q, samples, batch_size), ref)
    sqnr = _per_node_sqnr(ref, [n.name for n in nodes], variant, samples, batch_size, what, log)
    return {name: round(db - before, 3) for name, db in sqnr.items()}


def widening_gains(q: Graph, f: Graph, nodes: Sequence[Node], samples: Samples, batch_size: int,
                   ranges: dict[str, tuple[float, float]] | None, log=lambda msg: None) -> dict[str, float]:
    """Output SQNR gain (dB, vs `f`) of widening only one int8 node's activation grids in `q`, for each node: what
    falling back to int16 buys there (a node whose error is its weights' gains nothing)."""
    return _gains(q, f, nodes, lambda name: widen(q, [name], ranges)[0], samples, batch_size, "widening gain", log)


def float_gains(q: Graph, f: Graph, nodes: Sequence[Node], samples: Samples, batch_size: int,
                log=lambda msg: None) -> dict[str, float]:
    """Output SQNR gain (dB, vs `f`) of putting only one int8 node of `q` back in float, for each node: where the
    int8 error that wider activation grids cannot remove (its weights') is."""
    return _gains(q, f, nodes, lambda name: float_fallback(q, f, [name]), samples, batch_size, "float gain", log)


def _smallest_prefix(attempt: Callable[[int], bool], lo: int, cap: int) -> int | None:
    """A small k in (lo, cap] with attempt(k) true, `lo` known to miss: lo + 1, 2, 4, ... until one meets, then
    bisection (None: even `cap` misses)."""
    base, step = lo, 1
    k = min(base + step, cap)
    while k < cap and not attempt(k):
        lo, step = k, 2 * step
        k = min(base + step, cap)
    if k <= lo or not attempt(k):
        return None
    hi = k
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if attempt(mid):
            hi = mid
        else:
            lo = mid
    return hi


def _before_bias_correction(graph: Graph, f: Graph, ctx: PassContext) -> tuple[Graph, Callable[[Graph], Graph] | None]:
    """The QDQ graph before bias-correct and a function redoing that correction on a candidate, if bias-correct ran
    on this graph; else (graph, None). A correction measured with a layer in int8 is wrong once it is float again."""
    given = ctx.inputs_of.get("bias-correct")
    if given is None or [n.name for n in int8_nodes(given.graph)] != [n.name for n in int8_nodes(graph)]:
        return graph, None
    opts = given.options
    samples = load_samples(ctx.calibration_data, opts.get("samples", 64), WHO)

    def redo(g: Graph) -> Graph:
        return correct(g, f, samples, opts.get("batch_size", 16), opts.get("active_only", True))[0]

    return given.graph, redo


def _budget(ctx: PassContext) -> Budget:
    o = ctx.options
    floor, drop, metric = o.get("sqnr_floor", 0.0), o.get("max_drop", -1.0), o.get("metric", "agreement")
    if floor < 0 or math.isnan(floor):
        raise PipelineError(f"{WHO}: sqnr_floor={floor} must be >= 0 dB (0: no floor)")
    if drop != -1.0 and not 0.0 <= drop <= 1.0:
        raise PipelineError(f"{WHO}: max_drop={drop} must lie in [0, 1] (e.g. 0.02 for at most 2 points of top-1 "
                            "agreement or accuracy), or be -1 for no bound")
    return Budget(floor or None, None if drop == -1.0 else drop, metric)


@register_pass(
    WHO,
    sqnr_floor=opt(float, 0.0, "smallest output SQNR (dB) vs the float model to keep (0: no floor)"),
    max_drop=opt(float, -1.0, "largest drop of the metric vs the model before the pipeline, in [0, 1] (-1: none)"),
    metric=opt(str, "agreement", "agreement (top-1 with the float model) or package.module:callable(logits, labels)"),
    samples=opt(int, 0, "samples (of --data, else --calib) the budget is checked on (0: all)"),
    sensitivity_samples=opt(int, 16, "samples per sensitivity run (one run per int8 node)"),
    max_layers=opt(int, 0, "most nodes to fall back; with int16+float, most to put in float (0: as many as the "
                           "budget needs)"),
    batch_size=opt(int, 16, "samples per interpreter call"),
    to=opt(str, "float", "float (the node computes in float again), int16 (it keeps int8 weights and reads "
                         "uint16 activations: two vpdpbusd or sdot convs over its bytes, generic int32 kernels "
                         "elsewhere) or "
                         "int16+float (int16 first; if all int16 misses, nodes go on to float)"),
)
def quant_fallback(graph: Graph, ctx: PassContext) -> PassResult:
    """Rank int8 layers by output SQNR when only they are int8; put the worst back in float (or give them wide
    activation grids) until the budget holds."""
    o = ctx.options
    budget = _budget(ctx)
    to = o.get("to", "float")
    if to not in FALLBACKS:
        raise PipelineError(f"{WHO}: to={to!r} is none of float (layers compute in float again), int16 (layers "
                            "keep int8 weights and read 16-bit activations) and int16+float (int16 first, then "
                            "float where int16 is not enough)")
    limit, sens_n, max_layers, bs = o.get("samples", 0), o.get("sensitivity_samples", 16), o.get("max_layers", 0), \
        o.get("batch_size", 16)
    if limit < 0 or sens_n < 1 or max_layers < 0 or bs < 1:
        raise PipelineError(f"{WHO}: samples={limit} and max_layers={max_layers} must be >= 0, "
                            f"sensitivity_samples={sens_n} and batch_size={bs} >= 1")
    metric = None if budget.metric == "agreement" else load_metric(budget.metric)
    f = float_model(ctx, WHO)
    nodes = int8_nodes(graph)
    check_twins(graph, f, nodes, WHO)
    data = ctx.data if ctx.data is not None else ctx.calibration_data
    samples = load_samples(data, limit, WHO)
    if metric is not None and budget.max_drop is not None and samples.labels is None:
        raise PipelineError(f"{WHO}: metric={budget.metric} needs labelled data (--data with labels), but the data "
                            "has none; use the default metric=agreement or give labels")
    reference = ctx.reference if ctx.reference is not None else f
    ref = run_outputs(reference, samples, bs)
    ref_metric = 1.0 if metric is None else float(metric(ref[0], samples.labels))

    base, redo = _before_bias_correction(graph, f, ctx)
    calib = ctx.calibration_data if ctx.calibration_data is not None else data
    ranges = None if to == "float" else observed_ranges(f, load_samples(calib, 0, WHO), bs)
    head = samples.head(sens_n)
    if to == "float":
        sens = sensitivities(base, f, nodes, head, bs, ctx.log)
        order = sorted(sens, key=lambda name: sens[name])
    else:
        sens = widening_gains(base, f, nodes, head, bs, ranges, ctx.log)
        order = sorted(sens, key=lambda name: -sens[name])
    stats: dict = {"int8_nodes": len(nodes), "sensitivity_db" if to == "float" else "widening_gain_db": sens,
                   "budget": {"sqnr_floor": budget.sqnr_floor, "max_drop": budget.max_drop, "metric": budget.metric,
                              "reference_metric": ref_metric, "samples": len(samples)}}
    if budget.sqnr_floor is None and budget.max_drop is None:
        return PassResult(graph, False, {**stats, "fallback": [], "to": to, "met": None})

    widened = len(order) if to != "float" else 0  # prefix steps past this one put nodes in float (int16+float)
    floats: list[str] = []

    def candidate(k: int) -> Graph:
        if to == "float":
            return float_fallback(base, f, order[:k])
        g = widen(base, order[:min(k, widened)], ranges)[0]
        return float_fallback(g, f, floats[:k - widened]) if k > widened else g

    def describe(k: int) -> str:
        if to == "float" or k <= widened:
            return f"{k} node(s) {FALLBACKS[to.partition('+')[0]]}"
        return f"{widened} node(s) with int16 activations, {k - widened} of them in float"

    tried: dict[int, tuple[bool, dict, Graph]] = {}

    def attempt(k: int) -> bool:
        if k not in tried:
            g = graph if k == 0 else candidate(k)
            g = redo(g) if k and redo is not None else g
            ok, figures = budget.check(run_outputs(g, samples, bs), ref, samples, ref_metric, metric)
            tried[k] = (ok, figures, g)
            ctx.log(f"{WHO}: {describe(k)}: {figures} -> {'meets' if ok else 'misses'} the budget")
        return tried[k][0]

    cap = min(max_layers or len(order), len(order))
    if attempt(0):
        k: int | None = 0
    elif to != "int16+float" or attempt(widened):
        k = _smallest_prefix(attempt, 0, cap if to != "int16+float" else widened)
    else:  # widening everything is not enough: float steps on the all-widened model
        gains = float_gains(candidate(widened), f, nodes, head, bs, ctx.log)
        floats = sorted(gains, key=lambda name: -gains[name])
        stats["float_gain_db"] = gains
        cap = widened + min(max_layers or len(floats), len(floats))
        k = _smallest_prefix(attempt, widened, cap)
    k = cap if k is None else k
    ok, figures, out = tried[k]

    def steps(j: int) -> dict:
        return {"nodes": j} if to != "int16+float" else {"nodes": min(j, widened), "in_float": max(j - widened, 0)}

    def shares(j: int) -> dict:
        return {f"{bits}_mac_share": round(mac_share(f, grid_nodes(tried[j][2], dtype)), 4)
                for bits, dtype in (("int8", "uint8"), ("int16", "uint16"))}

    stats.update({"fallback": order[:min(k, widened) if to != "float" else k], "to": to, "met": ok,
                  "before": tried[0][1], "after": figures, **shares(k),
                  "tried": [{**steps(j), **tried[j][1], **shares(j)} for j in sorted(tried)]})
    if to == "int16+float":
        stats["float"] = floats[:max(k - widened, 0)]
    if not ok:
        ctx.log(f"warning: {WHO}: the budget is not met with {describe(k)} ({figures}); raise "
                "max_layers or relax sqnr_floor / max_drop")
    return PassResult(out, k > 0, stats)
