"""Hand-written CPU schedules for the channel-blocked convolutions: register-blocked micro-kernels, no trials.

A conv output tile of `reg_w` columns x `oc_tiles` channel vectors stays in vector registers while the
reduction over (input channels, kh, kw) runs: one weight vector load and one input broadcast per FMA row. The
fused epilogue (bias, residual add, activation) is computed on that tile. Functions these templates cannot
handle are left unscheduled for MetaSchedule.
"""

from __future__ import annotations

from dataclasses import dataclass

CONV_BLOCK = "conv2d_NCHWc"
DEPTHWISE_BLOCK = "depthwise_conv2d_NCHWc"
SCHEDULED_ATTR = "tirx.is_scheduled"


@dataclass(frozen=True)
class TileConfig:
    """Register tile: output columns per tile and channel vectors per tile."""

    reg_w: int
    oc_tiles: int


def _largest_divisor(n: int, cap: int) -> int:
    return max(d for d in range(1, min(n, cap) + 1) if n % d == 0)


def conv_tile(out_w: int, oc_chunks: int, vector_registers: int = 32) -> TileConfig:
    """Two channel vectors per tile when possible, and as many columns as leave registers for operands."""
    oc_tiles = 2 if oc_chunks % 2 == 0 else 1
    budget = max(1, (vector_registers - 4) // oc_tiles)
    return TileConfig(_largest_divisor(out_w, min(budget, 14)), oc_tiles)


def _loops_below(sch, block, loop) -> list:
    """The block's loops nested inside `loop` (after compute_at)."""
    loops = sch.get_loops(block)
    target = sch.get(loop)
    idx = next(i for i, lp in enumerate(loops) if sch.get(lp).same_as(target))
    return list(loops[idx + 1:])


def _epilogue(sch, names: list[str]):
    """Inline the elementwise blocks between the conv and the last block; return that last block."""
    for name in names[1:-1]:
        sch.compute_inline(sch.get_sblock(name))
    return sch.get_sblock(names[-1])


def _schedule_conv(sch, names: list[str], vector_registers: int) -> None:
    conv = sch.get_sblock(CONV_BLOCK)
    n_, oc_chunk, _, ow, _, ic, _, _ = sch.get_loops(conv)
    out_w, oc_chunks = int(sch.get(ow).extent), int(sch.get(oc_chunk).extent)
    data = next(p for p in sch.mod["main"].params if len(p.shape) == 5)
    ic_block = int(data.shape[-1])
    tile = conv_tile(out_w, oc_chunks, vector_registers)
    if names[-1] == CONV_BLOCK:  # no epilogue: give the conv a consumer to compute at
        sch.cache_write(conv, 0, "global")
        names = [CONV_BLOCK, sch.get(sch.get_consumers(conv)[0]).name_hint]
    out = _epilogue(sch, names)
    n, c, h, w, cb = sch.get_loops(out)
    co, ci = sch.split(c, [None, tile.oc_tiles])
    wo, wi = sch.split(w, [None, tile.reg_w])
    sch.reorder(n, co, h, wo, ci, wi, cb)
    sch.compute_at(conv, wo)
    c_i, w_i, ocb, ic, *kernel = _loops_below(sch, conv, wo)  # unit kh/kw loops vanish in compute_at
    ic_o, ic_i = sch.split(ic, [None, ic_block])
    sch.reorder(ic_o, *kernel, ic_i, c_i, w_i, ocb)
    sch.parallel(sch.fuse(n, co, h))
    sch.vectorize(ocb)
    sch.unroll(w_i)
    sch.unroll(c_i)
    sch.vectorize(cb)
    sch.unroll(wi)
    init = sch.decompose_reduction(conv, ic_o)
    loops = sch.get_loops(init)
    sch.vectorize(loops[-1])
    sch.unroll(loops[-2])
    sch.unroll(loops[-3])


def _schedule_depthwise(sch, names: list[str], vector_registers: int) -> None:
    dw = sch.get_sblock(DEPTHWISE_BLOCK)
    _, _, _, ow, _, _, _ = sch.get_loops(dw)
    reg_w = _largest_divisor(int(sch.get(ow).extent), min(vector_registers - 4, 14))
    if names[-1] == DEPTHWISE_BLOCK:
        sch.cache_write(dw, 0, "global")
        names = [DEPTHWISE_BLOCK, sch.get(sch.get_consumers(dw)[0]).name_hint]
    out = _epilogue(sch, names)
    n, c, h, w, cb = sch.get_loops(out)
    wo, wi = sch.split(w, [None, reg_w])
    sch.compute_at(dw, wo)
    w_i, k, *kernel = _loops_below(sch, dw, wo)
    if not kernel:
        raise ValueError("1x1 depthwise conv: nothing to reduce")
    sch.reorder(*kernel, w_i, k)
    sch.parallel(sch.fuse(n, c, h))
    sch.vectorize(k)
    sch.unroll(w_i)
    sch.vectorize(cb)
    sch.unroll(wi)
    init = sch.decompose_reduction(dw, kernel[0])
    loops = sch.get_loops(init)
    sch.vectorize(loops[-1])
    sch.unroll(loops[-2])


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
    for block, fn in ((CONV_BLOCK, _schedule_conv), (DEPTHWISE_BLOCK, _schedule_depthwise)):
        if block in names:
            names = names[names.index(block):]
            try:
                fn(sch, names, vector_registers)
            except errors:
                return None
            return sch.mod["main"].with_attr(SCHEDULED_ATTR, True)
    return None


def apply_templates(mod, target) -> tuple[object, list[str]]:
    """Schedule every conv PrimFunc a template fits; returns the module and the scheduled function names."""
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
