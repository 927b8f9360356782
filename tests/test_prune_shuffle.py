"""Pruning hazard: channel shuffle interleaves the branches, so column j of every shuffle group goes together
(ShuffleNet V2), and a shuffle spelled as reshape/transpose/reshape must block rather than guess."""

import numpy as np

from prune_checks import analyzed, assert_zero_exact, group_of

SHUFFLE = """\
graph @shuffle(%x: f32[N,3,8,8]) {
  param %w0: f32[8,3,1,1]
  param %wl: f32[4,8,1,1]
  param %wr1: f32[6,8,1,1]
  param %wr2: f32[6,1,3,3]
  param %wr3: f32[4,6,1,1]
  param %wn: f32[4,4,1,1]
  param %wo: f32[5,8,1,1]
  %s: f32[N,8,8,8] = conv2d(%x, %w0) {act="relu"}
  %l: f32[N,4,8,8] = conv2d(%s, %wl) {act="relu"}
  %r1: f32[N,6,8,8] = conv2d(%s, %wr1) {act="relu"}
  %r2: f32[N,6,8,8] = conv2d(%r1, %wr2) {groups=6, padding=[1,1,1,1]}
  %r3: f32[N,4,8,8] = conv2d(%r2, %wr3) {act="relu"}
  %cat: f32[N,8,8,8] = concat(%l, %r3) {axis=1}
  %sh: f32[N,8,8,8] = channel_shuffle(%cat) {groups=2}
  %sp#0: f32[N,4,8,8], %sp#1: f32[N,4,8,8] = split(%sh) {axis=1, sizes=[4,4]}
  %n: f32[N,4,8,8] = conv2d(%sp#1, %wn) {act="relu"}
  %cat2: f32[N,8,8,8] = concat(%sp#0, %n) {axis=1}
  %sh2: f32[N,8,8,8] = channel_shuffle(%cat2) {groups=2}
  %o: f32[N,5,8,8] = conv2d(%sh2, %wo)
  return %o
}
"""

RAW = SHUFFLE.replace("""  %sh: f32[N,8,8,8] = channel_shuffle(%cat) {groups=2}""", """\
  %v: f32[N,2,4,8,8] = reshape(%cat) {shape=[-1,2,4,8,8]}
  %t: f32[N,4,2,8,8] = transpose(%v) {perm=[0,2,1,3,4]}
  %sh: f32[N,8,8,8] = reshape(%t) {shape=[-1,8,8,8]}""")


def _unit(a, value, i):
    return int(a.unit_of[value][i])


def test_shuffle_couples_column_j_of_both_branches():
    g, a = analyzed(SHUFFLE)
    for j in range(4):
        assert _unit(a, "l", j) == _unit(a, "r3", j) == _unit(a, "sh", 2 * j) == _unit(a, "sh", 2 * j + 1)
    # the second shuffle pairs sp#0[j] with n[j]: units 0 and 1 also own two channels of n each
    assert _unit(a, "n", 0) == _unit(a, "n", 1) == _unit(a, "l", 0)
    assert _unit(a, "n", 2) == _unit(a, "n", 3) == _unit(a, "l", 1)
    front, back = group_of(a, "sp#0"), group_of(a, "sp#1")
    assert front is not back
    assert set(front.producers) == {"l", "r3", "n"} and front.consumers == ("o",)
    assert set(back.producers) == {"l", "r3"} and back.consumers == ("n",)


def test_zero_shuffled_channels_prune_exactly_and_shuffles_stay_valid():
    g, a = analyzed(SHUFFLE)
    pruned = np.zeros(a.num_units, bool)
    pruned[[_unit(a, "l", 0), _unit(a, "l", 3)]] = True
    p = assert_zero_exact(g, a, pruned)
    assert p.type_of("cat").shape == ("N", 4, 8, 8) and p.node("sh").attrs["groups"] == 2
    assert p.node("sp").attrs["sizes"] == (2, 2)
    assert p.type_of("n").shape == ("N", 2, 8, 8) and p.type_of("sh2").shape == ("N", 4, 8, 8)


def test_zero_channels_of_the_branch_inside_prune_exactly():
    g, a = analyzed(SHUFFLE)
    inner = group_of(a, "r1")
    assert group_of(a, "r2") is inner
    pruned = np.zeros(a.num_units, bool)
    pruned[inner.units[[1, 2, 5]]] = True
    assert_zero_exact(g, a, pruned)


def test_shuffle_as_reshape_transpose_reshape_blocks_with_the_reshape_named():
    g, a = analyzed(RAW)
    stream = a.groups_of_value("cat")
    assert stream and all(gr.is_blocked for gr in stream)
    assert any(b.node == "v" and "reshape" in b.reason for gr in stream for b in gr.blockers)
    assert not group_of(a, "r1").is_blocked  # the branch's own channels are still prunable
