"""One TVM runtime thread per physical core: TVM's default halves the logical CPU count on x86 (it assumes SMT).

On a machine without SMT (this 2-core box), that default ran every compiled model on one core while PyTorch
and ONNX Runtime used both. Importing slimc sets `TVM_NUM_THREADS` (unless the user did) before TVM's
thread pool exists, which is the only time the pool's size can be chosen.
"""

from __future__ import annotations

import os

_TOPOLOGY = "/sys/devices/system/cpu/cpu{}/topology/{}"


def physical_cores() -> int:
    """Distinct (package, core) pairs among the CPUs this process may run on; the CPU count if unknown."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = set()
    for cpu in cpus:
        try:
            cores.add(tuple(_read(_TOPOLOGY.format(cpu, f)) for f in ("physical_package_id", "core_id")))
        except OSError:
            return len(cpus)
    return len(cores) or 1


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def default_tvm_threads() -> int:
    """Set TVM_NUM_THREADS to the physical core count unless it is set; returns the value in effect."""
    if not os.environ.get("TVM_NUM_THREADS", "").strip().isdigit():
        os.environ["TVM_NUM_THREADS"] = str(physical_cores())
    return int(os.environ["TVM_NUM_THREADS"])
