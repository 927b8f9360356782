"""Checks shared by the pruning tests: the zero-channel oracle, plan-vs-graph cost, and group lookups."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from slimc import interpreter, ir
from slimc.ir import Graph
from slimc.pass_manager import compare
from slimc.passes.prune.apply import mask_units, predict, prune_units
from slimc.passes.prune.dependency import Analysis, Group, analyze
from slimc.stats import graph_stats
from test_pass_rewrite import build

TOL = 1e-5  # max abs error relative to the output range


def analyzed(text: str, seed: int = 0) -> tuple[Graph, Analysis]:
    g = build(text, seed)
    return g, analyze(g)


def group_of(a: Analysis, value: str) -> Group:
    """The one group holding the channels of `value`."""
    groups = a.groups_of_value(value)
    assert len(groups) == 1, [gr.id for gr in groups]
    return groups[0]


def units(a: Analysis, group: Group, which: Sequence[int]) -> np.ndarray:
    """Bool mask over all units selecting units `which` (positions in `group.units`)."""
    mask = np.zeros(a.num_units, bool)
    mask[group.units[list(which)]] = True
    return mask


def outputs(g: Graph, x: list[np.ndarray]) -> list[np.ndarray]:
    return interpreter.run(g, x)


def assert_zero_exact(g: Graph, a: Analysis, pruned: np.ndarray, control: bool = True, batch: int = 2,
                      x: list[np.ndarray] | None = None) -> Graph:
    """The oracle: with the pruned units' input slices zeroed, removing them leaves every output unchanged.

    Also checks the pruned graph verifies, keeps output shapes, and costs exactly what the plan predicted; with
    `control`, that pruning the unmasked graph does change the outputs (so this check can fail).
    """
    assert pruned.any()
    x = x if x is not None else interpreter.example_inputs(g, seed=1, batch=batch)
    masked = mask_units(g, a, pruned)
    p = prune_units(masked, a, pruned)
    p.verify()
    ref = outputs(masked, x)
    got = outputs(p, x)
    assert [o.shape for o in got] == [o.shape for o in ref]
    err = compare(got, ref).max_rel
    assert err <= TOL, f"zero-channel pruning changed the outputs by {err:.3e} of their range"
    macs, params = predict(g, a, pruned)
    st, st0 = graph_stats(p), graph_stats(g)
    assert (macs, params) == (st.macs, st.params)
    assert st.params < st0.params
    if control:
        unmasked = prune_units(g, a, pruned)
        assert ir.print_graph(unmasked) == ir.print_graph(p)
        assert compare(outputs(unmasked, x), outputs(g, x)).max_rel > 1e-3, "pruning real channels changed nothing"
    return p


def kept_columns(before: np.ndarray, after: np.ndarray, axis: int) -> list[int]:
    """Which slices of `before` along `axis` survive in `after` (matched by value)."""
    b = np.moveaxis(before, axis, 0).reshape(before.shape[axis], -1)
    a = np.moveaxis(after, axis, 0).reshape(after.shape[axis], -1)
    out = []
    for row in a:
        hits = [i for i, r in enumerate(b) if np.array_equal(r, row)]
        assert len(hits) == 1
        out.append(hits[0])
    return out
