"""Pruning hazard: a layer norm over the channel axis (ConvNeXt, channels-last) mixes every channel through its
mean and variance, so removing any channel changes the others: those channels must stay (with the norm named as
the reason), while the MLP's hidden features and layer norms over other axes prune exactly."""

import numpy as np

from prune_checks import analyzed, assert_zero_exact, group_of, units

CONVNEXT = """\
graph @convnext(%x: f32[N,3,8,8]) {
  param %ws: f32[8,3,2,2]
  param %bs: f32[8]
  param %wd: f32[8,1,3,3]
  param %bd: f32[8]
  param %ln_w: f32[8]
  param %ln_b: f32[8]
  param %w1: f32[16,8]
  param %b1: f32[16]
  param %w2: f32[8,16]
  param %b2: f32[8]
  param %gamma: f32[8,1,1]
  param %wo: f32[4,8,1,1]
  %s: f32[N,8,4,4] = conv2d(%x, %ws, %bs) {stride=[2,2]}
  %d: f32[N,8,4,4] = conv2d(%s, %wd, %bd) {groups=8, padding=[1,1,1,1]}
  %t: f32[N,4,4,8] = transpose(%d) {perm=[0,2,3,1]}
  %ln: f32[N,4,4,8] = layer_norm(%t, %ln_w, %ln_b) {axis=3, eps=1e-6}
  %h: f32[N,4,4,16] = dense(%ln, %w1, %b1) {act="gelu"}
  %o: f32[N,4,4,8] = dense(%h, %w2, %b2)
  %tb: f32[N,8,4,4] = transpose(%o) {perm=[0,3,1,2]}
  %m: f32[N,8,4,4] = mul(%gamma, %tb)
  %r: f32[N,8,4,4] = add(%m, %s)
  %y: f32[N,4,4,4] = conv2d(%r, %wo)
  return %y
}
"""

SPATIAL_NORM = """\
graph @spatial_norm(%x: f32[N,3,4,4]) {
  param %w0: f32[8,3,3,3]
  param %lw: f32[4,4]
  param %lb: f32[4,4]
  param %scale: f32[8,1,1]
  param %wo: f32[4,8,1,1]
  %c: f32[N,8,4,4] = conv2d(%x, %w0) {padding=[1,1,1,1]}
  %ln: f32[N,8,4,4] = layer_norm(%c, %lw, %lb) {axis=2}
  %m: f32[N,8,4,4] = mul(%ln, %scale)
  %y: f32[N,4,4,4] = conv2d(%m, %wo)
  return %y
}
"""


def test_channel_layer_norm_blocks_the_stream_and_says_so():
    g, a = analyzed(CONVNEXT)
    stream = group_of(a, "s")
    assert group_of(a, "d") is stream and group_of(a, "t") is stream and group_of(a, "tb") is stream
    assert set(stream.producers) == {"s", "o"} and stream.is_blocked
    reasons = [b for b in stream.blockers if b.node == "ln"]
    assert reasons and "normalizes over the channel axis" in reasons[0].reason
    assert group_of(a, "ln").is_blocked  # the norm's output channels are the same mix


def test_the_channels_last_mlp_hidden_features_prune_exactly():
    g, a = analyzed(CONVNEXT)
    hidden = group_of(a, "h")
    assert hidden.producers == ("h",) and hidden.consumers == ("o",) and not hidden.is_blocked
    assert a.axes["h"] == 3
    p = assert_zero_exact(g, a, units(a, hidden, [0, 7, 8, 15]))
    assert p.param_types["w1"].shape == (12, 8) and p.param_types["b1"].shape == (12,)
    assert p.param_types["w2"].shape == (8, 12) and p.param_types["ln_w"].shape == (8,)


def test_layer_norm_over_space_passes_channels_and_the_layer_scale_follows():
    g, a = analyzed(SPATIAL_NORM)
    grp = group_of(a, "c")
    assert group_of(a, "ln") is grp and group_of(a, "m") is grp and not grp.is_blocked
    p = assert_zero_exact(g, a, units(a, grp, [1, 2, 6]))
    assert p.param_types["lw"].shape == (4, 4)
    np.testing.assert_array_equal(p.weights["scale"], np.delete(g.weights["scale"], [1, 2, 6], axis=0))
