"""quantize: insert ONNX-style QDQ (quantize -> dequantize) on the activations and weights of int8-capable ops.

The QDQ graph is still a float graph that the interpreter runs exactly as the quantized model will compute
(every quantized value passes through its int8 grid); `fold-qdq` later turns QDQ patterns into integer ops.
Activations get one grid per tensor, except values only int8 depthwise convs read: those get one per channel
where that stays exact in integer arithmetic (`channel_grid`; calibrate's per-channel ranges).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

import numpy as np

from slimc import ops
from slimc.errors import PipelineError
from slimc.ir import Graph, Node, TensorType
from slimc.pass_manager import PassContext, PassResult, opt, register_pass
from slimc.passes.quant.channel_grid import grid_activation, producing_layer, read_by_depthwise_only
from slimc.passes.quant.scheme import Scheme, activation_qparams, bias_safe_scale, scheme_for, weight_qparams

#: ops computing in int8 whose float activation operands get QDQ (operand slots), weights in slot 1
QUANTIZED_OPS: dict[str, tuple[int, ...]] = {"conv2d": (0,), "dense": (0,), "add": (0, 1)}
#: ops that move or select values without changing them: their output reuses the input's grid
PRESERVING_OPS = ("max_pool2d", "flatten", "reshape")


def _excluded(spec: str, g: Graph) -> tuple[frozenset[str], frozenset[str]]:
    """(node names, op names) of `exclude=`: `node:NAME`, `op:OP`, or a bare word naming exactly one of the two."""
    names = {n.name for n in g.nodes}
    nodes, op_names, unknown, ambiguous = set(), set(), [], []
    for item in (x.strip() for x in spec.split("|")):
        kind, _, word = item.rpartition(":") if item.startswith(("node:", "op:")) else ("", "", item)
        if not word:
            continue
        is_node, is_op = word in names and kind != "op", word in ops.OPS and kind != "node"
        if is_node and is_op:
            ambiguous.append(word)
        elif is_node or is_op:
            (nodes if is_node else op_names).add(word)
        else:
            unknown.append(item)
    if unknown:
        raise PipelineError(f"quantize: exclude= names neither a node nor an op: {', '.join(sorted(unknown))}")
    if ambiguous:
        raise PipelineError(f"quantize: exclude= {', '.join(sorted(ambiguous))} names both a node and an op; write "
                            f"node:{ambiguous[0]} for that node or op:{ambiguous[0]} for every {ambiguous[0]}")
    return frozenset(nodes), frozenset(op_names)


def _float_activation(g: Graph, v: str) -> bool:
    return not g.is_param(v) and g.type_of(v).dtype == "float32"


def _quantizable(g: Graph, n: Node, excluded: tuple[frozenset[str], frozenset[str]]) -> bool:
    """Whether node `n` runs in int8: a known op, not excluded (by name or op), constant weights where it has them."""
    if n.op not in QUANTIZED_OPS or n.name in excluded[0] or n.op in excluded[1]:
        return False
    if n.op in ("conv2d", "dense"):
        return g.is_param(n.inputs[1]) and _float_activation(g, n.inputs[0]) \
            and all(g.is_param(b) for b in n.inputs[2:])
    return all(_float_activation(g, i) for i in n.inputs) and g.type_of(n.inputs[0]) == g.type_of(n.inputs[1])


def _activation_plan(g: Graph, quantized: list[Node], scheme: Scheme) -> dict[str, tuple[np.float32, np.uint8]]:
    """(scale, zero point) of every activation value an int8 op reads; grid-preserving producers pass theirs on."""
    need = {n.inputs[i] for n in quantized for i in QUANTIZED_OPS[n.op]}
    # a preserving op whose output is quantized quantizes its input with the same grid (one grid per chain)
    changed = True
    while changed:
        changed = False
        for v in list(need):
            p = g.producer(v)
            if p is not None and p.op in PRESERVING_OPS and p.inputs[0] not in need \
                    and _float_activation(g, p.inputs[0]):
                need.add(p.inputs[0])
                changed = True
    missing = sorted(v for v in need if v not in g.calibration)
    if missing:
        raise PipelineError(f"quantize: no calibrated range for {len(missing)} value(s) ({', '.join(missing[:5])}); "
                            "run the calibrate pass first (e.g. 'calibrate{method=entropy},quantize' with --calib DATA)")
    plan: dict[str, tuple[np.float32, np.uint8]] = {}
    for n in g.nodes:  # topological: a chain's head is planned before the preserving ops after it
        for v in n.outputs:
            if v in need and v not in plan:
                if n.op in PRESERVING_OPS and n.inputs[0] in plan:
                    plan[v] = plan[n.inputs[0]]
                else:
                    plan[v] = activation_qparams(*g.calibration[v], scheme.activation_max)
    for v, _ in g.inputs:
        if v in need:
            plan[v] = activation_qparams(*g.calibration[v], scheme.activation_max)
    return plan


def _channel_grids(g: Graph, plan: Mapping[str, tuple[np.ndarray, np.ndarray]], qnames: set[str],
                   scheme: Scheme) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-channel (scales, zero points) for planned values that int8 depthwise convs alone read, produced by an
    int8 layer that can fold the grid exactly (one zero point, activation bounds scalar on the grid)."""
    grids: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for v in plan:
        ranges = g.channel_calibration.get(v)
        if ranges is None or not read_by_depthwise_only(g, v) or any(u.name not in qnames for u in g.users(v)):
            continue
        made = producing_layer(g, v)
        if made is None or made[0].name not in qnames:
            continue
        whole = plan[v]  # a channel that was constant 0 in calibration takes the whole tensor's grid
        qp = [activation_qparams(lo, hi, scheme.activation_max) if hi > lo else whole for lo, hi in ranges]
        scale, zp = np.array([s for s, _ in qp], np.float32), np.array([z for _, z in qp], np.uint8)
        if len(set(zp.tolist())) != 1 or \
                grid_activation(made[1], scale, int(zp[0]), ops.QUANT_DTYPES[scheme.activation_dtype]) is None:
            continue
        grids[v] = (scale, zp)
    return grids


def _layer_sqnr(before: Graph, after: Graph, renamed: Mapping[str, str], inputs) -> dict[str, float | None]:
    """SQNR (dB) of each quantized activation against the float model's value, errors accumulated from the input."""
    import torch

    from slimc import interpreter

    def values(g: Graph, keep: set[str]) -> dict:
        seen: dict = {}

        def hook(node, outs):
            seen.update((o, t) for o, t in zip(node.outputs, outs) if o in keep)

        tensors = [torch.as_tensor(np.asarray(x)) for x in inputs]
        with torch.no_grad():
            interpreter.GraphModule(g)(*tensors, hook=hook)
        seen.update((name, t) for (name, _), t in zip(g.inputs, tensors) if name in keep)
        return seen

    ref, got = values(before, set(renamed)), values(after, set(renamed.values()))
    out: dict[str, float | None] = {}  # None: no error at all (JSON has no infinity)
    for v, dq in renamed.items():
        if v in ref and dq in got:
            r = ref[v].double()
            noise = float(((r - got[dq].double()) ** 2).sum())
            out[v] = round(10 * np.log10(float((r ** 2).sum()) / noise), 1) if noise > 0 else None
    return out


@register_pass("quantize", exclude=opt(str, "", "'|'-separated node:NAME / op:OP (or a bare name that is only one of them) to "
                                             "keep in float"),
               per_channel=opt(bool, True, "one weight scale per output channel (else per tensor)"),
               dw_channel_grid=opt(bool, True, "per-channel activation grids for values only int8 depthwise convs "
                                               "read, where exact (needs calibrate's per-channel ranges)"))
def quantize(graph: Graph, ctx: PassContext) -> PassResult:
    """Insert QDQ for int8 conv/dense/add (u8 activations from calibration, s8 symmetric weights) per the target."""
    scheme = scheme_for(ctx.target)
    if scheme.note:
        ctx.log(f"warning: {scheme.note}")
    excluded = _excluded(ctx.options.get("exclude", ""), graph)
    per_channel = ctx.options.get("per_channel", True)
    quantized = [n for n in graph.nodes if _quantizable(graph, n, excluded)]
    qnames = {n.name for n in quantized}
    plan: dict[str, tuple[np.ndarray, np.ndarray]] = dict(_activation_plan(graph, quantized, scheme))
    grids = _channel_grids(graph, plan, qnames, scheme) if ctx.options.get("dw_channel_grid", True) else {}
    plan.update(grids)

    taken: set[str] = set()
    weights = dict(graph.weights)

    def fresh(base: str) -> str:
        name = graph.fresh_name(base, taken | set(weights))
        taken.add(name)
        return name

    def qdq(v: str, scale: np.ndarray, zp: np.ndarray, axis: int) -> tuple[list[Node], str]:
        s_name, z_name = fresh(f"{v}.scale"), fresh(f"{v}.zero_point")
        weights[s_name], weights[z_name] = np.asarray(scale, np.float32), np.asarray(zp)
        t = {s_name: weights[s_name], z_name: weights[z_name]}
        tv = graph.type_of(v)
        q_name, dq_name = fresh(f"{v}.q"), fresh(f"{v}.dq")
        st, zt = TensorType.of(t[s_name]), TensorType.of(t[z_name])
        q = ops.make_node(q_name, "quantize", (v, s_name, z_name), (tv, st, zt), {"axis": axis})
        dq = ops.make_node(dq_name, "dequantize", (q_name, s_name, z_name), (q.out_type, st, zt), {"axis": axis})
        return [q, dq], dq_name

    # weights: replace each quantized layer's weight operand by dequantize(int8 weight)
    weight_dq: dict[str, tuple[list[Node], str]] = {}
    for n in quantized:
        w = n.inputs[1] if n.op in ("conv2d", "dense") else None
        if w is None or w in weight_dq:
            continue
        bias = graph.weight(n.inputs[2]) if len(n.inputs) > 2 else None
        floor = bias_safe_scale(bias, plan[n.inputs[0]][0]) if bias is not None and per_channel else None
        q, scale = weight_qparams(graph.weight(w), scheme.weight_max, per_channel, floor)
        q_name = fresh(f"{w}.int8")
        weights[q_name] = q
        s_name, z_name = fresh(f"{w}.scale"), fresh(f"{w}.zero_point")
        weights[s_name], weights[z_name] = scale, np.zeros(scale.shape, np.int8)
        dq_name = fresh(f"{w}.dq")
        dq = ops.make_node(dq_name, "dequantize", (q_name, s_name, z_name),
                           tuple(TensorType.of(weights[k]) for k in (q_name, s_name, z_name)), {"axis": 0})
        weight_dq[w] = ([dq], dq_name)

    act_dq: dict[str, tuple[list[Node], str]] = {v: qdq(v, s, z, 1) for v, (s, z) in plan.items()}
    renamed = {v: name for v, (_, name) in act_dq.items()}

    def rewire(n: Node) -> Node:
        ins = tuple(renamed.get(i, i) for i in n.inputs)
        if n.name in qnames and n.op in ("conv2d", "dense"):
            ins = (ins[0], weight_dq[n.inputs[1]][1], *ins[2:])
        return n if ins == n.inputs else n.replace(inputs=ins)

    nodes: list[Node] = []
    placed: set[str] = set()
    for v, _ in graph.inputs:
        nodes += act_dq.get(v, ([], ""))[0]
    for n in graph.nodes:
        w = n.inputs[1] if n.name in qnames and n.op in ("conv2d", "dense") else None
        if w is not None and w not in placed:  # a shared weight is dequantized once, before its first user
            nodes += weight_dq[w][0]
            placed.add(w)
        nodes.append(rewire(n))
        for v in n.outputs:
            nodes += act_dq.get(v, ([], ""))[0]
    out = graph.with_nodes(nodes, weights)
    layer_sqnr = _layer_sqnr(graph, out, renamed, ctx.sample_inputs) if ctx.sample_inputs is not None else {}
    by_op = Counter(n.op for n in quantized)
    total = sum(ops.macs(n.op, [graph.type_of(i) for i in n.inputs], n.out_types, n.attrs) for n in graph.nodes)
    q_macs = sum(ops.macs(n.op, [graph.type_of(i) for i in n.inputs], n.out_types, n.attrs) for n in quantized)
    stats: Mapping[str, object] = {
        "quantized": dict(sorted(by_op.items())), "activations": len(plan), "channel_grids": len(grids),
        "weights": len(weight_dq),
        "int8_mac_share": round(q_macs / total, 4) if total else 0.0,
        "float_layers": [n.name for n in graph.nodes if n.op in ("conv2d", "dense") and n.name not in qnames],
        "scheme": f"{scheme.activation_dtype}[0,{scheme.activation_max}] x int8 "
                  f"{'per-channel' if per_channel else 'per-tensor'}",
        "layer_sqnr_db": layer_sqnr,
    }
    return PassResult(out, bool(quantized), stats)
