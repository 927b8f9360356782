"""fold-bn: fold inference batch norms into the conv2d/dense that feeds them (weights scaled in float64)."""

from __future__ import annotations

from collections import Counter

import numpy as np

from slimc.ir import Graph, Node
from slimc.pass_manager import PassContext, PassResult, register_pass
from slimc.rewrite import Edit, exclusive_to, keep_output_names, merge_source, sole_user


def unfoldable_reason(g: Graph, bn: Node) -> str | None:
    """Why batch norm `bn` cannot be folded into its producer, or None if it can."""
    x = bn.inputs[0]
    p = g.producer(x)
    if p is None:
        return "input is not computed by a node"
    if p.op not in ("conv2d", "dense"):
        return f"after {p.op}"
    if p.attrs["act"] != "none":
        return f"{p.op} already has act={p.attrs['act']}"
    if sole_user(g, x) is None:
        return f"{p.op} output has other users"
    if p.op == "dense" and p.out_type.rank != 2:
        return "dense output is not 2-D (channels are not axis 1)"
    params = [*p.inputs[1:], *bn.inputs[1:]]
    if not all(g.is_param(v) for v in params):
        return "weights are computed, not parameters"
    if not all(v in g.weights for v in params):
        return "weight data not loaded"
    if not all(np.issubdtype(g.weights[v].dtype, np.floating) for v in params):
        return "weights are not floating point"
    if not np.all(g.weights[bn.inputs[4]].astype(np.float64) + bn.attrs["eps"] > 0):
        return "variance + eps is not positive"
    return None


def folded_weights(g: Graph, layer: Node, bn: Node) -> tuple[np.ndarray, np.ndarray]:
    """(weight, bias) of `layer` followed by `bn`, computed in float64 and stored in the weight's dtype."""
    gamma, beta, mean, var = (g.weights[v].astype(np.float64) for v in bn.inputs[1:])
    scale = gamma / np.sqrt(var + bn.attrs["eps"])
    w = g.weights[layer.inputs[1]]
    b = g.weights[layer.inputs[2]].astype(np.float64) if len(layer.inputs) > 2 else np.zeros(w.shape[0])
    w_new = w.astype(np.float64) * scale.reshape((-1,) + (1,) * (w.ndim - 1))  # output channels are axis 0
    b_new = (b - mean) * scale + beta
    return w_new.astype(w.dtype), b_new.astype(w.dtype)


def _store(g: Graph, e: Edit, layer: Node, old: str | None, array: np.ndarray, base: str) -> str:
    """Overwrite `old` if only `layer` reads it (keeps names stable), else add a fresh parameter."""
    if old is not None and exclusive_to(g, old, layer):
        e.set_param(old, array)
        return old
    return e.add_param(base, array)


def _fold(g: Graph, e: Edit, layer: Node, bn: Node) -> None:
    w, b = folded_weights(g, layer, bn)
    w_name = _store(g, e, layer, layer.inputs[1], w, f"{layer.name}.weight")
    b_name = _store(g, e, layer, layer.inputs[2] if len(layer.inputs) > 2 else None, b, f"{layer.name}.bias")
    new = e.make_node(layer.name, layer.op, [layer.inputs[0], w_name, b_name], layer.attrs, merge_source(layer, bn))
    e.replace_node(layer.name, new)
    e.replace_uses(bn.name, layer.name)
    e.remove_node(bn.name)


@register_pass("fold-bn")
def fold_bn(graph: Graph, ctx: PassContext) -> PassResult:
    """Fold each batch_norm into the act-free conv2d/dense it solely reads; others are left and counted."""
    g, folded = graph, 0
    while True:  # a second batch_norm in a row folds once the first is gone
        e = Edit(g)
        step = 0
        for bn in g.nodes:
            if bn.op == "batch_norm" and unfoldable_reason(g, bn) is None:
                _fold(g, e, g.producer(bn.inputs[0]), bn)
                step += 1
        if step == 0:
            break
        g, folded = e.apply(), folded + step
    if folded:
        g = keep_output_names(graph, g)
    reasons = Counter(unfoldable_reason(g, n) for n in g.nodes if n.op == "batch_norm")
    stats = {"folded": folded, "unfolded": sum(reasons.values()), "unfolded_reasons": dict(sorted(reasons.items()))}
    for reason, count in sorted(reasons.items()):
        ctx.log(f"fold-bn: {count} batch_norm left unfolded: {reason}")
    return PassResult(g, folded > 0, stats)
