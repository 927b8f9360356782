"""fuse-act: conv2d/dense + activation -> the layer with attribute act; provenance merged; negatives left alone."""

from __future__ import annotations

import pytest

from slimc import ir
from slimc.errors import PipelineError
from slimc.pass_manager import PassManager
from test_pass_rewrite import build, check_pass, ops_of

CONV = """graph @t(%x: f32[N,4,6,6]) {{
  param %w: f32[8,4,3,3]
  param %b: f32[8]
  %conv: f32[N,8,6,6] = conv2d(%x, %w, %b) {{padding=[1,1,1,1]{extra}}} loc("conv")
  %act: f32[N,8,6,6] = {act} loc("act")
  %y: f32[N,8,6,6] = tanh(%act)
  return %y
}}
"""

DENSE = """graph @t(%x: f32[N,5,16]) {{
  param %w: f32[8,16]
  %conv: f32[N,5,8] = dense(%x, %w{extra}) loc("fc")
  %act: f32[N,5,8] = {act} loc("act")
  %y: f32[N,5,8] = tanh(%act)
  return %y
}}
"""

#: activation expression -> the printed attributes of the fused layer
FUSED = {
    "relu(%conv)": 'act="relu"',
    "relu6(%conv)": 'act="relu6"',
    "clip(%conv) {min=-1.0, max=2.0}": 'act="clip", clip_max=2.0, clip_min=-1.0',
    "clip(%conv) {max=0.5}": 'act="clip", clip_max=0.5',
    "clip(%conv) {min=0.0, max=6.0}": 'act="relu6"',
    "clip(%conv) {min=0.0, max=inf}": 'act="relu"',
    "hardswish(%conv)": 'act="hardswish"',
    "hardsigmoid(%conv)": 'act="hardsigmoid"',
    "hardsigmoid(%conv) {alpha=0.16666667}": 'act="hardsigmoid"',
    "sigmoid(%conv)": 'act="sigmoid"',
    "silu(%conv)": 'act="silu"',
    "gelu(%conv)": 'act="gelu"',
}


@pytest.mark.parametrize("act", sorted(FUSED))
def test_conv_activation_fuses(act):
    g = build(CONV.format(act=act, extra=""))
    res = check_pass("fuse-act", g)
    assert ops_of(res.graph) == ["conv2d", "tanh"]
    line = ir.print_graph(res.graph).splitlines()[3]
    assert line == f'  %conv: f32[N,8,6,6] = conv2d(%x, %w, %b) {{{FUSED[act]}, padding=[1,1,1,1]}} loc("conv", "act")'
    assert res.graph.node("y").inputs == ("conv",)
    assert res.stats["fused"] == 1 and res.stats["not_fused"] == 0


@pytest.mark.parametrize("act", ["relu(%conv)", "clip(%conv) {min=-1.0, max=2.0}", "gelu(%conv)", "silu(%conv)"])
def test_dense_activation_fuses(act):
    res = check_pass("fuse-act", build(DENSE.format(act=act, extra="")))
    assert ops_of(res.graph) == ["dense", "tanh"] and res.graph.node("conv").source == ("fc", "act")
    assert res.graph.node("conv").attrs["act"] == FUSED[act].split('"')[1]


@pytest.mark.parametrize("act", [
    "hardsigmoid(%conv) {alpha=0.2}",        # ONNX's default slope has no fused form
    "gelu(%conv) {approximate=\"tanh\"}",
    "clip(%conv) {min=-inf}",                # no bound at all: canonicalize's job, not a fusion
    "tanh(%conv)",
])
def test_activations_without_fused_form_are_left(act):
    res = check_pass("fuse-act", build(CONV.format(act=act, extra="")))
    assert not res.changed and ops_of(res.graph)[0:2] == ["conv2d", act.split("(")[0]]


def test_conv_used_twice_is_not_fused():
    text = CONV.format(act="relu(%conv)", extra="").replace("tanh(%act)", "add(%act, %conv)")
    res = check_pass("fuse-act", build(text))
    assert not res.changed and res.stats["not_fused"] == 1


def test_conv_that_is_a_graph_output_is_not_fused():
    text = CONV.format(act="relu(%conv)", extra="").replace("return %y", "return %y, %conv")
    assert not check_pass("fuse-act", build(text)).changed


def test_conv_with_activation_already_is_not_fused_again():
    g = build(CONV.format(act="relu6(%conv)", extra=', act="relu"'))
    res = check_pass("fuse-act", g)
    assert not res.changed and res.graph is g


def test_activation_as_graph_output_keeps_output_name():
    text = CONV.format(act="relu(%conv)", extra="").replace("  %y: f32[N,8,6,6] = tanh(%act)\n", "")
    res = check_pass("fuse-act", build(text.replace("return %y", "return %act")))
    assert res.graph.outputs == ("act",) and ops_of(res.graph) == ["conv2d"]


def test_acts_option_restricts_fusion():
    g = build(CONV.format(act="sigmoid(%conv)", extra=""))
    assert not check_pass("fuse-act", g, acts="relu|relu6").changed
    assert check_pass("fuse-act", g, acts="sigmoid").changed
    with pytest.raises(PipelineError, match="swish"):
        PassManager("fuse-act{acts=relu|swish}").run(g)


def test_stats_count_by_activation():
    g = build("""graph @t(%x: f32[N,4,6,6]) {
  param %w: f32[4,4,3,3]
  %c1: f32[N,4,6,6] = conv2d(%x, %w) {padding=[1,1,1,1]}
  %a1: f32[N,4,6,6] = relu(%c1)
  %c2: f32[N,4,6,6] = conv2d(%a1, %w) {padding=[1,1,1,1]}
  %a2: f32[N,4,6,6] = relu(%c2)
  %c3: f32[N,4,6,6] = conv2d(%a2, %w) {padding=[1,1,1,1]}
  %y: f32[N,4,6,6] = hardswish(%c3)
  return %y
}""")
    res = check_pass("fuse-act", g)
    assert ops_of(res.graph) == ["conv2d"] * 3 and res.graph.outputs == ("y",)
    assert res.stats == {"fused": 3, "by_act": {"hardswish": 1, "relu": 2}, "not_fused": 0}
