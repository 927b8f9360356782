"""The quantization ops (quantize, dequantize, qconv2d, qdense, qadd): type inference and bad operands, and the
interpreter against numpy references written from the definitions in ops.py (integer sums in int64, the float32
epilogue, round half to even, saturation)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest
import torch

from slimc import interpreter, ir, ops
from slimc.errors import IRError
from slimc.ir import TensorType

T = TensorType
BOUNDS = {"uint8": (0, 255), "int8": (-128, 127)}


def run(op: str, arrays: list[np.ndarray], attrs: Mapping[str, Any] | None = None) -> np.ndarray:
    """One node of `op` typed from the arrays (inference checked) and run by its interpreter kernel."""
    node = ops.make_node("n", op, [f"i{k}" for k in range(len(arrays))], [T.of(a) for a in arrays], attrs or {})
    (out,) = interpreter.run_node(node, [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays])
    assert str(out.dtype).removeprefix("torch.") == node.out_type.dtype
    assert tuple(out.shape) == node.out_type.shape
    return out.numpy()


def along(v: np.ndarray, axis: int, rank: int) -> np.ndarray:
    """A scalar stays; a [C] parameter is shaped to broadcast along `axis`."""
    if v.ndim == 0:
        return v
    return v.reshape([-1 if i == axis % rank else 1 for i in range(rank)])


# ---- numpy references from the definitions -------------------------------------------------------

def ref_quantize(x: np.ndarray, scale: np.ndarray, zp: np.ndarray, axis: int = 1) -> np.ndarray:
    """saturate(round_half_even(x / scale) + zero_point), x / scale in float32 (ONNX QuantizeLinear)."""
    lo, hi = BOUNDS[str(zp.dtype)]
    q = np.rint(x.astype(np.float32) / along(scale, axis, x.ndim)) + along(zp, axis, x.ndim).astype(np.float32)
    return np.clip(q, lo, hi).astype(zp.dtype)


def ref_dequantize(q: np.ndarray, scale: np.ndarray, zp: np.ndarray, axis: int = 1) -> np.ndarray:
    """(x - zero_point) * scale in float32 (ONNX DequantizeLinear)."""
    centered = (q.astype(np.int32) - along(zp, axis, q.ndim).astype(np.int32)).astype(np.float32)
    return centered * along(scale, axis, q.ndim)


def ref_conv_sums(x: np.ndarray, w: np.ndarray, stride, padding, dilation, groups: int, zp: int) -> np.ndarray:
    """The exact integer conv of ops.py: x padded [top, left, bottom, right] with zp, OIHW weight, groups (int64)."""
    top, left, bottom, right = padding
    xp = np.pad(x.astype(np.int64), ((0, 0), (0, 0), (top, bottom), (left, right)), constant_values=zp)
    n, _, h, wd = xp.shape
    o, cg, kh, kw = w.shape
    oh = (h - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (wd - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    out = np.zeros((n, o, oh, ow), np.int64)
    per_group = o // groups
    for oc in range(o):
        xs = xp[:, (oc // per_group) * cg:(oc // per_group + 1) * cg]
        for i in range(kh):
            for j in range(kw):
                r0, c0 = i * dilation[0], j * dilation[1]
                patch = xs[:, :, r0:r0 + stride[0] * (oh - 1) + 1:stride[0], c0:c0 + stride[1] * (ow - 1) + 1:stride[1]]
                out[:, oc] += np.einsum("nchw,c->nhw", patch, w[oc, :, i, j].astype(np.int64))
    return out


def ref_epilogue(v: np.ndarray, a: Mapping[str, Any]) -> np.ndarray:
    """act(v), then float32 out or saturate(round_half_even(v / out_scale) + out_zero_point)."""
    act = a.get("act", "none")
    if act == "relu":
        v = np.maximum(v, np.float32(0))
    elif act == "relu6":
        v = np.clip(v, np.float32(0), np.float32(6))
    elif act == "clip":
        v = np.clip(v, np.float32(a["clip_min"]), np.float32(a["clip_max"]))
    else:
        assert act == "none"
    dt = a.get("out_dtype", "float32")
    if dt == "float32":
        return v
    lo, hi = BOUNDS[dt]
    q = np.rint(v / np.float32(a.get("out_scale", 1.0))) + np.float32(a.get("out_zero_point", 0))
    return np.clip(q, lo, hi).astype(dt)


def ref_scaled(acc: np.ndarray, bias: np.ndarray, scale: np.ndarray, axis: int) -> np.ndarray:
    """float32(acc + bias) * scale[c]: the int32 accumulator dequantized per output channel."""
    exact = (acc + along(bias.astype(np.int64), axis, acc.ndim)).astype(np.int32)
    return exact.astype(np.float32) * along(scale, axis, acc.ndim)


def ref_epilogue_f64(v: np.ndarray, a: Mapping[str, Any]) -> np.ndarray:
    """The same epilogue in float64 (the ideal result the float32 one approximates)."""
    act = a.get("act", "none")
    if act == "relu":
        v = np.maximum(v, 0.0)
    elif act == "relu6":
        v = np.clip(v, 0.0, 6.0)
    elif act == "clip":
        v = np.clip(v, a["clip_min"], a["clip_max"])
    dt = a.get("out_dtype", "float32")
    if dt == "float32":
        return v
    lo, hi = BOUNDS[dt]
    return np.clip(np.rint(v / a["out_scale"]) + a["out_zero_point"], lo, hi)


def ints(rng: np.random.Generator, shape, dtype: str, extreme: float = 0.0) -> np.ndarray:
    """Random integers of an 8-bit type, a fraction `extreme` of them at the type's bounds."""
    lo, hi = BOUNDS[dtype]
    v = rng.integers(lo, hi + 1, shape)
    v = np.where(rng.random(shape) < extreme, np.where(rng.random(shape) < 0.5, lo, hi), v)
    return v.astype(dtype)


# ---- quantize / dequantize -----------------------------------------------------------------------

def tie_data(shape: tuple[int, ...], scale: float, seed: int = 0) -> np.ndarray:
    """Values where a third are exact ties (k + 0.5) * scale (scale a power of two) and some lie far outside."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-300 * scale, 300 * scale, shape).astype(np.float32)
    ties = rng.random(shape) < 0.3
    x[ties] = ((rng.integers(-150, 150, int(ties.sum())) + 0.5) * scale).astype(np.float32)
    return x


@pytest.mark.parametrize("zp", [np.uint8(3), np.uint8(255), np.int8(0), np.int8(-7)])
def test_quantize_per_tensor_rounds_half_to_even_and_saturates(zp):
    x = tie_data((2, 3, 8, 8), 0.25)
    s = np.float32(0.25)
    q = run("quantize", [x, np.asarray(s), np.asarray(zp)])
    np.testing.assert_array_equal(q, ref_quantize(x, np.asarray(s), np.asarray(zp)))
    lo, hi = BOUNDS[str(np.asarray(zp).dtype)]
    assert {lo, hi} <= set(np.unique(q).tolist())
    k = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5], np.float32)  # half to even, not away from zero
    got = run("quantize", [k * s, np.asarray(s), np.zeros((), np.int8)])
    np.testing.assert_array_equal(got, np.array([0, 2, 2, 0, -2, -2], np.int8))


@pytest.mark.parametrize("axis,shape", [(1, (2, 3, 4, 5)), (-1, (2, 3, 5)), (0, (4, 6)), (3, (1, 2, 2, 6))])
def test_quantize_dequantize_per_channel(axis, shape):
    c = shape[axis]
    rng = np.random.default_rng(1)
    scale = (2.0 ** -rng.integers(1, 5, c)).astype(np.float32)
    zp = rng.integers(-20, 20, c).astype(np.int8)
    x = tie_data(shape, float(scale.min()), seed=2)
    q = run("quantize", [x, scale, zp], {"axis": axis})
    np.testing.assert_array_equal(q, ref_quantize(x, scale, zp, axis))
    d = run("dequantize", [q, scale, zp], {"axis": axis})
    np.testing.assert_array_equal(d, ref_dequantize(q, scale, zp, axis))
    assert d.dtype == np.float32
    inside = np.abs(x - d) <= along(scale, axis, x.ndim) / 2  # unsaturated values come back within half a step
    assert inside.mean() > 0.3 and not inside.all()


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_quantize_other_float_inputs_go_through_float32(dtype):
    x = tie_data((3, 7), 0.5).astype(dtype)
    s, z = np.asarray(np.float32(0.0371)), np.asarray(np.uint8(128))
    np.testing.assert_array_equal(run("quantize", [x, s, z]), ref_quantize(x, s, z))


def test_dequantize_per_tensor_is_exact():
    rng = np.random.default_rng(3)
    q = ints(rng, (2, 4, 3, 3), "uint8", extreme=0.2)
    s, z = np.asarray(np.float32(0.0371)), np.asarray(np.uint8(200))
    np.testing.assert_array_equal(run("dequantize", [q, s, z]), ref_dequantize(q, s, z))


# ---- qconv2d -------------------------------------------------------------------------------------

QCONV_CASES = {
    "plain": dict(cin=6, cout=4, k=3, groups=1, x="uint8", attrs={
        "padding": (1, 0, 2, 1), "stride": (2, 1), "dilation": (1, 2), "x_zero_point": 131}),
    "depthwise": dict(cin=8, cout=8, k=3, groups=8, x="uint8", attrs={
        "padding": (1, 1, 1, 1), "stride": (2, 2), "x_zero_point": 7, "act": "relu6",
        "out_dtype": "uint8", "out_scale": 0.03, "out_zero_point": 0}),
    "grouped_int8": dict(cin=6, cout=4, k=3, groups=2, x="int8", attrs={
        "padding": (2, 2, 2, 2), "dilation": (2, 2), "x_zero_point": -128, "act": "clip", "clip_min": -1.0,
        "clip_max": 1.5, "out_dtype": "int8", "out_scale": 0.02, "out_zero_point": -5}),
    "pointwise_relu": dict(cin=16, cout=8, k=1, groups=1, x="uint8", attrs={
        "x_zero_point": 255, "act": "relu", "out_dtype": "uint8", "out_scale": 0.05, "out_zero_point": 10}),
}


def qconv_inputs(case: dict, seed: int = 0) -> list[np.ndarray]:
    """x, w (some at the int8 bounds), an int32 bias cancelling the zero point plus noise, and scales of about one
    output unit per channel."""
    rng = np.random.default_rng(seed)
    cg = case["cin"] // case["groups"]
    x = ints(rng, (2, case["cin"], 7, 6), case["x"], extreme=0.2)
    w = ints(rng, (case["cout"], cg, case["k"], case["k"]), "int8", extreme=0.1)
    zp = case["attrs"].get("x_zero_point", 0)
    bias = (-zp * w.reshape(case["cout"], -1).astype(np.int64).sum(1) + rng.integers(-500, 500, case["cout"]))
    scale = (rng.uniform(0.5, 1.5, case["cout"]) / (30 * 127 * cg * case["k"] ** 2) ** 0.5 / 40).astype(np.float32)
    return [x, w, bias.astype(np.int32), scale]


@pytest.mark.parametrize("name", sorted(QCONV_CASES))
def test_qconv2d_matches_the_definition(name):
    case = QCONV_CASES[name]
    attrs = case["attrs"]
    x, w, b, s = qconv_inputs(case)
    got = run("qconv2d", [x, w, b, s], {**attrs, "groups": case["groups"]})
    acc = ref_conv_sums(x, w, attrs.get("stride", (1, 1)), attrs.get("padding", (0, 0, 0, 0)),
                        attrs.get("dilation", (1, 1)), case["groups"], attrs.get("x_zero_point", 0))
    np.testing.assert_array_equal(got, ref_epilogue(ref_scaled(acc, b, s, 1), attrs))
    ideal = ref_epilogue_f64((acc + b.reshape(1, -1, 1, 1)) * s.astype(np.float64).reshape(1, -1, 1, 1), attrs)
    if attrs.get("out_dtype", "float32") == "float32":
        np.testing.assert_allclose(got, ideal, rtol=1e-6, atol=1e-6 * float(np.abs(ideal).max()))
    else:  # float32 rounding may move a value that is within an ulp of a tie by one step, never more
        diff = np.abs(got.astype(np.int64) - ideal.astype(np.int64))
        assert diff.max() <= 1 and diff.mean() < 0.01
        assert len(np.unique(got)) > 10  # on grid, not saturated


def test_qconv2d_padding_holds_the_zero_point():
    """With a bias of -zp * sum(w), a constant input equal to the zero point gives exactly 0 everywhere, borders
    included; zero padding would leave -zp * (the weights falling outside) at the borders."""
    w = np.random.default_rng(4).integers(-127, 128, (3, 2, 3, 3)).astype(np.int8)
    zp = 200
    x = np.full((1, 2, 5, 5), zp, np.uint8)
    bias = (-zp * w.reshape(3, -1).astype(np.int32).sum(1)).astype(np.int32)
    got = run("qconv2d", [x, w, bias, np.ones(3, np.float32)], {"padding": (1, 1, 1, 1), "x_zero_point": zp})
    np.testing.assert_array_equal(got, np.zeros((1, 3, 5, 5), np.float32))


def test_qconv2d_sums_beyond_float32_precision_are_exact():
    """acc = sum of 1152 products of 255 x 127 exceeds 2^24: still the exact integer, rounded once to float32."""
    x = np.full((1, 128, 3, 3), 255, np.uint8)
    w = np.full((2, 128, 3, 3), 127, np.int8)
    w[1, 0, 0, 0] = 126  # the two channels differ by exactly 255, which float32 cannot tell apart from 256
    got = run("qconv2d", [x, w, np.zeros(2, np.int32), np.ones(2, np.float32)])
    exact = np.array([255 * 127 * 1152, 255 * 127 * 1152 - 255])
    assert exact[0] > 2**24
    np.testing.assert_array_equal(got.reshape(2), exact.astype(np.float32))


# ---- qdense --------------------------------------------------------------------------------------

@pytest.mark.parametrize("x_shape,x_dtype,attrs", [
    ((4, 32), "uint8", {}),
    ((2, 3, 32), "int8", {"act": "relu", "out_dtype": "int8", "out_scale": 0.02, "out_zero_point": -100}),
    ((5, 32), "uint8", {"act": "clip", "clip_min": -0.5, "clip_max": 0.75, "out_dtype": "uint8",
                        "out_scale": 0.005, "out_zero_point": 100})])
def test_qdense_matches_the_definition(x_shape, x_dtype, attrs):
    rng = np.random.default_rng(5)
    x = ints(rng, x_shape, x_dtype, extreme=0.2)
    w = ints(rng, (6, 32), "int8", extreme=0.1)
    bias = rng.integers(-20000, 20000, 6).astype(np.int32)
    scale = rng.uniform(2e-6, 6e-6, 6).astype(np.float32)
    got = run("qdense", [x, w, bias, scale], attrs)
    acc = x.astype(np.int64) @ w.astype(np.int64).T
    np.testing.assert_array_equal(got, ref_epilogue(ref_scaled(acc, bias, scale, acc.ndim - 1), attrs))
    assert got.shape == x_shape[:-1] + (6,) and len(np.unique(got)) > 5


# ---- qadd ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("b_shape,b_dtype,attrs", [
    ((2, 4, 3, 3), "uint8", {"out_dtype": "uint8", "out_scale": 0.07, "out_zero_point": 128}),
    ((1, 4, 1, 1), "int8", {"act": "relu", "out_dtype": "int8", "out_scale": 0.05, "out_zero_point": -128}),
    ((3,), "int8", {"act": "relu6"})])
def test_qadd_matches_the_definition(b_shape, b_dtype, attrs):
    rng = np.random.default_rng(6)
    a = ints(rng, (2, 4, 3, 3), "uint8", extreme=0.2)
    b = ints(rng, b_shape, b_dtype, extreme=0.2)
    q = {"a_scale": 0.031, "a_zero_point": 120, "b_scale": 0.047, "b_zero_point": -3}
    got = run("qadd", [a, b], {**q, **attrs})
    v = ((a.astype(np.float32) - np.float32(120)) * np.float32(0.031)
         + (b.astype(np.float32) - np.float32(-3)) * np.float32(0.047))
    np.testing.assert_array_equal(got, ref_epilogue(v, attrs))
    assert got.shape == np.broadcast_shapes(a.shape, b_shape)


# ---- typing --------------------------------------------------------------------------------------

def test_types_of_a_quantized_graph_round_trip_through_the_text_form():
    text = """\
graph @q(%x: f32[N,4,8,8]) {
  param %s: f32[]
  param %z: u8[]
  param %w: i8[6,4,3,3]
  param %b: i32[6]
  param %cs: f32[6]
  param %fw: i8[3,6]
  param %fb: i32[3]
  param %fs: f32[3]
  %q: u8[N,4,8,8] = quantize(%x, %s, %z)
  %c: i8[N,6,4,4] = qconv2d(%q, %w, %b, %cs) {out_dtype="int8", out_scale=0.1, padding=[1,1,1,1], stride=[2,2]}
  %a: u8[N,6,4,4] = qadd(%c, %c) {a_scale=0.1, a_zero_point=0, b_scale=0.1, b_zero_point=0, out_dtype="uint8"}
  %p: u8[N,6,1,1] = max_pool2d(%a) {kernel=[4,4], stride=[4,4]}
  %f: u8[N,6] = flatten(%p)
  %d: f32[N,3] = qdense(%f, %fw, %fb, %fs)
  %dq: f32[N,4,8,8] = dequantize(%q, %s, %z)
  return %d, %dq
}
"""
    g = ir.parse_graph(text)
    g.verify()
    assert ir.parse_graph(ir.print_graph(g)) == g
    assert [n.out_type.dtype for n in g.nodes] == ["uint8", "int8", "uint8", "uint8", "uint8", "float32", "float32"]


F32, U8_, I8_, I32 = "float32", "uint8", "int8", "int32"
X = T(("N", 4, 6, 6), U8_)
W = T((8, 4, 3, 3), I8_)
B8, S8 = T((8,), I32), T((8,), F32)


@pytest.mark.parametrize("op,types,attrs,match", [
    ("quantize", [T((2, 3), I8_), T((), F32), T((), U8_)], {}, "quantize: input must be float"),
    ("quantize", [T((2, 3), F32), T((), "float64"), T((), U8_)], {}, "quantize: scale must be float32"),
    ("quantize", [T((2, 3), F32), T((), F32), T((), I32)], {}, "quantize: zero_point must be one of uint8, int8"),
    ("quantize", [T((2, 3), F32), T((3,), F32), T((), U8_)], {}, "quantize: scale .* must both be scalars or both"),
    ("quantize", [T((2, 3), F32), T((2, 3), F32), T((2, 3), U8_)], {}, r"quantize: .*both be scalars or both \[C\]"),
    ("quantize", [T((2, 4, 5), F32), T((3,), F32), T((3,), I8_)], {}, "quantize: 3 scales for 4 channels on axis 1"),
    ("quantize", [T((2, 3), F32), T((3,), F32), T((3,), I8_)], {"axis": 2}, "quantize: axis 2 out of range"),
    ("dequantize", [T((2, 3), U8_), T((), F32), T((), I8_)], {}, "dequantize: input .* and zero_point .* differ"),
    ("dequantize", [T((2, 3), U8_), T((), F32), T((), U8_)], {"axis": "1"}, "op dequantize: attribute axis"),
    ("qconv2d", [T((1, 4, 6, 6), F32), W, B8, S8], {}, "qconv2d: expects a uint8/int8/uint16 input and an int8 weight"),
    ("qconv2d", [X, T((8, 4, 3, 3), U8_), B8, S8], {}, "qconv2d: expects a uint8/int8/uint16 input and an int8 weight"),
    ("qconv2d", [X, W, T((8,), F32), S8], {}, r"qconv2d: bias must be int32\[8\] and scale float32\[8\]"),
    ("qconv2d", [X, W, B8, T((), F32)], {}, r"qconv2d: bias must be int32\[8\] and scale float32\[8\]"),
    ("qconv2d", [X, W, B8, S8], {"out_dtype": "uint8", "out_zero_point": 256}, r"qconv2d: out_zero_point .*\[0, 255\]"),
    ("qconv2d", [X, W, B8, S8], {"out_dtype": "int8", "out_scale": 0.0}, "qconv2d: .*out_scale be positive"),
    ("qconv2d", [X, W, B8, S8], {"out_dtype": "int32"}, "op qconv2d: attribute out_dtype='int32' must be one of"),
    ("qconv2d", [X, W, B8, S8], {"clip_max": 1.0}, "qconv2d: clip_min/clip_max go with act"),
    ("qconv2d", [X, W, B8, S8, S8], {}, "op qconv2d takes 4 inputs"),
    ("qdense", [T((2, 8), U8_), T((3, 8), I8_), T((4,), I32), T((3,), F32)], {}, r"qdense: bias must be int32\[3\]"),
    ("qdense", [T((2, 8), U8_), T((3, 8), I8_), T((3,), I32), T((3,), F32)], {"act": "tanh"},
     "op qdense: attribute act='tanh' must be one of"),
    ("qadd", [T((2, 3), F32), T((2, 3), U8_)], {"a_scale": 1.0, "a_zero_point": 0, "b_scale": 1.0, "b_zero_point": 0},
     "qadd: expects quantized operands"),
    ("qadd", [T((2, 3), U8_), T((2, 4), U8_)], {"a_scale": 1.0, "a_zero_point": 0, "b_scale": 1.0,
                                                 "b_zero_point": 0}, r"qadd: shapes \(2, 3\) and \(2, 4\)"),
    ("qadd", [T((2, 3), U8_), T((2, 3), U8_)], {"a_zero_point": 0, "b_scale": 1.0, "b_zero_point": 0},
     "op qadd needs attribute a_scale"),
])
def test_bad_operands_raise_ir_errors_naming_the_op(op, types, attrs, match):
    with pytest.raises(IRError, match=match):
        ops.infer(op, types, attrs)


@pytest.mark.parametrize("op,types", [
    ("qconv2d", [T((1, 5, 6, 6), U8_), W, B8, S8]),
    ("qdense", [T((2, 7), U8_), T((3, 8), I8_), T((3,), I32), T((3,), F32)])])
def test_shape_errors_of_integer_layers_name_the_quantized_op(op, types):
    with pytest.raises(IRError, match=f"^{op}:"):
        ops.infer(op, types, {})


@pytest.mark.parametrize("op,types,attrs,expected", [
    ("quantize", [T(("N", 3, 4), F32), T((3,), F32), T((3,), I8_)], {}, T(("N", 3, 4), I8_)),
    ("quantize", [T((2, 5), "float16"), T((), F32), T((), U8_)], {}, T((2, 5), U8_)),
    ("dequantize", [T(("N", 3, 4), I8_), T((4,), F32), T((4,), I8_)], {"axis": -1}, T(("N", 3, 4), F32)),
    ("qconv2d", [T(("N", 4, 7, 6), I8_), W, B8, S8], {"padding": (1, 0, 2, 1), "stride": (2, 1), "dilation": (1, 2)},
     T(("N", 8, 4, 3), F32)),
    ("qconv2d", [T((1, 8, 6, 6), U8_), T((8, 1, 3, 3), I8_), B8, S8],
     {"groups": 8, "stride": (2, 2), "padding": (1, 1, 1, 1), "out_dtype": "uint8"}, T((1, 8, 3, 3), U8_)),
    ("qdense", [T(("N", 3, 8), U8_), T((5, 8), I8_), T((5,), I32), T((5,), F32)], {"out_dtype": "int8"},
     T(("N", 3, 5), I8_)),
    ("qadd", [T((2, 4, 3, 3), U8_), T((1, 4, 1, 1), I8_)],
     {"a_scale": 0.1, "a_zero_point": 0, "b_scale": 0.2, "b_zero_point": 0}, T((2, 4, 3, 3), F32)),
])
def test_type_inference(op, types, attrs, expected):
    assert ops.infer(op, types, attrs) == (expected,)
