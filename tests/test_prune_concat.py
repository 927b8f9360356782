"""Pruning hazard: concat places each input's channels at an offset, and DenseNet re-concatenates them again."""

import numpy as np

from prune_checks import analyzed, assert_zero_exact, group_of, kept_columns, units
from slimc.passes.prune.apply import prune_units

DENSE = """\
graph @dense(%x: f32[N,3,8,8]) {
  param %wa: f32[4,3,3,3]
  param %ba: f32[4]
  param %wb: f32[6,3,3,3]
  param %bn_gamma: f32[10]
  param %bn_beta: f32[10]
  param %bn_mean: f32[10]
  param %bn_var: f32[10]
  param %wc: f32[5,10,1,1]
  param %wd: f32[7,15,3,3]
  param %wfc: f32[3,7]
  %a: f32[N,4,8,8] = conv2d(%x, %wa, %ba) {padding=[1,1,1,1]}
  %b: f32[N,6,8,8] = conv2d(%x, %wb) {act="relu", padding=[1,1,1,1]}
  %cat: f32[N,10,8,8] = concat(%a, %b) {axis=1}
  %bn: f32[N,10,8,8] = batch_norm(%cat, %bn_gamma, %bn_beta, %bn_mean, %bn_var)
  %r: f32[N,10,8,8] = relu(%bn)
  %c: f32[N,5,8,8] = conv2d(%r, %wc)
  %cat2: f32[N,15,8,8] = concat(%cat, %c) {axis=1}
  %d: f32[N,7,8,8] = conv2d(%cat2, %wd) {act="relu", padding=[1,1,1,1]}
  %p: f32[N,7,1,1] = global_avg_pool(%d)
  %f: f32[N,7] = flatten(%p)
  %y: f32[N,3] = dense(%f, %wfc)
  return %y
}
"""

SPATIAL = """\
graph @spatial(%x: f32[N,3,8,8]) {
  param %wa: f32[4,3,3,3]
  param %wb: f32[4,3,3,3]
  param %wc: f32[6,4,1,1]
  %a: f32[N,4,8,8] = conv2d(%x, %wa) {padding=[1,1,1,1]}
  %b: f32[N,4,8,8] = conv2d(%x, %wb) {act="relu", padding=[1,1,1,1]}
  %cat: f32[N,4,16,8] = concat(%a, %b) {axis=2}
  %c: f32[N,6,16,8] = conv2d(%cat, %wc)
  return %c
}
"""


def test_each_concat_input_is_its_own_group_across_both_concats():
    g, a = analyzed(DENSE)
    ga, gb, gc = group_of(a, "a"), group_of(a, "b"), group_of(a, "c")
    assert len({ga.id, gb.id, gc.id}) == 3
    assert ga.producers == ("a",) and set(ga.consumers) == {"c", "d"}
    assert {"cat", "bn", "r", "cat2"} <= set(ga.through)
    assert {gr.id for gr in a.groups_of_value("cat2")} == {ga.id, gb.id, gc.id}
    assert gc.consumers == ("d",)


def test_offsets_remove_the_right_input_slices_of_every_consumer():
    g, a = analyzed(DENSE)
    ga, gb, gc = group_of(a, "a"), group_of(a, "b"), group_of(a, "c")
    pruned = units(a, ga, [1]) | units(a, gb, [2]) | units(a, gc, [0, 4])
    p = prune_units(g, a, pruned)
    # cat = [a0..a3, b0..b5]: a1 is column 1, b2 is column 4 + 2 = 6
    np.testing.assert_array_equal(p.weights["wc"], g.weights["wc"][1:4][:, [0, 2, 3, 4, 5, 7, 8, 9]])
    # cat2 = [cat, c0..c4]: c0 and c4 are columns 10 and 14
    assert kept_columns(g.weights["wd"], p.weights["wd"], 1) == [0, 2, 3, 4, 5, 7, 8, 9, 11, 12, 13]
    np.testing.assert_array_equal(p.weights["bn_gamma"], np.delete(g.weights["bn_gamma"], [1, 6]))
    assert p.type_of("cat2").shape == ("N", 11, 8, 8)


def test_zero_channels_of_every_concat_input_prune_exactly():
    g, a = analyzed(DENSE)
    ga, gb, gc = group_of(a, "a"), group_of(a, "b"), group_of(a, "c")
    assert_zero_exact(g, a, units(a, ga, [0, 3]) | units(a, gb, [1, 2, 5]) | units(a, gc, [2]))


def test_concat_along_space_couples_the_inputs_channel_for_channel():
    g, a = analyzed(SPATIAL)
    grp = group_of(a, "cat")
    assert group_of(a, "a") is grp and group_of(a, "b") is grp
    assert set(grp.producers) == {"a", "b"} and grp.consumers == ("c",)
    p = assert_zero_exact(g, a, units(a, grp, [0, 2]))
    assert p.type_of("cat").shape == ("N", 2, 16, 8)
