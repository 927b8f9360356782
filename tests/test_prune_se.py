"""Pruning hazard: squeeze-excitation multiplies a tensor by per-channel scales computed from it, so the expand
conv of the SE branch is a producer of the same channels; a single-channel (spatial) gate must block instead."""

from prune_checks import analyzed, assert_zero_exact, group_of, units

SE = """\
graph @se(%x: f32[N,3,8,8]) {
  param %w0: f32[8,3,3,3]
  param %b0: f32[8]
  param %wa: f32[2,8,1,1]
  param %ba: f32[2]
  param %wb: f32[8,2,1,1]
  param %bb: f32[8]
  param %wp: f32[4,8,1,1]
  %c: f32[N,8,8,8] = conv2d(%x, %w0, %b0) {act="silu", padding=[1,1,1,1]}
  %g: f32[N,8,1,1] = global_avg_pool(%c)
  %sa: f32[N,2,1,1] = conv2d(%g, %wa, %ba) {act="relu"}
  %sb: f32[N,8,1,1] = conv2d(%sa, %wb, %bb) {act="hardsigmoid"}
  %m: f32[N,8,8,8] = mul(%c, %sb)
  %y: f32[N,4,8,8] = conv2d(%m, %wp)
  return %y
}
"""

SE_DENSE = """\
graph @se_dense(%x: f32[N,3,8,8]) {
  param %w0: f32[8,3,3,3]
  param %wa: f32[2,8]
  param %wb: f32[8,2]
  param %bb: f32[8]
  param %wp: f32[4,8,1,1]
  %c: f32[N,8,8,8] = conv2d(%x, %w0) {act="relu", padding=[1,1,1,1]}
  %g: f32[N,8] = mean(%c) {axes=[2,3]}
  %sa: f32[N,2] = dense(%g, %wa) {act="relu"}
  %sb: f32[N,8] = dense(%sa, %wb, %bb)
  %sg: f32[N,8] = sigmoid(%sb)
  %s4: f32[N,8,1,1] = reshape(%sg) {shape=[-1,8,1,1]}
  %m: f32[N,8,8,8] = mul(%s4, %c)
  %y: f32[N,4,8,8] = conv2d(%m, %wp)
  return %y
}
"""

SPATIAL_GATE = """\
graph @gate(%x: f32[N,3,8,8]) {
  param %w0: f32[8,3,3,3]
  param %wp: f32[4,8,1,1]
  %c: f32[N,8,8,8] = conv2d(%x, %w0) {act="relu", padding=[1,1,1,1]}
  %am: f32[N,1,8,8] = mean(%c) {axes=[1], keepdims=true}
  %as: f32[N,1,8,8] = sigmoid(%am)
  %m: f32[N,8,8,8] = mul(%c, %as)
  %y: f32[N,4,8,8] = conv2d(%m, %wp)
  return %y
}
"""


def test_se_expand_conv_produces_the_scaled_channels():
    g, a = analyzed(SE)
    grp = group_of(a, "c")
    assert group_of(a, "sb") is grp and group_of(a, "m") is grp
    assert set(grp.producers) == {"c", "sb"} and set(grp.consumers) == {"sa", "y"}
    squeeze = group_of(a, "sa")
    assert squeeze.producers == ("sa",) and squeeze.consumers == ("sb",)


def test_zero_se_channels_prune_exactly():
    g, a = analyzed(SE)
    p = assert_zero_exact(g, a, units(a, group_of(a, "c"), [0, 5, 6]))
    assert p.param_types["wb"].shape == (5, 2, 1, 1) and p.param_types["wa"].shape == (2, 5, 1, 1)
    assert_zero_exact(g, a, units(a, group_of(a, "sa"), [0]))


def test_se_built_from_dense_layers_and_a_reshape_prunes_exactly():
    g, a = analyzed(SE_DENSE)
    grp = group_of(a, "c")
    assert group_of(a, "s4") is grp and set(grp.producers) == {"c", "sb"}
    p = assert_zero_exact(g, a, units(a, grp, [2, 3]))
    assert p.node("s4").attrs["shape"] == (-1, 6, 1, 1)
    assert p.param_types["wa"].shape == (2, 6) and p.param_types["bb"].shape == (6,)


def test_a_single_channel_gate_over_all_channels_blocks_at_the_channel_mean():
    g, a = analyzed(SPATIAL_GATE)
    grp = group_of(a, "c")
    assert grp.is_blocked
    assert any(b.node == "am" and "mean reduces the channel axis" in b.reason for b in grp.blockers)
