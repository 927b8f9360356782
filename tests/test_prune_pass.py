"""The prune pass and its parts: the channel-rule registry, importance criteria, local/global selection, round_to
from the target, ignore/overrides, option errors, and `slimc inspect --show-groups`."""

import os
import subprocess
import sys

import networkx as nx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prune_checks import analyzed, assert_zero_exact, group_of, outputs
from slimc import interpreter, ir, ops
from slimc.errors import PipelineError
from slimc.pass_manager import PassContext, PassManager, compare
from slimc.passes.prune.apply import prune_units
from slimc.passes.prune.dependency import analyze, components
from slimc.passes.prune.importance import PruneConfig, select
from slimc.passes.prune.rules import CHANNEL_RULES
from slimc.stats import graph_stats
from slimc.targets.triple import Target
from test_pass_rewrite import assert_same, run_pass, snapshot
from test_prune_residual import RESIDUAL

TESTS = os.path.dirname(os.path.abspath(__file__))

WIDE = """\
graph @wide(%x: f32[N,3,8,8]) {
  param %w0: f32[48,3,3,3]
  param %bn_gamma: f32[48]
  param %bn_beta: f32[48]
  param %bn_mean: f32[48]
  param %bn_var: f32[48]
  param %w1: f32[32,48,1,1]
  param %b1: f32[32]
  param %w2: f32[48,32,3,3]
  param %wfc: f32[4,48]
  %c0: f32[N,48,8,8] = conv2d(%x, %w0) {padding=[1,1,1,1]}
  %bn: f32[N,48,8,8] = batch_norm(%c0, %bn_gamma, %bn_beta, %bn_mean, %bn_var)
  %r0: f32[N,48,8,8] = relu(%bn)
  %c1: f32[N,32,8,8] = conv2d(%r0, %w1, %b1) {act="relu"}
  %c2: f32[N,48,8,8] = conv2d(%c1, %w2) {padding=[1,1,1,1]}
  %s: f32[N,48,8,8] = add(%c2, %r0)
  %p: f32[N,48,1,1] = global_avg_pool(%s)
  %f: f32[N,48] = flatten(%p)
  %y: f32[N,4] = dense(%f, %wfc)
  return %y
}
"""


def _zero_members(g, a, grp, which):
    """`g` with every parameter slice of units `which` of `grp` set to zero (rows, input slices, BN entries)."""
    chosen = set(grp.units[which].tolist())
    weights = dict(g.weights)
    for m in grp.members:
        hit = [i for i, u in enumerate(a.unit_of[m.value]) if int(u) in chosen]
        w = weights[m.param].copy()
        index = [slice(None)] * w.ndim
        index[m.axis] = hit
        w[tuple(index)] = 0
        weights[m.param] = w
    return g.replace(weights=weights)


def _pruned_units(sel, grp):
    return sorted(np.flatnonzero(sel.pruned[grp.units]).tolist())


# ---- registry ---------------------------------------------------------------------------------------

def test_every_ir_op_has_a_channel_rule():
    assert set(CHANNEL_RULES) == set(ops.OPS), sorted(set(ops.OPS) ^ set(CHANNEL_RULES))


def test_an_op_without_a_rule_blocks_the_channels_it_touches_and_is_named():
    g, _ = analyzed(RESIDUAL)
    a = analyze(g, {k: v for k, v in CHANNEL_RULES.items() if k != "relu"})
    stream = group_of(a, "s")
    assert stream.is_blocked
    assert any(b.node == "r0" and b.reason == "op relu has no channel rule" for b in stream.blockers)
    assert not group_of(a, "c1").is_blocked  # c1's own channels do not pass a relu


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 60).flatmap(lambda n: st.tuples(st.just(n), st.lists(st.tuples(st.integers(0, n - 1),
                                                                                       st.integers(0, n - 1))))))
def test_atom_components_match_networkx(case):
    n, links = case
    a = np.array([x for x, _ in links], dtype=np.int64)
    b = np.array([y for _, y in links], dtype=np.int64)
    count, labels = components(n, a, b)
    g = nx.Graph()
    g.add_nodes_from(range(n))
    g.add_edges_from(links)
    expected = {frozenset(c) for c in nx.connected_components(g)}
    assert count == len(expected)
    assert {frozenset(np.flatnonzero(labels == k).tolist()) for k in range(count)} == expected


# ---- importance -------------------------------------------------------------------------------------

@pytest.mark.parametrize("criterion", ["l1", "l2", "taylor", "bn_scale"])
def test_zero_importance_units_are_pruned_first_and_change_nothing(criterion):
    g, a = analyzed(WIDE)
    grp = group_of(a, "s")
    which = [3, 17, 40]
    z = _zero_members(g, a, grp, which)
    x = interpreter.example_inputs(g, seed=2, batch=2)
    sel = select(z, a, PruneConfig(ratio=3 / 48, scope="local", criterion=criterion, ignore=("c1",)), x)
    assert _pruned_units(sel, grp) == which
    if criterion != "bn_scale":  # with gamma alone zeroed, BN still adds beta: the channel is not dead
        p = prune_units(z, a, sel.pruned)
        assert compare(outputs(p, x), outputs(z, x)).max_rel <= 1e-5


def test_bn_scale_skips_groups_without_batch_norm():
    g, a = analyzed(WIDE)
    sel = select(g, a, PruneConfig(ratio=0.25, criterion="bn_scale"))
    assert sel.stats["groups_unscored"] == 1 and sel.stats["groups_pruned"] == 1
    assert not sel.pruned[group_of(a, "c1").units].any()


def test_taylor_needs_sample_inputs():
    g, a = analyzed(WIDE)
    with pytest.raises(PipelineError, match="sample inputs"):
        select(g, a, PruneConfig(criterion="taylor"))


def test_random_criterion_follows_its_seed():
    g, a = analyzed(WIDE)
    picks = [select(g, a, PruneConfig(ratio=0.5, criterion="random", seed=s)).pruned for s in (1, 1, 2)]
    assert np.array_equal(picks[0], picks[1]) and not np.array_equal(picks[0], picks[2])


# ---- selection ---------------------------------------------------------------------------------------

def test_local_scope_prunes_every_group_by_the_ratio():
    g, a = analyzed(WIDE)
    sel = select(g, a, PruneConfig(ratio=0.25, scope="local"))
    assert sel.per_group == {group_of(a, "s").id: 12, group_of(a, "c1").id: 8}


def test_global_scope_hits_the_total_and_respects_max_ratio():
    g, a = analyzed(WIDE)
    sel = select(g, a, PruneConfig(ratio=0.5))
    assert sel.stats["channels_removed"] == 40 and sel.stats["channels_prunable"] == 80
    capped = select(g, a, PruneConfig(ratio=0.8, max_ratio=0.5))
    for grp in (group_of(a, "s"), group_of(a, "c1")):
        assert capped.per_group[grp.id] <= grp.channels // 2


def test_round_to_comes_from_the_target_channel_block():
    g, _ = analyzed(WIDE)
    avx512 = Target("x86_64-linux-gnu", "skylake-avx512", features=frozenset({"avx512f"}))
    info = run_pass("prune", g)
    assert info.stats["round_to"] == 1
    from slimc.pass_manager import PASSES

    opts = {k: o.default for k, o in PASSES["prune"].options.items()}
    res = PASSES["prune"].fn(g, PassContext(opts, target=avx512))
    assert res.stats["round_to"] == 16
    assert res.graph.type_of("s").shape[1] % 16 == 0 and res.graph.type_of("c1").shape[1] % 16 == 0
    assert res.graph.type_of("s").shape[1] < 48 or res.graph.type_of("c1").shape[1] < 32


def test_ignore_keeps_a_layers_output_channels():
    g, a = analyzed(WIDE)
    res = run_pass("prune", g, ratio=0.5, scope="local", ignore="c1")
    assert res.graph.type_of("c1").shape[1] == 32 and res.graph.type_of("s").shape[1] == 24
    assert res.stats["groups_ignored"] == 1


def test_overrides_set_one_layers_ratio():
    g, a = analyzed(WIDE)
    res = run_pass("prune", g, ratio=0.25, scope="local", overrides="c1=0.75")
    assert res.graph.type_of("c1").shape[1] == 8 and res.graph.type_of("s").shape[1] == 36


@pytest.mark.parametrize("options, message", [
    ({"ignore": "nope"}, "neither a node name"),
    ({"overrides": "c1"}, "NAME=RATIO"),
    ({"overrides": "c1=1.5"}, "must be in"),
    ({"criterion": "l3"}, "criterion"),
    ({"scope": "both"}, "scope"),
    ({"ratio": 1.0}, "ratio"),
])
def test_bad_options_are_clear_errors(options, message):
    g, _ = analyzed(WIDE)
    with pytest.raises(PipelineError, match=message):
        run_pass("prune", g, **options)


# ---- the pass in a pipeline -------------------------------------------------------------------------

def test_pipeline_text_runs_the_pass_purely_and_reports():
    g, a = analyzed(WIDE)
    snap = snapshot(g)
    pm = PassManager("prune{ratio=0.5,criterion=l2,scope=local,ignore=c0;y,overrides=c1=0.25}")
    assert pm.pipeline == "prune{ratio=0.5,criterion=l2,scope=local,ignore=c0;y,overrides=c1=0.25}"
    out, records = pm.run(g)
    assert_same(g, snap)
    st = records[-1].pass_stats
    assert out.type_of("c1").shape[1] == 24 and out.type_of("s").shape[1] == 48
    assert (st["macs_before"], st["macs_after"]) == (graph_stats(g).macs, graph_stats(out).macs)
    assert st["groups_pruned"] == 1 and st["channels_removed"] == 8
    assert any(line.startswith("y (dense): graph output") for line in st["blocked_by"])


def test_ratio_zero_changes_nothing():
    g, _ = analyzed(WIDE)
    res = run_pass("prune", g, ratio=0.0)
    assert res.graph is g and not res.changed


def test_the_pass_plan_is_exact_on_a_masked_model():
    g, a = analyzed(WIDE)
    sel = select(g, a, PruneConfig(ratio=0.3))
    assert_zero_exact(g, a, sel.pruned)
    assert ir.print_graph(run_pass("prune", g).graph) == ir.print_graph(prune_units(g, a, sel.pruned))


def test_inspect_show_groups_prints_members_and_blockers():
    p = subprocess.run([sys.executable, "-m", "slimc.cli", "inspect", "tiny_models:convnet", "--show-groups"],
                       capture_output=True, text=True, cwd=TESTS, timeout=600)
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert "channel groups: 3 (1 prunable, 2 blocked)" in out
    assert "group 1: 32 channels of %conv2d, prunable" in out
    assert "producers: conv2d[c1] conv2d_2[pw]" in out and "consumers: conv2d_2[pw] linear[fc]" in out
    assert "blocked by linear (dense): graph output" in out
