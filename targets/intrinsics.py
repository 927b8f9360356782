"""Tensor intrinsics for int8 dot products, registered under slimc's own names.

x86: TVM 0.27's stock `dot_16x4_vnni` fails LLVM 22's verifier (`llvm.x86.avx512.vpdpbusd.512` takes
`<64 x i8>` operands since LLVM 22; the stock implementation passes `<16 x i32>`, see TVM_NOTES.md), so ours
reinterprets the operands as bytes. AArch64: the same shape as TVM's stock `dot_4x4_i8i8s32_sdot`. Both are
registered without importing `tvm.s_tir.tensor_intrin`, which builds every CUDA intrinsic first (25-35 s per
process here), for nothing a CPU build uses.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DotIntrinsic:
    """`lanes` int32 accumulators += 4 `a_dtype` values (broadcast) x [lanes, 4] int8, as one LLVM intrinsic."""

    name: str
    lanes: int
    a_dtype: str
    llvm: str


VNNI = DotIntrinsic("slimc_dot_16x4_u8i8i32_vnni", 16, "uint8", "llvm.x86.avx512.vpdpbusd.512")  # AVX-512 VNNI
SDOT = DotIntrinsic("slimc_sdot_4x4_i8i8s32", 4, "int8", "llvm.aarch64.neon.sdot.v4i32.v16i8")  # AArch64 +dotprod
_registered: set[str] = set()


def _prim_funcs(d: DotIntrinsic):
    """The (description, implementation) pair TensorIntrin.register takes for `d`."""
    from tvm.script import tirx as T

    lanes, a_dtype, bytes_ = d.lanes, d.a_dtype, d.lanes * 4

    @T.prim_func(s_tir=True)
    def desc(a: T.Buffer((4,), a_dtype, offset_factor=1), b: T.Buffer((lanes, 4), "int8", offset_factor=1),
             c: T.Buffer((lanes,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(c[0:lanes], a[0:4], b[0:lanes, 0:4])
            T.writes(c[0:lanes])
            for i in T.serial(0, lanes):
                for k in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        c[vi] = c[vi] + T.cast(a[vk], "int32") * T.cast(b[vi, vk], "int32")

    @T.prim_func(s_tir=True)
    def impl(a: T.Buffer((4,), a_dtype, offset_factor=1), b: T.Buffer((lanes, 4), "int8", offset_factor=1),
             c: T.Buffer((lanes,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(c[0:lanes], a[0:4], b[0:lanes, 0:4])
            T.writes(c[0:lanes])
            four = T.reinterpret(a.vload([0], f"{a_dtype}x4"), dtype="int32")
            c[T.ramp(T.int32(0), 1, lanes)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(d.llvm),
                c.vload([0], dtype=f"int32x{lanes}"),
                T.reinterpret(T.broadcast(four, lanes), dtype=f"{a_dtype}x{bytes_}"),
                b.vload([0, 0], dtype=f"int8x{bytes_}"),
                dtype=f"int32x{lanes}")

    return desc, impl


def register(d: DotIntrinsic) -> None:
    """Idempotently register `d` under its name (the int8 conv templates tensorize with it)."""
    if d.name in _registered:
        return
    from tvm.s_tir import TensorIntrin

    TensorIntrin.register(d.name, *_prim_funcs(d), override=True)
    _registered.add(d.name)
