"""Runs inside the arm64 rootfs under qemu-aarch64: only numpy and the TVM runtime are there, so no slimc imports."""

from __future__ import annotations

import json
import sys
import time

import numpy as np


def main(lib_path: str, inputs_path: str, outputs_path: str) -> int:
    t0 = time.perf_counter()
    import tvm
    from tvm.runtime.vm import VirtualMachine  # not tvm.relax: that needs the compiler library

    t_import = time.perf_counter()
    data = np.load(inputs_path)
    names = sorted((k for k in data.files if k.startswith("input")), key=lambda k: int(k[5:]))
    dev = tvm.cpu()
    vm = VirtualMachine(tvm.runtime.load_module(lib_path), dev)
    args = [tvm.runtime.tensor(np.ascontiguousarray(data[n]), dev) for n in names]
    t_load = time.perf_counter()
    result = vm["main"](*args)
    items = [result] if hasattr(result, "numpy") else list(result)
    outputs = {f"output{i}": r.numpy() for i, r in enumerate(items)}
    t_run = time.perf_counter()
    np.savez(outputs_path, **outputs)
    print(json.dumps({"import_s": t_import - t0, "load_s": t_load - t_import, "run_s": t_run - t_load,
                      "tvm": tvm.__version__, "python": sys.version.split()[0]}))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
