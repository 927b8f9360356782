"""Latency measurement: locally through the VM's time evaluator, or on a board through TVM's RPC tracker."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from slimc.errors import SlimcError
from slimc.threads import physical_cores


class MeasureError(SlimcError):
    """Measurement could not run (no tracker, no free board, artifact mismatch)."""


@dataclass(frozen=True)
class Latency:
    """Per-inference latency statistics over `repeats` timed runs, each averaging `number` calls."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    mean_ms: float
    repeats: int
    number: int
    warmup: int
    threads: int | None  # None: the remote runtime's default, not known here
    where: str

    def to_json(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        threads = f"{self.threads} threads" if self.threads else "remote default threads"
        return (f"{self.median_ms:.3f} ms median (p10 {self.p10_ms:.3f}, p90 {self.p90_ms:.3f}; "
                f"{self.repeats}x{self.number} runs, {threads}, {self.where})")


def summarize(seconds: Sequence[float], number: int, warmup: int, threads: int | None, where: str) -> Latency:
    ms = np.asarray(seconds, np.float64) * 1e3
    return Latency(float(np.median(ms)), float(np.percentile(ms, 10)), float(np.percentile(ms, 90)), float(ms.mean()),
                   len(ms), number, warmup, threads, where)


def time_callable(fn: Callable[[], object], *, number: int = 5, repeat: int = 30, warmup: int = 10,
                  threads: int | None = None, where: str = "local") -> Latency:
    """Latency of a Python callable (baselines such as PyTorch eager or ONNX Runtime), timed like the VM.

    `threads` defaults to the physical core count, which PyTorch and ONNX Runtime use unless told otherwise.
    """
    for _ in range(warmup):
        fn()
    secs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        secs.append((time.perf_counter() - t0) / number)
    return summarize(secs, number, warmup, threads if threads is not None else physical_cores(), where)


def host_threads() -> int:
    """Threads the local TVM runtime runs kernels on (its pool's size, not the CPU count)."""
    import tvm

    return int(tvm.runtime.num_threads())


def _time_vm(vm, dev, inputs, number: int, repeat: int, warmup: int) -> list[float]:
    vm.set_input("main", *inputs)
    for _ in range(warmup):
        vm.invoke_stateful("main")
    timer = vm.time_evaluator("invoke_stateful", dev, number=number, repeat=repeat)
    return list(timer("main").results)


def measure_local(model, inputs: Sequence[np.ndarray], *, number: int = 10, repeat: int = 30,
                  warmup: int = 10) -> Latency:
    """Time a loaded artifact (slimc.runtime.CompiledModel) on this machine."""
    tensors = model._tensors(inputs)
    secs = _time_vm(model.vm, model.device, tensors, number, repeat, warmup)
    return summarize(secs, number, warmup, host_threads(), "local")


def measure_rpc(artifact_dir: str, inputs: Sequence[np.ndarray], tracker: str, key: str, *, number: int = 10,
                repeat: int = 30, warmup: int = 10, timeout: int = 60) -> Latency:
    """Upload the artifact's library to a board reserved through an RPC tracker and time it there."""
    import tvm
    from tvm import relax, rpc

    host, _, port = tracker.rpartition(":")
    if not host or not port.isdigit():
        raise MeasureError(f"--rpc {tracker!r} must be HOST:PORT of a TVM RPC tracker")
    try:
        trk = rpc.connect_tracker(host, int(port))
        keys = sorted(trk.summary().get("queue_info", {}))
    except Exception as e:
        raise MeasureError(f"cannot reach the RPC tracker at {tracker}: {str(e).strip().splitlines()[-1][:200]}; "
                           "check HOST:PORT and that `python -m tvm.exec.rpc_tracker` runs there") from None
    if key not in keys:  # the tracker would queue the request forever
        raise MeasureError(f"no device with key {key!r} is registered at the RPC tracker {tracker}; registered "
                           f"keys: {', '.join(keys) or '(none)'}")
    try:
        remote = trk.request(key, priority=0, session_timeout=timeout)
    except Exception as e:
        raise MeasureError(f"cannot get a device with key {key!r} from the RPC tracker at {tracker}: "
                           f"{str(e).strip().splitlines()[-1][:200]}; check `python -m tvm.exec.query_rpc_tracker`") from None
    lib_path = os.path.join(artifact_dir, "model.so")
    remote.upload(lib_path)
    lib = remote.load_module("model.so")
    dev = remote.cpu()
    vm = relax.VirtualMachine(lib, dev)
    tensors = [tvm.runtime.tensor(np.ascontiguousarray(x), dev) for x in inputs]
    secs = _time_vm(vm, dev, tensors, number, repeat, warmup)
    return summarize(secs, number, warmup, None, f"rpc {tracker} key={key}")
