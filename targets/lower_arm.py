"""AArch64 int8 lowering: qconv2d/qdense as s8 x s8 -> s32 convs whose 4x4 inner blocks a template makes sdots.

NEON's dot product (`sdot`, +dotprod) multiplies signed bytes with signed bytes (the u8 x s8 `usdot` needs +i8mm
and TVM 0.27 has no intrinsic for it), so u8 activations are shifted to s8 (x - 128) in the relayout/pad step and
each output channel's int32 bias gains 128 * sum(w): sum((x - 128) * w) + 128 * sum(w) = sum(x * w), exact. A uint16
activation (wide grid) is x = 256 * hi + lo: one such conv per byte, combined as 256 * acc(hi) + acc(lo).
Data is NCHW[ib]c s8 (padded by a separate op so the conv's loads stay tensorizable), the kernel
[O/ob, I/ib, KH, KW, ib/4, ob, 4]; every 4 output channels x 4 input channels of it is 16 contiguous bytes, one sdot.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from slimc.ir import Node
from slimc.targets.lower import Lowerer, Val, _spatial_pad
from slimc.targets.lower_quant import (_byte, _lane_padded_input, byte_planes, combine_bytes, pack_int8_conv_weight,
                                      requantize)
from slimc.targets.schedules import CONV_DOT_BLOCK

DOT_LANES = 4  # s8 products summed into one int32 lane by sdot
DOT_OUT = 4  # int32 lanes (output channels) of one sdot
OUT_BLOCKS = (16, 8, 4)  # output channel blocks, largest first (16 u8 outputs fill one NEON register)
S8_SHIFT = 128  # u8 activation - 128 = s8 activation
INT32_MAX = 2**31 - 1


#: a uint16 activation x = 256 * hi + lo runs as two sdot convs over its bytes, each shifted by 128:
#: sum(x * w) = 256 * acc(hi - 128) + acc(lo - 128) + (256 + 1) * 128 * sum(w)
WIDE_SHIFT = (256 + 1) * S8_SHIFT


def dot_bias(bias: np.ndarray, w: np.ndarray, shift: int = S8_SHIFT) -> np.ndarray | None:
    """The int32 bias that undoes the activation shift (bias + shift * sum(w) per output), or None past int32."""
    total = bias.astype(np.int64) + shift * w.reshape(w.shape[0], -1).astype(np.int64).sum(axis=1)
    if np.abs(total).max(initial=0) > INT32_MAX:
        return None
    return total.astype(np.int32)


def _wide_fits(w: np.ndarray) -> bool:
    """Whether 256 * acc(hi - 128) stays in int32 for every output channel (|hi - 128| <= 128)."""
    return 256 * S8_SHIFT * int(np.abs(w.reshape(w.shape[0], -1).astype(np.int64)).sum(axis=1).max(initial=0)) \
        <= INT32_MAX


def uses_dotprod(lw: Lowerer, n: Node) -> bool:
    """Whether this qconv2d/qdense runs on sdot: +dotprod AArch64, u8 (or u16, as two byte convs) activations,
    groups=1, bias still int32."""
    info = lw.target_info
    if getattr(info, "int8_dot", None) not in ("dotprod", "i8mm") or not info.has("dotprod"):
        return False
    if n.attrs.get("groups", 1) != 1:
        return False
    g = lw.graph
    x, w = g.type_of(n.inputs[0]), g.weight(n.inputs[1])
    if x.rank != (4 if n.op == "qconv2d" else 2):
        return False
    if x.dtype == "uint16":
        return _wide_fits(w) and dot_bias(g.weight(n.inputs[2]), w, WIDE_SHIFT) is not None
    return x.dtype == "uint8" and dot_bias(g.weight(n.inputs[2]), w) is not None


def dot_blocks(cin: int, cout: int) -> tuple[int, int]:
    """(input block, output block): the largest multiples of 4 up to 16 dividing the 4-padded channel counts."""
    cin4, cout4 = -(-cin // DOT_LANES) * DOT_LANES, -(-cout // DOT_OUT) * DOT_OUT
    ib = max(d for d in range(DOT_LANES, 17, DOT_LANES) if cin4 % d == 0)
    return ib, next(b for b in OUT_BLOCKS if cout4 % b == 0)


def conv2d_nchwc_dot_te(data, kernel, stride: Sequence[int], dilation: Sequence[int], out_dtype: str = "int32"):
    """s8 x s8 -> s32 conv on pre-padded NCHW[ib]c data; innermost (output block, 4 lanes) matches sdot's 4x4."""
    from tvm import te

    n, _, h, w, _ = (int(d) for d in data.shape)
    oc_chunks, ic_chunks, kh, kw, ic_f, ob, lanes = (int(d) for d in kernel.shape)
    (sh, sw), (dh, dw) = stride, dilation
    oh = (h - (kh - 1) * dh - 1) // sh + 1
    ow = (w - (kw - 1) * dw - 1) // sw + 1
    ic = te.reduce_axis((0, ic_chunks), name="ic_outer")
    ry = te.reduce_axis((0, kh), name="kh")
    rx = te.reduce_axis((0, kw), name="kw")
    f = te.reduce_axis((0, ic_f), name="ic_f_inner")
    lane = te.reduce_axis((0, lanes), name="ic_s_inner")
    return te.compute(
        (n, oc_chunks, oh, ow, ob),
        lambda b, c, y, x, k: te.sum(
            data[b, ic, y * sh + ry * dh, x * sw + rx * dw, f * lanes + lane].astype(out_dtype)
            * kernel[c, ic, ry, rx, f, k, lane].astype(out_dtype), axis=[ic, ry, rx, f, lane]),
        name=CONV_DOT_BLOCK)


def _to_s8(lw: Lowerer, x):
    """u8 activations moved onto the s8 grid (elementwise: it fuses into the relayout/pad before the conv)."""
    from tvm.relax import op as R

    moved = R.subtract(R.astype(x, "int16"), lw.const(np.int16(S8_SHIFT)))
    return lw.bb.emit(R.astype(moved, "int8"))


def _padded_outputs(w: np.ndarray, bias: np.ndarray, scale: np.ndarray, ob: int):
    """Weight, bias and scale with output channels padded to whole blocks (zero weights, unit scale; sliced off)."""
    extra = -w.shape[0] % ob
    if not extra:
        return w, bias, scale
    widths = ((0, extra),) + ((0, 0),) * (w.ndim - 1)
    return np.pad(w, widths), np.pad(bias, (0, extra)), np.pad(scale, (0, extra), constant_values=1.0)


def _dot_conv(lw: Lowerer, x, packed, stride, dilation):
    """The sdot conv of NCHW[ib]c s8 data with a packed weight constant: the int32 accumulator in NCHW[ob]c."""
    return lw.bb.emit_te(conv2d_nchwc_dot_te, x, packed, tuple(stride), tuple(dilation), "int32",
                         primfunc_name_hint=CONV_DOT_BLOCK)


def _wide(lw: Lowerer, n: Node) -> bool:
    return lw.graph.type_of(n.inputs[0]).dtype == "uint16"


def _sources(lw: Lowerer, n: Node, source) -> list[tuple[object, int]]:
    """(u8 source(block), its zero point) per byte plane: the input itself, or the high and low bytes of a uint16
    input (summed as 256 * acc(hi) + acc(lo))."""
    zp = int(n.attrs["x_zero_point"])
    if not _wide(lw, n):
        return [(source, zp)]
    return [(_byte(lw, source, True), zp >> 8), (_byte(lw, source, False), zp & 255)]


def _combine(lw: Lowerer, accs: list):
    """One plane's accumulator, or 256 * acc(hi) + acc(lo)."""
    return accs[0] if len(accs) == 1 else combine_bytes(lw, *accs)


def lower_qconv2d(lw: Lowerer, n: Node) -> list[Val]:
    """qconv2d as shift -> pad -> sdot conv -> requantize, staying in NCHW[ob]c unless channels were padded (a
    uint16 input: one such conv per byte plane, both planes shifted and padded by one kernel where the channels
    need no lane padding)."""
    from tvm.relax import op as R

    g = lw.graph
    a = n.attrs
    w = g.weight(n.inputs[1])
    cout, cin = w.shape[0], g.type_of(n.inputs[0]).shape[1]
    ib, ob = dot_blocks(cin, cout)
    if _wide(lw, n) and not cin % DOT_LANES:
        planes = list(byte_planes(lw, lw.expr(n.inputs[0], ib), tuple(a["padding"]), int(a["x_zero_point"]),
                                  S8_SHIFT))
    else:
        planes = []
        for source, zp in _sources(lw, n, lambda block: lw.expr(n.inputs[0], block)):
            x, padded = _lane_padded_input(lw, n, w, ib, float(zp), source)
            planes.append(_spatial_pad(lw, _to_s8(lw, x), a["padding"], 5, float(zp - S8_SHIFT)))
        w = padded
    w, bias, scale = _padded_outputs(w, g.weight(n.inputs[2]), g.weight(n.inputs[3]), ob)
    packed = lw.const(pack_int8_conv_weight(w, ib, ob))
    accs = [_dot_conv(lw, x, packed, a["stride"], a["dilation"]) for x in planes]
    y = requantize(lw, _combine(lw, accs), n, scale, ob, dot_bias(bias, w, WIDE_SHIFT if _wide(lw, n) else S8_SHIFT))
    if w.shape[0] == cout:
        return [Val(y, ob)]
    y = lw.bb.emit(R.layout_transform(y, index_map=lambda b, cb, h, w_, ci: (b, cb * ob + ci, h, w_)))
    return [lw.emit(R.strided_slice(y, [1], [0], [cout]))]


def lower_qdense(lw: Lowerer, n: Node) -> list[Val]:
    """qdense [N, K] as a 1x1 sdot conv over a 1 x N image (rows become columns): the same kernel and template."""
    from tvm.relax import op as R

    g = lw.graph
    w0 = g.weight(n.inputs[1])
    (rows, k), cout = g.type_of(n.inputs[0]).shape, w0.shape[0]
    ib, ob = dot_blocks(k, cout)
    extra = -k % DOT_LANES  # zero weights over the padded inputs: the pad value adds nothing
    w, bias, scale = _padded_outputs(np.pad(w0, ((0, 0), (0, extra))), g.weight(n.inputs[2]), g.weight(n.inputs[3]),
                                     ob)
    packed = lw.const(pack_int8_conv_weight(w[:, :, None, None], ib, ob))
    accs = []
    for source, zp in _sources(lw, n, lambda block: lw.expr(n.inputs[0])):
        x = source(0)
        if extra:
            x = lw.bb.emit(R.nn.pad(x, [0, 0, 0, extra], "constant", float(zp)))
        x = lw.bb.emit(R.reshape(_to_s8(lw, x), (rows, (k + extra) // ib, ib)))
        x = lw.bb.emit(R.reshape(R.permute_dims(x, [1, 0, 2]), (1, (k + extra) // ib, 1, rows, ib)))
        accs.append(_dot_conv(lw, x, packed, (1, 1), (1, 1)))
    y = requantize(lw, _combine(lw, accs), n, scale, ob,  # [1, O/ob, 1, N, ob]
                   dot_bias(bias, w, WIDE_SHIFT if _wide(lw, n) else S8_SHIFT))
    y = lw.bb.emit(R.reshape(y, (w.shape[0] // ob, rows, ob)))
    y = lw.bb.emit(R.reshape(R.permute_dims(y, [1, 0, 2]), (rows, w.shape[0])))
    if w.shape[0] == cout:
        return [Val(y)]
    return [lw.emit(R.strided_slice(y, [1], [0], [cout]))]
