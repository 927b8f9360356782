"""`slimc verify`: rerun an artifact (here or under qemu-aarch64) and compare it with the IR interpreter's outputs."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from slimc.errors import SlimcError

FP32_TOLERANCE = 1e-4  # max abs error over the reference's value range


class VerifyError(SlimcError):
    """The artifact's outputs do not match the IR interpreter's, or the artifact cannot be checked."""


class MismatchError(VerifyError):
    """The artifact ran but its outputs differ from the reference beyond the tolerance."""

    exit_code = 1


@dataclass(frozen=True)
class OutputCheck:
    """Error of one output: max abs error, that over the reference's range, SQNR."""

    name: str
    shape: tuple[int, ...]
    max_abs: float
    max_rel: float
    sqnr_db: float


@dataclass
class VerifyResult:
    """What `slimc verify` ran, where, and how far the artifact is from the reference."""

    path: str
    arch: str
    where: str  # "host" or "qemu"
    tolerance: float
    outputs: list[OutputCheck]
    max_rel: float
    sqnr_db: float
    stored_max_rel: float  # recomputed reference vs the outputs saved in check.npz at compile time
    lib_vs_stored_rel: float  # the artifact's outputs vs those saved in check.npz
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.max_rel <= self.tolerance and self.stored_max_rel <= self.tolerance

    def lines(self) -> list[str]:
        where = ("this machine (slimc.runtime)" if self.where == "host"
                 else "qemu-aarch64 in the arm64 rootfs (TVM runtime only)")
        out = [f"verify {self.path}: {self.arch} artifact run on {where}",
               "reference: IR interpreter on model.slimc with the inputs in check.npz"]
        for o in self.outputs:
            out.append(f"  {o.name} {list(o.shape)}: max abs error {o.max_abs:.2e}, {o.max_rel:.2e} of range, "
                       f"SQNR {o.sqnr_db:.1f} dB")
        out.extend(self.notes)
        verdict = "OK" if self.ok else "MISMATCH"
        out.append(f"{verdict}: max error {self.max_rel:.2e} of output range (tolerance {self.tolerance:.0e}), "
                   f"SQNR {self.sqnr_db:.1f} dB")
        return out


def _fidelity(outputs, reference):
    from slimc.pass_manager import compare

    return compare(outputs, reference)


def _load_check(path: str, meta: dict) -> tuple[list[np.ndarray], list[np.ndarray]]:
    from slimc.compile import CHECK_NAME

    check_path = os.path.join(path, CHECK_NAME)
    try:
        with np.load(check_path) as z:
            n_in, n_out = len(meta["inputs"]), len(meta["outputs"])
            inputs = [z[f"input{i}"] for i in range(n_in)]
            stored = [z[f"output{i}"] for i in range(n_out)]
    except (OSError, ValueError, KeyError) as e:
        raise VerifyError(f"cannot read the check inputs {check_path} ({e}); the artifact is incomplete: rebuild it "
                          "with `slimc compile`") from None
    for x, spec in zip(inputs, meta["inputs"]):
        if list(x.shape) != list(spec["shape"]) or str(x.dtype) != spec["dtype"]:
            raise VerifyError(f"{check_path} holds input {spec['name']} as {x.dtype}{list(x.shape)} but the artifact "
                              f"takes {spec['dtype']}{spec['shape']}; the directory mixes two builds: rebuild it")
    return inputs, stored


def _reference(path: str, inputs: list[np.ndarray]) -> list[np.ndarray]:
    """The IR interpreter's outputs for the saved final graph (what the artifact was built from)."""
    from slimc import interpreter, ir
    from slimc.compile import GRAPH_NAME

    graph_path = os.path.join(path, GRAPH_NAME)
    if not os.path.isfile(graph_path):
        raise VerifyError(f"{path} has no {GRAPH_NAME} (the graph the artifact was built from), so there is nothing "
                          "to verify against; rebuild it with `slimc compile`")
    graph = ir.load(graph_path)
    return interpreter.run(graph, inputs)


def verify(path: str, *, qemu: bool = False, tolerance: float = FP32_TOLERANCE,
           log: Callable[[str], None] | None = None) -> VerifyResult:
    """Run the artifact on check.npz's inputs (natively or under qemu) and compare with the recomputed reference."""
    from slimc import runtime
    from slimc.targets.build import host_arch

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    path = os.path.abspath(path)
    meta = runtime.read_meta(path)
    arch = meta.get("target", {}).get("triple", "").split("-")[0] or "unknown"
    host = host_arch()
    notes: list[str] = []
    if qemu and arch != "aarch64":
        raise VerifyError(f"--qemu runs AArch64 artifacts, but {path} was built for {arch}; "
                          + ("verify it here without --qemu" if arch == host else f"run it on a {arch} machine"))
    if not qemu and arch != host:
        hint = "add --qemu to run it under qemu-aarch64 here" if arch == "aarch64" else f"run it on a {arch} machine"
        raise VerifyError(f"{path} was built for {arch} and this machine is {host}; {hint}")
    inputs, stored = _load_check(path, meta)
    reference = _reference(path, inputs)
    lib = os.path.join(path, runtime.LIB_NAME)
    if not os.path.isfile(lib):
        raise VerifyError(f"{path} has no {runtime.LIB_NAME}; the artifact is incomplete: rebuild it")
    if qemu and arch == host:
        notes.append("note: --qemu ignored: the artifact is for this machine's architecture, run natively")
        qemu = False
    if qemu:
        from slimc.targets import qemu as qemu_mod

        run = qemu_mod.run(lib, inputs, log=log)
        outputs = run.outputs
        notes.append(f"qemu-aarch64 wall time {run.wall_seconds:.1f} s (TVM import {run.import_seconds:.1f} s, "
                     f"emulated inference {run.run_seconds:.2f} s; guest Python {run.guest_python}, "
                     f"TVM {run.guest_tvm}): "
                     "emulation speed, NOT latency; measure latency on a real board with `slimc measure --rpc`")
    else:
        outputs = runtime.load(path).run(*inputs)
    if len(outputs) != len(reference) or any(o.shape != r.shape for o, r in zip(outputs, reference)):
        raise MismatchError(f"{path}/{runtime.LIB_NAME} returned {len(outputs)} output(s) shaped "
                            f"{[list(o.shape) for o in outputs]}, but model.slimc gives "
                            f"{[list(r.shape) for r in reference]}; the library and model.slimc come from different "
                            "builds: rebuild the artifact")
    names = [o["name"] for o in meta["outputs"]]
    checks = []
    for i, (o, r) in enumerate(zip(outputs, reference)):
        f = _fidelity([o], [r])
        checks.append(OutputCheck(names[i] if i < len(names) else f"output{i}", tuple(r.shape), f.max_abs, f.max_rel,
                                  f.sqnr_db))
    total = _fidelity(outputs, reference)
    same_shapes = [s.shape for s in stored] == [r.shape for r in reference]
    stored_rel = _fidelity(stored, reference).max_rel if same_shapes else float("inf")
    lib_stored_rel = _fidelity(outputs, stored).max_rel if same_shapes else float("inf")
    if stored_rel > tolerance:
        notes.append(f"warning: model.slimc now computes outputs {stored_rel:.2e} (of range) away from those saved "
                     "in check.npz at compile time")
    return VerifyResult(path, arch, "qemu" if qemu else "host", tolerance, checks, total.max_rel, total.sqnr_db,
                        stored_rel, lib_stored_rel, notes)


def mismatch_message(r: VerifyResult) -> str:
    """One paragraph saying what differs and what to do about it."""
    if r.max_rel > r.tolerance:
        worst = max(r.outputs, key=lambda o: o.max_rel)
        if r.lib_vs_stored_rel <= r.tolerance:
            cause = ("model.so still agrees with the outputs saved in check.npz, so model.slimc was changed after "
                     "`slimc compile` (or comes from another build): rebuild the artifact")
        elif r.stored_max_rel <= r.tolerance:
            cause = ("model.slimc still agrees with the outputs saved in check.npz, so model.so was replaced or "
                     "miscompiled: rebuild the artifact, and if it fails again report it with the artifact directory")
        else:
            cause = ("model.so, model.slimc and check.npz all disagree: the directory mixes several builds, "
                     "rebuild it with `slimc compile`")
        return (f"{r.path}: the compiled model's {worst.name} differs from the IR interpreter's by up to "
                f"{worst.max_rel:.2e} of the output range (tolerance {r.tolerance:.0e}, SQNR {r.sqnr_db:.1f} dB) "
                f"on the inputs in check.npz; {cause}")
    return (f"{r.path}: model.so matches model.slimc, but model.slimc's outputs differ from the ones saved in "
            f"check.npz at compile time by {r.stored_max_rel:.2e} of the output range (tolerance {r.tolerance:.0e}); "
            "the directory was edited after `slimc compile` or mixes two builds: rebuild it")
