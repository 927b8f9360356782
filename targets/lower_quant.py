"""Lowerings of the quantization ops: QDQ, and integer conv/dense/add with u8 x s8 -> s32 packed kernels.

On VNNI targets a qconv2d becomes `conv2d_NCHWc_int8` on NCHW[ib]c u8 data (padded with the zero point by a
separate pad op, so the conv's loads stay tensorizable) and a [O/16, I/ib, KH, KW, ib/4, 16, 4] int8 kernel;
the requantizing epilogue (bias, dequantization scale, activation, output grid) is plain elementwise Relax that
fuses into the conv's function.
"""

from __future__ import annotations

import numpy as np

from slimc.ir import Node
from slimc.ops import QUANT_DTYPES
from slimc.targets.lower import Lowerer, Val, _spatial_pad, activation, clamp_bounds, lowering

VNNI_OC_BLOCK = 16  # output channels per vpdpbusd
VNNI_IC_LANES = 4  # u8 x s8 products summed per int32 lane


def _broadcast_const(lw: Lowerer, vec: np.ndarray, axis: int, rank: int, block: int):
    """A per-channel vector shaped to broadcast along `axis` of a rank-`rank` value in its layout."""
    vec = np.asarray(vec)
    if vec.ndim == 0:
        return lw.const(vec)
    if block and axis == 1:
        return lw.const(vec.reshape(1, -1, 1, 1, block))
    shape = [1] * rank
    shape[axis] = -1
    return lw.const(vec.reshape(shape))


@lowering("quantize")
def _quantize(lw: Lowerer, n: Node):
    from tvm.relax import op as R

    g = lw.graph
    v = lw.value(n.inputs[0])
    rank = g.type_of(n.inputs[0]).rank
    axis = n.attrs["axis"] % rank
    scale, zp = g.weight(n.inputs[1]), g.weight(n.inputs[2])
    lo, hi = QUANT_DTYPES[n.out_type.dtype]
    y = R.round(R.divide(v.expr, _broadcast_const(lw, scale.astype(np.float32), axis, rank, v.block)))
    y = R.add(y, _broadcast_const(lw, zp.astype(np.float32), axis, rank, v.block))
    return [lw.emit(R.astype(R.clip(y, lo, hi), n.out_type.dtype), v.block)]


@lowering("dequantize")
def _dequantize(lw: Lowerer, n: Node):
    from tvm.relax import op as R

    g = lw.graph
    v = lw.value(n.inputs[0])
    rank = g.type_of(n.inputs[0]).rank
    axis = n.attrs["axis"] % rank
    scale, zp = g.weight(n.inputs[1]), g.weight(n.inputs[2])
    y = R.subtract(R.astype(v.expr, "float32"), _broadcast_const(lw, zp.astype(np.float32), axis, rank, v.block))
    return [lw.emit(R.multiply(y, _broadcast_const(lw, scale.astype(np.float32), axis, rank, v.block)), v.block)]


def requantize(lw: Lowerer, acc, n: Node, scale: np.ndarray | None, block: int, bias: np.ndarray | None = None):
    """int32 conv accumulator (+ its int32 bias, x its per-channel scale) -> act -> float32 or the node's grid.

    `block` is the accumulator's channel block (0: NCHW); `bias` and `scale` are per output channel.
    """
    from tvm.relax import op as R

    a = n.attrs
    bb = lw.bb
    if bias is not None:
        acc = bb.emit(R.add(acc, lw.channel_const(bias, block, "int32")))
    y = bb.emit(R.astype(acc, "float32")) if scale is not None else acc
    if scale is not None:
        y = bb.emit(R.multiply(y, lw.channel_const(scale, block)))
    clamp = clamp_bounds(a["act"], a) if a["out_dtype"] != "float32" else None
    if clamp is None:
        y = activation(lw, y, a["act"], a)
    if a["out_dtype"] == "float32":
        return y
    lo, hi = QUANT_DTYPES[a["out_dtype"]]
    if a["out_scale"] != 1.0:  # fold-qdq folds the grid into the scale where it can: no division then
        y = R.divide(y, lw.const(np.float32(a["out_scale"])))
    y = R.round(y)
    if clamp is not None:  # the activation's clamp, carried through the grid, joins the grid's own: one clamp less
        lo, hi = grid_clamp(a, clamp, lo, hi)
    y = R.clip(R.add(y, lw.const(np.float32(a["out_zero_point"]))), lo, hi)
    return bb.emit(R.astype(y, a["out_dtype"]))


def grid_clamp(a, clamp: tuple[float | None, float | None], lo: float, hi: float) -> tuple[float, float]:
    """The grid's clamp [lo, hi] joined with the activation's `clamp` carried onto the grid (see _on_grid)."""
    lo2, hi2 = (min(max(_on_grid(v, a), lo), hi) if v is not None else q for v, q in zip(clamp, (lo, hi)))
    return lo2, hi2


def _on_grid(v: float, a) -> float:
    """Where the requantizing epilogue takes the float32 value v: round(v / out_scale) + zero point, in float32.

    Rounding and the division by a positive scale are monotone, so clamping before them equals clamping after them
    at the bounds' images: the activation's clamp merges into the grid's clamp exactly."""
    x = np.float32(v)
    if a["out_scale"] != 1.0:
        x = np.float32(x / np.float32(a["out_scale"]))
    return float(np.round(x) + np.float32(a["out_zero_point"]))


def pack_int8_conv_weight(w: np.ndarray, ib: int, ob: int = VNNI_OC_BLOCK) -> np.ndarray:
    """OIHW int8 -> [O/ob, I/ib, KH, KW, ib/4, ob, 4] (conv2d_NCHWc_int8's kernel layout)."""
    o, i, kh, kw = w.shape
    lanes = VNNI_IC_LANES
    return np.ascontiguousarray(
        w.reshape(o // ob, ob, i // ib, ib // lanes, lanes, kh, kw).transpose(0, 2, 5, 6, 3, 1, 4))


def _vnni_blocks(lw: Lowerer, n: Node, cin: int, cout: int) -> tuple[int, int] | None:
    """(input block, output block) for a VNNI conv (cin rounded up to 4 lanes), or None when it cannot use one."""
    if getattr(lw.target_info, "int8_dot", None) != "vnni" or n.attrs.get("groups", 1) != 1:
        return None
    if lw.graph.type_of(n.inputs[0]).dtype not in ("uint8", "uint16"):
        return None
    cin = -(-cin // VNNI_IC_LANES) * VNNI_IC_LANES
    ib = max(d for d in range(VNNI_IC_LANES, 17, VNNI_IC_LANES) if cin % d == 0)
    return ib, VNNI_OC_BLOCK


def _lane_padded_input(lw: Lowerer, n: Node, w: np.ndarray, ib: int, zp: float, source=None):
    """Input in NCHW[ib]c and weight with channels padded to a multiple of 4 (zero weights: padding adds nothing).

    `source(block)` gives the input in a layout (default: the node's first operand).
    """
    from tvm.relax import op as R

    source = source or (lambda block: lw.expr(n.inputs[0], block))
    cin = w.shape[1]
    extra = -cin % VNNI_IC_LANES
    if not extra:
        return source(ib), w
    x = lw.bb.emit(R.nn.pad(source(0), [0, 0, 0, extra, 0, 0, 0, 0], "constant", zp))
    x = lw.bb.emit(R.layout_transform(x, index_map=lambda b, c, h, w_: (b, c // ib, h, w_, c % ib)))
    return x, np.pad(w, ((0, 0), (0, extra), (0, 0), (0, 0)))


def _conv_attrs(n: Node) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    a = n.attrs
    return tuple(tuple(a.get(k, d)) for k, d in (("stride", (1, 1)), ("padding", (0, 0, 0, 0)), ("dilation", (1, 1))))


def _vnni_accs(lw: Lowerer, n: Node, w: np.ndarray, blocks: tuple[int, int], xs: list) -> list:
    """int32 accumulators of conv2d_NCHWc_int8 (templated into vpdpbusd) on each of `xs`, inputs already padded
    (NCHW[ib]c u8, channels a multiple of 4 like `w`'s), all with one packed weight constant; output channels
    padded to whole 16-blocks."""
    from tvm import topi

    ib, ob = blocks
    stride, _, dilation = _conv_attrs(n)
    w = np.pad(w, ((0, -w.shape[0] % ob), (0, 0), (0, 0), (0, 0)))
    packed = lw.const(pack_int8_conv_weight(w, ib, ob))
    with lw.target:
        return [lw.bb.emit_te(topi.nn.conv2d_NCHWc_int8, x, packed, stride, (0, 0), dilation, f"NCHW{ib}c",
                              f"NCHW{ob}c", "int32", VNNI_IC_LANES, primfunc_name_hint="conv2d_NCHWc_int8")
                for x in xs]


def _padded_input(lw: Lowerer, n: Node, w: np.ndarray, ib: int, zp: int, source):
    """The u8 input `source(block)` as NCHW[ib]c with channels padded to 4 lanes and the spatial padding applied
    (both with the zero point), and `w` with its input channels padded to match."""
    x, w = _lane_padded_input(lw, n, w, ib, float(zp), source)
    return _spatial_pad(lw, x, _conv_attrs(n)[1], 5, float(zp)), w


def _byte(lw: Lowerer, source, high: bool):
    """`source(block)` (uint16) -> its high or low byte as uint8."""
    from tvm.relax import op as R

    def part(block: int):
        x = source(block)
        x = R.right_shift(x, lw.const(np.uint16(8))) if high else R.bitwise_and(x, lw.const(np.uint16(255)))
        return lw.bb.emit(R.astype(x, "uint8"))
    return part


def _byte_planes_te(x, padding: tuple[int, ...], zp: int, shift: int = 0):
    """NCHW[b]c uint16 -> its high and low bytes as two tensors, spatially padded with the zero point's bytes: one
    pass over the input, one kernel (a compute with two outputs). uint8 bytes, or with `shift` int8 bytes - shift
    (AArch64's sdot reads s8)."""
    from tvm import te, tirx

    top, left, bottom, right = padding
    n, c, h, w, b = x.shape
    dtype = "int8" if shift else "uint8"

    def byte(v):
        return (v.astype("int16") - shift).astype(dtype) if shift else v.astype(dtype)

    def planes(i, j, y, z, k):
        if not any(padding):
            v = x[i, j, y, z, k]
            return [byte(v >> 8), byte(v & 255)]
        inside = tirx.all(y >= top, y < h + top, z >= left, z < w + left)
        v = x[i, j, y - top, z - left, k]
        return [tirx.if_then_else(inside, byte(v >> 8), tirx.const((zp >> 8) - shift, dtype)),
                tirx.if_then_else(inside, byte(v & 255), tirx.const((zp & 255) - shift, dtype))]

    return te.compute((n, c, h + top + bottom, w + left + right, b), planes, name="byte_planes")


#: relax's OpPatternKind for "do not fuse": FuseOps would otherwise pull the split into the producing conv's
#: epilogue, which the conv templates cannot schedule
OPAQUE = 8


def byte_planes(lw: Lowerer, x, padding: tuple[int, ...], zp: int, shift: int = 0):
    """The two padded byte planes of the uint16 value `x` (NCHW[b]c) from one kernel of their own (`_byte_planes_te`)."""
    from tvm import relax, te

    shape = [int(d) for d in x.ty.shape]
    data = te.placeholder(shape, "uint16", name="x")
    hi, lo = _byte_planes_te(data, padding, zp, shift)
    func = te.create_prim_func([data, hi, lo]).without_attr("global_symbol").with_attr("op_pattern", OPAQUE)
    gv = lw.bb.add_func(func, "byte_planes")
    out = relax.TensorType([int(d) for d in hi.shape], hi.dtype)
    planes = lw.bb.emit(relax.call_tir(gv, [x], [out, out]))
    return tuple(lw.bb.emit(relax.TupleGetItem(planes, i)) for i in (0, 1))


def _wide_acc(lw: Lowerer, n: Node, w: np.ndarray, blocks: tuple[int, int], zp: int, source):
    """int32 accumulator of a uint16-input VNNI conv: x = 256 * hi + lo with u8 bytes, two vpdpbusd convs summed as
    256 * acc(hi) + acc(lo), exact in int32 since the grid keeps qmax * sum|w| below 2^29."""
    ib = blocks[0]
    if w.shape[1] % VNNI_IC_LANES:  # channels padded to 4 lanes in NCHW first: the bytes are split there
        hi, _ = _padded_input(lw, n, w, ib, zp >> 8, _byte(lw, source, True))
        lo, w = _padded_input(lw, n, w, ib, zp & 255, _byte(lw, source, False))
    else:
        hi, lo = byte_planes(lw, source(ib), _conv_attrs(n)[1], zp)
    return combine_bytes(lw, *_vnni_accs(lw, n, w, blocks, [hi, lo]))


def combine_bytes(lw: Lowerer, acc_hi, acc_lo):
    """256 * acc(hi) + acc(lo): the int32 accumulator of a uint16 input from those of its two byte planes."""
    from tvm.relax import op as R

    return lw.bb.emit(R.add(R.multiply(acc_hi, lw.const(np.int32(256))), acc_lo))


def _vnni_conv(lw: Lowerer, n: Node, w: np.ndarray, bias: np.ndarray, scale: np.ndarray, blocks: tuple[int, int],
               source=None, keep_padding: bool = False) -> Val:
    """conv2d_NCHWc_int8 (templated into vpdpbusd) + requantizing epilogue; output channels padded to 16-blocks,
    sliced off after unless `keep_padding` (a channel-padded Val, see lower.Val).
    A uint16 input (wide grid, passes/quant/wide.py) runs as two convs over its bytes (`_wide_acc`)."""
    from tvm.relax import op as R

    ib, ob = blocks
    zp = int(n.attrs["x_zero_point"])
    source = source or (lambda block: lw.expr(n.inputs[0], block))
    cout = w.shape[0]
    if lw.graph.type_of(n.inputs[0]).dtype == "uint16":
        acc = _wide_acc(lw, n, w, blocks, zp, source)
    else:
        x, w_lanes = _padded_input(lw, n, w, ib, zp, source)
        (acc,) = _vnni_accs(lw, n, w_lanes, blocks, [x])
    extra = -cout % ob  # output channels padded to whole 16-channel blocks, sliced off after
    if extra:
        bias, scale = np.pad(bias, (0, extra)), np.pad(scale, (0, extra), constant_values=1.0)
    y = requantize(lw, acc, n, scale, ob, bias)
    if not extra or keep_padding:
        return Val(y, ob, cout + extra if extra else 0)
    y = lw.bb.emit(R.layout_transform(y, index_map=lambda b, cb, h, w_, ci: (b, cb * ob + ci, h, w_)))
    return lw.emit(R.strided_slice(y, [1], [0], [cout]))


@lowering("qconv2d")
def _qconv2d(lw: Lowerer, n: Node):
    from tvm import topi
    from tvm.relax import op as R

    from slimc.targets import lower_arm
    from slimc.targets.lower import _pack_depthwise_weight, depthwise_nchwc_te

    if lower_arm.uses_dotprod(lw, n):
        return lower_arm.lower_qconv2d(lw, n)
    g = lw.graph
    w = g.weight(n.inputs[1])
    bias, scale = g.weight(n.inputs[2]), g.weight(n.inputs[3])
    cout, cin = w.shape[0], g.type_of(n.inputs[0]).shape[1]
    a = n.attrs
    zp = float(a["x_zero_point"])
    blocks = _vnni_blocks(lw, n, cin, cout)
    depthwise = a["groups"] == cin == cout and w.shape[1] == 1
    if blocks is not None:
        v = lw.value(n.inputs[0], padded=True)
        if v.channels and v.block % VNNI_IC_LANES == 0 and g.type_of(n.inputs[0]).dtype == "uint8":
            # the producer's channel padding read as it is: zero weights for it (no slice, no relayout between)
            w = np.pad(w, ((0, 0), (0, v.channels - cin), (0, 0), (0, 0)))
            return [_vnni_conv(lw, n, w, bias, scale, (v.block, blocks[1]), lambda block: lw.in_layout(v, block),
                               keep_padding=True)]
        return [_vnni_conv(lw, n, w, bias, scale, blocks, keep_padding=True)]
    if depthwise and lw.plan.block:
        b = lw.plan.block_for(cout)
        acc = lw.bb.emit_te(depthwise_nchwc_te, lw.expr(n.inputs[0], b), lw.const(_pack_depthwise_weight(w, b)),
                            tuple(a["stride"]), tuple(a["dilation"]), "int32", tuple(a["padding"]), zp,
                            primfunc_name_hint="depthwise_conv2d_NCHWc")
        return [Val(requantize(lw, acc, n, scale, b, bias), b)]
    # generic integer conv (first layers with few channels, grouped convs, targets without VNNI)
    x = _spatial_pad(lw, lw.expr(n.inputs[0], 0), a["padding"], 4, zp)
    x = lw.bb.emit(R.astype(x, "int32"))
    acc = lw.bb.emit(R.nn.conv2d(x, lw.const(w.astype(np.int32)), tuple(a["stride"]), (0, 0), tuple(a["dilation"]),
                                 a["groups"], out_dtype="int32"))
    return [Val(requantize(lw, acc, n, scale, 0, bias))]


@lowering("qdense")
def _qdense(lw: Lowerer, n: Node):
    from tvm.relax import op as R

    from slimc.targets import lower_arm

    if lower_arm.uses_dotprod(lw, n):
        return lower_arm.lower_qdense(lw, n)
    g = lw.graph
    w = g.weight(n.inputs[1])
    bias, scale = g.weight(n.inputs[2]), g.weight(n.inputs[3])
    x_t = g.type_of(n.inputs[0])
    if getattr(lw.target_info, "int8_dot", None) == "vnni" and x_t.rank == 2 and x_t.dtype in ("uint8", "uint16"):
        return [_vnni_dense(lw, n, w, bias, scale)]
    x = lw.bb.emit(R.astype(lw.expr(n.inputs[0]), "int32"))  # the bias holds the zero-point correction
    acc = lw.bb.emit(R.matmul(x, lw.const(np.ascontiguousarray(w.T.astype(np.int32))), out_dtype="int32"))
    acc = lw.bb.emit(R.add(acc, lw.const(bias.astype(np.int32))))
    y = lw.bb.emit(R.multiply(R.astype(acc, "float32"), lw.const(scale.astype(np.float32))))
    return [Val(requantize(lw, y, n, None, 0))]


def _vnni_dense(lw: Lowerer, n: Node, w: np.ndarray, bias: np.ndarray, scale: np.ndarray) -> Val:
    """[M, K] x [N, K] as a 1x1 VNNI conv over a 1 x M image: [1, K, 1, M] -> [1, N, 1, M] -> [M, N]."""
    from tvm.relax import op as R

    m, k = (int(d) for d in lw.graph.type_of(n.inputs[0]).shape)
    cols = lw.bb.emit(R.reshape(R.permute_dims(lw.expr(n.inputs[0]), [1, 0]), (1, k, 1, m)))
    blocks = _vnni_blocks(lw, n, k, w.shape[0])
    assert blocks is not None

    def source(block: int):
        if not block:
            return cols
        return lw.bb.emit(R.layout_transform(cols, index_map=lambda b, c, h, w_: (b, c // block, h, w_, c % block)))

    y = _vnni_conv(lw, n, w.reshape(w.shape[0], k, 1, 1), bias, scale, blocks, source)
    plain = lw.in_layout(y, 0)
    return lw.emit(R.permute_dims(R.reshape(plain, (w.shape[0], m)), [1, 0]))


@lowering("qadd")
def _qadd(lw: Lowerer, n: Node):
    from tvm.relax import op as R

    a = n.attrs
    va, vb = lw.value(n.inputs[0], padded=True), lw.value(n.inputs[1], padded=True)
    if (va.channels, va.block) != (vb.channels, vb.block) or not va.channels:  # elementwise on equal padding only
        va, vb = lw.value(n.inputs[0]), lw.value(n.inputs[1])
    block = va.block if va.block == vb.block else 0
    xa, xb = (va.expr, vb.expr) if block or not (va.block or vb.block) else \
        (lw.expr(n.inputs[0], 0), lw.expr(n.inputs[1], 0))

    def deq(x, s, z):
        return R.multiply(R.subtract(R.astype(x, "float32"), lw.const(np.float32(z))), lw.const(np.float32(s)))

    y = lw.bb.emit(R.add(deq(xa, a["a_scale"], a["a_zero_point"]), deq(xb, a["b_scale"], a["b_zero_point"])))
    return [Val(requantize(lw, y, n, None, block), block, va.channels)]

