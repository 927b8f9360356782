"""Pruning hazard: residual adds couple every conv that writes into the stream and every one that reads it."""

import numpy as np

from prune_checks import analyzed, assert_zero_exact, group_of, kept_columns, units
from slimc.passes.prune.apply import prune_units

RESIDUAL = """\
graph @residual(%x: f32[N,3,8,8]) {
  param %w0: f32[8,3,3,3]
  param %b0: f32[8]
  param %bn_gamma: f32[8]
  param %bn_beta: f32[8]
  param %bn_mean: f32[8]
  param %bn_var: f32[8]
  param %w1: f32[6,8,3,3]
  param %w2: f32[8,6,1,1]
  param %b2: f32[8]
  param %w3: f32[8,8,1,1]
  param %wfc: f32[5,8]
  %c0: f32[N,8,8,8] = conv2d(%x, %w0, %b0) {padding=[1,1,1,1]}
  %bn: f32[N,8,8,8] = batch_norm(%c0, %bn_gamma, %bn_beta, %bn_mean, %bn_var)
  %r0: f32[N,8,8,8] = relu(%bn)
  %c1: f32[N,6,8,8] = conv2d(%r0, %w1) {act="relu", padding=[1,1,1,1]}
  %c2: f32[N,8,8,8] = conv2d(%c1, %w2, %b2)
  %s: f32[N,8,8,8] = add(%c2, %r0)
  %c3: f32[N,8,8,8] = conv2d(%s, %w3)
  %s2: f32[N,8,8,8] = add(%s, %c3)
  %r: f32[N,8,8,8] = relu(%s2)
  %p: f32[N,8,1,1] = global_avg_pool(%r)
  %f: f32[N,8] = flatten(%p)
  %y: f32[N,5] = dense(%f, %wfc)
  return %y
}
"""


def test_every_conv_writing_the_stream_is_one_group():
    g, a = analyzed(RESIDUAL)
    stream = group_of(a, "s")
    assert set(stream.producers) == {"c0", "c2", "c3"}
    assert set(stream.consumers) == {"c1", "c3", "y"}
    assert {"bn", "r0", "s", "s2", "r", "p", "f"} <= set(stream.through)
    assert stream.channels == 8 and not stream.blocked.any()
    assert group_of(a, "c0") is stream and group_of(a, "f") is stream
    inner = group_of(a, "c1")
    assert inner.producers == ("c1",) and inner.consumers == ("c2",)
    assert {m.param for m in stream.members} >= {"bn_gamma", "bn_beta", "bn_mean", "bn_var", "b0", "b2", "w3", "wfc"}


def test_zero_channels_of_the_stream_prune_exactly_and_every_member_shrinks():
    g, a = analyzed(RESIDUAL)
    stream = group_of(a, "s")
    p = assert_zero_exact(g, a, units(a, stream, [1, 4, 6]))
    assert p.type_of("s").shape == ("N", 5, 8, 8)
    for name in ("bn_gamma", "bn_var", "b0", "b2"):
        assert p.param_types[name].shape == (5,)
    assert p.param_types["w3"].shape == (5, 5, 1, 1)
    assert p.param_types["w1"].shape == (6, 5, 3, 3)
    assert p.param_types["wfc"].shape == (5, 5)
    assert kept_columns(g.weights["wfc"], p.weights["wfc"], 1) == [0, 2, 3, 5, 7]


def test_zero_channels_inside_the_block_prune_exactly():
    g, a = analyzed(RESIDUAL)
    inner = group_of(a, "c1")
    p = assert_zero_exact(g, a, units(a, inner, [0, 5]))
    assert p.param_types["w1"].shape == (4, 8, 3, 3) and p.param_types["w2"].shape == (8, 4, 1, 1)


def test_pruning_one_residual_partner_alone_is_impossible():
    g, a = analyzed(RESIDUAL)
    stream = group_of(a, "s")
    pruned = units(a, stream, [2])
    p = prune_units(g, a, pruned)
    # the same channel is gone from every producer of the stream, never from just one
    for w in ("w0", "w2", "w3"):
        assert p.param_types[w].shape[0] == 7
    np.testing.assert_array_equal(p.weights["w2"], np.delete(g.weights["w2"], 2, axis=0))
