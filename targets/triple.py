"""Target description: an LLVM triple plus CPU and features, resolved through TVM's LLVM into ISA facts."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import lru_cache

from slimc.errors import SlimcError


class TargetError(SlimcError):
    """An unknown triple, CPU or feature."""


ARCHES = {"x86_64": "x86_64-linux-gnu", "aarch64": "aarch64-linux-gnu"}
_ARCH_ALIASES = {"x86_64": "x86_64", "x86-64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}


@dataclass(frozen=True)
class Preset:
    """A named target for `--target NAME`."""

    name: str
    triple: str
    mcpu: str | None
    mattr: tuple[str, ...]
    description: str


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("native", "native", None, (), "this machine: host triple, CPU and features detected by LLVM"),
    Preset("x86-avx2", "x86_64-linux-gnu", "haswell", (), "generic AVX2 x86-64 (Haswell and later); no int8 dot product"),
    Preset("x86-avx512", "x86_64-linux-gnu", "skylake-avx512", (), "AVX-512 without VNNI (Skylake-SP): 7-bit activations for int8"),
    Preset("x86-cascadelake", "x86_64-linux-gnu", "cascadelake", (), "AVX-512 VNNI (Cascade Lake Xeon)"),
    Preset("x86-znver4", "x86_64-linux-gnu", "znver4", (), "AVX-512 VNNI (AMD Zen 4 EPYC/Ryzen)"),
    Preset("arm-cortex-a55", "aarch64-linux-gnu", "cortex-a55", ("+neon", "+dotprod"), "in-order Armv8.2 little core, dotprod"),
    Preset("arm-cortex-a72", "aarch64-linux-gnu", "cortex-a72", ("+neon",), "Armv8.0 (Raspberry Pi 4): NEON, no dotprod"),
    Preset("arm-cortex-a76", "aarch64-linux-gnu", "cortex-a76", ("+neon", "+dotprod"), "Armv8.2 big core (Raspberry Pi 5), dotprod"),
    Preset("arm-neoverse-n1", "aarch64-linux-gnu", "neoverse-n1", ("+neon", "+dotprod"), "Armv8.2 server core (Graviton2, Ampere Altra)"),
)}


@dataclass(frozen=True)
class Target:
    """A resolved target: triple, CPU, explicit features, and the ISA features LLVM reports for them."""

    triple: str
    mcpu: str
    mattr: tuple[str, ...] = ()
    features: frozenset[str] = field(default_factory=frozenset)
    is_host: bool = False
    num_cores: int | None = None
    preset: str | None = None

    @property
    def arch(self) -> str:
        return self.triple.split("-")[0]

    def has(self, feature: str) -> bool:
        return feature in self.features

    @property
    def int8_dot(self) -> str | None:
        """The int8 dot-product instruction family quantized kernels can use, if any."""
        if self.arch == "x86_64":
            if self.has("amx-int8"):
                return "amx"
            if self.has("avx512vnni"):
                return "vnni"
            if self.has("avx512bw"):
                return "avx512"  # vpmaddubsw: saturates int16, needs 7-bit activations
            return None
        if self.has("i8mm"):
            return "i8mm"
        return "dotprod" if self.has("dotprod") else None

    @property
    def vector_bits(self) -> int:
        if self.arch == "x86_64":
            return 512 if self.has("avx512f") else 256 if self.has("avx2") else 128
        return 128

    @property
    def channel_block(self) -> int:
        """Channels per vector of fp32 lanes: the NCHW[x]c block and pruning's round_to default."""
        return self.vector_bits // 32

    def isa_summary(self) -> list[str]:
        keys = ("sse4.2", "avx2", "fma", "avx512f", "avx512bw", "avx512vnni", "avxvnni", "amx-int8",
                "neon", "dotprod", "i8mm", "fullfp16", "sve")
        return [k for k in keys if k in self.features]

    def tvm_dict(self) -> dict:
        """The dict TVM 0.27 takes: Target({"kind": "llvm", "mtriple": ..., "mcpu": ..., "mattr": [...]})."""
        d: dict = {"kind": "llvm", "mtriple": self.triple, "mcpu": self.mcpu}
        if self.mattr:
            d["mattr"] = list(self.mattr)
        if self.num_cores:
            d["num-cores"] = self.num_cores
        return d

    def tvm(self):
        import tvm

        return tvm.target.Target(self.tvm_dict())

    def describe(self) -> str:
        extra = f" {','.join(self.mattr)}" if self.mattr else ""
        return f"{self.triple} -mcpu={self.mcpu}{extra} [{' '.join(self.isa_summary())}]"


def _normalize_triple(triple: str) -> str:
    parts = triple.strip().lower().split("-")
    arch = _ARCH_ALIASES.get(parts[0])
    if arch is None or (len(parts) > 1 and "linux" not in parts):
        raise TargetError(f"unsupported target triple {triple!r}: slimc targets Linux on x86-64 or AArch64; use "
                          f"{', '.join(ARCHES.values())} or a preset ({', '.join(PRESETS)})")
    return ARCHES[arch]


@lru_cache(maxsize=None)
def _known_features(triple: str) -> frozenset[str]:
    """Every feature name LLVM uses for some CPU of this triple (to reject typos in --mattr)."""
    import tvm
    from tvm.target import codegen

    base = tvm.target.Target({"kind": "llvm", "mtriple": triple})
    names: set[str] = set()
    for cpu in codegen.llvm_get_cpu_archlist(base):
        names |= set(codegen.llvm_get_cpu_features(tvm.target.Target({"kind": "llvm", "mtriple": triple, "mcpu": str(cpu)})))
    return frozenset(names)


def _cpus(triple: str) -> list[str]:
    import tvm
    from tvm.target import codegen

    return sorted(str(c) for c in codegen.llvm_get_cpu_archlist(tvm.target.Target({"kind": "llvm", "mtriple": triple})))


def resolve(target: str, mcpu: str | None = None, mattr: str | list[str] | tuple[str, ...] | None = None,
            num_cores: int | None = None) -> Target:
    """Turn `--target/--mcpu/--mattr` into a Target, validating names against LLVM's tables."""
    import tvm
    from tvm.target import codegen

    preset = PRESETS.get(target)
    attrs = tuple(a.strip() for a in (mattr.split(",") if isinstance(mattr, str) else (mattr or ())) if a.strip())
    if preset is not None and preset.name != "native":
        triple, cpu, attrs = preset.triple, mcpu or preset.mcpu, preset.mattr + attrs
    elif target == "native" or preset is not None:
        triple = _normalize_triple(str(codegen.llvm_get_system_triple()).replace("-conda-", "-"))
        cpu = mcpu or str(codegen.llvm_get_system_cpu())
    else:
        triple, cpu = _normalize_triple(target), mcpu or ("generic" if target.startswith(("aarch64", "arm64")) else "x86-64")
    for a in attrs:
        if a[:1] not in "+-" or len(a) < 2:
            raise TargetError(f"--mattr entry {a!r} must look like +feature or -feature (e.g. +neon,+dotprod)")
    if cpu not in ("generic", "x86-64") and not codegen.llvm_is_valid_cpu(cpu, triple):
        cpus = _cpus(triple)
        raise TargetError(f"LLVM does not know CPU {cpu!r} for {triple}; known CPUs include: {', '.join(cpus[:60])}")
    known = _known_features(triple)
    unknown = [a for a in attrs if a[1:] not in known]
    if unknown:
        raise TargetError(f"unknown feature(s) {', '.join(unknown)} for {triple}; e.g. "
                          f"{', '.join(sorted(f for f in known if not f.startswith(('tune', 'fast', 'slow')))[:50])}")
    is_host = preset is not None and preset.name == "native"
    if is_host and num_cores is None:
        num_cores = len(os.sched_getaffinity(0))
    d = {"kind": "llvm", "mtriple": triple, "mcpu": cpu, **({"mattr": list(attrs)} if attrs else {})}
    feats = frozenset(str(f) for f in codegen.llvm_get_cpu_features(tvm.target.Target(d)))
    return Target(triple, cpu, attrs, feats, is_host, num_cores, preset.name if preset else None)
