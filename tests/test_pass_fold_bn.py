"""fold-bn: conv2d/dense + batch_norm -> one layer, numerically careful; unfoldable batch norms are counted."""

from __future__ import annotations

import numpy as np
import pytest

from slimc import ir
from slimc.passes.fold_bn import folded_weights
from test_pass_rewrite import build, check_pass, ops_of

BN_PARAMS = """
  param %bn.gamma: f32[{c}]
  param %bn.beta: f32[{c}]
  param %bn.mean: f32[{c}]
  param %bn.var: f32[{c}]
"""


def conv_bn(groups: int = 1, bias: bool = False, cin: int = 8, cout: int = 8, act: str = "") -> str:
    b = ", %b" if bias else ""
    attrs = f"padding=[1,1,1,1], groups={groups}" + (f", {act}" if act else "")
    return f"""graph @t(%x: f32[N,{cin},6,6]) {{
  param %w: f32[{cout},{cin // groups},3,3]
  {"param %b: f32[" + str(cout) + "]" if bias else ""}
  {BN_PARAMS.format(c=cout)}
  %conv: f32[N,{cout},6,6] = conv2d(%x, %w{b}) {{{attrs}}} loc("conv")
  %bn: f32[N,{cout},6,6] = batch_norm(%conv, %bn.gamma, %bn.beta, %bn.mean, %bn.var) {{eps=0.001}} loc("bn")
  %y: f32[N,{cout},6,6] = relu(%bn)
  return %y
}}
"""


@pytest.mark.parametrize("groups, cin, cout, bias", [
    (1, 8, 8, False), (1, 3, 16, True), (2, 8, 8, True), (8, 8, 8, False), (8, 8, 16, True),
])
def test_conv_bn_folds(groups, cin, cout, bias):
    g = build(conv_bn(groups, bias, cin, cout))
    res = check_pass("fold-bn", g)
    h = res.graph
    assert ops_of(h) == ["conv2d", "relu"]
    conv = h.node("conv")
    assert conv.inputs[:2] == ("x", "w") and len(conv.inputs) == 3
    assert conv.source == ("conv", "bn") and conv.attrs["groups"] == groups
    assert not any(p.startswith("bn.") for p in h.param_types)
    assert res.stats == {"folded": 1, "unfolded": 0, "unfolded_reasons": {}}


def test_missing_bias_gets_a_fresh_name():
    h = check_pass("fold-bn", build(conv_bn())).graph
    assert h.node("conv").inputs == ("x", "w", "conv.bias")


def test_folded_weights_are_computed_in_float64():
    g = build(conv_bn(bias=True), seed=3, **{"bn.var": np.full(8, 1e-6, "float32")})
    w, b = folded_weights(g, g.node("conv"), g.node("bn"))
    f64 = {k: v.astype(np.float64) for k, v in g.weights.items()}
    s = f64["bn.gamma"] / np.sqrt(f64["bn.var"] + 1e-3)
    np.testing.assert_array_equal(w, (f64["w"] * s[:, None, None, None]).astype(np.float32))
    np.testing.assert_array_equal(b, ((f64["b"] - f64["bn.mean"]) * s + f64["bn.beta"]).astype(np.float32))
    assert w.dtype == b.dtype == np.float32
    check_pass("fold-bn", g)


def test_dense_bn_on_2d_input():
    g = build(f"""graph @t(%x: f32[N,16]) {{
  param %w: f32[8,16]
  param %b: f32[8]
  {BN_PARAMS.format(c=8)}
  %fc: f32[N,8] = dense(%x, %w, %b)
  %y: f32[N,8] = batch_norm(%fc, %bn.gamma, %bn.beta, %bn.mean, %bn.var)
  return %y
}}""")
    res = check_pass("fold-bn", g)
    assert ops_of(res.graph) == ["dense"]
    assert res.graph.outputs == ("y",) and res.graph.nodes[0].source == ("fc", "y")


def test_dense_on_3d_input_is_not_folded():
    g = build(f"""graph @t(%x: f32[N,8,16]) {{
  param %w: f32[4,16]
  {BN_PARAMS.format(c=8)}
  %fc: f32[N,8,4] = dense(%x, %w)
  %y: f32[N,8,4] = batch_norm(%fc, %bn.gamma, %bn.beta, %bn.mean, %bn.var)
  return %y
}}""")
    res = check_pass("fold-bn", g)
    assert not res.changed and res.stats["unfolded_reasons"] == {"dense output is not 2-D (channels are not axis 1)": 1}


def test_conv_with_fused_activation_is_not_folded():
    res = check_pass("fold-bn", build(conv_bn(act='act="relu"')))
    assert not res.changed and ops_of(res.graph) == ["conv2d", "batch_norm", "relu"]
    assert res.stats["unfolded"] == 1


def test_conv_output_used_twice_is_not_folded():
    text = conv_bn().replace("%y: f32[N,8,6,6] = relu(%bn)", "%y: f32[N,8,6,6] = add(%bn, %conv)")
    res = check_pass("fold-bn", build(text))
    assert not res.changed and res.stats["unfolded_reasons"] == {"conv2d output has other users": 1}


def test_conv_that_is_a_graph_output_is_not_folded():
    text = conv_bn().replace("return %y", "return %y, %conv")
    assert not check_pass("fold-bn", build(text)).changed


def test_batch_norm_after_concat_is_left_alone():
    g = build(f"""graph @densenet(%x: f32[N,4,6,6]) {{
  param %w: f32[4,4,3,3]
  {BN_PARAMS.format(c=8)}
  %c: f32[N,4,6,6] = conv2d(%x, %w) {{padding=[1,1,1,1]}}
  %cat: f32[N,8,6,6] = concat(%x, %c) {{axis=1}}
  %bn: f32[N,8,6,6] = batch_norm(%cat, %bn.gamma, %bn.beta, %bn.mean, %bn.var)
  %y: f32[N,8,6,6] = relu(%bn)
  return %y
}}""")
    res = check_pass("fold-bn", g)
    assert not res.changed and res.graph is g
    assert res.stats == {"folded": 0, "unfolded": 1, "unfolded_reasons": {"after concat": 1}}


def test_batch_norm_on_graph_input_is_left_alone():
    g = build(f"""graph @t(%x: f32[N,8,6,6]) {{
  {BN_PARAMS.format(c=8)}
  %y: f32[N,8,6,6] = batch_norm(%x, %bn.gamma, %bn.beta, %bn.mean, %bn.var)
  return %y
}}""")
    assert check_pass("fold-bn", g).stats["unfolded"] == 1


def test_two_batch_norms_in_a_row_both_fold():
    text = conv_bn().replace(
        "%y: f32[N,8,6,6] = relu(%bn)",
        "%bn2: f32[N,8,6,6] = batch_norm(%bn, %bn.gamma, %bn.beta, %bn.mean, %bn.var)\n"
        "  %y: f32[N,8,6,6] = relu(%bn2)")
    res = check_pass("fold-bn", build(text))
    assert ops_of(res.graph) == ["conv2d", "relu"] and res.stats["folded"] == 2
    assert res.graph.node("conv").source == ("conv", "bn", "bn2")


def test_shared_weight_is_not_overwritten():
    g = build(f"""graph @t(%x: f32[N,8,6,6]) {{
  param %w: f32[8,8,1,1]
  {BN_PARAMS.format(c=8)}
  %c1: f32[N,8,6,6] = conv2d(%x, %w)
  %b1: f32[N,8,6,6] = batch_norm(%c1, %bn.gamma, %bn.beta, %bn.mean, %bn.var)
  %c2: f32[N,8,6,6] = conv2d(%x, %w)
  %y: f32[N,8,6,6] = add(%b1, %c2)
  return %y
}}""")
    h = check_pass("fold-bn", g).graph
    assert h.node("c2").inputs == ("x", "w")
    assert h.node("c1").inputs == ("x", "c1.weight", "c1.bias")
    np.testing.assert_array_equal(h.weights["w"], g.weights["w"])


def test_batch_norm_graph_output_keeps_its_name():
    text = conv_bn().replace("  %y: f32[N,8,6,6] = relu(%bn)\n", "").replace("return %y", "return %bn")
    res = check_pass("fold-bn", build(text))
    assert res.graph.outputs == ("bn",) and ops_of(res.graph) == ["conv2d"]
    assert "%bn: f32[N,8,6,6] = conv2d(%x, %w, %conv.bias)" in ir.print_graph(res.graph)
