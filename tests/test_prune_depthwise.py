"""Pruning hazard: a depthwise conv is not a layer boundary; its channels are its input's (and with a channel
multiplier, each input channel owns several output channels)."""

import numpy as np

from prune_checks import analyzed, assert_zero_exact, group_of, units

INVERTED = """\
graph @inverted(%x: f32[N,4,8,8]) {
  param %w0: f32[4,4,1,1]
  param %we: f32[12,4,1,1]
  param %be: f32[12]
  param %wd: f32[12,1,3,3]
  param %bd: f32[12]
  param %bn_gamma: f32[12]
  param %bn_beta: f32[12]
  param %bn_mean: f32[12]
  param %bn_var: f32[12]
  param %wp: f32[4,12,1,1]
  param %wm: f32[8,1,3,3]
  param %wo: f32[3,8,1,1]
  %s: f32[N,4,8,8] = conv2d(%x, %w0)
  %e: f32[N,12,8,8] = conv2d(%s, %we, %be) {act="relu6"}
  %d: f32[N,12,8,8] = conv2d(%e, %wd, %bd) {groups=12, padding=[1,1,1,1]}
  %bn: f32[N,12,8,8] = batch_norm(%d, %bn_gamma, %bn_beta, %bn_mean, %bn_var)
  %r: f32[N,12,8,8] = relu6(%bn)
  %pj: f32[N,4,8,8] = conv2d(%r, %wp)
  %s2: f32[N,4,8,8] = add(%pj, %s)
  %m: f32[N,8,8,8] = conv2d(%s2, %wm) {act="relu", groups=4, padding=[1,1,1,1]}
  %o: f32[N,3,8,8] = conv2d(%m, %wo)
  return %o
}
"""


def test_depthwise_conv_is_a_member_of_its_input_group():
    g, a = analyzed(INVERTED)
    hidden = group_of(a, "e")
    assert hidden.producers == ("e",) and hidden.consumers == ("pj",)
    assert {"d", "bn", "r"} <= set(hidden.through)
    assert group_of(a, "d") is hidden and group_of(a, "r") is hidden
    assert {m.param for m in hidden.members} >= {"wd", "bd", "bn_gamma", "we", "be", "wp"}


def test_zero_channels_through_a_depthwise_conv_prune_exactly():
    g, a = analyzed(INVERTED)
    hidden = group_of(a, "e")
    p = assert_zero_exact(g, a, units(a, hidden, [0, 3, 4, 11]))
    assert p.node("d").attrs["groups"] == 8
    assert p.param_types["wd"].shape == (8, 1, 3, 3) and p.param_types["bn_var"].shape == (8,)
    np.testing.assert_array_equal(p.weights["wd"], np.delete(g.weights["wd"], [0, 3, 4, 11], axis=0))


def test_channel_multiplier_keeps_each_input_channel_with_its_outputs():
    g, a = analyzed(INVERTED)
    stream = group_of(a, "s2")
    assert group_of(a, "m") is stream
    assert set(stream.producers) == {"s", "pj"} and set(stream.consumers) == {"e", "o"}
    # one unit is one stream channel; in %m it is two channels
    assert len(stream.units) == 4 and stream.channels == 4
    assert all(len(np.unique(a.unit_of["m"][2 * i:2 * i + 2])) == 1 for i in range(4))
    p = assert_zero_exact(g, a, units(a, stream, [1]))
    assert p.node("m").attrs["groups"] == 3 and p.type_of("m").shape == ("N", 6, 8, 8)
    np.testing.assert_array_equal(p.weights["wm"], np.delete(g.weights["wm"], [2, 3], axis=0))
    np.testing.assert_array_equal(p.weights["wo"], np.delete(g.weights["wo"], [2, 3], axis=1))
