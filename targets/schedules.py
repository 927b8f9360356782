"""Hand-written CPU schedules for the channel-blocked convolutions: register-blocked micro-kernels, no trials.

A conv output tile of `reg_w` columns x `oc_tiles` channel vectors stays in vector registers while the
reduction over (input channels, kh, kw) runs: one weight vector load and one input broadcast per FMA row. The
fused epilogue (bias, residual add, activation) is computed on that tile. Elementwise and injective functions
(pads, layout transforms, requantize) get parallel outer loops and a vectorized inner one. What no template fits
(reductions such as pooling and dense) is left for MetaSchedule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

CONV_BLOCK = "conv2d_NCHWc"
CONV_INT8_BLOCK = "conv2d_NCHWc_int8"
CONV_DOT_BLOCK = "conv2d_NCHWc_dot"  # s8 x s8 -> s32 conv for AArch64 sdot (targets/lower_arm.py)
DEPTHWISE_BLOCK = "depthwise_conv2d_NCHWc"
DEPTHWISE_PAD_BLOCK = "depthwise_pad"  # the padding stage of a depthwise kernel, inlined into its loads
SCHEDULED_ATTR = "tirx.is_scheduled"


@dataclass(frozen=True)
class TileConfig:
    """Register tile: output columns per tile and channel vectors per tile."""

    reg_w: int
    oc_tiles: int


def _largest_divisor(n: int, cap: int) -> int:
    return max(d for d in range(1, min(n, cap) + 1) if n % d == 0)


def conv_tile(out_w: int, oc_chunks: int, vector_registers: int = 32) -> TileConfig:
    """Two channel vectors per tile when possible; accumulators take at most half the vector registers.

    Measured here (64->64 3x3 at 56x56, AVX-512): 8 columns x 2 vectors 0.91 ms, 14 x 1 1.03 ms, 14 x 2 1.73 ms
    (LLVM spills once the accumulators approach the register file).
    """
    oc_tiles = 2 if oc_chunks % 2 == 0 else 1
    budget = max(1, vector_registers // 2 // oc_tiles)
    return TileConfig(_largest_divisor(out_w, budget), oc_tiles)


def _loops_below(sch, block, loop) -> list:
    """The block's loops nested inside `loop` (after compute_at)."""
    loops = sch.get_loops(block)
    target = sch.get(loop)
    idx = next(i for i, lp in enumerate(loops) if sch.get(lp).same_as(target))
    return list(loops[idx + 1:])


def _named_loops_below(sch, block, loop, expected: list[tuple[str, int]]) -> dict:
    """Name the loops below `loop` after compute_at, which drops the unit-extent ones."""
    below = _loops_below(sch, block, loop)
    present = [name for name, extent in expected if extent != 1]
    if len(present) != len(below):
        raise ValueError(f"unexpected loop nest below the tile: {len(below)} loops for {present}")
    return dict(zip(present, below))


def _epilogue(sch, block, names: list[str]):
    """Inline the elementwise blocks between the conv and the last block; return that last block.

    A conv without an epilogue gets a copy-out consumer so that its tile has a loop nest to be computed at.
    """
    if len(names) == 1:
        sch.cache_write(block, 0, "global")
        names = [names[0], sch.get(sch.get_consumers(block)[0]).name_hint]
    for name in names[1:-1]:
        sch.compute_inline(sch.get_sblock(name))
    return sch.get_sblock(names[-1])


def _schedule_conv(sch, names: list[str], vector_registers: int) -> None:
    conv = sch.get_sblock(CONV_BLOCK)
    extents = [int(sch.get(lp).extent) for lp in sch.get_loops(conv)]
    _, oc_chunks, _, out_w, oc_block, ic_total, kh, kw = extents
    data = next(p for p in sch.mod["main"].params if len(p.shape) == 5)
    ic_block = int(data.shape[-1])
    tile = conv_tile(out_w, oc_chunks, vector_registers)
    (n, co, h, wi, cb), lp = _tile_output(sch, conv, names, tile, [("ocb", oc_block), ("ic", ic_total),
                                                                       ("kh", kh), ("kw", kw)])
    if "ic" not in lp or "ocb" not in lp:
        raise ValueError("no channel loops to block")
    ic_o, ic_i = sch.split(lp["ic"], [None, ic_block])
    kernel = [lp[k] for k in ("kh", "kw") if k in lp]
    tile_loops = [lp[k] for k in ("c_i", "w_i") if k in lp]
    sch.reorder(ic_o, *kernel, ic_i, *tile_loops, lp["ocb"])
    _vectorize_tile(sch, conv, ic_o, lp["ocb"], tile_loops, (n, co, h), cb, wi)


def _schedule_conv_int8(sch, names: list[str], vector_registers: int) -> None:
    """u8 x s8 -> s32 conv: the register tile's innermost 16 channels x 4 inputs is one vpdpbusd."""
    from slimc.targets.intrinsics import VNNI, register

    register(VNNI)
    conv = sch.get_sblock(CONV_INT8_BLOCK)
    extents = [int(sch.get(lp).extent) for lp in sch.get_loops(conv)]
    _, oc_chunks, _, out_w, oc_block, kh, kw, ic_outer, ic_f, lanes = extents
    tile = conv_tile(out_w, oc_chunks, vector_registers)
    (n, co, h, wi, cb), lp = _tile_output(sch, conv, names, tile, [
        ("ocb", oc_block), ("kh", kh), ("kw", kw), ("ic_o", ic_outer), ("ic_f", ic_f), ("lanes", lanes)])
    if "ocb" not in lp or "lanes" not in lp:
        raise ValueError("no 16x4 dot-product block")
    reduce = [lp[k] for k in ("ic_o", "kh", "kw", "ic_f") if k in lp]
    tile_loops = [lp[k] for k in ("c_i", "w_i") if k in lp]
    sch.reorder(*reduce, *tile_loops, lp["ocb"], lp["lanes"])
    _vectorize_tile(sch, conv, reduce[0], None, tile_loops, (n, co, h), cb, wi)
    sch.tensorize(sch.get_loops(conv)[-2], VNNI.name)


NEON_REGISTERS = 32  # AArch64 has 32 128-bit vector registers, whatever the caller assumed for fp32


def _schedule_conv_dot(sch, names: list[str], vector_registers: int) -> None:
    """s8 x s8 -> s32 conv on AArch64: each 4 output channels x 4 input lanes of the register tile is one sdot.

    `vector_registers` is ignored: the tile is sized for NEON's 32 registers, half of them accumulators (each
    output column holds ob/4 int32x4 vectors), as in `conv_tile`.
    """
    from slimc.targets.intrinsics import SDOT, register

    register(SDOT)
    conv = sch.get_sblock(CONV_DOT_BLOCK)
    extents = [int(sch.get(lp).extent) for lp in sch.get_loops(conv)]
    _, oc_chunks, _, out_w, oc_block, ic_outer, kh, kw, ic_f, lanes = extents
    if lanes != 4 or oc_block % 4:
        raise ValueError(f"no 4x4 dot-product block in a {oc_block}-channel x {lanes}-lane conv")
    tile = conv_tile(out_w, oc_chunks, NEON_REGISTERS * 4 // oc_block)
    (n, co, h, wi, cb), lp = _tile_output(sch, conv, names, tile, [
        ("ocb", oc_block), ("ic_o", ic_outer), ("kh", kh), ("kw", kw), ("ic_f", ic_f), ("lanes", lanes)])
    ocb_o, ocb_i = sch.split(lp["ocb"], [None, 4])
    reduce = [lp[k] for k in ("ic_o", "kh", "kw", "ic_f") if k in lp]
    tile_loops = [lp[k] for k in ("c_i", "w_i") if k in lp] + [ocb_o]
    sch.reorder(*reduce, *tile_loops, ocb_i, lp["lanes"])
    _vectorize_tile(sch, conv, (reduce or tile_loops)[0], None, tile_loops, (n, co, h), cb, wi)
    sch.tensorize(sch.get_loops(conv)[-2], SDOT.name)


def _schedule_depthwise(sch, names: list[str], vector_registers: int) -> None:
    dw = sch.get_sblock(DEPTHWISE_BLOCK)
    if DEPTHWISE_PAD_BLOCK in [sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))]:
        sch.compute_inline(sch.get_sblock(DEPTHWISE_PAD_BLOCK))
    _, _, _, out_w, block, kh, kw = [int(sch.get(lp).extent) for lp in sch.get_loops(dw)]
    reg_w = _largest_divisor(out_w, min(vector_registers - 4, 14))
    out = _epilogue(sch, dw, names)
    n, c, h, w, cb = sch.get_loops(out)
    wo, wi = sch.split(w, [None, reg_w])
    sch.compute_at(dw, wo)
    lp = _named_loops_below(sch, dw, wo, [("w_i", reg_w), ("k", block), ("ry", kh), ("rx", kw)])
    kernel = [lp[k] for k in ("ry", "rx") if k in lp]
    if not kernel or "k" not in lp:
        raise ValueError("depthwise conv without a reduction or channel block")
    tile_loops = [lp["w_i"]] if "w_i" in lp else []
    sch.reorder(*kernel, *tile_loops, lp["k"])
    _vectorize_tile(sch, dw, kernel[0], lp["k"], tile_loops, (n, c, h), cb, wi)


def _tile_output(sch, conv, names: list[str], tile: TileConfig, inner: list[tuple[str, int]]):
    """Split the epilogue's output into register tiles, compute the conv at each tile, and name its loops there.

    Returns the output loops (n, c_outer, h, w_inner, channel block) and the conv's loops below the
    tile by name: c_i, w_i, then `inner` (name, extent) in the conv's order; unit loops are absent.
    """
    out = _epilogue(sch, conv, names)
    n, c, h, w, cb = sch.get_loops(out)
    co, ci = sch.split(c, [None, tile.oc_tiles])
    wo, wi = sch.split(w, [None, tile.reg_w])
    sch.reorder(n, co, h, wo, ci, wi, cb)
    sch.compute_at(conv, wo)
    lp = _named_loops_below(sch, conv, wo, [("c_i", tile.oc_tiles), ("w_i", tile.reg_w), *inner])
    return (n, co, h, wi, cb), lp


def _vectorize_tile(sch, block, reduce_from, vector_loop, tile_loops: list, rows: tuple, out_vector, out_cols) -> None:
    """Parallel output rows, channel-block vectors, unrolled register tile; the same for the init block.

    `vector_loop` None: the block's innermost loops are left for a tensor intrinsic.
    """
    sch.parallel(sch.fuse(*rows))
    if vector_loop is not None:
        sch.vectorize(vector_loop)
    for loop in tile_loops:
        sch.unroll(loop)
    sch.vectorize(out_vector)
    sch.unroll(out_cols)
    init = sch.decompose_reduction(block, reduce_from)
    loops = sch.get_loops(init)
    sch.vectorize(loops[-1])
    for loop in loops[-1 - len(tile_loops):-1]:
        sch.unroll(loop)


#: elements below which an elementwise kernel runs on one thread (a parallel launch costs more than it saves)
PARALLEL_MIN_ELEMENTS = 1 << 14
#: parallel iterations to aim for (a few per core, for balance); leading loops are fused until there are this many
PARALLEL_MIN_CHUNKS = 64
#: most lanes of one vectorized innermost loop
VECTOR_MAX_LANES = 64


def _is_spatial(sch, block) -> bool:
    """Whether the block has only data-parallel iterators (no reduction)."""
    return all(int(iv.iter_type) == 0 for iv in sch.get(block).iter_vars)


def _schedule_injective(sch, names: list[str]) -> None:
    """Elementwise/injective kernels (pads, layout transforms, requantize, byte split): the intermediate blocks
    inlined into the ones writing the outputs, whose outer loops run in parallel and whose innermost loop is
    vectorized; untemplated, these stay serial scalar loops (MetaSchedule finds about the same schedule, at ~20 s of
    builder time per task)."""
    blocks = [sch.get_sblock(name) for name in names]
    if not blocks or not all(_is_spatial(sch, b) for b in blocks):
        raise ValueError("not an injective function")
    outputs = []
    for block in blocks:  # a block nothing in the function reads writes an output
        if sch.get_consumers(block):
            sch.compute_inline(block)
        else:
            outputs.append(block)
    for block in outputs:
        _parallel_vector_loops(sch, block)


def _parallel_vector_loops(sch, block) -> None:
    """The block's innermost loop (or its largest divisor up to VECTOR_MAX_LANES) vectorized; the fewest leading
    loops with PARALLEL_MIN_CHUNKS iterations fused and run in parallel (when the block is large enough to pay
    for a parallel launch); the loops between stay serial, so their index arithmetic stays cheap."""
    loops = sch.get_loops(block)
    if not loops:
        return
    extents = [int(sch.get(lp).extent) for lp in loops]
    inner = extents[-1]
    lanes = max(d for d in range(1, min(inner, VECTOR_MAX_LANES) + 1) if inner % d == 0)
    outer, vec = list(loops[:-1]), loops[-1]
    outer_extents = extents[:-1]
    if lanes < inner:
        outer_inner, vec = sch.split(loops[-1], [None, lanes])
        outer.append(outer_inner)
        outer_extents.append(inner // lanes)
    if outer and math.prod(extents) >= PARALLEL_MIN_ELEMENTS:
        k, chunks = 0, 1
        while k < len(outer) and chunks < PARALLEL_MIN_CHUNKS:
            chunks *= outer_extents[k]
            k += 1
        sch.parallel(sch.fuse(*outer[:k]) if k > 1 else outer[0])
    if lanes > 1:
        sch.vectorize(vec)


def schedule_func(func, vector_registers: int = 32):
    """The PrimFunc with a template schedule applied, or None when no template fits it."""
    import tvm
    from tvm import s_tir

    errors = (s_tir.schedule.ScheduleError, tvm.error.InternalError, RuntimeError, ValueError, IndexError)
    sch = s_tir.Schedule(func)
    try:
        root = sch.get_sblock("root")
        names = [sch.get(b).name_hint for b in sch.get_child_blocks(root)]
    except errors:
        return None
    for block, fn in ((CONV_BLOCK, _schedule_conv), (CONV_INT8_BLOCK, _schedule_conv_int8),
                      (CONV_DOT_BLOCK, _schedule_conv_dot),
                      (DEPTHWISE_BLOCK, _schedule_depthwise)):
        if block in names:
            names = names[names.index(block):]
            try:
                fn(sch, names, vector_registers)
            except errors:
                return None
            return sch.mod["main"].with_attr(SCHEDULED_ATTR, True)
    try:
        _schedule_injective(sch, names)
    except errors:
        return None
    return sch.mod["main"].with_attr(SCHEDULED_ATTR, True)


def apply_templates(mod, target) -> tuple[object, list[str]]:
    """Schedule every PrimFunc a template fits; returns the module and the scheduled function names."""
    import tvm

    regs = 32 if target.has("avx512f") else 16
    done: list[str] = []
    for gv, func in list(mod.functions.items()):
        if not isinstance(func, tvm.tirx.PrimFunc) or func.attrs and func.attrs.get(SCHEDULED_ATTR):
            continue
        scheduled = schedule_func(func, regs)
        if scheduled is not None:
            mod[gv] = scheduled
            done.append(gv.name_hint)
    return mod, done
