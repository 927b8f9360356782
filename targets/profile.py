"""Per-kernel profile of a built artifact: which TVM kernels the model runs, and where its time goes.

One inference runs with a VM instrument that records every kernel call (its symbol and a copy of its arguments);
each call is then timed on its own through the library's time evaluator, like TVM's debug executor did. The sum
of the kernels is compared with the end-to-end latency: the difference is the VM's own work (allocation, calls),
the hand-offs to the worker threads between kernels and the cache effects of running kernels back to back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from slimc.targets.measure import Latency, MeasureError, measure_local
from slimc.targets.schedules import CONV_DOT_BLOCK

#: (kind, substring of the kernel symbol), first match wins; symbols are TVM's fused-function names
KINDS: tuple[tuple[str, str], ...] = (
    ("int8 conv (VNNI)", "conv2d_NCHWc_int8"),
    ("int8 conv (dot)", CONV_DOT_BLOCK),
    ("depthwise conv", "depthwise_conv2d"),
    ("conv", "conv2d"),
    ("dense", "matmul"),
    ("dense", "dense"),
    ("pool", "pool"),
    ("pool", "mean"),
    ("byte planes", "byte_planes"),
)
#: kinds of kernels that only move data, when the symbol starts with them (a fused name may end in one)
MOVES: tuple[tuple[str, str], ...] = (("layout transform", "te_layout_transform"),
                                      ("layout transform", "layout_transform"), ("pad", "pad"))


def kernel_kind(symbol: str) -> str:
    """A coarse kind of a kernel from its symbol: the op it computes, or elementwise (quantize, add, requantize)."""
    for kind, key in KINDS:
        if key in symbol:
            return kind
    bare = symbol.removeprefix("fused_")
    for kind, key in MOVES:
        if bare.startswith(key):
            return kind
    return "elementwise"


@dataclass(frozen=True)
class KernelTime:
    """One kernel call of an inference, in call order, timed alone (median over the timed repeats)."""

    index: int
    symbol: str
    kind: str
    output: str  # shape and dtype of its last tensor argument (TVM kernels write their output there)
    median_us: float
    nodes: tuple[str, ...] = ()  # the IR nodes it computes (the artifact's kernel map); () when unknown


@dataclass(frozen=True)
class Profile:
    """Every kernel call of one inference and the end-to-end latency measured in the same process."""

    kernels: tuple[KernelTime, ...]
    end_to_end: Latency
    runtime_calls: int  # VM builtins (allocation, shape checks), not timed one by one
    mapped: bool = False  # whether the kernels carry their IR nodes

    @property
    def kernel_ms(self) -> float:
        return sum(k.median_us for k in self.kernels) / 1e3

    def by_kind(self) -> list[tuple[str, int, float]]:
        """(kind, kernel calls, total ms), slowest kind first."""
        return _totals((k.kind, k) for k in self.kernels)

    def by_node(self) -> list[tuple[str, int, float]]:
        """(IR node, kernel calls, total ms), slowest first; [] without a kernel map.

        Each kernel counts for the first node it computes (in graph order), the one whose output it writes: the
        epilogues fused into it from later nodes count there too, and the pads and layout transforms a node's
        lowering adds for its input count for that node.
        """
        return _totals((k.nodes[0], k) for k in self.kernels if k.nodes)

    def to_json(self) -> dict:
        return {"end_to_end": self.end_to_end.to_json(), "kernel_ms": self.kernel_ms,
                "runtime_calls": self.runtime_calls, "mapped": self.mapped,
                "by_kind": [{"kind": k, "calls": n, "ms": ms} for k, n, ms in self.by_kind()],
                "by_node": [{"node": k, "calls": n, "ms": ms} for k, n, ms in self.by_node()],
                "kernels": [asdict(k) for k in self.kernels]}

    def lines(self, top: int = 15) -> list[str]:
        from slimc.report import table

        total, e2e = self.kernel_ms, self.end_to_end.median_ms
        out = [f"{len(self.kernels)} kernel calls, {total:.3f} ms timed one by one; end to end {e2e:.3f} ms median "
               f"({self.end_to_end.threads} threads; the difference, {e2e - total:+.3f} ms, is the VM's "
               f"{self.runtime_calls} runtime calls, the hand-offs between kernels and their effect on each other's "
               "caches)", ""]
        share = (lambda ms: f"{100 * ms / total:.1f} %") if total > 0 else (lambda ms: "-")
        out.append(table(["kind", "calls", "ms", "share"],
                         [[k, str(n), f"{ms:.3f}", share(ms)] for k, n, ms in self.by_kind()],
                         right=[False, True, True, True]))
        slow = sorted(self.kernels, key=lambda k: -k.median_us)[:top]
        out += ["", f"slowest {len(slow)} kernel calls (# is the call order; nodes: the IR nodes each computes):",
                table(["#", "nodes", "kernel", "kind", "output", "us", "share"],
                      [[str(k.index), _short(", ".join(k.nodes) or "-", 36), _short(k.symbol), k.kind, k.output,
                        f"{k.median_us:.1f}", share(k.median_us / 1e3)] for k in slow],
                      right=[True, False, False, False, False, True, True])]
        if not self.mapped:
            out.append("(no kernel-to-node map: the artifact was built before slimc recorded one, or its kernels do "
                       "not match it; rebuild it with `slimc compile` to see the nodes)")
            return out
        nodes = self.by_node()[:top]
        out += ["", f"slowest {len(nodes)} IR nodes (each kernel counted for the first node it computes, with the "
                    "pads and layout transforms of its input):",
                table(["node", "kernels", "ms", "share"],
                      [[node, str(n), f"{ms:.3f}", share(ms)] for node, n, ms in nodes],
                      right=[False, True, True, True])]
        return out


def _totals(keyed) -> list[tuple[str, int, float]]:
    """(key, kernel calls, total ms) over (key, KernelTime) pairs, the largest total first."""
    acc: dict[str, list[float]] = {}
    for key, k in keyed:
        acc.setdefault(key, []).append(k.median_us)
    return sorted(((key, len(v), sum(v) / 1e3) for key, v in acc.items()), key=lambda r: -r[2])


def _short(text: str, width: int = 40) -> str:
    return text if len(text) <= width else text[:width - 3] + "..."


def _describe(t) -> str:
    return f"{'x'.join(str(int(d)) for d in t.shape)} {t.dtype}"


def _kernel_module(lib, symbol: str):
    """The module among `lib` and its imports that defines `symbol` (the compiled kernels live in an import)."""
    for m in (lib, *lib.imports):
        if m.implements_function(symbol):
            return m
    return None


def record_calls(vm, device, tensors: Sequence) -> tuple[list[tuple[str, list]], int]:
    """Run `main` once with a VM instrument: (symbol, copied arguments) of every kernel call, and the builtin count."""
    import tvm

    calls: list[tuple[str, list]] = []
    builtins = 0

    def copy(a):
        return tvm.runtime.tensor(a.numpy(), device) if isinstance(a, tvm.runtime.Tensor) else a

    def instrument(func, symbol, before_run, ret_value, *args):
        nonlocal builtins
        if before_run:
            if str(symbol).startswith("vm.builtin."):
                builtins += 1
            else:
                calls.append((str(symbol), [copy(a) for a in args]))
        return 0  # VMInstrumentReturnKind.NO_OP: run the call as usual

    vm.set_instrument(instrument)
    try:
        vm["main"](*tensors)
    finally:
        vm.set_instrument(None)
    return calls, builtins


def profile_local(model, inputs: Sequence[np.ndarray], *, number: int = 10, repeat: int = 30,
                  warmup: int = 10) -> Profile:
    """Profile a loaded artifact (slimc.runtime.CompiledModel) on this machine."""
    import tvm

    e2e = measure_local(model, inputs, number=number, repeat=repeat, warmup=warmup)  # before any instrument is set
    calls, builtins = record_calls(model.vm, model.device, model._tensors(inputs))
    planned = model.meta.get("kernels") or []
    mapped = [k["symbol"] for k in planned] == [symbol for symbol, _ in calls]
    kernels = []
    for i, (symbol, args) in enumerate(calls):
        mod = _kernel_module(model.lib, symbol)
        if mod is None:
            raise MeasureError(f"kernel {symbol} (call {i}) is not in {model.path}/model.so; rebuild the artifact "
                               "with `slimc compile`")
        timer = mod.time_evaluator(symbol, model.device, number=number, repeat=max(1, repeat // 3))
        for _ in range(max(1, warmup // 5)):
            mod[symbol](*args)
        tensors = [a for a in args if isinstance(a, tvm.runtime.Tensor)]
        us = float(np.median(timer(*args).results)) * 1e6
        kernels.append(KernelTime(i, symbol, kernel_kind(symbol), _describe(tensors[-1]) if tensors else "-", us,
                                  tuple(planned[i]["nodes"]) if mapped else ()))
    return Profile(tuple(kernels), e2e, builtins, mapped and bool(calls))
