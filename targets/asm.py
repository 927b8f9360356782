"""Proof of integer kernels in machine code: count int8 dot-product instructions in a built library."""

from __future__ import annotations

import re
import shutil
import subprocess

from slimc.errors import SlimcError

#: the int8 dot-product mnemonics per architecture
DOT_INSTRUCTIONS = {"x86_64": ("vpdpbusd", "vpdpbusds", "vpmaddubsw"), "aarch64": ("sdot", "udot", "usdot", "smmla")}
OBJDUMPS = {"x86_64": ("objdump",), "aarch64": ("aarch64-linux-gnu-objdump", "llvm-objdump", "objdump")}


def disassemble(lib: str, arch: str) -> str:
    """The library's disassembly with a binutils objdump that knows the architecture."""
    for tool in OBJDUMPS.get(arch, ("objdump",)):
        if shutil.which(tool) is None:
            continue
        done = subprocess.run([tool, "-d", lib], capture_output=True, text=True)
        if done.returncode == 0 and done.stdout:
            return done.stdout
    raise SlimcError(f"cannot disassemble {lib} for {arch}: none of {', '.join(OBJDUMPS.get(arch, ()))} works here; "
                     "install binutils for that architecture (make cross-tools)")


def count_int8_dot(lib: str, target) -> dict[str, int]:
    """{mnemonic: occurrences} of the int8 dot-product instructions of the target's architecture."""
    text = disassemble(lib, target.arch)
    counts = {}
    for m in DOT_INSTRUCTIONS.get(target.arch, ()):
        counts[m] = len(re.findall(rf"\s{m}\s", text))
    return counts
