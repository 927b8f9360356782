"""Lower, tune, build and package: the graph becomes a deployable artifact directory, written atomically."""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

from slimc.errors import SlimcError
from slimc.ir import Graph
from slimc.runtime import LIB_NAME, META_NAME
from slimc.targets.kernel_map import KernelNodes, capturing_pipeline
from slimc.targets.lower import LayoutPlan, lower
from slimc.targets.schedules import apply_templates
from slimc.targets.tune import TuneSummary, apply_database, prepare, tune

CROSS_COMPILERS = {"aarch64": "aarch64-linux-gnu-g++"}


class BuildError(SlimcError):
    """TVM could not build or export the module."""


@dataclass(frozen=True)
class BuildResult:
    """A built module and how it was made."""

    executable: object
    tuning: TuneSummary
    build_seconds: float
    kernels: tuple[KernelNodes, ...]  # the IR nodes of each kernel call, in call order; () when unknown


def build(graph: Graph, target, *, trials: int = 0, db_path: str | None = None, tune_ops: list[str] | None = None,
          plan: LayoutPlan | None = None, log: Callable[[str], None] = print, progress: bool = True,
          templates: bool = True) -> BuildResult:
    """Lower the graph, schedule convs with templates, tune what the database lacks, apply it and build."""
    import tvm

    t0 = time.perf_counter()
    mod = prepare(lower(graph, target, plan), target.tvm())
    if templates:
        mod, scheduled = apply_templates(mod, target)
    db, summary = tune(mod, target, db_path, trials, tune_ops, log=log, show_progress=progress)
    mod = apply_database(mod, target, db)
    kernels: list[KernelNodes] = []
    try:
        ex = tvm.compile(mod, target.tvm(), relax_pipeline=capturing_pipeline(kernels))
    except Exception as e:  # TVM raises its own error types with long C++ traces
        raise BuildError(f"TVM failed to build {graph.name} for {target.describe()}: "
                         f"{str(e).strip().splitlines()[-1][:300]}") from e
    return BuildResult(ex, summary, time.perf_counter() - t0 - summary.seconds, tuple(kernels))


def host_arch() -> str:
    return platform.machine()


def export_library(executable, path: str, target) -> None:
    """Write the shared library, cross-compiling when the target is not this machine's architecture."""
    fcompile = None
    if target.arch != host_arch():
        from tvm.support import cc

        compiler = CROSS_COMPILERS.get(target.arch)
        if compiler is None or shutil.which(compiler) is None:
            raise BuildError(f"building for {target.triple} needs the cross compiler {compiler} on PATH; install "
                             "it with `make cross-tools` (Debian: g++-aarch64-linux-gnu)")
        fcompile = cc.cross_compiler(compiler)
    try:
        executable.export_library(path, fcompile=fcompile)
    except Exception as e:
        raise BuildError(f"exporting the library for {target.triple} failed: {str(e).strip().splitlines()[-1][:300]}") from e


def write_artifact(out_dir: str, executable, target, meta: dict, report_md: str,
                   extra: Callable[[str], None] | None = None) -> str:
    """Write model.so, meta.json, report.md (and `extra(tmpdir)`'s files) into a temp dir, then rename it into place."""
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
        os.chmod(tmp, 0o755)
    except OSError as e:
        raise BuildError(f"cannot write the artifact under {parent}: {e.strerror}; choose another -o") from None
    try:
        export_library(executable, os.path.join(tmp, LIB_NAME), target)
        with open(os.path.join(tmp, META_NAME), "w") as f:
            json.dump(meta, f, indent=2)
        with open(os.path.join(tmp, "report.md"), "w") as f:
            f.write(report_md)
        if extra is not None:
            extra(tmp)
        if os.path.exists(out_dir):
            if not os.path.isfile(os.path.join(out_dir, META_NAME)) and os.listdir(out_dir):
                raise BuildError(f"{out_dir} exists and is not a slimc artifact; choose another -o")
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=parent)
            os.rename(out_dir, os.path.join(old, "a"))
            os.rename(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out_dir)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
