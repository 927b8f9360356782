"""canonicalize: dead code, no-ops, constant folding, CSE, and the canonical op forms later passes match on."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from slimc import interpreter
from slimc.errors import IRError
from slimc.ir import Graph, Node, TensorType
from slimc.pass_manager import PassContext, PassResult, opt, register_pass
from slimc.rewrite import Edit, eliminate_dead_code, exclusive_to, keep_output_names, merge_source, sole_user

#: ops never evaluated at compile time: QDQ pairs on weights must stay int8 in the model
NEVER_FOLD = frozenset({"quantize", "dequantize"})

#: every counter canonicalize reports, so the stats schema does not depend on the model
STAT_KEYS = ("dead", "params_dropped", "noop", "folded", "cse", "relu", "relu6", "act_chain", "silu", "gelu",
             "channel_shuffle", "reshape_chain", "pad_into_conv")


@dataclass(frozen=True)
class Options:
    """canonicalize's options, resolved."""

    fold: bool = True
    fold_limit: int = 1 << 16
    cse: bool = True


Rule = Callable[[Graph, Node, Edit, Options], "str | None"]


# ---- helpers shared with fuse-act ----------------------------------------------------------------

def clip_bounds(lo: float | None, hi: float | None) -> tuple[float | None, float | None]:
    """clip's bounds with infinite ones written as None (no bound), so equal clips compare equal."""
    return (None if lo is None or lo == -math.inf else lo), (None if hi is None or hi == math.inf else hi)


def clip_as_activation(lo: float | None, hi: float | None) -> str | None:
    """'relu' or 'relu6' when clip(lo, hi) is exactly that activation, else None."""
    lo, hi = clip_bounds(lo, hi)
    if lo == 0.0 and hi is None:
        return "relu"
    if lo == 0.0 and hi == 6.0:
        return "relu6"
    return None


def _scalar(g: Graph, value: str) -> float | None:
    """The value of a one-element float parameter (the constants of decomposed activations)."""
    if not g.is_param(value) or value not in g.weights:
        return None
    w = g.weights[value]
    if w.size != 1 or not np.issubdtype(w.dtype, np.floating):
        return None
    return float(w.reshape(()))


def _is_const(g: Graph, value: str, expected: float) -> bool:
    v = _scalar(g, value)
    return v is not None and math.isclose(v, expected, rel_tol=1e-6)


def _producer_if_exclusive(g: Graph, value: str, user: Node, op: str) -> Node | None:
    """The producer of `value` if it is an `op` read only by `user` (safe to fold into a pattern)."""
    p = g.producer(value)
    if p is None or p.op != op or len(p.outputs) != 1 or not exclusive_to(g, value, user):
        return None
    return p


# ---- rules: each looks at one anchor node and rewrites only that node ----------------------------

def _in_order(g: Graph, nodes: list[Node]) -> list[Node]:
    """`nodes` in graph order, so merged provenance reads like the original program."""
    index = {m.name: i for i, m in enumerate(g.nodes)}
    return sorted(nodes, key=lambda m: index[m.name])


def _is_noop(g: Graph, n: Node) -> bool:
    """Whether `n` returns its (first) input unchanged."""
    if len(n.out_types) != 1 or not n.inputs:
        return False
    op, a = n.op, n.attrs
    if op in ("identity", "dropout"):
        return True
    if op == "concat":
        return len(n.inputs) == 1
    if len(n.inputs) != 1 or n.out_type != g.type_of(n.inputs[0]):
        return False
    if op in ("reshape", "flatten", "slice"):  # same type: a slice keeping every element is the full range
        return True
    if op == "transpose":
        return tuple(a["perm"]) == tuple(range(len(a["perm"])))
    if op == "pad":
        return not any(a["pads"])
    if op == "clip":
        return clip_bounds(a["min"], a["max"]) == (None, None)
    if op == "channel_shuffle":
        return a["groups"] in (1, n.out_type.shape[1])
    return False


def _remove_noop(g: Graph, n: Node, e: Edit, o: Options) -> str | None:
    if not _is_noop(g, n):
        return None
    e.replace_uses(n.name, n.inputs[0])
    e.remove_node(n.name)
    return "noop"


def _evaluate(g: Graph, n: Node) -> list[np.ndarray] | None:
    """Run `n` on its parameter inputs with the interpreter kernel; None if the result's type is off."""
    args = [torch.from_numpy(np.array(g.weight(i))) for i in n.inputs]  # copies: kernels never see our arrays
    with torch.no_grad():
        outs = interpreter.run_node(n, args)
    arrays = [np.array(o.detach().cpu().numpy()) for o in outs]
    if len(arrays) != len(n.out_types) or any(TensorType.of(a) != t for a, t in zip(arrays, n.out_types)):
        return None
    return arrays


def _fold_constant(g: Graph, n: Node, e: Edit, o: Options) -> str | None:
    if not o.fold or not n.inputs or n.op in NEVER_FOLD or n.op not in interpreter.KERNELS:
        return None
    if not all(g.is_param(i) and i in g.weights for i in n.inputs):
        return None
    out_elems = sum(t.numel() for t in n.out_types)
    freed = sum(g.type_of(i).nbytes() for i in set(n.inputs) if exclusive_to(g, i, n))
    if out_elems > o.fold_limit and sum(t.nbytes() for t in n.out_types) > freed:
        return None  # would grow the model: keep computing it at run time
    values = _evaluate(g, n)
    if values is None:
        return None
    e.remove_node(n.name)
    for k, (out, v) in enumerate(zip(n.outputs, values)):
        name = e.add_param(out if len(values) == 1 else f"{n.name}.{k}", v)
        e.replace_uses(out, name)
    return "folded"


def _canonical_clip(g: Graph, n: Node, e: Edit, o: Options) -> str | None:
    if n.op != "clip":
        return None
    kind = clip_as_activation(n.attrs["min"], n.attrs["max"])
    if kind is None:
        return None
    e.replace_node(n.name, e.make_node(n.name, kind, n.inputs, source=n.source))
    return kind


def _collapse_act_chain(g: Graph, n: Node, e: Edit, o: Options) -> str | None:
    """relu/relu6 applied to relu/relu6: one activation (relu6 if either is)."""
    if n.op not in ("relu", "relu6"):
        return None
    p = g.producer(n.inputs[0])
    if p is None or p.op not in ("relu", "relu6"):
        return None
    kind = "relu6" if "relu6" in (n.op, p.op) else "relu"
    e.replace_node(n.name, e.make_node(n.name, kind, p.inputs, source=merge_source(p, n)))
    return "act_chain"


def _silu(g: Graph, n: Node, e: Edit, o: Options) -> str | None:
    """x * sigmoid(x) -> silu(x)."""
    if n.op != "mul" or len(set(n.inputs)) != 2:
        return None
    for x, s in (n.inputs, n.inputs[::-1]):
        p = g.producer(s)
        if p is not None and p.op == "sigmoid" and p.inputs[0] == x and n.out_type == g.type_of(x):
            e.replace_node(n.name, e.make_node(n.name, "silu", [x], source=merge_source(p, n)))
            return "silu"
    return None


def _mul_factors(g: Graph, n: Node, nodes: list[Node]) -> list[tuple[str, Node]]:
    """(factor, mul reading it) of a product tree rooted at `n`, through inner muls read only by the tree."""
    factors: list[tuple[str, Node]] = []
    for v in n.inputs:
        inner = _producer_if_exclusive(g, v, n, "mul")
        if inner is not None and len(nodes) < 4:
            nodes.append(inner)
            factors += _mul_factors(g, inner, nodes)
        else:
            factors.append((v, n))
    return factors


def _erf_argument(g: Graph, add: Node, nodes: list[Node]) -> str | None:
    """For add = 1 + erf(x / sqrt 2) (or x * 1/sqrt 2), return x."""
    for t, one in (add.inputs, add.inputs[::-1]):
        erf = _producer_if_exclusive(g, t, add, "erf")
        if erf is None or not _is_const(g, one, 1.0):
            continue
        for op, c in (("div", math.sqrt(2.0)), ("mul", math.sqrt(0.5))):
            scale = _producer_if_exclusive(g, erf.inputs[0], erf, op)
            if scale is None:
                continue
            orders = (scale.inputs,) if op == "div" else (scale.inputs, scale.inputs[::-1])
            for x, k in orders:
                if _is_const(g, k, c):
                    nodes += [erf, scale]
                    return x
    return None


def _gelu(g: Graph, n: Node, e: Edit, o: Options) -> str | None:
    """x * 0.5 * (1 + erf(x / sqrt 2)) in any association (the ONNX exporter's decomposition) -> gelu(x)."""
    if n.op != "mul":
        return None
    nodes: list[Node] = [n]
    factors = _mul_factors(g, n, nodes)
    values = [v for v, _ in factors]
    halves = [v for v in values if _is_const(g, v, 0.5)]
    if len(factors) != 3 or not halves:
        return None
    for f, reader in factors:
        add = _producer_if_exclusive(g, f, reader, "add")
        if add is None:
            continue
        matched = [*nodes, add]
        x = _erf_argument(g, add, matched)
        rest = list(values)
        rest.remove(f)
        rest.remove(halves[0])
        if x is not None and rest == [x] and n.out_type == g.type_of(x):
            e.replace_node(n.name, e.make_node(n.name, "gelu", [x], source=merge_source(*_in_order(g, matched))))
            return "gelu"
    return None


def _channel_shuffle(g: Graph, n: Node, e: Edit, o: Options) -> str | None:
    """reshape [N,C,...] -> [N,g,C/g,...], transpose(1,2), reshape back -> channel_shuffle{groups=g}."""
    if n.op != "reshape":
        return None
    tr = _producer_if_exclusive(g, n.inputs[0], n, "transpose")
    if tr is None:
        return None
    r = tr.out_type.rank
    if r < 3 or tuple(tr.attrs["perm"]) != (0, 2, 1, *range(3, r)):
        return None
    split = _producer_if_exclusive(g, tr.inputs[0], tr, "reshape")
    if split is None:
        return None
    x = split.inputs[0]
    xs, ss = g.type_of(x).shape, split.out_type.shape
    static = all(isinstance(d, int) for d in (*xs[1:], *ss[1:]))
    if (len(xs) < 2 or n.out_type != g.type_of(x) or ss[0] != xs[0] or not static
            or ss[1] * ss[2] != xs[1] or math.prod(ss[3:]) != math.prod(xs[2:])):
        return None
    node = e.make_node(n.name, "channel_shuffle", [x], {"groups": ss[1]}, merge_source(split, tr, n))
    e.replace_node(n.name, node)
    return "channel_shuffle"


def _reshape_chain(g: Graph, n: Node, e: Edit, o: Options) -> str | None:
    """reshape(reshape|flatten(x)) -> reshape(x) when the inner result has no other reader."""
    if n.op != "reshape":
        return None
    p = g.producer(n.inputs[0])
    if p is None or p.op not in ("reshape", "flatten") or not exclusive_to(g, n.inputs[0], n):
        return None
    user = sole_user(g, n.name)
    if user is not None and user.op == "transpose":  # may be a channel shuffle's first step: keep its shape
        return None
    try:
        node = e.make_node(n.name, "reshape", p.inputs, n.attrs, merge_source(p, n))
    except IRError:
        return None
    if node.out_types != n.out_types:
        return None
    e.replace_node(n.name, node)
    return "reshape_chain"


def _pad_into_conv(g: Graph, n: Node, e: Edit, o: Options) -> str | None:
    """conv2d(pad(x)) with zero constant padding of H and W only -> conv2d(x) with that padding added."""
    if n.op != "conv2d":
        return None
    pad = _producer_if_exclusive(g, n.inputs[0], n, "pad")
    if pad is None or pad.attrs["mode"] != "constant" or pad.attrs["value"] != 0.0:
        return None
    p = pad.attrs["pads"]  # [b0, b1, b2, b3, e0, e1, e2, e3] for NCHW
    if len(p) != 8 or any(p[i] for i in (0, 1, 4, 5)) or min(p) < 0:
        return None
    top, left, bottom, right = n.attrs["padding"]
    attrs = dict(n.attrs, padding=(top + p[2], left + p[3], bottom + p[6], right + p[7]))
    node = e.make_node(n.name, "conv2d", (pad.inputs[0], *n.inputs[1:]), attrs, merge_source(pad, n))
    e.replace_node(n.name, node)
    return "pad_into_conv"


RULES: tuple[Rule, ...] = (_remove_noop, _fold_constant, _canonical_clip, _collapse_act_chain, _silu, _gelu,
                           _channel_shuffle, _reshape_chain, _pad_into_conv)


# ---- driver ---------------------------------------------------------------------------------------

def _cse_key(n: Node, e: Edit) -> tuple:
    return (n.op, tuple(e.resolve(i) for i in n.inputs), tuple(sorted(n.attrs.items())), n.out_types)


def _sweep(g: Graph, o: Options) -> tuple[Graph, Counter[str], bool]:
    """One pass over the nodes applying the first matching rule to each, then CSE and DCE."""
    e = Edit(g)
    counts: Counter[str] = Counter()
    seen: dict[tuple, Node] = {}
    merged: dict[str, list[Node]] = {}
    for n in g.nodes:
        kind = next((k for rule in RULES if (k := rule(g, n, e, o)) is not None), None)
        if kind is not None:
            counts[kind] += 1
            continue
        if not o.cse:
            continue
        key = _cse_key(n, e)
        kept = seen.setdefault(key, n)
        if kept is not n:
            for dup, orig in zip(n.outputs, kept.outputs):
                e.replace_uses(dup, orig)
            e.remove_node(n.name)
            merged.setdefault(kept.name, [kept]).append(n)
            counts["cse"] += 1
    for name, group in merged.items():
        e.replace_node(name, group[0].replace(source=merge_source(*group)))
    edited = e.apply()
    out, dead = eliminate_dead_code(edited)
    counts["dead"] += dead
    counts["params_dropped"] += len(set(g.param_types) - set(out.param_types))
    return out, counts, not e.empty or out is not edited


DEFAULTS = Options()


@register_pass(
    "canonicalize",
    fold=opt(bool, DEFAULTS.fold, "evaluate nodes whose inputs are all parameters at compile time"),
    fold_limit=opt(int, DEFAULTS.fold_limit, "largest folded result (elements) unless it frees at least as many bytes"),
    cse=opt(bool, DEFAULTS.cse, "merge nodes with the same op, inputs and attributes"),
    max_iterations=opt(int, 32, "sweeps before giving up on a fixed point"),
)
def canonicalize(graph: Graph, ctx: PassContext) -> PassResult:
    """Simplify to a fixed point (DCE, no-ops, folding, CSE) and rewrite to the canonical forms passes match."""
    opts = Options(**{f: ctx.options.get(f, getattr(DEFAULTS, f)) for f in ("fold", "fold_limit", "cse")})
    limit = max(1, ctx.options.get("max_iterations", 32))
    g, total, sweeps, changed = graph, Counter(), 0, False
    while sweeps < limit:
        sweeps += 1
        g2, counts, step_changed = _sweep(g, opts)
        total += counts
        if not step_changed:
            break
        g, changed = g2, True
    else:
        ctx.log(f"canonicalize: still changing after {limit} sweeps; stopped there")
    if changed:
        g = keep_output_names(graph, g)
    stats = {k: total.get(k, 0) for k in STAT_KEYS}
    stats["removed"] = len(graph.nodes) - len(g.nodes)
    stats["sweeps"] = sweeps
    return PassResult(g, changed, stats)
