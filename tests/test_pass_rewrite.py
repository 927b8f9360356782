"""slimc.rewrite (the helpers every pass uses), and the checks every pass test applies (imported by test_pass_*)."""

from __future__ import annotations

import numpy as np
import pytest

from slimc import interpreter, ir
from slimc.errors import IRError
from slimc.ir import Graph
from slimc.pass_manager import PASSES, PassContext, PassResult, compare, load_builtin_passes
from slimc.rewrite import (Edit, add_param, eliminate_dead_code, keep_output_names, merge_source, remove_nodes,
                           replace_uses, sole_user)

load_builtin_passes()


# ---- helpers shared by the pass tests ------------------------------------------------------------

def with_weights(g: Graph, seed: int = 0, **fixed: np.ndarray) -> Graph:
    """Random weights for every parameter; batch-norm-like names get sane values (`*var` > 0, `*gamma` ~ 1)."""
    rng = np.random.default_rng(seed)
    w: dict[str, np.ndarray] = {}
    for name, t in g.param_types.items():
        if name in fixed:
            w[name] = np.asarray(fixed[name], dtype=t.dtype).reshape(t.shape)
        elif name.endswith("var"):
            w[name] = rng.uniform(0.5, 1.5, t.shape).astype(t.dtype)
        elif name.endswith("gamma"):
            w[name] = rng.uniform(0.5, 1.5, t.shape).astype(t.dtype)
        else:
            fan_in = int(np.prod(t.shape[1:])) if len(t.shape) > 1 else 1
            w[name] = (rng.standard_normal(t.shape) / np.sqrt(fan_in)).astype(t.dtype)
    return g.replace(weights=w)


def build(text: str, seed: int = 0, **fixed: np.ndarray) -> Graph:
    """Parse IR text and attach random weights; the graph must verify."""
    g = with_weights(ir.parse_graph(text), seed, **fixed)
    g.verify()
    return g


def ops_of(g: Graph) -> list[str]:
    return [n.op for n in g.nodes]


def run_pass(name: str, g: Graph, **options: object) -> PassResult:
    info = PASSES[name]
    resolved = {k: options.get(k, o.default) for k, o in info.options.items()}
    return info.fn(g, PassContext(resolved))


def snapshot(g: Graph) -> tuple[str, dict[str, np.ndarray]]:
    return ir.print_graph(g), {k: v.copy() for k, v in g.weights.items()}


def assert_same(g: Graph, snap: tuple[str, dict[str, np.ndarray]]) -> None:
    """`g` prints as before and every weight array holds its old values."""
    text, weights = snap
    assert ir.print_graph(g) == text
    assert set(g.weights) == set(weights)
    for k, v in weights.items():
        np.testing.assert_array_equal(g.weights[k], v)


def max_rel_error(a: Graph, b: Graph, batch: int = 2, seed: int = 1) -> float:
    x = interpreter.example_inputs(a, seed=seed, batch=batch)
    return compare(interpreter.run(b, x), interpreter.run(a, x)).max_rel


def check_pass(name: str, g: Graph, tol: float = 1e-5, **options: object) -> PassResult:
    """Run pass `name`; assert purity, verify, numerics vs `g` and idempotence; return the first result."""
    snap = snapshot(g)
    res = run_pass(name, g, **options)
    assert_same(g, snap)
    res.graph.verify()
    assert max_rel_error(g, res.graph) <= tol
    again = run_pass(name, res.graph, **options)
    assert not again.changed, f"{name} is not idempotent:\n{again.graph}"
    assert ir.print_graph(again.graph) == ir.print_graph(res.graph)
    if not res.changed:
        assert res.graph is g or ir.print_graph(res.graph) == snap[0]
    return res


# ---- tests of slimc.rewrite ------------------------------------------------------------------------

CHAIN = """\
graph @chain(%x: f32[N,4]) {
  param %w: f32[4,4]
  %a: f32[N,4] = relu(%x)
  %b: f32[N,4] = identity(%a)
  %c: f32[N,4] = dense(%b, %w)
  %d: f32[N,4] = sigmoid(%c) loc("torch.sigmoid")
  return %d, %b
}
"""


def test_replace_uses_rewires_nodes_and_outputs():
    g = build(CHAIN)
    snap = snapshot(g)
    h = remove_nodes(replace_uses(g, "b", "a"), ["b"])
    h.verify()
    assert h.outputs == ("d", "a")
    assert h.node("c").inputs == ("a", "w")
    assert_same(g, snap)


def test_replace_uses_rejects_type_change():
    g = build(CHAIN)
    with pytest.raises(IRError, match="cannot replace"):
        replace_uses(g, "b", "w")


def test_edit_batches_replacements_and_params():
    g = build(CHAIN)
    e = Edit(g)
    w2 = e.add_param("w", np.eye(4, dtype="float32"))
    assert w2 == "w_1"
    e.replace_node("c", e.make_node("c", "dense", ["b", w2], {"act": "relu"}, merge_source(g.node("c"))))
    e.replace_uses("b", "a")
    e.remove_node("b")
    h = e.apply()
    h.verify()
    assert "w" not in h.param_types and "w_1" in h.param_types
    assert h.node("c").attrs["act"] == "relu" and h.node("c").inputs == ("a", "w_1")
    assert h.node("c").source == ("c",)
    with pytest.raises(IRError, match="twice"):
        e.remove_node("c")


def test_edit_reuses_names_freed_by_removed_nodes():
    g = build(CHAIN)
    e = Edit(g)
    e.remove_node("d")
    assert e.fresh_name("d") == "d"
    assert e.fresh_name("d") == "d_1"


def test_set_param_checks_type():
    g = build(CHAIN)
    e = Edit(g)
    with pytest.raises(IRError, match="does not match"):
        e.set_param("w", np.zeros((4, 5), "float32"))
    e.set_param("w", np.zeros((4, 4), "float32"))
    h = e.apply()
    assert not h.weights["w"].any() and g.weights["w"].any()


def test_empty_edit_returns_same_graph():
    g = build(CHAIN)
    assert Edit(g).apply() is g


def test_merge_source_dedups_and_falls_back_to_names():
    g = build(CHAIN)
    assert merge_source(g.node("c"), g.node("d"), g.node("d")) == ("c", "torch.sigmoid")


def test_sole_user():
    g = build(CHAIN)
    assert sole_user(g, "c").name == "d"
    assert sole_user(g, "b") is None  # graph output
    assert sole_user(g, "d") is None


def test_dead_code_and_unused_params():
    text = CHAIN.replace("return %d, %b", "return %b")
    g = build(text)
    h, removed = eliminate_dead_code(g)
    assert removed == 2 and ops_of(h) == ["relu", "identity"] and not h.param_types


def test_add_param_and_keep_output_names():
    g = build(CHAIN)
    h, name = add_param(g, "d", np.ones(4, "float32"))
    assert name == "d_1" and h.param_types[name].shape == (4,)
    moved = remove_nodes(replace_uses(g, "d", "c"), ["d"])
    assert moved.outputs == ("c", "b")
    kept = keep_output_names(g, moved)
    kept.verify()
    assert kept.outputs == ("d", "b") and ops_of(kept) == ["relu", "identity", "dense"]
    x = interpreter.example_inputs(g)
    np.testing.assert_array_equal(interpreter.run(kept, x)[1], interpreter.run(g, x)[1])
