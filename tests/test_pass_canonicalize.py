"""canonicalize: each rewrite's structure before/after, numbers vs the original, idempotence, purity, negatives."""

from __future__ import annotations

import math

import numpy as np
import pytest

from slimc import ir
from slimc.pass_manager import PASSES, PassContext, PassManager
from test_pass_rewrite import build, check_pass, ops_of, run_pass


def wrap(body: str, inputs: str = "%x: f32[N,8,4,4]", params: str = "", ret: str = "%y") -> str:
    """A graph text around `body` (node lines), with optional parameter lines."""
    lines = [f"graph @t({inputs}) {{", *[f"  {p.strip()}" for p in params.strip().splitlines()],
             *[f"  {b.strip()}" for b in body.strip().splitlines()], f"  return {ret}", "}"]
    return "\n".join(lines) + "\n"


# ---- dead code, no-ops ---------------------------------------------------------------------------

def test_dead_code_and_unused_params_are_removed():
    g = build(wrap("""
        %a: f32[N,8,4,4] = relu(%x)
        %dead: f32[N,8,4,4] = sigmoid(%a)
        %dead2: f32[N,8,4,4] = mul(%dead, %a)
        %y: f32[N,8,4,4] = tanh(%a)
    """, params="param %unused: f32[3]"))
    res = check_pass("canonicalize", g)
    assert ops_of(res.graph) == ["relu", "tanh"]
    assert not res.graph.param_types
    assert res.stats["dead"] == 2 and res.stats["params_dropped"] == 1 and res.stats["removed"] == 2


NOOPS = {
    "identity": "identity(%a)",
    "dropout": "dropout(%a) {p=0.2}",
    "reshape": "reshape(%a) {shape=[0,8,4,-1]}",
    "flatten": "flatten(%a) {start=3}",
    "transpose": "transpose(%a) {perm=[0,1,2,3]}",
    "slice": "slice(%a) {axis=2, start=0, end=100}",
    "concat": "concat(%a) {axis=1}",
    "pad": "pad(%a) {pads=[0,0,0,0,0,0,0,0], value=1.0}",
    "clip": "clip(%a) {min=-inf, max=inf}",
    "channel_shuffle": "channel_shuffle(%a) {groups=1}",
}


@pytest.mark.parametrize("op", sorted(NOOPS))
def test_noop_is_removed(op):
    g = build(wrap(f"""
        %a: f32[N,8,4,4] = relu(%x)
        %n: f32[N,8,4,4] = {NOOPS[op]}
        %y: f32[N,8,4,4] = tanh(%n)
    """))
    res = check_pass("canonicalize", g)
    assert ops_of(res.graph) == ["relu", "tanh"]
    assert res.graph.node("y").inputs == ("a",)
    assert res.stats["noop"] == 1 and res.changed


NOT_NOOPS = {
    "reshape": ("f32[N,8,16]", "reshape(%a) {shape=[0,8,16]}"),
    "transpose": ("f32[N,8,4,4]", "transpose(%a) {perm=[0,1,3,2]}"),
    "slice": ("f32[N,8,2,4]", "slice(%a) {axis=2, start=0, end=2}"),
    "strided_slice": ("f32[N,8,2,4]", "slice(%a) {axis=2, start=0, end=4, step=2}"),
    "pad": ("f32[N,8,5,4]", "pad(%a) {pads=[0,0,1,0,0,0,0,0]}"),
    "clip": ("f32[N,8,4,4]", "clip(%a) {min=-1.0, max=1.0}"),
    "channel_shuffle": ("f32[N,8,4,4]", "channel_shuffle(%a) {groups=2}"),
}


@pytest.mark.parametrize("op", sorted(NOT_NOOPS))
def test_real_data_movement_is_kept(op):
    t, expr = NOT_NOOPS[op]
    g = build(wrap(f"""
        %a: f32[N,8,4,4] = relu(%x)
        %y: {t} = {expr}
    """))
    res = check_pass("canonicalize", g)
    assert not res.changed and res.graph is g


def test_identity_chain_at_output_keeps_output_name():
    g = build(wrap("""
        %a: f32[N,8,4,4] = relu(%x)
        %b: f32[N,8,4,4] = identity(%a)
        %y: f32[N,8,4,4] = dropout(%b)
    """))
    res = check_pass("canonicalize", g)
    assert res.graph.outputs == ("y",)
    assert ops_of(res.graph) == ["relu"] and res.graph.nodes[0].name == "y"


def test_identity_of_graph_input_as_output():
    g = build(wrap("%y: f32[N,8,4,4] = identity(%x)"))
    res = check_pass("canonicalize", g)
    assert res.graph.nodes == () and res.graph.outputs == ("x",)


# ---- constant folding ------------------------------------------------------------------------------

def test_constant_chain_is_folded_into_one_param():
    g = build(wrap("""
        %wt: f32[16,8] = transpose(%w) {perm=[1,0]}
        %ws: f32[16,8] = mul(%wt, %s)
        %f: f32[N,8] = flatten(%x) {start=1} 
        %p: f32[N,8] = slice(%f) {axis=1, start=0, end=8}
        %y: f32[N,16] = dense(%p, %ws)
    """, inputs="%x: f32[N,8,1,1]", params="param %w: f32[8,16]\nparam %s: f32[1]"))
    res = check_pass("canonicalize", g)
    assert ops_of(res.graph) == ["flatten", "dense"]
    assert list(res.graph.param_types) == ["ws"]
    expected = g.weights["w"].T * g.weights["s"]
    np.testing.assert_allclose(res.graph.weights["ws"], expected, rtol=1e-6)
    assert res.stats["folded"] == 2 and res.stats["noop"] == 1


def test_folding_a_graph_output_makes_it_a_param():
    g = build(wrap("%y: f32[4] = relu(%w)", params="param %w: f32[4]"))
    res = check_pass("canonicalize", g)
    assert res.graph.nodes == () and res.graph.outputs == ("y",) and res.graph.is_param("y")
    np.testing.assert_array_equal(res.graph.weights["y"], np.maximum(g.weights["w"], 0))


def test_multi_output_fold():
    g = build(wrap("""
        %s#0: f32[N,3], %s#1: f32[N,5] = split(%x) {axis=1, sizes=[3,5]}
        %c#0: f32[2,3], %c#1: f32[2,5] = split(%w) {axis=1, sizes=[3,5]}
        %d0: f32[N,2] = dense(%s#0, %c#0)
        %d1: f32[N,2] = dense(%s#1, %c#1)
        %y: f32[N,2] = add(%d0, %d1)
    """, inputs="%x: f32[N,8]", params="param %w: f32[2,8]"))
    res = check_pass("canonicalize", g)
    assert ops_of(res.graph) == ["split", "dense", "dense", "add"]
    assert sorted(res.graph.param_types) == ["c.0", "c.1"]


GROWS = wrap("%big: f32[64,64] = add(%a, %b)\n%y: f32[N,64] = dense(%x, %big)",
             inputs="%x: f32[N,64]", params="param %a: f32[64,1]\nparam %b: f32[1,64]")


def test_fold_limit_stops_model_growth():
    g = build(GROWS)
    capped = check_pass("canonicalize", g, fold_limit=1000)
    assert not capped.changed and ops_of(capped.graph) == ["add", "dense"]
    folded = check_pass("canonicalize", g)
    assert ops_of(folded.graph) == ["dense"] and folded.stats["folded"] == 1


def test_fold_limit_allows_folds_that_do_not_grow_the_model():
    g = build(wrap("%wt: f32[64,64] = transpose(%w) {perm=[1,0]}\n%y: f32[N,64] = dense(%x, %wt)",
                   inputs="%x: f32[N,64]", params="param %w: f32[64,64]"))
    res = check_pass("canonicalize", g, fold_limit=10)
    assert ops_of(res.graph) == ["dense"]


def test_fold_option_off():
    g = build(GROWS)
    res = check_pass("canonicalize", g, fold=False)
    assert not res.changed


# ---- common subexpressions ----------------------------------------------------------------------

def test_cse_merges_equal_nodes_and_their_provenance():
    g = build(wrap("""
        %a: f32[N,8,4,4] = conv2d(%x, %w) {padding=[1,1,1,1]} loc("conv_a")
        %b: f32[N,8,4,4] = conv2d(%x, %w) {padding=[1,1,1,1]} loc("conv_b")
        %ra: f32[N,8,4,4] = relu(%a)
        %rb: f32[N,8,4,4] = relu(%b)
        %c: f32[N,8,2,2] = conv2d(%x, %w) {padding=[1,1,1,1], stride=[2,2]}
        %s: f32[N,8,4,4] = add(%ra, %rb)
        %y: f32[N,8,4,4] = add(%s, %s)
    """, params="param %w: f32[8,8,3,3]"))
    res = check_pass("canonicalize", g)
    assert ops_of(res.graph) == ["conv2d", "relu", "add", "add"]
    assert res.graph.node("a").source == ("conv_a", "conv_b")
    assert res.graph.node("s").inputs == ("ra", "ra")
    assert res.stats["cse"] == 2 and res.stats["dead"] == 1


def test_cse_keeps_nodes_with_different_attrs():
    g = build(wrap("""
        %a: f32[N,8,4,4] = clip(%x) {min=-1.0, max=1.0}
        %b: f32[N,8,4,4] = clip(%x) {min=-1.0, max=2.0}
        %y: f32[N,8,4,4] = add(%a, %b)
    """))
    assert not check_pass("canonicalize", g).changed


def test_cse_option_off():
    g = build(wrap("""
        %a: f32[N,8,4,4] = relu(%x)
        %b: f32[N,8,4,4] = relu(%x)
        %y: f32[N,8,4,4] = add(%a, %b)
    """))
    assert not check_pass("canonicalize", g, cse=False).changed
    assert ops_of(check_pass("canonicalize", g).graph) == ["relu", "add"]


# ---- canonical forms ------------------------------------------------------------------------------

@pytest.mark.parametrize("attrs, expected", [
    ("{min=0.0, max=6.0}", "relu6"),
    ("{min=0.0}", "relu"),
    ("{min=0.0, max=inf}", "relu"),
    ("{min=-1.0, max=6.0}", "clip"),
    ("{max=6.0}", "clip"),
])
def test_clip_canonical_forms(attrs, expected):
    g = build(wrap(f"%c: f32[N,8,4,4] = clip(%x) {attrs} loc(\"hardtanh\")\n%y: f32[N,8,4,4] = tanh(%c)"))
    res = check_pass("canonicalize", g)
    assert ops_of(res.graph) == [expected, "tanh"]
    assert res.graph.node("c").source == ("hardtanh",)
    assert res.changed == (expected != "clip")


@pytest.mark.parametrize("first, second, expected", [
    ("relu", "relu", "relu"), ("relu", "relu6", "relu6"), ("relu6", "relu", "relu6"), ("relu6", "relu6", "relu6"),
])
def test_activation_chains_collapse(first, second, expected):
    g = build(wrap(f"%a: f32[N,8,4,4] = {first}(%x)\n%y: f32[N,8,4,4] = {second}(%a)"))
    res = check_pass("canonicalize", g)
    assert ops_of(res.graph) == [expected] and res.graph.node("y").inputs == ("x",)


@pytest.mark.parametrize("expr", ["mul(%x, %s)", "mul(%s, %x)"])
def test_silu(expr):
    g = build(wrap(f"%s: f32[N,8,4,4] = sigmoid(%x) loc(\"sig\")\n%y: f32[N,8,4,4] = {expr} loc(\"mul\")"))
    res = check_pass("canonicalize", g)
    assert ir.print_graph(res.graph).splitlines()[1] == '  %y: f32[N,8,4,4] = silu(%x) loc("sig", "mul")'
    assert res.stats["silu"] == 1


def test_sigmoid_of_another_value_is_not_silu():
    g = build(wrap("%a: f32[N,8,4,4] = relu(%x)\n%s: f32[N,8,4,4] = sigmoid(%a)\n%y: f32[N,8,4,4] = mul(%x, %s)"))
    assert not check_pass("canonicalize", g).changed


SQRT2 = np.float32(math.sqrt(2.0))
GELU_PARAMS = "param %sqrt2: f32[]\nparam %one: f32[]\nparam %half: f32[]"
GELU_FIXED = {"sqrt2": SQRT2, "one": 1.0, "half": 0.5}

GELU_FORMS = {
    # torch.onnx's decomposition: ((x * (erf(x / sqrt2) + 1)) * 0.5)
    "onnx": """
        %d: f32[N,8,4,4] = div(%x, %sqrt2)
        %e: f32[N,8,4,4] = erf(%d)
        %a: f32[N,8,4,4] = add(%e, %one)
        %m: f32[N,8,4,4] = mul(%x, %a)
        %y: f32[N,8,4,4] = mul(%m, %half)
    """,
    # (0.5 * x) * (1 + erf(x * (1/sqrt2)))
    "half_first": """
        %h: f32[N,8,4,4] = mul(%half, %x)
        %d: f32[N,8,4,4] = mul(%x, %rsqrt2)
        %e: f32[N,8,4,4] = erf(%d)
        %a: f32[N,8,4,4] = add(%one, %e)
        %y: f32[N,8,4,4] = mul(%h, %a)
    """,
}


@pytest.mark.parametrize("form", sorted(GELU_FORMS))
def test_gelu_decomposition(form):
    g = build(wrap(GELU_FORMS[form], params=GELU_PARAMS + "\nparam %rsqrt2: f32[1]"),
              rsqrt2=np.float32(math.sqrt(0.5)), **GELU_FIXED)
    res = check_pass("canonicalize", g, tol=1e-6)
    assert ops_of(res.graph) == ["gelu"] and res.graph.node("y").inputs == ("x",)
    assert not res.graph.param_types
    assert len(res.graph.node("y").source) == 5
    assert res.stats["gelu"] == 1 and res.stats["dead"] == 4


def test_gelu_with_wrong_constant_is_left_alone():
    g = build(wrap(GELU_FORMS["onnx"], params=GELU_PARAMS), **{**GELU_FIXED, "half": 0.6})
    assert not check_pass("canonicalize", g).changed


def test_gelu_intermediate_used_elsewhere_is_left_alone():
    body = GELU_FORMS["onnx"].replace("%y: f32[N,8,4,4] = mul(%m, %half)",
                                      "%z: f32[N,8,4,4] = mul(%m, %half)\n%y: f32[N,8,4,4] = add(%z, %e)")
    g = build(wrap(body, params=GELU_PARAMS), **GELU_FIXED)
    assert not check_pass("canonicalize", g).changed


SHUFFLE = """
    %r: f32[N,2,4,4,4] = reshape(%a) {shape=[0,2,4,4,4]} loc("view")
    %t: f32[N,4,2,4,4] = transpose(%r) {perm=[0,2,1,3,4]} loc("transpose")
    %y: f32[N,8,4,4] = reshape(%t) {shape=[0,-1,4,4]} loc("view_1")
"""


def test_channel_shuffle():
    g = build(wrap("%a: f32[N,8,4,4] = relu(%x)\n" + SHUFFLE))
    res = check_pass("canonicalize", g)
    assert ir.print_graph(res.graph).splitlines()[2] == \
        '  %y: f32[N,8,4,4] = channel_shuffle(%a) {groups=2} loc("view", "transpose", "view_1")'
    assert res.stats["channel_shuffle"] == 1 and res.stats["dead"] == 2


def test_channel_shuffle_with_flattened_spatial_dims():
    g = build(wrap("""
        %a: f32[N,8,4,4] = relu(%x)
        %r: f32[N,4,2,16] = reshape(%a) {shape=[0,4,2,16]}
        %t: f32[N,2,4,16] = transpose(%r) {perm=[0,2,1,3]}
        %y: f32[N,8,4,4] = reshape(%t) {shape=[0,8,4,4]}
    """))
    res = check_pass("canonicalize", g)
    assert ops_of(res.graph) == ["relu", "channel_shuffle"] and res.graph.node("y").attrs["groups"] == 4


def test_channel_shuffle_after_a_reshape_is_still_found():
    g = build(wrap("%a: f32[N,8,4,4] = reshape(%x) {shape=[-1,8,4,4]}\n" + SHUFFLE, inputs="%x: f32[N,128]"))
    res = check_pass("canonicalize", g)
    assert ops_of(res.graph) == ["reshape", "channel_shuffle"]


def test_other_permutations_are_not_a_shuffle():
    g = build(wrap("""
        %a: f32[N,8,4,4] = relu(%x)
        %r: f32[N,2,4,4,4] = reshape(%a) {shape=[0,2,4,4,4]}
        %t: f32[N,2,4,4,4] = transpose(%r) {perm=[0,1,2,4,3]}
        %y: f32[N,8,4,4] = reshape(%t) {shape=[0,-1,4,4]}
    """))
    assert not check_pass("canonicalize", g).changed


def test_shuffle_whose_transpose_is_also_used_elsewhere_is_left_alone():
    g = build(wrap("%a: f32[N,8,4,4] = relu(%x)\n" + SHUFFLE.replace("%y:", "%z:") +
                   "%m: f32[N,4,2,4,4] = tanh(%t)\n%y: f32[N,8,4,4] = reshape(%m) {shape=[0,-1,4,4]}", ret="%y, %z"))
    assert not check_pass("canonicalize", g).changed


def test_reshape_chain_collapses():
    g = build(wrap("""
        %f: f32[N,128] = flatten(%x)
        %y: f32[N,8,16] = reshape(%f) {shape=[-1,8,16]}
    """))
    res = check_pass("canonicalize", g)
    assert ops_of(res.graph) == ["reshape"] and res.graph.node("y").inputs == ("x",)


def test_reshape_round_trip_disappears():
    g = build(wrap("""
        %f: f32[N,128] = flatten(%x)
        %y: f32[N,8,4,4] = reshape(%f) {shape=[-1,8,4,4]}
    """))
    res = check_pass("canonicalize", g)
    assert res.graph.nodes == () and res.graph.outputs == ("x",)


# ---- everything together ---------------------------------------------------------------------------

def test_mixed_graph_reaches_fixed_point_through_pass_manager():
    g = build(wrap("""
        %i: f32[N,8,4,4] = identity(%x)
        %c: f32[N,8,4,4] = conv2d(%i, %w) {padding=[1,1,1,1]}
        %s: f32[N,8,4,4] = sigmoid(%c)
        %m: f32[N,8,4,4] = mul(%c, %s)
        %k: f32[N,8,4,4] = clip(%m) {min=0.0, max=6.0}
        %k2: f32[N,8,4,4] = relu(%k)
        %r: f32[N,2,4,4,4] = reshape(%k2) {shape=[0,2,4,4,4]}
        %t: f32[N,4,2,4,4] = transpose(%r) {perm=[0,2,1,3,4]}
        %u: f32[N,8,4,4] = reshape(%t) {shape=[0,-1,4,4]}
        %p: f32[N,8,4,4] = pad(%u) {pads=[0,0,0,0,0,0,0,0]}
        %y: f32[N,8,4,4] = dropout(%p)
    """, params="param %w: f32[8,8,3,3]"))
    out, records = PassManager("canonicalize").run(g)
    assert ops_of(out) == ["conv2d", "silu", "relu6", "channel_shuffle"]
    assert out.outputs == ("y",)
    stats = records[1].pass_stats
    assert stats["silu"] == 1 and stats["relu6"] == 1 and stats["act_chain"] == 1 and stats["channel_shuffle"] == 1
    again = run_pass("canonicalize", out)
    assert not again.changed and again.graph is out


def test_max_iterations_bounds_the_sweeps():
    g = build(wrap("""
        %wt: f32[16,8] = transpose(%w) {perm=[1,0]}
        %ws: f32[16,8] = mul(%wt, %s)
        %y: f32[N,16] = dense(%x, %ws)
    """, inputs="%x: f32[N,8]", params="param %w: f32[8,16]\nparam %s: f32[1]"))
    logged: list[str] = []
    ctx = PassContext({"max_iterations": 1}, log=logged.append)
    res = PASSES["canonicalize"].fn(g, ctx)
    assert res.changed and ops_of(res.graph) == ["mul", "dense"] and res.stats["sweeps"] == 1
    assert logged and "after 1 sweeps" in logged[0]
    assert ops_of(check_pass("canonicalize", res.graph).graph) == ["dense"]


def test_pipeline_text_with_options():
    pm = PassManager("canonicalize{cse=false, fold_limit=1000},fold-bn,fuse-act{acts=relu|relu6}")
    assert pm.pipeline == "canonicalize{fold_limit=1000,cse=false},fold-bn,fuse-act{acts=relu|relu6}"


# ---- pad folded into conv ------------------------------------------------------------------------

CONV_PARAMS = "param %w: f32[4,8,3,3]"


def test_zero_spatial_pad_folds_into_conv():
    g = build(wrap("""
        %p: f32[N,8,7,6] = pad(%x) {pads=[0,0,1,0,0,0,2,2]}
        %y: f32[N,4,7,6] = conv2d(%p, %w) {padding=[1,1,1,1]}
    """, params=CONV_PARAMS))
    res = check_pass("canonicalize", g)
    assert ops_of(res.graph) == ["conv2d"]
    assert res.graph.node("y").attrs["padding"] == (2, 1, 3, 3)
    assert res.stats["pad_into_conv"] == 1


@pytest.mark.parametrize("pad", [
    "pad(%x) {pads=[0,0,1,1,0,0,1,1], value=1.0}",             # non-zero fill
    "pad(%x) {pads=[0,0,1,1,0,0,1,1], mode=\"reflect\"}",       # not constant
    "pad(%x) {pads=[0,1,1,1,0,1,1,1]}",                         # pads channels
])
def test_other_pads_stay(pad):
    c = 10 if "[0,1," in pad else 8
    g = build(wrap(f"""
        %p: f32[N,{c},6,6] = {pad}
        %y: f32[N,4,4,4] = conv2d(%p, %w)
    """, params=f"param %w: f32[4,{c},3,3]"))
    res = check_pass("canonicalize", g)
    assert ops_of(res.graph) == ["pad", "conv2d"] and not res.changed
