"""Tensor intrinsics for int8 dot products, registered under slimc's own names.

x86: TVM 0.27's stock `dot_16x4_vnni` fails LLVM 22's verifier (`llvm.x86.avx512.vpdpbusd.512` takes
`<64 x i8>` operands since LLVM 22; the stock implementation passes `<16 x i32>`, see TVM_NOTES.md), so ours
reinterprets the operands as bytes. Both intrinsics are registered without importing
`tvm.s_tir.tensor_intrin`, which builds every CUDA intrinsic first (25-35 s per process here).
"""

from __future__ import annotations

VNNI_16x4 = "slimc_dot_16x4_u8i8i32_vnni"  # AVX-512 VNNI vpdpbusd: 16 int32 lanes += 4 u8 x 16x4 s8
SDOT_4x4 = "slimc_sdot_4x4_i8i8s32"  # AArch64 sdot (+dotprod): 4 int32 lanes += 4 s8 x 4x4 s8
_registered: list[bool] = []
_arm_registered: list[bool] = []


def register_int8_intrinsics() -> None:
    """Idempotently register the x86 VNNI intrinsic our int8 conv template tensorizes with."""
    if _registered:
        return
    from tvm.s_tir import TensorIntrin
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def vnni_desc(a: T.Buffer((4,), "uint8", offset_factor=1), b: T.Buffer((16, 4), "int8", offset_factor=1),
                  c: T.Buffer((16,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(c[0:16], a[0:4], b[0:16, 0:4])
            T.writes(c[0:16])
            for i in T.serial(0, 16):
                for k in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        c[vi] = c[vi] + T.cast(a[vk], "int32") * T.cast(b[vi, vk], "int32")

    @T.prim_func(s_tir=True)
    def vnni_impl(a: T.Buffer((4,), "uint8", offset_factor=1), b: T.Buffer((16, 4), "int8", offset_factor=1),
                  c: T.Buffer((16,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(c[0:16], a[0:4], b[0:16, 0:4])
            T.writes(c[0:16])
            four = T.reinterpret(a.vload([0], "uint8x4"), dtype="int32")
            c[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
                c.vload([0], dtype="int32x16"),
                T.reinterpret(T.broadcast(four, 16), dtype="uint8x64"),
                b.vload([0, 0], dtype="int8x64"),
                dtype="int32x16")

    TensorIntrin.register(VNNI_16x4, vnni_desc, vnni_impl, override=True)
    _registered.append(True)


def register_arm_intrinsics() -> None:
    """Idempotently register the AArch64 sdot intrinsic (templates for +dotprod targets tensorize with it).

    The same description and implementation as TVM's stock `dot_4x4_i8i8s32_sdot` (which works with LLVM 22),
    registered here because importing `tvm.s_tir.tensor_intrin` builds every CUDA intrinsic first: 25-35 s per
    process on this machine, for nothing an AArch64 build uses.
    """
    if _arm_registered:
        return
    from tvm.s_tir import TensorIntrin
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def sdot_desc(a: T.Buffer((4,), "int8", offset_factor=1), b: T.Buffer((4, 4), "int8", offset_factor=1),
                  c: T.Buffer((4,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(c[0:4], a[0:4], b[0:4, 0:4])
            T.writes(c[0:4])
            for i in T.serial(0, 4):
                for k in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        c[vi] = c[vi] + T.cast(a[vk], "int32") * T.cast(b[vi, vk], "int32")

    @T.prim_func(s_tir=True)
    def sdot_impl(a: T.Buffer((4,), "int8", offset_factor=1), b: T.Buffer((4, 4), "int8", offset_factor=1),
                  c: T.Buffer((4,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(c[0:4], a[0:4], b[0:4, 0:4])
            T.writes(c[0:4])
            four = T.reinterpret(a.vload([0], "int8x4"), dtype="int32")
            c[T.ramp(T.int32(0), 1, 4)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.sdot.v4i32.v16i8"),
                c.vload([0], dtype="int32x4"),
                T.reinterpret(T.broadcast(four, 4), dtype="int8x16"),
                b.vload([0, 0], dtype="int8x16"),
                dtype="int32x4")

    TensorIntrin.register(SDOT_4x4, sdot_desc, sdot_impl, override=True)
    _arm_registered.append(True)
