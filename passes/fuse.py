"""fuse-act: fold an activation into the conv2d/dense before it (attribute `act`), the epilogue backends fuse."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

from slimc.errors import PipelineError
from slimc.ir import Graph, Node
from slimc.pass_manager import PassContext, PassResult, opt, register_pass
from slimc.passes.cleanup import clip_as_activation, clip_bounds
from slimc.rewrite import Edit, keep_output_names, merge_source, sole_user

#: activation ops that have a fused form on conv2d/dense
FUSABLE = ("relu", "relu6", "clip", "hardswish", "hardsigmoid", "sigmoid", "silu", "gelu")
LAYERS = ("conv2d", "dense")


def epilogue(act: Node) -> dict[str, Any] | None:
    """The conv2d/dense attributes computing activation node `act`, or None if there is no fused form."""
    a = act.attrs
    if act.op == "clip":
        kind = clip_as_activation(a["min"], a["max"])
        lo, hi = clip_bounds(a["min"], a["max"])
        if kind is not None:
            return {"act": kind}
        return None if (lo, hi) == (None, None) else {"act": "clip", "clip_min": lo, "clip_max": hi}
    if act.op == "hardsigmoid":  # the fused form is torch's hardsigmoid (alpha 1/6, beta 1/2); ONNX's 0.2 is not
        ok = math.isclose(a["alpha"], 1 / 6, rel_tol=1e-6) and math.isclose(a["beta"], 0.5, rel_tol=1e-6)
        return {"act": "hardsigmoid"} if ok else None
    if act.op == "gelu":
        return {"act": "gelu"} if a["approximate"] == "none" else None
    return {"act": act.op} if act.op in FUSABLE else None


def _allowed(spec: str) -> frozenset[str]:
    """Parse the `acts` option: 'all' or a '|'-separated list of activations."""
    if spec.strip() == "all":
        return frozenset(FUSABLE)
    names = frozenset(s.strip() for s in spec.split("|") if s.strip())
    unknown = sorted(names - set(FUSABLE))
    if unknown:
        raise PipelineError(f"fuse-act: unknown activation(s) {', '.join(unknown)} in acts={spec!r}; "
                            f"choose from {'|'.join(FUSABLE)} or all")
    return names


def _target(g: Graph, layer: Node, allowed: frozenset[str]) -> tuple[Node, dict[str, Any]] | None:
    """The activation to fuse into `layer` and its epilogue attributes, if there is one."""
    if layer.op not in LAYERS or layer.attrs["act"] != "none":
        return None
    act = sole_user(g, layer.name)
    if act is None or act.op not in allowed:
        return None
    epi = epilogue(act)
    return None if epi is None else (act, epi)


@register_pass("fuse-act", acts=opt(str, "all", "activations to fuse, '|'-separated (e.g. relu|relu6), or all"))
def fuse_act(graph: Graph, ctx: PassContext) -> PassResult:
    """Fuse relu/relu6/clip/hardswish/hardsigmoid/sigmoid/silu/gelu into the act-free conv2d/dense it solely reads."""
    allowed = _allowed(ctx.options.get("acts", "all"))
    e = Edit(graph)
    by_act: Counter[str] = Counter()
    for layer in graph.nodes:
        found = _target(graph, layer, allowed)
        if found is None:
            continue
        act, epi = found
        fused = e.make_node(layer.name, layer.op, layer.inputs, {**layer.attrs, **epi}, merge_source(layer, act))
        e.replace_node(layer.name, fused)
        e.replace_uses(act.name, layer.name)
        e.remove_node(act.name)
        by_act[epi["act"]] += 1
    g = keep_output_names(graph, e.apply()) if by_act else graph
    left = sum(1 for n in g.nodes if n.op in FUSABLE and (p := g.producer(n.inputs[0])) is not None
               and p.op in LAYERS)
    stats = {"fused": sum(by_act.values()), "by_act": dict(sorted(by_act.items())), "not_fused": left}
    return PassResult(g, bool(by_act), stats)
