"""Apply a pruning plan: physically remove channel units from every tensor, parameter and attribute (the `prune` pass).

The plan is a boolean mask over the analysis' units. Each node is rebuilt with `ops.make_node`, so type inference
re-derives every shape; it must agree with the shapes the channel plan predicts, which is what makes the MAC and
parameter counts of `predict` the real ones.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from slimc import ops
from slimc.errors import IRError, PipelineError
from slimc.ir import Graph, Node, TensorType
from slimc.pass_manager import PassContext, PassResult, opt, register_pass
from slimc.passes.prune.dependency import Analysis, analyze, node_label, view_of
from slimc.passes.prune.importance import CRITERIA, PruneConfig, parse_names, parse_overrides, select
from slimc.passes.prune.rules import CHANNEL_RULES, Kept
from slimc.stats import graph_stats

#: slicing of one parameter operand: ((axis, kept indices), ...)
Slicing = tuple[tuple[int, tuple[int, ...]], ...]


@dataclass(frozen=True)
class NodePlan:
    """One node after pruning: its operands (parameters possibly renamed), their types, attributes, output types."""

    node: Node
    inputs: tuple[str, ...]
    in_types: tuple[TensorType, ...]
    attrs: Mapping[str, Any]
    out_types: tuple[TensorType, ...]


@dataclass(frozen=True, eq=False)
class ShrinkPlan:
    """Every node's new form and every parameter's new slicing, derived from the channel plan alone."""

    nodes: tuple[NodePlan, ...]
    params: Mapping[str, tuple[str, Slicing]]  # new parameter name -> (old name, slicing)
    param_types: Mapping[str, TensorType] = field(default_factory=dict)


def _shrunk(t: TensorType, axis: int | None, kept: np.ndarray | None) -> TensorType:
    if axis is None or kept is None:
        return t
    shape = list(t.shape)
    shape[axis] = len(kept)
    return t.with_shape(shape)


def plan_shapes(g: Graph, a: Analysis, pruned: np.ndarray) -> ShrinkPlan:
    """New types, attributes and parameter slicings for removing the units in `pruned` (bool mask over units)."""
    if pruned.shape != (a.num_units,):
        raise IRError(f"prune: the plan covers {pruned.shape} units but the analysis has {a.num_units}")
    if (pruned & a.blocked_units).any():
        raise IRError("prune: the plan removes channels that must stay (blocked units)")
    kept = {v: a.kept(v, pruned) for v in a.unit_of}
    emptied = [v for v, k in kept.items() if k is not None and not len(k) and len(a.unit_of[v])]
    if emptied:
        raise IRError(f"prune: the plan removes every channel of %{emptied[0]}")
    values = [*g.input_names, *(o for n in g.nodes for o in n.outputs)]
    vtypes = {v: _shrunk(g.type_of(v), a.axes.get(v), kept.get(v)) for v in values}
    slicings: dict[tuple[str, int], Slicing] = {}
    for n in g.nodes:
        per_slot: dict[int, list[tuple[int, tuple[int, ...]]]] = {}
        for m in a.maps[n.name].members:
            v = n.inputs[m.port[1]] if m.port[0] == "in" else n.outputs[m.port[1]]
            k = kept.get(v)
            if k is not None and len(k) != len(a.unit_of[v]):
                per_slot.setdefault(m.slot, []).append((m.axis, tuple(int(i) for i in k)))
        for slot, s in per_slot.items():
            slicings[(n.name, slot)] = tuple(sorted(s))
    # a parameter read by several nodes keeps its name for one slicing; others get a fresh name
    names: dict[tuple[str, Slicing], str] = {}
    by_param: dict[str, list[Slicing]] = {}
    for n in g.nodes:
        for slot, v in enumerate(n.inputs):
            if g.is_param(v):
                by_param.setdefault(v, []).append(slicings.get((n.name, slot), ()))
    taken = set(g.value_types) | {n.name for n in g.nodes}
    for p, specs in by_param.items():
        first = () if () in specs else specs[0]
        for s in dict.fromkeys(specs):
            if s == first:
                names[(p, s)] = p
            else:
                i = 1
                while f"{p}.pruned{i}" in taken:
                    i += 1
                names[(p, s)] = f"{p}.pruned{i}"
                taken.add(names[(p, s)])
    params: dict[str, tuple[str, Slicing]] = {new: (p, s) for (p, s), new in names.items()}
    ptypes: dict[str, TensorType] = {p: t for p, t in g.param_types.items() if p not in by_param}
    params.update((p, (p, ())) for p in ptypes)
    for new, (p, s) in list(params.items()):
        shape = list(g.param_types[p].shape)
        for axis, idx in s:
            shape[axis] = len(idx)
        ptypes[new] = g.param_types[p].with_shape(shape)
    nodes = []
    for n in g.nodes:
        inputs = tuple(names[(v, slicings.get((n.name, slot), ()))] if g.is_param(v) else v
                       for slot, v in enumerate(n.inputs))
        in_types = tuple(ptypes[i] if i in ptypes else vtypes[i] for i in inputs)
        rule = CHANNEL_RULES.get(n.op)
        attrs = dict(n.attrs)
        touched = [v for v in (*n.inputs, *n.outputs) if v in a.unit_of and len(kept[v]) != len(a.unit_of[v])]
        if rule is not None and rule.shrink is not None and touched:
            view = view_of(g, n, a.axes)
            k = Kept(tuple(kept.get(v) if not g.is_param(v) else None for v in n.inputs),
                     tuple(kept.get(o) for o in n.outputs),
                     tuple(len(a.unit_of[v]) if v in a.unit_of else None for v in n.inputs),
                     tuple(len(a.unit_of[o]) if o in a.unit_of else None for o in n.outputs))
            attrs.update(rule.shrink(view, k))
        nodes.append(NodePlan(n, inputs, in_types, attrs, tuple(vtypes[o] for o in n.outputs)))
    return ShrinkPlan(tuple(nodes), params, ptypes)


def predict(g: Graph, a: Analysis, pruned: np.ndarray) -> tuple[int, int]:
    """(MACs, parameter elements) as graph_stats counts them after removing `pruned`, from the plan alone."""
    plan = plan_shapes(g, a, pruned)
    macs = sum(ops.macs(p.node.op, p.in_types, p.out_types, p.attrs) for p in plan.nodes)
    return int(macs), int(sum(t.numel() for t in plan.param_types.values()))


def _slice(w: np.ndarray, s: Slicing) -> np.ndarray:
    for axis, idx in s:
        w = np.take(w, np.asarray(idx, dtype=np.int64), axis=axis)
    return np.ascontiguousarray(w)


def prune_units(g: Graph, a: Analysis, pruned: np.ndarray) -> Graph:
    """`g` with the units in `pruned` removed; every node is re-typed and must match the plan's shapes."""
    if not pruned.any():
        return g
    plan = plan_shapes(g, a, pruned)
    weights: dict[str, np.ndarray] = {}
    for new, (old, s) in plan.params.items():
        if old in g.weights:
            weights[new] = _slice(g.weights[old], s)
        elif s:
            raise IRError(f"prune: parameter %{old} has no weight data to slice")
    nodes = []
    for p in plan.nodes:
        new = ops.make_node(p.node.name, p.node.op, p.inputs, p.in_types, p.attrs, p.node.source)
        if new.out_types != p.out_types:
            raise IRError(f"prune: node {p.node.name} ({p.node.op}) gives {', '.join(map(str, new.out_types))} but the "
                          f"channel plan expects {', '.join(map(str, p.out_types))}")
        nodes.append(new)
    out = Graph(g.name, g.inputs, g.outputs, tuple(nodes), dict(plan.param_types), weights)
    return out.drop_unused_params()


def mask_units(g: Graph, a: Analysis, pruned: np.ndarray) -> Graph:
    """`g` with every input slice that reads a unit in `pruned` set to zero: removing them must then change nothing."""
    weights = dict(g.weights)
    for n in g.nodes:
        for m in a.maps[n.name].members:
            if m.role != "consumer":
                continue
            v = n.inputs[m.port[1]] if m.port[0] == "in" else n.outputs[m.port[1]]
            hit = np.flatnonzero(pruned[a.unit_of[v]])
            if len(hit):
                p = n.inputs[m.slot]
                w = weights[p].copy()
                index: list[Any] = [slice(None)] * w.ndim
                index[m.axis] = hit
                w[tuple(index)] = 0
                weights[p] = w
    return g.replace(weights=weights)


# ---- the pass ------------------------------------------------------------------------------------

def _round_to_from(ctx: PassContext) -> int:
    """round_to=0 means: the target's channel block (its fp32 vector width), or 1 without a target."""
    t = ctx.target
    if t is None:
        return 1
    if isinstance(t, str):
        from slimc.targets.triple import resolve

        t = resolve(t)
    block = getattr(t, "channel_block", None)
    if not isinstance(block, int) or block < 1:
        raise PipelineError(f"prune: cannot tell the channel block of target {t!r}; pass round_to explicitly")
    return block


def config_from_options(o: Mapping[str, Any], ctx: PassContext) -> PruneConfig:
    round_to = o["round_to"] if o["round_to"] else _round_to_from(ctx)
    return PruneConfig(ratio=o["ratio"], criterion=o["criterion"], scope=o["scope"], round_to=round_to,
                       ignore=parse_names(o["ignore"]), overrides=parse_overrides(o["overrides"]),
                       max_ratio=o["max_ratio"], seed=o["seed"])


@register_pass(
    "prune",
    ratio=opt(float, 0.3, "fraction of prunable channels to remove (global) or of each group (local)"),
    criterion=opt(str, "l1", f"importance: {'|'.join(CRITERIA)} (taylor needs sample inputs)"),
    scope=opt(str, "global", "global: one ranking over all groups; local: the same ratio in every group"),
    round_to=opt(int, 0, "keep channel counts multiples of this (0: the target's channel block, 1 without target)"),
    ignore=opt(str, "", "nodes (names or source module paths, ';'-separated) whose output channels stay"),
    overrides=opt(str, "", "per-layer ratios, e.g. 'layer1.0.conv1=0.5;layer2.0.conv1=0.2' (pruned locally)"),
    max_ratio=opt(float, 0.9, "never remove more than this fraction of one group's channels"),
    seed=opt(int, 0, "seed of the random criterion"),
)
def prune(graph: Graph, ctx: PassContext) -> PassResult:
    """Structured channel pruning: remove the least important coupled channel units, shrinking every tensor."""
    config = config_from_options(ctx.options, ctx)
    analysis = analyze(graph)
    sel = select(graph, analysis, config, ctx.sample_inputs)
    before = graph_stats(graph)
    out = prune_units(graph, analysis, sel.pruned)
    after = graph_stats(out) if out is not graph else before
    blocked_by: dict[str, list[str]] = {}
    nodes = {n.name: n for n in graph.nodes}
    for gr in analysis.groups:
        layers = ([node_label(nodes[p]) for p in gr.producers]
                  or [f"input of {node_label(nodes[c])}" for c in gr.consumers])
        for b in gr.blockers:
            blocked_by.setdefault(str(b), []).extend(layers)
    stats = {
        **sel.stats,
        "round_to": config.round_to,
        "macs_before": before.macs, "macs_after": after.macs,
        "params_before": before.params, "params_after": after.params,
        "blocked_by": [f"{who} -> {', '.join(dict.fromkeys(layers)) or '-'}" for who, layers in blocked_by.items()],
    }
    for line in stats["blocked_by"]:
        ctx.log(f"prune: blocked by {line}")
    return PassResult(out, out is not graph, stats)
