"""Pruning hazard: flatten -> linear turns channel c into H*W input features of the dense (stride expansion),
interleaved when the tensor was channels-last; a dense over another axis leaves the channels alone."""

import numpy as np

from prune_checks import analyzed, assert_zero_exact, group_of, kept_columns, units

HEAD = """\
graph @head(%x: f32[N,3,6,6]) {
  param %w0: f32[4,3,3,3]
  param %b0: f32[4]
  param %w1: f32[10,36]
  param %b1: f32[10]
  param %w2: f32[3,10]
  %c: f32[N,4,3,3] = conv2d(%x, %w0, %b0) {act="relu", padding=[1,1,1,1], stride=[2,2]}
  %f: f32[N,36] = flatten(%c)
  %h: f32[N,10] = dense(%f, %w1, %b1) {act="relu"}
  %y: f32[N,3] = dense(%h, %w2)
  return %y
}
"""

RESHAPED = HEAD.replace("%f: f32[N,36] = flatten(%c)", "%f: f32[N,36] = reshape(%c) {shape=[-1,36]}")

CHANNELS_LAST = HEAD.replace("%f: f32[N,36] = flatten(%c)", """\
%t: f32[N,3,3,4] = transpose(%c) {perm=[0,2,3,1]}
  %f: f32[N,36] = flatten(%t)""")

PER_CHANNEL_DENSE = """\
graph @rows(%x: f32[N,3,6,6]) {
  param %w0: f32[4,3,3,3]
  param %w1: f32[5,9]
  param %w2: f32[2,4,1,5]
  %c: f32[N,4,3,3] = conv2d(%x, %w0) {act="relu", padding=[1,1,1,1], stride=[2,2]}
  %f: f32[N,4,9] = flatten(%c) {start=2}
  %h: f32[N,4,5] = dense(%f, %w1) {act="relu"}
  %r: f32[N,4,1,5] = reshape(%h) {shape=[-1,4,1,5]}
  %y: f32[N,2,1,1] = conv2d(%r, %w2)
  return %y
}
"""


def test_flatten_expands_each_channel_to_its_spatial_features():
    g, a = analyzed(HEAD)
    grp = group_of(a, "c")
    assert group_of(a, "f") is grp and grp.producers == ("c",) and grp.consumers == ("h",)
    assert len(grp.units) == 4 and grp.channels == 4
    for ch in range(4):
        assert set(a.unit_of["f"][9 * ch:9 * ch + 9]) == {a.unit_of["c"][ch]}
    hidden = group_of(a, "h")
    assert hidden.producers == ("h",) and hidden.consumers == ("y",)


def test_zero_channels_before_flatten_prune_exactly_and_drop_their_feature_blocks():
    g, a = analyzed(HEAD)
    p = assert_zero_exact(g, a, units(a, group_of(a, "c"), [1]))
    assert kept_columns(g.weights["w1"], p.weights["w1"], 1) == [*range(9), *range(18, 36)]
    assert_zero_exact(g, a, units(a, group_of(a, "h"), [0, 4, 7]))


def test_reshape_to_features_is_a_flatten_and_its_shape_follows():
    g, a = analyzed(RESHAPED)
    p = assert_zero_exact(g, a, units(a, group_of(a, "c"), [0, 3]))
    assert p.node("f").attrs["shape"] == (-1, 18)


def test_channels_last_flatten_interleaves_the_features():
    g, a = analyzed(CHANNELS_LAST)
    p = assert_zero_exact(g, a, units(a, group_of(a, "c"), [1]))
    assert kept_columns(g.weights["w1"], p.weights["w1"], 1) == [i for i in range(36) if i % 4 != 1]


def test_dense_over_space_keeps_channels_per_channel():
    g, a = analyzed(PER_CHANNEL_DENSE)
    grp = group_of(a, "c")
    assert group_of(a, "h") is grp and group_of(a, "r") is grp and grp.consumers == ("y",)
    p = assert_zero_exact(g, a, units(a, grp, [2]))
    assert p.param_types["w1"].shape == (5, 9)  # the dense's weight is per feature, not per channel
    np.testing.assert_array_equal(p.weights["w2"], np.delete(g.weights["w2"], 2, axis=1))
