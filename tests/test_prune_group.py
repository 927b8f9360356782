"""Pruning hazard: grouped convs (ResNeXt/RegNet) — input group k feeds only output group k, so whole conv
groups go together and every remaining group keeps its size."""

import numpy as np

from prune_checks import analyzed, assert_zero_exact, group_of, units
from slimc.passes.prune.apply import prune_units
from slimc.passes.prune.importance import PruneConfig, select

GROUPED = """\
graph @grouped(%x: f32[N,3,8,8]) {
  param %w1: f32[8,3,1,1]
  param %wg: f32[8,2,3,3]
  param %bg: f32[8]
  param %wh: f32[12,2,3,3]
  param %w3: f32[5,12,1,1]
  %a: f32[N,8,8,8] = conv2d(%x, %w1) {act="relu"}
  %b: f32[N,8,8,8] = conv2d(%a, %wg, %bg) {act="relu", groups=4, padding=[1,1,1,1]}
  %c: f32[N,12,8,8] = conv2d(%b, %wh) {groups=4, padding=[1,1,1,1]}
  %y: f32[N,5,8,8] = conv2d(%c, %w3)
  return %y
}
"""


def test_a_unit_is_one_conv_group_through_both_grouped_convs():
    g, a = analyzed(GROUPED)
    grp = group_of(a, "a")
    assert group_of(a, "b") is grp and group_of(a, "c") is grp
    assert grp.producers == ("a",) and grp.consumers == ("y",) and set(grp.through) == {"b", "c"}
    assert len(grp.units) == 4 and grp.channels == 8 and list(grp.widths) == [2, 2, 2, 2]
    for k in range(4):  # unit k: a[2k:2k+2], b[2k:2k+2], c[3k:3k+3]
        u = {*a.unit_of["a"][2 * k:2 * k + 2], *a.unit_of["b"][2 * k:2 * k + 2], *a.unit_of["c"][3 * k:3 * k + 3]}
        assert len(u) == 1


def test_zero_conv_groups_prune_exactly_and_groups_keep_their_size():
    g, a = analyzed(GROUPED)
    grp = group_of(a, "a")
    p = assert_zero_exact(g, a, units(a, grp, [1, 3]))
    assert p.node("b").attrs["groups"] == 2 and p.node("c").attrs["groups"] == 2
    assert p.param_types["wg"].shape == (4, 2, 3, 3) and p.param_types["wh"].shape == (6, 2, 3, 3)
    np.testing.assert_array_equal(p.weights["wh"], g.weights["wh"][[0, 1, 2, 6, 7, 8]])
    np.testing.assert_array_equal(p.weights["w3"], g.weights["w3"][:, [0, 1, 2, 6, 7, 8]])


def test_round_to_counts_whole_conv_groups():
    g, a = analyzed(GROUPED)
    sel = select(g, a, PruneConfig(ratio=0.3, scope="local", round_to=4))
    p = prune_units(g, a, sel.pruned)
    assert p.type_of("a").shape[1] == 4 and p.node("b").attrs["groups"] == 2
    sel = select(g, a, PruneConfig(ratio=0.3, scope="local", round_to=1))
    assert prune_units(g, a, sel.pruned).node("b").attrs["groups"] == 3
