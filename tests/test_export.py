"""Exporters: to_onnx (every IR op, several opsets, symbolic batch) vs the interpreter in onnxruntime; to_pt2
loaded in a Python process where slimc is not importable; atomic writes."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import onnx
import pytest

from slimc import export, interpreter, ir, ops
from slimc.errors import SlimcError
from slimc.export import EMITTERS, ExportError
from slimc.frontend.onnx import from_onnx
from test_frontend_onnx import ort_session

CNN = """\
graph @cnn(%x: f32[N,3,12,12]) {
  param %w1: f32[8,3,3,3]
  param %b1: f32[8]
  param %w2: f32[8,1,3,3]
  param %w3: f32[8,8,3,3]
  param %b3: f32[8]
  param %bn_s: f32[8]
  param %bn_b: f32[8]
  param %bn_m: f32[8]
  param %bn_v: f32[8]
  param %fc_w: f32[10,8]
  param %fc_b: f32[10]
  %c1: f32[N,8,12,12] = conv2d(%x, %w1, %b1) {act="relu6", padding=[1,1,1,1]}
  %c2: f32[N,8,6,6] = conv2d(%c1, %w2) {act="hardswish", groups=8, padding=[0,0,1,1], stride=[2,2]}
  %c3: f32[N,8,6,6] = conv2d(%c2, %w3, %b3) {act="clip", clip_max=0.5, clip_min=-0.5, dilation=[2,2], padding=[2,2,2,2]}
  %bn: f32[N,8,6,6] = batch_norm(%c3, %bn_s, %bn_b, %bn_m, %bn_v) {eps=0.001}
  %sh: f32[N,8,6,6] = channel_shuffle(%bn) {groups=2}
  %p1: f32[N,8,7,7] = pad(%sh) {mode="reflect", pads=[0,0,1,0,0,0,0,1]}
  %p2: f32[N,8,9,9] = pad(%p1) {mode="edge", pads=[0,0,1,1,0,0,1,1]}
  %p3: f32[N,8,10,10] = pad(%p2) {pads=[0,0,0,1,0,0,1,0], value=0.5}
  %mp: f32[N,8,5,5] = max_pool2d(%p3) {kernel=[3,3], padding=[1,1,1,1], stride=[2,2]}
  %mp2: f32[N,8,3,3] = max_pool2d(%mp) {ceil_mode=true, kernel=[2,2], stride=[2,2]}
  %mp3: f32[N,8,6,6] = max_pool2d(%p3) {dilation=[2,2], kernel=[3,3], stride=[1,1]}
  %ap1: f32[N,8,5,5] = avg_pool2d(%p3) {count_include_pad=false, kernel=[3,3], padding=[1,1,1,1], stride=[2,2]}
  %ap2: f32[N,8,4,4] = avg_pool2d(%p3) {ceil_mode=true, kernel=[3,3], padding=[0,0,1,1], stride=[3,3]}
  %ap3: f32[N,8,5,5] = avg_pool2d(%p3) {kernel=[2,2], stride=[2,2]}
  %aap: f32[N,8,3,3] = adaptive_avg_pool2d(%p2) {output_size=[3,3]}
  %aap2: f32[N,8,4,3] = adaptive_avg_pool2d(%p1) {output_size=[4,3]}
  %aap3: f32[N,8,1,1] = adaptive_avg_pool2d(%p1) {output_size=[1,1]}
  %r1: f32[N,8,10,10] = resize(%mp) {size=[10,10]}
  %r2: f32[N,8,7,9] = resize(%mp) {mode="bilinear", size=[7,9]}
  %r3: f32[N,8,6,6] = resize(%mp2) {align_corners=true, mode="bilinear", size=[6,6]}
  %r4: f32[N,8,4,4] = resize(%mp) {size=[4,4]}
  %cat: f32[N,16,5,5] = concat(%mp, %ap1) {axis=1}
  %sp#0: f32[N,4,5,5], %sp#1: f32[N,12,5,5] = split(%cat) {axis=1, sizes=[4,12]}
  %sl: f32[N,12,5,3] = slice(%sp#1) {axis=3, end=5, start=0, step=2}
  %sl2: f32[N,12,4,3] = slice(%sl) {axis=2, end=100, start=-4}
  %gap: f32[N,8,1,1] = global_avg_pool(%aap2)
  %fl: f32[N,8] = flatten(%gap)
  %fl2: f32[N,144] = flatten(%sl2)
  %fc: f32[N,10] = dense(%fl, %fc_w, %fc_b) {act="sigmoid"}
  return %fc, %sp#0, %sp#1, %r1, %r2, %r3, %r4, %ap2, %ap3, %aap, %aap3, %fl2, %mp3
}
"""

SEQ = """\
graph @seq(%x: f32[N,4,6], %y: f32[N,6,5]) {
  param %ln_s: f32[6]
  param %ln_b: f32[6]
  param %ln2_s: f32[4,6]
  param %w: f32[7,6]
  param %b: f32[7]
  param %w2: f32[3,7]
  param %two: f32[]
  %ln: f32[N,4,6] = layer_norm(%x, %ln_s, %ln_b) {eps=1e-06}
  %ln2: f32[N,4,6] = layer_norm(%ln, %ln2_s) {axis=1}
  %ln3: f32[N,4,6] = layer_norm(%ln2)
  %d1: f32[N,4,7] = dense(%ln3, %w, %b) {act="gelu"}
  %d2: f32[N,4,3] = dense(%d1, %w2) {act="silu"}
  %mm: f32[N,4,5] = matmul(%ln, %y)
  %t: f32[N,5,4] = transpose(%mm) {perm=[0,2,1]}
  %sm: f32[N,5,4] = softmax(%t) {axis=1}
  %sm2: f32[N,5,4] = softmax(%sm)
  %g1: f32[N,5,4] = gelu(%sm2)
  %g2: f32[N,5,4] = gelu(%t) {approximate="tanh"}
  %e: f32[N,5,4] = erf(%g2)
  %th: f32[N,5,4] = tanh(%e)
  %ex: f32[N,5,4] = exp(%th)
  %sq: f32[N,5,4] = sqrt(%ex)
  %ng: f32[N,5,4] = neg(%sq)
  %a: f32[N,5,4] = add(%ng, %g1)
  %s: f32[N,5,4] = sub(%a, %t)
  %m: f32[N,5,4] = mul(%s, %sm)
  %dv: f32[N,5,4] = div(%m, %ex)
  %pw: f32[N,5,4] = pow(%ex, %two)
  %mn: f32[N,4] = mean(%pw) {axes=[1]}
  %mn2: f32[N,5,1] = mean(%dv) {axes=[-1], keepdims=true}
  %id: f32[N,5,1] = identity(%mn2)
  %dr: f32[N,5,1] = dropout(%id) {p=0.1}
  %r: f32[N,5,4] = relu(%dv)
  %r6: f32[N,5,4] = relu6(%dv)
  %c: f32[N,5,4] = clip(%dv) {min=-0.2}
  %c2: f32[N,5,4] = clip(%dv) {max=0.3}
  %hs: f32[N,5,4] = hardswish(%r6)
  %hsg: f32[N,5,4] = hardsigmoid(%c) {alpha=0.25, beta=0.4}
  %sg: f32[N,5,4] = sigmoid(%c2)
  %sl: f32[N,5,4] = silu(%hs)
  %rs: f32[N,20] = reshape(%sl) {shape=[0,-1]}
  %rs2: f32[N,2,10] = reshape(%rs) {shape=[-1,2,10]}
  %f: f32[N,20] = flatten(%rs2)
  %rs3: f32[N,2,5,2] = reshape(%rs) {shape=[0,2,5,2]}
  %f2: f32[N,10,2] = flatten(%rs3) {end=2}
  return %d2, %mn, %dr, %r, %hsg, %sg, %f, %f2, %sm
}
"""

STATIC = """\
graph @static(%x: f32[2,3,8,8]) {
  param %w: f32[4,3,1,1]
  param %w2: f32[4,4,3,3]
  param %fc: f32[5,16]
  %a: f32[2,4,8,8] = conv2d(%x, %w) {act="relu"}
  %b: f32[2,4,8,8] = conv2d(%a, %w2) {act="hardsigmoid", padding=[1,1,1,1]}
  %c: f32[2,4,8,8] = conv2d(%b, %w2) {act="silu", padding=[1,1,1,1]}
  %d: f32[2,4,4,4] = conv2d(%c, %w2) {act="gelu", padding=[1,1,1,1], stride=[2,2]}
  %e: f32[2,4,2,2] = conv2d(%d, %w2) {padding=[1,0,0,1], stride=[2,2]}
  %u: f32[2,4,8,8] = resize(%e) {size=[8,8]}
  %v: f32[2,4,3,5] = resize(%e) {mode="bilinear", size=[3,5]}
  %f: f32[2,16] = flatten(%e)
  %g: f32[2,5] = dense(%f, %fc) {act="relu6"}
  %s#0: f32[2,1,8,8], %s#1: f32[2,3,8,8] = split(%u) {axis=1, sizes=[1,3]}
  return %g, %s#0, %s#1, %v
}
"""

QUANT = """\
graph @quant(%x: f32[N,4,6,6], %h: f32[N,3,8]) {
  param %x_scale: f32[]
  param %x_zp: u8[]
  param %w1: i8[8,4,3,3]
  param %b1: i32[8]
  param %s1: f32[8]
  param %w2: i8[8,1,3,3]
  param %b2: i32[8]
  param %s2: f32[8]
  param %w3: i8[8,8,3,3]
  param %b3: i32[8]
  param %s3: f32[8]
  param %c_scale: f32[8]
  param %c_zp: i8[8]
  param %h_scale: f32[8]
  param %h_zp: u8[8]
  param %fw: i8[5,8]
  param %fb: i32[5]
  param %fs: f32[5]
  param %a_scale: f32[]
  param %a_zp: u8[]
  %q: u8[N,4,6,6] = quantize(%x, %x_scale, %x_zp)
  %c1: u8[N,8,6,6] = qconv2d(%q, %w1, %b1, %s1) {act="relu", out_dtype="uint8", out_scale=0.05, out_zero_point=3, padding=[1,1,1,1], x_zero_point=128}
  %c2: i8[N,8,3,3] = qconv2d(%c1, %w2, %b2, %s2) {act="relu6", groups=8, out_dtype="int8", out_scale=0.04, out_zero_point=-10, padding=[0,0,1,1], stride=[2,2], x_zero_point=3}
  %c3: f32[N,8,3,3] = qconv2d(%c2, %w3, %b3, %s3) {act="clip", clip_max=2.0, clip_min=-1.5, dilation=[2,2], padding=[2,2,2,2], x_zero_point=-10}
  %pc: i8[N,8,3,3] = quantize(%c3, %c_scale, %c_zp)
  %dc: f32[N,8,3,3] = dequantize(%pc, %c_scale, %c_zp)
  %qh: u8[N,3,8] = quantize(%h, %h_scale, %h_zp) {axis=-1}
  %d: i8[N,3,5] = qdense(%qh, %fw, %fb, %fs) {out_dtype="int8", out_scale=0.03, out_zero_point=2}
  %d2: f32[N,3,5] = qdense(%qh, %fw, %fb, %fs) {act="sigmoid"}
  %a: u8[N,8,3,3] = qadd(%pc, %c2) {a_scale=0.03, a_zero_point=1, act="relu", b_scale=0.04, b_zero_point=-10, out_dtype="uint8", out_scale=0.06}
  %dq: f32[N,8,3,3] = dequantize(%a, %a_scale, %a_zp)
  return %dc, %d, %d2, %dq, %c1, %c2, %a
}
"""

GRAPHS = {"cnn": CNN, "seq": SEQ, "static": STATIC, "quant": QUANT}
OPSETS = [11, 13, 17, 18, 21]


def load_graph(name: str, seed: int = 0) -> ir.Graph:
    """Parse an IR text and attach deterministic weights (positive variances, exponent 2, sane quantization)."""
    g = ir.parse_graph(GRAPHS[name])
    rng = np.random.default_rng(seed)
    weights = {k: rng.standard_normal(t.shape).astype(t.dtype) for k, t in g.param_types.items()}
    weights.update({k: np.abs(v) + 0.5 for k, v in weights.items() if k.endswith("_v")})
    if "two" in weights:
        weights["two"] = np.asarray(2.0, np.float32)
    weights.update(quant_weights(g, rng))
    g = g.replace(weights=weights)
    g.verify()
    return g


def quant_weights(g: ir.Graph, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Weights of the quantized ops that keep values on-grid: positive scales, zero points inside the type, small
    int8 weights with a bias cancelling x_zero_point (as fold-qdq makes) and scales of about one output unit."""
    out: dict[str, np.ndarray] = {}
    for n in g.nodes:
        if n.op in ("quantize", "dequantize"):
            s, z = n.inputs[1:]
            zt = g.type_of(z)
            lo, hi = (100, 150) if zt.dtype == "uint8" else (-20, 20)
            out.setdefault(s, rng.uniform(0.005, 0.03, g.type_of(s).shape).astype(np.float32))
            out.setdefault(z, rng.integers(lo, hi, zt.shape).astype(zt.dtype))
        elif n.op in ("qconv2d", "qdense"):
            w, bias, scale = n.inputs[1:]
            shape = g.type_of(w).shape
            wt = rng.integers(-8, 9, shape).astype(np.int8)
            fan_in = int(np.prod(shape[1:]))
            out[w] = wt
            out[bias] = (-n.attrs["x_zero_point"] * wt.reshape(shape[0], -1).astype(np.int32).sum(1)
                         + rng.integers(-50, 50, shape[0])).astype(np.int32)
            out[scale] = (rng.uniform(0.5, 1.5, shape[0]) / (8 * fan_in)).astype(np.float32)
    return out


def assert_close(ours: list[np.ndarray], theirs: list[np.ndarray], rtol: float = 2e-5) -> None:
    """Float outputs within rtol of the largest value; integer (quantized) outputs equal, of the same type."""
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape
        if np.issubdtype(b.dtype, np.integer):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(a, b)
            continue
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * max(float(np.abs(b).max()), 1.0))


# ---- to_onnx ------------------------------------------------------------------------------------

def test_every_registry_op_has_an_emitter_and_is_exercised_here():
    assert set(ops.OPS) <= set(EMITTERS), f"no ONNX emitter for {sorted(set(ops.OPS) - set(EMITTERS))}"
    used = {n.op for name in GRAPHS for n in load_graph(name).nodes}
    assert set(ops.OPS) <= used, f"no to_onnx test covers {sorted(set(ops.OPS) - used)}"


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("name", sorted(GRAPHS))
def test_to_onnx_matches_interpreter_in_onnxruntime(name, opset):
    g = load_graph(name)
    model = export.to_onnx(g, opset=opset)
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == opset
    for batch in (1, 3):
        xs = interpreter.example_inputs(g, seed=batch, batch=batch)
        sess = ort_session(model)
        theirs = sess.run(None, dict(zip(g.input_names, xs)))
        assert_close(interpreter.run(g, xs), theirs)


def test_symbolic_batch_becomes_dim_param_and_types_are_kept():
    g = load_graph("cnn")
    model = export.to_onnx(g)
    x = model.graph.input[0].type.tensor_type.shape.dim
    assert x[0].dim_param == "N" and [d.dim_value for d in x[1:]] == [3, 12, 12]
    outs = {o.name: o for o in model.graph.output}
    assert set(outs) == set(g.outputs) and {"sp#0", "sp#1"} <= set(outs)
    assert outs["fc"].type.tensor_type.shape.dim[1].dim_value == 10
    assert {i.name for i in model.graph.initializer} >= set(g.param_types)


def test_fused_activation_becomes_a_following_node():
    g = load_graph("static")
    model = export.to_onnx(g, opset=13)
    types = [n.op_type for n in model.graph.node]
    conv_then = [types[i + 1] for i, t in enumerate(types) if t == "Conv"]
    assert conv_then[:3] == ["Relu", "HardSigmoid", "Sigmoid"]
    assert "Gemm" in types and types[types.index("Gemm") + 1] == "Clip"


def test_graph_input_and_repeated_output_get_identity():
    text = """\
graph @io(%x: f32[N,4]) {
  %r: f32[N,4] = relu(%x)
  return %x, %r, %r
}
"""
    g = ir.parse_graph(text)
    model = export.to_onnx(g)
    assert len(model.graph.output) == 3 and len({o.name for o in model.graph.output}) == 3
    x = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    assert_close(interpreter.run(g, [x]), ort_session(model).run(None, {"x": x}))


def test_onnx_round_trip_through_the_frontend():
    g = load_graph("seq")
    back = from_onnx(export.to_onnx(g, opset=18), input_shapes={"x": (2, 4, 6), "y": (2, 6, 5)})
    xs = interpreter.example_inputs(g, batch=2)
    assert_close(interpreter.run(back, xs), interpreter.run(g, xs))


# ---- quantized ops ------------------------------------------------------------------------------

QDQ = """\
graph @qdq(%x: f32[2,3,600], %y: f64[2,3,600]) {
  param %s: f32[]
  param %z: u8[]
  param %cs: f32[3]
  param %cz: i8[3]
  %q: u8[2,3,600] = quantize(%x, %s, %z)
  %dq: f32[2,3,600] = dequantize(%q, %s, %z)
  %qc: i8[2,3,600] = quantize(%x, %cs, %cz) {axis=1}
  %dqc: f32[2,3,600] = dequantize(%qc, %cs, %cz) {axis=-2}
  %q64: u8[2,3,600] = quantize(%y, %s, %z)
  return %q, %dq, %qc, %dqc, %q64
}
"""


def _qdq_inputs(scales: np.ndarray) -> np.ndarray:
    """Random values, exact ties (k + 0.5) * scale of every channel, and values far outside both 8-bit ranges."""
    rng = np.random.default_rng(0)
    x = rng.uniform(-4, 8, (2, 3, 600)).astype(np.float32)
    x[..., :200] = ((rng.integers(-300, 300, (2, 3, 200)) + 0.5) * scales.reshape(1, 3, 1)).astype(np.float32)
    x[..., 200:206] = np.array([1e4, -1e4, 0.0, -0.0, 3e38, -3e38], np.float32)
    return x


@pytest.mark.parametrize("opset", [11, 12, 13, 21])
def test_quantize_dequantize_round_half_even_and_saturate_like_onnxruntime(opset):
    g = ir.parse_graph(QDQ)
    cs = np.array([0.25, 0.125, 0.0371], np.float32)  # powers of two make the ties exact
    g = g.replace(weights={"s": np.float32(0.25), "z": np.uint8(7), "cs": cs, "cz": np.array([-3, 0, 5], np.int8)})
    x = _qdq_inputs(cs)
    assert np.sum(np.modf(x[:, :2, :200] / cs[:2].reshape(1, 2, 1))[0] == 0.5) > 100  # the ties are there
    model = export.to_onnx(g, opset=opset)
    types = [n.op_type for n in model.graph.node]
    per_axis_nodes = 1 if opset >= export.PER_AXIS_OPSET else 0
    assert types.count("QuantizeLinear") == 2 + per_axis_nodes and types.count("DequantizeLinear") == 1 + per_axis_nodes
    assert ("Round" in types) == (opset < export.PER_AXIS_OPSET)
    feeds = {"x": x, "y": x.astype(np.float64)}
    ours = interpreter.run(g, [x, feeds["y"]])
    assert_close(ours, ort_session(model).run(None, feeds), rtol=0.0)
    q, qc = ours[0], ours[2]
    assert {0, 255} <= set(np.unique(q)) and {-128, 127} <= set(np.unique(qc))  # saturation was exercised


def test_qdq_round_trip_through_the_frontend():
    """QuantizeLinear/DequantizeLinear written at opset 13 import back as the same ops with the same values."""
    g = ir.parse_graph(QDQ)
    cs = np.array([0.25, 0.125, 0.0371], np.float32)
    g = g.replace(weights={"s": np.float32(0.25), "z": np.uint8(7), "cs": cs, "cz": np.array([-3, 0, 5], np.int8)})
    g = g.with_nodes([n for n in g.nodes if n.name != "q64"], outputs=("q", "dq", "qc", "dqc"))
    g = g.replace(inputs=g.inputs[:1])
    back = from_onnx(export.to_onnx(g, opset=13))
    assert [n.op for n in back.nodes] == [n.op for n in g.nodes]
    assert [n.attrs["axis"] for n in back.nodes[2:]] == [1, 1]
    x = _qdq_inputs(cs)
    assert_close(interpreter.run(back, [x]), interpreter.run(g, [x]), rtol=0.0)


EXTREMES = """\
graph @extremes(%x: u8[2,128,5,5], %xs: i8[2,128,5,5], %v: u8[3,1152], %vs: i8[3,1152]) {
  param %w: i8[16,128,3,3]
  param %b: i32[16]
  param %s: f32[16]
  param %fw: i8[6,1152]
  param %fb: i32[6]
  param %fs: f32[6]
  %c: f32[2,16,5,5] = qconv2d(%x, %w, %b, %s) {padding=[1,1,1,1], x_zero_point=255}
  %cs: f32[2,16,5,5] = qconv2d(%xs, %w, %b, %s) {padding=[1,1,1,1], x_zero_point=-128}
  %d: f32[3,6] = qdense(%v, %fw, %fb, %fs)
  %ds: f32[3,6] = qdense(%vs, %fw, %fb, %fs)
  return %c, %cs, %d, %ds
}
"""


def test_integer_layers_accumulate_exactly_at_the_extremes():
    """Sums of 1152 products of 255 x +-127 pass 2^24 (a float32 conv rounds them) and saturate int16 pair sums
    (ORT's u8 x s8 kernels without VNNI); the export must still give the interpreter's exact int32 result."""
    g = ir.parse_graph(EXTREMES)
    rng = np.random.default_rng(3)

    def extreme(shape, lo, hi, dtype):
        return np.where(rng.random(shape) < 0.8, hi, rng.integers(lo, hi + 1, shape)).astype(dtype)

    g = g.replace(weights={"w": extreme((16, 128, 3, 3), -128, 127, np.int8), "b": rng.integers(-9, 9, 16, np.int32),
                           "s": np.full(16, 1e-3, np.float32), "fw": extreme((6, 1152), -128, 127, np.int8),
                           "fb": rng.integers(-9, 9, 6, np.int32), "fs": np.full(6, 1e-3, np.float32)})
    xs = [extreme((2, 128, 5, 5), 0, 255, np.uint8), -extreme((2, 128, 5, 5), -127, 128, np.int16).astype(np.int8),
          extreme((3, 1152), 0, 255, np.uint8), extreme((3, 1152), -128, 127, np.int8)]
    ours = interpreter.run(g, xs)
    assert float(np.abs(ours[0]).max()) > 2**24 * 1e-3
    model = export.to_onnx(g, opset=13)
    types = {n.op_type for n in model.graph.node}
    assert {"ConvInteger", "MatMulInteger"} <= types and not types & {"Conv", "MatMul", "Gemm"}
    theirs = ort_session(model).run(None, dict(zip(g.input_names, xs)))
    for a, b in zip(ours, theirs):
        np.testing.assert_array_equal(a, b)


def test_qconv2d_padding_zero_point_outside_the_input_type_is_an_export_error():
    text = """\
graph @zp(%x: u8[1,2,4,4]) {
  param %w: i8[3,2,3,3]
  param %b: i32[3]
  param %s: f32[3]
  %c: f32[1,3,4,4] = qconv2d(%x, %w, %b, %s) {padding=[1,1,1,1], x_zero_point=-3}
  return %c
}
"""
    g = ir.parse_graph(text)
    g = g.replace(weights={"w": np.ones((3, 2, 3, 3), np.int8), "b": np.zeros(3, np.int32),
                           "s": np.ones(3, np.float32)})
    with pytest.raises(ExportError, match=r"node c \(qconv2d\).*x_zero_point=-3 does not fit the uint8 input"):
        export.to_onnx(g)


def test_to_onnx_writes_file(tmp_path):
    g = load_graph("static")
    p = tmp_path / "m.onnx"
    model = export.to_onnx(g, p)
    assert onnx.load(str(p)) == model
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]


def test_missing_weights_and_bad_opset_are_export_errors(tmp_path):
    g = ir.parse_graph(STATIC)
    p = tmp_path / "m.onnx"
    with pytest.raises(ExportError, match="w, w2, fc.*no weight data"):
        export.to_onnx(g, p)
    with pytest.raises(ExportError, match="opset 9"):
        export.to_onnx(load_graph("static"), p, opset=9)
    assert not os.listdir(tmp_path)
    assert issubclass(ExportError, SlimcError)


def test_op_without_emitter_names_op_and_node():
    ops.register_op("test_export_unknown", ["x"])(lambda t, a: (t[0],))
    try:
        g = ir.parse_graph("graph @u(%x: f32[2]) {\n  %q: f32[2] = test_export_unknown(%x)\n  return %q\n}\n")
        with pytest.raises(ExportError, match=r"node q \(test_export_unknown\)"):
            export.to_onnx(g)
    finally:
        del ops.OPS["test_export_unknown"]


def test_atomic_write_leaves_no_file_on_failure(tmp_path):
    g = load_graph("static")
    target = tmp_path / "busy.onnx"
    target.mkdir()  # os.replace onto a directory fails after the temp file is written
    with pytest.raises(ExportError, match="busy.onnx"):
        export.to_onnx(g, target)
    assert sorted(os.listdir(tmp_path)) == ["busy.onnx"] and not os.listdir(target)
    old = tmp_path / "old.onnx"
    old.write_bytes(b"previous model")
    with pytest.raises(ExportError):
        export.to_onnx(ir.parse_graph(STATIC), old)  # fails before writing: the old file is untouched
    assert old.read_bytes() == b"previous model"
    assert sorted(os.listdir(tmp_path)) == ["busy.onnx", "old.onnx"]


# ---- to_pt2 ---------------------------------------------------------------------------------------

_LOADER = r"""
import sys
try:
    import slimc
except ImportError:
    pass
else:
    raise SystemExit("slimc is importable in the isolated process")
import numpy as np
import torch
for job in sys.argv[1:]:
    pt2, n_inputs = job.split("|")
    program = torch.export.load(pt2)
    module = program.module()
    for tag in ("a", "b"):
        xs = [torch.from_numpy(np.load(f"{pt2}.{tag}.in{i}.npy")) for i in range(int(n_inputs))]
        out = module(*xs)
        out = out if isinstance(out, (tuple, list)) else (out,)
        for i, o in enumerate(out):
            np.save(f"{pt2}.{tag}.out{i}.npy", o.detach().numpy())
print("ok")
"""


def _isolated_python(args: list[str], cwd: str) -> subprocess.CompletedProcess:
    """Run the loader with only torch's site-packages on sys.path: no site hooks, no editable slimc."""
    import torch

    site = os.path.dirname(os.path.dirname(torch.__file__))
    code = f"import sys; sys.path.append({site!r})\n" + _LOADER
    return subprocess.run([sys.executable, "-I", "-S", "-c", code, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={"PATH": os.environ.get("PATH", ""), "OMP_NUM_THREADS": "1"})


def test_to_pt2_loads_without_slimc_and_matches(tmp_path):
    jobs, expected = [], {}
    for name in sorted(GRAPHS):
        g = load_graph(name)
        path = str(tmp_path / f"{name}.pt2")
        export.to_pt2(g, path)
        batches = {"a": 1, "b": 3} if any(not t.is_static for _, t in g.inputs) else {"a": 2, "b": 2}
        for tag, batch in batches.items():
            xs = interpreter.example_inputs(g, seed=batch + 7, batch=batch)
            for i, x in enumerate(xs):
                np.save(f"{path}.{tag}.in{i}.npy", x)
            expected[(path, tag)] = interpreter.run(g, xs)
        jobs.append(f"{path}|{len(g.inputs)}")
    done = _isolated_python(jobs, str(tmp_path))
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]
    for (path, tag), outs in expected.items():
        got = [np.load(f"{path}.{tag}.out{i}.npy") for i in range(len(outs))]
        assert_close(got, outs, rtol=1e-5)
    assert sorted(f for f in os.listdir(tmp_path) if f.endswith(".pt2")) == sorted(f"{n}.pt2" for n in GRAPHS)


def test_isolated_python_really_cannot_import_slimc(tmp_path):
    import torch

    site = os.path.dirname(os.path.dirname(torch.__file__))
    probe = subprocess.run([sys.executable, "-I", "-S", "-c", f"import sys; sys.path.append({site!r}); import slimc"],
                           cwd=str(tmp_path), capture_output=True, text=True, timeout=120)
    assert probe.returncode != 0 and "No module named 'slimc'" in probe.stderr
    normal = subprocess.run([sys.executable, "-c", "import slimc"], cwd=str(tmp_path), capture_output=True)
    assert normal.returncode == 0  # the same interpreter does see slimc through the editable install


def test_to_pt2_symbolic_batch_is_a_dim(tmp_path):
    g = load_graph("seq")
    program = export.to_pt2(g, tmp_path / "seq.pt2")
    user = set(program.graph_signature.user_inputs)
    batch_dims = [n.meta["val"].shape[0] for n in program.graph.nodes if n.name in user]
    assert len(batch_dims) == 2 and all(not isinstance(d, int) for d in batch_dims)
    assert len({str(d) for d in batch_dims}) == 1  # both inputs share the one Dim "N"
    xs = interpreter.example_inputs(g, batch=5)
    import torch

    got = program.module()(*[torch.from_numpy(x) for x in xs])
    assert_close([o.numpy() for o in got], interpreter.run(g, xs), rtol=1e-5)


def test_to_pt2_failure_leaves_no_file(tmp_path):
    text = """\
graph @bad(%x: f32[N,2,6,6]) {
  %p: f32[N,2,3,3] = avg_pool2d(%x) {count_include_pad=false, kernel=[2,2], padding=[0,0,1,1], stride=[2,2]}
  return %p
}
"""
    g = ir.parse_graph(text)  # the interpreter has no kernel for asymmetric pads without count_include_pad
    with pytest.raises(ExportError, match="graph bad"):
        export.to_pt2(g, tmp_path / "bad.pt2")
    assert not os.listdir(tmp_path)
    target = tmp_path / "dir.pt2"
    target.mkdir()
    with pytest.raises(ExportError, match="dir.pt2"):
        export.to_pt2(load_graph("static"), target)
    assert os.listdir(tmp_path) == ["dir.pt2"] and not os.listdir(target)
