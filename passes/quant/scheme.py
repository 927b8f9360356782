"""How values are quantized: the scheme a target implies, and (scale, zero point) from a calibrated range."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Scheme:
    """u8 asymmetric activations x s8 symmetric per-output-channel weights; `note` explains a weak target."""

    activation_dtype: str = "uint8"
    activation_max: int = 255
    weight_max: int = 127
    per_channel: bool = True
    note: str = ""


def scheme_for(target) -> Scheme:
    """The scheme the target's int8 dot-product instructions need (u8 x s8 accumulating in int32)."""
    dot = getattr(target, "int8_dot", "vnni") if target is not None else "vnni"
    if dot in ("vnni", "amx", "dotprod", "i8mm"):
        return Scheme()
    if dot == "avx512":
        # vpmaddubsw adds two u8*s8 products into a saturating int16: exact only with 7-bit activations
        return Scheme(activation_max=127, note="AVX-512 without VNNI: 7-bit activations keep vpmaddubsw exact")
    desc = target.describe() if hasattr(target, "describe") else str(target)
    return Scheme(note=f"target {desc} has no int8 dot-product instruction (VNNI / dotprod): int8 kernels there "
                       "will run about as fast as fp32; quantize for size, or pick a target with one")


#: significant bits of a u8 activation scale: (q - zero_point) * scale, a 9-bit integer times the scale, is then
#: exact in float32, so whether LLVM contracts a dequantize's multiply with the next add into an FMA (it does)
#: cannot change the result, and integer adds stay bit-exact against the interpreter
SCALE_BITS = 15
#: float32's significand: a product of two integers is exact in float32 while their bits add up to at most this
FLOAT32_BITS = 24


def exact_product_scale(scale: float, bits: int = SCALE_BITS) -> np.float32:
    """`scale` rounded up to `bits` significant bits (up: the grid still holds the calibrated range)."""
    m, e = np.frexp(np.float64(scale))
    return np.float32(np.ldexp(np.ceil(m * 2.0 ** bits), int(e) - bits))


def activation_qparams(lo: float, hi: float, qmax: int = 255) -> tuple[np.float32, np.unsignedinteger]:
    """Asymmetric (scale, zero point) whose grid [0, qmax] holds the range widened to contain 0 (0 is exact); the
    zero point is uint8 up to qmax 255, else uint16 (wide grids, passes/quant/wide.py)."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if not np.isfinite(lo) or not np.isfinite(hi):
        raise ValueError(f"calibrated range [{lo}, {hi}] is not finite")
    zp_type = np.uint8 if qmax <= 255 else np.uint16
    if hi - lo <= 0.0:
        return np.float32(1.0), zp_type(0)
    # (q - zp) needs qmax.bit_length() + 1 signed bits: the scale keeps the rest of float32's significand
    scale = exact_product_scale((hi - lo) / qmax, FLOAT32_BITS - qmax.bit_length() - 1)
    zp = int(np.clip(np.round(-lo / float(scale)), 0, qmax))
    return scale, zp_type(zp)


def widened_qparams(scale: np.ndarray, zero_point: np.ndarray, qmax: int,
                    old_qmax: int = 255) -> tuple[np.ndarray, np.ndarray]:
    """A uint16 grid [0, qmax] holding at least the range of the u8 grid (scale, zero point); scalar or per channel.

    The zero point scales with the level count (one zero point for all channels stays one), and each scale is the
    smallest exact-product scale (`activation_qparams`) reaching both ends of the old range from it.
    """
    s, z = np.asarray(scale, np.float64), np.asarray(zero_point, np.float64)
    zp = np.round(z * qmax / old_qmax)
    need = np.maximum(np.where(zp > 0, s * z / np.maximum(zp, 1.0), 0.0), s * (old_qmax - z) / (qmax - zp))
    bits = FLOAT32_BITS - int(qmax).bit_length() - 1
    new = np.vectorize(lambda v: exact_product_scale(v, bits), otypes=[np.float32])(need)
    return np.asarray(new, np.float32).reshape(s.shape), zp.astype(np.uint16).reshape(z.shape)


#: the int32 bias of an integer layer must hold bias / (x_scale * w_scale) with room for the zero-point correction
BIAS_LIMIT = 2.0 ** 30


def bias_safe_scale(bias: np.ndarray, x_scale: float | np.ndarray) -> np.ndarray:
    """Smallest weight scale per channel whose int32 bias (bias / (x_scale * w_scale)) stays below 2^30 (`x_scale`
    per channel too for a depthwise conv's per-channel input grid)."""
    return (np.abs(np.asarray(bias, np.float64)) / (np.asarray(x_scale, np.float64) * BIAS_LIMIT)).astype(np.float32)


def weight_qparams(w: np.ndarray, qmax: int = 127, per_channel: bool = True,
                   floor: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric s8 weights: (int8 weights, float32 scale per output channel, or a scalar).

    `floor` raises the scale of near-dead channels (tiny weights, large bias after BN folding) so that their
    int32 bias cannot overflow; such channels then quantize their weights to few levels, which they barely use.
    """
    w = np.asarray(w, np.float32)
    if per_channel:
        amax = np.abs(w.reshape(w.shape[0], -1)).max(axis=1)
    else:
        amax = np.asarray(np.abs(w).max())
    scale = np.where(amax > 0, amax / qmax, 1.0).astype(np.float32)
    if floor is not None:
        scale = np.maximum(scale, floor).astype(np.float32)
    s = scale.reshape((-1,) + (1,) * (w.ndim - 1)) if per_channel else scale
    q = np.clip(np.round(w / s), -qmax, qmax).astype(np.int8)
    return q, scale
